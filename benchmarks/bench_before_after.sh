#!/usr/bin/env bash
# lorakit bench before and after a change, alternated A B A B (issue 28's acceptance 1: numbers unchanged):
#   bash benchmarks/bench_before_after.sh OLD_COMMIT [OUT]     (the working tree is the "after")
# Each run times lorakit against PEFT step by step in the same process (bench.json's ratio_to_peft_fp32), so the
# before/after comparison is of ratios measured minutes apart, and the step losses must be equal. About 15 minutes
# on 2 cores (SmolLM2-135M, exact and DoRA, 5 measured steps each).
set -euo pipefail
OLD=${1:?give the commit to compare with}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=${2:-$ROOT/benchmarks/results/bench_before_after.json}
PY=$ROOT/.venv/bin/python
WORK=$(mktemp -d)
git -C "$ROOT" worktree add -q "$WORK/old" "$OLD"
trap 'git -C "$ROOT" worktree remove --force "$WORK/old"; rm -rf "$WORK"' EXIT
for i in 1 2; do
  for side in before after; do
    src=$ROOT/src; [ "$side" = before ] && src=$WORK/old/src
    (cd "$WORK" && HF_HUB_OFFLINE=1 PYTHONPATH=$src $PY -m lorakit bench --modes exact,dora --steps 5 --warmup 2 \
        --quality-steps 0 --no-memory --out "$WORK/$side-$i" > "$WORK/$side-$i.log" 2>&1)
  done
done
$PY - "$WORK" "$OLD" "$(git -C "$ROOT" rev-parse --short HEAD)" "$OUT" <<'PY'
import glob, json, os, subprocess, sys
work, old, new, out = sys.argv[1:]
cpu = next(l.split(":", 1)[1].strip() for l in subprocess.run(["lscpu"], capture_output=True, text=True).stdout
           .splitlines() if l.startswith("Model name"))
runs = []
for path in sorted(glob.glob(f"{work}/*/bench.json")):
    d = json.load(open(path))
    for mode, m in d["modes"].items():
        (ours, a), (peft, b) = list(m["contenders"].items())
        runs.append({"run": os.path.basename(os.path.dirname(path)), "mode": mode, "lorakit_s": a["median_s"],
                     "peft_s": b["median_s"], "ratio_to_peft_fp32": m["ratio_to_peft_fp32"],
                     "median_round_ratio": m["median_round_ratio_to_peft_fp32"], "losses": a["losses"]})
same = all(r["losses"] == s["losses"] for r in runs for s in runs if r["mode"] == s["mode"])
summary = {}
for mode in sorted({r["mode"] for r in runs}):
    for side in ("before", "after"):
        ratios = [r["ratio_to_peft_fp32"] for r in runs if r["mode"] == mode and r["run"].startswith(side)]
        summary[f"{mode} {side}"] = sum(ratios) / len(ratios)
doc = {"what": "lorakit bench (SmolLM2-135M, batch 4 x 256, caller: lorakit's bench loop) before/after",
       "before": old, "after": new, "cpu": cpu, "same_losses_everywhere": same,
       "mean_ratio_to_peft_fp32": summary, "runs": runs}
open(out, "w").write(json.dumps(doc, indent=1) + "\n")
print(json.dumps({k: v for k, v in doc.items() if k != "runs"}, indent=1))
PY
