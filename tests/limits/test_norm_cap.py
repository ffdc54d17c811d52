import pytest
import torch

import lorakit
from conftest import tiny_model
from lorakit.errors import ConfigError
from lorakit.limits import adapter_spectral_norm, cap_adapter, cap_norms, install_norm_cap


def dense_norm(layer):
    return float(torch.linalg.matrix_norm(layer.scale * layer.B @ layer.A, ord=2))


def test_cap_is_the_singular_value_clip():
    model = tiny_model("llama")
    lorakit.attach(model, lorakit.LoraConfig(r=4, alpha=8, targets="attn-qkv"))
    _, layer = next(lorakit.lora_layers(model))
    torch.manual_seed(0)
    layer.B.data.normal_()
    full = layer.scale * layer.B @ layer.A
    u, s, vh = torch.linalg.svd(full, full_matrices=False)
    cap = float(s[1])  # clips the top singular value only
    a_before = layer.A.clone()
    assert adapter_spectral_norm(layer) == pytest.approx(float(s[0]), rel=1e-5)
    assert cap_adapter(layer, cap) == pytest.approx(float(s[0]), rel=1e-5)
    want = u @ torch.diag(s.clamp(max=cap)) @ vh
    torch.testing.assert_close(layer.scale * layer.B @ layer.A, want, rtol=1e-4, atol=1e-5)
    assert torch.equal(layer.A, a_before)  # only B moves
    assert dense_norm(layer) == pytest.approx(cap, rel=1e-4)


def test_norm_cap_holds_after_every_step():
    """Acceptance 5: with LoraConfig(norm_cap=c) and an aggressive optimiser, ||s B A||_2 <= c after each step."""
    torch.manual_seed(0)
    model = tiny_model("llama")
    lorakit.attach(model, lorakit.LoraConfig(r=4, alpha=8, targets="attn-qkv", norm_control=lorakit.NormControl(0.3)))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=0.5)
    install_norm_cap(opt, model)
    ids = torch.randint(3, 90, (4, 16))
    capped_once = False
    for _ in range(6):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        norms = [dense_norm(layer) for _, layer in lorakit.lora_layers(model)]
        assert max(norms) <= 0.3 * (1 + 1e-4)
        capped_once |= max(norms) > 0.3 * (1 - 1e-3)
    assert capped_once  # the cap was active, not vacuous


def test_cap_norms_without_a_cap_is_a_no_op_and_bad_caps_fail():
    model = tiny_model("llama")
    lorakit.attach(model, lorakit.LoraConfig(r=2, targets="attn-qv"))
    assert cap_norms(model) == {}
    with pytest.raises(ConfigError, match="norm_cap=0"):
        lorakit.NormControl(0)
    with pytest.raises(ConfigError, match="norm_cap=-1"):
        lorakit.NormControl(-1.0)
