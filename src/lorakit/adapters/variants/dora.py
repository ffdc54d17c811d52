"""DoRA (Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation"), PEFT's ``use_dora``:

    W' = m * (W0 + s B A) / ||W0 + s B A||_row,   y = b + g * (x W0^T + s B A drop(x)),   g = m / ||W0 + s B A||_row

with the trained magnitude m (one value per output feature, initialised to the row norms, PEFT's
``lora_magnitude_vector``) and the norm detached from the graph (the paper's section 4.3, as PEFT does): the
fused kernel computes z = x W0^T + s B A drop(x) and its backward gets G * g, so dA, dB and dX come from the same
fused pass, and dm = sum_n G * z / ||.||_row. The one extra pass over W0 per step is the norm. With dropout > 0
in training PEFT also applies the scale to drop(x) W0^T (it adds (g - 1) drop(x) W0^T to x W0^T); lorakit drops
out the adapter's input only. A DoRA adapter is active alone (no second active adapter, no mixed batch: PEFT
refuses the latter too), and its magnitudes do not combine linearly (no add_weighted_adapter).

Merging sets W0 <- g * (W0 + s B A) row by row; unmerging W0 <- W' / g - s B A with the g of the merge (kept on
the layer until then), so a merge/unmerge round trip is exact up to rounding.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from lorakit.adapters.variants.base import Wrapper
from lorakit.errors import ConfigError

MAGNITUDE = "lora_magnitude_vector"  # PEFT's name, in memory and in files


class Dora(Wrapper):
    """See the module docstring. ``inner`` sets up A and B (kaiming or gaussian)."""

    name = "dora"
    flag = ", dora"
    active_alone = "a DoRA adapter"
    file_kind = "a DoRA adapter"
    combine_refusal = "DoRA adapters, whose magnitudes do not combine linearly"

    @classmethod
    def selected(cls, cfg: Any) -> bool:
        return bool(cfg.use_dora)

    def validate(self, cfg: Any) -> None:
        self.inner.validate(cfg)
        if self.inner.rewrites_base:
            raise ConfigError(f"use_dora=True with init={cfg.init!r} is not supported; use init='kaiming' or 'gaussian'")
        if cfg.norm_control.cap is not None:
            raise ConfigError("norm_cap with use_dora=True: the cap bounds s B A, but DoRA also rescales every row of "
                              "W0 + s B A by its trained magnitude, so the cap would certify nothing; drop one of them")

    @torch.no_grad()
    def weight_norm(self, layer: nn.Module, name: str) -> Tensor:
        """||W0 + s B A||_row, one value per output feature, in the adapter's dtype (never differentiated)."""
        a = layer.lora_A[name].weight
        return torch.linalg.vector_norm(layer.base_weight().to(a.dtype) + layer.delta_weight(name), dim=1)

    def init(self, layer: nn.Module, name: str) -> None:
        self.inner.init(layer, name)
        layer.lora_magnitude_vector[name] = nn.Parameter(self.weight_norm(layer, name))

    def scale_output(self, layer: nn.Module, name: str) -> Tensor:
        """g = m / ||W0 + s B A||_row (differentiable in m only)."""
        return layer.lora_magnitude_vector[name] / self.weight_norm(layer, name)

    def merge(self, layer: nn.Module, name: str) -> None:
        g = self.scale_output(layer, name)
        layer.storage.set_(g[:, None] * (layer.base_weight().to(g.dtype) + layer.delta_weight(name)))
        self.keep(layer, name, "merged_scale", g)

    def unmerge(self, layer: nn.Module, name: str) -> None:
        g = self.take(layer, name, "merged_scale")
        layer.storage.set_(layer.base_weight().to(g.dtype) / g[:, None] - layer.delta_weight(name))

    def extra_parameters(self, layer: nn.Module, name: str) -> dict[str, nn.Parameter]:
        return {**self.inner.extra_parameters(layer, name), MAGNITUDE: layer.lora_magnitude_vector[name]}

    def extra_shapes(self, in_features: int, out_features: int) -> dict[str, tuple[int, ...]]:
        return {**self.inner.extra_shapes(in_features, out_features), MAGNITUDE: (out_features,)}

    def remove(self, layer: nn.Module, name: str) -> None:
        self.inner.remove(layer, name)
        del layer.lora_magnitude_vector[name]
