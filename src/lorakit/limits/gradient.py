"""The explicit LoRA gradient of one attention head (Hu et al., ICLR 2025), exact and approximate.

Paper conventions (row-major, one head): X in R^{L x d}; W_mu = W*_mu + s B_mu A_mu for
mu in {q, k, v} with B_mu in R^{d x r}, A_mu in R^{r x d_h}, s = alpha / r (adapters on q, v:
"partial" adaptation C1; on q, k, v: "full" adaptation C2);

    Q = X W_q,  K = X W_k,  V = X W_v,  S = beta Q K^T,  f = D^{-1} exp(S),  Z = f V,
    loss = 1/2 ||Z - Y||_F^2,   M = dloss/dZ = Z - Y.

Exact gradient, O(L^2 d) (``exact_gradient``):

    dV = f^T M;  P = dloss/dS = f (.) (M V^T) - diag(r) f,  r_i = <Z_i, M_i>;
    dQ = beta P K;  dK = beta P^T Q;  dW_mu = X^T d(mu);
    dA_mu = s B_mu^T dW_mu;  dB_mu = s dW_mu A_mu^T.

Approximate gradient, O(L k d^2) (``approximate_gradient``), the digest's steps 1-6 with the
Taylor feature map phi of even degree g (phi(x).phi(y) = p_g(x.y)), beta folded as sqrt(beta):

    1. U1 = phi(sqrt(beta) Q) / den, V1 = phi(sqrt(beta) K), den = phi(sqrt(beta) Q) (V1^T 1):
       f ~= U1 V1^T (never formed).
    2. M' = U1 (V1^T V) - Y.
    3. p1 = f (.) (M' V^T) = (U1 (x)row M') (V1 (x)row V)^T   (row-wise Kronecker, rank k d_h).
    4. r_i = <U1_i (V1^T V), M'_i>;  p2 = diag(r) U1 V1^T.
    5. P = p1 - p2;  dQ = beta P K and dK = beta P^T Q, multiplied right to left;
       dV = V1 (U1^T M').
    6. dA_mu = s B_mu^T X^T d(mu),  dB_mu = s X^T d(mu) A_mu^T.

Its error is bounded entrywise by ``lorakit.limits.bounds.gradient_bounds`` (paper formula:
exp' = exp, upstream error e_M = the output bound), pushed through X^T and the factors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from lorakit.kernels.poly_attention import feature_map
from lorakit.limits.bounds import gradient_bounds, output_error_bound

PROJECTIONS = ("q", "k", "v")
ADAPTATIONS = {"partial": ("q", "v"), "full": ("q", "k", "v")}


@dataclass
class LoraHead:
    """One attention head with LoRA adapters, in the paper's row-major convention.

    x [L, d]; weights[mu] = W*_mu [d, d_h]; adapters[mu] = (B [d, r], A [r, d_h]);
    lora_scale = alpha / r; scale = beta (the softmax scale).
    """

    x: Tensor
    weights: dict[str, Tensor]
    adapters: dict[str, tuple[Tensor, Tensor]]
    lora_scale: float
    scale: float

    def __post_init__(self) -> None:
        missing = [mu for mu in PROJECTIONS if mu not in self.weights]
        if missing:
            raise ValueError(f"weights needs entries for {missing}; give W*_q, W*_k, W*_v as [d, d_h] tensors")
        unknown = sorted(set(self.adapters) - set(PROJECTIONS))
        if unknown:
            raise ValueError(f"adapters on {unknown}: only 'q', 'k', 'v' can carry an adapter here")
        d = self.x.shape[-1]
        for mu, (b, a) in self.adapters.items():
            w = self.weights[mu]
            if b.shape[0] != d or a.shape[1] != w.shape[1] or b.shape[1] != a.shape[0]:
                raise ValueError(f"adapter {mu}: B {list(b.shape)} and A {list(a.shape)} do not fit "
                                 f"W*_{mu} {list(w.shape)} (need B [d, r], A [r, d_h])")

    @classmethod
    def random(cls, length: int, dim: int, head_dim: int, rank: int, adaptation: str = "partial", *,
               alpha: float | None = None, gamma: float | None = None, seed: int = 0,
               dtype: torch.dtype = torch.float64) -> "LoraHead":
        """A random head; with ``gamma`` the query/key sides are rescaled so that the certified
        logit bound beta max||q|| max||k|| equals gamma."""
        if adaptation not in ADAPTATIONS:
            raise ValueError(f"adaptation={adaptation!r}: use 'partial' (q, v) or 'full' (q, k, v)")
        gen = torch.Generator().manual_seed(seed)
        rnd = lambda *s: torch.randn(*s, generator=gen, dtype=dtype)  # noqa: E731
        x = rnd(length, dim)
        weights = {mu: rnd(dim, head_dim) / math.sqrt(dim) for mu in PROJECTIONS}
        adapters = {mu: (rnd(dim, rank) / math.sqrt(dim), rnd(rank, head_dim) / math.sqrt(rank))
                    for mu in ADAPTATIONS[adaptation]}
        head = cls(x, weights, adapters, (alpha if alpha is not None else 2.0 * rank) / rank, 1 / math.sqrt(head_dim))
        if gamma is not None:
            g0 = head.logit_bound()
            c = math.sqrt(gamma / g0)
            for mu in ("q", "k"):
                head.weights[mu] = head.weights[mu] * c
                if mu in head.adapters:
                    b, a = head.adapters[mu]
                    head.adapters[mu] = (b, a * c)
        return head

    def projection(self, mu: str) -> Tensor:
        """X (W*_mu + s B_mu A_mu)."""
        out = self.x @ self.weights[mu]
        if mu in self.adapters:
            b, a = self.adapters[mu]
            out = out + self.lora_scale * (self.x @ b) @ a
        return out

    def logit_bound(self) -> float:
        """Certified G = beta max_i ||q_i|| max_j ||k_j||."""
        q, k = self.projection("q"), self.projection("k")
        return float(self.scale * q.norm(dim=-1).max() * k.norm(dim=-1).max())

    def output(self) -> Tensor:
        q, k, v = (self.projection(mu) for mu in PROJECTIONS)
        return torch.softmax(self.scale * q @ k.T, dim=-1) @ v

    def loss(self, y: Tensor) -> Tensor:
        return 0.5 * (self.output() - y).pow(2).sum()


@dataclass
class HeadGradient:
    """dloss/dA_mu and dloss/dB_mu per adapted projection, the loss, and (approximate) entrywise bounds."""

    grads: dict[str, Tensor]
    loss: float
    bounds: dict[str, Tensor] = field(default_factory=dict)
    gamma: float | None = None


def _lora_grads(head: LoraHead, d_proj: dict[str, Tensor]) -> dict[str, Tensor]:
    grads = {}
    for mu, (b, a) in head.adapters.items():
        d_w = head.x.T @ d_proj[mu]  # dloss/dW_mu
        grads[f"A_{mu}"] = head.lora_scale * b.T @ d_w
        grads[f"B_{mu}"] = head.lora_scale * d_w @ a.T
    return grads


def exact_gradient(head: LoraHead, y: Tensor) -> HeadGradient:
    """The paper's explicit gradient, O(L^2 d): forms f and P (see the module docstring)."""
    q, k, v = (head.projection(mu) for mu in PROJECTIONS)
    f = torch.softmax(head.scale * q @ k.T, dim=-1)
    z = f @ v
    m = z - y
    r = (z * m).sum(-1, keepdim=True)
    p = f * (m @ v.T) - r * f
    d_proj = {"q": head.scale * p @ k, "k": head.scale * p.T @ q, "v": f.T @ m}
    return HeadGradient(_lora_grads(head, d_proj), float(0.5 * m.pow(2).sum()))


def _row_kron(a: Tensor, b: Tensor) -> Tensor:
    """Row-wise Kronecker product: [L, p] x [L, q] -> [L, p q]."""
    return (a[:, :, None] * b[:, None, :]).reshape(a.shape[0], -1)


def approximate_gradient(head: LoraHead, y: Tensor, degree: int = 2, *, with_bounds: bool = True) -> HeadGradient:
    """Steps 1-6 of the almost-linear algorithm, O(L k d^2) with k = C(d_h + g, g) features.

    No L x L matrix is formed by the algorithm itself; ``with_bounds`` additionally computes the
    certified entrywise error bounds, which need the exact weights (O(L^2), for tests).
    """
    if isinstance(degree, bool) or not isinstance(degree, int) or degree <= 0 or degree % 2:
        raise ValueError(f"degree={degree!r} must be a positive even integer")
    q, k, v = (head.projection(mu) for mu in PROJECTIONS)
    root = math.sqrt(head.scale)
    phi_q, v1 = feature_map(root * q, degree), feature_map(root * k, degree)
    den = phi_q @ v1.sum(0)  # phi(Q) (phi(K)^T 1)
    u1 = phi_q / den[:, None]  # step 1: f ~= U1 V1^T
    z = u1 @ (v1.T @ v)
    m = z - y  # step 2
    left, right = _row_kron(u1, m), _row_kron(v1, v)  # step 3: p1 = left right^T
    r = (z * m).sum(-1, keepdim=True)  # step 4: p2 = diag(r) U1 V1^T
    d_proj = {  # step 5, right to left
        "q": head.scale * (left @ (right.T @ k) - (r * u1) @ (v1.T @ k)),
        "k": head.scale * (right @ (left.T @ q) - v1 @ ((r * u1).T @ q)),
        "v": v1 @ (u1.T @ m),
    }
    out = HeadGradient(_lora_grads(head, d_proj), float(0.5 * m.pow(2).sum()))  # step 6
    if with_bounds:
        gamma = head.logit_bound()
        out.gamma = gamma
        w = torch.softmax(head.scale * q @ k.T, dim=-1)
        e_m = output_error_bound(gamma, degree, float(v.abs().max()))
        gb = gradient_bounds(w, q, k, v, m, scale=head.scale, gamma=gamma, degree=degree, e_m=e_m, paper_formula=True)
        per_proj = {"q": gb.dq, "k": gb.dk, "v": gb.dv}
        ax = head.x.abs().T
        for mu, (b, a) in head.adapters.items():
            dw = ax @ per_proj[mu]
            out.bounds[f"A_{mu}"] = head.lora_scale * b.abs().T @ dw
            out.bounds[f"B_{mu}"] = head.lora_scale * dw @ a.abs().T
    return out


def autograd_gradient(head: LoraHead, y: Tensor) -> HeadGradient:
    """The same gradients by reverse-mode autodiff through softmax attention (the check)."""
    leaves = {}
    adapters = {}
    for mu, (b, a) in head.adapters.items():
        b, a = b.detach().requires_grad_(True), a.detach().requires_grad_(True)
        leaves[f"B_{mu}"], leaves[f"A_{mu}"] = b, a
        adapters[mu] = (b, a)
    loss = LoraHead(head.x, head.weights, adapters, head.lora_scale, head.scale).loss(y)
    names = list(leaves)
    grads = torch.autograd.grad(loss, [leaves[n] for n in names])
    return HeadGradient(dict(zip(names, grads)), float(loss.detach()))
