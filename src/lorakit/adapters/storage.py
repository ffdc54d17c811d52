"""How an adapted layer keeps its frozen weight W0 and multiplies by it.

The layer asks its storage for W0 (``weight()``, always in [out, in] layout), for the products it needs
(``forward``: W0 x + b; ``lora_forward``: W0 x + b + s B A drop(x) as one fused autograd pass) and to change
W0 in place (``add_`` when merging, ``set_`` for a variant that rescales rows); it never reads the wrapped
module's bytes itself. ``DenseWeight`` is the float case (fp32, bf16, fp16: the wrapped nn.Linear or GPT-2
Conv1D as it is, ``base_layer.weight`` in its own layout). ``QuantizedWeight`` is W0 held packed by a
``QuantizedLinear`` (int8, NF4, int4: a ``kernels.quantize.QuantFormat`` and its tensors, as torchao's NF4Tensor and
bitsandbytes' Params4bit keep their blocks and scales to themselves): each product dequantises the whole layer's W0
once into the compute dtype (float32 on a CPU without fast bf16), into ``kernels.workspace``'s reused buffer, and
runs the float GEMM, which measured faster on
this CPU than PyTorch's packed kernels for training-sized batches (benchmarks/quant_products.py); the backward's
G W0 dequantises again, so no float copy of W0 outlives its product. A quantised W0 cannot change: merging into it
is refused (``ConfigError``), never re-quantised. ``storage_for`` picks the class for a base layer.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lorakit.errors import ConfigError
from lorakit.kernels.linear_cross_entropy import PackedRows
from lorakit.kernels.lora_linear import FrozenInputGrad, lora_linear, product_dtype
from lorakit.kernels.quantize import QuantFormat, dequantized_linear
from lorakit.kernels.workspace import scratch
from lorakit.module_kinds import linear_shape


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

    @property
    def nbytes(self) -> int:
        """Bytes of W0 as stored."""
        return self.module.weight.nbytes

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


class QuantizedLinear(nn.Linear):
    """A frozen linear layer whose weight W0 [out, in] is held packed in ``format`` (``kernels.quantize``): the
    format's tensors are buffers (``model.to`` and ``state_dict`` carry them), the bias stays a float parameter.
    ``weight`` is W0 dequantised on each access (for reading; nothing is cached), in the dtype it had
    (``weight_dtype``). An nn.Linear for whoever asks what kind of layer it is (targets, adapters, shapes)."""

    def __init__(self, in_features: int, out_features: int, format: QuantFormat, tensors: dict[str, Tensor],
                 bias: Tensor | None, weight_dtype: torch.dtype = torch.float32) -> None:
        nn.Module.__init__(self)  # (not nn.Linear's: it would allocate the float weight)
        self.in_features, self.out_features, self.format, self.weight_dtype = in_features, out_features, format, weight_dtype
        for name, tensor in tensors.items():
            self.register_buffer(name, tensor)
        self.tensor_names = tuple(tensors)
        if bias is None:
            self.register_parameter("bias", None)
        else:
            self.bias = bias if isinstance(bias, nn.Parameter) else nn.Parameter(bias, requires_grad=False)

    @classmethod
    @torch.no_grad()
    def from_module(cls, module: nn.Module, format: QuantFormat, name: str = "") -> QuantizedLinear:
        """Quantise an nn.Linear (or a GPT-2 Conv1D, weight [in, out]) with ``format``; its bias is kept as it is
        (the same parameter, trainable or not)."""
        in_f, out_f = linear_shape(module)
        format.check(in_f, name)
        w = module.weight if isinstance(module, nn.Linear) else module.weight.t()
        return cls(in_f, out_f, format, format.quantize(w), module.bias, module.weight.dtype)

    def tensors(self) -> dict[str, Tensor]:
        return {n: getattr(self, n) for n in self.tensor_names}

    def dequantize(self, dtype: torch.dtype | None = None, rows: slice | None = None, out: Tensor | None = None) -> Tensor:
        """W0 (or its rows ``rows``) [out, in] in ``dtype`` (default ``weight_dtype``), written into ``out`` if given."""
        return self.format.dequantize(self.tensors(), dtype or self.weight_dtype, rows, out)

    def dequantize_for_product(self, dtype: torch.dtype) -> Tensor:
        """W0 [out, in] in ``dtype`` in the workspace's scratch buffer: valid for one product, then overwritten."""
        return self.dequantize(dtype, None, scratch((self.out_features, self.in_features), dtype, self.qweight.device))

    @property
    def weight(self) -> Tensor:  # type: ignore[override]
        return self.dequantize()

    def packed_rows(self) -> PackedRows:
        """W0 for the fused loss (``kernels.linear_cross_entropy``), which dequantises it a block of rows at a time:
        a packed LM head (``--quantize-head``) never exists whole in float."""
        return PackedRows(torch.Size((self.out_features, self.in_features)), self.weight_dtype, self.qweight.device,
                          lambda dtype, rows, out: self.dequantize(dtype, rows, out))

    @property
    def nbytes(self) -> int:
        """Bytes of the packed weight: codes and scales (the bias not included)."""
        return sum(t.nbytes for t in self.tensors().values())

    def forward(self, x: Tensor) -> Tensor:
        """x W0^T + b computed in the input's dtype; the backward dequantises W0 again for dX."""
        dtype = product_dtype(x)
        with torch.autocast(x.device.type, enabled=False):
            return dequantized_linear(x.to(dtype), self.bias, self.dequantize, self.out_features, self.in_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, " \
               f"{self.format.describe()}"


def refuse_change(fmt: str) -> ConfigError:
    return ConfigError(f"the base weights are quantised ({fmt}) and cannot be changed in place (merging an adapter, or "
                       "an init that rewrites W0, would re-quantise them); load the base with --base-dtype bf16 "
                       "(lorakit.train.models.load_model(..., dtype=torch.bfloat16)), load the adapter on it and merge there")


class QuantizedWeight:
    """W0 held packed by a ``QuantizedLinear`` (see the module docstring)."""

    transposed = False

    def __init__(self, module: QuantizedLinear) -> None:
        self.module = module

    bias = property(lambda self: self.module.bias)
    dtype = property(lambda self: self.module.weight_dtype, doc="The dtype W0 had before quantisation.")
    device = property(lambda self: self.module.qweight.device)
    nbytes = property(lambda self: self.module.nbytes, doc="Bytes of the packed W0 (codes and scales).")
    format = property(lambda self: self.module.format)

    @property
    def adapter_dtype(self) -> torch.dtype:
        """Adapters beside a quantised weight train in float32 (float64 if it was float64)."""
        return torch.float64 if self.dtype == torch.float64 else torch.float32

    def weight(self, dtype: torch.dtype | None = None) -> Tensor:
        """W0 dequantised, [out, in], in ``dtype`` (default: the dtype it had); computed on each call."""
        return self.module.dequantize(dtype)

    def add_(self, delta: Tensor) -> None:
        raise refuse_change(self.module.format.name)

    def set_(self, weight: Tensor) -> None:
        raise refuse_change(self.module.format.name)

    def forward(self, x: Tensor) -> Tensor:
        return self.module(x)

    def lora_forward(self, x: Tensor, a: Tensor, b: Tensor, scale: float, dropout_p: float, training: bool,
                     frozen_input_grad: FrozenInputGrad | None = None, out_scale: Tensor | None = None) -> Tensor:
        """DenseWeight.lora_forward on W0 dequantised once into the compute dtype; the kernel's G W0 is
        ``frozen_input_grad`` (default: G times W0 dequantised again), so the kernel does not keep the float W0
        for the backward: one layer's float weight lives only during its own forward."""
        w = self.module.dequantize_for_product(product_dtype(x))
        grad = frozen_input_grad or self._input_grad
        bias = self.bias if out_scale is None else None
        y = lora_linear(x, w, bias, a, b, scale, dropout_p, training, grad)
        if out_scale is None:
            return y
        y = y * out_scale.to(y.dtype)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def _input_grad(self, g: Tensor) -> Tensor:
        return torch.mm(g, self.module.dequantize_for_product(g.dtype))


def storage_for(module: nn.Module) -> DenseWeight | QuantizedWeight:
    """The storage of an adapted layer's base layer: packed for a QuantizedLinear, dense otherwise."""
    return QuantizedWeight(module) if isinstance(module, QuantizedLinear) else DenseWeight(module)
