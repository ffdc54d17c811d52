"""The prepared GPU check: run it when a CUDA GPU is present (about 5 minutes on one GPU), and read one JSON file.

    python benchmarks/gpu_check.py [--out gpu_check.json]        on a machine with CUDA (and a CUDA build of torch)
    python benchmarks/gpu_check.py --dry-run                      anywhere: the same steps on the CPU, tiny sizes

1. The tests marked ``cuda`` (tests/test_cuda.py: fused LM head in fp32 and under bf16 autocast, LoRA and DoRA
   against PEFT, polynomial attention, the first-token classifier path, a bf16 run resumed bit for bit; and the
   nccl cases of tests/train/test_distributed.py, which need two GPUs and say so when skipped).
2. ``lorakit bench`` on SmolLM2 on the GPU against PEFT (lorakit exact and bf16 against PEFT fp32 and PEFT under
   bf16 autocast, PEFT's documented bf16 set-up), timed after synchronising.
3. One JSON: the machine (GPU name, torch and CUDA versions), every test's outcome (skips with their reason), the
   benchmark's ratios, and the commands that produced them.

--dry-run checks the plumbing on a CPU-only machine: the GPU tests run on the CPU (LORAKIT_CUDA_TESTS_ON=cpu), the
two-GPU ones are skipped with their reason, and the benchmark runs one tiny step on the CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TESTS = ["tests/test_cuda.py", "tests/train/test_distributed.py"]


def machine() -> dict:
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
            if torch.cuda.is_available() else []}
    try:
        info["cpu"] = next(line.split(":", 1)[1].strip() for line in
                           subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
                           if line.startswith("Model name"))
    except (OSError, StopIteration):
        info["cpu"] = platform.processor()
    return info


def run_tests(dry_run: bool, work: Path) -> dict:
    """pytest -m cuda over TESTS; every case's outcome from its JUnit XML."""
    report = work / "tests.xml"
    env = dict(os.environ, **({"LORAKIT_CUDA_TESTS_ON": "cpu"} if dry_run else {}))
    command = [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-rs", f"--junitxml={report}", *TESTS]
    start = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    cases = []
    for case in ET.parse(report).getroot().iter("testcase"):
        outcome, detail = "passed", None
        for kind in ("failure", "error", "skipped"):
            node = case.find(kind)
            if node is not None:
                outcome, detail = {"failure": "failed", "error": "error", "skipped": "skipped"}[kind], node.get("message")
        cases.append({"test": f"{case.get('classname')}::{case.get('name')}", "outcome": outcome, "detail": detail,
                      "seconds": float(case.get("time", 0))})
    counts = {o: sum(c["outcome"] == o for c in cases) for o in ("passed", "failed", "error", "skipped")}
    return {"command": " ".join(command), "exit_status": done.returncode, "counts": counts, "cases": cases,
            "seconds": time.perf_counter() - start, "output_tail": done.stdout[-3000:]}


def run_bench(dry_run: bool, work: Path) -> dict:
    sizes = (["--device", "cpu", "--steps", "1", "--warmup", "0", "--batch-size", "1", "--max-length", "32",
              "--modes", "exact", "--quality-steps", "0", "--no-memory"] if dry_run else
             ["--device", "cuda", "--steps", "10", "--warmup", "3", "--batch-size", "8", "--max-length", "512",
              "--modes", "exact,bf16", "--quality-steps", "0"])
    command = [sys.executable, "-m", "lorakit", "bench", "--model", "builtin:smollm2", *sizes, "--out", str(work / "bench")]
    start = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    out = {"command": " ".join(command), "exit_status": done.returncode, "seconds": time.perf_counter() - start}
    if done.returncode != 0:
        out["stderr_tail"] = done.stderr[-3000:]
        return out
    bench = json.loads((work / "bench" / "bench.json").read_text())
    out["device"] = bench.get("device")
    out["modes"] = {mode: {k: v for k, v in entry.items() if k.startswith(("ratio", "median_round", "peak"))}
                    | {name: {k: c[k] for k in ("median_s", "tokens_per_s", "precision", "cuda_peak_mb", "peak_rss_mb")
                              if k in c} for name, c in entry["contenders"].items()}
                    for mode, entry in bench["modes"].items()}
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="run the steps on the CPU at tiny sizes")
    parser.add_argument("--out", default="gpu_check.json", help="the JSON file to write")
    args = parser.parse_args()
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU here (torch.cuda.is_available() is False); run with --dry-run to check the "
              "script itself", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="lorakit-gpu-check-") as tmp:
        work = Path(tmp)
        result = {"dry_run": args.dry_run, "machine": machine(), "tests": run_tests(args.dry_run, work)}
        print(f"tests: {result['tests']['counts']} in {result['tests']['seconds']:.0f} s", flush=True)
        result["bench"] = run_bench(args.dry_run, work)
        print(f"bench: exit {result['bench']['exit_status']} in {result['bench']['seconds']:.0f} s", flush=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    ok = result["tests"]["exit_status"] == 0 and result["bench"]["exit_status"] == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
