"""Per-layer state of CE-LoRA's approximate backward: Double-LoRA factors, the feature
index cache, and the refresh schedule (Chen et al. 2025, "CE-LoRA", sections 3-4).

A FeatureSelector is installed as ``LoraLinear.frozen_input_grad``; the fused kernel calls
it with G = dL/dy in place of computing G W0. The adapter's own gradients (dA, dB and its
share of dX) never pass through here and stay exact.

Refresh schedule, counted in optimizer steps t = 0, 1, 2, ... (not forward calls, so it
is right under gradient accumulation and activation checkpointing):
  - t % refresh_every == 0 is a refresh step: its backward passes are exact and accumulate
    sum ||G[:, i]||^2 over all micro-batches of the step;
  - ``end_step`` (called once per optimizer step) then selects the k features from the
    accumulated scores; steps until the next refresh use them.
So the backward is exact until the first refresh has happened.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lorakit.kernels.amm import (
    approx_input_grad,
    double_lora_factors,
    dropped_rows_only,
    kept_features,
    residual_row_norms,
    sample_features,
    select_top,
    topk_input_grad,
)

SELECTIONS = ("score", "weight", "sample")


@dataclass
class SelectorSpec:
    keep_ratio: float
    svd_rank: int  # r0; 0 = plain column-row selection, no Double-LoRA
    selection: str
    seed: int = 0


class FeatureSelector:
    """Approximates G W0 for one layer; see the module docstring for the schedule."""

    def __init__(self, layer, spec: SelectorSpec) -> None:
        self.layer = layer
        self.spec = spec
        w0 = layer.base_weight()
        out_f = w0.shape[0]
        self.k = kept_features(spec.keep_ratio, out_f)
        if spec.svd_rank > 0:
            b0, a0 = double_lora_factors(w0.detach(), spec.svd_rank, seed=spec.seed)
            layer.register_buffer("celora_B0", b0.to(w0.dtype), persistent=False)
            layer.register_buffer("celora_A0", a0.to(w0.dtype), persistent=False)
        row_norms = residual_row_norms(w0.detach(), self.b0, self.a0)
        layer.register_buffer("celora_row_norms", row_norms, persistent=False)
        self.idx: Tensor | None = None  # cached features (None: exact)
        self.b0_dropped: Tensor | None = None  # B0 with the kept rows zeroed
        self.probs: Tensor | None = None  # for selection="sample"
        self.col_sq: Tensor | None = None  # accumulated ||G[:, i]||^2 during a refresh step
        self.refreshing = True  # step 0 is a refresh step
        self.refreshes = 0
        self.generator = torch.Generator(device="cpu").manual_seed(spec.seed + 7919)

    @property
    def b0(self) -> Tensor | None:
        return getattr(self.layer, "celora_B0", None)

    @property
    def a0(self) -> Tensor | None:
        return getattr(self.layer, "celora_A0", None)

    @property
    def exact(self) -> bool:
        """True while no approximation is applied (before the first refresh, or k = out)."""
        return self.idx is None and self.probs is None

    def __call__(self, g: Tensor) -> Tensor:
        w0 = self.layer.base_weight()
        if self.refreshing:
            sq = (g.float() * g.float()).sum(0)
            self.col_sq = sq if self.col_sq is None else self.col_sq.add_(sq)
        if self.exact or self.refreshing:
            return torch.mm(g, w0.to(g.dtype))
        if self.spec.selection == "sample":
            idx, weights = sample_features(self.probs, self.k, self.generator)
            return approx_input_grad(g, w0, idx.to(g.device), self.b0, self.a0, weights.to(g.device))
        return topk_input_grad(g, w0, self.idx, self.b0_dropped, self.a0)

    def _set_indices(self, idx: Tensor | None) -> None:
        self.idx = idx
        self.b0_dropped = dropped_rows_only(self.b0, idx) if (idx is not None and self.b0 is not None) else None

    def scores(self) -> Tensor:
        """score_i = ||G[:, i]|| * ||R[i, :]|| ("score", "sample") or ||R[i, :]|| ("weight")."""
        row = self.layer.celora_row_norms
        if self.spec.selection == "weight" or self.col_sq is None:
            return row
        return self.col_sq.sqrt().to(row.device) * row

    def end_step(self, next_is_refresh: bool) -> bool:
        """Called after each optimizer step; returns True if it refreshed the cache."""
        refreshed = False
        if self.refreshing:
            out_f = self.layer.celora_row_norms.numel()
            if self.k >= out_f and self.spec.selection != "sample":
                self._set_indices(None)  # keeping every feature: the exact product is cheaper
            elif self.spec.selection == "sample":
                s = self.scores().float()
                self.probs = (s / s.sum()).cpu() if s.sum() > 0 else torch.full_like(s, 1.0 / s.numel()).cpu()
            else:
                self._set_indices(select_top(self.scores(), self.k))
            self.col_sq = None
            self.refreshes += 1
            refreshed = True
        self.refreshing = next_is_refresh
        return refreshed

    # checkpointing: the cache is part of the training state (resume must reproduce it)
    def state_dict(self) -> dict[str, Any]:
        return {"idx": self.idx, "probs": self.probs, "col_sq": self.col_sq, "refreshing": self.refreshing,
                "refreshes": self.refreshes, "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        device = self.layer.celora_row_norms.device
        self._set_indices(state["idx"].to(device) if state["idx"] is not None else None)
        self.probs = state["probs"]
        self.col_sq = state["col_sq"].to(device) if state["col_sq"] is not None else None
        self.refreshing = bool(state["refreshing"])
        self.refreshes = int(state["refreshes"])
        self.generator.set_state(state["generator"])
