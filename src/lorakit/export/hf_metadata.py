"""The GGUF key-values llama.cpp needs to run a Hugging Face model directory (config.json + tokenizer files).

What is written, and where llama.cpp's loader reads it (llama-model.cpp ``load_hparams``, models/<arch>.cpp,
llama-vocab.cpp ``load``); the values are those of llama.cpp's converter (convert_hf_to_gguf.py: conversion/base.py
``set_gguf_parameters``, ``get_vocab_base``, ``_create_vocab_sentencepiece``; conversion/llama.py, qwen.py,
gemma.py, phi.py), taken from transformers' parsed config (``AutoConfig(...).to_dict()``, as the converter reads it):

    general.name, general.type            the model's name; "model"
    <arch>.context_length ...             max_position_embeddings, hidden_size, num_hidden_layers, intermediate_size,
                                          num_attention_heads, num_key_value_heads, rms_norm_eps, vocab_size
    <arch>.attention.key/value_length     head_dim, where it is not hidden_size / heads (always for Gemma)
    <arch>.rope.dimension_count           head_dim (llama.cpp refuses a llama file whose rotary size differs)
    <arch>.rope.freq_base                 rope_theta (Gemma 3: the full-attention layers'; .freq_base_swa: sliding)
    <arch>.rope.scaling.*                 linear: type, factor; yarn: type, factor, original context, yarn params.
                                          llama3 (Llama 3.1+) has no key-value: llama.cpp reads the tensor
                                          ``rope_freqs.weight``, which the caller adds (``rope_freqs``)
    Phi-3 (phi.py Phi3MiniModel)          rope.dimension_count = int(partial_rotary_factor * hidden) / heads;
                                          rope.scaling.original_context_length; attention.sliding_window (0 for
                                          none; llama.cpp's phi3 ignores it and runs full attention); longrope ("su",
                                          "yarn" in old configs): rope.scaling.attn_factor and the tensors
                                          ``rope_factors_long/short.weight`` (``rope_factors``). The tokenizer's
                                          added tokens as its set_vocab takes them (control if special, else
                                          user-defined, text as given); no add_space_prefix (llama.cpp's default)
    Gemma 1                               key/value_length; the embedding scale sqrt(hidden), the query scale
                                          1/sqrt(head_dim) and the tied head are llama.cpp's gemma; eot_token_id 107
                                          (<end_of_turn>), as the converter's GemmaModel.set_vocab
    Gemma 2/3                             attention.sliding_window, attn/final_logit_softcapping; llama.cpp derives
                                          the sliding layers (every 2nd / all but every 6th) and the query scale
                                          (1/sqrt(head_dim)) itself, so a config that differs is refused
    tokenizer.ggml.*                      model (gpt2: byte-level BPE; llama: SentencePiece), pre (BPE: the hash of
                                          the tokenizer's encoding of llama.cpp's check text -> its name), tokens,
                                          token_type, merges (BPE) or scores (SentencePiece, from tokenizer.model),
                                          add_space_prefix, bos/eos/unknown/padding(/sep/mask)_token_id and
                                          tokenizer.chat_template (gguf-py's SpecialVocab, as the converter), and
                                          add_bos/add_eos_token: whether the tokenizer adds them when encoding

Not written: general.file_type and general.quantization_version (the caller's: they describe the tensors), and
what llama.cpp does not read (general.organization, basename, finetune, size_label, license, languages, tags: the
converter's guesses from a model card). The converter writes no sliding window for Mistral (llama.cpp's llama
runs full attention) nor for Qwen; a Qwen config with use_sliding_window is refused.

Anything else is refused with an ExportError naming the value and the way out: another model_type, a rope
scaling llama.cpp does not implement, a tokenizer that cannot be converted exactly (a SentencePiece-style one
without its tokenizer.model, whose scores tokenizer.json does not keep; a BPE pre-tokenizer llama.cpp does not
know).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import struct
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from lorakit.architectures import families_with
from lorakit.errors import ExportError

if TYPE_CHECKING:
    import gguf

FIX = "export from the base's GGUF file with --model FILE.gguf, or --format gguf-lora"
ARCHS = ("llama", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "phi3")  # the GGUF architectures written here
GEMMA_EOT = 107  # Gemma 1's <end_of_turn>: the converter's GemmaModel.set_vocab sets eot (its FIM ids have no writer)
SWA_PATTERN = {"gemma2": 2, "gemma3": 6}  # llama.cpp's default: layer i slides unless i % n == n - 1
BIG_GEMMA_LAYERS = {"gemma2": 46, "gemma3": 62}  # the 27B models, whose query scale is 1/sqrt(hidden / heads)
# llama.cpp's check text and the names of the hashes of its encodings (convert_hf_to_gguf_update.py's output in
# conversion/base.py ``get_vocab_base_pre``), for the tokenizers of the families above.
CHECK_TEXT = ('\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ '
              '🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ '
              '------======= нещо на Български \'\'\'\'\'\'```````""""......!!!!!!?????? I\'ve been \'told he\'s there, '
              '\'RE you sure? \'M not sure I\'ll make it, \'D you like some tea? We\'Ve a\'lL')
PRE_TOKENIZERS = {
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # SmolLM, SmolLM2
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Llama 3
    "c136ed14d01c2745d4f60a9596ae66800e2b61fa45643e72436041855ad4089d": "smaug-bpe",  # Smaug-Llama-3
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",  # Mistral Nemo
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",  # Qwen 1.5, 2, 2.5, 3
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",  # Qwen3-Embedding
    "b3f499bb4255f8ca19fccd664443283318f2fd2414d5e0b040fbdd0cc195d6c5": "deepseek-r1-qwen",
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
}


def write_metadata(writer: gguf.GGUFWriter, model_dir: Path, *, arch: str, name: str | None = None) -> None:
    """Every key-value llama.cpp needs to run the Hugging Face model in ``model_dir`` (config.json + tokenizer
    files, as save_pretrained writes them) as GGUF architecture ``arch`` (see the module docstring), added to
    ``writer`` (a ``gguf.GGUFWriter(path, arch)``). Everything is read and checked before the first key is added,
    so a refusal (ExportError) leaves the writer as it was. For rope_type llama3 the caller also writes the tensor
    ``rope_freqs(model_dir)`` as ``rope_freqs.weight`` (F32)."""
    model_dir = Path(model_dir)
    hparams = _hparams(model_dir, arch)
    add_tokenizer = _tokenizer(model_dir, arch, hparams)
    raw = json.loads((model_dir / "config.json").read_text())
    writer.add_name(name or raw.get("_model_name_or_path") or model_dir.resolve().name)
    writer.add_type("model")
    for method, value in hparams["keys"]:
        getattr(writer, method)(value)
    add_tokenizer(writer)


def write_hyperparameters(writer: gguf.GGUFWriter, model_dir: Path, *, arch: str) -> None:
    """Only the ``<arch>.*`` key-values of ``write_metadata`` (for a file whose tokenizer comes from elsewhere)."""
    for method, value in _hparams(Path(model_dir), arch)["keys"]:
        getattr(writer, method)(value)


def rope_freqs(model_dir: Path) -> np.ndarray | None:
    """The ``rope_freqs.weight`` tensor (float32, head_dim / 2) llama.cpp applies for rope_type llama3, as the
    converter computes it (conversion/llama.py); None for any other rope."""
    config = _config(Path(model_dir))
    rope = config.get("rope_parameters") or {}
    if str(rope.get("rope_type", "")).lower() != "llama3":
        return None
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    factor, low, high = rope.get("factor", 8.0), rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old_ctx = rope.get("original_max_position_embeddings", 8192)
    import torch  # float32 arithmetic, as the converter's

    freqs = 1.0 / (rope.get("rope_theta", 10000.0) ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    out = []
    for wavelen in 2 * math.pi / freqs:
        if wavelen < old_ctx / high:
            out.append(1.0)
        elif wavelen > old_ctx / low:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(out, dtype=torch.float32).numpy()


def _config(model_dir: Path) -> dict[str, Any]:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(model_dir, local_files_only=True).get_text_config().to_dict()


def _hparams(model_dir: Path, arch: str) -> dict[str, Any]:
    """The writer calls (method, value) of the hyperparameters, and the text config they come from."""
    model_type = json.loads((model_dir / "config.json").read_text()).get("model_type")
    layouts = families_with("gguf")  # architectures.py: model_type -> its GGUF layout
    if arch not in ARCHS or getattr(layouts.get(model_type), "arch", None) != arch:
        known = ", ".join(f"{t} (as {layout.arch})" for t, layout in layouts.items() if layout.arch in ARCHS)
        raise ExportError(f"{model_dir}: model_type {model_type!r} cannot be written as GGUF architecture {arch!r} "
                          f"from its config (supported: {known}); {FIX}")
    c = _config(model_dir)
    heads = c["num_attention_heads"]
    head_dim = c.get("head_dim") or c["hidden_size"] // heads
    rope = c.get("rope_parameters") or {}
    full, sliding = rope.get("full_attention", rope), rope.get("sliding_attention")
    partial = full.get("partial_rotary_factor", c.get("partial_rotary_factor")) or 1.0
    rope_dims = int(partial * c["hidden_size"]) // heads if arch == "phi3" else head_dim  # the converter's
    keys = [("add_context_length", c["max_position_embeddings"]), ("add_embedding_length", c["hidden_size"]),
            ("add_block_count", c["num_hidden_layers"]), ("add_feed_forward_length", c["intermediate_size"]),
            ("add_head_count", heads), ("add_head_count_kv", c.get("num_key_value_heads") or heads),
            ("add_layer_norm_rms_eps", c["rms_norm_eps"]), ("add_vocab_size", c["vocab_size"]),
            ("add_rope_dimension_count", rope_dims), ("add_rope_freq_base", full.get("rope_theta", 10000.0))]
    if head_dim != c["hidden_size"] // heads or arch.startswith("gemma"):
        keys += [("add_key_length", head_dim), ("add_value_length", head_dim)]

    def refuse(what: str) -> None:
        raise ExportError(f"{model_dir}: {what}, which llama.cpp's {arch} does not implement; {FIX}")

    if arch == "phi3":
        if head_dim != c["hidden_size"] // heads:  # llama.cpp's phi3: heads of hidden_size / heads, wo square
            refuse(f"head_dim {head_dim} (not hidden_size / num_attention_heads)")
        keys += _phi3_rope(model_dir, c, full, rope_dims)
        # the converter writes 0 for no sliding window; llama.cpp's phi3 runs full attention either way
        keys.append(("add_sliding_window", c.get("sliding_window") or 0))
    else:
        keys += _rope_scaling(model_dir, full)
    if partial != 1.0 and arch != "phi3":
        refuse(f"partial_rotary_factor {partial}")
    if arch in ("qwen2", "qwen3") and c.get("use_sliding_window"):
        refuse(f"use_sliding_window (sliding_window {c.get('sliding_window')})")
    if arch in SWA_PATTERN:
        n, layers = SWA_PATTERN[arch], c.get("layer_types") or []
        expected = ["sliding_attention" if i % n < n - 1 else "full_attention" for i in range(c["num_hidden_layers"])]
        if layers and layers != expected and not (arch == "gemma3" and set(layers) == {"full_attention"}):
            refuse(f"layer_types {layers} (llama.cpp's {arch} slides all but every {n}th layer)")
        scale = c["hidden_size"] // heads if c["num_hidden_layers"] == BIG_GEMMA_LAYERS[arch] else head_dim
        if c.get("query_pre_attn_scalar", scale) != scale:
            refuse(f"query_pre_attn_scalar {c['query_pre_attn_scalar']} (llama.cpp scales queries by 1/sqrt({scale}))")
        if c.get("use_bidirectional_attention"):
            refuse("use_bidirectional_attention (an embedding model)")
        if sliding and sliding.get("rope_type", "default") != "default":
            refuse(f"rope scaling {sliding.get('rope_type')!r} on the sliding-window layers")
        if arch == "gemma2" or "sliding_attention" in layers:
            keys.append(("add_sliding_window", c["sliding_window"]))
        if arch == "gemma2":
            keys.append(("add_attn_logit_softcapping", c["attn_logit_softcapping"]))
        elif c.get("attn_logit_softcapping") is not None:
            refuse(f"attn_logit_softcapping {c['attn_logit_softcapping']}")
        if c.get("final_logit_softcapping"):
            keys.append(("add_final_logit_softcapping", c["final_logit_softcapping"]))
        if sliding and arch == "gemma3":
            keys.append(("add_rope_freq_base_swa", sliding.get("rope_theta", 10000.0)))
    return {"keys": keys, "vocab_size": c["vocab_size"]}


def _phi3_rope(model_dir: Path, c: dict, rope: dict, rope_dims: int) -> list[tuple[str, Any]]:
    """Phi-3's rope key-values, as the converter's Phi3MiniModel (conversion/phi.py): always the original context
    length; for longrope (transformers' name for "su" and Phi-3's "yarn") with factors, the attention factor
    (the config's attention_factor, else sqrt(1 + ln(s) / ln(original)), s = context / original, as both
    transformers and the converter compute it); the factors themselves are tensors (``rope_factors``)."""
    original = rope.get("original_max_position_embeddings", c.get("original_max_position_embeddings"))
    if original is None:
        raise ExportError(f"{model_dir}: a phi3 config without original_max_position_embeddings; {FIX}")
    keys = [("add_rope_scaling_orig_ctx_len", original)]
    kind = str(rope.get("rope_type", rope.get("type", "default"))).lower()
    if kind == "default":
        return keys
    if kind not in ("longrope", "su", "yarn"):
        raise ExportError(f"{model_dir}: rope_type {kind!r} (config.json rope_parameters) is not one llama.cpp's "
                          f"phi3 implements (default, longrope); {FIX}")
    long, short = rope.get("long_factor"), rope.get("short_factor")
    if not long:  # the converter writes nothing more (nor does transformers scale anything)
        return keys
    if not short or len(long) != len(short) or len(long) * 2 != rope_dims:
        raise ExportError(f"{model_dir}: longrope long_factor/short_factor of lengths {len(long)}/"
                          f"{len(short or [])}, not rotary dims / 2 = {rope_dims // 2}; {FIX}")
    scale = c["max_position_embeddings"] / original
    factor = rope.get("attention_factor")
    if factor is None:
        factor = math.sqrt(1 + math.log(scale) / math.log(original)) if scale > 1.0 else 1.0
    return keys + [("add_rope_scaling_attn_factors", float(factor))]


def rope_factors(model_dir: Path) -> dict[str, np.ndarray]:
    """Phi-3's longrope factors, the tensors llama.cpp reads (``rope_factors_long.weight``,
    ``rope_factors_short.weight``: float32, rotary dims / 2; it takes the long ones when the context is longer
    than the original), as the converter's Phi3MiniModel.generate_extra_tensors; {} for any other model."""
    model_dir = Path(model_dir)
    if json.loads((model_dir / "config.json").read_text()).get("model_type") != "phi3":
        return {}
    rope = _config(model_dir).get("rope_parameters") or {}
    if str(rope.get("rope_type", "")).lower() not in ("longrope", "su", "yarn") or not rope.get("long_factor"):
        return {}
    return {"rope_factors_long.weight": np.asarray(rope["long_factor"], np.float32),
            "rope_factors_short.weight": np.asarray(rope["short_factor"], np.float32)}


def _rope_scaling(model_dir: Path, rope: dict) -> list[tuple[str, Any]]:
    import gguf

    kind = str(rope.get("rope_type", rope.get("type", "default"))).lower()
    if kind in ("default", "llama3"):  # llama3: the rope_freqs tensor
        return []
    if kind == "linear":
        return [("add_rope_scaling_type", gguf.RopeScalingType.LINEAR), ("add_rope_scaling_factor", rope["factor"])]
    if kind == "yarn":
        keys = [("add_rope_scaling_type", gguf.RopeScalingType.YARN), ("add_rope_scaling_factor", rope["factor"]),
                ("add_rope_scaling_orig_ctx_len", rope["original_max_position_embeddings"])]
        for field, method in (("extrapolation_factor", "ext_factor"), ("attention_factor", "attn_factor"),
                              ("beta_fast", "beta_fast"), ("beta_slow", "beta_slow")):
            if rope.get(field) is not None:
                keys.append((f"add_rope_scaling_yarn_{method}", rope[field]))
        return keys
    raise ExportError(f"{model_dir}: rope_type {kind!r} (config.json rope_parameters) is not one lorakit writes to "
                      f"GGUF (default, linear, yarn, llama3); {FIX}")


def _tokenizer(model_dir: Path, arch: str, hparams: dict) -> Any:
    """A function adding the tokenizer's key-values to a writer, everything read and checked before."""
    import gguf
    from transformers import AutoTokenizer

    def read(name: str) -> dict:
        return json.loads((model_dir / name).read_text()) if (model_dir / name).is_file() else {}

    spm_file = model_dir / "tokenizer.model"
    tokenizer_json = {} if spm_file.is_file() else read("tokenizer.json")  # not needed with one (Gemma's: 33 MB)
    model = tokenizer_json.get("model", {})
    if not spm_file.is_file() and (arch.startswith("gemma") or model.get("byte_fallback")):
        raise ExportError(f"{model_dir} has no tokenizer.model: its SentencePiece vocabulary (scores, token types) "
                          f"cannot be rebuilt exactly from tokenizer.json; add the base's tokenizer.model, or {FIX}")
    if not spm_file.is_file() and model.get("type") != "BPE":
        found = f"tokenizer.json holds a {model['type']} tokenizer" if model else "there is no tokenizer.json"
        raise ExportError(f"{model_dir}: {found}, and no tokenizer.model; llama.cpp reads byte-level BPE and "
                          f"SentencePiece tokenizers; {FIX}")
    try:
        tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    except (OSError, ValueError, ImportError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExportError(f"{model_dir}: transformers cannot load its tokenizer ({reason}); {FIX}") from None
    n_vocab = hparams["vocab_size"]
    if spm_file.is_file():
        kind, pre, merges = "llama", "default", False
        config = read("tokenizer_config.json")  # its added tokens, as the converter reads them; else the tokenizer's
        added = {int(i): (t["content"], t.get("special", False)) for i, t in config.get("added_tokens_decoder", {}).items()}
        added = added or {i: (t.content, t.special) for i, t in tok.added_tokens_decoder.items()}
        if arch == "phi3":  # Phi3MiniModel.set_vocab: added_tokens.json, then tokenizer_config's, then tokenizer.json's
            added = {i: (t, False) for t, i in read("added_tokens.json").items()} | added | {
                int(t["id"]): (t["content"], t.get("special", False)) for t in read("tokenizer.json").get("added_tokens", [])}
        tokens, scores, types, dummy_prefix = _sentencepiece(spm_file, n_vocab, added, as_given=arch == "phi3")
        space_prefix = False if arch.startswith("gemma") else config.get("add_prefix_space")
        space_prefix = dummy_prefix if space_prefix is None else bool(space_prefix)
        if arch == "phi3" and space_prefix:
            space_prefix = None  # the converter's phi3 writes none: llama.cpp's SentencePiece default (true)
    else:
        kind, merges, scores = "gpt2", True, None
        digest = hashlib.sha256(str(tok.encode(CHECK_TEXT)).encode()).hexdigest()
        if digest not in PRE_TOKENIZERS:
            raise ExportError(f"{model_dir}: llama.cpp does not know this BPE pre-tokenizer (check-text hash "
                              f"{digest[:16]}...; known: {', '.join(sorted(set(PRE_TOKENIZERS.values())))}); {FIX}")
        pre = PRE_TOKENIZERS[digest]
        tokens, types = _bpe_vocab(tok, n_vocab, model_dir)
        pre_tokenizers = tokenizer_json.get("pre_tokenizer") or {}
        byte_level = [p for p in pre_tokenizers.get("pretokenizers", [pre_tokenizers]) if p.get("type") == "ByteLevel"]
        space_prefix = bool(byte_level and byte_level[0].get("add_prefix_space"))
    quiet = logging.getLogger("gguf.vocab")  # its warnings about templates it does not parse: not the user's
    level, _ = quiet.level, quiet.setLevel(logging.ERROR)
    try:
        special = gguf.SpecialVocab(model_dir, load_merges=merges, n_vocab=len(tokens) if scores is not None else None)
    finally:
        quiet.setLevel(level)
    ids = special.special_token_ids
    plain, full = tok.encode("a", add_special_tokens=False), tok.encode("a")
    special.add_special_token["bos"] = "bos" in ids and full[:1] == [ids["bos"]] != plain[:1]
    special.add_special_token["eos"] = "eos" in ids and full[-1:] == [ids["eos"]] != plain[-1:]
    if arch == "gemma" and GEMMA_EOT < len(tokens):
        special.special_token_ids.setdefault("eot", GEMMA_EOT)

    def add(writer) -> None:
        writer.add_tokenizer_model(kind)
        writer.add_tokenizer_pre(pre)
        writer.add_token_list(tokens)
        if scores is not None:
            writer.add_token_scores(scores)
        writer.add_token_types(types)
        if space_prefix is not None:
            writer.add_add_space_prefix(space_prefix)
        special.add_to_gguf(writer, quiet=True)

    return add


def _looks_special(token: str) -> bool:  # the converter's ``does_token_look_special``
    return token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]") or (token.startswith("<|") and token.endswith("|>")) \
        or (token.startswith("<｜") and token.endswith("｜>")) or (token.startswith("<unused") and token.endswith(">"))


def _bpe_vocab(tok, n_vocab: int, model_dir: Path) -> tuple[list[str], list[int]]:
    """Tokens and types of a byte-level BPE tokenizer, as the converter's ``get_vocab_base``: ids the tokenizer does
    not have are [PAD<id>] (unused); added tokens are control (special, or looking so) or user-defined."""
    import gguf

    vocab = {i: t for t, i in tok.get_vocab().items()}
    if max(vocab) >= n_vocab:
        raise ExportError(f"{model_dir}: the tokenizer has token id {max(vocab)}, past config.json's vocab_size "
                          f"{n_vocab}; the tokenizer is not this model's")
    added, decoder = tok.get_added_vocab(), tok.added_tokens_decoder
    tokens, types = [], []
    for i in range(n_vocab):
        token, kind = vocab.get(i), gguf.TokenType.NORMAL
        if token is None:
            token, kind = f"[PAD{i}]", gguf.TokenType.UNUSED
        elif token in added:
            if not decoder[i].normalized:  # as llama.cpp's tokenizer sees it
                token = tok.decode(tok.encode(token, add_special_tokens=False))
            if decoder[i].special or _looks_special(token):
                kind = gguf.TokenType.CONTROL
            else:
                token, kind = token.replace("\u2581", " "), gguf.TokenType.USER_DEFINED
        tokens.append(token)
        types.append(int(kind))
    return tokens, types


def _varint(data, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _fields(data):
    """(field number, value) of a protobuf message: ints for varints, bytes for the rest."""
    pos = 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        if key & 7 == 0:
            value, pos = _varint(data, pos)
        else:
            size, pos = (8, pos) if key & 7 == 1 else (4, pos) if key & 7 == 5 else _varint(data, pos)
            value, pos = data[pos:pos + size], pos + size
        yield key >> 3, value


def _sentencepiece(path: Path, n_vocab: int, added: dict, *, as_given: bool = False) -> tuple[list[bytes],
                                                                                                  list[float],
                                                                                                  list[int], bool]:
    """Tokens, scores and types of a SentencePiece tokenizer.model (ModelProto: pieces = field 1 {piece 1, score 2,
    type 3}; normalizer_spec = field 3 {add_dummy_prefix 3}), as the converter's ``_create_vocab_sentencepiece``:
    user-defined pieces count as normal, unset ids are [PAD<id>]; the added tokens (id -> (text, special))
    override (score -1000, control if special or looking so, else user-defined with ▁ as a space; ``as_given``:
    control if special, else user-defined, the text as it is, as the converter's Phi3MiniModel). Also
    add_dummy_prefix."""
    tokens = [f"[PAD{i}]".encode() for i in range(n_vocab)]
    scores, types = [-10000.0] * n_vocab, [5] * n_vocab
    dummy_prefix, i = True, 0
    for field, value in _fields(memoryview(path.read_bytes())):
        if field == 3:
            dummy_prefix = next((bool(v) for f, v in _fields(value) if f == 3), True)
        if field != 1:
            continue
        if i < n_vocab:
            piece = dict(_fields(value))
            tokens[i], scores[i] = bytes(piece.get(1, b"")), struct.unpack("<f", piece[2])[0] if 2 in piece else 0.0
            types[i] = {2: 2, 3: 3, 5: 5, 6: 6}.get(piece.get(3, 1), 1)  # unknown, control, unused, byte; else normal
        i += 1
    for token_id, (text, special) in added.items():
        if token_id < n_vocab:
            if as_given:
                types[token_id] = 3 if special else 4
            elif special or _looks_special(text):
                types[token_id] = 3
            else:
                text, types[token_id] = text.replace("\u2581", " "), 4
            tokens[token_id], scores[token_id] = text.encode(), -1000.0
    return tokens, scores, types, dummy_prefix
