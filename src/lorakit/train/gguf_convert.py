"""Converting a GGUF file into a bf16 safetensors model directory, one tensor at a time.

transformers reads a GGUF by dequantising every tensor into one fp32 state dict and building the whole model from
it: a 4 GB Q4 file of a 7B model costs ~27 GB of memory, and saving it ~27 GB of disk. This module writes the same
weights tensor by tensor instead (llama.cpp's gguf-py writer in reverse):

    for each tensor of the file (read into a buffer of its own, not touched through a memory map):
        dequantise it alone (``gguf.quants.dequantize``, a bounded number of rows at a time)
        apply transformers' own per-tensor fix (``TENSOR_PROCESSORS``: the Llama q/k reverse permutation, the
            Gemma/Nemotron norm offset, ...) and its GGUF -> HF name (``get_gguf_hf_weights_map``)
        cast it to bfloat16 and append its bytes to the safetensors shard it was planned into

so the peak memory is one tensor (its quantised bytes, its fp32 values and its bf16 copy), whatever the model's size.
The shard layout (names, shapes, offsets) is planned from the file's tensor table and the model's shapes (a model
built on the meta device) before any value is read, so every header is written first and every tensor streamed
after it; shards hold at most ``MAX_SHARD_BYTES`` each, with ``model.safetensors.index.json`` beside them when there
is more than one.

Storage precision: bfloat16, except the tensors the file itself stores as F32, which are kept F32. llama.cpp stores
norms and biases so: they are a fraction of a percent of a model and the weights most sensitive to rounding (a Gemma
norm is stored as ``w + 1``), and transformers' newer GGUF loader keeps them in the file's type up to its last step
for that reason. (So a file written all in F32 gives an fp32 copy, the file's own size.) Every tensor written equals the one ``AutoModelForCausalLM.from_pretrained(dir, gguf_file=name, dtype=torch.float32)``
builds, rounded to its stored dtype (``tests/train/test_gguf_convert.py`` checks this and the logits).

The config, generation config and tokenizer come from transformers' GGUF parsing, as its own load would make them;
tied embeddings (no ``output.weight`` in the file) are left to the config's ``tie_word_embeddings``, as there.
Architectures whose per-tensor fix is not one tensor in, one tensor out (transformers' MoE and GPT-2 processors) and
those transformers reads through its newer GGUF loader are loaded whole by transformers at bfloat16 and saved.
"""

from __future__ import annotations

import functools
import gc
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from lorakit.train.safetensors_layout import header_bytes

STORAGE_DTYPE = torch.bfloat16
MAX_SHARD_BYTES = 2 * 1024**3  # as transformers' save_pretrained shards (its default is 50 GB; 2 GB suits a cache)
DEQUANT_CHUNK_ELEMS = 1 << 22  # rows dequantised at a time: 16 MB of fp32 temporaries, not the tensor's several copies
# transformers' processors that turn one GGUF tensor into one tensor of the same name (the others write into the
# state dict themselves: experts merged, GPT-2's output renamed)
ONE_TO_ONE = ("TensorProcessor", "LlamaTensorProcessor", "Gemma2TensorProcessor", "NemotronTensorProcessor",
              "BloomTensorProcessor", "MambaTensorProcessor", "Lfm2TensorProcessor")


@dataclass(frozen=True)
class Planned:
    """One tensor of the output: where it comes from in the GGUF, what it is called and how it is stored."""

    source: TensorInfo
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


class TensorInfo(NamedTuple):
    """Where one tensor lies in the file and how it is stored (from gguf.ReaderTensor, without the reader: a reader
    keeps every metadata value, a vocabulary's tokens included, as numpy views)."""

    name: str
    tensor_type: Any  # gguf.GGMLQuantizationType
    dtype: np.dtype  # the element type gguf-py reads its bytes as (uint8 for quantised blocks)
    shape: tuple[int, ...]  # the shape gguf-py reads its bytes in (rows x bytes per row for quantised blocks)
    n_bytes: int
    data_offset: int  # from the start of the file


@dataclass
class GgufModel:
    """What transformers parses from a GGUF's metadata, before any tensor is read."""

    path: Path
    architecture: str  # the file's general.architecture
    config: Any  # the transformers config
    tokenizer: Any
    processor: Any  # transformers' TensorProcessor for the architecture
    model: Any  # the model built on the meta device: its parameter names and shapes, no memory
    tensors: list[TensorInfo]  # the file's tensor table, in file order


def read_gguf(path: Path) -> GgufModel:
    """Parse a GGUF's config and tokenizer the way ``from_pretrained(dir, gguf_file=name)`` does, and build the model
    on the meta device. Raises what transformers raises for a file it cannot read (an unsupported architecture: a
    ValueError). The file's header is parsed three times (its tensor table, the config, the tokenizer), as
    transformers' own load parses it: each parse of a 49k-token vocabulary takes seconds."""
    from gguf import GGUFReader
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import (TENSOR_PROCESSORS, TensorProcessor, load_gguf_checkpoint,
                                                          read_field)

    reader = GGUFReader(path)
    architecture = read_field(reader, "general.architecture")[0] if "general.architecture" in reader.fields else ""
    tensors = [TensorInfo(t.name, t.tensor_type, t.data.dtype, tuple(t.data.shape), int(t.n_bytes), int(t.data_offset))
               for t in reader.tensors]
    del reader  # before transformers parses the header again: each parse holds ~150 MB for a 49k-token vocabulary
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if _newer_loader(architecture):
            config, processor = AutoConfig.from_pretrained(path.parent, gguf_file=path.name), None
        else:  # what AutoConfig.from_pretrained(gguf_file=) builds, from the one parse the processors need too
            parsed = load_gguf_checkpoint(str(path), return_tensors=False)["config"]
            config = AutoConfig.for_model(**parsed)
            processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=parsed)
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    return GgufModel(path, architecture, model.config, tokenizer, processor, model, tensors)


def _newer_loader(architecture: str) -> bool:
    """Whether transformers (>= 5.2x) reads this architecture (qwen35, lfm2) through its newer GGUF loader."""
    try:
        from transformers.integrations.gguf.utils import is_gguf_arch_supported
    except ImportError:
        return False
    return is_gguf_arch_supported(architecture)


def streams(gguf: GgufModel) -> bool:
    """Whether the file can be converted tensor by tensor (``convert``), or is loaded whole (``convert_whole``)."""
    return gguf.processor is not None and type(gguf.processor).__name__ in ONE_TO_ONE


def plan(gguf: GgufModel) -> list[Planned]:
    """The output tensors in file order: each GGUF tensor transformers would load, under its model name, with the
    model's shape for it; the stored dtype is F32 for an F32 tensor of the file, bfloat16 otherwise. A tensor that
    maps to no model parameter is left out, as transformers leaves it out."""
    from gguf import GGMLQuantizationType

    names = _weights_map(gguf)
    shapes = {name: tuple(t.shape) for name, t in gguf.model.state_dict().items()}
    planned, seen = [], set()
    for tensor in gguf.tensors:
        name = names.get(tensor.name)
        if name is None:
            continue
        if name in seen:
            raise ValueError(f"two tensors of the file map to {name}")
        seen.add(name)
        keep = tensor.tensor_type == GGMLQuantizationType.F32
        planned.append(Planned(tensor, name, shapes[name], torch.float32 if keep else STORAGE_DTYPE))
    _check_complete(gguf.model, seen)
    return planned


def _check_complete(model, found: set[str]) -> None:
    """Refuse a file that holds no tensor for some weight of the model (a tied weight counts as found through its
    twin): transformers would initialise it at random, and the conversion would train on noise."""
    names_of: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names_of.setdefault(id(p), []).append(name)
    missing = sorted(ns[0] for ns in names_of.values() if not found.intersection(ns))
    if missing:
        shown = ", ".join(missing[:3]) + (" ..." if len(missing) > 3 else "")
        raise ValueError(f"the file holds no tensor for {len(missing)} weight(s) of the model ({shown}); it is "
                         "incomplete, or its tensors are named for another architecture")


def _weights_map(gguf: GgufModel) -> dict[str, str]:
    """transformers' GGUF -> model name map (``get_gguf_hf_weights_map``), with gguf-py's name table built once:
    the function builds it again for every submodule it recurses into, 15 s for a 30-layer model instead of 0.05."""
    import gguf as gguf_py
    from transformers.modeling_gguf_pytorch_utils import get_gguf_hf_weights_map

    build = gguf_py.get_tensor_name_map
    gguf_py.get_tensor_name_map = functools.cache(build)  # the function imports it from gguf when called
    try:
        return get_gguf_hf_weights_map(gguf.model, gguf.processor)
    finally:
        gguf_py.get_tensor_name_map = build


def shards(planned: list[Planned], max_bytes: int | None = None) -> list[tuple[str, list[Planned]]]:
    """Consecutive tensors grouped into files of at most ``max_bytes`` (a larger tensor alone in its file), named as
    save_pretrained names them: model.safetensors, or model-0000i-of-0000n.safetensors."""
    max_bytes = MAX_SHARD_BYTES if max_bytes is None else max_bytes
    groups: list[list[Planned]] = []
    size = 0
    for p in planned:
        if not groups or (size + p.nbytes > max_bytes and groups[-1]):
            groups.append([])
            size = 0
        groups[-1].append(p)
        size += p.nbytes
    if len(groups) <= 1:
        return [("model.safetensors", groups[0] if groups else [])]
    return [(f"model-{i:05d}-of-{len(groups):05d}.safetensors", g) for i, g in enumerate(groups, 1)]


def _header(group: list[Planned]) -> bytes:
    """The safetensors header for the tensors in order (``safetensors_layout.header_bytes``)."""
    return header_bytes((p.name, p.dtype, p.shape, p.nbytes) for p in group)


def dequantized(fh, tensor: TensorInfo) -> np.ndarray:
    """One GGUF tensor's values as fp32 (as ``gguf.quants.dequantize(tensor.data, tensor.tensor_type)`` gives them),
    read into a buffer of its own rather than through the file's memory map, whose touched pages would stay in this
    process's resident memory until the map is closed.
    A quantised tensor is dequantised a bounded number of rows at a time into one fp32 array."""
    from gguf import GGML_QUANT_SIZES, dequantize

    raw = np.empty(tensor.n_bytes, np.uint8)
    fh.seek(tensor.data_offset)
    if fh.readinto(raw) != tensor.n_bytes:
        raise ValueError(f"tensor {tensor.name} ends past the end of the file")
    data = raw.view(tensor.dtype).reshape(tensor.shape)
    block, block_bytes = GGML_QUANT_SIZES[tensor.tensor_type]
    if block == 1 or data.ndim == 0:
        return np.asarray(dequantize(data, tensor.tensor_type), np.float32)
    rows = data.reshape(-1, data.shape[-1])
    cols = data.shape[-1] // block_bytes * block
    out = np.empty((rows.shape[0], cols), np.float32)
    step = max(1, DEQUANT_CHUNK_ELEMS // max(cols, 1))
    for start in range(0, rows.shape[0], step):
        out[start:start + step] = dequantize(rows[start:start + step], tensor.tensor_type)
    return out.reshape(*data.shape[:-1], cols)


def _values(fh, gguf: GgufModel, p: Planned) -> torch.Tensor:
    """The tensor transformers would load for ``p`` (dequantised, fixed by its processor), cast to ``p.dtype``."""
    result = gguf.processor.process(weights=dequantized(fh, p.source), name=p.source.name)
    weights = result.weights
    if result.name != p.source.name or tuple(weights.shape) != p.shape:
        raise ValueError(f"tensor {p.source.name} is {tuple(weights.shape)} after transformers' fix, where the "
                         f"model's {p.name} is {p.shape}")
    return torch.from_numpy(np.ascontiguousarray(weights)).to(p.dtype)


def write_safetensors(gguf: GgufModel, out: Path, planned: list[Planned], max_bytes: int | None = None) -> None:
    """Write the planned tensors into safetensors shards in ``out``, one tensor in memory at a time."""
    files = shards(planned, max_bytes)
    with open(gguf.path, "rb", buffering=0) as src:
        for filename, group in files:
            with open(out / filename, "wb") as fh:
                fh.write(_header(group))
                for p in group:
                    values = _values(src, gguf, p)
                    fh.write(memoryview(values.reshape(-1).view(torch.uint8).numpy()))
                    del values
    if len(files) > 1:
        index = {"metadata": {"total_parameters": sum(int(np.prod(p.shape)) for p in planned),
                              "total_size": sum(p.nbytes for p in planned)},
                 "weight_map": {p.name: filename for filename, group in files for p in group}}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def write_metadata(gguf: GgufModel, out: Path) -> None:
    """config.json, generation_config.json and the tokenizer files, as save_pretrained writes them for the model
    transformers loads from the file, stored at bfloat16."""
    model = gguf.model
    model.config.dtype = str(STORAGE_DTYPE).split(".")[1]
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(out)
    if model.can_generate():
        model.generation_config.save_pretrained(out)
    gguf.tokenizer.save_pretrained(out)


def convert(gguf: GgufModel, out: Path, max_bytes: int | None = None) -> None:
    """Write the model directory of a parsed GGUF into ``out`` (an empty directory): tensor by tensor where
    ``streams(gguf)``, else through transformers' whole load (``convert_whole``)."""
    if not streams(gguf):
        convert_whole(gguf, out)
        return
    planned = plan(gguf)
    write_metadata(gguf, out)
    gguf.tokenizer = None  # written: its vocabulary need not stay in memory while the tensors are
    gc.collect()
    write_safetensors(gguf, out, planned, max_bytes)


def convert_whole(gguf: GgufModel, out: Path) -> None:
    """The architectures ``streams`` declines: transformers loads the whole model, at bfloat16, and saves it."""
    from transformers import AutoModelForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(gguf.path.parent, gguf_file=gguf.path.name, dtype=STORAGE_DTYPE)
    model.hf_quantizer = None  # a GGUF-loaded model refuses save_pretrained until its quantizer is cleared
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    gguf.tokenizer.save_pretrained(out)
