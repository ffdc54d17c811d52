"""training_loss: the model's own loss, with the head and cross-entropy fused where that is exact."""

import copy

import pytest
import torch

import lorakit
from lorakit.train.loss import fused_head, training_loss


def batch_for(ids, mask):
    labels = ids.clone()
    labels[mask == 0] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@pytest.mark.parametrize("kind", ["llama", "opt", "gpt2"])
def test_fused_loss_equals_model_loss_with_same_gradients(make_model, token_batch, kind):
    model = lorakit.attach(make_model(kind), lorakit.LoraConfig(r=4, alpha=8, targets="all-linear"))
    with torch.no_grad():
        for _, layer in lorakit.lora_layers(model):
            layer.B.normal_(0, 0.2)
    twin = copy.deepcopy(model)
    batch = batch_for(*token_batch(batch=3, length=11))
    assert fused_head(model) is not None
    ours, ref = training_loss(model, batch), twin(**batch).loss
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    ours.backward()
    ref.backward()
    ref_grads = dict(twin.named_parameters())
    for name, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, ref_grads[name].grad, rtol=1e-4, atol=1e-6, msg=name)


def test_falls_back_to_the_model_loss(make_model, token_batch):
    ids, mask = token_batch()
    cls = lorakit.attach(make_model("bert-cls"), lorakit.LoraConfig(r=4, alpha=8, targets="attn-qv"))
    assert fused_head(cls) is None  # not a causal LM
    b = {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([0, 1])}
    torch.testing.assert_close(training_loss(cls, b), cls(**b).loss)
    head_adapted = lorakit.attach(make_model("llama"), lorakit.LoraConfig(r=4, alpha=8, targets=["q_proj", "lm_head"]))
    assert fused_head(head_adapted) is None  # an adapter on the head changes the logits
    capped = make_model("llama")
    capped.config.final_logit_softcapping = 30.0
    assert fused_head(capped) is None
