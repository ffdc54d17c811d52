"""How good is the approximate backward? Relative error of dX per layer on real gradients.

The features are selected on one batch's gradients and the error measured on the next
batch's, as the index cache does in training:

    err = || dX_approx - G W0 ||_F / || G W0 ||_F
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

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


def relative_dx_error(g_select: Tensor, g_eval: Tensor, w0: Tensor, keep_ratio: float, svd_rank: int, selection: str,
                      *, seed: int = 0) -> float:
    """||approx(G_eval) - G_eval W0|| / ||G_eval W0||, features chosen from G_select."""
    w0 = w0.float()
    b0, a0 = double_lora_factors(w0, svd_rank, seed=seed) if svd_rank > 0 else (None, None)
    rows = residual_row_norms(w0, b0, a0)
    k = kept_features(keep_ratio, w0.shape[0])
    scores = rows if selection == "weight" else g_select.float().norm(dim=0) * rows
    exact = g_eval.float() @ w0
    if selection == "sample":
        gen = torch.Generator().manual_seed(seed)
        idx, weights = sample_features(scores / scores.sum(), k, gen)
        approx = approx_input_grad(g_eval.float(), w0, idx, b0, a0, weights)
    else:
        idx = select_top(scores, k)
        approx = topk_input_grad(g_eval.float(), w0, idx, dropped_rows_only(b0, idx) if b0 is not None else None, a0)
    return float((approx - exact).norm() / exact.norm().clamp_min(1e-30))


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
