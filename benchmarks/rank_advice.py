"""Rank advice on MiniLM sentiment (issue 5, acceptance 5): LoRA with the advised rank_pattern vs a
uniform rank at the same trainable-parameter budget, held-out accuracy over seeds.

1. a short full fine-tuning of every linear layer (and the head) gives dW per module;
2. the budget of uniform rank 8 on all-linear is split by ``advise(budget=...)``;
3. both LoRA variants train with lorakit's defaults (200 steps, lr 2e-3) for each seed and are
   evaluated on the fixed 2,000-row held-out split. Writes benchmarks/results/rank_advice.json.

    .venv/bin/python benchmarks/rank_advice.py [--seeds 3] [--steps 200] [--ft-steps 100]
"""

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

from lorakit.adapters import LoraConfig
from lorakit.expressive import advice as ad
from lorakit.train import TrainConfig, run

parser = argparse.ArgumentParser()
parser.add_argument("--seeds", type=int, default=3)
parser.add_argument("--steps", type=int, default=200)
parser.add_argument("--ft-steps", type=int, default=100)
parser.add_argument("--rank", type=int, default=8)
parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "rank_advice.json"))
args = parser.parse_args()
log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731

work = Path(tempfile.mkdtemp(prefix="rank-advice-"))
base, deltas, ft_after = ad.full_finetune_deltas("builtin:minilm", "builtin:rotten-tomatoes", "all-linear",
                                                 steps=args.ft_steps, lr=1e-4, out=work / "ft")
log(f"full fine-tuning ({args.ft_steps} steps): {ft_after}")
modules = ad.spectra(base, deltas)
budget = sum(args.rank * s.cost_per_rank for s in modules)
advice = ad.advise(modules, budget=budget)
log(advice.table())
runs = {"uniform": [], "advised": []}
for seed in range(args.seeds):
    for variant in ("uniform", "advised"):
        lora = LoraConfig(r=args.rank, targets="all-linear",
                          rank_pattern=advice.rank_pattern() if variant == "advised" else {})
        cfg = TrainConfig(model="builtin:minilm", data="builtin:rotten-tomatoes", lora=lora, steps=args.steps,
                          seed=seed, out=str(work / f"{variant}-{seed}"), quiet=True, save_every=None, eval_every=args.steps)
        report = run(cfg)
        acc = report["result"]["after"]["eval_accuracy"]
        runs[variant].append({"seed": seed, "accuracy": acc, "adapter_params": report["adapter_params"]})
        log(f"seed {seed} {variant}: accuracy {acc:.4f}, {report['adapter_params']:,} adapter parameters")
result = {
    "model": "builtin:minilm", "data": "builtin:rotten-tomatoes (2,000 held-out rows)", "targets": "all-linear",
    "full_finetune": {"steps": args.ft_steps, "lr": 1e-4, "after": ft_after},
    "budget_params": budget, "advised_rank_pattern": advice.rank_pattern(), "advised_params": advice.parameters(),
    "runs": runs,
    "mean_accuracy": {k: statistics.mean(r["accuracy"] for r in v) for k, v in runs.items()},
}
Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
log(f"mean accuracy: uniform {result['mean_accuracy']['uniform']:.4f}, advised {result['mean_accuracy']['advised']:.4f}")
log(f"wrote {args.out}")
