"""gemm: bf16 only where this machine's bf16 products are not slower than fp32 ones."""

import warnings

import pytest
import torch

import lorakit
from lorakit.speed import gemm


def test_the_measurement_is_real_and_cached():
    speeds = gemm.cpu_gemm_speeds()
    assert speeds.fp32_gflops > 0 and speeds.bf16_gflops > 0 and gemm.cpu_gemm_speeds() is speeds
    used, why = gemm.bf16_decision("cpu")
    assert used == speeds.bf16_pays and f"{speeds.fp32_gflops:.0f} fp32" in why


@pytest.mark.parametrize("bf16_gflops,applied", [(1.0, False), (150.0, True)])
def test_use_bf16_follows_the_decision(make_model, monkeypatch, bf16_gflops, applied):
    monkeypatch.setattr(gemm, "cpu_gemm_speeds", lambda: gemm.GemmSpeeds(100.0, bf16_gflops, 512))
    model = lorakit.attach(make_model("llama"), lorakit.LoraConfig(r=2))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lorakit.use_bf16(model)
    frozen = {p.dtype for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == ({torch.bfloat16} if applied else {torch.float32})
    assert any("bf16 would be slower" in str(w.message) for w in caught) != applied
    forced = lorakit.use_bf16(lorakit.attach(make_model("llama"), lorakit.LoraConfig(r=2)), when="always")
    assert {p.dtype for p in forced.parameters() if not p.requires_grad} == {torch.bfloat16}
