"""``quantize(model, ...)``: the frozen linear weights of a loaded (or adapted) model held packed, QLoRA's way.

    lorakit.quantize(model, bits=4)                      # NF4, blocks of 64 (QLoRA, Dettmers et al. 2023)
    lorakit.quantize(model, bits=4, format="int4", group_size=128)
    lorakit.quantize(model, bits=8)                      # int8, per output channel
    lorakit.attach(model, cfg)                           # before or after: the adapters train in float32

Every frozen nn.Linear (and GPT-2 Conv1D) becomes a ``storage.QuantizedLinear``; in an adapted layer its base layer
does and the layer's storage becomes ``storage.QuantizedWeight``, so the adapter's tensors and files (PEFT format)
are unchanged. Embeddings, norms, the output heads (the LM head, a classifier) and whatever trains stay as they
are; ``quantize_head=True`` quantises the LM head too (a task head that trains never). Formats and their numerics:
``kernels.quantize``.
"""

from __future__ import annotations

import torch
from torch import nn

from lorakit.adapters.attach import is_attached
from lorakit.adapters.layer import LoraLinear
from lorakit.adapters.storage import QuantizedLinear, QuantizedWeight
from lorakit.adapters.targets import default_modules_to_save, model_modules, output_heads
from lorakit.errors import ConfigError
from lorakit.kernels.quantize import INT4_GROUPS, INT8_GROUPS, Int4Format, Int8Format, NF4Format, QuantFormat
from lorakit.module_kinds import is_adaptable, linear_shape
from lorakit.speed.allocator import return_freed_memory_to_the_system

FORMATS_BY_BITS = {8: ("int8",), 4: ("nf4", "int4")}


def make_format(bits: int, format: str | None = None, group_size: int = 64, double_quant: bool = False,
                scale_dtype: torch.dtype = torch.float32, int8_group_size: int | None = None) -> QuantFormat:
    """The QuantFormat for these options (``format`` None: int8 for 8 bits, nf4 for 4), or a ConfigError.
    ``int8_group_size``: int8 with a float32 scale per group of that many inputs (16/32/64/128; GGUF's Q8_0 is
    int8 g32) instead of per output channel."""
    if bits not in FORMATS_BY_BITS:
        raise ConfigError(f"bits={bits!r} is not supported; use bits=8 (int8) or bits=4 (nf4 or int4)")
    name = format or FORMATS_BY_BITS[bits][0]
    if name not in FORMATS_BY_BITS[bits]:
        known = ", ".join(f"{f!r} ({b} bits)" for b, fs in FORMATS_BY_BITS.items() for f in fs)
        raise ConfigError(f"format={name!r} with bits={bits} is not a format lorakit knows; use one of {known}")
    if double_quant and name != "nf4":
        raise ConfigError(f"double_quant=True applies to format='nf4' only (format={name!r}); drop it or use nf4")
    if name != "int8" and group_size not in INT4_GROUPS:
        raise ConfigError(f"group_size={group_size!r} is not one of {INT4_GROUPS} for {name}; use 64 (QLoRA's "
                          "block size) or another of them")
    if name == "int8":
        if scale_dtype not in (torch.float32, torch.bfloat16):
            raise ConfigError(f"scale_dtype={scale_dtype} for int8: use torch.float32 or torch.bfloat16")
        if int8_group_size is not None and int8_group_size not in INT8_GROUPS:
            raise ConfigError(f"int8 group size {int8_group_size!r} is not one of {INT8_GROUPS}; pick one of them")
        fmt: QuantFormat = Int8Format(scale_dtype if int8_group_size is None else torch.float32, int8_group_size)
    elif name == "nf4":
        fmt = NF4Format(group_size, double_quant)
    else:
        fmt = Int4Format(group_size)
    return fmt


def _frozen_linears(model: nn.Module, quantize_head: bool) -> list[tuple[str, nn.Module]]:
    """(path, module) of the layers to quantise: nn.Linear / Conv1D not yet quantised, none whose weight trains
    (after attach: modules_to_save), no adapter factor, no output head unless ``quantize_head`` (a task head never)."""
    heads = output_heads(model)
    keep = heads if not quantize_head else {h for h in heads if h in default_modules_to_save(model)}
    out = []
    for name, module in model_modules(model):
        if isinstance(module, LoraLinear):
            if not isinstance(module.base_layer, QuantizedLinear):
                out.append((name, module))
        elif (name and is_adaptable(module) and not isinstance(module, QuantizedLinear) and name not in keep
              and not _trains(model, module)):
            out.append((name, module))
    return out


def _trains(model: nn.Module, module: nn.Module) -> bool:
    """After attach, a weight that requires grad trains (modules_to_save); before it (a model fresh from loading)
    every weight counts as frozen. A bias that trains (bias="all") stays a float parameter that trains."""
    return is_attached(model) and module.weight.requires_grad


def quantize(model: nn.Module, bits: int = 4, format: str | None = None, group_size: int = 64,
             double_quant: bool = False, quantize_head: bool = False,
             scale_dtype: torch.dtype = torch.float32, int8_group_size: int | None = None) -> nn.Module:
    """Hold the frozen linear weights of ``model`` packed (see the module docstring); in place, returns ``model``.

    ``bits=8``: int8 per output channel (``scale_dtype`` float32 or bfloat16), or per group of ``int8_group_size``
    inputs (float32 scales). ``bits=4``: ``format="nf4"`` (default;
    blocks of ``group_size`` weights, 64 as QLoRA, ``double_quant`` for 8-bit block constants) or ``"int4"``
    (asymmetric, groups of ``group_size`` in 32/64/128). Every layer is checked before any is changed: an input width
    the block or group size does not divide is a ConfigError naming the layer. An adapted layer whose adapters are
    merged is refused (unmerge first)."""
    fmt = make_format(bits, format, group_size, double_quant, scale_dtype, int8_group_size)
    todo = check_quantizable(model, fmt, quantize_head)
    return_freed_memory_to_the_system()  # each weight's float temporaries are freed as the next is packed
    for name, module in todo:
        if isinstance(module, LoraLinear):
            module.base_layer = QuantizedLinear.from_module(module.base_layer, fmt, name)
            module.storage = QuantizedWeight(module.base_layer)
        else:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, QuantizedLinear.from_module(module, fmt, name))
    return model


def check_quantizable(model: nn.Module, fmt: QuantFormat, quantize_head: bool) -> list[tuple[str, nn.Module]]:
    """The layers ``quantize`` would pack, each checked first (a ConfigError naming the first that cannot be: a width
    the block or group size does not divide, merged adapters, a head tied to the embedding)."""
    todo = _frozen_linears(model, quantize_head)
    if quantize_head:
        _refuse_tied_head(model, [name for name, _ in todo if name in output_heads(model)])
    for name, module in todo:
        fmt.check(module.in_features if isinstance(module, LoraLinear) else linear_shape(module)[0], name)
        if isinstance(module, LoraLinear) and module.merged:
            raise ConfigError(f"{name} has its adapters merged into W0; lorakit.unmerge(model) before quantize")
    return todo


def _refuse_tied_head(model: nn.Module, heads: list[str]) -> None:
    """A head that shares its matrix with the input embedding (tie_word_embeddings) cannot be packed: the embedding
    still needs the float matrix for its lookups, so a packed head would be a second copy, not a smaller one."""
    get_in = getattr(model, "get_input_embeddings", None)
    embedding = get_in() if callable(get_in) else None
    shared = getattr(embedding, "weight", None)
    for name in heads:
        if shared is not None and model.get_submodule(name)._parameters.get("weight") is shared:
            raise tied_head_error(name)


def tied_head_error(name: str) -> ConfigError:
    return ConfigError(f"{name} is tied to the input embedding (tie_word_embeddings): packing it would add a copy "
                       "beside the float embedding the lookups need, not save memory; drop --quantize-head "
                       "(quantize_head=False) for this model")


def quantized_bytes(model: nn.Module) -> int:
    """Bytes of the packed weights of ``model`` (codes and scales of every QuantizedLinear)."""
    return sum(m.nbytes for m in model.modules() if isinstance(m, QuantizedLinear))


def packed_bytes(fmt: QuantFormat, out_features: int, in_features: int) -> int:
    """Bytes a [out, in] weight takes packed in ``fmt`` (codes and scales, as ``QuantizedLinear.nbytes`` counts them),
    from the shape alone: what the memory plan counts for a frozen linear weight."""
    numel = out_features * in_features
    if isinstance(fmt, Int8Format) and fmt.group_size is not None:
        return numel + 4 * (numel // fmt.group_size)  # int8 codes, a float32 scale per group
    if isinstance(fmt, Int8Format):
        return numel + out_features * torch.empty(0, dtype=fmt.scale_dtype).element_size()
    blocks = numel // fmt.group_size if isinstance(fmt, Int4Format) else numel // fmt.block_size
    if isinstance(fmt, Int4Format):
        return numel // 2 + 2 * 4 * blocks  # nibbles, float32 scale and zero per group
    if fmt.double_quant:  # int8 block constants, a float32 factor per 256 of them and their mean
        return numel // 2 + blocks + 4 * -(-blocks // 256) + 4
    return numel // 2 + 4 * blocks  # nibbles, a float32 absmax per block
