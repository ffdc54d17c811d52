import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lorakit.kernels import lora_linear


def reference(x, w, b, a, bb, s, x_drop=None):
    """Plain autograd: y = x W^T + b + s (drop(x) A^T) B^T."""
    xd = x if x_drop is None else x_drop
    y = x @ w.t() + s * (xd @ a.t()) @ bb.t()
    return y if b is None else y + b


def leaves(*tensors):
    return [t.detach().clone().requires_grad_(True) if t is not None else None for t in tensors]


def test_gradcheck_float64():
    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(5, 6, generator=g), torch.randn(4, 6, generator=g), torch.randn(4, generator=g)
    a, bb = torch.randn(3, 6, generator=g), torch.randn(4, 3, generator=g)
    args = [t.double().requires_grad_(True) for t in (x, w, b, a, bb)]
    assert torch.autograd.gradcheck(lambda *t: lora_linear(*t, 0.7), args)


@settings(max_examples=40, deadline=None)
@given(
    lead=st.lists(st.integers(1, 4), min_size=1, max_size=2),
    in_f=st.integers(1, 9),
    out_f=st.integers(1, 9),
    r=st.integers(1, 9),
    with_bias=st.booleans(),
    scale=st.floats(0.1, 4.0),
    seed=st.integers(0, 2**16),
)
def test_matches_plain_autograd(lead, in_f, out_f, r, with_bias, scale, seed):
    r = min(r, in_f, out_f)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, in_f, generator=g)
    w, a, bb = torch.randn(out_f, in_f, generator=g), torch.randn(r, in_f, generator=g), torch.randn(out_f, r, generator=g)
    b = torch.randn(out_f, generator=g) if with_bias else None
    grad = torch.randn(*lead, out_f, generator=g)

    ours = leaves(x, w, b, a, bb)
    ref = leaves(x, w, b, a, bb)
    y1 = lora_linear(ours[0], ours[1], ours[2], ours[3], ours[4], scale)
    y2 = reference(ref[0], ref[1], ref[2], ref[3], ref[4], scale)
    torch.testing.assert_close(y1, y2, rtol=1e-5, atol=1e-5)
    y1.backward(grad)
    y2.backward(grad)
    for p, q in zip(ours, ref):
        if p is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-5)


def test_dropout_uses_one_mask_for_forward_and_backward():
    g = torch.Generator().manual_seed(3)
    x, w, a, bb = torch.randn(6, 5, generator=g), torch.randn(4, 5, generator=g), torch.randn(2, 5, generator=g), torch.randn(4, 2, generator=g)
    grad = torch.randn(6, 4, generator=g)
    ours, ref = leaves(x, w, a, bb), leaves(x, w, a, bb)
    torch.manual_seed(11)
    y1 = lora_linear(ours[0], ours[1], None, ours[2], ours[3], 2.0, dropout_p=0.3, training=True)
    torch.manual_seed(11)
    x_drop, _ = torch.native_dropout(ref[0], 0.3, True)
    y2 = reference(ref[0], ref[1], None, ref[2], ref[3], 2.0, x_drop=x_drop)
    torch.testing.assert_close(y1, y2)
    y1.backward(grad)
    y2.backward(grad)
    for p, q in zip(ours, ref):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-5)
    # eval mode: no dropout at all
    y3 = lora_linear(x, w, None, a, bb, 2.0, dropout_p=0.3, training=False)
    torch.testing.assert_close(y3, reference(x, w, None, a, bb, 2.0))


def test_no_input_gradient_when_input_is_frozen():
    """The first adapted layer of a network gets no dX: nothing is computed or saved for it."""
    x = torch.randn(4, 5)
    w = torch.randn(3, 5)
    a = torch.randn(2, 5, requires_grad=True)
    bb = torch.randn(3, 2, requires_grad=True)
    y = lora_linear(x, w, None, a, bb, 1.0)
    y.sum().backward()
    assert a.grad is not None and bb.grad is not None and x.grad is None


def test_frozen_input_grad_replaces_g_w0_only():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(4, 5, generator=g, requires_grad=True)
    w, a, bb = torch.randn(3, 5, generator=g), torch.randn(2, 5, generator=g), torch.randn(3, 2, generator=g)
    grad = torch.randn(4, 3, generator=g)
    calls = []

    def zero_frozen(gr):
        calls.append(gr.shape)
        return torch.zeros(gr.shape[0], 5)

    lora_linear(x, w, None, a, bb, 1.5, frozen_input_grad=zero_frozen).backward(grad)
    assert calls == [torch.Size([4, 3])]
    torch.testing.assert_close(x.grad, 1.5 * (grad @ bb) @ a)


def test_transposed_weight_view_for_conv1d():
    g = torch.Generator().manual_seed(2)
    w_in_out = torch.randn(5, 3, generator=g)  # Conv1D stores [in, out]
    x, a, bb = torch.randn(4, 5, generator=g), torch.randn(2, 5, generator=g), torch.randn(3, 2, generator=g)
    torch.testing.assert_close(lora_linear(x, w_in_out.t(), None, a, bb, 1.0), reference(x, w_in_out.t(), None, a, bb, 1.0))


def test_bf16_autocast_keeps_parameter_dtypes():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(8, 16, generator=g, requires_grad=True)
    w, b = torch.randn(12, 16, generator=g), torch.randn(12, generator=g)
    a = torch.randn(4, 16, generator=g, requires_grad=True)
    bb = torch.randn(12, 4, generator=g, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = lora_linear(x, w, b, a, bb, 2.0)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32 and a.grad.dtype == torch.float32 and bb.grad.dtype == torch.float32
    ref = leaves(x, a, bb)
    reference(ref[0], w, b, ref[1], ref[2], 2.0).sum().backward()
    torch.testing.assert_close(a.grad, ref[1].grad, rtol=3e-2, atol=3e-1)
    torch.testing.assert_close(y.float(), reference(x, w, b, a, bb, 2.0).detach(), rtol=3e-2, atol=2e-1)


@pytest.mark.parametrize("needs", [(True, False, False), (False, True, False), (False, False, True)])
def test_partial_requires_grad(needs):
    g = torch.Generator().manual_seed(6)
    x = torch.randn(3, 4, generator=g).requires_grad_(needs[0])
    a = torch.randn(2, 4, generator=g).requires_grad_(needs[1])
    bb = torch.randn(5, 2, generator=g).requires_grad_(needs[2])
    w = torch.randn(5, 4, generator=g)
    lora_linear(x, w, None, a, bb, 1.0).sum().backward()
    for t, n in zip((x, a, bb), needs):
        assert (t.grad is not None) == n
