"""``lorakit export``: a fine-tune in the files llama.cpp, Ollama and LM Studio run (GGUF).

    export_gguf(adapter, "adapter.gguf", format="gguf-lora")        a llama.cpp LoRA adapter (llama-cli --lora)
    export_gguf(adapter, "model.gguf", format="gguf", outtype="q8_0")   the base with the adapter merged
    export_gguf(..., ollama=True)                                    also a Modelfile for ``ollama create``

``adapter`` is a training run's output directory (an adapter directory), any PEFT LoRA adapter directory, or a model
with an adapter attached (saved to a temporary directory first). The base is the one the adapter records (a .gguf
file, a built-in, a model directory) unless ``model`` names another. Only decoders of the families with a GGUF layout
(architectures.py) export; what a format cannot carry is refused in one line naming the alternative, before anything
is written. Outputs are written atomically; an existing output is replaced only with ``overwrite``.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from lorakit.errors import ExportError
from lorakit.export.config import FORMATS, ExportConfig
from lorakit.export.writer import OUTTYPES


@dataclass
class Source:
    """What an export reads: the adapter, the base (its spec, its model directory, its GGUF file if it is one), the
    base's config and the adapter's changes on an empty model of it."""

    adapter: Path
    spec: str
    base_dir: Path
    base_gguf: Path | None
    config: object
    merges: dict
    replaced: dict
    settings: object  # the adapter's LoraConfig

    def saved_chat_template(self) -> str | None:
        """The chat template saved with the adapter (lorakit train --chat-template), which the export carries."""
        saved = self.adapter / "chat_template.jinja"
        return saved.read_text() if saved.is_file() else None


def _source(adapter: Path, model: str | None) -> Source:
    from lorakit.adapters.io import read_config
    from lorakit.export.layout import gguf_layout
    from lorakit.train.apply import adapter_task, check_base_file
    from lorakit.train.merge_stream import NotStreamable, _empty_model, adapter_changes
    from lorakit.train.models import check_model_exists, gguf_file, model_config, model_dir

    task, _, recorded = adapter_task(adapter)
    if task != "causal-lm":
        raise ExportError(f"{adapter} is a {task} adapter (a classifier head); GGUF carries causal LMs for llama.cpp and "
                          "Ollama. Use `lorakit merge` for a transformers model directory instead")
    spec = model or recorded
    if not spec:
        raise ExportError(f"{adapter} does not name its base model; pass --model (the .gguf or model directory it was "
                          "trained on)")
    if not model:
        check_model_exists(spec, recorded_in=str(adapter / "adapter_config.json"))
        check_base_file(adapter, spec)
    settings = read_config(adapter)
    if settings.variant.rewrites_base:
        raise ExportError(f"{adapter} is a PiSSA adapter saved for its residual base (W - s B0 A0); save it converted "
                          "(save_adapter(..., convert_pissa=True), lorakit's default) and export that")
    base_dir = model_dir(spec)
    gguf_layout(model_config(spec))  # an encoder or a family llama.cpp does not run: refused before any weight is read
    empty = _empty_model(base_dir, "causal-lm", None)
    try:
        merges, replaced = adapter_changes(empty, adapter)
    except NotStreamable as exc:
        raise ExportError(str(exc)) from None
    return Source(adapter, spec, base_dir, gguf_file(spec), empty.config, merges, replaced, settings)


def _check_out(path: Path, overwrite: bool, inputs: dict[str, Path | None]) -> Path:
    path = Path(path).expanduser()
    if path.is_dir():
        raise ExportError(f"--out {path} is a directory; name the file to write (e.g. {path / 'model.gguf'})")
    if path.suffix.lower() != ".gguf":
        raise ExportError(f"--out {path} does not end in .gguf; llama.cpp and Ollama find GGUF files by that name")
    for flag, given in inputs.items():
        if given is not None and path.resolve() == Path(given).resolve():
            raise ExportError(f"--out {path} is the {flag} it is made from; choose another file name")
    if path.exists() and not overwrite:
        raise ExportError(f"--out {path} exists; choose another file name or pass --overwrite to replace it")
    return path


def export_gguf(adapter, path: str | os.PathLike, *, format: str = "gguf-lora", outtype: str | None = None,
                model: str | None = None, ollama: bool = False, overwrite: bool = False) -> dict[str, Path]:
    """Write ``adapter`` (an adapter directory, or a model with an adapter attached) as GGUF; returns {what: path}
    of every file written ("gguf", and "modelfile" with ``ollama``). ``outtype``: f32, f16, bf16, q8_0 or q4_0
    (default: f32 for a LoRA file, whose tensors are small; f16 for a merged model, as llama.cpp's converter)."""
    if format not in FORMATS:
        raise ExportError(f"--format {format!r}: choose gguf-lora (a llama.cpp adapter) or gguf (the merged model)")
    outtype = outtype or ("f32" if format == "gguf-lora" else "f16")
    if outtype not in OUTTYPES:
        raise ExportError(f"--outtype {outtype!r}: choose one of {', '.join(OUTTYPES)}")
    if not isinstance(adapter, (str, os.PathLike)):
        return _export_attached(adapter, path, format=format, outtype=outtype, model=model, ollama=ollama,
                                overwrite=overwrite)
    from lorakit.export import ollama as modelfile

    adapter = Path(adapter).expanduser()
    source = _source(adapter, model)
    out = _check_out(Path(path), overwrite, {"base model": source.base_gguf, "adapter": adapter})
    written = {}
    plan_modelfile = modelfile.plan(source, out, format, overwrite) if ollama else None
    if format == "gguf-lora":
        from lorakit.export.lora import write_lora

        write_lora(source, out, outtype)
    else:
        from lorakit.export.merged import write_merged

        write_merged(source, out, outtype)
    written["gguf"] = out
    if plan_modelfile is not None:
        written["modelfile"] = modelfile.write(plan_modelfile)
    return written


def _export_attached(model_with_adapter, path, *, model: str | None, **kwargs) -> dict[str, Path]:
    """An in-memory model with an adapter attached: saved as a PEFT adapter directory, then exported."""
    from lorakit.adapters import save_adapter

    base = model or getattr(getattr(model_with_adapter, "config", None), "name_or_path", None)
    if not base:
        raise ExportError("the model does not record the base it was loaded from; pass model= (its .gguf or directory)")
    with tempfile.TemporaryDirectory(prefix="lorakit-export-") as tmp:
        save_adapter(model_with_adapter, tmp)
        return export_gguf(tmp, path, model=base, **kwargs)


__all__ = ["FORMATS", "OUTTYPES", "ExportConfig", "export_gguf"]
