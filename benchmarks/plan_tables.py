"""The memory plan's tables in the README: ``lorakit train``'s plan (``train.plan``: ``plan_memory`` with the trainer
process's runtime, fp32 products as on a CPU whose bf16 GEMM is slow, a padding mask) for the Llama shapes of
``benchmarks/big_models.py`` (their public configs), batch 1, all-linear r=16. Config only: nothing is loaded.

    .venv/bin/python benchmarks/plan_tables.py        # prints two markdown tables
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from transformers import LlamaConfig

from lorakit import LoraConfig
from lorakit.train.memory_plan import GB, plan_memory
from lorakit.train.plan import TRAIN_PROCESS_BYTES
from lorakit.train.memory_plan import RUNTIME_BYTES
from lorakit.train.precision import default_quant

sys.path.insert(0, str(Path(__file__).parent))
from big_models import CONFIGS  # noqa: E402

BASES = {"fp32 base": ("fp32", None), "bf16 base": ("bf16", None), "int8 base": ("bf16", "int8"),
         "int4 (NF4) base": ("bf16", "int4")}


def total(key: str, seq: int, base: str, quant: str | None, checkpointing: bool) -> float:
    config = LlamaConfig(**{k: v for k, v in CONFIGS[key].items() if k != "name"})
    plan = plan_memory(config, base_dtype=base, compute_dtype=torch.float32, seq_len=seq, batch_size=1,
                       targets=LoraConfig(r=16, targets="all-linear"), gradient_checkpointing=checkpointing,
                       attention_mask=True, runtime=RUNTIME_BYTES + TRAIN_PROCESS_BYTES,
                       quant=default_quant(quant) if quant else None)
    return plan.total / GB


def main() -> None:
    print("| model | tokens | " + " | ".join(BASES) + " |\n|---|---|" + "---|" * len(BASES))
    for key, seq in (("1.1b", 2048), ("3b", 2048), ("8b", 2048), ("13b", 512)):
        cells = [f"{total(key, seq, base, quant, True):.1f} GB" for base, quant in BASES.values()]
        print(f"| {CONFIGS[key]['name']} | {seq} | " + " | ".join(cells) + " |")
    print("\n| model | tokens | fp32 base | bf16 base | bf16 base + checkpointing |\n|---|---|---|---|---|")
    for key in ("1.1b", "3b", "6.7b", "8b"):
        for seq in (512, 2048):
            cells = [total(key, seq, "fp32", None, False), total(key, seq, "bf16", None, False),
                     total(key, seq, "bf16", None, True)]
            print(f"| {CONFIGS[key]['name']} | {seq} | " + " | ".join(f"{c:.1f} GB" for c in cells) + " |")


if __name__ == "__main__":
    main()
