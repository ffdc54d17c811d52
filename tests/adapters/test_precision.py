"""use_bf16: frozen weights in bf16, everything that trains in float32, loss close to float32 training."""

import copy

import pytest
import torch

import lorakit
from lorakit.speed.attention import LORAKIT_SDPA
from lorakit.adapters.precision import use_bf16
from lorakit.errors import ConfigError


def lm_batch(ids, mask):
    labels = ids.clone()
    labels[mask == 0] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def train(model, batch, steps=40, lr=1e-2):
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    return losses, opt


def test_frozen_weights_bf16_trainable_float32_and_training_tracks_float32(make_model, token_batch):
    fp32 = lorakit.attach(make_model("llama"), lorakit.LoraConfig(r=4, alpha=8, targets="all-linear"))
    bf16 = use_bf16(copy.deepcopy(fp32), when="always")
    for name, p in bf16.named_parameters():
        assert p.dtype == (torch.float32 if p.requires_grad else torch.bfloat16), name
    assert bf16.config._attn_implementation == LORAKIT_SDPA
    frozen_bytes = lambda m: sum(p.numel() * p.element_size() for p in m.parameters() if not p.requires_grad)  # noqa: E731
    assert frozen_bytes(bf16) * 2 == frozen_bytes(fp32)
    batch = lm_batch(*token_batch(batch=4, length=12))
    a, _ = train(fp32, batch)
    b, opt = train(bf16, batch)
    assert a[-1] < 0.9 * a[0] and b[-1] < 0.9 * b[0]  # both learn
    assert abs(b[-1] - a[-1]) / a[-1] < 0.05
    for state in opt.state.values():
        assert all(v.dtype == torch.float32 for v in state.values() if torch.is_tensor(v) and v.dim() > 0)


def test_classifier_head_stays_float32(make_model, token_batch):
    model = use_bf16(lorakit.attach(make_model("bert-cls"), lorakit.LoraConfig(r=4, alpha=8, targets="attn-qv")), when="always")
    assert model.classifier.weight.dtype == torch.float32
    ids, mask = token_batch()
    out = model(input_ids=ids, attention_mask=mask, labels=torch.tensor([0, 1]))
    assert out.logits.dtype == torch.float32
    out.loss.backward()
    assert model.classifier.weight.grad.dtype == torch.float32
    assert all(layer.A.grad.dtype == torch.float32 for _, layer in lorakit.lora_layers(model))


def test_mixed_frozen_and_trainable_layer_is_refused(make_model):
    model = lorakit.attach(make_model("bert-cls"), lorakit.LoraConfig(r=4, alpha=8, targets="attn-qv", bias="all"))
    with pytest.raises(ConfigError, match="both frozen and trainable"):
        use_bf16(model, when="always")
    with pytest.raises(ConfigError, match="not a 16-bit float"):
        use_bf16(make_model("llama"), torch.float32)


def test_blocks_of_packed_adapted_linears_compute_in_bf16(make_model, token_batch):
    """A packed base (lorakit.quantize): an attention or MLP block whose linears are all adapted holds only adapter
    parameters (the packed weights are buffers). It is not a trainable module run in float32: its products take the
    activations' bf16, as the bf16 base's do (they ran in fp32 before, 2.4x slower on a CPU with fast bf16)."""
    model = lorakit.quantize(make_model("llama"), bits=8)
    model = use_bf16(lorakit.attach(model, lorakit.LoraConfig(r=4, alpha=8, targets="all-linear")), when="always")
    layer = model.model.layers[0]
    assert not layer.mlp._forward_pre_hooks and not layer.self_attn._forward_pre_hooks
    seen = {}
    for name in ("mlp.gate_proj", "mlp.down_proj", "self_attn.q_proj", "self_attn.o_proj"):
        layer.get_submodule(name).register_forward_pre_hook(lambda m, args, name=name: seen.update({name: args[0].dtype}))
    ids, mask = token_batch()
    model(**lm_batch(ids, mask)).loss.backward()
    assert seen == dict.fromkeys(seen, torch.bfloat16) and len(seen) == 4
    assert all(layer.A.grad.dtype == torch.float32 for _, layer in lorakit.lora_layers(model))
