"""Polynomial (Taylor, degree 2) attention vs torch's scaled_dot_product_attention, fwd+bwd, float32.

Acceptance (issue 3): poly's log-log slope <= 1.15 over L = 1024..16384 at head dim 32, causal
and not; poly faster than SDPA from L = 4096 at head dim 32; the crossover for head dims 32 and
64. Writes benchmarks/results/poly_attention.json.

    .venv/bin/python benchmarks/poly_attention.py [--steps 1] [--rounds 5] [--max-length 16384]
"""

import argparse
import json
import sys
from pathlib import Path

from lorakit.bench import poly_bench

parser = argparse.ArgumentParser()
parser.add_argument("--steps", type=int, default=1, help="timed steps per block")
parser.add_argument("--rounds", type=int, default=5, help="rounds over all lengths (medians over rounds)")
parser.add_argument("--max-length", type=int, default=16384)
parser.add_argument("--head-dims", default="32,64")
parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "poly_attention.json"))
args = parser.parse_args()

lengths = [1024]
while lengths[-1] < args.max_length:
    lengths.append(lengths[-1] * 2)
head_dims = [int(d) for d in args.head_dims.split(",")]
result = poly_bench.run(lengths, head_dims, steps=args.steps, rounds=args.rounds, progress=lambda m: print(m, file=sys.stderr, flush=True))
for c in result["curves"]:
    cross = c["crossover_length"]
    print(f"d={c['head_dim']} causal={c['causal']}: slope poly {c['slope_poly']:.3f}, sdpa {c['slope_sdpa']:.3f}; "
          f"poly faster from L = {cross:.0f}" if cross else f"d={c['head_dim']} causal={c['causal']}: slope poly "
          f"{c['slope_poly']:.3f}, sdpa {c['slope_sdpa']:.3f}; poly not faster up to L = {lengths[-1]}", file=sys.stderr)
Path(args.out).parent.mkdir(parents=True, exist_ok=True)
Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
print(f"wrote {args.out}", file=sys.stderr)
