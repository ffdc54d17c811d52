"""LoraLinear: a frozen weight plus trainable low-rank updates, one per named adapter.

    y = W0 x + b + sum_{a active} s_a * B_a A_a dropout(x),   A_a: r_a x in, B_a: out x r_a,
    s_a = alpha_a / r_a (or alpha_a / sqrt(r_a) with rsLoRA)

A composition: ``storage`` keeps W0 and computes its products (``adapters.storage``); each adapter's ``variant``
(``adapters.variants``: formulas, papers) initialises it, may scale the output per feature, merges it and says
what it saves. PEFT's in-memory layout and state_dict keys (``base_layer``, ``lora_A.default``, ``lora_B.default``,
``lora_magnitude_vector.default``). One active adapter runs the fused kernel; more add plain autograd terms, and
a mixed batch (``adapter_names``: a name per row, ``"__base__"`` for none) adds each row's adapter to it alone.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from lorakit.adapters.storage import storage_for
from lorakit.adapters.variants.base import AdapterSettings, Variant
from lorakit.adapters.variants.lora import Lora
from lorakit.errors import ConfigError, LorakitError
from lorakit.kernels.lora_linear import FrozenInputGrad
from lorakit.module_kinds import is_adaptable, linear_shape

BASE = "__base__"  # the row name that selects the base model in a mixed batch (PEFT's)


class LoraLinear(nn.Module):
    """A LoRA-adapted nn.Linear or Conv1D (see the module docstring). ``r``, ``scale``, ``alpha``, ``rslora``,
    ``dropout_p``, ``variant``, ``A``, ``B`` and ``magnitude`` describe the one active adapter (``active``)."""

    def __init__(self, base_layer: nn.Module, r: int, alpha: float, *, dropout: float = 0.0, rslora: bool = False,
                 name: str = "", adapter: str = "default", variant: Variant | None = None) -> None:
        super().__init__()
        if not is_adaptable(base_layer):
            raise ConfigError(f"{name or 'module'} is a {type(base_layer).__name__}; lorakit adapts nn.Linear and Conv1D layers")
        self.base_layer, self.storage, self.name = base_layer, storage_for(base_layer), name
        self.fan_in_fan_out = self.storage.transposed
        self.in_features, self.out_features = linear_shape(base_layer)
        self.lora_A, self.lora_B, self.lora_magnitude_vector = nn.ModuleDict(), nn.ModuleDict(), nn.ParameterDict()
        self.settings: dict[str, AdapterSettings] = {}
        self.active_adapters, self.merged_adapters = [adapter], []  # (lists of adapter names)
        self.enabled, self.row_adapters = True, None  # row_adapters: a mixed batch's adapter per row, for one call
        self.frozen_input_grad: FrozenInputGrad | None = None  # an approximation of G W0 for the fused backward
        self.add_adapter(adapter, r, alpha, dropout=dropout, rslora=rslora, variant=variant)

    def add_adapter(self, adapter: str, r: int, alpha: float, *, dropout: float = 0.0, rslora: bool = False,
                    variant: Variant | None = None) -> None:
        """Add adapter ``adapter`` (inactive unless it is the layer's first; see set_active); plain LoRA by default."""
        in_f, out_f = self.in_features, self.out_features
        if not 0 < r <= min(in_f, out_f):
            raise ConfigError(f"rank r={r} for {self.name or 'module'} must be in 1..min(in, out) = 1..{min(in_f, out_f)} "
                              f"(the layer is {in_f} -> {out_f}); lower r or use rank_pattern for this module")
        if adapter in self.settings:
            raise LorakitError(f"{self.name}: an adapter named {adapter!r} exists already; choose another name")
        kw = dict(device=self.storage.device, dtype=self.storage.adapter_dtype)
        self.settings[adapter] = AdapterSettings(int(r), float(alpha), bool(rslora), float(dropout), variant or Lora())
        self.lora_A[adapter] = nn.Linear(in_f, r, bias=False, **kw)
        self.lora_B[adapter] = nn.Linear(r, out_f, bias=False, **kw)
        with torch.no_grad():
            self.settings[adapter].variant.init(self, adapter)

    def delete_adapter(self, adapter: str) -> None:
        """Remove adapter ``adapter`` from this layer (unmerged first if it was merged)."""
        if adapter in self.merged_adapters:
            self.unmerge()
        self.settings.pop(adapter).variant.remove(self, adapter)
        del self.lora_A[adapter], self.lora_B[adapter]
        self.active_adapters = [a for a in self.active_adapters if a != adapter]

    def adapter_parameters(self, adapter: str) -> list[nn.Parameter]:
        """A, B and what the adapter's variant trains besides."""
        extra = self.settings[adapter].variant.extra_parameters(self, adapter)
        return [self.lora_A[adapter].weight, self.lora_B[adapter].weight, *extra.values()]

    def set_active(self, adapters: Sequence[str]) -> None:
        """Make ``adapters`` (those this layer holds) the active ones; only they train (requires_grad)."""
        for a in self.settings:
            for p in self.adapter_parameters(a):
                p.requires_grad_(a in adapters)
        self.active_adapters = [a for a in adapters if a in self.settings]

    @property
    def active(self) -> str:
        """The one active adapter's name."""
        if len(self.active_adapters) != 1:
            raise LorakitError(f"{self.name}: {len(self.active_adapters)} adapters are active here "
                               f"({self.active_adapters}); name one (this needs exactly one)")
        return self.active_adapters[0]

    r = property(lambda self: self.settings[self.active].r)
    alpha = property(lambda self: self.settings[self.active].alpha)
    rslora = property(lambda self: self.settings[self.active].rslora)
    scale = property(lambda self: self.settings[self.active].scale)
    variant = property(lambda self: self.settings[self.active].variant)
    dropout_p = property(lambda self: self.settings[self.active].dropout_p,
                         lambda self, p: setattr(self.settings[self.active], "dropout_p", float(p)))
    A = property(lambda self: self.lora_A[self.active].weight, doc="The active adapter's A, [r, in].")
    B = property(lambda self: self.lora_B[self.active].weight, doc="The active adapter's B, [out, r].")
    magnitude = property(lambda self: self.lora_magnitude_vector[self.active] if self.active in self.lora_magnitude_vector
                         else None, doc="The active adapter's per-feature magnitude m, [out], or None.")
    merged = property(lambda self: bool(self.merged_adapters))
    weight = property(lambda self: self.base_layer.weight, doc="The base weight as stored ([in, out] for Conv1D).")
    bias = property(lambda self: self.storage.bias)

    def set_scale(self, alpha: float, rslora: bool, adapter: str | None = None) -> None:
        """s = alpha / r, or alpha / sqrt(r) with rsLoRA."""
        name = adapter or self.active
        if name in self.merged_adapters:
            raise RuntimeError(f"{self.name}: unmerge before changing the scale of a merged adapter")
        self.settings[name].alpha, self.settings[name].rslora = float(alpha), bool(rslora)

    def base_weight(self) -> Tensor:  # W0 in [out, in] layout (a view for Conv1D, no copy)
        return self.storage.weight()

    def delta_weight(self, adapter: str | None = None) -> Tensor:
        """s * B A in [out, in] layout, float32 or float64."""
        name = adapter or self.active
        return self.settings[name].scale * (self.lora_B[name].weight @ self.lora_A[name].weight)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold each active adapter into W0 (plain LoRA: W0 <- W0 + s B A); the forward then uses W0 alone."""
        for name in [n for n in self.active_adapters if n not in self.merged_adapters]:
            self.settings[name].variant.merge(self, name)
            self.merged_adapters.append(name)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo merge, last merged first (plain LoRA: W0 <- W0 - s B A)."""
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            self.settings[name].variant.unmerge(self, name)

    def forward(self, x: Tensor) -> Tensor:
        if self.row_adapters is not None and self.enabled:
            return self._mixed_forward(x, self.row_adapters)
        if self.merged or not self.enabled or not self.active_adapters:
            return self.storage.forward(x)
        first, *others = self.active_adapters  # the first runs the fused kernel, through the storage
        s = self.settings[first]
        y = self.storage.lora_forward(x, self.lora_A[first].weight, self.lora_B[first].weight, s.scale, s.dropout_p,
                                      self.training, self.frozen_input_grad, s.variant.scale_output(self, first))
        for name in others:
            y = y + self._adapter_term(x, name).to(y.dtype)
        return y

    def _adapter_term(self, x: Tensor, name: str, dropout: bool = True) -> Tensor:
        """s B A drop(x) for one adapter, with plain autograd ops."""
        s, a = self.settings[name], self.lora_A[name].weight
        x = F.dropout(x.to(a.dtype), s.dropout_p, self.training) if dropout and s.dropout_p > 0 else x.to(a.dtype)
        return F.linear(F.linear(x, a), self.lora_B[name].weight) * s.scale

    def adapter_delta(self, x: Tensor) -> Tensor:
        """sum over the active adapters of s B A x (no dropout): what the adapters add to the base output."""
        return sum(self._adapter_term(x, n, dropout=False) for n in self.active_adapters)

    def _mixed_forward(self, x: Tensor, rows: list[str]) -> Tensor:
        """Row i gets the adapter rows[i] ("__base__": none); every adapter runs on its own rows only."""
        if len(rows) != x.shape[0]:
            raise LorakitError(f"adapter_names has {len(rows)} names but the batch has {x.shape[0]} rows; "
                               "give one adapter name (or '__base__') per row")
        y = self.storage.forward(x)
        for name in dict.fromkeys(rows):
            if name != BASE and name in self.settings:
                index = torch.tensor([i for i, n in enumerate(rows) if n == name], device=x.device)
                y = y.index_add(0, index, self._adapter_term(x.index_select(0, index), name).to(y.dtype))
        return y

    def extra_repr(self) -> str:
        parts = []
        for name, s in self.settings.items():
            flags = "".join([s.variant.flag, ", merged" if name in self.merged_adapters else "",
                             ", active" if name in self.active_adapters and len(self.settings) > 1 else ""])
            label = f"{name}: " if len(self.settings) > 1 or name != "default" else ""
            parts.append(f"{label}r={s.r}, scale={s.scale:g}, dropout={s.dropout_p:g}{flags}")
        return f"{'Conv1D' if self.fan_in_fan_out else 'Linear'} {self.in_features} -> {self.out_features}, " + "; ".join(parts)
