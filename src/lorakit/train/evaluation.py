"""Held-out evaluation: the loss (a mean over rows, or over labelled tokens for a causal LM), accuracy or perplexity,
and how a run's report states the change."""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from lorakit.kernels.linear_cross_entropy import IGNORE_INDEX
from lorakit.speed.families import causal_lm_parts
from lorakit.speed.fused_head import fused_loss_forward
from lorakit.train import distributed
from lorakit.train.data import collate
from lorakit.train.distributed import Dist


def loss_targets(b: dict[str, torch.Tensor]) -> int:
    """What the batch loss is a mean over: rows (classification) or labelled next tokens (causal LM)."""
    labels = b["labels"]
    return labels.numel() if labels.dim() == 1 else int((labels[:, 1:] != IGNORE_INDEX).sum().item())


# many parameters: the rows and their task, then keyword options that default for a caller outside the trainer
@torch.no_grad()
def evaluate(model: nn.Module, rows: list[dict[str, Any]], task: str, pad_id: int, *, batch_size: int = 64,
             dist: Dist | None = None, forward: Callable | None = None, autocast: Callable = contextlib.nullcontext,
             ) -> dict[str, float]:
    """Held-out loss (a mean over rows, or over labelled tokens for a causal LM), plus accuracy for
    classification or perplexity for a causal LM. Writes nothing.

    Under ``dist`` each process takes every world-th row and the sums are reduced; ``forward(batch)``
    replaces ``model(**batch)`` (FSDP2 runs the forward through its wrapper). A causal LM of a fused-head family
    computes its loss with the fused head (``speed.fused_head``), as in training: its N x V logits, 16 GB for 64
    rows of 512 tokens of a 128k vocabulary, are never formed.
    """
    if not rows:
        return {}
    d = dist or Dist()
    device = next(model.parameters()).device
    parts = causal_lm_parts(model) if task == "causal-lm" and forward is None else None
    if parts is not None:
        forward = functools.partial(_fused_eval, parts, model)
    was_training = model.training
    model.eval()
    ordered = sorted(rows, key=lambda r: len(r["input_ids"]))  # less padding; order does not matter
    mine = ordered[d.rank :: d.world]
    n_batches = math.ceil(math.ceil(len(ordered) / d.world) / batch_size)  # the same on every rank (FSDP2 gathers in forward)
    loss_sum = weight = correct = 0.0
    try:
        for i in range(n_batches):
            chunk = mine[i * batch_size : (i + 1) * batch_size]
            b = {k: v.to(device, non_blocking=True) for k, v in collate(chunk or ordered[:1], pad_id).items()}
            with autocast():
                out = forward(b) if forward is not None else model(**b)
            if not chunk:  # this rank ran out of rows: it only takes part in the gathers
                continue
            n = loss_targets(b)
            loss_sum += out.loss.float().item() * n
            weight += n
            if task == "classify":
                correct += (out.logits.argmax(-1) == b["labels"]).sum().item()
    finally:
        model.train(was_training)
    loss_sum, weight, correct = distributed.sum_across(d, [loss_sum, weight, correct], device)
    result = {"eval_loss": loss_sum / max(weight, 1)}
    if task == "classify":
        result["eval_accuracy"] = correct / max(weight, 1)
    else:
        result["eval_perplexity"] = math.exp(min(result["eval_loss"], 50.0))
    return result


def _fused_eval(parts, model: nn.Module, batch: dict[str, torch.Tensor]):
    """The fused-head loss of an evaluation batch (``speed.fused_head``), or the model's own forward where the call is
    one it does not cover."""
    return fused_loss_forward(parts, dict(batch)) or model(**batch)


def format_metrics(metrics: dict[str, float]) -> str:
    """"loss 0.6931, accuracy 0.5000" (perplexity to two places)."""
    parts = []
    for k, v in metrics.items():
        name = k.removeprefix("eval_")
        parts.append(f"{name} {v:.4f}" if name != "perplexity" else f"{name} {v:.2f}")
    return ", ".join(parts)


def held_out_change(report: dict[str, Any]) -> str | None:
    """"held-out accuracy: 0.4945 -> 0.8080" (or loss) from run()'s report; None on processes other than rank 0."""
    result = report["result"]
    if "after" not in result or not report.get("is_main", True):
        return None
    before, after = result.get("before", {}), result["after"]
    key = "eval_accuracy" if "eval_accuracy" in after else "eval_loss"
    name = key.removeprefix("eval_")
    return f"held-out {name}: {before[key]:.4f} -> {after[key]:.4f}" if key in before else f"held-out {name}: {after[key]:.4f}"
