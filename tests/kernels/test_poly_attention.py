import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lorakit.kernels.poly_attention import feature_map, num_features, poly_attention, taylor_exp
from lorakit.limits.bounds import gradient_bounds


def softmax_reference(q, k, v, scale, causal, key_mask, weight_fn=None):
    """Exact attention (float64), k/v expanded to the query heads; returns (out, weights)."""
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    s = scale * q @ k.transpose(-1, -2)
    allowed = torch.ones_like(s, dtype=torch.bool)
    if causal:
        allowed &= torch.ones(s.shape[-2:], dtype=torch.bool).tril()
    if key_mask is not None:
        allowed &= key_mask[:, None, None, :]
    w = torch.softmax(s.masked_fill(~allowed, -math.inf), dim=-1) if weight_fn is None else weight_fn(s) * allowed
    if weight_fn is not None:
        w = w / w.sum(-1, keepdim=True)
    return w @ v, w, k, v


@pytest.mark.parametrize("d,g", [(1, 2), (3, 2), (4, 4), (2, 8)])
def test_feature_map_is_the_taylor_kernel(d, g):
    x, y = torch.randn(6, d, dtype=torch.float64), torch.randn(6, d, dtype=torch.float64)
    fx = feature_map(x, g)
    assert fx.shape[-1] == num_features(d, g) == math.comb(d + g, g)
    torch.testing.assert_close((fx * feature_map(y, g)).sum(-1), taylor_exp((x * y).sum(-1), g))


@settings(max_examples=60, deadline=None)
@given(
    gamma=st.floats(0.25, 3.0),
    degree=st.sampled_from([2, 4, 6, 8]),
    causal=st.booleans(),
    padded=st.booleans(),
    groups=st.sampled_from([1, 2]),
    d=st.integers(1, 4),
    length=st.integers(2, 19),
    chunk=st.sampled_from([3, 8, 128]),
    seed=st.integers(0, 10_000),
)
def test_agrees_with_softmax_within_the_certified_bound(gamma, degree, causal, padded, groups, d, length, chunk, seed):
    """Acceptance 1: forward and q/k/v gradients within the certified Taylor bound (float64)."""
    if degree == 8 and d > 2:
        d = 2  # keep the feature count small: C(d + 8, 8)
    gen = torch.Generator().manual_seed(seed)
    b, hkv = 2, 2
    q = torch.randn(b, hkv * groups, length, d, generator=gen, dtype=torch.float64)
    k = torch.randn(b, hkv, length, d, generator=gen, dtype=torch.float64)
    v = torch.randn(b, hkv, length, 3, generator=gen, dtype=torch.float64)
    scale = 1 / math.sqrt(d)
    g0 = scale * q.norm(dim=-1).max() * k.norm(dim=-1).max()
    q, k = q * (gamma / g0).sqrt(), k * (gamma / g0).sqrt()  # the certified logit bound is now gamma
    key_mask = None
    if padded:
        key_mask = torch.ones(b, length, dtype=torch.bool)
        key_mask[0, max(1, length // 2):] = False
    q.requires_grad_(True), k.requires_grad_(True), v.requires_grad_(True)
    out = poly_attention(q, k, v, scale=scale, degree=degree, causal=causal, mask=key_mask, chunk=chunk)
    ref, w, kx, vx = softmax_reference(q, k, v, scale, causal, key_mask)
    d_out = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    got = torch.autograd.grad(out, (q, k, v), d_out)
    want = torch.autograd.grad(ref, (q, k, v), d_out)
    bounds = gradient_bounds(w.detach(), q.detach(), kx.detach(), vx.detach(), d_out, scale=scale, gamma=gamma, degree=degree)
    slack = 1e-10
    assert ((out - ref).abs() <= bounds.out + slack).all()
    assert ((got[0] - want[0]).abs() <= bounds.dq + slack).all()
    # key/value bounds are per expanded head: fold the query groups back onto their key head
    dk_b = bounds.dk.view(b, hkv, groups, length, d).sum(2)
    dv_b = bounds.dv.view(b, hkv, groups, length, 3).sum(2)
    assert ((got[1] - want[1]).abs() <= dk_b + slack).all()
    assert ((got[2] - want[2]).abs() <= dv_b + slack).all()


def test_small_logits_are_accurate():
    """At G = 0.25 and degree 8 the bound is ~1e-11, and the kernel meets it."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 50, 4, generator=gen, dtype=torch.float64) for _ in range(3))
    scale = 0.5
    g0 = scale * q.norm(dim=-1).max() * k.norm(dim=-1).max()
    q, k = q * (0.25 / g0).sqrt(), k * (0.25 / g0).sqrt()
    out = poly_attention(q, k, v, scale=scale, degree=8, causal=True, chunk=16)
    ref, *_ = softmax_reference(q, k, v, scale, True, None)
    assert (out - ref).abs().max() < 1e-10


def test_gradcheck_of_the_custom_backward():
    gen = torch.Generator().manual_seed(1)
    q = (0.5 * torch.randn(1, 2, 7, 3, generator=gen, dtype=torch.float64)).requires_grad_()
    k = (0.5 * torch.randn(1, 1, 7, 3, generator=gen, dtype=torch.float64)).requires_grad_()
    v = torch.randn(1, 1, 7, 2, generator=gen, dtype=torch.float64).requires_grad_()
    mask = torch.tensor([[True] * 5 + [False] * 2])
    for causal in (False, True):
        assert torch.autograd.gradcheck(lambda a, b, c: poly_attention(a, b, c, degree=4, causal=causal, mask=mask, chunk=3), (q, k, v))


def test_masks_in_sdpa_formats():
    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 2, 6, 4, generator=gen) for _ in range(3))
    key = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    base = poly_attention(q, k, v, mask=key, causal=True)
    tri = torch.ones(6, 6, dtype=torch.bool).tril()
    bool4d = tri[None, None] & key[:, None, None, :]
    additive = torch.zeros(2, 1, 6, 6).masked_fill(~bool4d, -math.inf)
    torch.testing.assert_close(poly_attention(q, k, v, mask=bool4d), base)
    torch.testing.assert_close(poly_attention(q, k, v, mask=additive), base)
    torch.testing.assert_close(poly_attention(q, k, v, mask=key[:, None, None, :], causal=True), base)
    # float32 inputs come back float32; bf16 is computed in float32
    assert poly_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), causal=True).dtype == torch.bfloat16


@pytest.mark.parametrize("kwargs,needle", [
    (dict(degree=3), "degree=3 must be a positive even integer"),
    (dict(degree=0), "degree=0"),
    (dict(degree=-2), "degree=-2"),
    (dict(mask=torch.ones(2, 5, dtype=torch.bool)), "[batch, keys] = [2, 6]"),
    (dict(mask=torch.ones(2, 1, 6, 5, dtype=torch.bool)), "does not broadcast"),
    (dict(mask=torch.rand(2, 1, 6, 6)), "bias"),
    (dict(mask=torch.ones(6, 6, dtype=torch.bool).triu()[None, None]), "neither a key-padding mask nor causal"),
    (dict(scale=0.0), "scale=0.0"),
])
def test_bad_input(kwargs, needle):
    q, k, v = (torch.randn(2, 2, 6, 4) for _ in range(3))
    with pytest.raises(ValueError, match=__import__("re").escape(needle)):
        poly_attention(q, k, v, **kwargs)


def test_non_finite_and_shape_errors():
    q, k, v = (torch.randn(1, 2, 6, 4) for _ in range(3))
    bad = q.clone()
    bad[0, 0, 0, 0] = math.nan
    with pytest.raises(ValueError, match="q contains NaN"):
        poly_attention(bad, k, v)
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        poly_attention(torch.randn(1, 3, 6, 4), k, v)
    with pytest.raises(ValueError, match="as many queries as keys"):
        poly_attention(q[:, :, :3], k, v, causal=True)


# ---------------------------------------------------------------------- issue 31, 2: under autocast
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("backward_inside", [False, True])
def test_under_cpu_bf16_autocast_it_computes_in_float32(causal, backward_inside):
    """The certified bound is an fp32 statement: under autocast the forward and the backward (even one called inside
    the autocast region) run in float32 on the given inputs, exactly as without autocast; before, the forward's
    products ran in bf16 and the backward in float32, so the two did not belong to one function."""
    g = torch.Generator().manual_seed(1)
    q0, k0, v0 = (torch.randn(2, 4, 40, 8, generator=g).to(torch.bfloat16) for _ in range(3))
    results = []
    for autocast in (True, False):
        q, k, v = (t.clone().requires_grad_() for t in (q0, k0, v0))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = poly_attention(q, k, v, causal=causal, chunk=16)
            loss = (out.float() * torch.linspace(-1, 1, out.shape[-1])).sum()
            if backward_inside:
                loss.backward()
        if not backward_inside:
            loss.backward()
        results.append((out, q.grad, k.grad, v.grad))
    for got, want in zip(*results):
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got, want, rtol=0, atol=0)
