"""Peak RSS of a training step with glibc's dynamic mmap threshold against lorakit's fixed one (speed.allocator).

Caller: an own training loop (``train.models.load_model`` with ``--base-dtype``, ``lorakit.attach`` all-linear r 16,
HF activation checkpointing, forward with labels, backward, AdamW step), each run in its own process, the two
settings alternated. "dynamic" runs the same code with ``speed.allocator`` told not to fix the threshold (glibc's
behaviour before it). Peak RSS is the process's VmHWM after ``--steps`` steps, minus nothing (the whole process).
Step time, which separate processes measure too noisily for a few per cent, is compared in one process
(``--phases alternate``): the threshold fixed at 1 MiB and at 32 MiB (glibc's dynamic threshold's ceiling, where
it settles in a training step) alternated step by step, medians over ``--rounds`` rounds after one warm-up round.

    .venv/bin/python benchmarks/heap_threshold.py --model ~/.cache/lorakit-bench/big_models/1.1b --dtypes int4,bf16
    .venv/bin/python benchmarks/heap_threshold.py --model ~/.cache/lorakit-bench/big_models/1.1b --dtypes bf16 \
        --phases alternate --merge

Writes benchmarks/results/heap_threshold.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import subprocess
import sys
from pathlib import Path

from lorakit.bench.workloads import machine

# argv: model, base dtype, seq, mode ("dynamic", "fixed": peak over argv[5] steps; "alternate": argv[5] rounds)
CHILD = """
import ctypes, json, statistics, sys, time, torch
from lorakit.speed import allocator
mode = sys.argv[4]
if mode != "fixed":  # dynamic: as if off glibc, the threshold stays glibc's; alternate: set by hand below
    allocator._FIXED = False
import lorakit
from lorakit.train.models import load_model
model = load_model(sys.argv[1], "causal-lm", dtype=sys.argv[2]).model
lorakit.attach(model, lorakit.LoraConfig(r=16, alpha=32, targets="all-linear"))
model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
model.config.use_cache = False
model.train()
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
ids = torch.randint(0, model.config.vocab_size, (1, int(sys.argv[3])), generator=torch.Generator().manual_seed(0))
def step():
    t = time.perf_counter()
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step(); opt.zero_grad(set_to_none=True)
    return round(time.perf_counter() - t, 2)
if mode != "alternate":
    times = [step() for _ in range(int(sys.argv[5]))]
    status = dict(l.split(":", 1) for l in open("/proc/self/status") if ":" in l)
    print(json.dumps({"peak_rss_mib": int(status["VmHWM"].split()[0]) // 1024, "step_s": times}))
    sys.exit()
libc = ctypes.CDLL("libc.so.6")
times = {"1 MiB": [], "32 MiB": []}
for r in range(int(sys.argv[5]) + 1):
    for name, threshold in (("1 MiB", 1 << 20), ("32 MiB", 32 << 20)):
        libc.mallopt(-3, threshold); libc.mallopt(-1, 2 * threshold); libc.malloc_trim(0)
        took = step()
        if r:
            times[name].append(took)
medians = {k: statistics.median(v) for k, v in times.items()}
print(json.dumps({"step_s": times, "median_s": medians, "ratio_1mib_over_32mib": round(medians["1 MiB"] / medians["32 MiB"], 3)}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--dtypes", default="int4,bf16")
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--phases", default="peak", help="peak, alternate, or both (comma-separated)")
    parser.add_argument("--rounds", type=int, default=3, help="alternate: timed rounds after one warm-up round")
    parser.add_argument("--merge", action="store_true", help="add to the --out file's rows instead of replacing it")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "heap_threshold.json"))
    args = parser.parse_args()
    phases = args.phases.split(",")
    rows = []
    for dtype in args.dtypes.split(","):
        row = {"base_dtype": dtype}
        for setting in ("dynamic", "fixed") if "peak" in phases else ():
            done = subprocess.run([sys.executable, "-c", CHILD, args.model, dtype, str(args.seq), setting, str(args.steps)],
                                  capture_output=True, text=True, check=True)
            row[setting] = json.loads(done.stdout.strip().splitlines()[-1])
            print(dtype, setting, row[setting], flush=True)
        if "peak" in phases:
            row["peak_ratio_fixed_over_dynamic"] = round(row["fixed"]["peak_rss_mib"] / row["dynamic"]["peak_rss_mib"], 3)
        if "alternate" in phases:
            done = subprocess.run([sys.executable, "-c", CHILD, args.model, dtype, str(args.seq), "alternate", str(args.rounds)],
                                  capture_output=True, text=True, check=True)
            row["alternated_in_one_process"] = json.loads(done.stdout.strip().splitlines()[-1])
            print(dtype, "alternated", row["alternated_in_one_process"], flush=True)
        rows.append(row)
    result = {"benchmark": "peak RSS, glibc's dynamic mmap threshold vs speed.allocator's fixed 1 MiB",
              "command": " ".join([Path(sys.executable).name, *sys.argv]), "caller": "own loop (load_model + attach)",
              "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "machine": machine(),
              "model": args.model.replace(str(Path.home()), "~"), "seq": args.seq, "steps": args.steps,
              "checkpointing": True, "lora": {"rank": 16, "alpha": 32, "targets": "all-linear"}, "rows": rows}
    out = Path(args.out)
    if args.merge and out.exists():  # the earlier rows and commands kept, this run's added
        earlier = json.loads(out.read_text())
        result.update(rows=earlier["rows"] + rows, commands=earlier.get("commands", [earlier["command"]]) + [result["command"]])
    out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
