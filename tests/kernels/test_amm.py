import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lorakit.kernels import amm


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 12), out_f=st.integers(2, 20), in_f=st.integers(2, 20), r0=st.integers(0, 4), seed=st.integers(0, 999))
def test_all_features_reproduce_the_exact_product(n, out_f, in_f, r0, seed):
    """With every feature kept, the Double-LoRA form G_I W0_I + (G B0 - G_I B0_I) A0 is G W0."""
    g = torch.Generator().manual_seed(seed)
    grad, w0 = torch.randn(n, out_f, generator=g, dtype=torch.float64), torch.randn(out_f, in_f, generator=g, dtype=torch.float64)
    r0 = min(r0, out_f - 1, in_f - 1)
    b0, a0 = amm.double_lora_factors(w0, r0) if r0 > 0 else (None, None)
    idx = torch.arange(out_f)
    torch.testing.assert_close(amm.approx_input_grad(grad, w0, idx, b0, a0), grad @ w0)


@pytest.mark.parametrize("r0", [0, 3])
def test_both_forms_equal_the_residual_form(r0):
    """(G B0) A0 + G_I R_I, computed as G_I W0_I + (G B0^J) A0 and as G_I W0_I + (G B0 - G_I B0_I) A0."""
    g = torch.Generator().manual_seed(0)
    grad, w0 = torch.randn(7, 30, generator=g, dtype=torch.float64), torch.randn(30, 11, generator=g, dtype=torch.float64)
    b0, a0 = amm.double_lora_factors(w0, r0) if r0 else (None, None)
    idx = torch.tensor([1, 4, 5, 9, 20, 29])
    residual = w0 - b0 @ a0 if r0 else w0
    expected = (grad @ b0) @ a0 + grad[:, idx] @ residual[idx] if r0 else grad[:, idx] @ w0[idx]
    torch.testing.assert_close(amm.approx_input_grad(grad, w0, idx, b0, a0), expected)
    b0_dropped = amm.dropped_rows_only(b0, idx) if r0 else None
    torch.testing.assert_close(amm.topk_input_grad(grad, w0, idx, b0_dropped, a0), expected)


def test_randomized_svd_matches_truncated_svd():
    g = torch.Generator().manual_seed(1)
    u, _ = torch.linalg.qr(torch.randn(200, 200, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(120, 120, generator=g, dtype=torch.float64))
    s = torch.logspace(1, -3, 120, dtype=torch.float64)
    w = u[:, :120] @ torch.diag(s) @ v.t()
    uu, ss, vh = amm.randomized_svd(w, 10)
    torch.testing.assert_close(ss, s[:10], rtol=1e-3, atol=0)  # a slowly decaying spectrum: the hard case
    best = torch.linalg.matrix_norm(w - (u[:, :10] * s[:10]) @ v[:, :10].t())
    assert torch.linalg.matrix_norm(w - (uu * ss) @ vh) <= best * 1.001
    fast = w[:, :40] @ torch.diag(torch.logspace(0, -6, 40, dtype=torch.float64)) @ w[:40, :40].t()
    _, s_fast, _ = amm.randomized_svd(fast, 5)
    torch.testing.assert_close(s_fast, torch.linalg.svdvals(fast)[:5], rtol=1e-8, atol=0)
    again = amm.randomized_svd(w, 10)
    assert torch.equal(again[1], ss), "seeded: the same factors every time"


def test_sampling_is_unbiased():
    g = torch.Generator().manual_seed(2)
    grad, w0 = torch.randn(5, 40, generator=g, dtype=torch.float64), torch.randn(40, 6, generator=g, dtype=torch.float64)
    b0, a0 = amm.double_lora_factors(w0, 2)
    scores = grad.norm(dim=0) * amm.residual_row_norms(w0, b0, a0).double()
    probs = scores / scores.sum()
    exact = grad @ w0
    gen = torch.Generator().manual_seed(3)
    trials = 4000
    mean = sum(amm.approx_input_grad(grad, w0, *_idx_w(probs, 8, gen, b0, a0)) for _ in range(trials)) / trials
    single = amm.approx_input_grad(grad, w0, *_idx_w(probs, 8, gen, b0, a0))
    err_mean = (mean - exact).norm() / exact.norm()
    err_single = (single - exact).norm() / exact.norm()
    assert err_mean < 0.05 and err_mean < err_single / 10


def _idx_w(probs, k, gen, b0, a0):
    idx, w = amm.sample_features(probs, k, gen)
    return idx, b0, a0, w


def test_top_selection_and_kept_count():
    scores = torch.tensor([0.1, 5.0, 0.3, 4.0, 2.0])
    assert amm.select_top(scores, 3).tolist() == [1, 3, 4]
    assert amm.kept_features(0.55, 100) == 55 and amm.kept_features(0.555, 100) == 56
    assert amm.kept_features(1.0, 7) == 7 and amm.kept_features(0.01, 7) == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_output_dtype_follows_gradient(dtype):
    grad, w0 = torch.randn(4, 8).to(dtype), torch.randn(8, 5)
    b0, a0 = amm.double_lora_factors(w0, 2)
    assert amm.approx_input_grad(grad, w0, torch.tensor([0, 3]), b0, a0).dtype == dtype
