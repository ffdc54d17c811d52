"""Step time on a packed frozen base against the same model stored in bf16 (issue 29's goals: int8 <= 1.15x and
4-bit <= 1.3x the bf16 step), the contenders alternated step by step in one process so that the machine's drift
hits them alike; the ratios are the medians of the per-round ratios.

Caller: an own training loop (``lorakit.quantize`` + ``lorakit.attach`` on a model built from a config, forward,
loss, backward, AdamW step, as a library user writes it). Model: Llama decoder layers with a real model's layer
shapes (``--shape 8b``: Llama-3-8B, hidden 4096, MLP 14336, 8 KV heads; ``1b``: TinyLlama-1.1B) but only
``--layers`` of them and a small vocabulary (``--vocab``), so the numbers are the decoder layers' (where the packed
weights are) and fit in minutes; random weights (normal * 0.02). LoRA r=16, alpha 32 on all linear layers, batch 1,
HF gradient checkpointing on (``--no-checkpointing``: off). Contenders: ``bf16`` (the base stored in bf16; on a CPU
whose bf16 GEMM is slow lorakit widens each weight to fp32 for its product), ``int8`` (per-channel), ``nf4``
(blocks of 64, QLoRA's default) and ``int4`` (asymmetric, groups of 64); all compute in fp32 on such a CPU.

    .venv/bin/python benchmarks/quant_step_time.py --shape 8b --layers 2 --seq 512 --rounds 3
    .venv/bin/python benchmarks/quant_step_time.py --shape 1b --layers 4 --seq 2048 --rounds 3

Writes benchmarks/results/quant_step_time.json (one entry per shape/seq, merged with what is there).
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import statistics
import time
from pathlib import Path

import torch

import lorakit
from lorakit.bench.workloads import machine

SHAPES = {
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8),
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_attention_heads=32, num_key_value_heads=4),
}
CONTENDERS = {"bf16": None, "int8": dict(bits=8), "nf4": dict(bits=4, format="nf4", group_size=64),
              "int4": dict(bits=4, format="int4", group_size=64)}

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("--shape", choices=SHAPES, default="8b")
parser.add_argument("--layers", type=int, default=2)
parser.add_argument("--vocab", type=int, default=4096)
parser.add_argument("--seq", type=int, default=512)
parser.add_argument("--rounds", type=int, default=3, help="timed rounds (one step of each contender per round), after one warm-up round")
parser.add_argument("--contenders", default=",".join(CONTENDERS))
parser.add_argument("--no-checkpointing", action="store_true")
parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "quant_step_time.json"))
args = parser.parse_args()

from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

torch.manual_seed(0)
config = LlamaConfig(**SHAPES[args.shape], num_hidden_layers=args.layers, vocab_size=args.vocab,
                     max_position_embeddings=max(4096, args.seq), tie_word_embeddings=False)
with torch.no_grad():
    base = LlamaForCausalLM(config).to(torch.bfloat16)
    for p in base.parameters():
        if p.dim() >= 2:
            p.normal_(0, 0.02)
names = args.contenders.split(",")
models, optimizers, packed = {}, {}, {}
for name in names:
    model = copy.deepcopy(base)
    if CONTENDERS[name] is not None:
        lorakit.quantize(model, **CONTENDERS[name])
    lorakit.attach(model, lorakit.LoraConfig(r=16, alpha=32, targets="all-linear"))
    if not args.no_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    models[name] = model
    optimizers[name] = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    packed[name] = sum(b.nbytes for n, b in model.named_buffers() if "qweight" in n or "scale" in n or "absmax" in n
                       or "zero" in n) or None
del base
ids = torch.randint(0, args.vocab, (1, args.seq), generator=torch.Generator().manual_seed(1))
load_at_start = list(__import__("os").getloadavg())


def step(name: str) -> tuple[float, float]:
    t = time.perf_counter()
    loss = models[name](input_ids=ids, labels=ids).loss
    loss.backward()
    optimizers[name].step()
    optimizers[name].zero_grad(set_to_none=True)
    return time.perf_counter() - t, float(loss)


times: dict[str, list[float]] = {n: [] for n in names}
first_loss, warm_up = {}, {}
for r in range(args.rounds + 1):
    for name in names:
        seconds, loss = step(name)
        if r == 0:
            first_loss[name], warm_up[name] = round(loss, 5), seconds
        else:
            times[name].append(seconds)
    print(f"round {r}: " + ", ".join(f"{n} {times[n][-1] if r else warm_up[n]:.2f} s" for n in names), flush=True)

ref = "bf16" if "bf16" in names else names[0]
entry = {
    "shape": args.shape, "layers": args.layers, "vocab": args.vocab, "seq": args.seq, "batch": 1,
    "checkpointing": not args.no_checkpointing, "rounds": args.rounds, "caller": "own loop (lorakit.quantize + lorakit.attach)",
    "lora": {"r": 16, "alpha": 32, "targets": "all-linear"},
    "s_per_step_median": {n: round(statistics.median(times[n]), 3) for n in names},
    "s_per_step": {n: [round(t, 3) for t in times[n]] for n in names},
    "ratio_over_bf16_median_of_rounds": {n: round(statistics.median(a / b for a, b in zip(times[n], times[ref])), 4)
                                         for n in names if n != ref},
    "loss_at_step_0": first_loss,
    "warm_up_s": {n: round(t, 3) for n, t in warm_up.items()},
    "load_average_at_start": load_at_start,
    "packed_bytes": packed,
    "goals": {"int8": 1.15, "nf4": 1.3, "int4": 1.3},
    "measured_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    "load_average_at_end": list(__import__("os").getloadavg()),
}
print(json.dumps(entry, indent=1))
out = Path(args.out)
result = json.loads(out.read_text()) if out.exists() else {"benchmark": "benchmarks/quant_step_time.py", "entries": []}
result["machine"] = machine()
result["entries"] = [e for e in result["entries"] if (e["shape"], e["layers"], e["seq"], e["checkpointing"]) !=
                     (args.shape, args.layers, args.seq, not args.no_checkpointing)] + [entry]
result.setdefault("commands", [])
command = "python benchmarks/quant_step_time.py " + " ".join(__import__("sys").argv[1:])
if command not in result["commands"]:
    result["commands"].append(command)
out.write_text(json.dumps(result, indent=1) + "\n")
