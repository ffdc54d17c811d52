"""Big models on one machine: --base-dtype for every loading command, the memory plan before the load, --dry-run,
and loading at the storage dtype without an fp32 copy (peak RSS measured in a subprocess)."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import cli, refused
from lorakit.train import precision
from lorakit.train.precision import plan_precision


# ---------------------------------------------------------------------- the precision table
@pytest.fixture
def bf16_speed(monkeypatch):
    import lorakit.speed.gemm as gemm

    def set_pays(pays: bool):
        monkeypatch.setattr(gemm, "bf16_decision", lambda device="cpu": (pays, f"bf16 {'faster' if pays else 'slower'}"))

    return set_pays


@pytest.mark.parametrize("requested,bf16,pays,fits32,storage,compute", [
    ("auto", False, False, True, torch.float32, torch.float32),
    ("auto", False, False, False, torch.bfloat16, torch.float32),  # stored in bf16 to fit, computed in fp32
    ("auto", True, True, True, torch.bfloat16, torch.bfloat16),  # --bf16 where bf16 products pay
    ("auto", True, False, True, torch.float32, torch.float32),  # --bf16 where they do not: as today
    ("bf16", False, False, True, torch.bfloat16, torch.float32),
    ("bf16", False, True, True, torch.bfloat16, torch.bfloat16),
    ("fp16", False, True, True, torch.float16, torch.float32),
    ("fp32", True, True, True, torch.float32, torch.float32),
])
def test_storage_and_compute_on_cpu(bf16_speed, requested, bf16, pays, fits32, storage, compute):
    bf16_speed(pays)
    plan = plan_precision(requested, "cpu", bf16=bf16, fits=lambda dt: fits32 or dt != torch.float32)
    assert (plan.storage, plan.compute, plan.autocast) == (storage, compute, None), plan.why


def test_gpu_storage_applies_and_refuses_what_needs_loss_scaling(monkeypatch):
    from lorakit.errors import ConfigError

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    plan = plan_precision("bf16", "cuda")
    assert (plan.storage, plan.compute) == (torch.bfloat16, torch.bfloat16)
    assert plan_precision("fp32", "cuda", bf16=True).autocast == torch.bfloat16
    with pytest.raises(ConfigError, match="--base-dtype fp16 on cuda computes in fp16"):
        plan_precision("fp16", "cuda")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "Tesla T4")
    with pytest.raises(ConfigError, match="Tesla T4 has no bf16 support; use --base-dtype fp32"):
        plan_precision("bf16", "cuda")


def test_a_bad_base_dtype_is_one_line(capsys, tiny_llama_dir, corpus_txt, tmp_path):
    refused(capsys, "train", "--model", tiny_llama_dir, "--data", corpus_txt, "--out", tmp_path / "o",
            "--base-dtype", "int3", needle="--base-dtype")
    with pytest.raises(Exception, match="--base-dtype 'half' is not one of auto, fp32, bf16, fp16"):
        precision.base_dtype("half")


# ---------------------------------------------------------------------- every loading command honours --base-dtype
@pytest.fixture
def loads(monkeypatch):
    """The dtype each load_model call of this test asked for (the load itself runs as always)."""
    import lorakit.train.models as models

    seen = []
    real = models.load_model

    def spy(*args, **kwargs):
        seen.append(kwargs.get("dtype"))
        return real(*args, **kwargs)

    for module in ("lorakit.train.models", "lorakit.train.apply", "lorakit.train.job"):
        monkeypatch.setattr(f"{module}.load_model", spy, raising=False)
    return seen


@pytest.fixture(scope="module")
def trained_llama(tmp_path_factory, tiny_llama_dir, corpus_txt):
    out = tmp_path_factory.mktemp("run")
    from conftest import train_config
    from lorakit.train import run

    report = run(train_config(model=tiny_llama_dir, data=corpus_txt, out=str(out), steps=2, batch_size=4, quiet=True,
                              rank=4, max_length=32, base_dtype="bf16", gradient_checkpointing=True, save_every=None,
                              eval_limit=8))
    return out, report


def test_train_stores_the_base_as_asked_and_records_plan_and_peak(trained_llama):
    out, report = trained_llama
    doc = json.loads((out / "run.json").read_text())
    assert doc["precision"]["base_dtype"] == "bf16" and doc["config"]["base_dtype"] == "bf16"
    assert doc["gradient_checkpointing"] is True
    assert doc["memory_plan"]["total_bytes"] > 0 and doc["memory_plan"]["settings"]["gradient_checkpointing"] is True
    assert doc["peak_rss_mib"] > 0


@pytest.mark.parametrize("command", [
    ["eval", "--adapter", "{run}", "--json"],
    ["generate", "--adapter", "{run}", "--prompt", "hi", "--max-new-tokens", "2", "--raw"],
    ["norms", "--adapter", "{run}", "--rows", "2", "--out", "{tmp}/norms"],
])
@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_every_loading_command_honours_base_dtype(capsys, loads, trained_llama, tmp_path, command, dtype):
    out, _ = trained_llama
    args = [a.format(run=out, tmp=tmp_path) for a in command] + ["--base-dtype", dtype]
    code, _, err = cli(capsys, *args)
    assert code == 0, err
    assert loads and set(loads) == {dtype}


def test_rank_advice_refuses_a_16_bit_full_finetune(capsys, tiny_llama_dir, corpus_txt, tmp_path):
    refused(capsys, "rank-advice", "--model", tiny_llama_dir, "--data", corpus_txt, "--tol", "0.5", "--out", tmp_path / "a",
            "--base-dtype", "bf16", needle="trains the target weights themselves, in fp32")


# ---------------------------------------------------------------------- the plan, before any weight is read
def test_a_run_that_does_not_fit_is_refused_before_anything_is_read(capsys, monkeypatch, tiny_llama_dir, corpus_txt,
                                                                     tmp_path):
    import lorakit.train.models as models

    def no_load(*a, **k):
        raise AssertionError("a weight was read")

    monkeypatch.setattr(models, "load_model", no_load)
    monkeypatch.setattr("lorakit.train.job.load_model", no_load, raising=False)
    err = refused(capsys, "train", "--model", tiny_llama_dir, "--data", corpus_txt, "--out", tmp_path / "o",
                  "--max-memory", "300MB", "--max-length", "64", needle="GB available (--max-memory)")
    assert "needs ~" in err and "--dry-run" in err
    assert not (tmp_path / "o").exists()  # nothing claimed


def test_the_refusal_names_the_options_that_fit(capsys, tiny_llama_dir, corpus_txt, tmp_path):
    """Sized so that the plan of the given options is just over --max-memory and a cheaper one is under."""
    from conftest import train_config
    from lorakit.train.plan import plan_run

    base = dict(model=tiny_llama_dir, data=corpus_txt, out=str(tmp_path / "o"), batch_size=64, max_length=64,
                base_dtype="fp32", dry_run=True)
    need = plan_run(train_config(**base)).memory.total
    err = refused(capsys, "train", "--model", tiny_llama_dir, "--data", corpus_txt, "--out", tmp_path / "o",
                  "--batch-size", "64", "--max-length", "64", "--base-dtype", "fp32",
                  "--max-memory", str(need - 2**20), needle="fits with")
    assert f"needs ~{need / 1e9:.1f} GB" in err


def test_dry_run_prints_the_plan_and_exits(capsys, tiny_llama_dir, corpus_txt, tmp_path):
    code, out, err = cli(capsys, "train", "--model", tiny_llama_dir, "--data", corpus_txt, "--out", tmp_path / "o",
                         "--dry-run", "--gradient-checkpointing", "--base-dtype", "bf16")
    assert code == 0, err
    assert "frozen weights (bf16)" in out and "checkpointed" in out and "fits:" in out
    assert not (tmp_path / "o").exists()
    code, out, _ = cli(capsys, "train", "--model", tiny_llama_dir, "--data", corpus_txt, "--out", tmp_path / "o",
                       "--dry-run", "--max-memory", "100MB")
    assert code == 1 and "does not fit:" in out


# ---------------------------------------------------------------------- loading without an fp32 copy
LOAD_PEAK = textwrap.dedent("""
    import json, sys, torch
    from lorakit.train.memory import rss_kib
    from lorakit.train.models import load_model, load_tokenizer
    tok = load_tokenizer(sys.argv[1])
    before = rss_kib("VmHWM")
    model = load_model(sys.argv[1], "causal-lm", dtype=sys.argv[2], tokenizer=tok).model
    print(json.dumps({"before_kib": before, "peak_kib": rss_kib("VmHWM"),
                      "bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
                      "dtypes": sorted({str(p.dtype) for p in model.parameters()})}))
""")


def test_loading_in_bf16_peaks_at_the_bf16_weights(tmp_path, minilm_tokenizer):
    """A ~300M-parameter model saved in bf16, loaded in bf16: peak RSS <= 1.15 x its bf16 bytes + the baseline."""
    import transformers as tf

    cfg = tf.LlamaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=22,
                         num_attention_heads=16, num_key_value_heads=4, tie_word_embeddings=False)
    with torch.device("meta"):
        meta = tf.LlamaForCausalLM(cfg)
    from safetensors.torch import save_file

    folder = tmp_path / "m"
    folder.mkdir()
    cfg.save_pretrained(folder)
    minilm_tokenizer.save_pretrained(folder)
    g = torch.Generator().manual_seed(0)
    names = [(n, p.shape) for n, p in meta.state_dict().items()]
    index, shard, size, k = {}, {}, 0, 0
    for i, (name, shape) in enumerate(names):  # written a shard at a time: never the whole model in this process
        shard[name] = (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)
        size += shard[name].numel() * 2
        if size > 200 * 2**20 or i == len(names) - 1:
            file = f"model-{k:05d}.safetensors"
            save_file(shard, folder / file, metadata={"format": "pt"})
            index.update({n: file for n in shard})
            shard, size, k = {}, 0, k + 1
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}))
    done = subprocess.run([sys.executable, "-c", LOAD_PEAK, str(folder), "bf16"], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    r = json.loads(done.stdout.strip().splitlines()[-1])
    assert r["dtypes"] == ["torch.bfloat16"] or "torch.bfloat16" in r["dtypes"]
    assert r["bytes"] > 500e6  # ~300M parameters in bf16
    grown = (r["peak_kib"] - r["before_kib"]) * 1024
    assert grown <= 1.15 * r["bytes"], (grown / 1e6, r["bytes"] / 1e6)
