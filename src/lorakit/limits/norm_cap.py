"""Norm control: keep the spectral norm of every adapter update (alpha/r) B A at or below a cap.

Hu et al. (ICLR 2025) show the LoRA attention gradient is almost-linear-time computable only
while ||X W_Q||_max and ||X W_K||_max (adapters included) stay below ~sqrt(log L); a large
adapter update can push a layer past it. ``cap_adapter`` projects one adapter onto the
spectral-norm ball {||s B A||_2 <= c} in the Frobenius sense, i.e. clips the singular values of
s B A at c, in O((m + n) r^2) without forming the m x n matrix:

    B = Q_b R_b,  A^T = Q_a R_a (thin QR),  s R_b R_a^T = U diag(sigma) V^T   (r x r SVD),
    s B A = Q_b U diag(sigma) V^T Q_a^T,   so the projection is
    B <- B - Q_b U diag(1 - min(1, c / sigma)) U^T R_b          (A unchanged).

Only B changes (A keeps its optimizer state meaning); afterwards ||s B A||_2 = min(c, old norm).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lorakit.adapters.attach import lora_layers, state
from lorakit.adapters.layer import LoraLinear


def _core(layer: LoraLinear) -> tuple[Tensor, Tensor, Tensor]:
    """(Q_b, R_b, R_a) with B = Q_b R_b and A^T = Q_a R_a (thin QR): s B A = Q_b (s R_b R_a^T) Q_a^T."""
    qb, rb = torch.linalg.qr(layer.B.detach().float())
    ra = torch.linalg.qr(layer.A.detach().float().T, mode="r").R
    return qb, rb, ra


def adapter_spectral_norm(layer: LoraLinear) -> float:
    """||s B A||_2 from the r x r core (no m x n product)."""
    _, rb, ra = _core(layer)
    return float(layer.scale * torch.linalg.matrix_norm(rb @ ra.T, ord=2))


@torch.no_grad()
def cap_adapter(layer: LoraLinear, cap: float) -> float:
    """Clip the singular values of s B A at ``cap`` by changing B; returns the norm before."""
    if not cap > 0:
        raise ValueError(f"cap={cap!r} must be > 0")
    if layer.merged:
        raise RuntimeError(f"{layer.name}: the adapter is merged into the base weight; unmerge before capping it")
    qb, rb, ra = _core(layer)
    u, sigma, _ = torch.linalg.svd(layer.scale * rb @ ra.T)
    before = float(sigma[0]) if sigma.numel() else 0.0
    if before <= cap:
        return before
    shrink = 1 - torch.clamp(cap / sigma.clamp_min(torch.finfo(sigma.dtype).tiny), max=1.0)
    w_b = layer.B
    w_b.sub_((qb @ (u * shrink) @ (u.T @ rb)).to(w_b.dtype))
    return before


def cap_norms(model: nn.Module, cap: float | None = None) -> dict[str, float]:
    """Apply the cap (default: the active adapter's ``norm_cap``) to the active adapter in every layer; returns the
    spectral norms before capping, per module. A no-op without a cap."""
    st = state(model)
    if cap is None:
        cap = st.config.norm_control.cap
    if cap is None:
        return {}
    return {name: cap_adapter(layer, cap) for name, layer in lora_layers(model, st.active_name)}


class NormCap:
    """Trainer hook: cap after every optimizer step; logs the largest pre-cap norm and how many were capped."""

    def __init__(self, cap: float) -> None:
        self.cap = cap

    def after_step(self, step: int, model: nn.Module) -> dict[str, float]:
        before = cap_norms(model, self.cap)
        capped = sum(v > self.cap for v in before.values())
        return {"norm_cap_max_before": max(before.values(), default=0.0), "norm_cap_capped": capped}


def install_norm_cap(optimizer: torch.optim.Optimizer, model: nn.Module, cap: float | None = None):
    """For your own training loop: cap after every ``optimizer.step()``. Returns the hook handle."""
    return optimizer.register_step_post_hook(lambda opt, args, kwargs: cap_norms(model, cap))
