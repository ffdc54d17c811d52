"""Acceptance 4 and 5 on the built-in models: poly within tolerance where certified, auto never beyond it."""

import pytest
import torch

from lorakit.limits import decisions, measure_norms, rescale_query_key, use_attention
from lorakit.train.models import load_model, load_tokenizer

pytestmark = pytest.mark.real_model
TEXTS = ["the film was a quiet triumph of acting and patience", "no.",
         "an overlong and tedious mess that never finds its footing at all"]


def loaded(spec, task):
    tok = load_tokenizer(spec)
    model = load_model(spec, task, label_names=["neg", "pos"] if task == "classify" else None, tokenizer=tok).model.eval()
    enc = tok(TEXTS, return_tensors="pt", padding=True)
    return model, {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def real_logits(model, batch):
    with torch.no_grad():
        out = model(**batch).logits
    return out[batch["attention_mask"].bool()] if out.dim() == 3 else out


@pytest.mark.parametrize("spec,task", [("builtin:minilm", "classify"), ("builtin:smollm2", "causal-lm")])
def test_poly_and_auto_on_the_builtin_models(spec, task):
    tolerance = 1e-3
    model, batch = loaded(spec, task)
    ref = real_logits(model, batch)
    # real weights: logits far above threshold, nothing is certified, auto must fall back everywhere
    use_attention(model, "auto", tolerance, crossover_per_feature=0.0)
    torch.testing.assert_close(real_logits(model, batch), ref, rtol=0, atol=0)
    assert {d["impl"] for d in decisions(model).values()} == {"exact"}
    # a norm-controlled variant (query/key projections scaled so every layer's certified bound <= 0.1)
    model.set_attn_implementation("sdpa")
    factors = rescale_query_key(model, batch, 0.1)
    assert len(factors) == len(measure_norms(model, batch).layers())
    ref = real_logits(model, batch)
    for mode in ("poly", "auto"):
        use_attention(model, mode, tolerance, crossover_per_feature=0.0)
        out = real_logits(model, batch)
        made = decisions(model).values()
        assert all(d["impl"] == "poly-2" and d["bound"] <= tolerance for d in made), made  # the certificate holds
        assert (out - ref).abs().max() <= tolerance * ref.abs().max()


@pytest.mark.parametrize("spec", ["builtin:minilm", "builtin:smollm2"])
def test_lorakit_norms_cli_on_the_builtin_models(spec, tmp_path, capsys):
    """Acceptance 5: `lorakit norms` works on both built-in models (table, JSON, heat-map)."""
    from lorakit.cli import main

    assert main(["norms", "--model", spec, "--rows", "3", "--max-length", "48", "--out", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "sqrt(log L)" in text and "above threshold" in text
    assert (tmp_path / "norms.png").stat().st_size > 5000 and (tmp_path / "norms.json").exists()
