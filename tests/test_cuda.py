"""The GPU path, where there is a GPU (marked ``cuda``: skipped, with the reason, on a CPU-only machine).

Each test runs one of lorakit's fast paths on the GPU against its plain reference on the same GPU: the fused LM head
(fp32 and under bf16 autocast), polynomial attention, the LoRA layer and DoRA against PEFT, the rows-the-head-reads
path of a BERT classifier, and a bf16 training run resumed bit for bit. ``benchmarks/gpu_check.py`` runs them; with
``LORAKIT_CUDA_TESTS_ON=cpu`` they run on the CPU instead (the script's --dry-run: their plumbing, not the GPU).
"""

from __future__ import annotations

import copy
import os

import pytest
import torch

from conftest import tiny_model, train_config
from lorakit import LoraConfig, attach

pytestmark = pytest.mark.cuda


@pytest.fixture
def gpu() -> torch.device:
    return torch.device(os.environ.get("LORAKIT_CUDA_TESTS_ON", "cuda"))


def batch(device, vocab=64, rows=2, length=24, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (rows, length), generator=g)
    return {"input_ids": ids.to(device), "labels": ids.to(device)}


def loss_and_grads(model, inputs, autocast: bool = False):
    model.zero_grad(set_to_none=True)
    with torch.autocast(inputs["input_ids"].device.type, dtype=torch.bfloat16, enabled=autocast):
        loss = model(**inputs).loss
    loss.backward()
    return loss.detach().float(), {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same(a, b, rtol, atol):
    torch.testing.assert_close(a[0], b[0], rtol=rtol, atol=atol)
    assert a[1].keys() == b[1].keys() and a[1]
    for name in a[1]:
        torch.testing.assert_close(a[1][name], b[1][name], rtol=rtol, atol=atol, msg=name)


@pytest.mark.parametrize("autocast,tol", [(False, 1e-5), (True, 2e-2)])
def test_fused_head_matches_the_unfused_head(gpu, autocast, tol):
    base = tiny_model("llama").to(gpu)
    fused = attach(copy.deepcopy(base), LoraConfig(r=4, targets="all-linear", init="gaussian"))
    plain = attach(copy.deepcopy(base), LoraConfig(r=4, targets="all-linear", init="gaussian"), fast=False)
    plain.load_state_dict(fused.state_dict())
    inputs = batch(gpu)
    assert_same(loss_and_grads(fused, inputs, autocast), loss_and_grads(plain, inputs, autocast), tol, tol)


def test_lora_and_dora_layers_match_peft(gpu):
    from lorakit.bench.versus_peft import ours_name, peft_twin

    base = tiny_model("llama").to(gpu)
    for dora in (False, True):
        cfg = LoraConfig(r=4, targets="all-linear", init="gaussian", use_dora=dora)
        ours = attach(copy.deepcopy(base), cfg)
        twin = peft_twin(base, ours, cfg).to(gpu)
        inputs = batch(gpu)
        a, b = loss_and_grads(ours, inputs), loss_and_grads(twin, inputs)
        torch.testing.assert_close(a[0], b[0], rtol=1e-5, atol=1e-5)
        grads_b = {ours_name(n): g for n, g in b[1].items()}
        assert grads_b.keys() == a[1].keys()
        for name, g in a[1].items():
            torch.testing.assert_close(g, grads_b[name], rtol=1e-4, atol=1e-5, msg=name)


def test_poly_attention_matches_softmax_within_its_certified_bound(gpu):
    from lorakit.limits import use_attention

    base = tiny_model("llama").to(gpu)
    model = attach(copy.deepcopy(base), LoraConfig(r=4, targets="attn-qv"))
    inputs = batch(gpu)
    exact, _ = loss_and_grads(model, inputs)
    use_attention(model, "poly", degree=4)
    poly, grads = loss_and_grads(model, inputs)
    assert torch.isfinite(poly) and all(torch.isfinite(g).all() for g in grads.values())
    torch.testing.assert_close(poly, exact, rtol=1e-2, atol=1e-2)


def test_first_token_classifier_matches_the_full_model(gpu):
    base = tiny_model("bert-cls", num_labels=2).to(gpu)
    fast = attach(copy.deepcopy(base), LoraConfig(r=4, targets="attn-qv", init="gaussian"))
    plain = attach(copy.deepcopy(base), LoraConfig(r=4, targets="attn-qv", init="gaussian"), fast=False)
    plain.load_state_dict(fast.state_dict())
    ids = batch(gpu, vocab=64)["input_ids"]
    inputs = {"input_ids": ids, "labels": torch.tensor([0, 1], device=gpu)}
    assert_same(loss_and_grads(fast, inputs), loss_and_grads(plain, inputs), 1e-5, 1e-5)


def test_bf16_training_resumes_bit_for_bit(gpu, tiny_llama_dir, corpus_txt, tmp_path):
    import shutil

    from lorakit.train import run
    from safetensors.torch import load_file

    settings = dict(model=tiny_llama_dir, data=corpus_txt, steps=6, save_every=3, batch_size=4, max_length=32,
                    targets="all-linear", rank=4, bf16=True, device=str(gpu), quiet=True)
    run(train_config(out=str(tmp_path / "whole"), **settings))
    (tmp_path / "resumed" / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "whole" / "checkpoints" / "step-000003",
                    tmp_path / "resumed" / "checkpoints" / "step-000003")
    run(train_config(out=str(tmp_path / "resumed"), resume=True, **settings))
    a = load_file(tmp_path / "whole" / "adapter_model.safetensors")
    b = load_file(tmp_path / "resumed" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
