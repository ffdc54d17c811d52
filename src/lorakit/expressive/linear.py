"""Exact LoRA constructions for deep linear models (Zeng & Lee, ICLR 2024, the linear case).

Frozen model f0(x) = W_L ... W_2 W_1 x (D x D matrices, layer 1 acts first), target
f(x) = Wbar x, error matrix E = Wbar - W_L ... W_1. With an update of rank <= R_l on layer l,

    min || prod_l (W_l + Delta_l) - Wbar ||_2 = sigma_{R+1}(E),   R = sum_l R_l

(singular values from 1, zero past D; Frobenius: sqrt(sum_{i > R} sigma_i^2)): the product
minus the frozen product has rank <= R, and the construction below reaches it. So the
representation is exact iff R >= rank(E), i.e. uniform rank ceil(rank(E) / L).

Construction (needs every W_l and every partial product non-singular):
    P_l = W_L ... W_{l+1} (P_L = I);  E = U S V^T;  V_l = the l-th block of R_l right singular vectors;
    Ahat_0 = I;  Delta_l = P_l^{-1} E V_l V_l^T Ahat_{l-1}^{-1};  Ahat_l = (W_l + Delta_l) Ahat_{l-1},
    i.e. B_l = P_l^{-1} E V_l (D x R_l), A_l = V_l^T Ahat_{l-1}^{-1} (R_l x D),
and then prod (W_l + B_l A_l) = prod W_l + (the rank-R truncation of E).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from lorakit.errors import ConfigError, LorakitError


class SingularMatrixError(LorakitError):
    """The construction's non-singularity assumption fails (names the matrix)."""


@dataclass
class LinearConstruction:
    """The adapters [(B_l, A_l)] and what they achieve: the spectral / Frobenius error reached and the optimum."""

    adapters: list[tuple[Tensor, Tensor]]
    spectral_error: float
    frobenius_error: float
    optimal_spectral_error: float
    pseudo_inverse_used: bool = False
    condition: float = 1.0  # the largest condition number the construction inverted (accuracy ~ eps * this)

    def adapted(self, frozen: list[Tensor]) -> list[Tensor]:
        return [w + b @ a for w, (b, a) in zip(frozen, self.adapters)]


def _check_square(frozen: list[Tensor], target: Tensor) -> int:
    if not isinstance(frozen, (list, tuple)) or not frozen:
        raise ConfigError("frozen must be a non-empty list of D x D matrices (layer 1 first)")
    d = target.shape[0] if target.dim() == 2 else -1
    if target.dim() != 2 or target.shape[0] != target.shape[1]:
        raise ConfigError(f"target must be a square D x D matrix, got shape {list(target.shape)}")
    for i, w in enumerate(frozen, 1):
        if w.dim() != 2 or tuple(w.shape) != (d, d):
            raise ConfigError(f"frozen[{i - 1}] (layer {i}) has shape {list(w.shape)}; every layer must be {d} x {d} like the target")
    return d


def per_layer_ranks(rank: int | list[int], layers: int, d: int) -> list[int]:
    """A uniform rank or one rank per layer, validated (each in 1..D)."""
    ranks = [rank] * layers if isinstance(rank, int) and not isinstance(rank, bool) else list(rank)
    if len(ranks) != layers:
        raise ConfigError(f"rank has {len(ranks)} entries for {layers} layers; give one per layer or a single int")
    for i, r in enumerate(ranks):
        if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= d:
            raise ConfigError(f"rank {r!r} for layer {i + 1} must be an integer in 1..{d}")
    return ranks


def product(mats: list[Tensor]) -> Tensor:
    """W_L ... W_1 for [W_1, ..., W_L] (layer 1 acts first)."""
    out = mats[0]
    for w in mats[1:]:
        out = w @ out
    return out


def error_matrix(frozen: list[Tensor], target: Tensor) -> Tensor:
    return target - product(list(frozen))


def linear_error(frozen: list[Tensor], target: Tensor, rank: int | list[int]) -> tuple[float, float]:
    """The optimum (sigma_{R+1}(E), sqrt(sum_{i > R} sigma_i^2)) with R = the total rank."""
    d = _check_square(frozen, target)
    total = sum(per_layer_ranks(rank, len(frozen), d))
    s = torch.linalg.svdvals(error_matrix(frozen, target))
    tail = s[total:]
    return (float(tail[0]) if tail.numel() else 0.0), float(tail.pow(2).sum().sqrt())


def min_rank(frozen: list[Tensor], target: Tensor, tol: float = 0.0) -> int:
    """Smallest uniform rank R with sigma_{R L + 1}(E) <= tol (relative to ||E||_2 when tol < 1e-12 means exact up to
    rounding). Exact representation: ceil(rank(E) / L)."""
    d = _check_square(frozen, target)
    if not tol >= 0:
        raise ConfigError(f"tol={tol!r} must be >= 0")
    s = torch.linalg.svdvals(error_matrix(frozen, target))
    floor = max(float(s[0]) if s.numel() else 0.0, 1.0) * d * torch.finfo(s.dtype).eps * 10
    needed = int((s > max(tol, floor)).sum())  # sigma_{R+1} <= tol  <=>  R >= #(sigma > tol)
    return max(1, math.ceil(needed / len(frozen)))


def _inverse(m: Tensor, what: str, pinv: bool) -> tuple[Tensor, bool, float]:
    """(inverse or pseudo-inverse, whether the pseudo-inverse was used, condition number)."""
    cond = float(torch.linalg.cond(m))
    if not math.isfinite(cond) or cond > 1 / (torch.finfo(m.dtype).eps * 1e3):
        if not pinv:
            raise SingularMatrixError(f"{what} is singular (condition number {cond:.3g}); the construction "
                                      "assumes it is invertible. Pass pinv=True to use a pseudo-inverse and get the "
                                      "error actually reached")
        return torch.linalg.pinv(m), True, cond
    return torch.linalg.inv(m), False, cond


def _build(frozen: list[Tensor], e: Tensor, basis: Tensor, ranks: list[int], pinv: bool):
    """Adapters from an orthonormal basis of the kept right singular subspace (blocks in layer order);
    returns (adapters, largest condition number inverted, pseudo-inverse used)."""
    d, n = e.shape[0], len(frozen)
    eye = torch.eye(d, dtype=e.dtype, device=e.device)
    adapters, used_pinv, worst = [], False, 1.0
    a_hat = eye
    start = 0
    for layer in range(n):
        r = ranks[layer]
        cols = list(range(start, min(start + r, basis.shape[1])))
        start += r
        b = torch.zeros(d, r, dtype=e.dtype, device=e.device)
        a = torch.zeros(r, d, dtype=e.dtype, device=e.device)
        if cols:  # a layer past the kept directions needs no update (zeros keep the requested shape)
            v_l = basis[:, cols]
            p_l = product(frozen[layer + 1:]) if layer + 1 < n else eye
            p_inv, u1, c1 = _inverse(p_l, f"the suffix product W_{n}...W_{layer + 2}", pinv)
            partial = "(W_1 + Delta_1)" if layer == 1 else f"(W_{layer} + Delta_{layer})...(W_1 + Delta_1)"
            a_inv, u2, c2 = _inverse(a_hat, f"the partial product {partial}", pinv)
            worst = max(worst, c1, c2)
            used_pinv |= u1 or u2
            b[:, : len(cols)] = p_inv @ e @ v_l
            a[: len(cols)] = v_l.T @ a_inv
        adapters.append((b, a))
        a_hat = (frozen[layer] + b @ a) @ a_hat
    return adapters, worst, used_pinv


def linear_adapters(frozen: list[Tensor], target: Tensor, rank: int | list[int], *, pinv: bool = False,
                    tries: int = 8, seed: int = 0) -> LinearConstruction:
    """The construction of the module docstring; ``rank`` is uniform or per layer.

    Any orthonormal basis of the kept singular subspace works (the blocks only have to add up to
    it); the partial products can be ill-conditioned for one basis and fine for another, so when the
    SVD's own basis inverts a matrix with condition number above 1e3, up to ``tries`` random
    rotations of it are tried and the best conditioned is kept.

    Raises SingularMatrixError naming the singular W_l or partial product unless ``pinv``; with
    ``pinv`` the pseudo-inverse is used and the returned errors are the ones actually reached.
    """
    d = _check_square(frozen, target)
    frozen = list(frozen)
    ranks = per_layer_ranks(rank, len(frozen), d)
    if not pinv:  # layers 2..L enter the suffix products that are inverted: name a singular one
        for i, w in enumerate(frozen[1:], 2):
            if torch.linalg.matrix_rank(w) < d:
                raise SingularMatrixError(f"frozen W_{i} (layer {i}) is singular; the construction inverts the products "
                                          "of later layers. Pass pinv=True to use a pseudo-inverse and get the error "
                                          "actually reached")
    e = error_matrix(frozen, target)
    _, s, vh = torch.linalg.svd(e)
    kept = min(sum(ranks), d)
    top = vh[:kept].T
    best = _build(frozen, e, top, ranks, pinv)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(tries if best[1] > 1e3 and kept > 1 else 0):
        q, _ = torch.linalg.qr(torch.randn(kept, kept, generator=gen, dtype=e.dtype))
        candidate = _build(frozen, e, top @ q.to(e.device), ranks, pinv)
        if candidate[1] < best[1]:
            best = candidate
    adapters, condition, used_pinv = best
    reached = product([w + b @ a for w, (b, a) in zip(frozen, adapters)]) - target
    optimum = s[sum(ranks):]
    return LinearConstruction(adapters, float(torch.linalg.matrix_norm(reached, ord=2)), float(reached.norm()),
                              float(optimum[0]) if optimum.numel() else 0.0, used_pinv, condition)
