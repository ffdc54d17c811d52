"""Rank advice for real models from the linear result with L = 1 (Zeng & Lee, ICLR 2024).

For one adapted matrix the best rank-r update reaches the target update dW with error
||dW - dW_r||_F = sqrt(sum_{i > r} sigma_i(dW)^2) (Eckart-Young; the L = 1 case of the linear
theorem), so the spectrum of the weight change a full fine-tuning makes tells how much rank each
module needs. Given dW per target module (from a fully fine-tuned checkpoint, or from a short
full fine-tuning run lorakit performs), ``advise`` returns per-module ranks:

- ``tol``: the smallest r with relative error ||dW - dW_r||_F / ||dW||_F <= tol, per module;
- ``budget``: a parameter budget (sum of r (in + out)) split across modules to keep the most
  energy sum_i<=r sigma_i^2: every module starts at r = 1 and the next unit of rank goes to the
  module with the largest sigma_{r+1}^2 / (in + out) (greedy on a concave, separable objective).

The result is a ``rank_pattern`` for ``LoraConfig`` (saved as PEFT's rank_pattern).
"""

from __future__ import annotations

import heapq
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lorakit.adapters.config import LoraConfig
from lorakit.module_kinds import linear_shape
from lorakit.errors import ConfigError, ModelError
from lorakit.files import write_atomic


@dataclass
class ModuleSpectrum:
    name: str
    in_features: int
    out_features: int
    singular_values: Tensor

    @property
    def cost_per_rank(self) -> int:
        return self.in_features + self.out_features

    def relative_error(self, r: int) -> float:
        s2 = self.singular_values.double().pow(2)
        total = float(s2.sum())
        return (float(s2[r:].sum()) / total) ** 0.5 if total > 0 else 0.0


@dataclass
class RankAdvice:
    spectra: list[ModuleSpectrum]
    ranks: dict[str, int]
    mode: str
    value: float

    def rank_pattern(self) -> dict[str, int]:
        return dict(self.ranks)

    def parameters(self) -> int:
        return sum(self.ranks[s.name] * s.cost_per_rank for s in self.spectra)

    def lora_config(self, **kwargs: Any) -> LoraConfig:
        """A LoraConfig adapting exactly these modules with the advised ranks (kwargs: alpha, dropout, ...)."""
        return LoraConfig(r=max(self.ranks.values()), targets=[s.name for s in self.spectra],
                          rank_pattern=self.rank_pattern(), **kwargs)

    def table(self) -> str:
        rows = [("module", "shape", "rank", "rel. error", "sigma_1")]
        for s in self.spectra:
            r = self.ranks[s.name]
            rows.append((s.name, f"{s.out_features}x{s.in_features}", str(r), f"{s.relative_error(r):.3f}",
                         f"{float(s.singular_values[0]):.3g}" if s.singular_values.numel() else "0"))
        widths = [max(len(row[i]) for row in rows) for i in range(5)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
        lines.append(f"{self.mode} = {self.value:g}: {self.parameters():,} adapter parameters in {len(self.spectra)} modules")
        return "\n".join(lines)

    def to_json(self, path: str | Path) -> Path:
        doc = {"mode": self.mode, "value": self.value, "rank_pattern": self.rank_pattern(), "parameters": self.parameters(),
               "modules": [{"name": s.name, "in": s.in_features, "out": s.out_features, "rank": self.ranks[s.name],
                            "relative_error": s.relative_error(self.ranks[s.name]),
                            "singular_values": [float(v) for v in s.singular_values[:64]]} for s in self.spectra]}
        path = Path(path)
        write_atomic(path, lambda tmp: Path(tmp).write_text(json.dumps(doc, indent=1)))
        return path


def weight_deltas(base: nn.Module, tuned: nn.Module | dict[str, Tensor], names: list[str]) -> dict[str, Tensor]:
    """dW = W_tuned - W_base for each named module, in [out, in] layout (GPT-2 Conv1D transposed)."""
    tuned_modules = dict(tuned.named_modules()) if isinstance(tuned, nn.Module) else None
    out = {}
    for name in names:
        module = base.get_submodule(name)
        if isinstance(tuned, dict):
            if name not in tuned:
                raise ModelError(f"no weight change given for {name}")
            after = tuned[name]
        else:
            if name not in tuned_modules:
                raise ModelError(f"the tuned model has no module {name}; is it the same architecture as the base?")
            after = tuned_modules[name].weight.detach()
        before = module.weight.detach()
        if after.shape != before.shape:
            raise ModelError(f"{name}: tuned weight {list(after.shape)} vs base {list(before.shape)}")
        delta = (after.float() - before.float())
        out[name] = delta if isinstance(module, nn.Linear) else delta.T
    return out


def spectra(base: nn.Module, deltas: dict[str, Tensor]) -> list[ModuleSpectrum]:
    result = []
    for name, delta in deltas.items():
        in_f, out_f = linear_shape(base.get_submodule(name))
        result.append(ModuleSpectrum(name, in_f, out_f, torch.linalg.svdvals(delta.double()).float()))
    return result


def check_budget(budget: Any, minimum: int, when: str = "") -> None:
    """A parameter budget buys at least rank 1 on every target module: ``minimum`` = sum of (in + out)."""
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < minimum:
        raise ConfigError(f"budget={budget!r} adapter parameters is below {minimum:,}, the cost of rank 1 on every "
                          f"target module; raise it or adapt fewer modules{when}")


def advise(modules: list[ModuleSpectrum], *, tol: float | None = None, budget: int | None = None,
           max_rank: int | None = None) -> RankAdvice:
    """Per-module ranks by tolerance or by parameter budget (see the module docstring)."""
    if (tol is None) == (budget is None):
        raise ConfigError("give exactly one of tol (relative Frobenius error per module) or budget (adapter parameters)")
    if not modules:
        raise ConfigError("no modules to advise on")
    cap = {s.name: min(s.in_features, s.out_features, max_rank or 10**9) for s in modules}
    if tol is not None:
        if not 0 <= tol < 1:
            raise ConfigError(f"tol={tol!r} must be in [0, 1): the relative error ||dW - dW_r||_F / ||dW||_F left per module")
        ranks = {}
        for s in modules:
            r = 1
            while r < cap[s.name] and s.relative_error(r) > tol:
                r += 1
            ranks[s.name] = r
        return RankAdvice(modules, ranks, "tol", float(tol))
    minimum = sum(s.cost_per_rank for s in modules)
    check_budget(budget, minimum)
    ranks = {s.name: 1 for s in modules}
    spent = minimum
    heap = []
    for s in modules:
        if cap[s.name] > 1:
            gain = float(s.singular_values[1]) ** 2 if s.singular_values.numel() > 1 else 0.0
            heapq.heappush(heap, (-gain / s.cost_per_rank, s.name))
    by_name = {s.name: s for s in modules}
    while heap:
        _, name = heapq.heappop(heap)
        s = by_name[name]
        if spent + s.cost_per_rank > budget:
            continue  # too expensive now; a cheaper module may still fit
        ranks[name] += 1
        spent += s.cost_per_rank
        r = ranks[name]
        if r < cap[name] and r < s.singular_values.numel():
            heapq.heappush(heap, (-float(s.singular_values[r]) ** 2 / s.cost_per_rank, name))
    return RankAdvice(modules, ranks, "budget", float(budget))


def tuned_deltas(model_spec: str, tuned_spec: str, targets: str | list[str], *, base_dtype: str | torch.dtype = "auto",
                 ) -> tuple[nn.Module, dict[str, Tensor]]:
    """(base model, dW per target module) from a fully fine-tuned checkpoint of ``model_spec``'s architecture.
    The task is the base's built-in one, else classification if the checkpoint is a sequence classifier. Both
    models are stored in ``base_dtype`` (``train.models.load_model``; a 16-bit storage rounds small weight changes)."""
    from lorakit.adapters.targets import resolve
    from lorakit.train.models import builtin_default_task, load_model, load_tokenizer, model_config

    config = model_config(tuned_spec)
    archs = getattr(config, "architectures", None) or []
    task = builtin_default_task(model_spec) or ("classify" if any("SequenceClassification" in a for a in archs)
                                                else "causal-lm")
    # the head is not a target: its labels only have to exist (the checkpoint's own, when it has them)
    labels = [str(config.id2label[i]) for i in sorted(config.id2label)] if task == "classify" else None
    tokenizer = load_tokenizer(model_spec)
    base = load_model(model_spec, task, tokenizer=tokenizer, label_names=labels, dtype=base_dtype).model
    tuned = load_model(tuned_spec, task, tokenizer=tokenizer, label_names=labels, dtype=base_dtype).model
    return base, weight_deltas(base, tuned, resolve(base, LoraConfig(targets=targets)).targets)


def full_finetune_deltas(model_spec: str, data_spec: str, targets: str | list[str], *, steps: int = 100, lr: float = 1e-4,
                         batch_size: int = 32, seed: int = 0, out: str | Path = "rank-advice-run",
                         quiet: bool = True, budget: int | None = None,
                         ) -> tuple[nn.Module, dict[str, Tensor], dict[str, float]]:
    """A short full fine-tuning of the target modules (and the task head) with lorakit's trainer.

    ``budget``: the parameter budget ``advise`` will split, checked against the targets before training
    (rank 1 everywhere is the least it can buy), so a budget that cannot work fails in seconds.
    Returns (the base model restored to its original weights, dW per target module, held-out metrics after)."""
    from lorakit.adapters.targets import resolve
    from lorakit.train import TrainConfig
    from lorakit.train import loop
    from lorakit.train.job import prepare
    from lorakit.train.state import Trainer

    torch.manual_seed(seed)
    cfg = TrainConfig(model=model_spec, data=data_spec, steps=steps, lr=lr, batch_size=batch_size, seed=seed, out=str(out),
                      quiet=quiet, save_every=None, eval_every=steps, base_dtype="fp32")  # the weights train: fp32
    loaded, data = prepare(cfg)
    model = loaded.model
    res = resolve(model, LoraConfig(targets=targets, task_type="SEQ_CLS" if data.task == "classify" else "CAUSAL_LM"))
    if budget is not None:  # before the fine-tuning, so that a budget that cannot work fails in seconds
        check_budget(budget, sum(sum(linear_shape(model.get_submodule(n))) for n in res.targets),
                     " (checked before the fine-tuning)")
    before = {n: model.get_submodule(n).weight.detach().clone() for n in res.targets}
    for p in model.parameters():
        p.requires_grad_(False)
    for n in res.targets:
        model.get_submodule(n).weight.requires_grad_(True)
    for n in res.modules_to_save:
        for p in model.get_submodule(n).parameters():
            p.requires_grad_(True)
    trainer = Trainer(model, data, cfg, pad_id=loaded.tokenizer.pad_token_id)
    result = loop.fit(trainer)
    tuned = {n: model.get_submodule(n).weight.detach().clone() for n in res.targets}
    with torch.no_grad():
        for n, w in before.items():
            model.get_submodule(n).weight.copy_(w)
    deltas = weight_deltas(model, tuned, res.targets)
    return model, deltas, result.get("after", {})
