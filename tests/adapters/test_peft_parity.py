"""Acceptance 1 and 2 of "lorakit core": the same numbers as PEFT, and files both ways."""

import copy

import peft
import pytest
import torch

import lorakit
from lorakit.adapters.attach import lora_layers, state
from lorakit.bench import versus_peft
from lorakit.bench.versus_peft import ours_name

CASES = [
    ("bert-cls", "attn-qv"),
    ("bert-cls", "all-linear"),
    ("llama", "attn-qkv"),
    ("llama", "all-linear"),
    ("opt", "attn-qv"),
    ("gpt2", "attn-qkv"),
    ("gpt2", "all-linear"),
]


def randomise_adapters(model, seed=0):
    """Non-zero B so the adapters change the output (B = 0 at init would hide a wrong formula)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.A.copy_(torch.randn(layer.A.shape, generator=g) * 0.3)
            layer.B.copy_(torch.randn(layer.B.shape, generator=g) * 0.3)


def peft_twin(base, ours):
    """A PEFT model on a copy of ``base`` with the same targets and the same adapter weights."""
    return versus_peft.peft_twin(base, ours, state(ours).config)


def logits_of(model, ids, mask):
    return model(input_ids=ids, attention_mask=mask).logits


def loss_of(out):
    return (out.float() ** 2).mean() if out.dim() == 2 else out.float().logsumexp(-1).mean()


@pytest.mark.parametrize("kind,targets", CASES)
def test_same_logits_and_gradients_as_peft(make_model, token_batch, kind, targets):
    base = make_model(kind)
    ours = lorakit.attach(copy.deepcopy(base), lorakit.LoraConfig(r=4, alpha=8, targets=targets))
    randomise_adapters(ours)
    twin = peft_twin(base, ours)
    ids, mask = token_batch()
    a, b = logits_of(ours, ids, mask), logits_of(twin, ids, mask)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    loss_of(a).backward()
    loss_of(b).backward()
    twin_grads = {
        ours_name(n): p.grad
        for n, p in twin.named_parameters()
        if p.requires_grad
    }
    ours_grads = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    assert set(ours_grads) == set(twin_grads)
    for n, g in ours_grads.items():
        torch.testing.assert_close(g, twin_grads[n], rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.real_model
def test_same_logits_and_gradients_as_peft_on_minilm(minilm_dir):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    base = AutoModelForSequenceClassification.from_pretrained(minilm_dir, num_labels=2).eval()
    tok = AutoTokenizer.from_pretrained(minilm_dir)
    batch = tok(["a gripping, funny film", "dull and far too long"], padding=True, return_tensors="pt")
    ours = lorakit.attach(copy.deepcopy(base), lorakit.LoraConfig(r=8, alpha=16))
    randomise_adapters(ours, seed=1)
    twin = peft_twin(base, ours)
    a = ours(**batch).logits
    b = twin(**batch).logits
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    a.square().sum().backward()
    b.square().sum().backward()
    for name, layer in lora_layers(ours):
        ref = twin.get_submodule("base_model.model." + name)
        torch.testing.assert_close(layer.A.grad, ref.lora_A["default"].weight.grad, rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(layer.B.grad, ref.lora_B["default"].weight.grad, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("kind,targets,bias", [("bert-cls", "attn-qv", "none"), ("llama", "all-linear", "lora_only"), ("gpt2", "attn-qkv", "all"), ("opt", "attn-qkv", "none")])
def test_lorakit_file_loads_in_peft(make_model, token_batch, tmp_path, kind, targets, bias):
    base = make_model(kind)
    ours = lorakit.attach(copy.deepcopy(base), lorakit.LoraConfig(r=4, alpha=8, targets=targets, bias=bias))
    randomise_adapters(ours)
    with torch.no_grad():
        for n, p in ours.named_parameters():
            if p.requires_grad and n.endswith("bias"):
                p.add_(0.1)
    lorakit.save_adapter(ours, tmp_path)
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    ids, mask = token_batch()
    torch.testing.assert_close(logits_of(loaded, ids, mask), logits_of(ours, ids, mask), atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind,targets,rslora", [("bert-cls", ["query", "value"], False), ("llama", ["q_proj", "v_proj", "down_proj"], True), ("gpt2", ["c_attn"], False)])
def test_peft_file_loads_in_lorakit(make_model, token_batch, tmp_path, kind, targets, rslora):
    base = make_model(kind)
    pcfg = peft.LoraConfig(r=4, lora_alpha=12, target_modules=targets, use_rslora=rslora, init_lora_weights=False,
                           rank_pattern={targets[0]: 2})
    twin = peft.get_peft_model(copy.deepcopy(base), pcfg)
    twin.save_pretrained(str(tmp_path))
    ours = lorakit.load_adapter(copy.deepcopy(base), tmp_path)
    ids, mask = token_batch()
    torch.testing.assert_close(logits_of(ours, ids, mask), logits_of(twin, ids, mask), atol=1e-5, rtol=0)
    assert {layer.r for name, layer in lora_layers(ours) if name.endswith(targets[0])} == {2}


def test_pissa_adapter_is_written_for_the_original_base(make_model, token_batch, tmp_path):
    """PiSSA trains on a residual base; the file is converted (rank 2r) to work on the unmodified one."""
    base = make_model("llama")
    ours = lorakit.attach(copy.deepcopy(base), lorakit.LoraConfig(r=4, alpha=8, targets="attn-qv", init="pissa"))
    ids, mask = token_batch()
    torch.testing.assert_close(logits_of(ours, ids, mask), logits_of(base, ids, mask), atol=1e-5, rtol=0)
    with torch.no_grad():
        for _, layer in lora_layers(ours):
            layer.B.add_(0.05)  # "training"
    lorakit.save_adapter(ours, tmp_path)
    assert lorakit.read_config(tmp_path).r == 8
    in_peft = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    in_ours = lorakit.load_adapter(copy.deepcopy(base), tmp_path)
    expected = logits_of(ours, ids, mask)
    torch.testing.assert_close(logits_of(in_peft, ids, mask), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(logits_of(in_ours, ids, mask), expected, atol=1e-5, rtol=0)
