"""The base with the adapter merged, as one GGUF model file (``llama-cli -m model.gguf``; Ollama's ``FROM``).

Each weight W an adapter changes is written as W' = W + s B A (DoRA: m (W + s B A) / ||W + s B A||_row), computed
in float32 (``merge_stream.merged_rows``, the same code as ``lorakit merge``), then encoded in ``--outtype``; every
other tensor is re-encoded (or copied byte for byte when it is already in the type asked for). One tensor is in
memory at a time.

- A GGUF base (a built-in, a user's .gguf): the base file is the template. Its key-values (architecture,
  hyperparameters, tokenizer, chat template: everything llama.cpp and Ollama read) are copied as they are, except
  the name, the file type and the quantization version; its tensors are written in its order, each dequantised
  from its stored type, merged in the Hugging Face row order (query/key rows un-permuted, then permuted back) and
  encoded. An adapted output head of a base that ties it to the token embeddings becomes an ``output.weight`` of
  its own (llama.cpp uses it when present), the embeddings left as they are.
- A Hugging Face model directory: its safetensors are read tensor by tensor (``merge_stream.plan_merge``), named
  and laid out as llama.cpp's converter does (``layout.GgufNames``), and the key-values are written from its
  config and tokenizer (``hf_metadata``; Llama 3's rope scaling as the ``rope_freqs.weight`` tensor llama.cpp reads,
  Phi-3's longrope as ``rope_factors_long/short.weight``). Phi-3's fused ``qkv_proj`` and ``gate_up_proj`` (gate
  rows, then up rows) are llama.cpp's ``attn_qkv`` and ``ffn_up`` as they are, merged like any other weight.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from lorakit.errors import ExportError
from lorakit.export.layout import GgufNames, gguf_layout
from lorakit.export.writer import Planned, encode, file_type_of, tensor_qtype, write_gguf

# Key-values of the base file not copied: the reader's own (GGUF.*), what the writer sets, what this export changes.
NOT_COPIED = ("GGUF.", "general.architecture", "general.file_type", "general.quantization_version",
              "general.alignment", "general.name")


def _merged(values: torch.Tensor, lora) -> torch.Tensor:
    from lorakit.train.merge_stream import merged_rows

    return torch.cat(list(merged_rows(values, lora)))


def _copy_metadata(reader, writer, skip: tuple[str, ...]) -> None:
    from gguf import GGUFValueType

    for key, field in reader.fields.items():
        if key.startswith(NOT_COPIED + skip):
            continue
        main = field.types[0]
        sub = field.types[-1] if main == GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), main, sub_type=sub)


def _name(source) -> str:
    return f"{Path(source.adapter).resolve().name} (merged into {Path(str(source.spec)).name})"


def _finish_metadata(writer, source, outtype: str) -> None:
    import gguf

    if (template := source.saved_chat_template()) is not None:
        writer.add_chat_template(template)
    writer.add_file_type(file_type_of(outtype))
    if outtype in ("q8_0", "q4_0"):
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _from_gguf(source, names: GgufNames, outtype: str, fh) -> tuple[callable, list[Planned]]:
    from gguf import GGUFReader

    from lorakit.train.gguf_convert import TensorInfo, dequantized

    reader = GGUFReader(source.base_gguf)
    infos = {t.name: TensorInfo(t.name, t.tensor_type, t.data.dtype, tuple(t.data.shape), int(t.n_bytes),
                                int(t.data_offset)) for t in reader.tensors}
    element_shape = {t.name: tuple(int(d) for d in reversed(t.shape.tolist())) for t in reader.tensors}
    changes: dict[str, tuple[str, object, torch.Tensor | None]] = {}
    for hf_name, lora in source.merges.items():
        changes[_gguf_name(names, hf_name)] = (hf_name, lora, None)
    for hf_name, value in source.replaced.items():
        changes[_gguf_name(names, hf_name)] = (hf_name, None, value)
    extra = [n for n in changes if n not in infos]
    if extra == ["output.weight"] and "token_embd.weight" in infos:
        infos["output.weight"] = infos["token_embd.weight"]  # a tied head, adapted: written as a head of its own
        element_shape["output.weight"] = element_shape["token_embd.weight"]
    elif extra:
        raise ExportError(f"{source.base_gguf} holds no {extra[0]}, which the adapter changes "
                          f"({changes[extra[0]][0]}); is it the base the adapter was trained on?")

    def make(name: str):
        info, qtype = infos[name], tensor_qtype(name, element_shape[name], outtype)
        if name not in changes and info.tensor_type == qtype:
            fh.seek(info.data_offset)
            return np.frombuffer(fh.read(info.n_bytes), np.uint8)
        values = dequantized(fh, info)
        if name in changes:
            hf_name, lora, value = changes[name]
            if lora is not None:
                w = names.from_gguf_rows(hf_name, torch.from_numpy(values))
                values = names.to_gguf_rows(hf_name, _merged(w, lora)).numpy()
            else:
                values = names.stored(hf_name, value.to(torch.float32)).numpy()
            if values.shape != element_shape[name]:
                raise ExportError(f"{name}: the adapter's {hf_name} is {list(values.shape)}, the base's "
                                  f"{list(element_shape[name])}")
        return encode(values, qtype)

    planned = [Planned(n, element_shape[n], tensor_qtype(n, element_shape[n], outtype), lambda n=n: make(n))
               for n in infos]

    def metadata(writer) -> None:
        _copy_metadata(reader, writer, ("tokenizer.chat_template",) if source.saved_chat_template() else ())
        writer.add_name(_name(source))
        _finish_metadata(writer, source, outtype)

    return metadata, planned


def _gguf_name(names: GgufNames, hf_name: str) -> str:
    name = names.name(hf_name)
    if name is None:
        raise ExportError(f"{hf_name} has no tensor in llama.cpp's {names.layout.arch} layout; it cannot be written")
    return name


def _from_hf(source, names: GgufNames, outtype: str) -> tuple[callable, list[Planned]]:
    from safetensors import safe_open

    from gguf import GGMLQuantizationType

    from lorakit.export.hf_metadata import rope_factors, rope_freqs, write_metadata
    from lorakit.train.merge_stream import NotStreamable, plan_merge
    from lorakit.train.models import load_tokenizer

    try:
        plan = plan_merge(source.adapter, source.base_dir, "causal-lm", None, load_tokenizer(source.spec))
    except NotStreamable as exc:
        raise ExportError(f"{exc}; the merged GGUF is written from safetensors checkpoints") from None

    def make(out, name: str, qtype):
        if out.value is not None:
            values = out.value.to(torch.float32)
        else:
            with safe_open(str(out.source.file), framework="pt") as f:
                w = f.get_tensor(out.source.name)
            values = _merged(w, out.lora) if out.lora is not None else w.to(torch.float32)
        return encode(names.stored(out.name, values).numpy(), qtype)

    planned = []
    freqs = rope_freqs(source.base_dir)  # Llama 3's rope scaling: llama.cpp reads it as a tensor, not a key
    if freqs is not None:
        planned.append(Planned("rope_freqs.weight", tuple(freqs.shape), GGMLQuantizationType.F32,
                               lambda: encode(freqs, GGMLQuantizationType.F32)))
    for name, factors in rope_factors(source.base_dir).items():  # Phi-3's longrope: tensors too
        planned.append(Planned(name, tuple(factors.shape), GGMLQuantizationType.F32,
                               lambda f=factors: encode(f, GGMLQuantizationType.F32)))
    for shard in plan.shards:
        for out in shard:
            name = _gguf_name(names, out.name)
            qtype = tensor_qtype(name, tuple(out.shape), outtype)
            planned.append(Planned(name, tuple(out.shape), qtype, lambda o=out, n=name, q=qtype: make(o, n, q)))

    def metadata(writer) -> None:
        write_metadata(writer, source.base_dir, arch=names.layout.arch, name=_name(source))
        _finish_metadata(writer, source, outtype)

    return metadata, planned


def write_merged(source, out: Path, outtype: str) -> None:
    """Write ``source``'s base with its adapter merged at ``out``, encoded in ``outtype``."""
    layout = gguf_layout(source.config)
    names = GgufNames(layout, source.config)
    if source.base_gguf is None:
        metadata, planned = _from_hf(source, names, outtype)
        write_gguf(out, layout.arch, metadata, planned)
        return
    with open(source.base_gguf, "rb", buffering=0) as fh:
        metadata, planned = _from_gguf(source, names, outtype, fh)
        write_gguf(out, layout.arch, metadata, planned)
