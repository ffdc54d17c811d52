"""Storage precision is not compute precision: a base stored in bf16 or fp16, computed in float32.

A 7B model is loaded in bf16 to fit in memory (13.4 GB instead of 27), but on a CPU whose bf16 GEMM
is slow (``speed.gemm``: an AMD EPYC without AVX512-BF16 runs a bf16 product at ~1 GFLOP/s against
~100 in fp32) it must not compute in bf16. ``compute_in_fp32(model)`` keeps every frozen matrix at
its storage dtype and widens it where it is used, one layer at a time:

    y  = x · float(W)ᵀ + float(b)     forward: float(W) exists for this one product
    dX = dY · float(W)                backward: widened again from the stored W; nothing in fp32 is saved

so the extra memory is one layer's weight in fp32 (the largest: a Llama-3 head, 128256 x 4096 x 4 B =
2.1 GB, while the loss is computed), never a second copy of the model. What it changes:

- frozen ``nn.Linear`` layers, LoRA layers' base layers included, compute through ``widened_linear``;
- LoRA layers themselves need nothing: ``kernels.lora_linear`` computes in its input's dtype and
  widens W0 per call (it saves the stored W0 for the backward);
- embeddings return float32 rows (only the rows looked up are widened), so the activations are fp32;
- frozen vectors (norm weights, biases) and any other frozen low-precision module (a GPT-2 ``Conv1D``)
  are stored in float32: a few MB for norms, the module's weights for the rest (named in the result);
- trainable low-precision parameters (a ``modules_to_save`` head) become float32: adapters, heads and
  AdamW's state train in fp32 whatever the base's storage.

The widening costs one elementwise pass over each weight per product, into ``kernels.workspace``'s reused buffer
(a 4096 x 4096 weight: ~4 ms on a 2-core AMD EPYC, 36 ms into a fresh allocation,
against ~145 ms for its fp32 product with 512 tokens). Models on a CPU whose bf16 GEMM is
fast (AMX, AVX512-BF16: ``speed.gemm.bf16_decision``) and GPUs keep computing in bf16 instead
(``adapters.precision.use_bf16``). ``lorakit.attach`` applies ``compute_in_fp32`` to a model loaded in
bf16/fp16 on a CPU where bf16 does not pay, so an own loop, HF Trainer and TRL get it too.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lorakit.kernels.workspace import widened

WIDENED_FLAG = "_lorakit_widened"
LOW_PRECISION = (torch.bfloat16, torch.float16)


BLOCK_ELEMENTS = 2**24  # a weight larger than this (64 MB in fp32) is widened a block of output rows at a time


def _row_blocks(weight: Tensor, dtype: torch.dtype):
    """(first row, rows of ``weight`` widened to ``dtype``): the whole weight, or for a large one (an LM head:
    128256 x 4096 is 2.1 GB in fp32) blocks of ~BLOCK_ELEMENTS weights, one widened at a time."""
    step = weight.shape[0] if weight.numel() <= BLOCK_ELEMENTS else max(1, BLOCK_ELEMENTS // weight.shape[1])
    for o0 in range(0, weight.shape[0], step):
        yield o0, widened(weight[o0 : o0 + step], dtype)  # into the reused scratch buffer: valid for one product


class WidenedLinearFunction(torch.autograd.Function):
    """y = x float(W)ᵀ + float(b) for a frozen W stored in a low precision; saves W as stored."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        ctx.save_for_backward(weight)
        b = None if bias is None else bias.to(x.dtype)
        if weight.numel() <= BLOCK_ELEMENTS:
            return F.linear(x, widened(weight, x.dtype), b)
        y = x.new_empty(*x.shape[:-1], weight.shape[0])
        for o0, w in _row_blocks(weight, x.dtype):
            y[..., o0 : o0 + w.shape[0]] = F.linear(x, w, None if b is None else b[o0 : o0 + w.shape[0]])
        return y

    @staticmethod
    def backward(ctx, grad: Tensor):
        (weight,) = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None
        dx = None
        for o0, w in _row_blocks(weight, grad.dtype):
            part = grad[..., o0 : o0 + w.shape[0]] @ w
            dx = part if dx is None else dx.add_(part)
        return dx, None, None


def widened_linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``F.linear`` in the dtype of ``x`` for a frozen ``weight`` of another (lower) precision."""
    if weight.dtype == x.dtype:
        return F.linear(x, weight, bias if bias is None or bias.dtype == x.dtype else bias.to(x.dtype))
    return WidenedLinearFunction.apply(x, weight, bias)


class WidenedLinear(nn.Linear):
    """A frozen nn.Linear kept at its storage dtype and computed in the input's (see the module docstring)."""

    def forward(self, x: Tensor) -> Tensor:
        if self.weight.requires_grad and torch.is_grad_enabled():  # trained after all: plain autograd through the cast
            return F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
        return widened_linear(x, self.weight, self.bias)


def _float32_output(module, args, output):
    return output.float() if torch.is_tensor(output) and output.dtype in LOW_PRECISION else output


@dataclass
class Widened:
    """What ``compute_in_fp32`` did to a model."""

    storage: torch.dtype | None  # the frozen matrices' dtype (None: nothing was stored in low precision)
    linear: int = 0  # frozen linear layers computed through widened_linear
    embeddings: int = 0
    widened_for_good: list[str] = field(default_factory=list)  # modules whose weights are now stored in fp32

    def describe(self) -> str:
        if self.storage is None:
            return "the base is stored in float32"
        name = str(self.storage).removeprefix("torch.")
        text = f"frozen weights stored in {name}, computed in float32 one layer at a time ({self.linear} linear layers)"
        if self.widened_for_good:
            text += f"; stored in float32: {', '.join(self.widened_for_good[:4])}{' ...' if len(self.widened_for_good) > 4 else ''}"
        return text


def low_precision_storage(model: nn.Module) -> torch.dtype | None:
    """The 16-bit float dtype the model's matrices are stored in, or None."""
    for p in model.parameters():
        if p.dim() >= 2 and p.dtype in LOW_PRECISION:
            return p.dtype
    return None


def compute_in_fp32(model: nn.Module) -> Widened:
    """Make a model stored in bf16/fp16 compute in float32 (see the module docstring); in place, idempotent."""
    done = model.__dict__.get(WIDENED_FLAG)
    if done is not None:
        return done
    result = Widened(low_precision_storage(model))
    for name, module in model.named_modules():  # (a LoRA layer holds no parameter itself: its base layer is widened)
        low = [p for p in module.parameters(recurse=False) if p.dtype in LOW_PRECISION]
        if not low:
            continue
        weight = module._parameters.get("weight")  # (not getattr: a packed layer's .weight would dequantise it)
        matrix = isinstance(weight, nn.Parameter) and weight.dtype in LOW_PRECISION
        if type(module) is nn.Linear and matrix:
            module.__class__ = WidenedLinear
            result.linear += 1
            if module.bias is not None:
                module.bias.data = module.bias.data.float()
        elif isinstance(module, nn.Embedding) and matrix:
            module.register_forward_hook(_float32_output)
            result.embeddings += 1
        else:
            for p in low:  # vectors, and module kinds this file does not widen per product
                p.data = p.data.float()
            if any(p.dim() >= 2 for p in low):
                result.widened_for_good.append(name or type(module).__name__)
    for p in model.parameters():  # what the loop above reached through a shared module stays consistent
        if p.dim() < 2 and p.dtype in LOW_PRECISION:
            p.data = p.data.float()
    setattr(model, WIDENED_FLAG, result)
    return result


def train_in_fp32(model: nn.Module) -> None:
    """Trainable 16-bit parameters (a head trained whole, ``modules_to_save``) become float32, and so does AdamW's
    state built on them. For an adapted model, whose base is frozen."""
    for p in model.parameters():
        if p.requires_grad and p.dtype in LOW_PRECISION:
            p.data = p.data.float()


def widen_where_bf16_is_slow(model: nn.Module, *, adapted: bool = True) -> Widened | None:
    """``compute_in_fp32`` for a model stored in bf16/fp16 on a CPU whose bf16 products are slower than its fp32
    ones (``speed.gemm.bf16_decision``, measured once per process); None where nothing changes. ``adapted``: the
    model's base is frozen (after attach), so what still trains is made float32 first (``train_in_fp32``)."""
    storage = low_precision_storage(model)
    if storage is None:
        return None
    if adapted:
        train_in_fp32(model)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    if device.type != "cpu":
        return None
    from lorakit.speed.gemm import bf16_decision

    if storage == torch.bfloat16 and bf16_decision(device)[0]:
        return None
    return compute_in_fp32(model)
