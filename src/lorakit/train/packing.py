"""Packing: several short causal-LM rows in one sequence, so no FLOPs go to padding.

Rows are placed best-fit-decreasing into sequences of at most ``max_length`` tokens. A packed
sequence carries ``position_ids`` that restart at 0 for each row and no ``attention_mask``: from
the restarts transformers' mask builders (``masking_utils.find_packed_sequence_indices``) make a
block-diagonal causal mask, so no token attends across a row boundary, in SDPA and eager
attention on CPU as in flash attention on GPU. The first token of each row gets no label (in the
rows unpacked it is never a target either), so

    sum over packed tokens of the loss  =  sum over the same rows unpacked,

and the batch's mean over labelled tokens is the same number (``tests/train/test_packing.py``).

transformers looks for the restarts only when the call builds no KV cache: a training loop over
packed batches passes ``use_cache=False`` or sets ``model.config.use_cache = False`` (lorakit
train does the latter; with a cache the rows would silently attend to each other).

Not every model honours the restarts (some build their mask from ``attention_mask`` only, and an
attention function may ignore the 4-D mask): ``packing_is_exact`` runs a few rows both ways
through the model before training and packing is used only where the logits agree.
"""

from __future__ import annotations

import bisect
from typing import Any

import torch
from torch import nn

from lorakit.kernels.linear_cross_entropy import IGNORE_INDEX


def pack_rows(rows: list[dict[str, Any]], max_length: int) -> list[dict[str, Any]]:
    """Causal-LM rows ({"input_ids", "labels"}) packed best-fit-decreasing into rows of at most ``max_length``
    tokens, each with ``position_ids``. Longer rows than ``max_length`` are kept alone."""
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i]["input_ids"]))
    bins: list[list[int]] = []  # row indices per packed sequence
    free: list[tuple[int, int]] = []  # (room left, bin) sorted, for the best fit
    for i in order:
        n = len(rows[i]["input_ids"])
        at = bisect.bisect_left(free, (n, -1))
        if at < len(free):
            room, b = free.pop(at)
            bins[b].append(i)
            bisect.insort(free, (room - n, b))
        else:
            bins.append([i])
            bisect.insort(free, (max_length - n, len(bins) - 1))
    return [_join([rows[i] for i in sorted(b)]) for b in bins]


def _join(rows: list[dict[str, Any]]) -> dict[str, Any]:
    ids, labels, positions = [], [], []
    for r in rows:
        ids += r["input_ids"]
        labels += [IGNORE_INDEX] + list(r["labels"][1:])  # the first token is predicted by no token of its row
        positions += range(len(r["input_ids"]))
    return {"input_ids": ids, "labels": labels, "position_ids": positions}


def padding_fraction(rows: list[dict[str, Any]], batch_size: int) -> float:
    """The share of a padded batch's tokens that are padding, for ``rows`` taken ``batch_size`` at a time in order."""
    padded = real = 0
    for i in range(0, len(rows), batch_size):
        lengths = [len(r["input_ids"]) for r in rows[i : i + batch_size]]
        padded += max(lengths) * len(lengths)
        real += sum(lengths)
    return 1 - real / max(padded, 1)


@torch.no_grad()
def packing_is_exact(model: nn.Module, rows: list[dict[str, Any]], *, probe_rows: int = 3, rtol: float | None = None) -> bool:
    """Whether ``model`` gives the same logits for a few of ``rows`` packed into one sequence as for each alone
    (eval mode, so dropout does not differ), within ``rtol`` of the largest logit (default 1e-3, 3e-2 with 16-bit
    weights: a row that attends across a boundary is off by far more). False when the model refuses
    ``position_ids`` or mixes the rows."""
    if rtol is None:
        low = any(p.dtype in (torch.bfloat16, torch.float16) for p in model.parameters())
        rtol = 3e-2 if low else 1e-3
    from lorakit.train.data import collate

    probe = sorted(rows, key=lambda r: len(r["input_ids"]))[: max(2, probe_rows)]
    probe = [{"input_ids": r["input_ids"][:32], "labels": r["labels"][:32]} for r in probe]
    if len(probe) < 2:
        return True  # one row is never packed with another
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        alone = [model(input_ids=torch.tensor([r["input_ids"]], device=device), use_cache=False).logits[0].float()
                 for r in probe]
        packed = collate([_join(probe)], 0)
        together = model(**{k: v.to(device) for k, v in packed.items() if k != "labels"}, use_cache=False).logits[0].float()
    except (TypeError, ValueError, RuntimeError):
        return False
    finally:
        model.train(was_training)
    expected = torch.cat(alone)
    scale = float(expected.abs().max()) + 1e-6
    return bool((together - expected).abs().max() <= rtol * scale)
