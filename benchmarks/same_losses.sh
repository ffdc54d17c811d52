#!/usr/bin/env bash
# Same losses step for step before and after a change (issue 16's acceptance 3):
#   bash benchmarks/same_losses.sh OLD_COMMIT        (e.g. 545f264; the working tree is the "after")
# Runs three short lorakit train runs with the code of OLD_COMMIT (a git worktree) and with this tree, then
# compares every logged step loss, every evaluation and the adapter weights. About 4 minutes on 2 cores.
set -euo pipefail
OLD=${1:?give the commit to compare with}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=$ROOT/.venv/bin/python
WORK=$(mktemp -d)
git -C "$ROOT" worktree add -q "$WORK/old" "$OLD"
trap 'git -C "$ROOT" worktree remove --force "$WORK/old"; rm -rf "$WORK"' EXIT
runs() {  # SRC OUT
  export PYTHONPATH=$1/src HF_HUB_OFFLINE=1
  $PY -m lorakit train --model builtin:minilm --steps 16 --batch-size 16 --log-every 1 --eval-limit 128 \
      --dropout 0.1 --quiet --out "$2/minilm"
  $PY -m lorakit train --model builtin:minilm --steps 8 --batch-size 8 --grad-accum 2 --log-every 1 --eval-limit 64 \
      --targets all-linear --rank 4 --backward celora --keep-ratio 0.5 --refresh-every 3 --quiet --out "$2/celora"
  $PY -m lorakit train --model builtin:smollm2 --steps 6 --batch-size 2 --grad-accum 2 --max-length 64 --log-every 1 \
      --eval-limit 8 --no-packing --quiet --out "$2/smollm2"
}
runs "$WORK/old" "$WORK/before"
runs "$ROOT" "$WORK/after"
$PY - "$WORK" <<'PY'
import json, sys
import torch
from safetensors.torch import load_file
work = sys.argv[1]
for run in ("minilm", "celora", "smollm2"):
    def events(side, kind, key):
        return [(r["step"], r[key]) for r in map(json.loads, open(f"{work}/{side}/{run}/metrics.jsonl")) if r.get("event") == kind]
    a, b = load_file(f"{work}/before/{run}/adapter_model.safetensors"), load_file(f"{work}/after/{run}/adapter_model.safetensors")
    print(f"{run}: step losses equal {events('before', 'train', 'loss') == events('after', 'train', 'loss')}, "
          f"evaluations equal {events('before', 'eval', 'eval_loss') == events('after', 'eval', 'eval_loss')}, "
          f"adapters bit-identical {a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)}")
PY
