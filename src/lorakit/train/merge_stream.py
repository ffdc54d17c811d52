"""`lorakit merge` without the whole model in memory: the base model's safetensors are read one tensor at a time
(memory-mapped with ``safetensors.safe_open``) and the merged model is written shard by shard, tensor by tensor, as
llama.cpp's gguf-py writes GGUF files.

For each weight W of an adapted module (s, r, alpha per module: rank_pattern / alpha_pattern), computed in float32
(float64 for a float64 base) and stored back at the dtype the base stores W in (bf16 in, bf16 out):

    LoRA:  W' = W + s B A,                                 s = alpha / r, or alpha / sqrt(r) with rsLoRA
    DoRA:  W' = m * (W + s B A) / ||W + s B A||_row        one norm per output feature (the Dora variant's weight_norm, PEFT's)

Both are row by row, so W is merged in blocks of rows and never held whole in float32. A module trained whole
(modules_to_save, a classifier head) and a trained bias take the adapter's tensor; every other tensor is copied byte
for byte. The output keeps the base's shards (one output shard per base shard, each cut to at most
``MAX_SHARD_BYTES``; a new head goes into the last one), with model.safetensors.index.json when there are several.

Memory: the adapter, one block of rows in float32 and the pages of the one base tensor being merged (mapped while it
is read, unmapped after it); copied tensors go file to file through a small buffer, never through the process's
memory. What the stream cannot map exactly onto the checkpoint's tensors raises ``NotStreamable`` with the reason,
before anything is written; ``merge_adapter`` then merges in memory.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from lorakit.adapters import load_adapter, lora_layers
from lorakit.adapters.io import read_config, read_tensors
from lorakit.errors import LorakitError
from lorakit.train.safetensors_layout import header_bytes
from lorakit.train.stored_checkpoint import (DTYPES, FLOATS, INDEX_NAME, SINGLE_NAME, NotStreamable, Stored,
                                             read_checkpoint, storage_dtype)

MAX_SHARD_BYTES = 2 * 10**9  # an output shard holds at most this many bytes of tensors (2 GB), or one bigger tensor
BLOCK_ELEMENTS = 2**22  # rows merged at once: about this many elements (16 MiB in float32)
_COPY_BUFFER = 2**23  # bytes per read when a tensor is copied as stored


@dataclass
class _Lora:
    """W' = W + s B A (DoRA: m * (W + s B A) / ||W + s B A||_row) for one adapted module."""

    A: Tensor
    B: Tensor
    scale: float
    magnitude: Tensor | None
    fan_in_fan_out: bool  # W is stored [in, out] (GPT-2's Conv1D)


@dataclass
class _Out:
    """One tensor of the merged model: ``value`` (the adapter's), else ``source`` merged with ``lora``, else
    ``source`` copied as stored."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    source: Stored | None = None
    lora: _Lora | None = None
    value: Tensor | None = None

    @property
    def nbytes(self) -> int:
        if self.source is not None and self.value is None:
            return self.source.end - self.source.start  # as stored (merged: the same dtype and shape)
        return math.prod(self.shape) * DTYPES[self.dtype][1]


@dataclass
class MergePlan:
    """What ``write_merged`` writes: the output shards in order, config.json's text and the files copied as they are."""

    shards: list[list[_Out]]
    config_text: str
    copied: list[Path] = field(default_factory=list)


# ---------------------------------------------------------------------- planning
def _empty_model(base_dir: Path, task: str, labels: list[str] | None):
    """The task model of ``base_dir``'s config on the meta device: its parameter names and shapes, no weights."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    from lorakit.train.models import LOAD_ERRORS

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        config = AutoConfig.from_pretrained(base_dir)
        if getattr(config, "quantization_config", None):
            raise NotStreamable(f"{base_dir / 'config.json'} describes a quantized model")
        if task == "classify":
            config.num_labels = len(labels or [])
            config.id2label = dict(enumerate(labels or []))
            config.label2id = {n: i for i, n in enumerate(labels or [])}
        auto = AutoModelForSequenceClassification if task == "classify" else AutoModelForCausalLM
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return auto.from_config(config, dtype=torch.float32)
    except NotStreamable:
        raise
    except LOAD_ERRORS as exc:
        raise NotStreamable(f"transformers cannot build the {task} model of {base_dir} from its config "
                            f"({type(exc).__name__}: {str(exc)[:120]})") from None
    finally:
        hf_logging.set_verbosity(verbosity)


def _checkpoint_name(name: str, tensors: dict[str, Stored], prefix: str, bare: bool) -> str | None:
    """The checkpoint's name for the model's tensor ``name``: the same, or without the base model's prefix for a
    base saved bare (BertModel under BertForSequenceClassification), as transformers maps them."""
    if bare and name.startswith(prefix + "."):
        name = name[len(prefix) + 1:]
    return name if name in tensors else None


def adapter_changes(model, adapter: str | os.PathLike) -> tuple[dict[str, _Lora], dict[str, Tensor]]:
    """What ``adapter`` does to ``model`` (an empty, meta-device model of its base): {weight name: its LoRA
    (A, B, s, DoRA magnitude)} and {tensor name: the adapter's value} of modules trained whole (modules_to_save) and
    trained biases. The adapter is checked against the model as ``load_adapter`` checks it (its errors raised as
    they are); the model keeps the adapter attached."""
    try:
        load_adapter(model, adapter)  # on the empty model: the adapter's keys and shapes checked, its scales set
    except LorakitError:
        raise
    except (RuntimeError, NotImplementedError, ValueError, TypeError) as exc:
        raise NotStreamable(f"{adapter} cannot be attached to an empty model ({type(exc).__name__}: "
                            f"{str(exc)[:120]})") from None
    values, _ = read_tensors(adapter)
    merges: dict[str, _Lora] = {}
    for path, layer in lora_layers(model):
        name = layer.active
        merges[f"{path}.weight"] = _Lora(values.pop(f"{path}.lora_A.weight"), values.pop(f"{path}.lora_B.weight"),
                                         layer.settings[name].scale, values.pop(f"{path}.lora_magnitude_vector", None),
                                         layer.fan_in_fan_out)
    return merges, {k[: -len(".base_layer.bias")] + ".bias" if k.endswith(".base_layer.bias") else k: v
                    for k, v in values.items()}


def plan_merge(adapter: str | os.PathLike, base_dir: Path, task: str, labels: list[str] | None, tokenizer) -> MergePlan:
    """Map every tensor the merged model holds onto the base checkpoint and the adapter; raise NotStreamable (with
    the reason) where that is not exact. The adapter is checked against the model as ``load_adapter`` checks it
    (its errors are raised as they are)."""
    base_dir = Path(base_dir)
    stored = read_checkpoint(base_dir)
    if read_config(adapter).variant.rewrites_base:
        raise NotStreamable(f"{adapter} is a PiSSA adapter saved for the residual base (W - s B0 A0), not for {base_dir}")
    model = _empty_model(base_dir, task, labels)
    # The tensors save_pretrained writes: the state dict, a tied tensor once (under its first name).
    groups: dict[int, list[str]] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        groups.setdefault(id(tensor), []).append(name)
    names = {group[0]: group for group in groups.values()}
    shapes = {name: tuple(t.shape) for name, t in model.state_dict(keep_vars=True).items()}
    prefix = getattr(model, "base_model_prefix", "") or ""
    bare = bool(prefix) and not any(k.startswith(prefix + ".") for k in stored) \
        and any(k.startswith(prefix + ".") for k in names)

    merges, replaced = adapter_changes(model, adapter)
    _check_untied([*merges, *replaced], names)

    default_code = storage_dtype(stored) or "F32"
    by_file: dict[Path, list[_Out]] = {}
    new: list[_Out] = []
    for name in names:
        source = _checkpoint_name(name, stored, prefix, bare)
        if source is None:
            source = next((s for n in names[name][1:] if (s := _checkpoint_name(n, stored, prefix, bare))), None)
        src = stored[source] if source else None
        if src is not None and src.shape != shapes[name]:
            raise NotStreamable(f"{src.file.name}: {src.name} has shape {list(src.shape)}, the model's {name} "
                                f"{list(shapes[name])}")
        if name in replaced:
            value = replaced[name]
            out = _Out(name, src.dtype if src is not None and src.dtype in FLOATS else default_code, shapes[name],
                       source=src, value=value)  # (the source gives its place in the shards)
        elif src is None:
            raise NotStreamable(f"the checkpoint has no tensor for the model's {name} (renamed or fused in this "
                                "architecture's checkpoints, or a new head the adapter does not hold)")
        elif name in merges:
            if src.dtype not in FLOATS:
                raise NotStreamable(f"{src.name} is stored as {src.dtype}; an adapter merges into floating-point weights")
            out = _Out(name, src.dtype, src.shape, source=src, lora=merges[name])
        else:
            out = _Out(name, src.dtype, src.shape, source=src)
        if src is None:
            new.append(out)
        else:
            by_file.setdefault(src.file, []).append(out)
    layout = [sorted(outs, key=lambda o: o.source.start) for _, outs in sorted(by_file.items())]
    if new:
        layout = layout + [new] if not layout else layout[:-1] + [layout[-1] + new]
    return MergePlan(_cut(layout), _config_text(base_dir, model, task, tokenizer),
                     [base_dir / "generation_config.json"] if (base_dir / "generation_config.json").is_file() else [])


def _check_untied(changed: list[str], names: dict[str, list[str]]) -> None:
    """Each tensor the adapter changes is one tensor of the model (``names``: first name -> all names tied to it)."""
    for name in changed:
        owner = next((group for group in names.values() if name in group), None)
        if owner is None:
            raise NotStreamable(f"the adapter's tensor {name} is no tensor of the merged model")
        if len(owner) > 1:
            others = ", ".join(n for n in owner if n != name)
            raise NotStreamable(f"the adapter changes {name}, which the model ties to {others} (tied embeddings): "
                                "merged, both would change")


def _cut(layout: list[list[_Out]]) -> list[list[_Out]]:
    """Each base shard's tensors as one output shard, cut where it would pass MAX_SHARD_BYTES."""
    shards = []
    for outs in layout:
        shard: list[_Out] = []
        for out in outs:
            if shard and sum(o.nbytes for o in shard) + out.nbytes > MAX_SHARD_BYTES:
                shards.append(shard)
                shard = []
            shard.append(out)
        if shard:
            shards.append(shard)
    return shards


def _config_text(base_dir: Path, model, task: str, tokenizer) -> str:
    """The base's config.json as it is; a classifier's gets its class, label names and (where none) a pad token id,
    as the in-memory merge writes them."""
    text = (base_dir / "config.json").read_text()
    if task != "classify":
        return text
    doc = json.loads(text)
    doc["architectures"] = [type(model).__name__]
    doc["id2label"] = {str(i): n for i, n in model.config.id2label.items()}
    doc["label2id"] = dict(model.config.label2id)
    if doc.get("pad_token_id") is None and getattr(tokenizer, "pad_token_id", None) is not None:
        doc["pad_token_id"] = tokenizer.pad_token_id
    return json.dumps(doc, indent=2, sort_keys=True) + "\n"


# ---------------------------------------------------------------------- writing
def _header(shard: list[_Out]) -> bytes:
    """The safetensors header for ``shard``, in order (``safetensors_layout.header_bytes``)."""
    return header_bytes((out.name, out.dtype, out.shape, out.nbytes) for out in shard)


def _write_tensor(fh, tensor: Tensor) -> int:
    data = tensor.contiguous().reshape(-1).view(torch.uint8).numpy()
    fh.write(memoryview(data))
    return data.nbytes


def _copy(fh, src: Stored, buffer: memoryview) -> int:
    """Copy a tensor's bytes as stored, through ``buffer`` (the page cache, never this process's memory)."""
    left = src.end - src.start
    with open(src.file, "rb") as source:
        source.seek(src.start)
        while left:
            n = source.readinto(buffer[: min(len(buffer), left)])
            if not n:
                raise OSError(f"{src.file} ended inside {src.name}")
            fh.write(buffer[:n])
            left -= n
    return src.end - src.start


@torch.no_grad()
def merged_rows(source: Tensor, lora: _Lora, compute: torch.dtype = torch.float32):
    """W' of one weight (see the module docstring) in ``compute``, a block of rows at a time: yields each block of W'
    (for a fan-in-fan-out weight, stored [in, out], the whole W' transposed back to [in, out])."""
    a, b = lora.A.to(compute), lora.B.to(compute)
    m = None if lora.magnitude is None else lora.magnitude.to(compute)
    if lora.fan_in_fan_out:  # stored [in, out]: merged whole (GPT-2-sized layers)
        blocks = [(0, source.shape[1])]
    else:
        step = max(1, BLOCK_ELEMENTS // max(1, source.shape[1]))
        blocks = [(i, min(i + step, source.shape[0])) for i in range(0, source.shape[0], step)]
    for start, stop in blocks:
        base = source.t() if lora.fan_in_fan_out else source[start:stop]
        rows = b if lora.fan_in_fan_out else b[start:stop]
        # In place, one block: s (B A) as LoraLinear.delta_weight, + W (exactly W.float() + s B A), * g.
        merged = (rows @ a).mul_(lora.scale).add_(base)
        if m is not None:
            merged.mul_(((m if lora.fan_in_fan_out else m[start:stop]) / torch.linalg.vector_norm(merged, dim=1))[:, None])
        yield merged.t() if lora.fan_in_fan_out else merged
        del base, merged


def _merge(fh, out: _Out) -> int:
    """Write W' of ``out`` in blocks of rows, at the base's dtype; W is mapped only while it is read."""
    from safetensors import safe_open

    dtype = DTYPES[out.dtype][0]
    written = 0
    with safe_open(str(out.source.file), framework="pt") as f:
        w = f.get_tensor(out.source.name)
        for block in merged_rows(w, out.lora, torch.float64 if dtype == torch.float64 else torch.float32):
            written += _write_tensor(fh, block.to(dtype))
        del w
    return written


def write_merged(plan: MergePlan, folder: Path, tokenizer) -> None:
    """Write the planned model into ``folder``: shards (and their index), config.json, the files copied as they are
    (generation_config.json) and the tokenizer."""
    folder = Path(folder)
    count = len(plan.shards)
    names = [SINGLE_NAME] if count == 1 else [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
    buffer = memoryview(bytearray(_COPY_BUFFER))
    weight_map: dict[str, str] = {}
    for shard, name in zip(plan.shards, names):
        with open(folder / name, "wb") as fh:
            fh.write(_header(shard))
            for out in shard:
                if out.value is not None:
                    done = _write_tensor(fh, out.value.to(DTYPES[out.dtype][0]))
                elif out.lora is not None:
                    done = _merge(fh, out)
                else:
                    done = _copy(fh, out.source, buffer)
                if done != out.nbytes:  # the header promised out.nbytes
                    raise LorakitError(f"{out.name}: wrote {done:,} bytes, expected {out.nbytes:,}")
                weight_map[out.name] = name
    if count > 1:
        total = sum(o.nbytes for shard in plan.shards for o in shard)
        params = sum(math.prod(o.shape) for shard in plan.shards for o in shard)
        index = {"metadata": {"total_parameters": params, "total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (folder / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    (folder / "config.json").write_text(plan.config_text)
    for path in plan.copied:
        shutil.copyfile(path, folder / path.name)
    tokenizer.save_pretrained(folder)
