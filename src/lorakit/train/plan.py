"""What a training run will need, decided before any weight is read: precision and memory.

``plan_run(cfg)`` reads the model's config only (``models.model_config``), chooses the base's storage
and compute dtypes (``train.precision.plan_precision``; ``--base-dtype auto`` asks the memory plan
whether an fp32 base fits) and estimates the process's peak (``train.memory_plan.plan_memory``)
against what it may use (``available_memory``: MemAvailable, the cgroup limit, ``--max-memory``).
A run that will not fit is refused in one line naming the estimate, the limit and the options that
fit (``check_fits``), before its output directory is touched; ``lorakit train --dry-run`` prints the
plan and exits. On a GPU the plan is the host process's (the GPU's own memory is not planned).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

from lorakit.errors import ConfigError
from lorakit.train.config import TrainConfig, resolve_device, task_defaults
from lorakit.train.memory_plan import RUNTIME_BYTES, MemoryPlan, available_memory, check_fits, plan_memory
from lorakit.train.precision import PrecisionPlan, plan_precision, quant_spec


# What a `lorakit train` process holds beyond a library loop's (plan_memory's runtime row): the tokenizer's and the
# data's Python objects, evaluation, the trainer. Measured: TinyLlama-1.1B bf16, seq 512, checkpointing, through
# the CLI 3.70 GiB peak against 3.37 GiB for the same step in an own loop (AMD EPYC, 2026-12-06).
TRAIN_PROCESS_BYTES = 330 * 2**20


@dataclass(frozen=True)
class RunPlan:
    device: str
    precision: PrecisionPlan
    memory: MemoryPlan
    available: tuple[int, str]  # bytes this process may use, and where that figure came from
    refusal: str | None  # the one-line reason the run does not fit, or None

    def available_text(self) -> str:
        return f"{self.available[0] / 1e9:.1f} GB available ({self.available[1]})"

    def describe(self) -> str:
        """The --dry-run report: precision, the memory table and the verdict."""
        verdict = f"does not fit: {self.refusal}" if self.refusal else f"fits: ~{self.memory.total / 1e9:.1f} GB of {self.available_text()}"
        return "\n".join([f"device: {self.device}", f"precision: {self.precision.why}", "",
                          self.memory.table(self.available), "", verdict])

    def to_dict(self) -> dict[str, Any]:
        return {"device": self.device, "precision": self.precision.to_dict(), "memory": self.memory.to_dict(),
                "available_bytes": self.available[0], "available_from": self.available[1], "refusal": self.refusal}


def compute_dtype(storage: torch.dtype, device: str, bf16_pays: bool) -> torch.dtype:
    """The dtype the products run in for a base stored in ``storage`` (``train.precision``'s table)."""
    if storage == torch.float32 or torch.device(device).type != "cpu":
        return storage
    return torch.bfloat16 if storage == torch.bfloat16 and bf16_pays else torch.float32


def plan_run(cfg: TrainConfig, dist=None) -> RunPlan:
    """The plan of ``cfg``'s run in this process (see the module docstring); raises ConfigError when it does not fit
    and ``cfg.dry_run`` is off."""
    from lorakit.speed.gemm import bf16_decision
    from lorakit.train.data import infer_task
    from lorakit.train.models import check_max_length, model_config

    world = dist.world if dist is not None and dist.active else 1
    if dist is not None and dist.active:
        device = str(dist.device)
    else:
        device = str(resolve_device(cfg.device))
    task = cfg.task or infer_task(cfg.data, label_column=cfg.label_column)
    config = model_config(cfg.model)
    check_max_length(cfg.model, cfg.max_length or task_defaults(task)["max_length"])
    on_cpu = torch.device(device).type == "cpu"
    bf16_pays = on_cpu and cfg.base_dtype in ("auto", "bf16", "int8", "int4") and bf16_decision(device)[0]
    settings: dict[str, Any] = {"batch_size": cfg.batch_size, "grad_accum": cfg.grad_accum, "processes": world,
                                "seq_len": cfg.max_length or task_defaults(task)["max_length"],
                                "gradient_checkpointing": cfg.gradient_checkpointing,
                                "quant": quant_spec(cfg)}  # int8 / int4: the frozen linear weights counted packed

    def plan_for(s: dict[str, Any]) -> MemoryPlan:
        storage = s["base_dtype"]
        return plan_memory(config, task=task, targets=cfg.lora, compute_dtype=compute_dtype(storage, device, bf16_pays),
                           attention_mask=True, runtime=RUNTIME_BYTES + TRAIN_PROCESS_BYTES, **s)

    available = available_memory(cfg.max_memory)
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if world > 1 else 1
    if local > 1:  # the processes on this machine share its memory
        available = (available[0] // local, f"{available[1]} / {local} processes on this machine")
    precision = plan_precision(cfg.base_dtype, device, bf16=cfg.bf16, quant=settings["quant"],
                               fits=lambda dt: plan_for({**settings, "base_dtype": dt}).total <= available[0])
    settings["base_dtype"] = precision.storage
    refusal = None
    if on_cpu:
        try:
            check_fits(plan_for, settings, available)
        except ConfigError as exc:
            refusal = str(exc)
    plan = RunPlan(device, precision, plan_for(settings), available, refusal)
    if refusal and not cfg.dry_run:
        raise ConfigError(f"{cfg.model} with its base stored in {precision.base_format}: {refusal} "
                          "(lorakit train --dry-run shows the plan)")
    return plan
