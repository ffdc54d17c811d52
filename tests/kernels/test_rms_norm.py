"""kernels.rms_norm against the plain RMSNorm formulas of both styles (transformers' Llama and Gemma norms written
out): the bf16 output is the same bits, the gradients within one unit in the last place; float32 within 1e-5."""

import pytest
import torch

from lorakit.kernels.rms_norm import rms_norm


def plain(x, w, eps, style):
    n = x.float()
    n = n * torch.rsqrt(n.pow(2).mean(-1, keepdim=True) + eps)
    if style == "weight-after-cast":
        return w * n.to(x.dtype)
    return (n * (1.0 + w.float())).to(x.dtype)


def close(a, b, tolerance):
    assert a.dtype == b.dtype and a.shape == b.shape
    assert torch.allclose(a.float(), b.float(), rtol=tolerance, atol=tolerance * a.abs().max().item()), \
        (a.float() - b.float()).abs().max()


@pytest.mark.parametrize("style", ["weight-after-cast", "offset-before-cast"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [(7, 64), (2, 3, 5, 48), (1, 1, 2048)])
@pytest.mark.parametrize("train_weight", [False, True])
def test_rms_norm_equals_the_plain_formula(style, dtype, shape, train_weight):
    g = torch.Generator().manual_seed(sum(shape))
    x = (torch.randn(shape, generator=g) * 3).to(dtype)
    w = (torch.randn(shape[-1], generator=g) * 0.5 + 0.5).to(dtype).requires_grad_(train_weight)
    grad = torch.randn(shape, generator=g).to(dtype)
    out = []
    for fn in (plain, rms_norm):
        xi = x.clone().requires_grad_(True)
        w.grad = None
        y = fn(xi, w, 1e-6, style)
        y.backward(grad)
        out.append((y.detach(), xi.grad, None if w.grad is None else w.grad.clone()))
    (y0, dx0, dw0), (y1, dx1, dw1) = out
    grad_tol = 2.0**-7 if dtype == torch.bfloat16 else 1e-5
    close(y0, y1, 0.0 if dtype == torch.bfloat16 else 1e-5)
    close(dx0, dx1, grad_tol)
    if train_weight:
        close(dw0, dw1, grad_tol)
    else:
        assert dw1 is None


def test_rms_norm_saves_only_the_input_and_the_row_scales():
    x = torch.randn(4, 32, dtype=torch.bfloat16, requires_grad=True)
    w = torch.ones(32, dtype=torch.bfloat16)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        rms_norm(x, w, 1e-6)
    assert sorted(t.numel() for t in saved) == [4, 32, 4 * 32]  # r per row, the weight, x itself
    assert [t.dtype for t in saved if t.numel() == 4 * 32] == [torch.bfloat16]


def test_rms_norm_refuses_an_unknown_style():
    with pytest.raises(ValueError, match="offset-before-cast"):
        rms_norm(torch.randn(2, 4), torch.ones(4), 1e-6, "after")
