"""Numerical accuracy figures quoted in the notes (not timings): writes benchmarks/results/accuracy.json.

- limits: relative logit difference poly vs exact attention on the rescaled built-in models (the
  acceptance test only asserts < 1e-3), and measured error / certified bound of the approximate
  LoRA gradient;
- expressive: worst relative gap to sigma_{RL+1}(E) of the linear construction on well-conditioned
  (I + 0.5 N(0, 1/D)) and pure Gaussian (N(0, 1/D)) layers, and the worst max-abs error of the FNN
  and TFN constructions at the threshold rank over seeds; for the worst Gaussian cases, the same
  construction in 50-digit arithmetic with the adapters rounded to float64 (the float64 floor).

    .venv/bin/python benchmarks/accuracy.py        # ~20 seconds
"""

import json
import math
import sys
from pathlib import Path

import torch

from lorakit.expressive import linear as lin
from lorakit.expressive.fnn import FNN, fnn_adapters
from lorakit.expressive.tfn import TFN, tfn_adapters
from lorakit.limits import decisions, rescale_query_key, use_attention
from lorakit.limits.gradient import LoraHead, approximate_gradient, exact_gradient
from lorakit.train.models import load_model, load_tokenizer

log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
out: dict = {}

# ---- limits: poly vs exact logits on the rescaled built-in models
texts = ["the film was a quiet triumph of acting and patience", "no.",
         "an overlong and tedious mess that never finds its footing at all"]
for spec, task in (("builtin:minilm", "classify"), ("builtin:smollm2", "causal-lm")):
    tok = load_tokenizer(spec)
    model = load_model(spec, task, label_names=["neg", "pos"] if task == "classify" else None, tokenizer=tok).model.eval()
    enc = tok(texts, return_tensors="pt", padding=True)
    batch = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    rescale_query_key(model, batch, 0.1)
    with torch.no_grad():
        ref = model(**batch).logits
        use_attention(model, "poly", 1e-3)
        got = model(**batch).logits
    valid = batch["attention_mask"].bool()
    diff = (got - ref)[valid] if ref.dim() == 3 else got - ref
    scale = ref[valid].abs().max() if ref.dim() == 3 else ref.abs().max()
    out[f"poly_vs_exact_relative_logit_diff_{spec.split(':')[1]}"] = float(diff.abs().max() / scale)
    out[f"poly_degrees_{spec.split(':')[1]}"] = sorted({d["impl"] for d in decisions(model).values()})
    log(f"{spec}: {out[f'poly_vs_exact_relative_logit_diff_{spec.split(chr(58))[1]}']:.2e}")

# ---- limits: approximate gradient error / certified bound
ratios = []
for gamma, degree in ((0.5, 2), (1.0, 2), (1.0, 4), (2.0, 6)):
    head = LoraHead.random(64, 8, 4, 2, "full", gamma=gamma, seed=3)
    y = torch.randn(64, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    e, a = exact_gradient(head, y), approximate_gradient(head, y, degree)
    ratios.append(max(float(((a.grads[n] - e.grads[n]).abs() / a.bounds[n]).max()) for n in e.grads))
out["approx_gradient_error_over_bound_max"] = max(ratios)
out["approx_gradient_error_over_bound_min"] = min(ratios)


# ---- expressive: linear construction
def linear_worst(gaussian_only: bool, seeds: int) -> tuple[float, int, int]:
    worst, misses, cases = 0.0, 0, 0
    for d in (8, 16, 32):
        for layers in (1, 2, 3, 4):
            for seed in range(seeds):
                gen = torch.Generator().manual_seed(5000 + seed)
                noise = 1.0 if gaussian_only else 0.5
                frozen = [noise * torch.randn(d, d, generator=gen, dtype=torch.float64) / math.sqrt(d)
                          + (0 if gaussian_only else torch.eye(d, dtype=torch.float64)) for _ in range(layers)]
                target = torch.randn(d, d, generator=gen, dtype=torch.float64)
                s0 = float(torch.linalg.svdvals(lin.error_matrix(frozen, target))[0])
                for r in range(1, math.ceil(d / layers) + 1):
                    c = lin.linear_adapters(frozen, target, r)
                    opt = c.optimal_spectral_error
                    rel = abs(c.spectral_error - opt) / opt if opt > 0 else c.spectral_error / s0
                    cases += 1
                    misses += rel > (1e-8 if opt > 0 else 1e-10)
                    worst = max(worst, rel)
    return worst, misses, cases


for kind, gaussian in (("well_conditioned", False), ("gaussian", True)):
    w, m, n = linear_worst(gaussian, 15)
    out[f"linear_{kind}"] = {"worst_relative_gap": w, "cases_missing_1e-8": m, "cases": n}
    log(f"linear {kind}: worst {w:.2e}, {m} of {n} miss 1e-8")


def float64_floor(d: int, layers: int, seed: int, r: int) -> dict:
    """The same construction carried out with 50 significant digits (mpmath), the adapters then rounded to
    float64 and the adapted product evaluated in float64: what any float64 LoRA model reaches on this instance."""
    import mpmath as mp

    mp.mp.dps = 50
    to_mp = lambda t: mp.matrix(t.tolist())  # noqa: E731
    to_t = lambda m: torch.tensor(m.tolist(), dtype=torch.float64)  # noqa: E731
    gen = torch.Generator().manual_seed(5000 + seed)
    frozen = [torch.randn(d, d, generator=gen, dtype=torch.float64) / math.sqrt(d) for _ in range(layers)]
    target = torch.randn(d, d, generator=gen, dtype=torch.float64)
    w = [to_mp(m) for m in frozen]
    prod = w[0]
    for m in w[1:]:
        prod = m * prod
    e = to_mp(target) - prod
    _, s, vt = mp.svd_r(e)
    kept, eye = min(r * layers, d), mp.eye(d)
    a_hat, adapted = eye, []
    for layer in range(layers):
        rows = list(range(layer * r, min(layer * r + r, kept)))
        delta = mp.zeros(d, d)
        if rows:
            v = mp.matrix([[vt[i, j] for j in range(d)] for i in rows]).T
            suffix = eye
            for m in w[layer + 1:]:
                suffix = m * suffix
            delta = (mp.inverse(suffix) * e * v) * (v.T * mp.inverse(a_hat))
        a_hat = (w[layer] + delta) * a_hat
        adapted.append(frozen[layer] + to_t(delta))
    opt = float(s[kept]) if kept < d else 0.0
    reached = float(torch.linalg.matrix_norm(lin.product(adapted) - target, ord=2))
    ours = lin.linear_adapters(frozen, target, r)
    return {"instance": [d, layers, seed, r], "condition_inverted": ours.condition,
            "gap_float64_construction": abs(ours.spectral_error - opt) / opt,
            "gap_exact_adapters_rounded_to_float64": abs(reached - opt) / opt}


# the worst Gaussian cases: exact (50-digit) adapters rounded to float64 miss 1e-8 as well
out["linear_gaussian_float64_floor"] = [float64_floor(*c) for c in ((8, 4, 12, 1), (16, 3, 1, 5), (16, 4, 1, 3))]
log(json.dumps(out["linear_gaussian_float64_floor"]))

# ---- expressive: FNN and TFN at the threshold rank
x = torch.randn(500, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
x = x / x.norm(dim=1, keepdim=True) * 5.0 * torch.rand(500, 1, generator=torch.Generator().manual_seed(1), dtype=torch.float64) ** (1 / 16)
for target_depth, frozen_depth in ((1, 2), (2, 4), (1, 3), (2, 5)):
    worst = 0.0
    for seed in range(15):
        f = FNN.random(16, frozen_depth, seed=100 + seed, dtype=torch.float64)
        t = FNN.random(16, target_depth, seed=200 + seed, dtype=torch.float64)
        a = fnn_adapters(f, t, math.ceil(16 / (frozen_depth // target_depth)), input_bound=5.0)
        with torch.no_grad():
            worst = max(worst, float((a(x) - t(x)).abs().max()))
    out[f"fnn_Lbar{target_depth}_L{frozen_depth}_worst_max_abs_error"] = worst
xt = torch.randn(20, 16, 10, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
for depth in (1, 2):
    worst = 0.0
    for seed in range(5):
        f, t = TFN.random(16, 2, depth, seed=10 + seed), TFN.random(16, 2, depth, seed=20 + seed)
        with torch.no_grad():
            ref = t(xt)
            worst = max(worst, float((tfn_adapters(f, t, 8)(xt) - ref).abs().max() / ref.abs().max()))
    out[f"tfn_L{depth}_worst_relative_error"] = worst

path = Path(__file__).parent / "results" / "accuracy.json"
path.write_text(json.dumps(out, indent=2) + "\n")
log(json.dumps(out, indent=2))
