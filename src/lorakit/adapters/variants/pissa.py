"""PiSSA (Meng et al. 2024, "PiSSA: Principal Singular Values and Singular Vectors Adaptation of Large Language
Models"): the adapter starts as the top-r singular part of W0 and the frozen weight becomes the rest.

    W0 = U S V^T,   A = sqrt(S_r / s) V_r^T,   B = U_r sqrt(S_r / s),   W_res = W0 - s B A   (frozen)

so W_res + s B A = W0 at the start. The starting factors A0, B0 are kept (buffers on the layer, outside the
state_dict): a file is written for the original W0 = W_res + s B0 A0, since s B A on W_res equals
s' [B, B0] [A; -A0] on W0 with rank 2r and the same scale (s' = s: alpha doubles, or grows by sqrt 2 with
rsLoRA), PEFT's PiSSA conversion; and unloading without merging gives W0 back.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from lorakit.adapters.variants.base import Variant


class Pissa(Variant):
    """See the module docstring."""

    name = "pissa"
    rewrites_base = True
    one_per_model = "init='pissa' (it rewrites the base weights)"
    init_name = "pissa"
    peft_init = "pissa"

    def __init__(self, init: str = "pissa") -> None:  # (``init``: the registry's key, as Lora takes it)
        pass

    def reads_peft(self, value: Any) -> bool:
        """PEFT writes "pissa" or "pissa_niter_<n>" (the SVD's iterations; lorakit's SVD is exact)."""
        return isinstance(value, str) and value.startswith("pissa")

    def init(self, layer: nn.Module, name: str) -> None:
        s = layer.settings[name]
        a, b = layer.lora_A[name].weight, layer.lora_B[name].weight
        u, sv, vh = torch.linalg.svd(layer.base_weight().to(a.dtype), full_matrices=False)
        root = torch.sqrt(sv[: s.r] / s.scale)
        a.copy_(root[:, None] * vh[: s.r])
        b.copy_(u[:, : s.r] * root[None, :])
        self.keep(layer, name, "A0", a.detach().clone())
        self.keep(layer, name, "B0", b.detach().clone())
        layer.storage.add_(-layer.delta_weight(name))

    def restore_base(self, layer: nn.Module, name: str) -> None:
        """W0 = W_res + s B0 A0."""
        layer.storage.add_(layer.settings[name].scale * (self.kept(layer, name, "B0") @ self.kept(layer, name, "A0")))

    def remove(self, layer: nn.Module, name: str) -> None:
        self.take(layer, name, "A0"), self.take(layer, name, "B0")

    def convert_for_save(self, layer: nn.Module, name: str, a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
        """[A; -A0] and [B, B0]: the adapter for the original W0."""
        return torch.cat([a, -self.kept(layer, name, "A0")], dim=0), torch.cat([b, self.kept(layer, name, "B0")], dim=1)

    def saved_config(self, cfg: Any, convert: bool) -> Any:
        """With ``convert``: rank 2r, the same scale, and the weights are for W0 (init kaiming: nothing to rewrite)."""
        if not convert:
            return cfg
        factor = math.sqrt(2.0) if cfg.rslora else 2.0
        return cfg.replace(r=2 * cfg.r, alpha=cfg.alpha * factor, rank_pattern={k: 2 * v for k, v in cfg.rank_pattern.items()},
                           alpha_pattern={k: v * factor for k, v in cfg.alpha_pattern.items()}, init="kaiming")
