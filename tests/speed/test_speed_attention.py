"""lorakit_sdpa: the same outputs and gradients as transformers' SDPA attention, dropout masks included."""

import copy

import torch

import lorakit
from lorakit.speed.attention import LORAKIT_SDPA, use_fast_attention


def test_same_logits_and_gradients_as_sdpa_with_grouped_query_heads(make_model, token_batch):
    base = lorakit.attach(make_model("llama"), lorakit.LoraConfig(r=4, alpha=8, targets="all-linear"))
    with torch.no_grad():
        for _, layer in lorakit.lora_layers(base):
            layer.B.normal_(0, 0.3)
    fast = copy.deepcopy(base)
    assert use_fast_attention(fast) and fast.config._attn_implementation == LORAKIT_SDPA
    assert base.config.num_key_value_heads < base.config.num_attention_heads
    ids, mask = token_batch(batch=2, length=10)
    a, b = base(input_ids=ids, attention_mask=mask).logits, fast(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    a.square().mean().backward()
    b.square().mean().backward()
    ref = dict(base.named_parameters())
    for name, p in fast.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, ref[name].grad, rtol=1e-4, atol=1e-6, msg=name)


def test_torch_dropout_masks_unchanged_and_eager_models_left_alone(make_model, token_batch):
    base = make_model("bert-cls")
    for m in base.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.3
    base.train()
    fast = copy.deepcopy(base)
    use_fast_attention(fast)
    ids, mask = token_batch()
    torch.manual_seed(5)
    a = base(input_ids=ids, attention_mask=mask).logits
    torch.manual_seed(5)
    b = fast(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(b, a)
    eager = make_model("llama")
    eager.set_attn_implementation("eager")
    assert not use_fast_attention(eager) and eager.config._attn_implementation == "eager"
