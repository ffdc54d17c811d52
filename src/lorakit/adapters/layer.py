"""LoraLinear: a frozen linear layer plus trainable low-rank updates, one per named adapter.

    y = W0 x + b + sum_{a active} s_a * B_a A_a dropout(x),   A_a: r_a x in, B_a: out x r_a,
    s_a = alpha_a / r_a (or alpha_a / sqrt(r_a) with rsLoRA)

The wrapped module is kept as ``base_layer`` and the factors as ``lora_A[name]`` / ``lora_B[name]``
(``nn.Linear`` without bias in an ``nn.ModuleDict``), PEFT's in-memory layout, so ``state_dict``
keys are PEFT's (``q_proj.lora_A.default.weight``) and map one to one onto its adapter files
(which drop the adapter name). With one active adapter -- the training case -- the forward and
backward are the fused kernel in ``lorakit.kernels.lora_linear``; further active adapters add
their term with plain autograd ops, and a mixed batch (``adapter_names``, one name per row,
``"__base__"`` for the base model) adds each row's adapter to that row only, as PEFT does.

DoRA (Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation"), for an adapter with ``dora=True``:

    W' = m * (W0 + s B A) / ||W0 + s B A||_row,   y = b + g * (x W0^T + s B A drop(x)),  g = m / ||.||_row

with the trained magnitude m (one value per output feature, initialised to the row norms, PEFT's
``lora_magnitude_vector``) and the norm detached from the graph (the paper's section 4.3, as PEFT
does): the fused kernel computes z = x W0^T + s B A drop(x) and its backward gets G * g, so dA,
dB and dX come from the same fused pass, and dm = sum_n G * z / ||.||_row. The one extra pass over
W0 per step is the norm. With dropout > 0 in training PEFT also applies the scale to drop(x) W0^T
(it adds (g - 1) drop(x) W0^T to x W0^T); lorakit drops out the adapter's input only. A DoRA
adapter is active alone (no second active adapter, no mixed batch: PEFT refuses the latter too).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from lorakit.errors import ConfigError, LorakitError
from lorakit.kernels.lora_linear import FrozenInputGrad, lora_linear
from lorakit.module_kinds import is_adaptable, linear_shape

BASE = "__base__"  # the row name that selects the base model in a mixed batch (PEFT's)


def adapter_dtype(weight: Tensor) -> torch.dtype:
    """Adapters train in float32 (float64 if the base is float64), whatever the base precision."""
    return torch.float64 if weight.dtype == torch.float64 else torch.float32


@dataclass
class AdapterSettings:
    """One adapter's hyper-parameters in one layer (its tensors live in lora_A / lora_B / lora_magnitude_vector)."""

    r: int
    alpha: float
    rslora: bool
    dropout_p: float
    init: str

    @property
    def scale(self) -> float:
        """s = alpha / r, or alpha / sqrt(r) with rsLoRA."""
        return self.alpha / math.sqrt(self.r) if self.rslora else self.alpha / self.r


class LoraLinear(nn.Module):
    """A LoRA-adapted nn.Linear or Conv1D. See the module docstring for the formula.

    ``r``, ``scale``, ``alpha``, ``rslora``, ``dropout_p``, ``init``, ``dora``, ``A``, ``B`` and
    ``magnitude`` describe the one active adapter (``active``); with several active they raise.
    """

    def __init__(
        self,
        base_layer: nn.Module,
        r: int,
        alpha: float,
        *,
        dropout: float = 0.0,
        rslora: bool = False,
        init: str = "kaiming",
        name: str = "",
        dora: bool = False,
        adapter: str = "default",
    ) -> None:
        super().__init__()
        if not is_adaptable(base_layer):
            raise ConfigError(f"{name or 'module'} is a {type(base_layer).__name__}; lorakit adapts nn.Linear and Conv1D layers")
        self.base_layer = base_layer
        self.name = name
        self.fan_in_fan_out = not isinstance(base_layer, nn.Linear)
        self.in_features, self.out_features = linear_shape(base_layer)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_magnitude_vector = nn.ParameterDict()
        self.settings: dict[str, AdapterSettings] = {}
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.dora_merged_scale: dict[str, Tensor] = {}  # g at merge time, to unmerge exactly
        self.enabled = True
        self.row_adapters: list[str] | None = None  # a mixed batch's adapter per row, set for one forward call
        # CE-LoRA (lorakit.celora) installs an approximation of G W0 here.
        self.frozen_input_grad: FrozenInputGrad | None = None
        self.add_adapter(adapter, r, alpha, dropout=dropout, rslora=rslora, init=init, dora=dora)
        self.active_adapters = [adapter]

    # ------------------------------------------------------------------ adapters
    def add_adapter(self, adapter: str, r: int, alpha: float, *, dropout: float = 0.0, rslora: bool = False,
                    init: str = "kaiming", dora: bool = False) -> None:
        """Add adapter ``adapter`` (inactive unless it is the layer's first; see set_active)."""
        in_f, out_f = self.in_features, self.out_features
        if not 0 < r <= min(in_f, out_f):
            raise ConfigError(
                f"rank r={r} for {self.name or 'module'} must be in 1..min(in, out) = 1..{min(in_f, out_f)} "
                f"(the layer is {in_f} -> {out_f}); lower r or use rank_pattern for this module"
            )
        if adapter in self.settings:
            raise LorakitError(f"{self.name}: an adapter named {adapter!r} exists already; choose another name")
        weight = self.base_layer.weight
        kw = dict(device=weight.device, dtype=adapter_dtype(weight))
        self.settings[adapter] = AdapterSettings(int(r), float(alpha), bool(rslora), float(dropout), init)
        self.lora_A[adapter] = nn.Linear(in_f, r, bias=False, **kw)
        self.lora_B[adapter] = nn.Linear(r, out_f, bias=False, **kw)
        self.reset_parameters(init, adapter)
        if dora:  # (LoraConfig refuses DoRA with PiSSA)
            self.lora_magnitude_vector[adapter] = nn.Parameter(self.weight_norm(adapter))

    def delete_adapter(self, adapter: str) -> None:
        """Remove adapter ``adapter`` from this layer (unmerged first if it was merged)."""
        if adapter in self.merged_adapters:
            self.unmerge()
        del self.settings[adapter], self.lora_A[adapter], self.lora_B[adapter]
        if adapter in self.lora_magnitude_vector:
            del self.lora_magnitude_vector[adapter]
        self.active_adapters = [a for a in self.active_adapters if a != adapter]

    def set_active(self, adapters: Sequence[str]) -> None:
        """Make ``adapters`` (those this layer holds) the active ones; only they train (requires_grad)."""
        for a in self.settings:
            on = a in adapters
            for p in (self.lora_A[a].weight, self.lora_B[a].weight):
                p.requires_grad_(on)
            if a in self.lora_magnitude_vector:
                self.lora_magnitude_vector[a].requires_grad_(on)
        self.active_adapters = [a for a in adapters if a in self.settings]

    @property
    def adapter_names(self) -> list[str]:
        return list(self.settings)

    @property
    def active(self) -> str:
        """The one active adapter's name."""
        if len(self.active_adapters) != 1:
            raise LorakitError(f"{self.name}: {len(self.active_adapters)} adapters are active here "
                               f"({self.active_adapters}); name one (this needs exactly one)")
        return self.active_adapters[0]

    def _settings(self, adapter: str | None) -> AdapterSettings:
        return self.settings[adapter or self.active]

    r = property(lambda self: self._settings(None).r)
    alpha = property(lambda self: self._settings(None).alpha)
    rslora = property(lambda self: self._settings(None).rslora)
    scale = property(lambda self: self._settings(None).scale)
    init = property(lambda self: self._settings(None).init)

    @property
    def dropout_p(self) -> float:
        return self._settings(None).dropout_p

    @dropout_p.setter
    def dropout_p(self, p: float) -> None:
        self._settings(None).dropout_p = float(p)

    @property
    def A(self) -> nn.Parameter:
        """The active adapter's A, [r, in]."""
        return self.lora_A[self.active].weight

    @property
    def B(self) -> nn.Parameter:
        """The active adapter's B, [out, r]."""
        return self.lora_B[self.active].weight

    @property
    def magnitude(self) -> nn.Parameter | None:
        """The active adapter's DoRA magnitude m, [out], or None for a plain LoRA adapter."""
        return self.lora_magnitude_vector[self.active] if self.active in self.lora_magnitude_vector else None

    @property
    def dora(self) -> bool:
        return self.active in self.lora_magnitude_vector

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    # ------------------------------------------------------------------ weights
    @property
    def weight(self) -> Tensor:
        """The base layer's weight parameter (as stored: [out, in], or [in, out] for Conv1D)."""
        return self.base_layer.weight

    @property
    def bias(self) -> Tensor | None:
        return self.base_layer.bias

    def set_scale(self, alpha: float, rslora: bool, adapter: str | None = None) -> None:
        """s = alpha / r, or alpha / sqrt(r) with rsLoRA."""
        name = adapter or self.active
        if name in self.merged_adapters:
            raise RuntimeError(f"{self.name}: unmerge before changing the scale of a merged adapter")
        self.settings[name].alpha, self.settings[name].rslora = float(alpha), bool(rslora)

    def base_weight(self) -> Tensor:
        """W0 in [out, in] layout (a view for Conv1D, no copy)."""
        w = self.base_layer.weight
        return w.t() if self.fan_in_fan_out else w

    def delta_weight(self, adapter: str | None = None) -> Tensor:
        """s * B A in [out, in] layout, float32 or float64."""
        name = adapter or self.active
        return self.settings[name].scale * (self.lora_B[name].weight @ self.lora_A[name].weight)

    @torch.no_grad()
    def weight_norm(self, adapter: str | None = None) -> Tensor:
        """||W0 + s B A||_row, one value per output feature, in the adapter's dtype (DoRA; never differentiated)."""
        name = adapter or self.active
        a = self.lora_A[name].weight
        return torch.linalg.vector_norm(self.base_weight().to(a.dtype) + self.delta_weight(name), dim=1)

    def dora_scale(self, adapter: str | None = None) -> Tensor:
        """g = m / ||W0 + s B A||_row (differentiable in m only)."""
        name = adapter or self.active
        return self.lora_magnitude_vector[name] / self.weight_norm(name)

    @torch.no_grad()
    def reset_parameters(self, init: str = "kaiming", adapter: str | None = None) -> None:
        """Initialise the adapter.

        kaiming: A ~ Kaiming-uniform(a=sqrt 5) (nn.Linear's default), B = 0 -- PEFT's default.
        gaussian: A ~ N(0, 1/r^2), B = 0.
        pissa: W0 = U S V^T; A = sqrt(S_r / s) V_r^T, B = U_r sqrt(S_r / s), and the frozen
            weight becomes the residual W0 - s B A (Meng et al. 2024, "PiSSA").
        """
        name = adapter or self.active
        a, b = self.lora_A[name].weight, self.lora_B[name].weight
        if init == "kaiming":
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        elif init == "gaussian":
            nn.init.normal_(a, std=1.0 / self.settings[name].r)
        elif init == "pissa":
            self._pissa_init(name)
            return
        else:
            raise ConfigError(f"init={init!r} is not one of 'kaiming', 'gaussian', 'pissa'")
        nn.init.zeros_(b)

    def _pissa_init(self, name: str) -> None:
        w, s = self.base_weight(), self.settings[name]
        a, b = self.lora_A[name].weight, self.lora_B[name].weight
        u, sv, vh = torch.linalg.svd(w.to(a.dtype), full_matrices=False)
        root = torch.sqrt(sv[: s.r] / s.scale)
        a.copy_(root[:, None] * vh[: s.r])
        b.copy_(u[:, : s.r] * root[None, :])
        # The initial factors are kept so that save_adapter can write an adapter that works on
        # the original (non-residual) base weights, as PEFT's PiSSA conversion does.
        self.register_buffer("pissa_A0", a.detach().clone(), persistent=False)
        self.register_buffer("pissa_B0", b.detach().clone(), persistent=False)
        self._add_to_base(-self.delta_weight(name))

    # ------------------------------------------------------------------ merge
    @torch.no_grad()
    def _add_to_base(self, delta: Tensor) -> None:
        w = self.base_layer.weight
        w.add_((delta.t() if self.fan_in_fan_out else delta).to(w.dtype))

    @torch.no_grad()
    def merge(self) -> None:
        """Fold each active adapter into W0: W0 <- W0 + s B A (DoRA: W0 <- g * (W0 + s B A) by rows); the forward
        then uses the base layer alone."""
        for name in self.active_adapters:
            if name in self.merged_adapters:
                continue
            if name in self.lora_magnitude_vector:
                g = self.dora_scale(name)
                self._set_base(g[:, None] * (self.base_weight().to(g.dtype) + self.delta_weight(name)))
                self.dora_merged_scale[name] = g
            else:
                self._add_to_base(self.delta_weight(name))
            self.merged_adapters.append(name)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo merge, last merged first: W0 <- W0 - s B A (DoRA: W0 <- W' / g - s B A with the g of the merge)."""
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            if name in self.dora_merged_scale:
                g = self.dora_merged_scale.pop(name)
                self._set_base(self.base_weight().to(g.dtype) / g[:, None] - self.delta_weight(name))
            else:
                self._add_to_base(-self.delta_weight(name))

    @torch.no_grad()
    def _set_base(self, weight: Tensor) -> None:
        w = self.base_layer.weight
        w.copy_((weight.t() if self.fan_in_fan_out else weight).to(w.dtype))

    # ------------------------------------------------------------------ forward
    def forward(self, x: Tensor) -> Tensor:
        if self.row_adapters is not None and self.enabled:
            return self._mixed_forward(x, self.row_adapters)
        if self.merged or not self.enabled or not self.active_adapters:
            return self.base_layer(x)
        first, *others = self.active_adapters
        y = self._fused_forward(x, first)
        for name in others:
            y = y + self._adapter_term(x, name).to(y.dtype)
        return y

    def _fused_forward(self, x: Tensor, name: str) -> Tensor:
        s = self.settings[name]
        a, b = self.lora_A[name].weight, self.lora_B[name].weight
        if name in self.lora_magnitude_vector:
            z = lora_linear(x, self.base_weight(), None, a, b, s.scale, s.dropout_p, self.training, self.frozen_input_grad)
            y = z * self.dora_scale(name).to(z.dtype)
            bias = self.base_layer.bias
            return y if bias is None else y + bias.to(y.dtype)
        return lora_linear(x, self.base_weight(), self.base_layer.bias, a, b, s.scale, s.dropout_p, self.training,
                           self.frozen_input_grad)

    def _adapter_term(self, x: Tensor, name: str) -> Tensor:
        """s B A drop(x) for one adapter, with plain autograd ops."""
        s = self.settings[name]
        a = self.lora_A[name].weight
        x = F.dropout(x.to(a.dtype), s.dropout_p, self.training) if s.dropout_p > 0 else x.to(a.dtype)
        return F.linear(F.linear(x, a), self.lora_B[name].weight) * s.scale

    def adapter_delta(self, x: Tensor) -> Tensor:
        """sum over the active adapters of s B A x (no dropout): what the adapters add to the base output."""
        a = self.lora_A[self.active_adapters[0]].weight
        return sum(F.linear(F.linear(x.to(a.dtype), self.lora_A[n].weight), self.lora_B[n].weight) * self.settings[n].scale
                   for n in self.active_adapters)

    def _mixed_forward(self, x: Tensor, rows: list[str]) -> Tensor:
        """Row i gets the adapter rows[i] ("__base__": none); every adapter runs on its own rows only."""
        if len(rows) != x.shape[0]:
            raise LorakitError(f"adapter_names has {len(rows)} names but the batch has {x.shape[0]} rows; "
                               "give one adapter name (or '__base__') per row")
        y = self.base_layer(x)
        for name in dict.fromkeys(rows):
            if name == BASE or name not in self.settings:
                continue
            index = torch.tensor([i for i, n in enumerate(rows) if n == name], device=x.device)
            y = y.index_add(0, index, self._adapter_term(x.index_select(0, index), name).to(y.dtype))
        return y

    def extra_repr(self) -> str:
        kind = "Conv1D" if self.fan_in_fan_out else "Linear"
        parts = []
        for name, s in self.settings.items():
            flags = "".join([", dora" if name in self.lora_magnitude_vector else "",
                             ", merged" if name in self.merged_adapters else "",
                             ", active" if name in self.active_adapters and len(self.settings) > 1 else ""])
            label = f"{name}: " if len(self.settings) > 1 or name != "default" else ""
            parts.append(f"{label}r={s.r}, scale={s.scale:g}, dropout={s.dropout_p:g}{flags}")
        return f"{kind} {self.in_features} -> {self.out_features}, " + "; ".join(parts)
