"""CE-LoRA vs exact LoRA: step time and the approximated layers' backward, next to the FLOP
prediction, on MiniLM (16 x 128) and SmolLM2 (4 x 256). Writes benchmarks/results/celora.json.

    .venv/bin/python benchmarks/celora.py [--steps-minilm 30] [--steps-smollm2 16]
"""

import argparse
import json
import sys
from pathlib import Path

from lorakit.bench import celora_bench

parser = argparse.ArgumentParser()
parser.add_argument("--steps-minilm", type=int, default=30)
parser.add_argument("--steps-smollm2", type=int, default=16)
parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "celora.json"))
args = parser.parse_args()

results = []
for model, batch, seq, steps in (("builtin:minilm", 16, 128, args.steps_minilm), ("builtin:smollm2", 4, 256, args.steps_smollm2)):
    print(f"{model} {batch}x{seq}, {steps} alternating rounds ...", file=sys.stderr)
    r = celora_bench.run(model, batch_size=batch, seq_len=seq, steps=steps, warmup=3)
    m, p = r["measured"], r["predicted"]
    print(f"  step time ratio {m['step_time_ratio']:.3f} (FLOP-predicted {p['step_time_ratio_from_flops']:.3f}; "
          f"linear-layer FLOPs {p['linear_layers_step_flop_ratio']:.3f}); approximated dX time ratio "
          f"{m['approximated_dx_time_ratio']:.3f} (FLOPs {p['approximated_dx_flop_ratio']:.3f})", file=sys.stderr)
    results.append(r)
Path(args.out).parent.mkdir(parents=True, exist_ok=True)
Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
print(f"wrote {args.out}", file=sys.stderr)
