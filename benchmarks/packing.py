"""Packing against padding on variable-length chat rows: the same model, the same caller (a plain training loop,
``model(**batch).loss.backward()`` on the attached model), alternating step by step; medians of tokens/s.

Padded: ``--rows`` conversations per batch, padded to the longest (with attention_mask).
Packed: ``--sequences`` packed sequences of up to ``--max-length`` tokens per batch (train/packing.py), about
as many real tokens per step. Tokens/s counts real (non-padding) tokens only.

    .venv/bin/python benchmarks/packing.py [--model builtin:smollm2] [--steps 8]   # ~3 minutes on 2 cores

Writes benchmarks/results/packing.json and packing.md.
"""

import argparse
import json
import random
import statistics
import time
from pathlib import Path

import torch

import lorakit
from lorakit.bench.workloads import machine
from lorakit.train.data import collate, load_data
from lorakit.train.models import load_model, load_tokenizer
from lorakit.train.packing import pack_rows, packing_is_exact

ROOT = Path(__file__).resolve().parents[1]
parser = argparse.ArgumentParser()
parser.add_argument("--model", default="builtin:smollm2")
parser.add_argument("--data", default=str(ROOT / "tests" / "data" / "chat.jsonl"))
parser.add_argument("--max-length", type=int, default=256)
parser.add_argument("--rows", type=int, default=16, help="conversations per padded batch")
parser.add_argument("--sequences", type=int, default=4, help="packed sequences per packed batch")
parser.add_argument("--steps", type=int, default=8, help="timed steps per contender (after one warm-up step each)")
parser.add_argument("--targets", default="all-linear")
parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "packing"))
args = parser.parse_args()

torch.manual_seed(0)
tokenizer = load_tokenizer(args.model)
rows = load_data(args.data, "causal-lm", tokenizer, args.max_length).train
model = load_model(args.model, "causal-lm", tokenizer=tokenizer).model
lorakit.attach(model, lorakit.LoraConfig(r=16, alpha=32, targets=args.targets))
assert packing_is_exact(model, rows), "the model does not keep packed rows apart"
model.config.use_cache = False
model.train()
optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

order = list(range(len(rows)))
random.Random(0).shuffle(order)
shuffled = [rows[i] for i in order]
packed_rows = pack_rows(shuffled, args.max_length)
random.Random(1).shuffle(packed_rows)
pad_id = tokenizer.pad_token_id


def batches(items, size):
    i = 0
    while True:
        chunk = [items[(i + k) % len(items)] for k in range(size)]
        i += size
        yield chunk


def step(chunk):
    b = collate(chunk, pad_id)
    real = sum(len(r["input_ids"]) for r in chunk)
    t = time.perf_counter()
    model(**b).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - t, real, b["input_ids"].numel()


contenders = {"padded": batches(shuffled, args.rows), "packed": batches(packed_rows, args.sequences)}
results = {name: {"seconds": [], "real_tokens": [], "batch_tokens": []} for name in contenders}
for name, source in contenders.items():  # one warm-up step each
    step(next(source))
for _ in range(args.steps):
    for name, source in contenders.items():
        seconds, real, total = step(next(source))
        results[name]["seconds"].append(seconds)
        results[name]["real_tokens"].append(real)
        results[name]["batch_tokens"].append(total)

report = {"machine": machine(), "model": args.model, "data": str(Path(args.data).relative_to(ROOT)),
          "caller": "loop: model(**batch).loss.backward() on the attached model (fast path on)",
          "rows": len(rows), "packed_sequences": len(packed_rows), "max_length": args.max_length,
          "padded_batch_rows": args.rows, "packed_batch_sequences": args.sequences, "steps": args.steps,
          "contenders": {}}
for name, r in results.items():
    tps = [real / s for real, s in zip(r["real_tokens"], r["seconds"])]
    report["contenders"][name] = {
        "median_step_s": statistics.median(r["seconds"]),
        "median_tokens_per_s": statistics.median(tps),
        "real_tokens_per_step": statistics.mean(r["real_tokens"]),
        "padding_fraction": 1 - sum(r["real_tokens"]) / sum(r["batch_tokens"]),
    }
rounds = [(pr / ps) / (qr / qs) for pr, ps, qr, qs in zip(results["packed"]["real_tokens"], results["packed"]["seconds"],
                                                          results["padded"]["real_tokens"], results["padded"]["seconds"])]
report["packed_over_padded_tokens_per_s"] = (report["contenders"]["packed"]["median_tokens_per_s"]
                                             / report["contenders"]["padded"]["median_tokens_per_s"])
report["median_round_ratio"] = statistics.median(rounds)

out = Path(args.out)
out.parent.mkdir(parents=True, exist_ok=True)
out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
m = report["machine"]
lines = [f"# Packing vs padding: {args.model} on {report['data']} ({len(rows)} conversations), LoRA r=16 on {args.targets}",
         "", f"Machine: {m['cpu']}, {m['threads']} threads, torch {m['torch']}. Caller: {report['caller']}.", "",
         "| contender | batch | real tokens / step | padding | median step (s) | tokens/s |", "|---|---|---|---|---|---|"]
for name, c in report["contenders"].items():
    batch = f"{args.rows} rows" if name == "padded" else f"{args.sequences} x {args.max_length} packed"
    lines.append(f"| {name} | {batch} | {c['real_tokens_per_step']:.0f} | {c['padding_fraction']:.1%} | "
                 f"{c['median_step_s']:.2f} | {c['median_tokens_per_s']:.0f} |")
lines += ["", f"- packed / padded tokens/s: {report['packed_over_padded_tokens_per_s']:.2f}x (median of round ratios "
          f"{report['median_round_ratio']:.2f}x); padding {report['contenders']['padded']['padding_fraction']:.1%} -> "
          f"{report['contenders']['packed']['padding_fraction']:.1%} of the batch tokens"]
out.with_suffix(".md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
