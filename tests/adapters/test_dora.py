"""DoRA (issue 18, first part): logits, one-step gradients and merged weights equal PEFT's; files both ways;
merge/unmerge; bf16 storage; lorakit train --dora."""

import copy

import peft
import pytest
import torch

import lorakit
from lorakit.adapters.attach import lora_layers
from lorakit.errors import AdapterFileError, ConfigError
from lorakit.bench.versus_peft import ours_name
from test_peft_parity import logits_of, loss_of

CASES = [("llama", ["q_proj", "v_proj", "down_proj"]), ("bert-cls", ["query", "value", "dense"]), ("gpt2", ["c_attn", "c_fc"])]


def twins(base, targets):
    """PEFT's DoRA model and lorakit's, holding the same (random, non-zero) adapter and magnitude."""
    from lorakit.adapters.targets import default_modules_to_save

    twin = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=targets, use_dora=True, init_lora_weights=False,
        modules_to_save=default_modules_to_save(base) or None))  # the classifier head lorakit trains too
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in twin.named_parameters():
            if "lora_magnitude_vector" in n:
                p.mul_(1 + 0.1 * torch.randn(p.shape, generator=g))  # m away from the row norms
    ours = lorakit.attach(copy.deepcopy(base), lorakit.LoraConfig(r=4, alpha=8, targets=targets, use_dora=True))
    theirs = {ours_name(n): p for n, p in twin.named_parameters() if p.requires_grad}
    with torch.no_grad():
        for n, p in ours.named_parameters():
            if p.requires_grad:
                p.copy_(theirs[n])
    return ours, twin


@pytest.mark.parametrize("kind,targets", CASES)
def test_logits_gradients_and_merge_equal_peft(make_model, token_batch, kind, targets):
    base = make_model(kind)
    ours, twin = twins(base, targets)
    ids, mask = token_batch()
    a, b = logits_of(ours, ids, mask), logits_of(twin, ids, mask)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    loss_of(a).backward()
    loss_of(b).backward()
    theirs = {ours_name(n): p.grad for n, p in twin.named_parameters() if p.requires_grad}
    ours_grads = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    assert set(ours_grads) == set(theirs) and any(".lora_magnitude_vector." in n for n in ours_grads)
    for n, grad in ours_grads.items():
        torch.testing.assert_close(grad, theirs[n], rtol=1e-5, atol=1e-5, msg=n)
    merged_ours = lorakit.unload(copy.deepcopy(ours), merge=True)
    merged_peft = copy.deepcopy(twin).merge_and_unload()
    ref = dict(merged_peft.named_parameters())
    for n, p in merged_ours.named_parameters():
        torch.testing.assert_close(p, ref[n], atol=1e-5, rtol=1e-5, msg=n)


@pytest.mark.parametrize("kind,targets", CASES)
def test_files_both_ways(make_model, token_batch, tmp_path, kind, targets):
    base = make_model(kind)
    ours, twin = twins(base, targets)
    ids, mask = token_batch()
    twin.save_pretrained(str(tmp_path / "peft"))
    from_peft = lorakit.load_adapter(copy.deepcopy(base), tmp_path / "peft")
    torch.testing.assert_close(logits_of(from_peft, ids, mask), logits_of(twin, ids, mask), atol=1e-5, rtol=0)
    assert lorakit.read_config(tmp_path / "peft").use_dora
    lorakit.save_adapter(ours, tmp_path / "ours")
    in_peft = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "ours")).eval()
    torch.testing.assert_close(logits_of(in_peft, ids, mask), logits_of(ours, ids, mask), atol=1e-5, rtol=0)


def test_merge_unmerge_round_trip_and_refusals(make_model, token_batch, tmp_path):
    base = make_model("llama")
    ours, _ = twins(base, ["q_proj", "v_proj"])
    ids, mask = token_batch()
    before = logits_of(ours, ids, mask)
    weights = {n: p.detach().clone() for n, p in ours.named_parameters()}
    lorakit.merge(ours)
    torch.testing.assert_close(logits_of(ours, ids, mask), before, atol=1e-5, rtol=0)
    lorakit.unmerge(ours)
    for n, p in ours.named_parameters():
        torch.testing.assert_close(p, weights[n], atol=1e-6, rtol=1e-6, msg=n)
    lorakit.save_adapter(ours, tmp_path / "dora")
    plain = lorakit.attach(copy.deepcopy(base), lorakit.LoraConfig(r=4, alpha=8, targets=["q_proj", "v_proj"]))
    with pytest.raises(AdapterFileError, match="holds a DoRA adapter but the model.s adapter .default. is a plain LoRA adapter"):
        lorakit.load_adapter(plain, tmp_path / "dora")
    with pytest.raises(ConfigError, match="use_dora=True with init='pissa'"):
        lorakit.LoraConfig(use_dora=True, init="pissa")
    with pytest.raises(ConfigError, match="norm_cap with use_dora=True"):
        lorakit.LoraConfig(use_dora=True, norm_control=lorakit.NormControl(1.0))


def test_bf16_storage_keeps_dora_close(make_model, token_batch):
    base = make_model("llama")
    ours, _ = twins(base, ["q_proj", "v_proj"])
    ids, mask = token_batch()
    ref = logits_of(ours, ids, mask)
    lorakit.use_bf16(ours, when="always")
    assert all(layer.magnitude.dtype == torch.float32 and layer.magnitude.requires_grad
               for _, layer in lora_layers(ours))
    torch.testing.assert_close(logits_of(ours, ids, mask).float(), ref, atol=0.05, rtol=0.05)


def test_train_dora_flag(tiny_llama_dir, corpus_txt, tmp_path, capsys):
    from lorakit.cli import main

    code = main(["train", "--model", tiny_llama_dir, "--data", corpus_txt, "--steps", "3", "--batch-size", "2",
                 "--max-length", "16", "--dora", "--out", str(tmp_path / "o"), "--quiet"])
    assert code == 0, capsys.readouterr().err
    assert lorakit.read_config(tmp_path / "o").use_dora
    tensors, _ = lorakit.adapters.io.read_tensors(tmp_path / "o")
    assert any(k.endswith("lora_magnitude_vector") for k in tensors)
