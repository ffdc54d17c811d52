"""Loading a model with a packed frozen base (--base-dtype int8 / int4) shard by shard, tensor by tensor (issue 29),
and a 16-bit model in fp32 the same way (``load_widened``: nothing packed, each float tensor widened as it is read).

``load_packed(folder, config, quant, dtype, attn_implementation)`` builds the model's skeleton from its config with
every parameter on the meta device (the buffers it computes itself, rotary ``inv_freq`` and the like, are made on the
CPU as its constructor makes them), checks every frozen linear the packing would pick (``adapters.quantize``'s
``_frozen_linears``; a block or group size a width does not divide is one ConfigError naming the layer, before
anything is read), then reads the safetensors files one at a time and each tensor with plain file reads (offsets
from the file's header; no memory map, whose touched pages would count in the process's RSS), but for one tensor:

    a frozen linear's weight   read a block of rows at a time (about ``BLOCK_BYTES`` of fp32), cast to ``dtype`` as
                               transformers' loader casts it, packed with the format (``QuantFormat.quantize``) and
                               the blocks' tensors joined; the layer becomes a ``storage.QuantizedLinear``
    the input embedding        paged from the file (``paged``) where it is stored in ``dtype`` and no head is tied
                               to it: a private, copy-on-write map of its bytes. A lookup touches only the rows of
                               the batch's tokens, so only their pages become resident (Llama-3-8B: 1.05 GB of bf16
                               rows, of which 2048 tokens touch at most 16 MB). The file must not be rewritten in
                               place while the model lives (llama.cpp's mmap has the same rule; a file replaced by
                               a new one, as ``save_pretrained`` writes it, is safe)
    anything else              read into its own storage and cast to the skeleton's dtype (``dtype``, as
                               ``from_pretrained(dtype=...)`` casts every float tensor)

so the peak is the packed model, its float tensors (embeddings, norms, an unpacked head) and one tensor in transit,
never a bf16 copy of the model: each packed weight's tensors are allocated once and filled block by block, and the
heap's freed pages are given back after each (glibc's malloc_trim), so the blocks' temporaries freed between the
tensors that stay do not stay resident (measured on a 225 MB bf16 model, 4 MiB blocks, glibc's mmap threshold fixed
by ``speed.allocator``: the peak over the baseline is the loaded model's bytes + 12-13 MB for int4 and int8; the full
bf16 load then packing: +580 MB). The result is what ``from_pretrained`` followed by ``models.pack_frozen_linears``
gives, byte for byte (the formats quantise each row on its own; nf4's double quantisation runs once over the
joined block constants), and ``tests/train/test_quantized_load.py`` checks it. The weights tied to another
(``tie_word_embeddings``) are tied after reading as transformers ties them (``quantize_head`` on a tied head is
refused before reading, as ``lorakit.quantize`` refuses it). A key the model lacks or the files lack is a ModelError naming it and its file.

``None`` (fall back to the full load, then ``pack_frozen_linears``) where this path does not apply:

    - the checkpoint is not safetensors (``pytorch_model.bin``), or its index names a file that is not there
      (transformers' loader then reports the damage);
    - transformers renames this architecture's checkpoint keys while loading (``get_model_conversion_mapping``:
      MoE experts fused, legacy names), so the files' names are not the model's;
    - the files' keys do not match the model's at all (a base model saved without its ``model.`` prefix, another
      architecture's names): transformers' loader knows those prefixes;
    - the model keeps modules in fp32 (``_keep_in_fp32_modules``), which transformers' loader decides;
    - a tensor in a dtype torch cannot read from the header's name.

(``models.load_model`` never calls this for the classify task: its head is new, initialised by transformers.)
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import re
import struct
from pathlib import Path

import torch
from torch import nn

from lorakit.errors import ModelError
from lorakit.speed.allocator import trim
from lorakit.train.safetensors_layout import SAFETENSORS_DTYPE

BLOCK_BYTES = 1 << 22  # fp32 bytes of one block of rows quantised at a time (its temporaries are a few times this;
# NF4 on a Llama-3-8B MLP weight, 2 busy cores: 149 s in 64-row (1 MiB) blocks, 56 s in 256-row (4 MiB) ones, 37 s whole)
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
DTYPES = {name: dtype for dtype, name in SAFETENSORS_DTYPE.items()}


class _FallBack(Exception):
    """This path does not apply (the module docstring lists when): load the whole model, then pack."""


# --------------------------------------------------------------------------- safetensors, read without a map
def _header(file: Path) -> tuple[dict, int]:
    """(entries, offset of the data) of a safetensors file; a damaged header is a ModelError naming the file."""
    size = file.stat().st_size
    try:
        with open(file, "rb") as fh:
            length = struct.unpack("<Q", fh.read(8))[0]
            if length > size - 8:
                raise ValueError(f"header of {length} bytes in a file of {size}")
            entries = json.loads(fh.read(length))
    except (OSError, ValueError, struct.error) as exc:
        raise ModelError(f"{file} is not a readable safetensors file ({exc}); the model files are damaged or "
                         "incomplete: copy or save the model again") from None
    if not isinstance(entries, dict):
        raise ModelError(f"{file}: its safetensors header is not a table of tensors; the file is damaged")
    entries.pop("__metadata__", None)
    for name, entry in entries.items():
        ok = isinstance(entry, dict) and isinstance(entry.get("shape"), list) and \
            isinstance(entry.get("data_offsets"), list) and len(entry["data_offsets"]) == 2
        if not ok:
            raise ModelError(f"{file}: the header entry of {name} is malformed; the file is damaged")
        if entry.get("dtype") not in DTYPES:
            raise _FallBack(f"{name} in {file} is stored as {entry.get('dtype')}")
        start, end = entry["data_offsets"]
        numel = 1
        for d in entry["shape"]:
            numel *= d
        itemsize = DTYPES[entry["dtype"]].itemsize
        if not (0 <= start <= end <= size - 8 - length) or end - start != numel * itemsize:
            raise ModelError(f"{file}: {name} lies outside the file or has the wrong size for its shape "
                             f"{entry['shape']}; the file is truncated or damaged")
    return entries, 8 + length


def _read(fh, base: int, entry: dict, rows: slice | None = None) -> torch.Tensor:
    """A tensor (or the rows ``rows`` of a 2-D one) read with plain reads into memory torch owns."""
    dtype, shape = DTYPES[entry["dtype"]], list(entry["shape"])
    itemsize = dtype.itemsize
    start, end = entry["data_offsets"]
    if rows is not None:
        row_bytes = itemsize * shape[1]
        start, end = start + rows.start * row_bytes, start + rows.stop * row_bytes
        shape[0] = rows.stop - rows.start
    out = torch.empty(end - start, dtype=torch.uint8)
    fh.seek(base + start)
    view, done = memoryview(out.numpy()), 0
    while done < end - start:
        got = fh.readinto(view[done:])
        if not got:
            raise ModelError(f"{fh.name} ends inside a tensor; the file is truncated: copy or save the model again")
        done += got
    return out.view(dtype).view(shape) if out.numel() else torch.empty(shape, dtype=dtype)


def paged(fh, base: int, entry: dict) -> torch.Tensor | None:
    """The tensor ``entry`` of ``file`` as a private (copy-on-write) memory map of its bytes: a page is read from the
    file when it is touched and counts in the RSS only then; a write goes to the process's own copy of the page, never
    to the file. Its cached pages are dropped first and the map read at random (no read-around): Linux otherwise maps
    a whole cached large folio (up to 2 MiB) on a fault, where a lookup needs one row. None where it cannot be mapped
    (an empty tensor)."""
    dtype, shape = DTYPES[entry["dtype"]], tuple(entry["shape"])
    start, end = (base + offset for offset in entry["data_offsets"])
    if end == start:
        return None
    aligned = start - start % mmap.ALLOCATIONGRANULARITY
    if hasattr(os, "posix_fadvise"):
        os.posix_fadvise(fh.fileno(), start, end - start, os.POSIX_FADV_DONTNEED)
    pages = mmap.mmap(fh.fileno(), end - aligned, access=mmap.ACCESS_COPY, offset=aligned)  # (outlives fh)
    if hasattr(mmap, "MADV_RANDOM"):
        pages.madvise(mmap.MADV_RANDOM)
    count = (end - start) // dtype.itemsize
    return torch.frombuffer(pages, dtype=dtype, count=count, offset=start - aligned).view(shape)


def pageable_embedding(model: nn.Module, tied: dict[str, str]) -> str | None:
    """The state-dict key of the model's input embedding matrix (``get_input_embeddings().weight``) where no weight
    is tied to it (``tied``: target -> source), else None: a tied head reads every row each step, so its pages would
    all be resident anyway, fetched a page per fault."""
    get = getattr(model, "get_input_embeddings", None)
    embedding = get() if callable(get) else None
    for name, module in model.named_modules():
        if module is embedding and isinstance(module._parameters.get("weight"), nn.Parameter):
            key = f"{name}.weight" if name else "weight"
            return None if key in tied.values() else key
    return None


def read_float(fh, base: int, entry: dict, wanted: torch.dtype, page: bool) -> torch.Tensor:
    """A tensor that is not packed, cast to ``wanted`` when it is a float one; ``page``: mapped from the file
    (``paged``) where it is stored in ``wanted`` already."""
    if page and DTYPES[entry["dtype"]] == wanted:
        try:
            value = paged(fh, base, entry)
        except (OSError, ValueError):  # a file system that cannot map the file: read it as the other tensors
            value = None
        if value is not None:
            return value
    value = _read(fh, base, entry)
    return value.to(wanted) if value.is_floating_point() else value


def _files(folder: Path) -> list[Path]:
    """The safetensors files of a model directory, in the index's order (or the single file)."""
    index = folder / INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            names = list(dict.fromkeys(weight_map.values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ModelError(f"{index} is not a readable index ({exc}); the model files are damaged: save the model "
                             "again") from None
        files = [folder / name for name in names]
        if not all(f.is_file() for f in files):
            raise _FallBack("the index names a missing file")
        return files
    if (folder / SINGLE).is_file():
        return [folder / SINGLE]
    raise _FallBack("no safetensors weights")


# --------------------------------------------------------------------------- the skeleton
@contextlib.contextmanager
def _parameters_on_meta():
    """Build modules with their parameters on the meta device and their buffers real (accelerate's
    ``init_empty_weights(include_buffers=False)``): a buffer a constructor computes (rotary ``inv_freq``) is made
    as the constructor makes it; no parameter is allocated or initialised."""
    register = nn.Module.register_parameter

    def on_meta(module, name, param):
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def _skeleton(config, dtype: torch.dtype, attn_implementation: str | None) -> nn.Module:
    from transformers import AutoModelForCausalLM

    kw = {"attn_implementation": attn_implementation} if attn_implementation else {}
    with _parameters_on_meta():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, **kw)
    return model


def _matches(patterns, key: str) -> bool:
    return any(re.search(p, key) for p in patterns or ())


# --------------------------------------------------------------------------- packing
def _pack_rows(fh, base: int, entry: dict, fmt, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """``fmt.quantize`` of the [out, in] weight ``entry`` cast to ``dtype``, a block of rows at a time (each row is
    quantised on its own in every format, so the joined blocks are the whole weight's; nf4's double quantisation
    of the block constants runs once, over all of them)."""
    from lorakit.kernels.quantize import NF4Format, double_quantize

    out_f, in_f = entry["shape"]
    step = max(1, BLOCK_BYTES // (4 * max(1, in_f)))
    inner = NF4Format(fmt.block_size, False) if isinstance(fmt, NF4Format) and fmt.double_quant else fmt
    tensors: dict[str, torch.Tensor] = {}
    for start in range(0, out_f, step):  # each block's tensors copied into the whole weight's, allocated once
        stop = min(out_f, start + step)
        block = _read(fh, base, entry, slice(start, stop)).to(dtype)
        for name, tensor in inner.quantize(block).items():
            if name not in tensors:
                tensors[name] = tensor if stop == out_f else tensor.new_empty((out_f, *tensor.shape[1:]))
            if stop != out_f or start:
                tensors[name][start:stop] = tensor
        del block
    trim()
    if inner is not fmt:
        absmax = tensors.pop("absmax")
        q, factor, mean = double_quantize(absmax)
        tensors.update(absmax_q=q.view(absmax.shape), absmax_factor=factor, absmax_mean=mean)
    return tensors


def _set(model: nn.Module, key: str, value: torch.Tensor) -> None:
    """Put ``value`` in place of the parameter or buffer ``key`` (a parameter keeps its requires_grad)."""
    path, _, leaf = key.rpartition(".")
    module = model.get_submodule(path) if path else model
    if leaf in module._parameters:
        old = module._parameters[leaf]
        module._parameters[leaf] = nn.Parameter(value, requires_grad=old.requires_grad if old is not None else False)
    else:
        module._buffers[leaf] = value


def load_packed(folder: Path, config, quant, dtype: torch.dtype, attn_implementation: str | None = None):
    """The causal LM in ``folder`` with its frozen linears packed as ``quant`` says, read shard by shard (see the
    module docstring); ``None`` where this path does not apply (then load in full and pack)."""
    try:
        return _load_by_tensor(Path(folder), config, quant, dtype, attn_implementation)
    except _FallBack:
        return None


def load_widened(folder: Path, config, dtype: torch.dtype, attn_implementation: str | None = None):
    """The causal LM in ``folder`` with its float tensors stored narrower than ``dtype`` (a bf16 or fp16 model loaded
    with --base-dtype fp32) widened while they are read, one tensor in transit, as ``load_packed`` reads them
    (nothing packed, nothing paged). transformers' loader maps each shard and builds the wide copy from the map, whose
    touched pages count in the process's RSS until the shard is done: a bf16 TinyLlama-1.1B in one file peaked at
    6.69 GiB loading in fp32, 4.1 GiB of weights (benchmarks/results/big_models_quant.json). ``None`` where no float
    tensor is narrower than ``dtype`` (transformers' loader then holds no second copy) or this path does not apply."""
    try:
        folder = Path(folder)
        stored = {DTYPES[entry["dtype"]] for file in _files(folder) for entry in _header(file)[0].values()}
        if not any(t.is_floating_point and t.itemsize < dtype.itemsize for t in stored):
            return None
        return _load_by_tensor(folder, config, None, dtype, attn_implementation)
    except _FallBack:
        return None


# long: one pass over the shards' tensors (checked first, then read and packed in file order)
def _load_by_tensor(folder: Path, config, quant, dtype: torch.dtype, attn_implementation: str | None):
    from transformers.conversion_mapping import get_model_conversion_mapping

    from lorakit.adapters.quantize import _frozen_linears, tied_head_error
    from lorakit.adapters.storage import QuantizedLinear
    from lorakit.module_kinds import linear_shape

    files = _files(folder)
    fmt = quant.make() if quant is not None else None
    model = _skeleton(config, dtype, attn_implementation)
    if get_model_conversion_mapping(model, None, None, add_legacy=False):
        raise _FallBack("transformers renames this architecture's checkpoint keys")
    if getattr(model, "_keep_in_fp32_modules", None) or getattr(model, "_keep_in_fp32_modules_strict", None):
        raise _FallBack("modules kept in fp32")
    packed: dict[str, nn.Module] = {}
    for name, module in (_frozen_linears(model, quant.quantize_head) if quant is not None else []):
        fmt.check(linear_shape(module)[0], name)
        packed[name] = module
    tied = dict(getattr(model, "all_tied_weights_keys", None) or {})  # target -> source
    for target in tied:
        if target.rpartition(".")[0] in packed:  # a head tied to the embedding, with quantize_head
            raise tied_head_error(target.rpartition(".")[0])
    expected = set(model.state_dict())  # parameters and persistent buffers
    embedding = pageable_embedding(model, tied) if quant is not None else None  # (the plan pages it for a packed base)
    non_persistent = {k for k, _ in model.named_buffers()} - expected
    layout = {k: (list(t.shape), t.dtype) for k, t in [*model.state_dict().items(), *model.named_buffers()]}
    headers = [(file, *_header(file)) for file in files]
    where: dict[str, Path] = {}
    for file, entries, _ in headers:
        for key in entries:
            where.setdefault(key, file)
    if not expected & where.keys():
        raise _FallBack("the files' keys are not the model's")
    ignore_unexpected = getattr(model, "_keys_to_ignore_on_load_unexpected", None)
    for key, file in where.items():
        if key not in expected and key not in non_persistent and not _matches(ignore_unexpected, key):
            raise ModelError(f"{file} holds {key}, which a {type(model).__name__} of this config.json does not have; "
                             "the weights belong to another model or config: save the model again")
    ignore_missing = getattr(model, "_keys_to_ignore_on_load_missing", None)
    for key in sorted(expected - where.keys() - tied.keys()):
        if not _matches(ignore_missing, key):
            raise ModelError(f"{key} is missing from the weights in {folder} ({', '.join(f.name for f in files)}); "
                             "the model files are incomplete: copy or save the model again")
    for file, entries, base in headers:
        with open(file, "rb", buffering=0) as fh:
            for key, entry in sorted(entries.items(), key=lambda kv: kv[1]["data_offsets"][0]):
                if where[key] != file or key not in expected or key in tied:  # (a stored non-persistent buffer, e.g.
                    # an old rotary inv_freq: the constructor's own is kept, as from_pretrained keeps it)
                    continue
                path, _, leaf = key.rpartition(".")
                targets = [path] if path in packed and leaf == "weight" else []
                if targets and len(entry["shape"]) != 2:
                    raise ModelError(f"{key} in {file} has shape {entry['shape']}, not a 2-D weight; the file is damaged")
                for target in targets:
                    module = packed.pop(target)
                    in_f, out_f = linear_shape(module)
                    if list(entry["shape"]) != ([out_f, in_f] if isinstance(module, nn.Linear) else [in_f, out_f]):
                        raise ModelError(f"{key} in {file} has shape {entry['shape']}; {target} of this config.json "
                                         f"takes [{out_f}, {in_f}]: the weights belong to another config")
                    if isinstance(module, nn.Linear):
                        tensors = _pack_rows(fh, base, entry, fmt, dtype)
                    else:  # a GPT-2 Conv1D stores [in, out]: the whole weight, transposed
                        tensors = fmt.quantize(_read(fh, base, entry).to(dtype).t().contiguous())
                    parent, _, child = target.rpartition(".")
                    owner = model.get_submodule(parent) if parent else model
                    setattr(owner, child, QuantizedLinear(in_f, out_f, fmt, tensors, module.bias, dtype))
                if path in targets:
                    continue  # the packed layer's own weight: no float copy is kept
                shape, wanted = layout[key]
                if list(entry["shape"]) != shape:
                    raise ModelError(f"{key} in {file} has shape {entry['shape']}; this config.json's model takes "
                                     f"{shape}: the weights belong to another config")
                _set(model, key, read_float(fh, base, entry, wanted, page=key == embedding))
    if packed:
        raise ModelError(f"{next(iter(packed))}.weight is missing from the weights in {folder}; the model files are "
                         "incomplete: copy or save the model again")
    _tie(model, tied)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type == "meta"]
    if left:
        raise ModelError(f"{left[0]} is missing from the weights in {folder} ({', '.join(f.name for f in files)}); the "
                         "model files are incomplete: copy or save the model again")
    model.config.name_or_path = str(folder)
    _generation_config(model, folder)
    model.eval()
    return model


def _tie(model: nn.Module, tied: dict[str, str]) -> None:
    """Tie each target weight to its source (the output embedding to the input one), as transformers does after
    loading (a tied head is never packed: ``load_packed`` refuses ``quantize_head`` for it)."""
    for target, source in tied.items():
        path, _, leaf = target.rpartition(".")
        module = model.get_submodule(path) if path else model
        src_path, _, src_leaf = source.rpartition(".")
        src_module = model.get_submodule(src_path) if src_path else model
        setattr(module, leaf, getattr(src_module, src_leaf))


def _generation_config(model: nn.Module, folder: Path) -> None:
    """The folder's generation_config.json, as ``from_pretrained`` reads it (the config's defaults without one)."""
    if not (folder / "generation_config.json").is_file() or not hasattr(model, "generation_config"):
        return
    from transformers import GenerationConfig

    with contextlib.suppress(OSError, ValueError):
        model.generation_config = GenerationConfig.from_pretrained(folder)
