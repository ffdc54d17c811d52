"""Peak memory of `lorakit export` on big models: the merged GGUF is written one tensor at a time, never a whole model.

    .venv/bin/python benchmarks/export_memory.py --models 1.1b,8b [--outtypes q8_0,bf16]

Uses the Llama-shaped random-weight models benchmarks/big_models.py caches (bf16 safetensors in
~/.cache/lorakit-bench/big_models/<size>), with SmolLM2's tokenizer beside them (a byte-level BPE llama.cpp knows;
their own is a placeholder), and an adapter of rank 16 on every linear layer written directly in PEFT's format.
Each export runs in a fresh process under /usr/bin/time -v (peak RSS); the results go to
benchmarks/results/export_memory.json with the CPU and the commands.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path.home() / ".cache" / "lorakit-bench"
LEAVES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def base_with_tokenizer(size: str) -> Path:
    """The cached model's shards and config (linked) with SmolLM2's tokenizer beside them."""
    from lorakit.train.models import load_tokenizer

    source = CACHE / "big_models" / size
    if not (source / "COMPLETE").exists():
        sys.exit(f"{source} is missing: run benchmarks/big_models.py --models {size} first")
    target = CACHE / "export_memory" / size
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    for f in source.iterdir():
        if f.suffix in (".safetensors", ".json") and not f.name.startswith(("tokenizer", "special_tokens")):
            (target / f.name).symlink_to(f)
    load_tokenizer("builtin:smollm2").save_pretrained(target)
    return target


def write_adapter(base: Path, out: Path, r: int = 16) -> Path:
    """A PEFT adapter (A, B random) on every linear layer of ``base``, from its config alone."""
    from safetensors.torch import save_file

    config = json.loads((base / "config.json").read_text())
    hidden, inter, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    head, kv = config.get("head_dim") or hidden // config["num_attention_heads"], config["num_key_value_heads"]
    shapes = {"q_proj": (config["num_attention_heads"] * head, hidden), "k_proj": (kv * head, hidden),
              "v_proj": (kv * head, hidden), "o_proj": (hidden, config["num_attention_heads"] * head),
              "gate_proj": (inter, hidden), "up_proj": (inter, hidden), "down_proj": (hidden, inter)}
    tensors = {}
    g = torch.Generator().manual_seed(0)
    for i in range(layers):
        for leaf in LEAVES:
            part = "self_attn" if leaf.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
            key = f"base_model.model.model.layers.{i}.{part}.{leaf}"
            out_f, in_f = shapes[leaf]
            tensors[f"{key}.lora_A.weight"] = 0.01 * torch.randn(r, in_f, generator=g)
            tensors[f"{key}.lora_B.weight"] = 0.01 * torch.randn(out_f, r, generator=g)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, out / "adapter_model.safetensors", metadata={"format": "pt"})
    (out / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": 2 * r, "target_modules": list(LEAVES),
        "base_model_name_or_path": str(base), "lora_dropout": 0.0, "bias": "none"}))
    return out


def timed(command: list[str]) -> dict:
    start = time.perf_counter()
    done = subprocess.run(["/usr/bin/time", "-v", *command], capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    peak_kib = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr)[1])
    return {"command": " ".join(command), "seconds": round(time.perf_counter() - start, 1),
            "peak_rss_gib": round(peak_kib / 2**20, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="1.1b,8b")
    parser.add_argument("--outtypes", default="q8_0")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "export_memory.json"))
    args = parser.parse_args()
    cpu = next(line.split(":", 1)[1].strip() for line in subprocess.run(["lscpu"], capture_output=True,
                                                                         text=True).stdout.splitlines()
               if line.startswith("Model name"))
    rows = []
    for size in args.models.split(","):
        base = base_with_tokenizer(size)
        adapter = write_adapter(base, CACHE / "export_memory" / f"{size}-adapter")
        weights = sum(f.stat().st_size for f in base.glob("*.safetensors"))
        lorakit = str(Path(sys.executable).parent / "lorakit")
        work = CACHE / "export_memory" / "out"
        work.mkdir(exist_ok=True)
        for fmt, outtype in [("gguf-lora", "f32")] + [("gguf", t) for t in args.outtypes.split(",")]:
            path = work / f"{size}-{fmt}-{outtype}.gguf"
            row = timed([lorakit, "export", str(adapter), "--format", fmt, "--outtype", outtype, "--out", str(path),
                         "--overwrite"])
            row.update(model=size, format=fmt, outtype=outtype, base_bf16_gib=round(weights / 2**30, 2),
                       file_gib=round(path.stat().st_size / 2**30, 3))
            rows.append(row)
            print(json.dumps(row), flush=True)
            path.unlink()
    Path(args.out).write_text(json.dumps({"cpu": cpu, "torch": torch.__version__, "rows": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
