"""The per-step hooks: plain objects with one method, ``after_step(step, model) -> dict | None`` (what they return
is logged with the step's train record), and optionally ``state_dict``/``load_state_dict`` (kept in checkpoints
under the hook's class name).

``step_hooks`` builds a run's list in a fixed order: the caller's own, then those the attached adapters ask for
(``lorakit.adapters.variants.step_hooks``: each variant says what it needs), then the limits paper's (norm cap,
attention monitor, norm monitor). The job asks this list; it never branches on a variant's name.
"""

from __future__ import annotations

from typing import Any, Protocol

from torch import nn

from lorakit.train.config import TrainConfig
from lorakit.train.data import Dataset, collate


class StepHook(Protocol):
    def after_step(self, step: int, model: nn.Module) -> dict[str, Any] | None: ...


def adapter_hooks(model: nn.Module) -> list[StepHook]:
    """What the attached adapters' variants ask to run after every optimizer step (CE-LoRA: its feature refresh)."""
    from lorakit.adapters import variants

    return variants.step_hooks(model)


def limits_hooks(cfg: TrainConfig, model: nn.Module, data: Dataset, pad_id: int) -> list[StepHook]:
    """Norm cap (after every step), lorakit attention with its decision log, and the norm monitor."""
    hooks: list[StepHook] = []
    if cfg.lora.norm_control.cap is not None:
        from lorakit.limits.norm_cap import NormCap

        hooks.append(NormCap(cfg.lora.norm_control.cap))
    if cfg.attention is not None:
        from lorakit.limits.attention import use_attention
        from lorakit.limits.monitor import AttentionMonitor

        use_attention(model, cfg.attention, cfg.attention_tolerance)
        hooks.append(AttentionMonitor(cfg.log_every))
    if cfg.norm_every:
        from lorakit.limits.monitor import NormMonitor

        rows = (data.eval or data.train)[: min(8, cfg.eval_batch_size)]
        batch = {k: v for k, v in collate(rows, pad_id).items() if k in ("input_ids", "attention_mask")}
        hooks.append(NormMonitor(batch, cfg.norm_every))
    return hooks


def step_hooks(cfg: TrainConfig, model: nn.Module, data: Dataset, pad_id: int,
               given: list[StepHook] | None = None) -> list[StepHook]:
    """The run's hooks, in order: ``given`` (the caller's), the adapters', the limits paper's."""
    return list(given or []) + adapter_hooks(model) + limits_hooks(cfg, model, data, pad_id)
