"""lorakit bench: same trajectory as PEFT, the report it writes, and clear refusals of bad input."""

import importlib.util
import json

import pytest

from lorakit.adapters import LoraConfig
import torch

from lorakit.bench import versus_peft as vp
from lorakit.cli import main


def lm_batches(n, vocab=97, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(3, vocab, (2, 10), generator=g)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    return out


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_exact_mode_follows_peft_step_for_step(make_model, kind):
    """Acceptance 1 (trajectory): same init and data, 20 AdamW steps, losses within rtol 1e-4."""
    base = make_model(kind)
    cfg = vp.BenchConfig(lora=LoraConfig(r=4, alpha=8, targets="all-linear"), lr=5e-3)
    batches = lm_batches(2)  # cycled: a loss that visibly falls
    ours, peft_fp32 = vp.contenders(base, cfg, "exact", batches)
    for _ in range(20):
        ours.step()
        peft_fp32.step()
    torch.testing.assert_close(torch.tensor(ours.losses), torch.tensor(peft_fp32.losses), rtol=1e-4, atol=0)
    assert ours.losses[-1] < 0.95 * ours.losses[0]  # it trains
    twin = {vp.ours_name(n): p for n, p in peft_fp32.model.named_parameters()}
    # Adam normalises each coordinate, so near-zero gradients can amplify rounding differences in single
    # entries; the weights as a whole agree closely
    ours_w = torch.cat([p.detach().flatten() for n, p in ours.model.named_parameters() if p.requires_grad])
    twin_w = torch.cat([twin[n].detach().flatten() for n, p in ours.model.named_parameters() if p.requires_grad])
    assert float((ours_w - twin_w).norm() / twin_w.norm()) < 1e-3


@pytest.mark.parametrize("caller", ["lorakit", "hf-trainer"])
def test_every_caller_runs_both_contenders_alike(make_model, caller):
    """--caller: lorakit train's engine and HF Trainer's training_step give both contenders the same steps."""
    cfg = vp.BenchConfig(lora=LoraConfig(r=4, alpha=8, targets="all-linear"), lr=5e-3, caller=caller)
    ours, peft_fp32 = vp.contenders(make_model("llama"), cfg, "exact", lm_batches(2))
    assert type(ours) is vp.RUNNERS[caller] and type(peft_fp32) is vp.RUNNERS[caller]
    for _ in range(6):
        ours.step()
        peft_fp32.step()
    torch.testing.assert_close(torch.tensor(ours.losses), torch.tensor(peft_fp32.losses), rtol=1e-4, atol=0)
    assert ours.losses[-1] < ours.losses[0]
    with pytest.raises(vp.BenchError, match="--caller 'trl' is not one of loop, lorakit, hf-trainer"):
        vp.BenchConfig(caller="trl").validate()


def test_dropout_masks_are_shared_between_contenders(make_model, token_batch):
    base = make_model("bert-cls")
    base.config.hidden_dropout_prob = 0.2
    for m in base.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.2
    ids, mask = token_batch()
    batches = [{"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([0, 1])}]
    ours, peft_fp32 = vp.contenders(base, vp.BenchConfig(lora=LoraConfig(r=4, alpha=8, targets="attn-qv"), lr=1e-2), "exact", batches)
    for _ in range(5):
        ours.step()
        peft_fp32.step()
    torch.testing.assert_close(torch.tensor(ours.losses), torch.tensor(peft_fp32.losses), rtol=1e-4, atol=0)


def test_step_flops_counts_matmuls_and_attention():
    lin = torch.nn.Linear(8, 4, bias=False)
    x = torch.randn(5, 8, requires_grad=True)
    assert vp.step_flops(lambda: lin(x).sum().backward()) == 3 * 2 * 5 * 8 * 4  # forward, dX, dW
    q = torch.randn(1, 2, 16, 8, requires_grad=True)
    attn = lambda: torch.nn.functional.scaled_dot_product_attention(q, q, q).sum().backward()  # noqa: E731
    assert vp.step_flops(attn) == 3 * 4 * 2 * 16 * 16 * 8  # forward 4 b h L^2 d, backward twice that


def test_bench_cli_writes_json_markdown_and_png(tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "bench"
    code = main(["bench", "--model", tiny_llama_dir, "--batch-size", "2", "--max-length", "16", "--steps", "2",
                 "--warmup", "1", "--modes", "exact,bf16", "--quality-steps", "2", "--r", "4", "--out", str(out)])
    assert code == 0
    report = json.loads((out / "bench.json").read_text())
    assert set(report["modes"]) == {"exact", "bf16"}
    bf16 = report["modes"]["bf16"]
    assert set(bf16["contenders"]) == {"lorakit bf16", "peft fp32", "peft bf16 autocast"}
    for c in bf16["contenders"].values():
        assert c["median_s"] > 0 and c["step_gflop"] > 0 and 0 < c["fraction_of_peak"] and c["peak_rss_mb"] > 0
    medians = {name: c["median_s"] for name, c in bf16["contenders"].items()}
    assert bf16["ratio_to_peft_fp32"] == pytest.approx(medians["lorakit bf16"] / medians["peft fp32"])
    assert bf16["ratio_to_peft_bf16_autocast"] == pytest.approx(medians["lorakit bf16"] / medians["peft bf16 autocast"])
    assert report["modes"]["exact"]["loss_max_relative_difference"] < 1e-4
    assert 0 <= bf16["quality"]["relative_difference"] < 0.05
    assert report["peak_gemm_gflops"]["float32"] > 0
    assert (out / "bench.png").stat().st_size > 0
    assert "| exact | lorakit exact |" in (out / "bench.md").read_text()
    assert "vs PEFT fp32" in capsys.readouterr().out


@pytest.mark.parametrize("args,message", [
    (["--modes", "exact,turbo"], "unknown mode 'turbo'"),
    (["--against", "unsloth"], "benchmarks against peft"),
    (["--steps", "0"], "argument --steps: 0 is not a positive integer; give 1 or more"),  # the option's parser
])
def test_bad_arguments_are_refused(tiny_llama_dir, args, message, capsys):
    try:
        code = main(["bench", "--model", tiny_llama_dir, "--no-memory", *args])
    except SystemExit as exc:  # argparse's refusal: the same one line, status 2
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("lorakit: error:") and len(err.strip().splitlines()) == 1
    assert message in err


def test_missing_peft_is_named(tiny_llama_dir, monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "peft" else real(name, *a))
    assert main(["bench", "--model", tiny_llama_dir]) == 2
    assert "peft is not installed: pip install peft" in capsys.readouterr().err


def test_model_too_big_is_refused_before_loading(tiny_llama_dir, monkeypatch):
    import psutil
    from transformers import AutoModelForCausalLM

    from lorakit.train import models

    params = vp.parameter_count(tiny_llama_dir, "causal-lm")
    assert params == sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(tiny_llama_dir).parameters())
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    fake = type("VM", (), {"available": params * 4 * vp.WEIGHT_COPIES - 1})
    monkeypatch.setattr(psutil, "virtual_memory", lambda: fake)
    with pytest.raises(vp.BenchError, match=r"float32 copies of them .* available"):
        vp.run(vp.BenchConfig(model=tiny_llama_dir, memory=False))


def test_dora_mode_runs_against_peft_dora(tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "bench"
    code = main(["bench", "--model", tiny_llama_dir, "--batch-size", "2", "--max-length", "16", "--steps", "3",
                 "--warmup", "1", "--modes", "dora", "--rank", "4", "--no-memory", "--out", str(out)])
    assert code == 0
    entry = json.loads((out / "bench.json").read_text())["modes"]["dora"]
    assert set(entry["contenders"]) == {"lorakit dora", "peft dora fp32"}
    medians = {name: c["median_s"] for name, c in entry["contenders"].items()}
    assert entry["ratio_to_peft_fp32"] == pytest.approx(medians["lorakit dora"] / medians["peft dora fp32"])
    assert entry["loss_max_relative_difference"] < 1e-4  # the same DoRA trajectory as PEFT's
    assert "x PEFT DoRA fp32" in capsys.readouterr().out


def test_bench_flags_are_generated_from_bench_config():
    from lorakit import cli
    from lorakit import options as opt
    from lorakit.bench.versus_peft import BenchConfig

    def parse(*args):
        return opt.from_flags(BenchConfig, cli.parser().parse_args(["bench", *args]))

    assert parse() == BenchConfig()
    assert parse("--rank", "8", "--no-memory", "--modes", "exact,dora").r == 8
    assert parse("--r", "4").r == 4  # the older spelling, hidden
    assert parse("--no-memory").memory is False and parse("--modes", "exact,dora").modes == ("exact", "dora")
    assert opt.fields_without_help(BenchConfig) == []
