"""gemm: bf16 only where this machine's bf16 products are not slower than fp32 ones."""

import warnings

import pytest
import torch

import lorakit
from lorakit.speed import gemm


def test_the_measurement_is_real_and_cached():
    speeds = gemm.cpu_gemm_speeds()
    # a real CPU's fp32 GEMM at 512^2 (2 cores: tens to hundreds of GFLOP/s); bf16 from 0.1 (no bf16 units) upward
    assert speeds.size == 512 and 0.5 < speeds.fp32_gflops < 20000 and 0.05 < speeds.bf16_gflops < 50000
    assert gemm.cpu_gemm_speeds() is speeds  # measured once per process
    assert speeds.bf16_pays == (speeds.bf16_gflops >= speeds.fp32_gflops)
    used, why = gemm.bf16_decision("cpu")
    assert used == speeds.bf16_pays
    assert why.startswith(f"bf16 GEMMs run at {speeds.bf16_gflops:.0f} GFLOP/s on this CPU against "
                          f"{speeds.fp32_gflops:.0f} fp32 (512^2 products, measured now)")


def test_peak_gemm_is_the_best_of_its_timed_products(monkeypatch):
    """2 n^3 / seconds of the fastest product, the first (cold) one included; a product over the budget ends it."""
    ticks = iter([0.0, 0.004, 1.0, 1.002, 2.0, 2.008, 3.0, 3.5])  # n=64: 4 ms, 2 ms, 8 ms; n=128: 500 ms (> budget)
    monkeypatch.setattr(gemm.time, "perf_counter", lambda: next(ticks))
    best = gemm.peak_gemm(torch.float32, sizes=(64, 128, 256), repeats=2, budget_s=0.1)
    assert best == pytest.approx(2 * 64**3 / 0.002 / 1e9)
    assert next(ticks, None) is None  # n=256 was never timed: the 128^2 product took longer than the budget


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


def test_the_decision_takes_the_best_of_interleaved_rounds(monkeypatch):
    """A disturbance on one bf16 measurement does not decide: each precision gets its best over 5 rounds, timed
    alternately; bf16 over the budget in two rounds (no bf16 units) is not timed again."""
    gemm.cpu_gemm_speeds.cache_clear()
    calls = []
    bf16_results = iter([1.0, 300.0, 290.0, 310.0, 305.0])  # the first bf16 round disturbed

    def fake_peak(dtype, sizes, repeats, budget_s):
        calls.append(dtype)
        return 150.0 if dtype == torch.float32 else next(bf16_results)

    monkeypatch.setattr(gemm, "peak_gemm", fake_peak)
    speeds = gemm.cpu_gemm_speeds()
    assert (speeds.fp32_gflops, speeds.bf16_gflops, speeds.bf16_pays) == (150.0, 310.0, True)
    assert calls == [torch.float32, torch.bfloat16] * 5
    gemm.cpu_gemm_speeds.cache_clear()
    calls.clear()
    monkeypatch.setattr(gemm, "peak_gemm", lambda dtype, sizes, repeats, budget_s:
                        calls.append(dtype) or (150.0 if dtype == torch.float32 else 0.5))  # 512^3 bf16: 0.5 s
    speeds = gemm.cpu_gemm_speeds()
    assert not speeds.bf16_pays and calls.count(torch.bfloat16) == 2 and calls.count(torch.float32) == 5
    gemm.cpu_gemm_speeds.cache_clear()
