"""``Trainer``: the state of a training run (model, AdamW and its schedule, the position in the data, the metrics
log, the per-step hooks) and the pieces of one step; ``loop.fit`` drives it. Usable on any attached model.

The position (optimizer steps done, and the next micro-batch: epoch, index within the epoch), the optimizer,
schedule, RNG and hook states are what a checkpoint holds, in the same format on any process count; a
resume continues exactly where the checkpoint left off.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from lorakit.adapters import save_adapter
from lorakit.errors import ConfigError, TrainingError
from lorakit.train import checkpoint as ckpt
from lorakit.train import distributed
from lorakit.train.config import DEFAULT_STEPS, TrainConfig, task_defaults
from lorakit.train.data import Dataset, collate
from lorakit.train.distributed import Dist
from lorakit.train.evaluation import evaluate, format_metrics, loss_targets
from lorakit.train.hooks import StepHook
from lorakit.train.precision import PrecisionPlan, autocast_dtype
from lorakit.train.run_dir import MetricsLog, check_same_run


def linear_schedule(warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """LR multiplier: linear warm-up from 0 over ``warmup_steps``, then linear decay to 0."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return factor


def total_steps(cfg: TrainConfig, micro_per_epoch: int) -> int:
    """--steps, else --epochs times the optimizer steps of an epoch, else the default."""
    if cfg.steps is not None:
        return cfg.steps
    if cfg.epochs is not None:
        return cfg.epochs * max(1, micro_per_epoch // cfg.grad_accum)
    return DEFAULT_STEPS


@dataclass(frozen=True)
class MicroBatch:
    batch: dict[str, torch.Tensor]
    weight: float  # its loss's share of the optimizer step's loss
    tokens: int


@dataclass
class LogWindow:
    """The steps since the last train log line: their mean loss and tokens per second."""

    loss: float = 0.0
    tokens: int = 0
    steps: int = 0
    start: float = field(default_factory=time.perf_counter)

    def add(self, loss: float, tokens: int) -> None:
        self.loss, self.tokens, self.steps = self.loss + loss, self.tokens + tokens, self.steps + 1

    def record(self) -> dict[str, float]:
        return {"loss": self.loss / self.steps, "tokens_per_s": self.tokens / max(time.perf_counter() - self.start, 1e-9)}


class Clock:
    """Training time: wall time since the start, less what was spent aside (evaluation, checkpoints)."""

    def __init__(self) -> None:
        self.start = time.perf_counter()

    @contextlib.contextmanager
    def aside(self, window: LogWindow):
        began = time.perf_counter()
        yield
        spent = time.perf_counter() - began
        self.start += spent
        window.start += spent

    def seconds(self) -> float:
        return time.perf_counter() - self.start


class Trainer:
    """The loop's state. ``model`` must already carry an adapter (lorakit.attach).

    ``dist`` places this process in a torchrun run (lorakit.train.distributed): the model is then
    trained under DDP, or FSDP2 with ``dist.shard``; ``cfg.batch_size`` is the global batch. ``precision``
    (the run's ``plan_precision``) decides the autocast; without one, a GPU autocasts to bf16 under --bf16.
    """

    # many parameters: the model, its data and options, then keyword parts job.py builds (all optional)
    def __init__(
        self,
        model: nn.Module,
        data: Dataset,
        cfg: TrainConfig,
        *,
        pad_id: int,
        hooks: list[StepHook] | None = None,
        checkpoint_meta: dict[str, str] | None = None,
        dist: Dist | None = None,
        fingerprint: dict[str, str] | None = None,
        precision: PrecisionPlan | None = None,
    ) -> None:
        if not data.train:
            raise ConfigError(f"{data.source}: no training rows")
        self.model, self.data, self.cfg, self.pad_id = model, data, cfg, pad_id
        self.dist = dist or Dist()
        self.rank_batch = distributed.rank_batch_size(cfg.batch_size, self.dist)
        self.real_rows = distributed.real_rows(len(data.train), self.dist)
        self.hooks = list(hooks or [])
        self.out = Path(cfg.out)
        self.checkpoint_meta = checkpoint_meta or {}
        self.fingerprint = fingerprint or {}  # of the base model and the training rows; a resume must match it
        if not any(p.requires_grad for p in model.parameters()):
            raise ConfigError("the model has no trainable parameters; attach an adapter first")
        self.engine = distributed.wrap(model, self.dist)  # FSDP2 replaces the parameters: before the optimizer
        self.device = next(model.parameters()).device
        self.autocast_dtype = precision.autocast if precision is not None else autocast_dtype(cfg.bf16, self.device)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.lr = cfg.lr if cfg.lr is not None else task_defaults(data.task)["lr"]
        self.optimizer = torch.optim.AdamW(self.params, lr=self.lr, weight_decay=cfg.weight_decay)
        self.micro_per_epoch = math.ceil(len(data.train) / cfg.batch_size)
        self.total_steps = total_steps(cfg, self.micro_per_epoch)
        warmup = int(cfg.warmup * self.total_steps) if cfg.warmup < 1 else int(cfg.warmup)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, linear_schedule(warmup, self.total_steps))
        self.eval_every = cfg.eval_every or max(1, self.total_steps // 4)
        self.step, self.epoch, self.micro = 0, 0, 0  # optimizer steps done; the next micro-batch (epoch, index)
        self.skipped_steps = 0
        self.bad_in_a_row = 0
        self.log = MetricsLog(self.out / "metrics.jsonl", fresh=not cfg.resume, writes=self.dist.is_main)
        self.stop_requested: Callable[[], bool] = lambda: False
        if self.dist.active:
            torch.manual_seed(distributed.per_rank_seed(cfg.seed, self.dist.rank, 0))  # own dropout masks per rank

    # ------------------------------------------------------------------ data order
    def epoch_order(self, epoch: int) -> list[int]:
        """This process's rows of ``epoch`` (all of them on one process), in order."""
        return distributed.epoch_indices(len(self.data.train), self.cfg.seed * 1_000_003, epoch, self.dist)

    def batch(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.device, non_blocking=True) for k, v in collate(rows, self.pad_id).items()}

    def micro_batches(self) -> Iterator[MicroBatch]:
        """The training micro-batches from the current position on, epoch after epoch, each with its loss weight:
        1 / grad_accum, and under torchrun times this rank's share of the global batch's loss targets (the
        sampler's padding rows, which make every rank's share of an epoch equal, weigh 0). The position
        (epoch, micro) moves as each is taken, so a checkpoint after a step resumes with the next one."""
        order = self.epoch_order(self.epoch)
        while True:
            if self.micro >= self.micro_per_epoch:
                self.epoch, self.micro = self.epoch + 1, 0
                order = self.epoch_order(self.epoch)
            start = self.micro * self.rank_batch
            idx = order[start : start + self.rank_batch]
            real = idx[: max(0, self.real_rows - start)]
            rows = [self.data.train[i] for i in (real or idx)]
            b = self.batch(rows)
            weight = 1.0 / self.cfg.grad_accum
            if self.dist.active:  # weighted so that the ranks' average is the global batch's mean
                weight *= distributed.loss_weight(self.dist, loss_targets(b) if real else 0, self.device)
            self.micro += 1
            yield MicroBatch(b, weight, sum(len(r["input_ids"]) for r in rows))

    def autocast(self):
        """The precision plan's autocast (a GPU's bf16 under --bf16); on CPU, bf16 means bf16 weights (use_bf16), which
        is faster than autocast."""
        return torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.bfloat16,
                              enabled=self.autocast_dtype is not None)

    # ------------------------------------------------------------------ after a step
    def run_hooks(self) -> dict[str, Any]:
        record: dict[str, Any] = {}
        for hook in self.hooks:
            record.update(hook.after_step(self.step, self.model) or {})
        return record

    def evaluate(self, rows: list[dict[str, Any]] | None = None) -> dict[str, float]:
        """Held-out metrics (see ``evaluate``) on ``rows``, by default the data's held-out rows up to eval_limit."""
        rows = self.data.eval[: self.cfg.eval_limit] if rows is None else rows
        forward = (lambda b: self.engine(b, outputs=True)) if self.dist.shard else None
        return evaluate(self.model, rows, self.data.task, self.pad_id, batch_size=self.cfg.eval_batch_size,
                        dist=self.dist, forward=forward, autocast=self.autocast)

    def evaluate_and_log(self, what: str) -> dict[str, float]:
        metrics = self.evaluate()
        self.log.write({"event": "eval", "step": self.step, **metrics})
        self.say(f"{what}: " + format_metrics(metrics))
        return metrics

    def stop_everywhere(self) -> bool:
        """A stop asked of any process (each gets the signal at its own moment) stops them all after this step."""
        stop = self.stop_requested()
        if self.dist.active:
            stop = distributed.sum_across(self.dist, [float(stop)], self.device)[0] > 0
        return bool(stop)

    def skip_bad_step(self, loss: float, grad_norm: float) -> None:
        """A step whose loss or gradient norm is not finite: no update, counted; too many in a row stop the run."""
        self.optimizer.zero_grad(set_to_none=True)
        self.skipped_steps += 1
        self.bad_in_a_row += 1
        self.log.write({"event": "skipped_step", "step": self.step, "loss": loss, "grad_norm": grad_norm,
                        "in_a_row": self.bad_in_a_row})
        if self.bad_in_a_row >= self.cfg.max_bad_steps:
            last = ckpt.latest(self.checkpoint_root)
            where = f"the last good checkpoint is {last.path} (step {last.step})" if last else "no checkpoint was written yet"
            raise TrainingError(
                f"{self.bad_in_a_row} steps in a row had a non-finite loss or gradient (last: loss {loss}, gradient norm "
                f"{grad_norm}) after step {self.step}; stopping. {where}. Lower the learning rate, check the data, or "
                "raise --max-bad-steps")

    def say(self, msg: str) -> None:
        if not self.cfg.quiet and self.dist.is_main:
            tqdm.write(msg)

    # ------------------------------------------------------------------ checkpoints
    @property
    def checkpoint_root(self) -> Path:
        return self.out / "checkpoints"

    def state_dict(self) -> dict[str, Any]:
        """Position, optimizer (whole tensors), scheduler, RNG and hooks: the same format on any process count."""
        return {
            "step": self.step,
            "epoch": self.epoch,
            "micro": self.micro,
            "skipped_steps": self.skipped_steps,
            "total_steps": self.total_steps,
            "optimizer": distributed.optimizer_state(self.optimizer),
            "scheduler": self.scheduler.state_dict(),
            "rng": ckpt.rng_state(),
            "config": json.dumps(self.cfg.to_dict()),
            "fingerprint": dict(self.fingerprint),
            "hooks": {type(h).__name__: h.state_dict() for h in self.hooks if hasattr(h, "state_dict")},
        }

    def save_checkpoint(self) -> Path:
        """Rank 0 writes (sharded tensors are gathered first, by every rank); a failed write fails every rank."""
        with distributed.whole_trainable(self.model):
            state = self.state_dict()

            def files(tmp: Path) -> None:
                save_adapter(self.model, tmp, convert_pissa=False, metadata=self.checkpoint_meta)
                torch.save(state, tmp / ckpt.STATE)

            def write() -> Path:
                path = ckpt.write(self.checkpoint_root, self.step, files)
                ckpt.prune(self.checkpoint_root, self.cfg.keep_checkpoints)
                return path

            return distributed.on_main(self.dist, write, ckpt.CheckpointError)

    def resume(self) -> str | None:
        """--resume: continue from the newest complete checkpoint (saying which), or start from step 0 when there is
        none; returns its path."""
        found = self.restore()
        if found is None:
            self.say(f"no checkpoint under {self.checkpoint_root}; starting from step 0")
            return None
        msg = f"resuming from {found.path} (step {found.step})"
        if found.skipped:
            msg += f"; skipped damaged newer checkpoint(s): {'; '.join(found.skipped)}"
        self.say(msg)
        return str(found.path)

    def restore(self) -> ckpt.Found | None:
        """Continue from the newest complete checkpoint, if any."""
        from lorakit.adapters.io import load_adapter

        found = distributed.on_main(self.dist, lambda: ckpt.latest(self.checkpoint_root), ckpt.CheckpointError)
        if found is None:
            return None
        if not found.path.is_dir():
            raise ckpt.CheckpointError(f"process {self.dist.rank} cannot see checkpoint {found.path} that process 0 found; "
                                       "on several machines put --out on a filesystem they all share")
        state = ckpt.load_state(found.path)
        self.check_same_run(found.path, state)
        with distributed.whole_trainable(self.model):
            load_adapter(self.model, found.path)
        distributed.load_optimizer_state(self.optimizer, state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        ckpt.set_rng_state(state["rng"])
        self.step, self.epoch, self.micro = state["step"], state["epoch"], state["micro"]
        if self.dist.active:
            torch.manual_seed(distributed.per_rank_seed(self.cfg.seed, self.dist.rank, self.step))
        self.skipped_steps = state.get("skipped_steps", 0)
        saved_hooks = state.get("hooks", {})
        for hook in self.hooks:
            if type(hook).__name__ in saved_hooks and hasattr(hook, "load_state_dict"):
                hook.load_state_dict(saved_hooks[type(hook).__name__])
        return found

    def check_same_run(self, path: Path, state: dict[str, Any]) -> None:
        """Refuse to continue a checkpoint of a different run (``run_dir.check_same_run``)."""
        check_same_run(path, state, self.cfg, self.fingerprint, self.total_steps)
