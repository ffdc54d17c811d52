"""Fixed-shape batches of real text for benchmarks: every row is seq_len real tokens.

Causal LM: consecutive blocks of Hamlet. Classification: movie-review snippets joined and
cut into blocks, with alternating labels (the labels do not matter for timing).
"""

from __future__ import annotations

import platform

import torch

from lorakit.train.data import hamlet_text, rotten_tomatoes


def fixed_batches(tokenizer, task: str, batch_size: int, seq_len: int, count: int, *, first: int = 0) -> list[dict[str, torch.Tensor]]:
    """Batches number first .. first + count - 1 of the text cut into batch_size x seq_len blocks (wrapping around);
    the text is tokenized once."""
    if task == "causal-lm":
        text = hamlet_text()
    else:
        text = " ".join(rotten_tomatoes()[0][:4000])
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    need = batch_size * seq_len
    if len(ids) < need:
        raise ValueError(f"the {task} text has {len(ids)} tokens; {batch_size} x {seq_len} needs {need}")
    batches = []
    for offset in range(first, first + count):
        start = (offset * need) % max(1, len(ids) - need)
        block = torch.tensor(ids[start : start + need]).view(batch_size, seq_len)
        batch = {"input_ids": block, "attention_mask": torch.ones_like(block)}
        batch["labels"] = block.clone() if task == "causal-lm" else torch.arange(batch_size) % 2
        batches.append(batch)
    return batches


def fixed_batch(tokenizer, task: str, batch_size: int, seq_len: int, *, offset: int = 0) -> dict[str, torch.Tensor]:
    return fixed_batches(tokenizer, task, batch_size, seq_len, 1, first=offset)[0]


def labelled_batches(tokenizer, batch_size: int, seq_len: int, count: int, *, held_out: bool = False) -> list[dict[str, torch.Tensor]]:
    """Real sentiment snippets with their labels (padded or cut to seq_len), from the training or the held-out
    split: for quality checks, where the labels must mean something."""
    train_texts, train_labels, _, held_texts, held_labels = rotten_tomatoes()
    texts, labels = (held_texts, held_labels) if held_out else (train_texts, train_labels)
    batches = []
    for i in range(count):
        rows = slice(i * batch_size, (i + 1) * batch_size)
        enc = tokenizer(texts[rows], padding="max_length", truncation=True, max_length=seq_len, return_tensors="pt")
        batches.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                        "labels": torch.tensor(labels[rows])})
    return batches


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
