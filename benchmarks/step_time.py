"""Step time against PEFT across batch size and sequence length (exact fp32 and bf16 modes), the
published scaling figure. Each point is one `lorakit bench` run (alternating steps, medians);
writes benchmarks/results/step_time.json and step_time.png.

    .venv/bin/python benchmarks/step_time.py [--model builtin:minilm] [--steps 5]   # ~4 minutes
"""

import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from lorakit.bench import versus_peft as vp  # noqa: E402
from lorakit.bench.workloads import machine  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("--model", default="builtin:minilm")
parser.add_argument("--batches", default="4,16,32")
parser.add_argument("--lengths", default="64,128")
parser.add_argument("--steps", type=int, default=5)
parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "step_time"))
args = parser.parse_args()

points = []
for length in (int(v) for v in args.lengths.split(",")):
    for batch in (int(v) for v in args.batches.split(",")):
        cfg = vp.BenchConfig(model=args.model, batch_size=batch, max_length=length, steps=args.steps, warmup=1,
                             modes=("exact", "bf16"), quality_steps=0, memory=False)
        report = vp.run(cfg)
        point = {"batch": batch, "length": length}
        for mode, entry in report["modes"].items():
            point[mode] = {name: {"median_s": c["median_s"], "fraction_of_peak": c["fraction_of_peak"]}
                           for name, c in entry["contenders"].items()}
            point[f"{mode}_ratio_to_peft_fp32"] = entry["ratio_to_peft_fp32"]
        point["bf16_ratio_to_peft_bf16_autocast"] = report["modes"]["bf16"]["ratio_to_peft_bf16_autocast"]
        points.append(point)
        print(f"{batch} x {length}: exact {point['exact_ratio_to_peft_fp32']:.3f}, bf16 {point['bf16_ratio_to_peft_fp32']:.3f} "
              f"x PEFT fp32 ({point['bf16_ratio_to_peft_bf16_autocast']:.3f} x PEFT autocast)", file=sys.stderr)

out = Path(args.out)
out.parent.mkdir(parents=True, exist_ok=True)
out.with_suffix(".json").write_text(json.dumps({"model": args.model, "machine": machine(), "points": points}, indent=2) + "\n")
fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
for ax, mode in zip(axes, ("exact", "bf16")):
    for length in sorted({p["length"] for p in points}):
        row = [p for p in points if p["length"] == length]
        ax.plot([p["batch"] * length for p in row], [p[f"{mode}_ratio_to_peft_fp32"] for p in row], "o-", label=f"L = {length}")
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("tokens per step (batch x L)")
    ax.set_title(f"lorakit {mode} / PEFT fp32, {args.model}")
    ax.legend()
axes[0].set_ylabel("step time ratio (lower is faster)")
fig.tight_layout()
fig.savefig(out.with_suffix(".png"), dpi=110)
