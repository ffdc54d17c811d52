"""speed.norms: the RMSNorm modules of an adapted decoder run kernels.rms_norm in training calls -- the classes it
reproduces on a probe only -- with the same loss and gradients as the model's own norms; evaluation calls, other
norm classes, pickling and detaching see the module's own class."""

import copy
import io

import pytest
import torch
import transformers as tf
from torch import nn

import lorakit
from lorakit.speed import fast_path
from lorakit.speed.norms import fast_norms, probed_style, restore_norms

DECODER = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0)


def build(family: str, dtype=torch.float32) -> nn.Module:
    torch.manual_seed(0)
    if family == "llama":
        model = tf.LlamaForCausalLM(tf.LlamaConfig(**DECODER))
    elif family == "qwen3":  # q_norm and k_norm over each head too
        model = tf.Qwen3ForCausalLM(tf.Qwen3Config(**DECODER, head_dim=8))
    else:
        model = tf.Gemma3ForCausalLM(tf.Gemma3TextConfig(**DECODER, head_dim=8, sliding_window=4))
    with torch.no_grad():
        for m in model.modules():
            if type(m).__name__.endswith("RMSNorm"):
                m.weight.normal_(0.3, 0.5)  # not the init's ones / zeros: the cast order shows
    return model.to(dtype)


def norm_modules(model):
    return [m for m in model.modules() if type(m).__name__.endswith("RMSNorm")]


@pytest.mark.parametrize("family,style", [("llama", "weight-after-cast"), ("qwen3", "weight-after-cast"),
                                          ("gemma3", "offset-before-cast")])
def test_probe_finds_each_family_style(family, style):
    assert {probed_style(m) for m in norm_modules(build(family))} == {style}


class HalfwayRMSNorm(nn.Module):  # RMS over (mean + eps) without the square root: neither style
    def __init__(self, size):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.variance_epsilon = 1e-6

    def forward(self, x):
        return self.weight * (x / (x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))


class CastLastRMSNorm(HalfwayRMSNorm):  # (w n).to(dtype): the Llama formula with the cast after the weight
    def forward(self, x):
        n = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return (self.weight.float() * n).to(x.dtype)


@pytest.mark.parametrize("cls", [HalfwayRMSNorm, CastLastRMSNorm])
def test_a_class_neither_style_reproduces_keeps_its_own_forward(cls):
    holder = nn.Sequential(cls(64))
    assert probed_style(holder[0]) is None
    assert fast_norms(holder) == 0 and type(holder[0]) is cls


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma3"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_adapted_model_trains_the_same_with_fused_norms(family, dtype):
    ids = torch.randint(3, 97, (2, 12), generator=torch.Generator().manual_seed(1))
    results = []
    for fused in (False, True):  # the same fast model, its norms fused or given their own class back
        model = lorakit.attach(build(family, dtype), lorakit.LoraConfig(r=4, alpha=8, targets="all-linear"))
        torch.manual_seed(2)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0.0, 0.1)  # B = 0 at init would leave A's gradients zero
        assert fast_path(model).norms == len(norm_modules(model)) > 0
        assert all(type(m).__mro__[1].__name__ == type(m).__name__ for m in norm_modules(model))
        if not fused:
            restore_norms(model)
        model.train()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    (loss0, grads0), (loss1, grads1) = results
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-5
    assert torch.allclose(loss0.float(), loss1.float(), rtol=tol)
    assert grads0.keys() == grads1.keys()
    for name in grads0:
        g0, g1 = grads0[name].float(), grads1[name].float()
        assert torch.allclose(g0, g1, rtol=tol, atol=tol * g0.abs().max().item()), name


def test_evaluation_calls_run_the_own_forward():
    model = lorakit.attach(build("llama", torch.bfloat16), lorakit.LoraConfig(r=4, targets="all-linear"))
    norm = norm_modules(model)[0]
    x = torch.randn(2, 5, 32, dtype=torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(norm(x), type(norm).__mro__[1].forward(norm, x))


def test_pickle_deepcopy_and_detach_see_the_own_class():
    model = lorakit.attach(build("llama"), lorakit.LoraConfig(r=4, targets="all-linear"))
    fused = type(norm_modules(model)[0])
    own = fused.__mro__[1]
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert {type(m) for m in norm_modules(loaded)} == {fused}
    assert {type(m) for m in norm_modules(copy.deepcopy(model))} == {fused}
    restore_norms(loaded)
    assert {type(m) for m in norm_modules(loaded)} == {own}
    lorakit.unload(model, merge=False)
    assert {type(m) for m in norm_modules(model)} == {own}
