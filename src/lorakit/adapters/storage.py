"""How an adapted layer keeps its frozen weight W0 and multiplies by it.

The layer asks its storage for W0 (``weight()``, always in [out, in] layout), for the products it needs
(``forward``: W0 x + b; ``lora_forward``: W0 x + b + s B A drop(x) as one fused autograd pass) and to change
W0 in place (``add_`` when merging, ``set_`` for a variant that rescales rows); it never reads the wrapped
module's bytes itself. ``DenseWeight`` is the float case (fp32, bf16, fp16: the wrapped nn.Linear or GPT-2
Conv1D as it is, ``base_layer.weight`` in its own layout). Quantised formats are further classes with these
methods, as torchao's NF4Tensor and bitsandbytes' Params4bit keep their blocks and scales to themselves.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lorakit.kernels.lora_linear import FrozenInputGrad, lora_linear


class DenseWeight:
    """W0 kept as the float weight of the wrapped ``module`` (an nn.Linear [out, in] or a Conv1D [in, out])."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.transposed = not isinstance(module, nn.Linear)  # Conv1D keeps [in, out]

    @property
    def bias(self) -> Tensor | None:
        return self.module.bias

    @property
    def dtype(self) -> torch.dtype:
        return self.module.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.module.weight.device

    @property
    def adapter_dtype(self) -> torch.dtype:
        """Adapters beside this weight train in float32 (float64 if it is float64), whatever its precision."""
        return torch.float64 if self.dtype == torch.float64 else torch.float32

    def _swap(self, matrix: Tensor) -> Tensor:
        """[out, in] <-> the module's layout (a view; its own inverse)."""
        return matrix.t() if self.transposed else matrix

    def weight(self) -> Tensor:
        """W0 in [out, in] layout (a view for Conv1D, no copy)."""
        return self._swap(self.module.weight)

    @torch.no_grad()
    def add_(self, delta: Tensor) -> None:
        """W0 <- W0 + delta (delta in [out, in] layout, any float dtype)."""
        self.module.weight.add_(self._swap(delta).to(self.dtype))

    @torch.no_grad()
    def set_(self, weight: Tensor) -> None:
        """W0 <- weight ([out, in] layout, any float dtype)."""
        self.module.weight.copy_(self._swap(weight).to(self.dtype))

    def forward(self, x: Tensor) -> Tensor:
        """W0 x + b: the wrapped module's own forward."""
        return self.module(x)

    def lora_forward(self, x: Tensor, a: Tensor, b: Tensor, scale: float, dropout_p: float, training: bool,
                     frozen_input_grad: FrozenInputGrad | None = None, out_scale: Tensor | None = None) -> Tensor:
        """W0 x + b + s B A drop(x) in one fused autograd pass (``kernels.lora_linear``; ``frozen_input_grad``
        replaces G W0 in its backward), or g * (W0 x + s B A drop(x)) + b with ``out_scale`` g, one factor per
        output feature (the kernel's backward then gets G * g)."""
        if out_scale is None:
            return lora_linear(x, self.weight(), self.bias, a, b, scale, dropout_p, training, frozen_input_grad)
        y = lora_linear(x, self.weight(), None, a, b, scale, dropout_p, training, frozen_input_grad)
        y = y * out_scale.to(y.dtype)
        return y if self.bias is None else y + self.bias.to(y.dtype)
