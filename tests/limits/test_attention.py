import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import tiny_model
from lorakit.errors import ConfigError, ModelError
from lorakit.limits.attention import (AttentionPolicy, decisions, lorakit_attention_forward, softmax1_attention,
                                      use_attention)


def batch(vocab=90, length=12, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (2, length), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, length - 3 :] = 0
    return {"input_ids": ids, "attention_mask": mask}


def logits(model, b):
    with torch.no_grad():
        return model(**b).logits


@pytest.mark.parametrize("kind", ["llama", "bert-cls", "gpt2", "opt"])
def test_modes_on_hf_models(kind):
    """exact = the model's own attention; poly within its certificate; softmax1 runs; decisions are recorded."""
    model = tiny_model(kind)
    b = batch()
    ref = logits(model, b)
    use_attention(model, "exact")
    torch.testing.assert_close(logits(model, b), ref, rtol=0, atol=1e-5)
    use_attention(model, "poly", 1e-3)
    out = logits(model, b)
    made = decisions(model)
    assert made and all(d["impl"].startswith("poly-") and d["bound"] <= 1e-3 for d in made.values())
    assert (out - ref).abs().max() < 1e-3 * ref.abs().max()
    use_attention(model, "softmax1")
    assert torch.isfinite(logits(model, b)).all()
    assert all(d["impl"] == "softmax1" for d in decisions(model).values())


def test_real_padding_is_respected_by_poly():
    """Changing padded tokens must not change the logits of real tokens (key-padding mask honoured)."""
    model = tiny_model("llama")
    use_attention(model, "poly", 1e-4)
    b = batch()
    other = {k: v.clone() for k, v in b.items()}
    other["input_ids"][0, -3:] = 5
    torch.testing.assert_close(logits(model, b)[0, :-3], logits(model, other)[0, :-3])


def test_softmax1_formula():
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 5, 4, generator=gen, dtype=torch.float64) for _ in range(3))
    out = softmax1_attention(q, k, v, None, True, 0.5)
    s = 0.5 * q @ k.transpose(-1, -2)
    e = torch.exp(s).tril()
    torch.testing.assert_close(out, (e / (1 + e.sum(-1, keepdim=True))) @ v)


class _Module(torch.nn.Module):
    is_causal = True


@settings(max_examples=40, deadline=None)
@given(gamma=st.floats(0.05, 12.0), tolerance=st.sampled_from([1e-2, 1e-3, 1e-5]), causal=st.booleans(),
       seed=st.integers(0, 1000))
def test_auto_never_exceeds_the_tolerance(gamma, tolerance, causal, seed):
    """Acceptance 4: auto's output is within tolerance * max|v| of softmax attention, whatever G is."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(1, 4, 40, 4, generator=gen, dtype=torch.float64)
    k = torch.randn(1, 2, 40, 4, generator=gen, dtype=torch.float64)
    v = torch.randn(1, 2, 40, 4, generator=gen, dtype=torch.float64)
    g0 = 0.5 * q.norm(dim=-1).max() * k.norm(dim=-1).max()
    q, k = q * (gamma / g0).sqrt(), k * (gamma / g0).sqrt()
    module = _Module()
    module.is_causal = causal
    module.lorakit_attention = AttentionPolicy("auto", tolerance, crossover_per_feature=0.0)  # poly whenever certified
    out, _ = lorakit_attention_forward(module, q, k, v, None, scaling=0.5)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=0.5, is_causal=causal, enable_gqa=True)
    assert (out.transpose(1, 2) - ref).abs().max() <= tolerance * v.abs().max()
    impl = module.lorakit_attention.last["impl"]
    assert impl == "exact" or module.lorakit_attention.last["bound"] <= tolerance
    if gamma > 8:
        assert impl == "exact"  # no degree <= 8 is certified there


def test_auto_prefers_exact_below_the_crossover_length():
    module = _Module()
    module.lorakit_attention = AttentionPolicy("auto", 1e-3)
    q = k = v = 0.1 * torch.randn(1, 1, 64, 8)
    lorakit_attention_forward(module, q, k, v, None, scaling=0.3)
    assert module.lorakit_attention.last["impl"] == "exact"
    assert "crossover" in module.lorakit_attention.last["reason"]


def test_auto_trains_end_to_end(tiny_llama_dir, corpus_txt, tmp_path):
    """Acceptance 4: training with --attention auto runs, and its decisions reach metrics.jsonl."""
    import json

    out = tmp_path / "run"
    from conftest import train_config
    from lorakit.train import run

    report = run(train_config(model=tiny_llama_dir, data=corpus_txt, steps=4, batch_size=4, max_length=32, attention="auto",
                             log_every=2, norm_every=2, norm_cap=0.5, targets="attn-qkv", out=str(out), quiet=True,
                             save_every=None, eval_limit=16))
    assert math.isfinite(report["result"]["after"]["eval_loss"])
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    att = [r["attention"] for r in records if "attention" in r]
    assert att and all(sum(a.values()) > 0 for a in att)
    norms = [r["norms"] for r in records if "norms" in r]
    assert [r["step"] for r in records if "norms" in r] == [2, 4]
    assert all(layer["max_logit"] <= layer["logit_bound"] * (1 + 1e-6) for n in norms for layer in n["layers"])
    assert all(r["norm_cap_max_before"] >= 0 for r in records if "norm_cap_max_before" in r)
    assert (out / "norms.png").stat().st_size > 1000


@pytest.mark.parametrize("kwargs,needle", [
    (dict(mode="poly", tolerance=0.0), "tolerance=0.0 must be a positive number"),
    (dict(mode="auto", tolerance=-1e-3), "tolerance=-0.001"),
    (dict(mode="fast"), "attention mode 'fast' is not one of"),
    (dict(mode="poly", degree=3), "degree=3 must be a positive even integer"),
])
def test_bad_settings(kwargs, needle):
    model = tiny_model("llama")
    with pytest.raises(ConfigError, match=__import__("re").escape(needle)):
        use_attention(model, **kwargs)


def test_not_a_transformers_model():
    with pytest.raises(ModelError, match="not a transformers PreTrainedModel"):
        use_attention(torch.nn.Linear(2, 2), "auto")


def test_poly_refuses_a_mask_it_cannot_factorise():
    module = _Module()
    module.lorakit_attention = AttentionPolicy("poly", 1e-3)
    q = k = v = torch.randn(1, 1, 6, 4)
    bias = torch.randn(1, 1, 6, 6)
    with pytest.raises(ModelError, match="bias"):
        lorakit_attention_forward(module, q, k, v, bias)
    module.lorakit_attention = AttentionPolicy("auto", 1e-3, crossover_per_feature=0.0)
    out, _ = lorakit_attention_forward(module, q * 0.1, k * 0.1, v, bias)  # auto falls back to exact
    assert module.lorakit_attention.last["impl"] == "exact"
    torch.testing.assert_close(out.transpose(1, 2), torch.nn.functional.scaled_dot_product_attention(q * 0.1, k * 0.1, v, attn_mask=bias))


def test_cli_train_with_attention_then_norms_of_the_adapter(tiny_llama_dir, corpus_txt, tmp_path, capsys):
    from lorakit.cli import main

    out = tmp_path / "adapter"
    assert main(["train", "--model", tiny_llama_dir, "--data", corpus_txt, "--steps", "2", "--batch-size", "4",
                 "--max-length", "32", "--targets", "attn-qkv", "--attention", "exact", "--norm-every", "1",
                 "--eval-limit", "8", "--out", str(out), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["norms", "--adapter", str(out), "--data", corpus_txt, "--rows", "2", "--per-head",
                 "--attention", "auto", "--out", str(tmp_path / "n")]) == 0
    text = capsys.readouterr().out
    header = next(line for line in text.splitlines() if line.startswith("layer"))
    assert "q_share" in header and "attention" in header
    first = next(line for line in text.splitlines() if line.startswith("model.layers.0"))
    assert " - " not in first  # every projection has an adapter share
    with pytest.raises(SystemExit) as refused:  # argparse's check: one `lorakit: error:` line, status 2
        main(["norms", "--model", tiny_llama_dir, "--data", corpus_txt, "--attention", "auto", "--tolerance", "0"])
    assert refused.value.code == 2
    assert "argument --tolerance: 0 is not a finite number > 0" in capsys.readouterr().err
