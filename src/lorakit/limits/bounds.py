"""Certified error bounds of polynomial (Taylor) attention against softmax attention.

Notation: logits s_ij = beta q_i . k_j with |s_ij| <= G (certified by
G = beta max_i ||q_i|| max_j ||k_j||), p = p_g the degree-g Taylor polynomial of exp (g even),
w_ij = softmax weights, w'_ij = p(s_ij) / sum_k p(s_ik).

  eps   = G^(g+1) e^G / (g+1)!   relative error of p against exp on [-G, G] (Lagrange remainder)
  eps'  = G^g e^G / g!           the same for p' = p_{g-1}
  omega = 2 eps / (1 - eps)      |w' - w| <= omega w               (needs eps < 1)
  eta   = (eps + eps') / (1 - eps)   |p'/p - 1| <= eta

Output: |out' - out|_ij <= min(omega, 2) max|v| (always <= 2 max|v|: both are convex
combinations of the rows of V). Gradients: with upstream gradients M' (used by the
approximation) and M = M' - dM (|dM| <= e_M entrywise, e.g. a loss evaluated at the
approximate output), the logit gradients differ by at most w_ij c_i with

  c_i = (omega (1 + eta) + eta) A_i + e_M * e * 2 max|v| + (||M'_i||_1 + e * e_M) E,
  A_i = 2 max|v| ||M'_i||_1,   E = the output bound,   e = value dimension,

(eta = 0 for the paper's formula, which uses exp' = exp), hence

  |d q_i - d q'_i|  <= beta c_i sum_j w_ij |k_j|       (per coordinate)
  |d k_j - d k'_j|  <= beta sum_i w_ij c_i |q_i|
  |d v_j - d v'_j|  <= sum_i w_ij (omega ||M'_i||_inf + e_M)

The gradient bounds need the exact weights (O(L^2)): they are for tests and diagnostics.
Where eps >= 1 the gradient bounds are infinite (nothing is certified).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


def taylor_relative_error(gamma: float, degree: int) -> float:
    """eps: max over |s| <= gamma of |p_g(s) - e^s| / e^s <= gamma^(g+1) e^gamma / (g+1)!."""
    if gamma <= 0:
        return 0.0
    log_eps = (degree + 1) * math.log(gamma) + gamma - math.lgamma(degree + 2)
    return math.exp(log_eps) if log_eps < 700 else math.inf


def taylor_remainder(gamma: float, degree: int) -> float:
    """Absolute remainder bound |e^s - p_g(s)| <= gamma^(g+1) e^gamma / (g+1)! on [-gamma, gamma]."""
    return taylor_relative_error(gamma, degree)


def weight_error_factor(gamma: float, degree: int) -> float:
    """omega = 2 eps / (1 - eps): |w' - w| <= omega w; inf when eps >= 1."""
    eps = taylor_relative_error(gamma, degree)
    return 2 * eps / (1 - eps) if eps < 1 else math.inf


def output_error_bound(gamma: float, degree: int, v_max: float = 1.0) -> float:
    """Entrywise |poly attention - softmax attention| <= min(omega, 2) max|v|."""
    return min(weight_error_factor(gamma, degree), 2.0) * v_max


def smallest_degree(gamma: float, tolerance: float, max_degree: int = 8) -> int | None:
    """The smallest even degree whose output bound (relative to max|v|) meets ``tolerance``."""
    if not tolerance > 0:
        raise ValueError(f"tolerance={tolerance!r} must be > 0")
    for g in range(2, max_degree + 1, 2):
        if weight_error_factor(gamma, g) <= tolerance:
            return g
    return None


def logit_bound(q: Tensor, k: Tensor, scale: float, key_mask: Tensor | None = None) -> Tensor:
    """Certified G per batch and key/value head: beta max_i ||q_i|| max_j ||k_j||, in O(L d).

    q: [B, Hq, Lq, d], k: [B, Hkv, Lk, d]; query heads sharing a key head are pooled. With a key
    padding mask [B, Lk] (True = real token), padded keys are left out, and so are padded queries
    when Lq == Lk (self-attention: their outputs are discarded). Returns [B, Hkv].
    """
    b, hq, lq, _ = q.shape
    hkv = k.shape[1]
    qn, kn = q.float().norm(dim=-1), k.float().norm(dim=-1)
    if key_mask is not None:
        km = key_mask.bool()[:, None, :]
        kn = kn * km
        if lq == k.shape[2]:
            qn = qn * km
    return scale * qn.amax(dim=-1).view(b, hkv, hq // hkv).amax(dim=-1) * kn.amax(dim=-1)


@dataclass
class GradientBounds:
    out: Tensor
    dq: Tensor
    dk: Tensor
    dv: Tensor


def gradient_bounds(weights: Tensor, q: Tensor, k: Tensor, v: Tensor, m_approx: Tensor, *, scale: float, gamma: float,
                    degree: int, e_m: float = 0.0, paper_formula: bool = False) -> GradientBounds:
    """Entrywise bounds on |approximate - exact| for out, dq, dk, dv of one attention (see module docstring).

    weights: exact softmax weights [..., Lq, Lk] (zero where masked); q [..., Lq, d]; k, v [..., Lk, *]
    (already expanded to the query heads); m_approx: the upstream gradient the approximation used.
    """
    eps = taylor_relative_error(gamma, degree)
    eps_d = taylor_relative_error(gamma, degree - 1) if degree > 1 else math.inf
    v_max = float(v.abs().max())
    out_b = output_error_bound(gamma, degree, v_max)
    full = lambda t: torch.full_like(t, math.inf)  # noqa: E731
    if eps >= 1:
        return GradientBounds(torch.full_like(q[..., :1], out_b).expand(*q.shape[:-1], v.shape[-1]), full(q), full(k), full(v))
    omega = 2 * eps / (1 - eps)
    eta = 0.0 if paper_formula else (eps + eps_d) / (1 - eps)
    e = v.shape[-1]
    m1 = m_approx.abs().sum(-1)  # ||M'_i||_1
    a = 2 * v_max * m1
    c = (omega * (1 + eta) + eta) * a + e_m * e * 2 * v_max + (m1 + e * e_m) * out_b  # [..., Lq]
    w = weights
    dq = scale * c[..., None] * (w @ k.abs())
    dk = scale * (w.transpose(-1, -2) @ (c[..., None] * q.abs()))
    dv = w.transpose(-1, -2) @ (omega * m_approx.abs().amax(-1, keepdim=True) + e_m).expand(*m_approx.shape[:-1], e)
    return GradientBounds(torch.full_like(m_approx, out_b), dq, dk, dv)
