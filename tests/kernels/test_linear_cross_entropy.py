"""The fused head + cross-entropy equals F.cross_entropy on the materialised logits, values and gradients."""

import math

import pytest
import torch
import torch.nn.functional as F

from lorakit.kernels.linear_cross_entropy import linear_cross_entropy


def reference(hidden, weight, labels, bias=None):
    logits = hidden @ weight.t() + (bias if bias is not None else 0)
    return F.cross_entropy(logits.reshape(-1, weight.shape[0]).float(), labels.reshape(-1), ignore_index=-100)


def leaves(*tensors):
    return [t.detach().clone().requires_grad_(True) if t is not None else None for t in tensors]


@pytest.mark.parametrize("chunk", [None, 1, 3, 64])
@pytest.mark.parametrize("with_bias", [False, True])
def test_loss_and_all_gradients_match_reference(chunk, with_bias):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 7, 5, generator=g, dtype=torch.float64)
    weight = torch.randn(11, 5, generator=g, dtype=torch.float64)
    bias = torch.randn(11, generator=g, dtype=torch.float64) if with_bias else None
    labels = torch.randint(0, 11, (2, 7), generator=g)
    labels[0, :3] = -100
    h1, w1, b1 = leaves(hidden, weight, bias)
    h2, w2, b2 = leaves(hidden, weight, bias)
    ours = linear_cross_entropy(h1, w1, labels, b1, chunk=chunk)
    ref = reference(h2, w2, labels, b2)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours.double(), ref.double(), rtol=1e-6, atol=0)
    (3.0 * ours).backward()
    (3.0 * ref).backward()
    torch.testing.assert_close(h1.grad, h2.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(w1.grad, w2.grad, rtol=1e-5, atol=1e-7)
    if with_bias:
        torch.testing.assert_close(b1.grad, b2.grad, rtol=1e-5, atol=1e-7)


def test_frozen_weight_gets_no_gradient_and_float32_matches():
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(40, 16, generator=g, requires_grad=True)
    weight = torch.randn(300, 16, generator=g) * 0.1
    labels = torch.randint(0, 300, (40,), generator=g)
    loss = linear_cross_entropy(hidden, weight, labels)
    loss.backward()
    ref_h = hidden.detach().clone().requires_grad_(True)
    reference(ref_h, weight, labels).backward()
    assert weight.grad is None
    torch.testing.assert_close(loss, reference(hidden.detach(), weight, labels), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(hidden.grad, ref_h.grad, rtol=1e-4, atol=1e-7)


def test_bf16_inputs_close_to_float32():
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(64, 32, generator=g)
    weight = torch.randn(500, 32, generator=g) * 0.2
    labels = torch.randint(0, 500, (64,), generator=g)
    exact = float(reference(hidden, weight, labels))
    low = float(linear_cross_entropy(hidden.bfloat16(), weight.bfloat16(), labels))
    assert abs(low - exact) / exact < 1e-2


def test_no_labelled_row_gives_nan_like_torch():
    hidden, weight = torch.randn(3, 4), torch.randn(6, 4)
    labels = torch.full((3,), -100)
    assert math.isnan(float(linear_cross_entropy(hidden, weight, labels)))
    assert math.isnan(float(reference(hidden, weight, labels)))


def test_shape_errors_name_the_shapes():
    with pytest.raises(ValueError, match=r"labels of shape \[4\]"):
        linear_cross_entropy(torch.randn(3, 4), torch.randn(6, 4), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"weight of shape \[6, 5\]"):
        linear_cross_entropy(torch.randn(3, 4), torch.randn(6, 5), torch.zeros(3, dtype=torch.long))


# ---------------------------------------------------------------------- issue 31, 1: under autocast
def _unfused(hidden, weight, labels, bias, scale, softcap):
    z = torch.nn.functional.linear(hidden, weight, bias).float() * scale
    if softcap:
        z = softcap * torch.tanh(z / softcap)
    return torch.nn.functional.cross_entropy(z, labels, ignore_index=-100)


@pytest.mark.parametrize("hidden_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias,scale,softcap", [(False, 1.0, None), (True, 0.5, None), (False, 1.0, 30.0)])
def test_under_cpu_bf16_autocast_it_computes_as_the_unfused_head(hidden_dtype, bias, scale, softcap):
    """The products run in bf16 (as F.linear does under autocast), the loss in float32; before, an fp32 hidden state
    kept the whole head in fp32 under autocast (on a GPU the largest GEMM of a small model)."""
    g = torch.Generator().manual_seed(0)
    h0 = torch.randn(70, 48, generator=g)
    w0 = torch.randn(300, 48, generator=g) / 4
    b0 = torch.randn(300, generator=g) if bias else None
    y = torch.randint(0, 300, (70,), generator=g)
    y[::7] = -100
    results = []
    for fn in (lambda h, w, b: linear_cross_entropy(h, w, y, b, chunk=32, scale=scale, softcap=softcap),
               lambda h, w, b: _unfused(h, w, y, b, scale, softcap)):
        h = h0.to(hidden_dtype).requires_grad_()
        w = w0.clone().requires_grad_()
        b = b0.clone().requires_grad_() if bias else None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = fn(h, w, b)
        loss.backward()
        results.append((loss, h.grad, w.grad, b.grad if bias else None))
    (fused, dh, dw, db), (plain, dh_ref, dw_ref, db_ref) = results
    assert fused.dtype == torch.float32 and dh.dtype == hidden_dtype and dw.dtype == torch.float32
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dh.float(), dh_ref.float(), rtol=2e-2, atol=2e-4)  # bf16 products on both sides
    torch.testing.assert_close(dw, dw_ref, rtol=2e-2, atol=2e-4)
    if bias:
        torch.testing.assert_close(db, db_ref, rtol=2e-2, atol=2e-4)
    without = linear_cross_entropy(h0, w0, y, b0, chunk=32, scale=scale, softcap=softcap)  # fp32 outside autocast
    assert not torch.equal(fused, without)  # the autocast call did take the bf16 products


@pytest.mark.parametrize("bias", [False, True])
def test_a_bf16_head_under_fp32_states_is_widened_a_block_at_a_time(monkeypatch, bias):
    """speed.widen: a frozen bf16 head with fp32 hidden states computes in fp32, widened a few rows at a time, equal
    to the head widened whole."""
    import lorakit.kernels.linear_cross_entropy as lce

    monkeypatch.setattr(lce, "WIDEN_ELEMENTS", 7 * 16)  # blocks of 256 rows (the least) of a 1000-row head
    g = torch.Generator().manual_seed(0)
    w = torch.randn(1000, 16, generator=g).to(torch.bfloat16)
    b = torch.randn(1000, generator=g).to(torch.bfloat16) if bias else None
    labels = torch.randint(0, 1000, (2, 5), generator=g)
    results = []
    for weight, b_ in ((w, b), (w.float(), None if b is None else b.float())):
        h = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(1), requires_grad=True)
        loss = lce.linear_cross_entropy(h, weight, labels, b_, chunk=3)
        loss.backward()
        results.append((loss.detach(), h.grad))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-5, atol=1e-7)
