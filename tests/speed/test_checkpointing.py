"""Activation checkpointing (speed.checkpointing) changes memory, never gradients: each fast path, with and without."""

import pytest
import torch

import lorakit
from lorakit.speed.checkpointing import is_checkpointing, use_gradient_checkpointing
from lorakit.speed.forward import fast_path

from conftest import tiny_model


def _adapted(kind, **lora):
    model = tiny_model(kind)
    torch.manual_seed(1)
    lorakit.attach(model, lorakit.LoraConfig(r=4, targets="all-linear", **lora))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(n))) * 0.1)
    return model


def _grads(model, batch, seed=5):
    model.train()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # the same dropout masks for both runs
    out = model(**batch)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _assert_same(a, b, rtol=1e-6):
    (la, ga), (lb, gb) = a, b
    assert torch.allclose(la, lb, rtol=rtol, atol=0), (la, lb)
    assert ga.keys() == gb.keys() and ga
    for name in ga:
        assert torch.allclose(ga[name], gb[name], rtol=rtol, atol=rtol * ga[name].abs().max().item()), name


def _with_and_without(model, batch):
    plain = _grads(model, batch)
    use_gradient_checkpointing(model)
    assert is_checkpointing(model)
    return plain, _grads(model, batch)


def _ids(rows=2, length=9, seed=0):
    return torch.randint(3, 97, (rows, length), generator=torch.Generator().manual_seed(seed))


def test_decoder_with_the_fused_head_and_adapter_dropout():
    model = _adapted("llama", dropout=0.1)
    assert fast_path(model).kind == "fused-head"
    ids = _ids()
    _assert_same(*_with_and_without(model, {"input_ids": ids, "labels": ids}))


def test_encoder_classifier_on_the_first_token_path():
    model = _adapted("bert-cls")
    assert fast_path(model).kind == "first-token"
    _assert_same(*_with_and_without(model, {"input_ids": _ids(), "labels": torch.tensor([0, 1])}))


def test_dora():
    model = _adapted("llama", use_dora=True)
    ids = _ids()
    _assert_same(*_with_and_without(model, {"input_ids": ids, "labels": ids}))


def test_packed_rows():
    """Two rows packed in one sequence (position ids restarting at the boundary, no padding mask)."""
    model = _adapted("llama")
    ids = _ids(1, 12)
    positions = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 6]])
    labels = ids.clone()
    labels[0, 5] = -100
    _assert_same(*_with_and_without(model, {"input_ids": ids, "labels": labels, "position_ids": positions}))


def test_celora_keeps_its_selected_features_and_gradients():
    """The recompute is a forward: CE-LoRA's selection, read in the backward once per layer, is neither refreshed
    nor changed, and the approximate gradients are those without checkpointing."""
    from lorakit import celora

    def make():
        return _adapted("llama", backward="celora", celora=lorakit.CeloraConfig(keep_ratio=0.5, refresh_every=100))

    plain, checkpointed = make(), make()
    use_gradient_checkpointing(checkpointed)
    ids = _ids()
    batch = {"input_ids": ids, "labels": ids}
    for step in range(3):  # step 0 refreshes (exact, accumulating scores); steps 1-2 use the selection
        _assert_same(_grads(plain, batch, seed=step), _grads(checkpointed, batch, seed=step))
        celora.step(plain), celora.step(checkpointed)
        a, b = celora.controller(plain).selectors, celora.controller(checkpointed).selectors
        assert a.keys() == b.keys()
        for name in a:
            assert a[name].refreshes == b[name].refreshes == 1
            assert torch.equal(a[name].idx, b[name].idx), name


def test_transformers_own_enable_on_an_adapted_model_and_hf_trainer(tmp_path):
    """model.gradient_checkpointing_enable() as a user calls it, and HF Trainer(gradient_checkpointing=True)."""
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    ids = _ids(4, 9)
    rows = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})
    losses = {}
    for checkpointing in (False, True):
        model = _adapted("llama")
        if checkpointing:
            model.gradient_checkpointing_enable()
            assert is_checkpointing(model)
        args = TrainingArguments(output_dir=str(tmp_path / str(checkpointing)), per_device_train_batch_size=2, max_steps=2,
                                 learning_rate=1e-3, report_to=[], save_strategy="no", logging_steps=1, seed=0,
                                 gradient_checkpointing=checkpointing, use_cpu=True, dataloader_num_workers=0)
        trainer = Trainer(model=model, args=args, train_dataset=rows)
        trainer.train()
        losses[checkpointing] = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        assert model.training is not None
    assert len(losses[True]) == 2 and losses[True] == pytest.approx(losses[False], rel=1e-6)


def test_a_model_transformers_cannot_checkpoint_is_refused():
    from lorakit.errors import ConfigError

    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(ConfigError, match="--gradient-checkpointing: Sequential does not support"):
        use_gradient_checkpointing(model)
