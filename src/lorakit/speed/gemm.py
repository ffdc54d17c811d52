"""Whether bf16 matrix products pay on this machine: measured once per process, in well under a second.

``use_bf16`` and ``lorakit train --bf16`` store the frozen weights in bf16 so that the frozen
products run as bf16 GEMMs. That is faster only where the CPU's bf16 GEMM is: on an AMD EPYC without
AVX512-BF16 a bf16 product ran at ~1 GFLOP/s against ~100 fp32; on an Intel Xeon with AVX512-BF16
(no AMX) at 73-157 against 127-273; on an AMD EPYC Zen 4 (AVX512-BF16) at 374-423 against 142-185,
where a bf16 training step takes 0.48-0.60 of the fp32 one. ``bf16_decision()`` times one n x n
product in each precision (n = 512, the best of five rounds of both, ``peak_gemm``, which ``lorakit bench``
also reports) and keeps fp32 unless bf16 is at least as fast: bf16 is then never slower than fp32
by its products. GPUs are not measured (their bf16 is faster).
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class GemmSpeeds:
    fp32_gflops: float
    bf16_gflops: float
    size: int

    @property
    def bf16_pays(self) -> bool:
        return self.bf16_gflops >= self.fp32_gflops

    def describe(self) -> str:
        return (f"bf16 GEMMs run at {self.bf16_gflops:.0f} GFLOP/s on this CPU against {self.fp32_gflops:.0f} fp32 "
                f"({self.size}^2 products, measured now)")


def peak_gemm(dtype: torch.dtype, sizes=(1024, 2048, 3072), repeats: int = 3, budget_s: float = 0.5,
              device: torch.device | str = "cpu") -> float:
    """The best GEMM throughput (GFLOP/s) over square sizes on ``device``, now (a GPU's timed after synchronising).

    A product that takes longer than ``budget_s`` ends the measurement there (its own time counts):
    on CPUs without bf16 instructions a 3072^2 bf16 product takes minutes (0.8 GFLOP/s on an AMD
    EPYC without AVX512-BF16, against 90 fp32)."""
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)

    def timed(a, b) -> float:
        sync()
        t = time.perf_counter()
        torch.mm(a, b)
        sync()
        return time.perf_counter() - t

    best = 0.0
    for n in sizes:
        a, b = torch.randn(n, n).to(device, dtype), torch.randn(n, n).to(device, dtype)
        first = timed(a, b)
        best = max(best, 2 * n**3 / first / 1e9)
        if first > budget_s:
            break
        for _ in range(repeats):
            best = max(best, 2 * n**3 / timed(a, b) / 1e9)
    return best


@functools.cache
def cpu_gemm_speeds(n: int = 512, budget_s: float = 0.1, rounds: int = 5) -> GemmSpeeds:
    """fp32 and bf16 GEMM throughput of this CPU (cached for the process): the best of ``rounds`` rounds, each timing
    fp32 then bf16 products, so that a disturbance of a few milliseconds (the other core busy, memory being
    reclaimed) cannot make one precision look slow -- it would have to hit every round of it, and a long one hits
    both alike. On a Zen 4 (bf16 2.5x faster) one benchmark worker of many (peft_bnb_cpu, 1.1B NF4) ran 34 s steps
    instead of 16, with 1.2 GiB more and the losses of fp32 products: a wrong fp32 decision from the single
    measurement each that this replaced is the likely cause. Once bf16 has stayed over ``budget_s`` a product for
    two rounds (a CPU without bf16 instructions: ~0.3 s each) it is not timed again. ~20 ms on a Zen 4."""
    fp32 = bf16 = 0.0
    over_budget = 0
    for _ in range(rounds):
        fp32 = max(fp32, peak_gemm(torch.float32, (n,), repeats=1, budget_s=budget_s))
        if over_budget < 2:
            bf16 = max(bf16, peak_gemm(torch.bfloat16, (n,), repeats=1, budget_s=budget_s))
            over_budget = over_budget + 1 if 2 * n**3 / (bf16 * 1e9) > budget_s else 0
    return GemmSpeeds(fp32, bf16, n)


def bf16_decision(device: torch.device | str = "cpu") -> tuple[bool, str]:
    """(use bf16 compute, why) for ``device``."""
    if torch.device(device).type != "cpu":
        return True, f"bf16 on {torch.device(device).type}"
    speeds = cpu_gemm_speeds()
    if speeds.bf16_pays:
        return True, f"{speeds.describe()}: bf16 weights and products"
    return False, f"{speeds.describe()}: bf16 would be slower, so the weights and products stay fp32"
