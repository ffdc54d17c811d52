"""lorakit merge, streamed (lorakit.train.merge_stream): the same tensors as the in-memory merge, the base's dtype and
shards kept, memory bounded by one output shard + the adapter, and the in-memory merge (with a note) where the
stream cannot map the base exactly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import lorakit
from lorakit.adapters import unload
from lorakit.train.apply import load_with_adapter, merge_adapter
from lorakit.train import merge_stream
from lorakit.train.merge_stream import INDEX_NAME
from conftest import cli

LABELS = ["neg", "pos"]


def _config(kind: str, vocab: int, pad: int):
    import transformers as tf

    if kind == "bert":
        return tf.BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                             intermediate_size=48, max_position_embeddings=128, hidden_dropout_prob=0.0,
                             attention_probs_dropout_prob=0.0)
    return tf.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, pad_token_id=pad,
                          tie_word_embeddings=True)


def make_base(path: Path, tokenizer, kind: str = "llama", dtype=torch.float32, shard: str | None = None,
              bin_file: bool = False) -> str:
    """A tiny config-built base on disk: a bare BertModel ("bert") or a LlamaForCausalLM, stored in ``dtype``."""
    import transformers as tf

    torch.manual_seed(0)
    cfg = _config(kind, tokenizer.vocab_size, tokenizer.pad_token_id)
    model = (tf.BertModel(cfg) if kind == "bert" else tf.LlamaForCausalLM(cfg)).to(dtype)
    if bin_file:
        path.mkdir(parents=True)
        cfg.dtype = dtype
        cfg.save_pretrained(path)
        torch.save(model.state_dict(), path / "pytorch_model.bin")
    else:
        model.save_pretrained(path, **({"max_shard_size": shard} if shard else {}))
    tokenizer.save_pretrained(path)
    return str(path)


def make_adapter(path: Path, base: str, lora: lorakit.LoraConfig, task: str = "causal-lm") -> str:
    """An adapter on ``base`` with B (zero at init), the DoRA magnitude and any trained head perturbed."""
    from lorakit.train.models import load_model

    loaded = load_model(base, task, label_names=LABELS if task == "classify" else None, dtype=torch.float32)
    lorakit.attach(loaded.model, lora)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in loaded.model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    lorakit.save_adapter(loaded.model, path, labels=LABELS if task == "classify" else None)
    return str(path)


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(f))
    return out


def in_memory(adapter: str, base: str, folder: Path) -> Path:
    """Today's merge: the base loaded whole in float32, the adapter merged, save_pretrained."""
    loaded = load_with_adapter(adapter, base, base_dtype=torch.float32)[0]
    unload(loaded.model, merge=True).save_pretrained(folder)
    return folder


CASES = {
    "lora": (lorakit.LoraConfig(r=4, targets="all-linear"), "llama"),
    "rslora-patterns": (lorakit.LoraConfig(r=4, alpha=8, rslora=True, targets="all-linear",
                                           rank_pattern={"q_proj": 2, "down_proj": 6}, alpha_pattern={"v_proj": 3.0}),
                        "llama"),
    "dora": (lorakit.LoraConfig(r=4, targets="all-linear", use_dora=True), "llama"),
    "bert-classifier": (lorakit.LoraConfig(r=4, targets="attn-qv", bias="lora_only"), "bert"),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", list(CASES))
def test_streamed_merge_equals_the_in_memory_merge(tmp_path, minilm_tokenizer, case, dtype, capsys):
    lora, kind = CASES[case]
    task = "classify" if kind == "bert" else "causal-lm"
    base = make_base(tmp_path / "base", minilm_tokenizer, kind, dtype)
    adapter = make_adapter(tmp_path / "adapter", base, lora, task)
    merge_adapter(adapter, str(tmp_path / "out"), model=base)
    assert "not streamed" not in capsys.readouterr().err
    got, ref = tensors(tmp_path / "out"), tensors(in_memory(adapter, base, tmp_path / "ref"))
    assert sorted(got) == sorted(ref)  # the tensors save_pretrained writes (a tied head once), named as the model's
    for name, value in got.items():
        assert value.dtype == dtype, name  # bf16 in, bf16 out
        if dtype == torch.float32:
            torch.testing.assert_close(value, ref[name], atol=1e-6, rtol=0, msg=name)
        else:  # the fp32-computed merge, rounded once to bf16
            assert torch.equal(value, ref[name].to(dtype)), name
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    before = json.loads((Path(base) / "config.json").read_text())
    if task == "classify":
        today = json.loads((tmp_path / "ref" / "config.json").read_text())
        assert config["architectures"] == today["architectures"] == ["BertForSequenceClassification"]
        assert config["id2label"] == today["id2label"] and config["label2id"] == today["label2id"]
        assert {k: v for k, v in config.items() if k not in ("architectures", "id2label", "label2id", "pad_token_id")} \
            == {k: v for k, v in before.items() if k not in ("architectures", "pad_token_id")}
        assert {"classifier.weight", "classifier.bias"} <= set(got)  # the trained head, not in the bare base
    else:
        assert config == before  # unchanged
        assert (tmp_path / "out" / "generation_config.json").read_text() == \
            (Path(base) / "generation_config.json").read_text()
    assert (tmp_path / "out" / "tokenizer.json").is_file()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_rows_merged_in_blocks_give_the_same_tensors(tmp_path, minilm_tokenizer, dtype, monkeypatch):
    """W merged a few rows at a time (as a large tensor is): B[rows] A is another GEMM shape than B A, so float32
    may differ in the last bit (<= 1e-6 here) and a bf16 value then by one unit in the last place, rarely."""
    monkeypatch.setattr(merge_stream, "BLOCK_ELEMENTS", 100)
    base = make_base(tmp_path / "base", minilm_tokenizer, "llama", dtype)
    adapter = make_adapter(tmp_path / "adapter", base, lorakit.LoraConfig(r=4, targets="all-linear", use_dora=True))
    merge_adapter(adapter, str(tmp_path / "out"), model=base)
    got, ref = tensors(tmp_path / "out"), tensors(in_memory(adapter, base, tmp_path / "ref"))
    for name, value in got.items():
        want = ref[name].to(dtype)
        ulp = torch.finfo(dtype).eps * want.float().abs().clamp_min(torch.finfo(dtype).tiny)
        assert bool(((value.float() - want.float()).abs() <= torch.maximum(ulp, torch.full_like(ulp, 1e-6))).all()), name
        if dtype == torch.bfloat16:  # float32's last bit differs often; its rounding to bf16 seldom
            assert (value != want).float().mean() < 0.01, name


def test_a_sharded_base_gives_a_sharded_output_that_transformers_loads(tmp_path, minilm_tokenizer):
    from transformers import AutoModelForCausalLM

    base = make_base(tmp_path / "base", minilm_tokenizer, shard="150KB")
    adapter = make_adapter(tmp_path / "adapter", base, lorakit.LoraConfig(r=4, targets="all-linear", use_dora=True))
    out = merge_adapter(adapter, str(tmp_path / "out"), model=base)
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    base_shards = sorted(p.name for p in Path(base).glob("*.safetensors"))
    assert len(shards) > 1 and shards == base_shards  # the base's layout
    index = json.loads((out / INDEX_NAME).read_text())
    assert set(index["weight_map"].values()) == set(shards)
    assert index["weight_map"] == {k: f for f in shards for k in load_file(out / f)}
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in tensors(out).values())
    plain = AutoModelForCausalLM.from_pretrained(out).eval()
    adapted = load_with_adapter(adapter, base)[0].model.eval()
    ids = torch.tensor([[5, 100, 200, 300, 7], [9, 8, 1000, 20, 3]])
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, adapted(ids).logits, atol=1e-5, rtol=0)


def test_a_base_without_safetensors_is_merged_in_memory_with_a_note(capsys, tmp_path, minilm_tokenizer):
    base = make_base(tmp_path / "base", minilm_tokenizer, bin_file=True)
    adapter = make_adapter(tmp_path / "adapter", base, lorakit.LoraConfig(r=4, targets="all-linear"))
    capsys.readouterr()
    code, _, err = cli(capsys, "merge", "--adapter", adapter, "--model", base, "--out", tmp_path / "out")
    assert code == 0, err
    assert "lorakit: the merge is not streamed:" in err and "model.safetensors" in err and "in float32" in err
    got, ref = tensors(tmp_path / "out"), tensors(in_memory(adapter, base, tmp_path / "ref"))
    assert sorted(got) == sorted(ref)
    for name, value in got.items():
        torch.testing.assert_close(value, ref[name], atol=1e-6, rtol=0, msg=name)


def test_an_adapter_on_a_tied_head_is_merged_in_memory_with_a_note(capsys, tmp_path, minilm_tokenizer):
    base = make_base(tmp_path / "base", minilm_tokenizer)
    adapter = make_adapter(tmp_path / "adapter", base, lorakit.LoraConfig(r=4, targets=["q_proj", "lm_head"]))
    capsys.readouterr()
    code, _, err = cli(capsys, "merge", "--adapter", adapter, "--model", base, "--out", tmp_path / "out")
    assert code == 0, err
    assert "not streamed" in err and "lm_head.weight" in err and "tied" in err


# ---------------------------------------------------------------------- memory: a ~200M-parameter bf16 base
_MEASURE = textwrap.dedent("""
    import json, sys
    from lorakit.train.apply import merge_adapter

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024

    small, big = json.loads(sys.argv[1]), json.loads(sys.argv[2])
    merge_adapter(small["adapter"], small["out"], model=small["base"])  # every lazy import, the tokenizer's too
    baseline = status("VmRSS")
    with open("/proc/self/clear_refs", "w") as fh:  # VmHWM := VmRSS from here
        fh.write("5")
    merge_adapter(big["adapter"], big["out"], model=big["base"])
    print(json.dumps({"baseline": baseline, "peak": status("VmHWM")}))
""")


def _big_llama_on_disk(path: Path, adapter: Path, tokenizer) -> None:
    """An 8-layer, hidden-1024 Llama (~155M parameters) in bf16, in ~100 MB shards, and an r=8 all-linear adapter."""
    import transformers as tf

    cfg = tf.LlamaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                         num_attention_heads=16, num_key_value_heads=4, tie_word_embeddings=False,
                         pad_token_id=tokenizer.pad_token_id, dtype="bfloat16")
    with torch.device("meta"):
        model = tf.LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    model.save_pretrained(path, max_shard_size="100MB")
    tokenizer.save_pretrained(path)
    lorakit.attach(model, lorakit.LoraConfig(r=8, targets="all-linear"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.01)
    lorakit.save_adapter(model, adapter)


def test_peak_memory_is_one_output_shard_and_the_adapter(tmp_path, minilm_tokenizer):
    status = Path("/proc/self/status")
    if not status.exists() or not os.access("/proc/self/clear_refs", os.W_OK):
        pytest.skip("needs Linux's /proc/self/status and clear_refs")
    small_base = make_base(tmp_path / "small", minilm_tokenizer)
    small = {"base": small_base, "out": str(tmp_path / "small-out"),
             "adapter": make_adapter(tmp_path / "small-adapter", small_base, lorakit.LoraConfig(r=4, targets="all-linear"))}
    big = {"base": str(tmp_path / "big"), "adapter": str(tmp_path / "big-adapter"), "out": str(tmp_path / "big-out")}
    _big_llama_on_disk(tmp_path / "big", tmp_path / "big-adapter", minilm_tokenizer)
    env = dict(os.environ, OMP_NUM_THREADS="2")
    done = subprocess.run([sys.executable, "-c", _MEASURE, json.dumps(small), json.dumps(big)], capture_output=True,
                          text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    measured = json.loads(done.stdout.strip().splitlines()[-1])
    out = Path(big["out"])
    shards = [p.stat().st_size for p in out.glob("*.safetensors")]
    base_bytes = sum(p.stat().st_size for p in Path(big["base"]).glob("*.safetensors"))
    assert len(shards) > 1 and sum(shards) == base_bytes  # bf16 in, bf16 out, the base's shards
    adapter_bytes = (Path(big["adapter"]) / "adapter_model.safetensors").stat().st_size
    slack = 64 * 2**20  # the empty (meta) model, the tokenizer, allocator slack
    grew = measured["peak"] - measured["baseline"]
    print(f"merge of {base_bytes / 1e6:.0f} MB: peak RSS {measured['peak'] / 2**20:.0f} MiB = baseline "
          f"{measured['baseline'] / 2**20:.0f} MiB + {grew / 2**20:.0f} MiB; bound: largest shard "
          f"{max(shards) / 2**20:.0f} MiB + adapter {adapter_bytes / 2**20:.0f} MiB + {slack // 2**20} MiB")
    assert grew <= max(shards) + adapter_bytes + slack
