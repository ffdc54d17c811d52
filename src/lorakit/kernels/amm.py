"""Approximate matrix multiplication for the frozen-weight activation gradient (CE-LoRA).

The exact product is dX = G W0 with G = dL/dy [N, out] and W0 [out, in]. Keeping a set I of
k output features (columns of G, rows of W0) gives the column-row approximation
(Drineas, Kannan & Mahoney 2006) dX ~= G[:, I] W0[I, :]. Double-LoRA (Chen et al. 2025)
first takes a rank-r0 part W0 ~= B0 A0 out exactly and sparsifies only the residual
R = W0 - B0 A0:

    dX ~= (G B0) A0 + G[:, I] R[I, :]
        = G[:, I] W0[I, :] + (G[:, J] B0[J, :]) A0,     J = the features not kept

since G B0 = G[:, I] B0[I, :] + G[:, J] B0[J, :]: kept features use their full rows of W0,
dropped ones the rank-r0 approximation of theirs. This form stores no residual (R would
cost a copy of W0). G[:, J] B0[J, :] is computed as G B0^J, with B0^J = B0 whose kept rows
are zeroed (prepared once per refresh): the skinny product reads G in place, which on
CPU beats gathering G's dropped columns (measured 0.83-0.88 vs 0.87-1.00 of the exact
product's time on SmolLM2/MiniLM shapes). Cost: N (k in + out r0 + r0 in) multiply-adds
instead of N out in, plus one gather of the kept columns of G.

Feature scores: score_i = ||G[:, i]||_2 * ||R[i, :]||_2 (the optimal column-row sampling
probabilities are proportional to it); top-k by score is deterministic and biased; sampling
k features with replacement from p_i = score_i / sum(score), each rescaled by 1 / (k p_i),
is unbiased: E[sum_t G[:, i_t] R[i_t, :] / (k p_{i_t})] = G R.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def kept_features(keep_ratio: float, out_features: int) -> int:
    """k = ceil(p * out) output features, at least one."""
    return max(1, min(out_features, math.ceil(keep_ratio * out_features - 1e-9)))


def randomized_svd(w: Tensor, rank: int, *, oversample: int = 8, n_iter: int = 4, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """Truncated SVD w ~= U diag(S) Vh of rank ``rank`` (Halko, Martinsson & Tropp 2011).

    A seeded Gaussian sketch with ``n_iter`` power iterations; deterministic for a given seed,
    and it does not touch the global RNG. Falls back to the full SVD for small matrices. On
    SmolLM2's up_proj (1536 x 576, rank 8) it takes 3 ms against 107 ms for the full SVD, with
    a Frobenius residual 0.12% above the optimum.
    """
    out_f, in_f = w.shape
    w = w.to(torch.float64 if w.dtype == torch.float64 else torch.float32)
    if rank + oversample >= min(out_f, in_f):
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        return u[:, :rank], s[:rank], vh[:rank]
    g = torch.Generator(device="cpu").manual_seed(seed)
    omega = torch.randn(in_f, rank + oversample, generator=g, dtype=w.dtype).to(w.device)
    q, _ = torch.linalg.qr(w @ omega)
    for _ in range(n_iter):
        q, _ = torch.linalg.qr(w.t() @ q)
        q, _ = torch.linalg.qr(w @ q)
    u_small, s, vh = torch.linalg.svd(q.t() @ w, full_matrices=False)
    return (q @ u_small)[:, :rank], s[:rank], vh[:rank]


def double_lora_factors(w0: Tensor, r0: int, *, seed: int = 0) -> tuple[Tensor, Tensor]:
    """B0 = U_r0 sqrt(S), A0 = sqrt(S) Vh_r0, so that B0 A0 is the best rank-r0 part of W0."""
    u, s, vh = randomized_svd(w0, r0, seed=seed)
    root = s.sqrt()
    return (u * root).contiguous(), (root[:, None] * vh).contiguous()


def residual_row_norms(w0: Tensor, b0: Tensor | None, a0: Tensor | None, chunk: int = 1024) -> Tensor:
    """||R[i, :]||_2 for R = W0 - B0 A0 (R = W0 without Double-LoRA), in row chunks."""
    norms = []
    for start in range(0, w0.shape[0], chunk):
        rows = w0[start : start + chunk].float()
        if b0 is not None:
            rows = rows - b0[start : start + chunk].float() @ a0.float()
        norms.append(rows.norm(dim=1))
    return torch.cat(norms)


def select_top(scores: Tensor, k: int) -> Tensor:
    """The k highest-scoring features, sorted (contiguous gathers run faster)."""
    if k >= scores.numel():
        return torch.arange(scores.numel(), device=scores.device)
    return torch.topk(scores, k, sorted=False).indices.sort().values


def sample_features(probs: Tensor, k: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """k features drawn with replacement from ``probs``, sorted, with weights 1 / (k p_i)."""
    idx = torch.multinomial(probs, k, replacement=True, generator=generator).sort().values
    return idx, 1.0 / (k * probs[idx])


def topk_input_grad(g: Tensor, w0: Tensor, idx: Tensor, b0_dropped: Tensor | None = None,
                    a0: Tensor | None = None) -> Tensor:
    """dX ~= G[:, I] W0[I, :] + (G B0^J) A0 for kept features I (sorted).

    g: [N, out]; w0: [out, in]; idx: [k]; b0_dropped: B0 with the rows of I zeroed
    ([out, r0], prepared at refresh), or None for no Double-LoRA; a0: [r0, in].
    """
    dx = torch.mm(g.index_select(1, idx), w0.index_select(0, idx).to(g.dtype))
    if b0_dropped is not None and idx.numel() < g.shape[1]:
        dx.addmm_(torch.mm(g, b0_dropped.to(g.dtype)), a0.to(g.dtype))
    return dx


def dropped_rows_only(b0: Tensor, idx: Tensor) -> Tensor:
    """B0 with the rows of the kept features zeroed (B0^J above)."""
    out = b0.clone()
    out[idx] = 0
    return out


def approx_input_grad(g: Tensor, w0: Tensor, idx: Tensor, b0: Tensor | None = None, a0: Tensor | None = None,
                      weights: Tensor | None = None) -> Tensor:
    """dX ~= (G B0) A0 + G[:, I] diag(w) R[I, :] for any index multiset I (sampling with
    replacement repeats features) and per-feature weights w; computed as
    G[:, I] diag(w) W0[I, :] + (G B0 - G[:, I] diag(w) B0[I, :]) A0.

    g: [N, out]; w0: [out, in]; idx: [k]; b0: [out, r0]; a0: [r0, in]; weights: [k] or None.
    Returns a fresh [N, in] tensor in g's dtype.
    """
    g_sel = g.index_select(1, idx)
    if weights is not None:
        g_sel = g_sel * weights.to(g.dtype)
    dx = torch.mm(g_sel, w0.index_select(0, idx).to(g.dtype))
    if b0 is not None:
        b0 = b0.to(g.dtype)
        low = torch.mm(g, b0)
        low.sub_(torch.mm(g_sel, b0.index_select(0, idx)))
        dx.addmm_(low, a0.to(g.dtype))
    return dx
