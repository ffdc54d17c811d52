"""Fixed-shape batches of real text for benchmarks: every row is seq_len real tokens.

Causal LM: consecutive blocks of Hamlet. Classification: movie-review snippets joined and
cut into blocks, with alternating labels (the labels do not matter for timing).
"""

from __future__ import annotations

import platform

import torch

from lorakit.train.data import hamlet_text, rotten_tomatoes


def fixed_batch(tokenizer, task: str, batch_size: int, seq_len: int, *, offset: int = 0) -> dict[str, torch.Tensor]:
    if task == "causal-lm":
        text = hamlet_text()
    else:
        text = " ".join(rotten_tomatoes()[0][:4000])
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    need = batch_size * seq_len
    start = (offset * need) % max(1, len(ids) - need)
    if len(ids) < need:
        raise ValueError(f"the {task} text has {len(ids)} tokens; {batch_size} x {seq_len} needs {need}")
    block = torch.tensor(ids[start : start + need]).view(batch_size, seq_len)
    batch = {"input_ids": block, "attention_mask": torch.ones_like(block)}
    batch["labels"] = block.clone() if task == "causal-lm" else torch.arange(batch_size) % 2
    return batch


def machine() -> dict[str, object]:
    """What the numbers were measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info: dict[str, object] = {"cpu": cpu, "threads": torch.get_num_threads(), "torch": torch.__version__,
                               "python": platform.python_version()}
    try:
        import os

        info["cores"] = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info
