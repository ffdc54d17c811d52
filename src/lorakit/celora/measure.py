"""How good is the approximate backward? Relative error of dX per layer on real gradients.

The features are selected on one batch's gradients and the error measured on the next
batch's, as the index cache does in training:

    err = || dX_approx - G W0 ||_F / || G W0 ||_F
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lorakit.celora.selector import FeatureSelector, SelectorSpec


def capture_output_grads(model: nn.Module, batch: dict[str, Tensor], layers: list[str]) -> dict[str, Tensor]:
    """G = dL/dy of each named LoraLinear for one forward/backward of ``batch`` (the model's own loss)."""
    grads: dict[str, Tensor] = {}
    saved = {}
    for name in layers:
        layer = model.get_submodule(name)
        saved[name] = layer.frozen_input_grad

        def record(g, layer=layer, name=name):
            grads[name] = g.detach().clone()
            return torch.mm(g, layer.base_weight().to(g.dtype))

        layer.frozen_input_grad = record
    try:
        model.zero_grad(set_to_none=True)
        with torch.enable_grad():
            model(**batch).loss.backward()
        model.zero_grad(set_to_none=True)
    finally:
        for name in layers:
            model.get_submodule(name).frozen_input_grad = saved[name]
    return grads


@dataclass
class LayerError:
    name: str
    keep_ratio: float
    svd_rank: int
    selection: str
    relative_error: float


class _FrozenWeight(nn.Module):
    """A stand-in layer that holds only W0, for a FeatureSelector outside a model."""

    def __init__(self, w0: Tensor) -> None:
        super().__init__()
        self.w0 = w0

    def base_weight(self) -> Tensor:
        return self.w0


def relative_dx_error(g_select: Tensor, g_eval: Tensor, w0: Tensor, keep_ratio: float, svd_rank: int, selection: str,
                      *, seed: int = 0) -> float:
    """||approx(G_eval) - G_eval W0|| / ||G_eval W0||, the features chosen from G_select by the training-time
    selector: G_select passes through a refresh step, G_eval through the step after it."""
    w0 = w0.float()
    selector = FeatureSelector(_FrozenWeight(w0), SelectorSpec(keep_ratio, svd_rank, selection, seed))
    selector(g_select.float())  # a refresh step: exact, and it scores the features
    selector.end_step(next_is_refresh=False)
    g = g_eval.float()
    exact = g @ w0
    return float((selector(g) - exact).norm() / exact.norm().clamp_min(1e-30))


def layer_errors(model: nn.Module, batches: tuple[dict[str, Tensor], dict[str, Tensor]], plan: dict[str, float],
                 *, svd_ranks: tuple[int, ...] = (0, 8), selections: tuple[str, ...] = ("score", "weight")) -> list[LayerError]:
    """Errors for every (layer, r0, selection); ``plan`` maps layer names to keep ratios.

    Layers that compute no dX at all (their input is a frozen embedding) are left out.
    """
    first = capture_output_grads(model, batches[0], list(plan))
    second = capture_output_grads(model, batches[1], list(plan))
    out = []
    for name, keep in plan.items():
        if name not in first:
            continue
        w0 = model.get_submodule(name).base_weight().detach()
        for r0 in svd_ranks:
            for sel in selections:
                err = relative_dx_error(first[name], second[name], w0, keep, r0, sel)
                out.append(LayerError(name, keep, r0, sel, err))
    return out
