"""Packing: rows packed into one sequence give the loss and gradients of the same rows padded (1e-5)."""

import random

import pytest
import torch

import lorakit
from lorakit.train.data import collate
from lorakit.train.packing import pack_rows, packing_is_exact, padding_fraction


def lm_rows(n: int, vocab: int = 97, seed: int = 0, prompt: bool = True):
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        ids = [rng.randrange(3, vocab) for _ in range(rng.randint(3, 17))]
        cut = rng.randint(1, len(ids) - 1) if prompt else 1
        rows.append({"input_ids": ids, "labels": [-100] * cut + ids[cut:]})
    return rows


def test_pack_rows_keeps_every_token_and_restarts_positions():
    rows = lm_rows(40)
    packed = pack_rows(rows, 48)
    assert all(len(p["input_ids"]) <= 48 for p in packed) and len(packed) < len(rows) / 2
    assert sorted(t for p in packed for t in p["input_ids"]) == sorted(t for r in rows for t in r["input_ids"])
    for p in packed:
        starts = [i for i, pos in enumerate(p["position_ids"]) if pos == 0]
        assert starts[0] == 0 and all(p["labels"][s] == -100 for s in starts)
    trained = sum(label != -100 for p in packed for label in p["labels"])
    assert trained == sum(label != -100 for r in rows for label in r["labels"][1:])
    assert padding_fraction(rows, 8) > padding_fraction(packed, 8)


def test_packed_collate_has_no_mask_and_a_separate_padding_sequence():
    packed = pack_rows(lm_rows(6), 64)
    b = collate(packed + [{"input_ids": [5, 6], "labels": [-100, 6], "position_ids": [0, 1]}], 0)
    assert set(b) == {"input_ids", "labels", "position_ids"}
    last = b["position_ids"][-1].tolist()
    assert last[:4] == [0, 1, 0, 1] and (b["labels"][-1, 2:] == -100).all()


def _loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    loss = model(**batch, use_cache=False).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("fast", [True, False])
def test_packed_loss_and_gradients_equal_padded(kind, fast, make_model):
    model = make_model(kind)
    lorakit.attach(model, lorakit.LoraConfig(r=4, targets="all-linear", init="gaussian"), fast=fast)
    model.train()
    rows = lm_rows(12)
    padded = collate(rows, 0)
    packed = collate(pack_rows(rows, 64), 0)
    assert packed["input_ids"].numel() < padded["input_ids"].numel()
    loss_a, grads_a = _loss_and_grads(model, padded)
    loss_b, grads_b = _loss_and_grads(model, packed)
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-5, atol=1e-6)
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-5, atol=1e-6, msg=name)


def test_packing_check_accepts_honest_models_and_refuses_a_leaking_one(make_model, monkeypatch):
    rows = lm_rows(6)
    for kind in ("llama", "gpt2"):
        assert packing_is_exact(make_model(kind), rows), kind
    model = make_model("llama")
    model.config.use_cache = True  # the check itself runs without a cache, whatever the config says
    assert packing_is_exact(model, rows)
    from lorakit.limits import use_attention

    use_attention(model, "exact")  # lorakit's limits attention takes transformers' packed 4-D mask as it is
    assert packing_is_exact(model, rows)
    # OPT derives its positions from the attention mask, not position_ids: packed rows would see each other
    assert not packing_is_exact(make_model("opt"), rows)
    # a transformers that does not look for restarts (older than the packed-sequence masks)
    from transformers import masking_utils

    monkeypatch.setattr(masking_utils, "find_packed_sequence_indices", lambda position_ids: None)
    assert not packing_is_exact(make_model("llama"), rows)


def test_a_cache_makes_rows_attend_to_each_other(make_model):
    """Why lorakit train sets use_cache=False: with a cache transformers does not look for the restarts."""
    model = make_model("llama")
    rows = lm_rows(3)
    b = {k: v for k, v in collate(pack_rows(rows, 64), 0).items() if k != "labels"}
    with torch.no_grad():
        with_cache = model(**b, use_cache=True).logits
        without = model(**b, use_cache=False).logits
    assert (with_cache - without).abs().max() > 1e-3
