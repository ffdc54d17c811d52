"""bf16 training: frozen base weights stored in bfloat16, everything that trains in float32.

``use_bf16(model)`` casts every frozen floating-point parameter to bfloat16 in place (half the
weight memory), so activations flow in bf16 and the frozen matmuls run as bf16 GEMMs (oneDNN
on CPUs with AVX512-BF16/AMX, tensor cores on GPUs) with float32 accumulation. Trainable
parameters (LoRA factors, modules_to_save such as a classifier) stay float32, and so does the
optimizer state built on them:
- LoRA layers compute in the activation dtype and return float32 gradients for A and B
  (``kernels.lora_linear`` casts the factors per call, a few KB);
- a fully trainable module (a classification head) gets its inputs cast to float32 and, unless
  it is an output head, its outputs cast back to the activation dtype.
Buffers (rotary frequencies, position ids) keep their dtype. Unlike torch.autocast, the frozen
weights are cast once, not at every forward.

Attention goes through ``speed.attention.lorakit_sdpa_attention`` (float32 SDPA on CPU, bf16 products
with fast dropout when training with attention dropout). By default the model's nn.Dropout
layers also switch to ``kernels.dropout.fast_dropout`` (3-5x faster masks on CPU; the drop
probability rounded to a multiple of 1/65536); ``fast_dropout=False`` keeps torch's.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from lorakit.adapters.attach import is_adapter_parameter
from lorakit.adapters.layer import LoraLinear
from lorakit.adapters.targets import output_heads
from lorakit.errors import ConfigError
from lorakit.speed.attention import use_fast_attention
from lorakit.speed.gemm import bf16_decision
from lorakit.speed.dropout import FastDropout

BF16_FLAG = "_lorakit_bf16"


def _cast_inputs(dtype: torch.dtype):
    def hook(module, args, kwargs):
        cast = lambda t: t.to(dtype) if torch.is_tensor(t) and t.is_floating_point() and t.dtype != dtype else t  # noqa: E731
        return tuple(cast(a) for a in args), {k: cast(v) for k, v in kwargs.items()}

    return hook


def _cast_outputs(dtype: torch.dtype):
    def hook(module, args, output):
        if torch.is_tensor(output) and output.is_floating_point():
            return output.to(dtype)
        return output

    return hook


def use_bf16(model: nn.Module, dtype: torch.dtype = torch.bfloat16, *, fast_dropout: bool = True,
             when: str = "faster") -> nn.Module:
    """Store the frozen weights of an adapted ``model`` in ``dtype`` (see the module docstring); in place.

    ``when="faster"`` (default): on a CPU whose bf16 GEMMs are slower than its fp32 ones
    (``speed.gemm.bf16_decision``, measured once per process) the model is left in fp32, with a warning
    that says so; ``when="always"`` applies bf16 regardless.
    """
    if dtype not in (torch.bfloat16, torch.float16):
        raise ConfigError(f"dtype={dtype} is not a 16-bit float; use torch.bfloat16 (or torch.float16 on GPUs)")
    if when not in ("faster", "always"):
        raise ConfigError(f"when={when!r} is not 'faster' or 'always'")
    if getattr(model, BF16_FLAG, None) is not None:
        return model
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    if when == "faster":
        pays, why = bf16_decision(device)
        if not pays:
            warnings.warn(f"use_bf16: {why} (when='always' forces bf16)", stacklevel=2)
            return model
    heads = output_heads(model)
    base_layers = {id(m.base_layer) for m in model.modules() if isinstance(m, LoraLinear)}  # the kernel casts their bias
    for name, module in model.named_modules():
        if isinstance(module, LoraLinear) or id(module) in base_layers:
            continue
        own = list(module.parameters(recurse=False))
        trainable = [p for p in own if p.requires_grad]
        if trainable and len(trainable) < len(own):
            raise ConfigError(
                f"{name} has both frozen and trainable parameters ({type(module).__name__}); use_bf16 keeps trainable "
                "parameters in float32 and cannot mix them with bf16 weights in one layer. Use bias='none' or "
                "'lora_only', or put the whole module in modules_to_save")
    for name, p in model.named_parameters():
        if not p.requires_grad and p.dtype == torch.float32 and not is_adapter_parameter(name):  # (inactive adapters are frozen)
            p.data = p.data.to(dtype)
    # Parameters of LoRA layers (adapters and base layer) are not a block's own: a block whose linears are all adapted
    # and packed (their frozen weights are buffers) holds only adapter parameters and is no trainable module to run
    # in float32; its LoRA layers compute in the activations' dtype.
    in_lora = {id(p) for m in model.modules() if isinstance(m, LoraLinear) for p in m.parameters()}
    covered: list[str] = []  # LoRA layers and hooked trainable modules: their sub-modules need nothing more
    for name, module in model.named_modules():
        if not name or any(name.startswith(f"{c}.") for c in covered):
            continue
        if isinstance(module, LoraLinear):
            covered.append(name)
            continue
        params = [p for p in module.parameters() if id(p) not in in_lora]
        if params and all(p.requires_grad for p in params):  # a fully trainable module, e.g. a classifier head
            module.register_forward_pre_hook(_cast_inputs(torch.float32), with_kwargs=True)
            if name not in heads:
                module.register_forward_hook(_cast_outputs(dtype))
            covered.append(name)
    if fast_dropout:
        for module in model.modules():
            if type(module) is nn.Dropout:
                module.__class__ = FastDropout
    use_fast_attention(model, fast_dropout=fast_dropout)
    setattr(model, BF16_FLAG, dtype)
    return model

