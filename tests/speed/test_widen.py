"""A base stored in bf16 computes in fp32, one layer's weight widened at a time (speed.widen)."""

import copy

import pytest
import torch

import lorakit
from lorakit.speed import widen
from lorakit.speed.widen import WidenedLinear, compute_in_fp32, widened_linear

from conftest import tiny_model


def _pair(kind, dtype=torch.bfloat16, **lora):
    """The same model twice: stored in ``dtype``, and in fp32 holding the dtype-rounded weights; both adapted alike."""
    low = tiny_model(kind)
    for p in low.parameters():
        p.data = p.data.to(dtype)
    ref = tiny_model(kind)
    ref.load_state_dict({k: v.float() for k, v in low.state_dict().items()})
    for m in (ref, low):
        torch.manual_seed(1)
        lorakit.attach(m, lorakit.LoraConfig(r=4, targets="all-linear", **lora), fast=True)
        with torch.no_grad():
            for n, p in m.named_parameters():
                if "lora_B" in n:
                    p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(n))) * 0.1)
    return ref, low


def _step(model, batch):
    model.train()
    model.zero_grad(set_to_none=True)
    out = model(**batch)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.fixture
def slow_bf16(monkeypatch):
    """This CPU's bf16 products are slower than its fp32 ones (as on an AMD EPYC without AVX512-BF16)."""
    import lorakit.speed.gemm as gemm

    monkeypatch.setattr(gemm, "bf16_decision", lambda device="cpu": (False, "bf16 slower (test)"))


@pytest.mark.parametrize("kind,extra", [("llama", {}), ("llama", {"use_dora": True}), ("bert-cls", {})])
def test_a_bf16_base_on_a_slow_bf16_cpu_trains_exactly_like_fp32_with_the_rounded_weights(slow_bf16, kind, extra):
    ref, low = _pair(kind, **extra)
    assert widen.WIDENED_FLAG in low.__dict__  # attach widened it
    if kind == "llama":  # the widened head still takes the fused loss
        from lorakit.speed.families import causal_lm_parts

        assert isinstance(low.lm_head, WidenedLinear) and causal_lm_parts(low) is not None
    ids = torch.randint(3, 97, (2, 9), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": ids} if kind == "llama" else {"input_ids": ids, "labels": torch.tensor([0, 1])}
    (l_ref, g_ref), (l_low, g_low) = _step(ref, batch), _step(low, batch)
    assert torch.allclose(l_ref, l_low, rtol=1e-6, atol=1e-6)
    assert g_ref.keys() == g_low.keys()
    for name in g_ref:
        assert g_low[name].dtype == torch.float32
        scale = g_ref[name].abs().max().clamp_min(1e-12)
        assert ((g_ref[name] - g_low[name]).abs().max() / scale) < 1e-5, name
    # the frozen matrices are still bf16: nothing was widened for good
    frozen = [p for p in low.parameters() if not p.requires_grad and p.dim() == 2]
    assert frozen and all(p.dtype == torch.bfloat16 for p in frozen)
    # everything that trains (adapters, a classifier head) is fp32
    assert all(p.dtype == torch.float32 for p in low.parameters() if p.requires_grad)


def test_a_bf16_base_keeps_bf16_products_where_they_pay(monkeypatch):
    import lorakit.speed.gemm as gemm

    monkeypatch.setattr(gemm, "bf16_decision", lambda device="cpu": (True, "bf16 faster (test)"))
    _, low = _pair("llama")
    assert widen.WIDENED_FLAG not in low.__dict__
    assert not any(isinstance(m, WidenedLinear) for m in low.modules())


def test_widened_linear_saves_the_stored_weight_only():
    """The backward widens again from the bf16 weight: no fp32 copy of it is kept between forward and backward."""
    w = torch.randn(64, 32).to(torch.bfloat16)
    x = torch.randn(5, 32, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = widened_linear(x, w, None)
    assert [t.dtype for t in saved] == [torch.bfloat16]
    y.sum().backward()
    assert torch.allclose(x.grad, torch.ones(5, 64) @ w.float())
    assert torch.equal(y, x @ w.float().t())


def test_compute_in_fp32_is_idempotent_and_counts_what_it_did(slow_bf16):
    model = tiny_model("gpt2", dtype=torch.bfloat16)  # Conv1D: widened for good, and named
    done = compute_in_fp32(model)
    assert compute_in_fp32(model) is done
    assert done.storage == torch.bfloat16 and done.embeddings == 2 and done.widened_for_good
    assert "computed in float32" in done.describe()
    ids = torch.randint(3, 97, (1, 6))
    assert model(input_ids=ids).logits.dtype == torch.float32


def test_a_model_loaded_in_bf16_computes_in_fp32_on_a_slow_cpu(slow_bf16, tiny_llama_dir):
    from lorakit.train.models import load_model

    model = load_model(tiny_llama_dir, "causal-lm", dtype="bf16").model
    assert model.get_input_embeddings().weight.dtype == torch.bfloat16
    assert isinstance(model.lm_head, WidenedLinear)
    with torch.no_grad():
        assert model(input_ids=torch.tensor([[5, 6, 7]])).logits.dtype == torch.float32


def test_deepcopy_and_state_dict_of_a_widened_model_are_the_stored_ones(slow_bf16):
    _, low = _pair("llama")
    clone = copy.deepcopy(low)
    assert isinstance(clone.lm_head, WidenedLinear)
    assert {k: v.dtype for k, v in clone.state_dict().items()} == {k: v.dtype for k, v in low.state_dict().items()}


def test_a_large_weight_is_widened_a_block_of_rows_at_a_time(monkeypatch):
    """An LM head in eval or generation: never widened whole (2.1 GB for Llama-3's), same products."""
    monkeypatch.setattr(widen, "BLOCK_ELEMENTS", 64)
    w = torch.randn(50, 16).to(torch.bfloat16)
    b = torch.randn(50).to(torch.bfloat16)
    x = torch.randn(3, 4, 16, requires_grad=True)
    y = widened_linear(x, w, b)
    torch.testing.assert_close(y, x @ w.float().t() + b.float(), rtol=1e-6, atol=1e-6)
    y.square().sum().backward()
    torch.testing.assert_close(x.grad, (2 * (x @ w.float().t() + b.float())) @ w.float(), rtol=1e-5, atol=1e-5)
