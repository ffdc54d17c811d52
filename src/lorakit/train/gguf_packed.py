"""A GGUF model stays quantised (issue 29): its linear weights' blocks re-packed into lorakit's formats per tensor.

The block types that are exactly one of lorakit's formats, and their re-packing: ``train.gguf_blocks``.

``QuantSpec.gguf_layout`` (no format asked for) takes the file's own layout (``resolve_quant``): int4 g32 when a
linear weight (a 2-D ``blk.*`` tensor) is Q4_0/Q4_1/Q4_K, int8 g32 when one is Q8_0 for --base-dtype int8.

The packed model is cached next to the bf16 conversion (``<conversion>.packed-<format>`` under ``cache_dir()``):
one safetensors file holding each packed linear's tensors under its ``QuantizedLinear`` buffer names
(``model.layers.0.self_attn.q_proj.qweight`` / ``.scale`` / ``.zero``) and the other tensors as the bf16 conversion
stores them, with its config, tokenizer and the source file's record; written tensor by tensor once, reused while
the GGUF is the same (``gguf_cache._reusable``); loading it fills the ``QuantizedLinear`` buffers directly.
"""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lorakit.errors import ModelError
from lorakit.train.safetensors_layout import header_bytes
from lorakit.train.gguf_blocks import maps_exactly, repack, row_permutation

INT4_TYPES = ("Q4_0", "Q4_1", "Q4_K")
INT8_TYPES = {"Q8_0": 32, "Q6_K": 16}
PACKED_FILE = "model.safetensors"


# ---------------------------------------------------------------------- the file's tensor table
def tensor_types(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """{GGUF tensor name: (GGML type name, dims as the file lists them)}, read from the header alone (the
    metadata's arrays skipped, no vocabulary parsed)."""
    from gguf.constants import GGMLQuantizationType

    from lorakit.train.gguf_cache import _Header

    out: dict[str, tuple[str, tuple[int, ...]]] = {}
    with open(path, "rb") as fh:
        import os

        h = _Header(fh, os.fstat(fh.fileno()).st_size)
        h.read(4)
        h.unpack("I")
        n_tensors, n_kv = h.unpack("Q"), h.unpack("Q")
        for _ in range(n_kv):
            h.string()
            h.value(h.unpack("I"))
        for _ in range(n_tensors):
            name = h.string().decode("utf-8", "replace")
            dims = tuple(h.unpack("Q") for _ in range(h.unpack("I")))
            ttype, _ = h.unpack("I"), h.unpack("Q")
            try:
                out[name] = (GGMLQuantizationType(ttype).name, dims)
            except ValueError:
                out[name] = (f"type {ttype}", dims)
    return out


def _linear_types(path: Path) -> dict[str, int]:
    """{type name: number of 2-D ``blk.*`` tensors (the blocks' linear weights)} of a GGUF."""
    counts: dict[str, int] = {}
    for name, (ttype, dims) in tensor_types(path).items():
        if name.startswith("blk.") and len(dims) == 2:
            counts[ttype] = counts.get(ttype, 0) + 1
    return counts


def resolve_quant(quant, model_spec: str | None):
    """``quant`` made concrete for ``model_spec`` (``QuantSpec.gguf_layout``): the GGUF's own layout where its linear
    weights have one (int4 g32 for Q4_0/Q4_1/Q4_K, int8 g32 for Q8_0), else the spec's format fields."""
    if not quant.gguf_layout:
        return quant
    plain = replace(quant, gguf_layout=False)
    from lorakit.train.model_sources import gguf_file

    path = gguf_file(model_spec) if model_spec else None
    if path is None or not path.is_file():
        return plain
    try:
        counts = _linear_types(path)
    except Exception:  # a damaged header: the load refuses it with its own message  # noqa: BLE001
        return plain
    total = sum(counts.values())
    if quant.bits == 4:
        found = [t for t in INT4_TYPES if counts.get(t)]
        if not found:
            return plain
        kept = sum(counts[t] for t in found)
        source = "/".join(found) + " blocks" + ("" if kept == total else f" on {kept} of {total} weights")
        return replace(plain, format="int4", group_size=32, double_quant=False, source=source)
    if counts.get("Q8_0"):
        kept = counts["Q8_0"]
        return replace(plain, int8_group=32, source="Q8_0 blocks" + ("" if kept == total else f" on {kept} of {total} weights"))
    return plain


# ---------------------------------------------------------------------- writing the packed cache
PACKED_CACHE_VERSION = 1  # raised when the packing changes: a cache of another version is not read


def packed_dir(folder: Path, quant, dtype: torch.dtype = torch.bfloat16) -> Path:
    """The packed cache of a GGUF's bf16 conversion ``folder`` for ``quant``'s format, its weights (those not packed
    exactly from their blocks are quantised from ``dtype`` values) and this packing's version."""
    fmt = quant.make()
    tag = f"{fmt.name}-g{getattr(fmt, 'group_size', None) or getattr(fmt, 'block_size', None) or 'ch'}"
    tag += "-dq" if getattr(fmt, "double_quant", False) else ""
    tag += "-head" if quant.quantize_head else ""
    tag += f"-{str(dtype).removeprefix('torch.')}"
    return folder.parent / f"{folder.name}.packed-{tag}-v{PACKED_CACHE_VERSION}"


# long: one pass over the file's tensors, each packed exactly or re-quantised and appended, in file order
def _write_packed(gguf_path: Path, folder: Path, tmp: Path, quant, dtype: torch.dtype) -> None:
    """The packed cache into ``tmp``: one tensor in memory at a time (their bytes appended to a data file, the
    safetensors header written before them at the end)."""
    from lorakit.adapters.quantize import _frozen_linears
    from lorakit.train.gguf_cache import SOURCE_FILE, file_sha256, gguf_fingerprint
    from lorakit.train.gguf_convert import _values, dequantized, plan, read_gguf, streams

    fmt = quant.make()
    gg = read_gguf(gguf_path)
    if not streams(gg):
        raise _NotPacked
    gg.tokenizer = None
    planned = plan(gg)
    linears = {name for name, _ in _frozen_linears(gg.model, quant.quantize_head)}
    written: list[tuple] = []  # (name, dtype, shape, bytes) in file order
    exact = requantised = 0
    data = tmp / "data.bin"
    with open(gguf_path, "rb", buffering=0) as src, open(data, "wb") as out:
        def put(key: str, t: torch.Tensor) -> None:
            t = t.contiguous()
            n = t.numel() * t.element_size()
            written.append((key, t.dtype, t.shape, n))
            if n:
                out.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))

        for p in planned:
            module, _, leaf = p.name.rpartition(".")
            if module not in linears or leaf != "weight" or len(p.shape) != 2:
                put(p.name, _values(src, gg, p))
                continue
            rows, cols = p.shape
            ttype = p.source.tensor_type.name
            perm = row_permutation(gg.processor, p.source.name, rows) if maps_exactly(ttype, fmt) else None
            if perm is not None and tuple(p.source.shape)[0] == rows:
                raw = np.empty(p.source.n_bytes, np.uint8)
                src.seek(p.source.data_offset)
                view, done = memoryview(raw), 0
                while done < p.source.n_bytes:  # (one read returns at most ~2 GiB on Linux)
                    got = src.readinto(view[done:])
                    if not got:
                        raise ValueError(f"tensor {p.source.name} ends past the end of the file")
                    done += got
                tensors = repack(raw, ttype, rows, cols)
                if not np.array_equal(perm, np.arange(rows)):
                    index = torch.from_numpy(perm)
                    tensors = {k: v.index_select(0, index) for k, v in tensors.items()}
                exact += 1
            else:  # dequantised, fixed, cast to the base dtype, quantised: as a model directory is packed
                values = gg.processor.process(weights=dequantized(src, p.source), name=p.source.name).weights
                tensors = fmt.quantize(torch.from_numpy(np.ascontiguousarray(values)).to(dtype))
                requantised += 1
            for k, v in tensors.items():
                put(f"{module}.{k}", v)
    with open(tmp / PACKED_FILE, "wb") as fh, open(data, "rb") as body:
        fh.write(header_bytes(written, {"lorakit_format": quant.describe(), "lorakit_kept": str(exact)}))
        shutil.copyfileobj(body, fh, 1 << 22)
    data.unlink()
    for f in folder.iterdir():  # config, generation config, tokenizer: the bf16 conversion's
        if f.is_file() and not f.name.endswith(".safetensors") and f.name not in (SOURCE_FILE, "model.safetensors.index.json"):
            shutil.copyfile(f, tmp / f.name)
    source = {"path": str(gguf_path.resolve()), "size": gguf_path.stat().st_size,
              "fingerprint": gguf_fingerprint(gguf_path), "sha256": file_sha256(gguf_path),
              "format": quant.describe(), "kept": exact, "requantised": requantised, "checked": []}
    (tmp / SOURCE_FILE).write_text(json.dumps(source, indent=2))


class _NotPacked(Exception):
    """This GGUF is not converted tensor by tensor (``gguf_convert.streams``): packed the model directory's way."""


def _packed_cache(gguf_path: Path, folder: Path, quant, dtype: torch.dtype) -> Path | None:
    from lorakit.files import OutputError, write_directory
    from lorakit.train.gguf_cache import _cache_error, _CacheLock, _reusable

    target = packed_dir(folder, quant, dtype)
    if _reusable(target, gguf_path):
        return target
    with _CacheLock(target, gguf_path):
        if _reusable(target, gguf_path):
            return target
        stale = target.exists()
        print(f"lorakit: packing {gguf_path} ({quant.describe()}) once into {target}", file=sys.stderr, flush=True)
        try:
            write_directory(target, lambda tmp: _write_packed(gguf_path, folder, Path(tmp), quant, dtype), replace=stale)
        except _NotPacked:
            return None
        except OutputError as exc:
            if _reusable(target, gguf_path):
                return target
            reason = str(exc).split("; what was there before", 1)[0].rsplit(": ", 1)[-1]
            raise _cache_error(gguf_path, reason) from None
    return target


# ---------------------------------------------------------------------- loading
def load_gguf_packed(gguf_path: Path, folder: Path, config, quant, dtype: torch.dtype,
                     attn_implementation: str | None = None):
    """The causal LM of a GGUF with its frozen linears packed as ``quant`` says, from its packed cache (written once);
    None where no linear weight of the file maps exactly onto the format (then the bf16 conversion is packed, as a
    model directory is) or the file is not converted tensor by tensor."""
    fmt = quant.make()
    if not any(maps_exactly(t, fmt) for t in _linear_types(gguf_path)):
        return None
    from lorakit.adapters.quantize import _frozen_linears, tied_head_error
    from lorakit.module_kinds import linear_shape
    from lorakit.train.quantized_load import _skeleton

    model = _skeleton(config, dtype, attn_implementation)  # checked before anything is written
    packed: dict[str, nn.Module] = {}
    for name, module in _frozen_linears(model, quant.quantize_head):
        fmt.check(linear_shape(module)[0], name)
        packed[name] = module
    tied = dict(getattr(model, "all_tied_weights_keys", None) or {})
    for target in tied:
        if target.rpartition(".")[0] in packed:
            raise tied_head_error(target.rpartition(".")[0])
    if getattr(model, "_keep_in_fp32_modules", None) or getattr(model, "_keep_in_fp32_modules_strict", None):
        return None
    target = _packed_cache(Path(gguf_path), Path(folder), quant, dtype)
    if target is None:
        return None
    return _fill(model, target, packed, tied, fmt, dtype)


def _fill(model: nn.Module, target: Path, packed: dict[str, nn.Module], tied: dict[str, str], fmt,
          dtype: torch.dtype) -> nn.Module:
    """Read the packed cache into the meta skeleton: each packed linear's buffers as stored, the rest cast to the
    skeleton's dtype."""
    from lorakit.adapters.storage import QuantizedLinear
    from lorakit.module_kinds import linear_shape
    from lorakit.train.quantized_load import (_generation_config, _header, _read, _set, _tie, pageable_embedding,
                                              read_float)

    file = target / PACKED_FILE
    entries, base = _header(file)
    layout = {k: t.dtype for k, t in model.state_dict().items()}
    embedding = pageable_embedding(model, tied)  # paged from the cache file, as quantized_load pages it
    names = {n: tuple(fmt.quantize(torch.zeros(1, linear_shape(m)[0]))) for n, m in packed.items()}
    parts: dict[str, dict[str, torch.Tensor]] = {}
    with open(file, "rb", buffering=0) as fh:
        for key, entry in sorted(entries.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            path, _, leaf = key.rpartition(".")
            if path in packed and leaf in names[path]:
                parts.setdefault(path, {})[leaf] = _read(fh, base, entry)
                if set(parts[path]) == set(names[path]):
                    module = packed.pop(path)
                    in_f, out_f = linear_shape(module)
                    got = parts.pop(path)
                    tensors = {k: got[k] for k in names[path]}
                    if tensors["qweight"].shape[0] != out_f:
                        raise ModelError(f"{file}: {key} does not fit {path} of this config.json; delete {target}")
                    parent, _, child = path.rpartition(".")
                    owner = model.get_submodule(parent) if parent else model
                    setattr(owner, child, QuantizedLinear(in_f, out_f, fmt, tensors, module.bias, dtype))
                continue
            if key not in layout:
                raise ModelError(f"{file} holds {key}, which this config.json's model does not have; delete {target}")
            _set(model, key, read_float(fh, base, entry, layout[key], page=key == embedding))
    if packed:
        raise ModelError(f"{next(iter(packed))} is missing from {file}; the cache is incomplete: delete {target}")
    _tie(model, tied)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type == "meta"]
    if left:
        raise ModelError(f"{left[0]} is missing from {file}; the cache is incomplete: delete {target}")
    model.config.name_or_path = str(target)
    _generation_config(model, target)
    model.eval()
    return model
