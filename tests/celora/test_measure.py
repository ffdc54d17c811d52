"""The approximation's error on real weights and gradients (celora.measure)."""

import statistics

import pytest
import torch

import lorakit
from lorakit import celora
from lorakit.celora.measure import layer_errors


@pytest.mark.real_model
def test_double_lora_and_score_selection_on_minilm(minilm_dir):
    """Acceptance 2: on MiniLM's real weights and gradients, Double-LoRA lowers the dX error of
    plain top-k at the same keep ratio, and the column-row score beats weight-only ranking."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from lorakit.train.data import rotten_tomatoes

    model = AutoModelForSequenceClassification.from_pretrained(minilm_dir, num_labels=2)
    tok = AutoTokenizer.from_pretrained(minilm_dir)
    texts, labels, *_ = rotten_tomatoes()
    def batch(lo, hi):
        enc = tok(texts[lo:hi], padding=True, truncation=True, max_length=64, return_tensors="pt")
        return {**enc, "labels": torch.tensor(labels[lo:hi])}
    torch.manual_seed(0)
    lorakit.attach(model, lorakit.LoraConfig(r=8, targets="all-linear"))
    plan = celora.keep_ratios("bert", [n for n, _ in lorakit.lora_layers(model)], None)
    errors = layer_errors(model, (batch(0, 32), batch(32, 64)), plan, svd_ranks=(0, 8), selections=("score", "weight"))
    mean = {(r0, s): statistics.mean(e.relative_error for e in errors if e.svd_rank == r0 and e.selection == s)
            for r0 in (0, 8) for s in ("score", "weight")}
    assert mean[(8, "score")] < mean[(0, "score")] and mean[(8, "weight")] < mean[(0, "weight")]
    assert mean[(0, "score")] < mean[(0, "weight")] and mean[(8, "score")] < mean[(8, "weight")]
    per_layer = {}
    for e in errors:
        per_layer.setdefault(e.name, {})[(e.svd_rank, e.selection)] = e.relative_error
    better = sum(v[(8, "score")] < v[(0, "score")] for v in per_layer.values())
    assert better >= 0.8 * len(per_layer), f"Double-LoRA helps in {better} of {len(per_layer)} layers"
