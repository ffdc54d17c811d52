"""Exact LoRA constructions for ReLU feed-forward networks (Zeng & Lee, ICLR 2024, the FNN case).

FNN of depth L and width D: z_0 = x, z_l = ReLU(W_l z_{l-1} + b_l) for l < L, output
z_L = W_L z_{L-1} + b_L (the last layer is linear). A frozen FNN of depth L is adapted to a
target of depth Lbar <= L by partitioning its layers into Lbar consecutive groups P_1..P_Lbar
(uniform: M = floor(L / Lbar) layers per group, the last group takes the rest) and making
group i compute target layer i exactly:

1. the linear construction (``lorakit.expressive.linear``) on (the group's W_l, Wbar_i) gives
   adapters with prod_{l in P_i} (W_l + B_l A_l) = Wbar_i once the group's total rank reaches
   rank(Wbar_i - prod_{l in P_i} W_l), i.e. R >= ceil(D / M) for a uniform rank;
2. every layer of the group but the last gets the smallest bias that keeps all its pre-activations
   positive (plus a margin) for group inputs ||z||_2 <= rho, where rho bounds them over the input
   domain ||x||_2 <= input_bound: with the group so far y = M z + s, row k of the bias is
   ||(W'_l M)_k|| rho - (W'_l s)_k + margin, so its ReLU is the identity there;
3. the group's last layer takes the target bias minus the propagated extra biases, so the group
   computes ReLU(Wbar_i z + bbar_i) (or the linear output layer) exactly.

Below the threshold the error is bounded (``fnn_error_bound``): with E_i = sigma_{R_i + 1}(Wbar_i -
prod_{P_i} W_l) (R_i the group's total rank), since ReLU is 1-Lipschitz and ReLU(0) = 0,

    d_i <= E_i ||zhat_{i-1}|| + ||Wbar_i||_2 d_{i-1},   ||zhat_i|| <= (||Wbar_i||_2 + E_i) ||zhat_{i-1}|| + ||bbar_i||,

with d_0 = 0 and zhat_0 = x; both are affine in ||x||, so E||f_adapted(x) - f_target(x)|| <=
alpha E||x|| + gamma <= alpha sqrt(tr S) + gamma for inputs in the domain with second moment S.
"""

from __future__ import annotations

import math
import torch
from torch import Tensor, nn

from lorakit.errors import ConfigError
from lorakit.expressive.linear import linear_adapters, per_layer_ranks, product


class FNN(nn.Module):
    """z_l = ReLU(W_l z_{l-1} + b_l), last layer linear; x: [n, D] -> [n, D]."""

    def __init__(self, weights: list[Tensor], biases: list[Tensor]) -> None:
        super().__init__()
        if not weights or len(weights) != len(biases):
            raise ConfigError(f"an FNN needs as many biases as weights (got {len(weights)} and {len(biases)})")
        d = weights[0].shape[0]
        for i, (w, b) in enumerate(zip(weights, biases), 1):
            if tuple(w.shape) != (d, d) or tuple(b.shape) != (d,):
                raise ConfigError(f"layer {i}: W {list(w.shape)} and b {list(b.shape)}; every layer must be {d} x {d} with a bias of {d}")
        self.weights = nn.ParameterList([nn.Parameter(w.clone()) for w in weights])
        self.biases = nn.ParameterList([nn.Parameter(b.clone()) for b in biases])

    @property
    def width(self) -> int:
        return self.weights[0].shape[0]

    @property
    def depth(self) -> int:
        return len(self.weights)

    @classmethod
    def random(cls, width: int, depth: int, *, seed: int = 0, dtype: torch.dtype = torch.float32) -> "FNN":
        """W_l ~ N(0, 1/D), b_l ~ N(0, 1)."""
        if width <= 0 or depth <= 0:
            raise ConfigError(f"width={width} and depth={depth} must be positive")
        gen = torch.Generator().manual_seed(seed)
        ws = [torch.randn(width, width, generator=gen, dtype=dtype) / math.sqrt(width) for _ in range(depth)]
        bs = [torch.randn(width, generator=gen, dtype=dtype) for _ in range(depth)]
        return cls(ws, bs)

    def forward(self, x: Tensor) -> Tensor:
        z = x
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            z = z @ w.T + b
            if i < len(self.weights) - 1:
                z = torch.relu(z)
        return z


class AdaptedFNN(FNN):
    """The adapted network (frozen weights + adapters, tuned biases) and how it was built."""

    def __init__(self, weights, biases, adapters, groups, group_errors, input_bound, pseudo_inverse_used) -> None:
        super().__init__(weights, biases)
        self.adapters = adapters  # [(B_l, A_l)] per frozen layer
        self.groups = groups  # frozen layer indices per target layer
        self.group_errors = group_errors  # ||prod of adapted group weights - Wbar_i||_2
        self.input_bound = input_bound
        self.pseudo_inverse_used = pseudo_inverse_used


def partition_groups(frozen_depth: int, target_depth: int, partition: list[int] | list[list[int]] | None) -> list[list[int]]:
    """Consecutive groups of frozen layer indices, one per target layer."""
    if target_depth > frozen_depth:
        raise ConfigError(f"the target has depth {target_depth} > the frozen model's {frozen_depth}: LoRA keeps the depth; "
                          "a target can only be matched by a frozen model at least as deep")
    if partition is None:
        m = frozen_depth // target_depth
        sizes = [m] * (target_depth - 1) + [frozen_depth - m * (target_depth - 1)]
    elif all(isinstance(p, int) and not isinstance(p, bool) for p in partition):
        sizes = list(partition)  # type: ignore[arg-type]
    else:
        flat = [i for group in partition for i in group]  # type: ignore[union-attr]
        if flat != list(range(frozen_depth)) or any(not g for g in partition):  # type: ignore[union-attr]
            raise ConfigError(f"partition {partition} must split layers 0..{frozen_depth - 1} into consecutive non-empty groups")
        sizes = [len(g) for g in partition]  # type: ignore[arg-type]
    if len(sizes) != target_depth or any(s <= 0 for s in sizes) or sum(sizes) != frozen_depth:
        raise ConfigError(f"partition sizes {sizes} must be {target_depth} positive numbers adding up to {frozen_depth}")
    groups, start = [], 0
    for s in sizes:
        groups.append(list(range(start, start + s)))
        start += s
    return groups


def _check_pair(frozen: FNN, target: FNN) -> None:
    if frozen.width != target.width:
        raise ConfigError(f"frozen width {frozen.width} != target width {target.width}")


@torch.no_grad()
def fnn_adapters(frozen: FNN, target: FNN, rank: int | list[int], *, input_bound: float,
                 partition: list[int] | list[list[int]] | None = None, pinv: bool = False) -> AdaptedFNN:
    """The construction of the module docstring; exact on ||x||_2 <= input_bound when every group's total
    rank reaches the rank of its error matrix (and the non-singularity assumption holds)."""
    _check_pair(frozen, target)
    if not (isinstance(input_bound, (int, float)) and math.isfinite(input_bound) and input_bound > 0):
        raise ConfigError(f"input_bound={input_bound!r} must be a positive number: the largest ||x||_2 the adapted "
                          "network must match the target on")
    d, depth = frozen.width, frozen.depth
    groups = partition_groups(depth, target.depth, partition)
    ranks = per_layer_ranks(rank, depth, d)
    ws = [w.detach() for w in frozen.weights]
    new_w: list[Tensor] = [None] * depth  # type: ignore[list-item]
    new_b: list[Tensor] = [None] * depth  # type: ignore[list-item]
    adapters: list[tuple[Tensor, Tensor]] = [None] * depth  # type: ignore[list-item]
    errors, used = [], False
    rho = float(input_bound)
    for i, group in enumerate(groups):
        w_bar, b_bar = target.weights[i].detach(), target.biases[i].detach()
        c = linear_adapters([ws[l] for l in group], w_bar, [ranks[l] for l in group], pinv=pinv)
        used |= c.pseudo_inverse_used
        adapted = c.adapted([ws[l] for l in group])
        lin = torch.eye(d, dtype=w_bar.dtype)  # the group so far is y = lin z + shift on the domain
        shift = torch.zeros(d, dtype=w_bar.dtype)
        for j, l in enumerate(group):
            adapters[l], new_w[l] = c.adapters[j], adapted[j]
            if j < len(group) - 1:
                # smallest bias keeping every pre-activation >= margin for ||z|| <= rho: row k of (W' lin) z
                # is >= -||(W' lin)_k|| rho; small biases keep the final cancellation accurate
                lin = adapted[j] @ lin
                reach = lin.norm(dim=1) * rho
                new_b[l] = reach - adapted[j] @ shift + 1e-3 * (1.0 + reach)
                shift = adapted[j] @ shift + new_b[l]
            else:
                new_b[l] = b_bar - adapted[j] @ shift
        w_hat = product(adapted)
        errors.append(float(torch.linalg.matrix_norm(w_hat - w_bar, ord=2)))
        rho = float(torch.linalg.matrix_norm(w_hat, ord=2)) * rho + float(b_bar.norm())
    return AdaptedFNN(new_w, new_b, adapters, groups, errors, float(input_bound), used)


def fnn_error_bound(frozen: FNN, target: FNN, rank: int | list[int], input_cov: Tensor,
                    partition: list[int] | list[list[int]] | None = None) -> float:
    """Bound on E||adapted(x) - target(x)||_2 for the construction, over inputs in its domain with
    second moment E[x x^T] = input_cov (see the module docstring)."""
    _check_pair(frozen, target)
    d = frozen.width
    if tuple(input_cov.shape) != (d, d):
        raise ConfigError(f"input_cov must be {d} x {d}, got {list(input_cov.shape)}")
    groups = partition_groups(frozen.depth, target.depth, partition)
    ranks = per_layer_ranks(rank, frozen.depth, d)
    # (alpha, gamma): d_i <= alpha ||x|| + gamma;  (a, c): ||zhat_i|| <= a ||x|| + c
    alpha = gamma = 0.0
    a, c = 1.0, 0.0
    for i, group in enumerate(groups):
        w_bar = target.weights[i].detach()
        e = w_bar - product([frozen.weights[l].detach() for l in group])
        s = torch.linalg.svdvals(e)
        total = sum(ranks[l] for l in group)
        e_i = float(s[total]) if total < d else 0.0
        n_bar = float(torch.linalg.matrix_norm(w_bar, ord=2))
        alpha, gamma = e_i * a + n_bar * alpha, e_i * c + n_bar * gamma
        a, c = (n_bar + e_i) * a, (n_bar + e_i) * c + float(target.biases[i].detach().norm())
    return alpha * math.sqrt(max(float(torch.trace(input_cov)), 0.0)) + gamma
