"""Almost-linear attention: exp replaced by its Taylor polynomial, written as a feature map.

Softmax attention out_i = sum_j exp(s_ij) v_j / sum_j exp(s_ij), s_ij = beta q_i . k_j, costs
O(L^2 d). With p_g(s) = sum_{n<=g} s^n / n!, the even-degree Taylor polynomial of exp
(positive for every real s, so the normaliser never vanishes), and the feature map

    phi_a(x) = x^a / sqrt(a_1! ... a_d!)   over all multi-indices |a| <= g,  x = sqrt(beta) q

one has phi(q) . phi(k) = p_g(beta q . k) exactly (multinomial theorem), so

    out = phi(Q) (phi(K)^T V) / phi(Q) (phi(K)^T 1)

costs O(L k d) with k = C(d + g, g) features (d = 32, g = 2: 561). This is step 1 of the
almost-linear LoRA-gradient algorithm of Hu et al. (ICLR 2025, the "Alman-Song polynomial
method"); its backward, written out below, is the paper's chained low-rank gradient
(steps 2-6): no L x L matrix is formed and the cost stays linear in L.

Causal attention keeps prefix states S = sum_{j<c} phi(k_j) v_j^T (k x d) and
z = sum_{j<c} phi(k_j) across chunks, and evaluates p_g(beta q . k) directly inside a chunk.
The backward runs two sweeps over the chunks: forward (prefix states, for the query side)
and reverse (suffix sums of phi(q)^T dN, for the key and value sides). Nothing of size
O(L k) or O(L/C k d) is stored: memory is O(C k + k d) per batch and head.

Error (Taylor remainder): for |s| <= G, |exp(s) - p_g(s)| <= G^(g+1) e^G / (g+1)!, so each
unnormalised weight has relative error at most eps = G^(g+1) e^G / (g+1)! and, when eps < 1,
each output entry is within 2 eps / (1 - eps) max|v| of softmax attention; always within
2 max|v| (the weights stay a convex combination). See ``lorakit.limits.bounds``.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

DEFAULT_CHUNK = 256


# ---------------------------------------------------------------------- the feature map
@functools.lru_cache(maxsize=64)
def _plan(d: int, degree: int) -> tuple[list[tuple[Tensor, Tensor]], Tensor]:
    """Monomials of degree 1..g in d variables, each built from one of degree one less.

    Returns [(parent, var)] per degree n >= 2 (monomial = previous-level[parent] * x[var],
    var >= the parent's last variable, so every multiset appears once) and the coefficient
    1 / sqrt(prod a_i!) of every feature (degree 0 first).
    """
    last = list(range(d))  # last variable of each degree-1 monomial
    counts = [[1 if i == v else 0 for i in range(d)] for v in range(d)]
    levels = []
    coef = [1.0] + [1.0] * d
    for _ in range(2, degree + 1):
        parents, variables, new_last, new_counts = [], [], [], []
        for p, (lv, cnt) in enumerate(zip(last, counts)):
            for v in range(lv, d):
                parents.append(p)
                variables.append(v)
                new_last.append(v)
                c = list(cnt)
                c[v] += 1
                new_counts.append(c)
                coef.append(1.0 / math.sqrt(math.prod(math.factorial(a) for a in c)))
        levels.append((torch.tensor(parents), torch.tensor(variables)))
        last, counts = new_last, new_counts
    return levels, torch.tensor(coef, dtype=torch.float64)


def num_features(d: int, degree: int) -> int:
    """C(d + g, g): the distinct monomials of degree <= g in d variables."""
    return math.comb(d + degree, degree)


def feature_map(x: Tensor, degree: int) -> Tensor:
    """phi(x) [..., k] with phi(x) . phi(y) = p_g(x . y) (see the module docstring)."""
    if degree == 2:
        return _feature_map_2(x)
    d = x.shape[-1]
    levels, coef = _plan(d, degree)
    feats = [torch.ones_like(x[..., :1]), x]
    prev = x
    for parents, variables in levels:
        prev = prev.index_select(-1, parents.to(x.device)) * x.index_select(-1, variables.to(x.device))
        feats.append(prev)
    return torch.cat(feats, dim=-1) * coef.to(device=x.device, dtype=x.dtype)


def _circulant(xt: Tensor, blocks: int) -> Tensor:
    """[P, d, N] -> [P, blocks, d, N] with [p, o, i] = x_{(i + o) mod d} (a strided view of [x; x])."""
    p, d, n = xt.shape
    doubled = torch.cat([xt, xt], dim=1)
    return doubled.as_strided((p, blocks, d, n), (2 * d * n, n, n, 1), doubled.storage_offset())


def _feature_map_2(x: Tensor) -> Tensor:
    """Degree 2 without a gather: [1, x, quadratic monomials], feature-major inside.

    The d (d + 1) / 2 distinct pairs are enumerated by circular offsets, {i, (i + o) mod d} for
    o = 0 .. floor(d / 2) and i = 0 .. d - 1, keeping the first d (d + 1) / 2 products (for even d
    the last offset's second half repeats its first). So the products are one broadcast
    multiply of x with a strided view of [x; x]; o = 0 is the diagonal, coefficient 1 / sqrt 2.
    Returned as a transposed view of a [..., k, N] tensor (matrix products take it for free).
    """
    d = x.shape[-1]
    lead, n = x.shape[:-2], x.shape[-2]
    xt = x.transpose(-1, -2).reshape(-1, d, n).contiguous()  # [P, d, N]
    blocks, pairs = d // 2 + 1, d * (d + 1) // 2
    # one buffer: [1, x, all blocks * d products]; the features are its first 1 + d + pairs rows (no copy)
    buf = torch.empty(xt.shape[0], 1 + d + blocks * d, n, dtype=x.dtype, device=x.device)
    buf[:, 0] = 1.0
    buf[:, 1 : d + 1] = xt
    torch.mul(xt[:, None], _circulant(xt, blocks), out=buf[:, d + 1 :].view(-1, blocks, d, n))
    buf[:, d + 1 : 2 * d + 1] *= 1 / math.sqrt(2)
    return buf[:, : 1 + d + pairs].reshape(*lead, 1 + d + pairs, n).transpose(-1, -2)


def feature_vjp(x: Tensor, degree: int, grad_features: Tensor) -> Tensor:
    """d/dx <phi(x), grad_features>. Degree 2 in closed form: a pair feature c x_i x_j with gradient
    g adds g c x_j to dx_i and g c x_i to dx_j; with the circular layout of ``_feature_map_2`` the
    first is a product with the same strided view, the second the same product rolled back by o."""
    if degree != 2:
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(feature_map(xg, degree), xg, grad_features)
        return grad
    d = x.shape[-1]
    lead, n = x.shape[:-2], x.shape[-2]
    blocks, pairs = d // 2 + 1, d * (d + 1) // 2
    gt = grad_features.transpose(-1, -2).reshape(-1, 1 + d + pairs, n)
    p = gt.shape[0]
    g = torch.zeros(p, blocks * d, n, dtype=x.dtype, device=x.device)
    g[:, :pairs] = gt[:, d + 1 :]
    g[:, :d] *= 1 / math.sqrt(2)
    g = g.view(p, blocks, d, n)
    xt = x.transpose(-1, -2).reshape(-1, d, n).contiguous()
    towards_i = (g * _circulant(xt, blocks)).sum(1)  # sum_o g[o, i] x_{i+o}
    t = g * xt[:, None]  # t[o, i] = g[o, i] x_i, to be added at index i + o
    doubled = torch.cat([t, t], dim=2)  # [P, blocks, 2d, N]; rolled[o, m] = t[o, m - o mod d]
    rolled = doubled.as_strided((p, blocks, d, n), (blocks * 2 * d * n, 2 * d * n - n, n, 1),
                                doubled.storage_offset() + d * n)
    dxt = towards_i + rolled.sum(1) + gt[:, 1 : d + 1]
    return dxt.reshape(*lead, d, n).transpose(-1, -2)


def taylor_exp(s: Tensor, degree: int) -> Tensor:
    """p_g(s) = sum_{n <= g} s^n / n! by Horner's rule."""
    if degree == 1:
        return s + 1.0
    out = s * (1.0 / math.factorial(degree)) + 1.0 / math.factorial(degree - 1)
    for n in range(degree - 2, -1, -1):
        out = out.mul_(s).add_(1.0 / math.factorial(n))
    return out


# ---------------------------------------------------------------------- masks
def split_mask(mask: Tensor | None, causal: bool, batch: int, heads: int, lq: int, lk: int) -> tuple[Tensor | None, bool]:
    """(key mask [B, Lk] bool or None, causal) from an sdpa-style mask.

    Polynomial attention factorises only over keys: a mask must be a key-padding mask,
    possibly combined with the causal pattern (rows with no allowed key are ignored: their
    output is zero). bool masks: True = attend; additive masks: 0 = attend, -inf (or below
    -1e4) = masked.
    """
    if mask is None:
        return None, causal
    if mask.dim() == 2:
        if tuple(mask.shape) != (batch, lk):
            raise ValueError(f"a 2-D mask must be [batch, keys] = [{batch}, {lk}], got {list(mask.shape)}")
        mask = mask[:, None, None, :]
    if mask.dim() != 4:
        raise ValueError(f"mask must be 2-D [batch, keys] or 4-D [batch, heads, queries, keys]; got {mask.dim()}-D")
    b, h, q, k = mask.shape
    if b not in (1, batch) or h not in (1, heads) or q not in (1, lq) or k != lk:
        raise ValueError(f"mask of shape {list(mask.shape)} does not broadcast to [{batch}, {heads}, {lq}, {lk}]")
    if mask.dtype != torch.bool:
        if not torch.isfinite(mask).any() and (mask == -math.inf).all():
            allowed = torch.zeros(mask.shape, dtype=torch.bool, device=mask.device)
        else:
            masked = mask < -1e4
            if ((mask != 0) & ~masked).any():
                raise ValueError("an additive mask with values other than 0 and -inf is a bias, which polynomial "
                                 "attention cannot factorise; use exact attention for this model")
            allowed = ~masked
    else:
        allowed = mask
    if h > 1 and not (allowed == allowed[:, :1]).all():
        raise ValueError("the mask differs between heads; polynomial attention supports key-padding and causal masks only")
    allowed = allowed[:, 0].expand(batch, lq, lk)
    live = allowed.any(dim=2, keepdim=True)  # rows with no allowed key are "don't care"
    key_mask = allowed.any(dim=1)  # [B, Lk]
    if not causal and ((allowed == key_mask[:, None, :]) | ~live).all():
        return (None if key_mask.all() else key_mask), False
    if lq == lk:
        tri = torch.ones(lq, lk, dtype=torch.bool, device=allowed.device).tril()
        if causal:  # the causal flag masks above the diagonal anyway
            allowed = allowed & tri
        key_mask = (allowed | ~tri).all(dim=1)
        if ((allowed == (tri & key_mask[:, None, :])) | ~live).all():
            return (None if key_mask.all() else key_mask), True
    raise ValueError("mask is neither a key-padding mask nor causal + key padding; polynomial attention "
                     "cannot factorise it: use exact attention")


# ---------------------------------------------------------------------- the autograd function
def _check(q: Tensor, k: Tensor, v: Tensor, degree: int, scale: float) -> None:
    if isinstance(degree, bool) or not isinstance(degree, int) or degree <= 0 or degree % 2:
        raise ValueError(f"degree={degree!r} must be a positive even integer (an odd Taylor polynomial of exp "
                         "has a real root, so the normaliser could vanish)")
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be [batch, heads, length, head_dim]; got {q.dim()}-D, {k.dim()}-D, {v.dim()}-D")
    if k.shape[:3] != v.shape[:3] or q.shape[0] != k.shape[0] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"shapes do not fit: q {list(q.shape)}, k {list(k.shape)}, v {list(v.shape)}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of key/value heads ({k.shape[1]})")
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale={scale!r} must be a positive finite number")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not torch.isfinite(t).all():
            raise ValueError(f"{name} contains NaN or infinite values")


def _compute_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


class PolyAttentionFunction(torch.autograd.Function):
    """Forward and backward on grouped tensors: q [B, Hkv, G, L, d], k [B, Hkv, L, d], v [B, Hkv, L, e].

    Values carry a column of ones, va = [V, 1], so one product gives numerator and normaliser:
    phi(Q) (phi(K)^T va) = [N, D]; the backward works with d[N, D] = [dN, dD] the same way.
    """

    @staticmethod
    def forward(ctx, q, k, v, key_mask, scale, degree, causal, chunk):
        with torch.autocast(q.device.type, enabled=False):  # in q's dtype (float32/64) under autocast too
            return PolyAttentionFunction._forward(ctx, q, k, v, key_mask, scale, degree, causal, chunk)

    @staticmethod
    def _forward(ctx, q, k, v, key_mask, scale, degree, causal, chunk):
        root = math.sqrt(scale)
        qs, ks = q * root, k * root
        km = key_mask[:, None, :, None].to(q.dtype) if key_mask is not None else None  # [B, 1, L, 1]
        va = torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)
        if not causal:
            state = _kv_state(ks, va, km, degree, chunk)  # phi(K)^T va  [B, H, k, e + 1]
            num = torch.cat([feature_map(qs[..., a : a + chunk, :], degree) @ state[:, :, None]
                             for a in range(0, qs.shape[3], chunk)], dim=3)
        else:
            num = _causal_forward(qs, ks, va, km, degree, chunk)
        den = num[..., -1]
        den = torch.where(den > 0, den, torch.ones_like(den))  # rows with no allowed key: output 0
        out = num[..., :-1] / den[..., None]
        ctx.save_for_backward(q, k, v, key_mask, out, den)
        ctx.scale, ctx.degree, ctx.causal, ctx.chunk = scale, degree, causal, chunk
        return out

    @staticmethod
    def backward(ctx, d_out):
        with torch.autocast(d_out.device.type, enabled=False):  # a backward called inside autocast: the same
            return PolyAttentionFunction._backward(ctx, d_out)

    @staticmethod
    def _backward(ctx, d_out):
        q, k, v, key_mask, out, den = ctx.saved_tensors
        scale, degree, chunk = ctx.scale, ctx.degree, ctx.chunk
        root = math.sqrt(scale)
        qs, ks = q * root, k * root
        km = key_mask[:, None, :, None].to(q.dtype) if key_mask is not None else None
        va = torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)
        d_out = d_out.to(q.dtype)
        # d loss / d [N, D]: dN = d_out / D, dD = -<d_out, out> / D
        d_num = torch.cat([d_out, -(d_out * out).sum(-1, keepdim=True)], dim=-1) / den[..., None]
        if ctx.causal:
            dqs, dks, dva = _causal_backward(qs, ks, va, km, d_num, degree, chunk)
        else:
            dqs, dks, dva = _noncausal_backward(qs, ks, va, km, d_num, degree, chunk)
        return dqs * root, dks * root, dva[..., :-1], None, None, None, None, None


def _masked_features(x: Tensor, km: Tensor | None, degree: int) -> Tensor:
    f = feature_map(x, degree)
    return f * km if km is not None else f


def _kv_state(ks: Tensor, va: Tensor, km: Tensor | None, degree: int, chunk: int) -> Tensor:
    """phi(K)^T va [B, H, k, e + 1], accumulated over key chunks."""
    state = None
    for a in range(0, ks.shape[2], chunk):
        fk = _masked_features(ks[:, :, a : a + chunk], km[:, :, a : a + chunk] if km is not None else None, degree)
        part = fk.transpose(-1, -2) @ va[:, :, a : a + chunk]
        state = part if state is None else state.add_(part)
    return state


def _feature_vjp(x: Tensor, degree: int, grad_features: Tensor, km: Tensor | None = None) -> Tensor:
    """d/dx of <phi(x) (* key mask), grad_features>."""
    return feature_vjp(x, degree, grad_features * km if km is not None else grad_features)


def _noncausal_backward(qs, ks, va, km, d_num, degree, chunk):
    state = _kv_state(ks, va, km, degree, chunk)
    dqs = torch.empty_like(qs)
    d_state = torch.zeros_like(state)
    for a in range(0, qs.shape[3], chunk):  # query side: dphi(Q) = d_num state^T; d_state = phi(Q)^T d_num
        sl = slice(a, a + chunk)
        grad_f = (state[:, :, None] @ d_num[..., sl, :].transpose(-1, -2)).transpose(-1, -2)
        dqs[..., sl, :] = feature_vjp(qs[..., sl, :], degree, grad_f)
        d_state += (feature_map(qs[..., sl, :], degree).transpose(-1, -2) @ d_num[..., sl, :]).sum(2)
    dks = torch.empty_like(ks)
    dva = torch.empty_like(va)
    for a in range(0, ks.shape[2], chunk):  # key side: dphi(K) = va d_state^T, d va = phi(K) d_state
        sl = slice(a, a + chunk)
        kmc = km[:, :, sl] if km is not None else None
        grad_f = (d_state @ va[:, :, sl].transpose(-1, -2)).transpose(-1, -2)
        dks[:, :, sl] = _feature_vjp(ks[:, :, sl], degree, grad_f, kmc)
        dva[:, :, sl] = _masked_features(ks[:, :, sl], kmc, degree) @ d_state
    return dqs, dks, dva


def _intra(qc, kc, kmc, degree):
    """Inside one chunk: P = p_g(q . k) masked (causal and key padding), and the logits."""
    s = qc @ kc[:, :, None].transpose(-1, -2)
    return s, _masked_causal(taylor_exp(s, degree), kmc)


def _causal_forward(qs, ks, va, km, degree, chunk):
    B, H, G, L, _ = qs.shape
    state = torch.zeros(B, H, num_features(qs.shape[-1], degree), va.shape[-1], dtype=qs.dtype, device=qs.device)
    num = torch.empty(B, H, G, L, va.shape[-1], dtype=qs.dtype, device=qs.device)
    for a in range(0, L, chunk):
        sl = slice(a, a + chunk)
        kmc = km[:, :, sl] if km is not None else None
        _, p = _intra(qs[..., sl, :], ks[:, :, sl], kmc, degree)
        num[..., sl, :] = feature_map(qs[..., sl, :], degree) @ state[:, :, None] + p @ va[:, :, None, sl]
        state += _masked_features(ks[:, :, sl], kmc, degree).transpose(-1, -2) @ va[:, :, sl]
    return num


def _causal_backward(qs, ks, va, km, d_num, degree, chunk):
    B, H, G, L, _ = qs.shape
    k_feat = num_features(qs.shape[-1], degree)
    dqs = torch.empty_like(qs)
    dks = torch.zeros_like(ks)
    dva = torch.zeros_like(va)
    starts = list(range(0, L, chunk))
    # forward sweep: prefix states, query-side gradient and the within-chunk terms
    state = torch.zeros(B, H, k_feat, va.shape[-1], dtype=qs.dtype, device=qs.device)
    for a in starts:
        sl = slice(a, a + chunk)
        kmc = km[:, :, sl] if km is not None else None
        qc, kc, vc, dc = qs[..., sl, :], ks[:, :, sl], va[:, :, sl], d_num[..., sl, :]
        grad_f = (state[:, :, None] @ dc.transpose(-1, -2)).transpose(-1, -2)
        dq = feature_vjp(qc, degree, grad_f)
        s, p = _intra(qc, kc, kmc, degree)
        dva[:, :, sl] += (p.transpose(-1, -2) @ dc).sum(2)
        dp = dc @ vc[:, :, None].transpose(-1, -2)  # [B, H, G, C, C]
        ds = dp * _masked_causal(taylor_exp(s, degree - 1), kmc)  # p_g' = p_{g-1}
        dq = dq + ds @ kc[:, :, None]
        dks[:, :, sl] += (ds.transpose(-1, -2) @ qc).sum(2)
        dqs[..., sl, :] = dq
        state += _masked_features(kc, kmc, degree).transpose(-1, -2) @ vc
    # reverse sweep: suffix sums phi(Q)^T d_num feed the key and value sides of earlier chunks
    d_state = torch.zeros_like(state)
    for a in reversed(starts):
        sl = slice(a, a + chunk)
        kmc = km[:, :, sl] if km is not None else None
        kc, vc = ks[:, :, sl], va[:, :, sl]
        if a != starts[-1]:
            grad_f = (d_state @ vc.transpose(-1, -2)).transpose(-1, -2)
            dks[:, :, sl] += _feature_vjp(kc, degree, grad_f, kmc)
            dva[:, :, sl] += _masked_features(kc, kmc, degree) @ d_state
        d_state += (feature_map(qs[..., sl, :], degree).transpose(-1, -2) @ d_num[..., sl, :]).sum(2)
    return dqs, dks, dva


def _masked_causal(x: Tensor, kmc: Tensor | None) -> Tensor:
    """Zero above the diagonal (in place) and at padded keys."""
    x = x.tril_()
    if kmc is not None:
        x = x * kmc[:, :, None, :, 0][:, :, :, None, :]
    return x


def poly_attention(q: Tensor, k: Tensor, v: Tensor, *, scale: float | None = None, degree: int = 2,
                   causal: bool = False, mask: Tensor | None = None, chunk: int = DEFAULT_CHUNK) -> Tensor:
    """Polynomial (Taylor) attention in O(L k d), laid out like torch's scaled_dot_product_attention.

    q: [B, Hq, Lq, d]; k: [B, Hkv, Lk, d]; v: [B, Hkv, Lk, e] with Hq a multiple of Hkv (grouped
    query heads share a key/value head). scale defaults to 1/sqrt(d). mask: bool (True = attend)
    or additive (0 / -inf), [B, Lk] or broadcastable to [B, Hq, Lq, Lk]; it must be key padding,
    optionally with the causal pattern. Accumulates in float32 (float64 for float64 inputs).
    Returns [B, Hq, Lq, e] in q's dtype.

    Under autocast (bf16 or fp16) the products still run in float32: the certified bound of
    ``lorakit.limits.bounds`` is the Taylor remainder eps = G^(g+1) e^G / (g+1)! in exact arithmetic,
    which float32 (unit roundoff 6e-8) leaves intact, while bf16 (unit roundoff 2^-8 = 3.9e-3) adds a
    rounding error per feature product larger than the default tolerance of 1e-3 itself, so a layer
    certified below 1e-3 would not be. Only the inputs and the output take the caller's dtype.
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    _check(q, k, v, degree, scale)
    if chunk <= 0:
        raise ValueError(f"chunk={chunk} must be positive")
    B, Hq, Lq, d = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    key_mask, causal = split_mask(mask, causal, B, Hq, Lq, Lk)
    if causal and Lq != Lk:
        raise ValueError(f"causal polynomial attention needs as many queries as keys, got {Lq} and {Lk}")
    cd = _compute_dtype(q)
    G = Hq // Hkv
    qg = q.to(cd).reshape(B, Hkv, G, Lq, d)
    out = PolyAttentionFunction.apply(qg, k.to(cd), v.to(cd), key_mask, scale, degree, causal, chunk)
    return out.reshape(B, Hq, Lq, v.shape[-1]).to(q.dtype)
