"""Training hooks of the limits package: norm trajectories and attention decisions in metrics.jsonl."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorakit.speed.attention import attention_modules
from lorakit.limits.norms import measure_norms


class NormMonitor:
    """Every ``every`` optimizer steps: ``measure_norms`` on a fixed batch, per layer (worst head)."""

    def __init__(self, batch: dict[str, torch.Tensor], every: int) -> None:
        if isinstance(every, bool) or not isinstance(every, int) or every <= 0:
            raise ValueError(f"norm_every={every!r} must be a positive number of optimizer steps")
        self.batch, self.every = batch, every

    def record(self, model: nn.Module) -> dict[str, Any]:
        report = measure_norms(model, self.batch)
        keep = ("layer", "max_logit", "logit_bound", "q_max", "k_max", "q_share", "k_share", "heads_above")
        return {"norms": {"length": report.length, "threshold": report.threshold,
                          "layers": [{k: row[k] for k in keep} for row in report.layers()]}}

    def after_step(self, step: int, model: nn.Module) -> dict[str, Any] | None:
        return self.record(model) if step % self.every == 0 else None


class AttentionMonitor:
    """Counts of lorakit attention decisions (e.g. poly-2, exact) since the last record, every ``every`` steps."""

    def __init__(self, every: int) -> None:
        self.every = every

    def after_step(self, step: int, model: nn.Module) -> dict[str, Any] | None:
        if step % self.every:
            return None
        total: Counter = Counter()
        for module in attention_modules(model).values():
            policy = getattr(module, "lorakit_attention", None)
            if policy is not None:
                total.update(policy.decisions)
                policy.decisions.clear()
        return {"attention": dict(total)} if total else None


def plot_norm_trajectories(records: list[dict[str, Any]], path: str | Path, title: str = "") -> Path | None:
    """Max |beta q.k| per layer against the optimizer step, with sqrt(log L) (and the certified bounds dashed)."""
    rows = [r for r in records if "norms" in r]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lorakit.files import write_atomic

    steps = [r["step"] for r in rows]
    layers = [entry["layer"] for entry in rows[0]["norms"]["layers"]]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    cmap = plt.get_cmap("viridis")
    for i, name in enumerate(layers):
        color = cmap(i / max(len(layers) - 1, 1))
        ax.plot(steps, [r["norms"]["layers"][i]["max_logit"] for r in rows], color=color, lw=1.2,
                label=name if len(layers) <= 8 else None)
        ax.plot(steps, [r["norms"]["layers"][i]["logit_bound"] for r in rows], color=color, lw=0.8, ls="--")
    ax.plot(steps, [r["norms"]["threshold"] for r in rows], color="red", lw=2, label="sqrt(log L)")
    ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("max |beta q.k| (solid), certified bound (dashed)")
    ax.set_title(title or "attention logits per layer against the almost-linear threshold")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)
    return path


