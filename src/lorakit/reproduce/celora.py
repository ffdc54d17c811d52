"""Reproduction: exact LoRA vs CE-LoRA (Chen et al. 2025) at CPU scale.

(a) MiniLM on fresh-vs-rotten sentiment, LoRA on every linear layer, several seeds:
    held-out accuracy of both, mean over seeds.
(b) SmolLM2-135M on Hamlet (causal LM), LoRA on every linear layer: held-out loss of both.
For every run: backward FLOPs of the linear layers per step, measured mean step time, the
loss curve (PNG). Plus (c): the per-layer relative error of dX = G W0 on real gradients of
both models, with and without Double-LoRA, for score- and weight-based selection.

CE-LoRA uses the architecture presets (value/output/up/down projections at 0.55/0.65,
query/key/gate exact), Double-LoRA rank r0 = r, selection by score, refresh every 50 steps.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from lorakit.adapters import LoraConfig
from lorakit.errors import LorakitError
from lorakit.files import write_atomic
from lorakit.options import fill_defaults, group, option, positive_int
from lorakit.reproduce import BudgetOptions, with_overrides, write_csv
from lorakit.train.config import EpochOptions, ModelOptions, OutputOptions


@dataclass
class Budget:
    seeds: int = 3
    minilm_steps: int = 200
    smollm2_steps: int = 60
    smollm2_batch: int = 4
    smollm2_length: int = 256
    refresh_every: int = 50
    eval_limit: int | None = None

    @classmethod
    def full(cls) -> "Budget":
        return cls(seeds=3, minilm_steps=400, smollm2_steps=200, refresh_every=100)


@dataclass
class CeloraRun(BudgetOptions, EpochOptions, OutputOptions, ModelOptions):
    """The options of ``lorakit reproduce celora`` (None: the Budget's)."""

    OMIT: ClassVar[tuple[str, ...]] = ("quick", "epochs", "overwrite", "model", "device")
    DEFAULTS: ClassVar[dict[str, Any]] = {"out": "reproduce/celora", "base_dtype": "auto"}
    NOTES: ClassVar[dict[str, str]] = {"out": "results.json, the CSV tables and celora.png"}

    parts: str = option("minilm,smollm2,errors", "any of minilm, smollm2, errors")
    seeds: int | None = option(None, "seeds per backward", parse=positive_int, default_text="3")
    minilm_steps: int | None = option(None, "steps of each MiniLM run", parse=positive_int, default_text="200; 400 with --full")
    smollm2_steps: int | None = option(None, "steps of each SmolLM2 run", parse=positive_int,
                                       default_text="60; 200 with --full")
    lora: LoraConfig = group(LoraConfig, "LoRA adapter", only=("r",))

    def __post_init__(self) -> None:
        fill_defaults(self)
        names = tuple(p.strip() for p in self.parts.split(",") if p.strip())
        unknown = set(names) - {"minilm", "smollm2", "errors"}
        if unknown:
            raise LorakitError(f"--parts {sorted(unknown)} unknown; choose from minilm, smollm2, errors")

    def budget(self) -> "Budget":
        return with_overrides(Budget.full() if self.full else Budget(), seeds=self.seeds, minilm_steps=self.minilm_steps,
                              smollm2_steps=self.smollm2_steps, eval_limit=self.eval_limit)

    def run(self) -> dict[str, Any]:
        parts = tuple(p.strip() for p in self.parts.split(",") if p.strip())
        return run(self.out, budget=self.budget(), parts=parts, rank=self.lora.r, base_dtype=self.base_dtype)


def _train(model: str, data: str, out: Path, backward: str, seed: int, steps: int, budget: Budget, rank: int,
           **kw) -> dict[str, Any]:
    from lorakit.adapters.config import CeloraConfig, LoraConfig
    from lorakit.train import TrainConfig, run

    lora = LoraConfig(r=rank, alpha=2 * rank, targets="all-linear", backward=backward,
                      celora=CeloraConfig(refresh_every=budget.refresh_every))
    cfg = TrainConfig(model=model, data=data, out=str(out), steps=steps, seed=seed, lora=lora, quiet=True, save_every=None,
                      eval_limit=budget.eval_limit, **kw)
    report = run(cfg)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_s = report["result"]["train_seconds"]
    return {"backward": backward, "seed": seed, "after": report["result"]["after"], "before": report["result"]["before"],
            "steps": steps, "mean_step_s": train_s / steps,
            "curve": [(r["step"], r["loss"]) for r in records if r.get("event") == "train" and "loss" in r]}


def _flops(model_spec: str, task: str, batch_size: int, seq_len: int, rank: int, base_dtype: str = "auto",
           ) -> dict[str, float]:
    """Per-step linear-layer FLOPs, exact vs CE-LoRA, for a batch of batch_size x seq_len tokens."""
    from lorakit import celora
    from lorakit.adapters import LoraConfig, attach
    from lorakit.bench.workloads import fixed_batch
    from lorakit.train.models import load_model

    loaded = load_model(model_spec, task, label_names=["rotten", "fresh"] if task == "classify" else None, dtype=base_dtype)
    batch = fixed_batch(loaded.tokenizer, task, batch_size, seq_len)
    model = attach(loaded.model, LoraConfig(r=rank, alpha=2 * rank, targets="all-linear", backward="celora"))
    report = celora.flops(model, batch_size * seq_len, batch=batch)
    return {"tokens": batch_size * seq_len, "forward": report.forward, "backward_exact": report.backward_exact,
            "backward_celora": report.backward_approx, "backward_saving": report.backward_saving,
            "step_saving": report.saving}


def _dx_errors(model_spec: str, task: str, rank: int, base_dtype: str = "auto") -> list[dict[str, Any]]:
    from lorakit import celora
    from lorakit.adapters import LoraConfig, attach, lora_layers
    from lorakit.bench.workloads import fixed_batch
    from lorakit.celora.measure import layer_errors
    from lorakit.train.models import load_model

    loaded = load_model(model_spec, task, label_names=["rotten", "fresh"] if task == "classify" else None, dtype=base_dtype)
    size = (16, 64) if task == "classify" else (2, 256)
    batches = (fixed_batch(loaded.tokenizer, task, *size, offset=0), fixed_batch(loaded.tokenizer, task, *size, offset=1))
    torch.manual_seed(0)
    model = attach(loaded.model, LoraConfig(r=rank, alpha=2 * rank, targets="all-linear"))
    model_type = model.config.model_type
    plan = celora.keep_ratios(model_type, [n for n, _ in lora_layers(model)], None)
    errors = layer_errors(model, batches, plan, svd_ranks=(0, rank), selections=("score", "weight"))
    return [{"model": model_spec, **e.__dict__} for e in errors]


def _plot(runs: dict[str, list[dict[str, Any]]], errors: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.2))
    for ax, (name, runs_of) in zip(axes[:2], runs.items()):
        for run in runs_of:
            steps, losses = zip(*run["curve"]) if run["curve"] else ((), ())
            style = "-" if run["backward"] == "exact" else "--"
            ax.plot(steps, losses, style, alpha=0.8, label=f"{run['backward']} seed {run['seed']}")
        ax.set_title(f"{name}: training loss")
        ax.set_xlabel("optimizer step")
        ax.legend(fontsize=7)
    ax = axes[2]
    models = sorted({e["model"] for e in errors})
    labels, values = [], []
    for m in models:
        for r0_label, pick in (("top-k", lambda e: e["svd_rank"] == 0), ("Double-LoRA", lambda e: e["svd_rank"] > 0)):
            for sel in ("score", "weight"):
                vals = [e["relative_error"] for e in errors if e["model"] == m and pick(e) and e["selection"] == sel]
                if vals:
                    labels.append(f"{m.split(':')[-1]}\n{r0_label}\n{sel}")
                    values.append(statistics.mean(vals))
    ax.bar(range(len(values)), values, color=["tab:blue", "tab:cyan", "tab:orange", "tab:red"] * len(models))
    ax.set_xticks(range(len(values)), labels, fontsize=7, rotation=30)
    ax.set_ylabel("mean relative error of dX")
    ax.set_title("approximate frozen-weight backward, per-layer mean")
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)


def run(out: str | Path = "reproduce/celora", *, budget: Budget | None = None, parts: tuple[str, ...] = ("minilm", "smollm2", "errors"),
        rank: int = 8, say=print, base_dtype: str = "auto") -> dict[str, Any]:
    """Exact LoRA against CE-LoRA (see the module docstring); ``base_dtype``: the bases' storage (--base-dtype)."""
    budget = budget or Budget()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"budget": budget.__dict__, "rank": rank, "runs": {}, "flops": {}, "summary": {}}
    if "minilm" in parts:
        trained = []
        for seed in range(budget.seeds):
            for backward in ("exact", "celora"):
                say(f"MiniLM sentiment, seed {seed}, {backward} ...")
                trained.append(_train("builtin:minilm", "builtin:rotten-tomatoes", out / f"minilm-{backward}-{seed}", backward,
                                    seed, budget.minilm_steps, budget, rank, base_dtype=base_dtype))
        result["runs"]["minilm"] = trained
        acc = {b: statistics.mean(r["after"]["eval_accuracy"] for r in trained if r["backward"] == b) for b in ("exact", "celora")}
        step = {b: statistics.mean(r["mean_step_s"] for r in trained if r["backward"] == b) for b in ("exact", "celora")}
        result["flops"]["minilm"] = _flops("builtin:minilm", "classify", 32, 64, rank, base_dtype)
        result["summary"]["minilm"] = {"accuracy_exact": acc["exact"], "accuracy_celora": acc["celora"],
                                       "accuracy_gap_points": 100 * (acc["exact"] - acc["celora"]),
                                       "mean_step_s_exact": step["exact"], "mean_step_s_celora": step["celora"]}
    if "smollm2" in parts:
        trained = []
        for backward in ("exact", "celora"):
            say(f"SmolLM2 on Hamlet, {backward} ...")
            trained.append(_train("builtin:smollm2", "builtin:hamlet", out / f"smollm2-{backward}", backward, 0,
                                budget.smollm2_steps, budget, rank, batch_size=budget.smollm2_batch,
                                max_length=budget.smollm2_length, base_dtype=base_dtype))
        result["runs"]["smollm2"] = trained
        loss = {r["backward"]: r["after"]["eval_loss"] for r in trained}
        result["flops"]["smollm2"] = _flops("builtin:smollm2", "causal-lm", budget.smollm2_batch, budget.smollm2_length, rank,
                                           base_dtype)
        result["summary"]["smollm2"] = {"eval_loss_exact": loss["exact"], "eval_loss_celora": loss["celora"],
                                        "relative_gap": loss["celora"] / loss["exact"] - 1,
                                        "mean_step_s_exact": trained[0]["mean_step_s"], "mean_step_s_celora": trained[1]["mean_step_s"]}
    errors: list[dict[str, Any]] = []
    if "errors" in parts:
        say("per-layer dX errors on real gradients ...")
        errors = (_dx_errors("builtin:minilm", "classify", rank, base_dtype)
                  + _dx_errors("builtin:smollm2", "causal-lm", rank, base_dtype))
        write_csv(out / "dx_errors.csv", errors)
        result["summary"]["dx_error_mean"] = {
            f"{m.split(':')[-1]} r0={'r' if r0 else 0} {sel}": statistics.mean(
                e["relative_error"] for e in errors if e["model"] == m and (e["svd_rank"] > 0) == bool(r0) and e["selection"] == sel)
            for m in ("builtin:minilm", "builtin:smollm2") for r0 in (0, 1) for sel in ("score", "weight")}
    _plot(result["runs"], errors, out / "celora.png")
    write_atomic(out / "results.json", lambda tmp: Path(tmp).write_text(json.dumps(result, indent=2, default=str)))
    say(json.dumps(result["summary"], indent=2))
    say(f"wrote results.json, celora.png{', dx_errors.csv' if errors else ''} to {out}/")
    return result
