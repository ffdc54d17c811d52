"""Polynomial attention vs torch's scaled_dot_product_attention: fwd+bwd time against L.

Both contenders run the same shapes [batch, heads, L, d] in float32 on the same machine in the
same run (see ``run`` for the order); the result has the median times, the log-log slope of each
curve (least squares over the lengths) and the crossover length from which poly attention is
faster, interpolated in log-log between the two measured lengths around it.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch

from lorakit.bench.harness import Contender, Timing, alternate
from lorakit.bench.workloads import machine
from lorakit.kernels.poly_attention import num_features, poly_attention


def fwd_bwd(kind: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, degree: int) -> Callable[[], None]:
    g = torch.randn_like(q[..., : v.shape[-1]])

    def step() -> None:
        for t in (q, k, v):
            t.grad = None
        if kind == "poly":
            out = poly_attention(q, k, v, degree=degree, causal=causal)
        else:
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
        out.backward(g)

    return step


def loglog_slope(lengths: list[int], seconds: list[float]) -> float:
    xs, ys = [math.log(x) for x in lengths], [math.log(y) for y in seconds]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def crossover(lengths: list[int], exact: list[float], poly: list[float]) -> float | None:
    """The smallest L from which poly stays faster, interpolated in log-log; None if never within the grid."""
    faster = [p < e for p, e in zip(poly, exact)]
    for i in range(len(lengths)):
        if all(faster[i:]):
            if i == 0:
                return float(lengths[0])
            # log ratio goes from >= 0 at i-1 to < 0 at i
            a, b = math.log(poly[i - 1] / exact[i - 1]), math.log(poly[i] / exact[i])
            t = a / (a - b)
            return float(math.exp(math.log(lengths[i - 1]) + t * (math.log(lengths[i]) - math.log(lengths[i - 1]))))
    return None


def run(lengths: list[int], head_dims: list[int], *, causal_modes=(False, True), degree: int = 2, batch: int = 1,
        heads: int = 1, steps: int = 1, warmup: int = 1, rounds: int = 5, seed: int = 0,
        progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Rounds are the outer loop: each round times every (head dim, mask, length) once per contender,
    each contender in its own block (warm-up, then ``steps`` timed calls). A shared machine's slow
    spells then land on every length alike instead of bending the curves, and SDPA's gigabytes at
    large L are not freed in the middle of a poly measurement. Medians and minima over rounds."""
    torch.manual_seed(seed)
    configs = [(d, causal, length) for d in head_dims for causal in causal_modes for length in lengths]
    tensors = {}
    for d, causal, length in configs:
        if (d, length) not in tensors:
            tensors[(d, length)] = [(0.3 * torch.randn(batch, heads, length, d)).requires_grad_(),
                                    (0.3 * torch.randn(batch, heads, length, d)).requires_grad_(),
                                    torch.randn(batch, heads, length, d).requires_grad_()]
    seconds: dict[tuple, dict[str, list[float]]] = {c: {"sdpa": [], "poly": []} for c in configs}
    for r in range(rounds):
        for d, causal, length in configs:
            q, k, v = tensors[(d, length)]
            for name in ("sdpa", "poly"):
                block = alternate([Contender(name, fwd_bwd(name, q, k, v, causal=causal, degree=degree))],
                                  warmup=warmup, steps=steps)
                seconds[(d, causal, length)][name] += block[name].seconds
        if progress:
            progress(f"round {r + 1}/{rounds} done")
    curves = []
    for d in head_dims:
        for causal in causal_modes:
            rows = []
            for length in lengths:
                t = {name: Timing(name, values) for name, values in seconds[(d, causal, length)].items()}
                rows.append({"length": length, "sdpa_s": t["sdpa"].median, "poly_s": t["poly"].median,
                             "sdpa_min_s": min(t["sdpa"].seconds), "poly_min_s": min(t["poly"].seconds),
                             "poly_over_sdpa": t["poly"].median / t["sdpa"].median})
                if progress:
                    progress(f"d={d} causal={causal} L={length}: sdpa {rows[-1]['sdpa_s']:.4f}s, poly {rows[-1]['poly_s']:.4f}s")
            ls = [r["length"] for r in rows]
            ex, po = [r["sdpa_s"] for r in rows], [r["poly_s"] for r in rows]
            cross = crossover(ls, ex, po)
            curves.append({
                "head_dim": d, "causal": causal, "degree": degree, "features": num_features(d, degree), "rows": rows,
                "slope_poly": loglog_slope(ls, po), "slope_sdpa": loglog_slope(ls, ex),
                "slope_poly_of_minima": loglog_slope(ls, [r["poly_min_s"] for r in rows]),
                "slope_sdpa_of_minima": loglog_slope(ls, [r["sdpa_min_s"] for r in rows]),
                "crossover_length": cross, "crossover_per_feature": None if cross is None else cross / num_features(d, degree),
            })
    return {"workload": {"batch": batch, "heads": heads, "degree": degree, "dtype": "float32", "steps": steps,
                         "warmup": warmup, "rounds": rounds,
                         "what": "forward + backward of one attention call, all of q, k, v requiring grad",
                         "order": "rounds outermost; per round every length once per contender, each in its own "
                                  "block (warm-up, then timed steps); medians over rounds (minima also given)"},
            "machine": machine(), "curves": curves}
