"""LoraLinear: a frozen linear layer plus a trainable low-rank update.

    y = W0 x + b + s * B A dropout(x),   A: r x in, B: out x r, s = alpha / r (or alpha / sqrt(r))

The wrapped module is kept as ``base_layer`` and the factors as ``lora_A`` / ``lora_B``
(``nn.Linear`` without bias), the same names PEFT uses, so ``state_dict`` keys map one to
one onto PEFT's adapter files. The forward and backward are the fused kernel in
``lorakit.kernels.lora_linear``.

DoRA (Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation"), with ``dora=True``:

    W' = m * (W0 + s B A) / ||W0 + s B A||_row,   y = b + g * (x W0^T + s B A drop(x)),  g = m / ||.||_row

with the trained magnitude m (one value per output feature, initialised to the row norms, PEFT's
``lora_magnitude_vector``) and the norm detached from the graph (the paper's section 4.3, as PEFT
does): the fused kernel computes z = x W0^T + s B A drop(x) and its backward gets G * g, so dA,
dB and dX come from the same fused pass, and dm = sum_n G * z / ||.||_row. The one extra pass over
W0 per step is the norm. With dropout > 0 in training PEFT also applies the scale to drop(x) W0^T
(it adds (g - 1) drop(x) W0^T to x W0^T); lorakit drops out the adapter's input only.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from lorakit.errors import ConfigError
from lorakit.kernels.lora_linear import FrozenInputGrad, lora_linear

try:  # GPT-2 style Conv1D: weight stored as [in, out], y = x W + b
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a hard dependency
    Conv1D = ()  # type: ignore[assignment]


def is_adaptable(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or (bool(Conv1D) and isinstance(module, Conv1D))


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of an nn.Linear or a Conv1D."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    in_f, out_f = module.weight.shape  # Conv1D
    return in_f, out_f


def adapter_dtype(weight: Tensor) -> torch.dtype:
    """Adapters train in float32 (float64 if the base is float64), whatever the base precision."""
    return torch.float64 if weight.dtype == torch.float64 else torch.float32


class LoraLinear(nn.Module):
    """A LoRA-adapted nn.Linear or Conv1D. See the module docstring for the formula."""

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
    ) -> None:
        super().__init__()
        if not is_adaptable(base_layer):
            raise ConfigError(f"{name or 'module'} is a {type(base_layer).__name__}; lorakit adapts nn.Linear and Conv1D layers")
        in_f, out_f = linear_shape(base_layer)
        if not 0 < r <= min(in_f, out_f):
            raise ConfigError(
                f"rank r={r} for {name or 'module'} must be in 1..min(in, out) = 1..{min(in_f, out_f)} "
                f"(the layer is {in_f} -> {out_f}); lower r or use rank_pattern for this module"
            )
        self.base_layer = base_layer
        self.name = name
        self.fan_in_fan_out = not isinstance(base_layer, nn.Linear)
        self.in_features, self.out_features = in_f, out_f
        self.r = r
        self.merged = False
        self.set_scale(alpha, rslora)
        self.dropout_p = float(dropout)
        self.init = init
        weight = base_layer.weight
        kw = dict(device=weight.device, dtype=adapter_dtype(weight))
        self.lora_A = nn.Linear(in_f, r, bias=False, **kw)
        self.lora_B = nn.Linear(r, out_f, bias=False, **kw)
        self.enabled = True
        # CE-LoRA (lorakit.celora) installs an approximation of G W0 here.
        self.frozen_input_grad: FrozenInputGrad | None = None
        self.reset_parameters(init)
        self.lora_magnitude_vector: nn.Parameter | None = None
        self.dora_merged_scale: Tensor | None = None  # g at merge time, to unmerge exactly
        if dora:  # (LoraConfig refuses DoRA with PiSSA)
            self.lora_magnitude_vector = nn.Parameter(self.weight_norm())

    # ------------------------------------------------------------------ weights
    @property
    def weight(self) -> Tensor:
        """The base layer's weight parameter (as stored: [out, in], or [in, out] for Conv1D)."""
        return self.base_layer.weight

    @property
    def bias(self) -> Tensor | None:
        return self.base_layer.bias

    def set_scale(self, alpha: float, rslora: bool) -> None:
        """s = alpha / r, or alpha / sqrt(r) with rsLoRA."""
        if self.merged:
            raise RuntimeError(f"{self.name}: unmerge before changing the scale of a merged adapter")
        self.alpha, self.rslora = float(alpha), bool(rslora)
        self.scale = self.alpha / math.sqrt(self.r) if rslora else self.alpha / self.r

    def base_weight(self) -> Tensor:
        """W0 in [out, in] layout (a view for Conv1D, no copy)."""
        w = self.base_layer.weight
        return w.t() if self.fan_in_fan_out else w

    def delta_weight(self) -> Tensor:
        """s * B A in [out, in] layout, float32 or float64."""
        return self.scale * (self.lora_B.weight @ self.lora_A.weight)

    @property
    def dora(self) -> bool:
        return self.lora_magnitude_vector is not None

    @torch.no_grad()
    def weight_norm(self) -> Tensor:
        """||W0 + s B A||_row, one value per output feature, in the adapter's dtype (DoRA; never differentiated)."""
        a = self.lora_A.weight
        return torch.linalg.vector_norm(self.base_weight().to(a.dtype) + self.delta_weight(), dim=1)

    def dora_scale(self) -> Tensor:
        """g = m / ||W0 + s B A||_row (differentiable in m only)."""
        return self.lora_magnitude_vector / self.weight_norm()

    @torch.no_grad()
    def reset_parameters(self, init: str = "kaiming") -> None:
        """Initialise the adapter.

        kaiming: A ~ Kaiming-uniform(a=sqrt 5) (nn.Linear's default), B = 0 -- PEFT's default.
        gaussian: A ~ N(0, 1/r^2), B = 0.
        pissa: W0 = U S V^T; A = sqrt(S_r / s) V_r^T, B = U_r sqrt(S_r / s), and the frozen
            weight becomes the residual W0 - s B A (Meng et al. 2024, "PiSSA").
        """
        if init == "kaiming":
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        elif init == "gaussian":
            nn.init.normal_(self.lora_A.weight, std=1.0 / self.r)
        elif init == "pissa":
            self._pissa_init()
            return
        else:
            raise ConfigError(f"init={init!r} is not one of 'kaiming', 'gaussian', 'pissa'")
        nn.init.zeros_(self.lora_B.weight)

    def _pissa_init(self) -> None:
        w = self.base_weight()
        u, s, vh = torch.linalg.svd(w.to(self.lora_A.weight.dtype), full_matrices=False)
        root = torch.sqrt(s[: self.r] / self.scale)
        self.lora_A.weight.copy_(root[:, None] * vh[: self.r])
        self.lora_B.weight.copy_(u[:, : self.r] * root[None, :])
        # The initial factors are kept so that save_adapter can write an adapter that works on
        # the original (non-residual) base weights, as PEFT's PiSSA conversion does.
        self.register_buffer("pissa_A0", self.lora_A.weight.detach().clone(), persistent=False)
        self.register_buffer("pissa_B0", self.lora_B.weight.detach().clone(), persistent=False)
        self._add_to_base(-self.delta_weight())

    # ------------------------------------------------------------------ merge
    @torch.no_grad()
    def _add_to_base(self, delta: Tensor) -> None:
        w = self.base_layer.weight
        w.add_((delta.t() if self.fan_in_fan_out else delta).to(w.dtype))

    @torch.no_grad()
    def merge(self) -> None:
        """W0 <- W0 + s B A (DoRA: W0 <- g * (W0 + s B A) by rows); the forward then uses the base layer alone."""
        if self.merged:
            return
        if self.dora:
            g = self.dora_scale()
            self._set_base(g[:, None] * (self.base_weight().to(g.dtype) + self.delta_weight()))
            self.dora_merged_scale = g
        else:
            self._add_to_base(self.delta_weight())
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """W0 <- W0 - s B A (DoRA: W0 <- W' / g - s B A with the g of the merge); exact up to rounding."""
        if not self.merged:
            return
        if self.dora:
            g = self.dora_merged_scale
            self._set_base(self.base_weight().to(g.dtype) / g[:, None] - self.delta_weight())
            self.dora_merged_scale = None
        else:
            self._add_to_base(-self.delta_weight())
        self.merged = False

    @torch.no_grad()
    def _set_base(self, weight: Tensor) -> None:
        w = self.base_layer.weight
        w.copy_((weight.t() if self.fan_in_fan_out else weight).to(w.dtype))

    # ------------------------------------------------------------------ forward
    def forward(self, x: Tensor) -> Tensor:
        if self.merged or not self.enabled:
            return self.base_layer(x)
        if self.dora:
            z = lora_linear(x, self.base_weight(), None, self.lora_A.weight, self.lora_B.weight, self.scale,
                            self.dropout_p, self.training, self.frozen_input_grad)
            y = z * self.dora_scale().to(z.dtype)
            bias = self.base_layer.bias
            return y if bias is None else y + bias.to(y.dtype)
        return lora_linear(
            x,
            self.base_weight(),
            self.base_layer.bias,
            self.lora_A.weight,
            self.lora_B.weight,
            self.scale,
            self.dropout_p,
            self.training,
            self.frozen_input_grad,
        )

    def extra_repr(self) -> str:
        kind = "Conv1D" if self.fan_in_fan_out else "Linear"
        return (
            f"{kind} {self.in_features} -> {self.out_features}, r={self.r}, scale={self.scale:g}, "
            f"dropout={self.dropout_p:g}{', dora' if self.dora else ''}{', merged' if self.merged else ''}"
        )
