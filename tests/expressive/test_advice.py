import itertools
import json

import pytest
import torch

import lorakit
from conftest import tiny_model
from lorakit.errors import ConfigError
from lorakit.expressive.advice import ModuleSpectrum, advise, spectra, weight_deltas


def synthetic():
    gen = torch.Generator().manual_seed(0)
    return [ModuleSpectrum(f"m{i}", 6 + 2 * i, 6, torch.sort(torch.rand(6, generator=gen) * (3 - i), descending=True).values)
            for i in range(3)]


def energy(mods, ranks):
    return sum(float(m.singular_values[: ranks[m.name]].pow(2).sum()) for m in mods)


def test_budget_split_is_near_optimal_on_small_cases():
    mods = synthetic()
    for budget in (48, 60, 90, 130):
        got = advise(mods, budget=budget)
        assert got.parameters() <= budget
        best = max(energy(mods, dict(zip([m.name for m in mods], rs)))
                   for rs in itertools.product(range(1, 7), repeat=3)
                   if sum(r * m.cost_per_rank for r, m in zip(rs, mods)) <= budget)
        assert energy(mods, got.ranks) >= 0.95 * best  # greedy on a knapsack: near-optimal, not always optimal


def test_tolerance_gives_the_smallest_rank_per_module():
    mods = synthetic()
    got = advise(mods, tol=0.4)
    for m in mods:
        r = got.ranks[m.name]
        assert m.relative_error(r) <= 0.4 and (r == 1 or m.relative_error(r - 1) > 0.4)


def test_deltas_from_a_tuned_copy_and_the_pattern_round_trips(tmp_path):
    base, tuned = tiny_model("gpt2"), tiny_model("gpt2")
    with torch.no_grad():
        u, v = torch.randn(tuned.transformer.h[0].attn.c_attn.weight.shape[0], 2), torch.randn(2, tuned.transformer.h[0].attn.c_attn.weight.shape[1])
        tuned.transformer.h[0].attn.c_attn.weight += u @ v  # a rank-2 change (Conv1D keeps [in, out])
    names = ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]
    deltas = weight_deltas(base, tuned, names)
    assert deltas[names[0]].shape == (96, 32)  # [out, in]
    mods = spectra(base, deltas)
    advice = advise(mods, tol=1e-4)
    assert advice.ranks[names[0]] == 2 and advice.ranks[names[1]] == 1
    cfg = advice.lora_config(alpha=8)
    model = lorakit.attach(tiny_model("gpt2"), cfg)
    ranks = {n: layer.r for n, layer in lorakit.lora_layers(model)}
    assert ranks == advice.ranks
    doc = json.loads(advice.to_json(tmp_path / "advice.json").read_text())
    assert doc["rank_pattern"] == advice.ranks


def test_cli_rank_advice_then_train_with_it(tiny_bert_dir, sentiment_csv, tmp_path, capsys):
    from lorakit.cli import main

    out = tmp_path / "advice"
    assert main(["rank-advice", "--model", tiny_bert_dir, "--data", sentiment_csv, "--steps", "3", "--budget", "2000",
                 "--targets", "attn-qkv", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "rank" in text and "adapter parameters" in text
    pattern = json.loads((out / "advice.json").read_text())["rank_pattern"]
    assert len(pattern) == 6 and sum(pattern.values()) >= 6
    run = tmp_path / "run"
    assert main(["train", "--model", tiny_bert_dir, "--data", sentiment_csv, "--steps", "2", "--targets", "attn-qkv",
                 "--rank-pattern", str(out / "advice.json"), "--eval-limit", "8", "--out", str(run), "--quiet"]) == 0
    saved = json.loads((run / "adapter_config.json").read_text())
    assert {k: v for k, v in saved["rank_pattern"].items()} == pattern


def test_cli_rank_advice_from_a_tuned_checkpoint(tiny_llama_dir, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from lorakit.cli import main

    tuned = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    with torch.no_grad():
        q = tuned.model.layers[0].self_attn.q_proj.weight
        q += torch.randn(q.shape[0], 2) @ torch.randn(2, q.shape[1])  # a rank-2 change in one module
    tuned.save_pretrained(tmp_path / "tuned")
    out = tmp_path / "advice"
    assert main(["rank-advice", "--model", tiny_llama_dir, "--tuned", str(tmp_path / "tuned"), "--tol", "0.01",
                 "--targets", "attn-qv", "--out", str(out)]) == 0
    pattern = json.loads((out / "advice.json").read_text())["rank_pattern"]
    assert max(pattern.values()) == 2 and max(pattern, key=pattern.get).endswith("layers.0.self_attn.q_proj")


def test_bad_input():
    mods = synthetic()
    with pytest.raises(ConfigError, match="exactly one of tol"):
        advise(mods)
    with pytest.raises(ConfigError, match="exactly one of tol"):
        advise(mods, tol=0.1, budget=100)
    with pytest.raises(ConfigError, match="budget=10 adapter parameters is below"):
        advise(mods, budget=10)
    with pytest.raises(ConfigError, match="tol=1.5"):
        advise(mods, tol=1.5)


def test_cli_rank_advice_checks_the_budget_before_fine_tuning(tiny_bert_dir, sentiment_csv, tmp_path, capsys):
    from lorakit.cli import main

    out = tmp_path / "advice"
    assert main(["rank-advice", "--model", tiny_bert_dir, "--data", sentiment_csv, "--steps", "3", "--budget", "10",
                 "--targets", "attn-qkv", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "budget=10 adapter parameters is below 384" in err and "checked before the fine-tuning" in err
    assert not (out / "full-finetune" / "metrics.jsonl").exists()  # no training ran
