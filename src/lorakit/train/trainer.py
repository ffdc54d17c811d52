"""The training loop: AdamW, linear warm-up and decay, gradient accumulation, clipping,
evaluation, optional bf16 autocast, a progress bar, checkpoints and exact resume.

``run(TrainConfig)`` is what ``lorakit train`` does: load the model and data, attach the
adapter, fit, and write the adapter (PEFT format), ``metrics.jsonl``, a PNG of the curves
and ``run.json`` into ``out``. ``Trainer`` is the loop itself, usable on any attached model.

Per-step hooks (the norm monitor, CE-LoRA's index refresh) are plain objects with one
method, ``after_step(step, model) -> dict | None``; what they return is logged.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import shlex
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from lorakit.adapters import attach, save_adapter
from lorakit.speed.checkpointing import use_gradient_checkpointing
from lorakit.speed.families import causal_lm_parts
from lorakit.speed.forward import fast_path
from lorakit.speed.fused_head import fused_loss_forward
from lorakit.errors import ConfigError, LorakitError, TrainingError
from lorakit.kernels.linear_cross_entropy import IGNORE_INDEX
from lorakit.files import OutputError, write_atomic
from lorakit.train import checkpoint as ckpt
from lorakit.train import distributed, memory
from lorakit.train.chat import CHAT_TEMPLATE_FILE, read_chat_template
from lorakit.train.data import Dataset, collate
from lorakit.train.models import gguf_identity
from lorakit.train.packing import pack_rows, packing_is_exact, padding_fraction
from lorakit.train.config import DEFAULT_LR, DEFAULT_MAX_LENGTH, DEFAULT_STEPS, TrainConfig, resume_differences
from lorakit.train.distributed import Dist
from lorakit.train.plan import RunPlan, plan_run
from lorakit.train.precision import apply_precision
from lorakit.train.run_dir import check_output, claim_output, settle_leftover

class StepHook(Protocol):
    def after_step(self, step: int, model: nn.Module) -> dict[str, Any] | None: ...


def linear_schedule(warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """LR multiplier: linear warm-up from 0 over ``warmup_steps``, then linear decay to 0."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return factor


class MetricsLog:
    """metrics.jsonl, one JSON object per event, appended and flushed (survives a crash).
    ``writes=False`` (ranks other than 0) reads but never writes."""

    def __init__(self, path: Path, *, fresh: bool, writes: bool = True) -> None:
        self.path, self.writes = path, writes
        if not writes:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        if fresh and path.exists():  # a fresh run's own (run_dir moved a previous run's aside)
            path.unlink()
        elif path.exists():
            self._drop_torn_last_line()

    def _drop_torn_last_line(self) -> None:
        """A run killed mid-write leaves a last line without its newline: cut it, so appending stays valid JSONL."""
        raw = self.path.read_bytes()
        if raw and not raw.endswith(b"\n"):
            with open(self.path, "r+b") as fh:
                fh.truncate(raw.rfind(b"\n") + 1)

    def write(self, record: dict[str, Any]) -> None:
        if not self.writes:
            return
        try:
            with open(self.path, "a") as fh:
                fh.write(json.dumps(record, sort_keys=True) + "\n")
        except OSError as exc:
            raise OutputError(f"cannot write {self.path}: {exc.strerror or exc}; the last checkpoint is intact, free "
                              "space and continue with --resume") from None

    def read(self) -> list[dict[str, Any]]:
        """The records; a line that is not JSON (a torn write) is left out."""
        if not self.path.exists():
            return []
        records = []
        for line in self.path.read_text(errors="replace").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict):
                records.append(record)
        return records


def loss_targets(b: dict[str, torch.Tensor]) -> int:
    """What the batch loss is a mean over: rows (classification) or labelled next tokens (causal LM)."""
    labels = b["labels"]
    return labels.numel() if labels.dim() == 1 else int((labels[:, 1:] != IGNORE_INDEX).sum().item())


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
    """The loop. ``model`` must already carry an adapter (lorakit.attach).

    ``dist`` places this process in a torchrun run (lorakit.train.distributed): the model is then
    trained under DDP, or FSDP2 with ``dist.shard``; ``cfg.batch_size`` is the global batch.
    """

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
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.lr = cfg.lr if cfg.lr is not None else DEFAULT_LR[data.task]
        self.optimizer = torch.optim.AdamW(self.params, lr=self.lr, weight_decay=cfg.weight_decay)
        self.micro_per_epoch = math.ceil(len(data.train) / cfg.batch_size)
        steps_per_epoch = max(1, self.micro_per_epoch // cfg.grad_accum)
        if cfg.steps is not None:
            self.total_steps = cfg.steps
        elif cfg.epochs is not None:
            self.total_steps = cfg.epochs * steps_per_epoch
        else:
            self.total_steps = DEFAULT_STEPS
        warmup = int(cfg.warmup * self.total_steps) if cfg.warmup < 1 else int(cfg.warmup)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, linear_schedule(warmup, self.total_steps))
        self.eval_every = cfg.eval_every or max(1, self.total_steps // 4)
        # position: optimizer steps done, and the next micro-batch (epoch, index within epoch)
        self.step = 0
        self.epoch = 0
        self.micro = 0
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

    def autocast(self):
        """bf16 autocast on GPUs; on CPU, bf16 means bf16 weights (use_bf16), which is faster than autocast."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg.bf16 and self.device.type != "cpu")

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, rows: list[dict[str, Any]] | None = None) -> dict[str, float]:
        """Held-out metrics (see ``evaluate``) on ``rows``, by default the data's held-out rows up to eval_limit."""
        rows = self.data.eval[: self.cfg.eval_limit] if rows is None else rows
        forward = (lambda b: self.engine(b, outputs=True)) if self.dist.shard else None
        return evaluate(self.model, rows, self.data.task, self.pad_id, batch_size=self.cfg.eval_batch_size,
                        dist=self.dist, forward=forward, autocast=self.autocast)

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
        """Refuse to continue a checkpoint of a different run: other options, model or data (README: "What lorakit writes, deletes and refuses")."""
        fix = ("Resume with the options of that run, or start afresh with --overwrite (this replaces that run's files) "
               "or another --out")
        try:
            saved = json.loads(state.get("config") or "{}")
        except (TypeError, ValueError):
            saved = {}
        if not isinstance(saved, dict):
            saved = {}
        problems = resume_differences(saved, self.cfg.to_dict())
        recorded = state.get("fingerprint") or {}
        for what, meaning in (("model", "the base model's weights"), ("data", "the tokenised training rows")):
            if what in recorded and what in self.fingerprint and recorded[what] != self.fingerprint[what]:
                problems.append(f"{meaning} differ from the checkpoint's ({what} fingerprint {self.fingerprint[what][:12]} "
                                f"here, {recorded[what][:12]} there)")
        if state["total_steps"] != self.total_steps and not problems:
            problems.append(f"the run has {self.total_steps} steps here and {state['total_steps']} in the checkpoint "
                            "(--steps/--epochs, --batch-size, --grad-accum)")
        if problems:
            raise ConfigError(f"--resume: {path} was written by a different run: {'; '.join(problems)}. {fix}")

    # ------------------------------------------------------------------ the loop
    def fit(self) -> dict[str, Any]:
        """Train to ``total_steps`` (or a stop signal); returns before/after metrics, steps and training seconds."""
        cfg = self.cfg
        result: dict[str, Any] = {"resumed_from": self.resume() if cfg.resume else None}
        if self.step == 0:
            result["before"] = self.evaluate_and_log("held-out before training")
        self.model.train()
        bar = tqdm(total=self.total_steps, initial=self.step, disable=cfg.quiet or not self.dist.is_main, desc="train",
                   unit="step", dynamic_ncols=True)
        batches = self.micro_batches()
        window, clock = LogWindow(), Clock()
        while self.step < self.total_steps:
            loss, tokens = self.forward_backward([next(batches) for _ in range(cfg.grad_accum)])
            grad_norm = float(distributed.full(torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm)))
            loss, tokens = distributed.step_totals(self.dist, loss, tokens, self.device)
            if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                self.skip_bad_step(loss, grad_norm)
                window = LogWindow()
                continue
            self.optimizer_step()
            window.add(loss, tokens)
            record = self.run_hooks()
            bar.update(1)
            if self.step % cfg.log_every == 0 or self.step == self.total_steps:
                record.update(window.record(), lr=self.scheduler.get_last_lr()[0], grad_norm=grad_norm, epoch=self.epoch)
                bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:,.0f}")
                window = LogWindow()
            if record:
                self.log.write({"event": "train", "step": self.step, **record})
            with clock.aside(window):  # evaluation and checkpoints are not training time
                if self.step % self.eval_every == 0 and self.step < self.total_steps:
                    self.evaluate_and_log(f"step {self.step}")
                if cfg.save_every and self.step % cfg.save_every == 0:
                    self.save_checkpoint()
            if self.stop_everywhere():
                bar.close()
                self.save_checkpoint()
                return {**result, "stopped_at": self.step}
        bar.close()
        after = self.evaluate_and_log("held-out after training")
        return {**result, "after": after, "steps": self.step, "train_seconds": clock.seconds()}

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

    def forward_backward(self, micro: list[MicroBatch]) -> tuple[float, int]:
        """Accumulate the gradients of one optimizer step; returns this process's weighted loss and tokens."""
        loss_sum, tokens = 0.0, 0
        for i, mb in enumerate(micro):
            with distributed.gradient_sync(self.engine, i + 1 == len(micro)):  # DDP reduces on the last only
                with self.autocast():
                    loss = self.engine(mb.batch)
                (loss.float() * mb.weight).backward()
            loss_sum += loss.detach().float().item() * mb.weight
            tokens += mb.tokens
        return loss_sum, tokens

    def optimizer_step(self) -> None:
        self.bad_in_a_row = 0
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1

    def run_hooks(self) -> dict[str, Any]:
        record: dict[str, Any] = {}
        for hook in self.hooks:
            record.update(hook.after_step(self.step, self.model) or {})
        return record

    def evaluate_and_log(self, what: str) -> dict[str, float]:
        metrics = self.evaluate()
        self.log.write({"event": "eval", "step": self.step, **metrics})
        self.say(f"{what}: " + _fmt(metrics))
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


def _fmt(metrics: dict[str, float]) -> str:
    parts = []
    for k, v in metrics.items():
        name = k.removeprefix("eval_")
        parts.append(f"{name} {v:.4f}" if name != "perplexity" else f"{name} {v:.2f}")
    return ", ".join(parts)


# ---------------------------------------------------------------------- interruption
class StopOnSignal:
    """While active, SIGINT and SIGTERM ask the loop to stop after the current step (it then writes a checkpoint);
    a second signal stops at once. Only the main thread can install handlers; elsewhere this does nothing."""

    def __init__(self, signals=(signal.SIGINT, signal.SIGTERM)) -> None:
        self.signals = signals
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}

    def requested(self) -> bool:
        return self.signal_name is not None

    def _handle(self, signum, frame) -> None:
        if self.signal_name is not None:  # the second one: do not wait for the step
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def resume_command(argv: list[str] | None = None) -> str:
    """The command line of this run with --resume added (what to type to continue it).

    Under ``lorakit train --nproc N`` it is that command (the launcher passes it down); under a
    torchrun the user started, the same torchrun line with --resume, on any number of processes.
    """
    launched = os.environ.get(distributed.RESUME_ARGV_ENV)
    if argv is None and launched:
        argv = launched.split("\x1f")
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--resume" not in argv:
        argv.append("--resume")
    if not launched and distributed.launched_by_torchrun():
        return "your torchrun command with: " + shlex.join(argv) + " (on any number of processes)"
    return "lorakit " + shlex.join(argv)


# ---------------------------------------------------------------------- the main job
def prepare(cfg: TrainConfig, dtype: torch.dtype | str | None = None):
    """Load model and data as ``cfg`` says (the data decides the task), the base stored in ``dtype`` (default:
    ``cfg.base_dtype``); returns (LoadedModel, Dataset)."""
    from lorakit.train.data import infer_task, load_data
    from lorakit.train.models import check_max_length, load_model, load_tokenizer

    cfg.task = cfg.task or infer_task(cfg.data, label_column=cfg.label_column)
    check_causal_lm_options(cfg)
    check_max_length(cfg.model, cfg.max_length or DEFAULT_MAX_LENGTH[cfg.task])
    tokenizer = load_tokenizer(cfg.model)
    template = read_chat_template(cfg.chat_template) if cfg.chat_template else None
    data = load_data(cfg.data, cfg.task, tokenizer, cfg.max_length or DEFAULT_MAX_LENGTH[cfg.task],
                     text_column=cfg.text_column, label_column=cfg.label_column, eval_spec=cfg.eval_data,
                     skip_bad_rows=cfg.skip_bad_rows, loss_on=cfg.loss_on, chat_template=template)
    if template is not None and not data.conversations:
        data.notes.append(f"--chat-template {cfg.chat_template} is not used: {cfg.data} holds no conversations "
                          "(\"messages\" or ShareGPT \"conversations\" rows)")
    loaded = load_model(cfg.model, cfg.task, label_names=data.label_names, tokenizer=tokenizer,
                        dtype=cfg.base_dtype if dtype is None else dtype)
    return loaded, data


def check_causal_lm_options(cfg: TrainConfig) -> None:
    """--packing and --loss-on shape a causal LM's rows; given for another task they would do nothing: refuse."""
    if cfg.task == "causal-lm":
        return
    given = [flag for flag, on in (("--packing", cfg.packing is True),
                                   (f"--loss-on {cfg.loss_on}", cfg.loss_on != TrainConfig.__dataclass_fields__["loss_on"].default))
             if on]
    if given:
        raise ConfigError(f"{' and '.join(given)} shape causal-LM training rows, but {cfg.data} is trained as {cfg.task}; "
                          f"drop {' and '.join(f.split()[0] for f in given)}")


def plot_metrics(records: list[dict[str, Any]], path: Path, title: str) -> None:
    """Training loss and held-out metrics against optimizer steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in records if r.get("event") == "train" and "loss" in r]
    evals = [r for r in records if r.get("event") == "eval"]
    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    ax[0].plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss")
    ax[0].plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="held-out loss")
    ax[0].set_xlabel("optimizer step")
    ax[0].set_ylabel("loss")
    ax[0].legend()
    key = "eval_accuracy" if any("eval_accuracy" in r for r in evals) else "eval_perplexity"
    ax[1].plot([r["step"] for r in evals], [r[key] for r in evals], "o-", color="tab:green")
    ax[1].set_xlabel("optimizer step")
    ax[1].set_ylabel(key.removeprefix("eval_").replace("_", " "))
    ax[1].set_title("held-out " + key.removeprefix("eval_"))
    fig.suptitle(title)
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)


def _limits_hooks(cfg: TrainConfig, model: nn.Module, data, pad_id: int) -> list[StepHook]:
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


def _pack(cfg: TrainConfig, model: nn.Module, data: Dataset) -> str | None:
    """Pack the causal-LM training rows where the model keeps packed rows apart exactly; what was done, as a note."""
    if data.task != "causal-lm" or cfg.packing is False:
        return None
    max_length = cfg.max_length or DEFAULT_MAX_LENGTH[data.task]
    if not packing_is_exact(model, data.train):  # checked without a KV cache, as the training calls then run
        why = (f"{type(model).__name__} with this attention gives other logits for rows packed together than for "
               "each alone (it does not restart attention at packed row boundaries)")
        if cfg.packing:
            raise ConfigError(f"--packing: {why}; drop --packing (batches are then padded)")
        return f"packing off: {why}; batches are padded"
    model.config.use_cache = False  # transformers honours the packed rows' boundaries only without a cache
    padded = padding_fraction(data.train, cfg.batch_size)
    n_rows = len(data.train)
    data.train = pack_rows(data.train, max_length)
    filled = sum(len(r["input_ids"]) for r in data.train) / (len(data.train) * max_length)
    return (f"packing: {n_rows:,} rows in {len(data.train):,} sequences of up to {max_length} tokens ({filled:.0%} full; "
            f"{padded:.0%} of padded batches' tokens would be padding); --batch-size counts sequences (--no-packing: padded batches of rows)")


def run(cfg: TrainConfig, *, hooks: list[StepHook] | None = None) -> dict[str, Any]:
    """The whole job: load, attach, train, write the adapter and the report into cfg.out.

    Under torchrun (or ``lorakit train --nproc N``) every process runs this; rank 0 writes.
    """
    d = distributed.from_environment(shard=cfg.shard, device=cfg.device)
    try:
        if d.is_main and not cfg.dry_run:  # a bad --out first, before the model is looked at
            settle_leftover(cfg)
            check_output(cfg)
        plan = plan_run(cfg, d)  # refuses a run that will not fit, before anything is read or moved
        if cfg.dry_run:
            if d.is_main:
                print(plan.describe(), flush=True)
            return {"dry_run": True, "plan": plan.to_dict(), "is_main": d.is_main, "result": {}}
        with claim_output(cfg) if d.is_main else contextlib.nullcontext():
            return _run(cfg, d, hooks, plan)
    finally:
        distributed.shutdown(d)


def launch_processes(cfg: TrainConfig, nproc: int, argv: list[str]) -> int | None:
    """``lorakit train --nproc N``: everything that can fail is checked here, once, before a process starts; then
    N torchrun workers run ``lorakit train argv`` (torchrun's exit status is returned). None: this process trains
    (N = 1, or it is a torchrun worker already)."""
    if distributed.launched_by_torchrun():
        return None
    if nproc < 1:
        raise ConfigError(f"--nproc {nproc} must be >= 1")
    distributed.check_gpus(nproc, cfg.device)
    settle_leftover(cfg)
    check_output(cfg)
    distributed.rank_batch_size(cfg.batch_size, Dist(world=nproc))
    return distributed.launch(nproc, argv) if nproc > 1 else None


def held_out_change(report: dict[str, Any]) -> str | None:
    """"held-out accuracy: 0.4945 -> 0.8080" (or loss) from run()'s report; None on processes other than rank 0."""
    result = report["result"]
    if "after" not in result or not report.get("is_main", True):
        return None
    before, after = result.get("before", {}), result["after"]
    key = "eval_accuracy" if "eval_accuracy" in after else "eval_loss"
    name = key.removeprefix("eval_")
    return f"held-out {name}: {before[key]:.4f} -> {after[key]:.4f}" if key in before else f"held-out {name}: {after[key]:.4f}"


def _run(cfg: TrainConfig, d: Dist, hooks: list[StepHook] | None, plan: RunPlan) -> dict[str, Any]:
    torch.manual_seed(cfg.seed)
    memory.reset_peak()
    loaded, data = prepare(cfg, plan.precision.storage)
    model = loaded.model
    fingerprint = {"model": ckpt.fingerprint_model(model), "data": ckpt.fingerprint_rows(data.train)}
    device = plan.device
    if not d.shard:  # under --shard, FSDP2 moves only this process's slice of the weights to its device
        model.to(device)
    lora_cfg = cfg.lora_config()
    attach(model, lora_cfg)
    precision_note = apply_precision(model, plan.precision)
    if cfg.gradient_checkpointing:
        use_gradient_checkpointing(model)
    from lorakit import celora

    hooks = list(hooks or [])
    if celora.controller(model) is not None:
        hooks.append(celora.Refresher(model))
    hooks += _limits_hooks(cfg, model, data, loaded.tokenizer.pad_token_id)
    n_rows = len(data.train)
    packing = _pack(cfg, model, data)
    meta = {"lorakit_task": data.task}
    base_file = gguf_identity(cfg.model)
    if base_file is not None:  # the adapter records which file it was trained on
        meta.update(lorakit_base_size=str(base_file["size"]), lorakit_base_sha256=base_file["sha256"])
    if data.label_names:
        meta["lorakit_labels"] = json.dumps(data.label_names)
    trainer = Trainer(model, data, cfg, pad_id=loaded.tokenizer.pad_token_id, hooks=hooks, checkpoint_meta=meta, dist=d,
                      fingerprint=fingerprint)
    from lorakit.adapters import summary

    s = summary(model)
    trainer.say(f"{loaded.name} on {data.source} ({data.task}): {n_rows:,} training rows, {len(data.eval):,} held out; "
                f"{s.adapter_params:,} adapter parameters in {len(s.rows)} modules, {s.trainable:,} trainable")
    if d.active:
        how = "FSDP2, base sharded" if d.shard else "DDP over the adapter"
        trainer.say(f"{d.world} processes ({how}, {distributed.backend(d)}): "
                    f"{trainer.rank_batch} rows each of the global batch of {cfg.batch_size}")
    for note in data.notes + ([packing] if packing else []):
        trainer.say("note: " + note)
    trainer.say(f"precision: {plan.precision.why}" + (f"; {precision_note}" if precision_note else ""))
    trainer.say(f"memory plan: ~{plan.memory.total / 1e9:.1f} GB ({plan.available_text()})")
    path = fast_path(model)
    if path is not None:
        trainer.say(f"training calls: {path.describe()}")
    with StopOnSignal() as stop:
        trainer.stop_requested = stop.requested
        result = trainer.fit()
    out = Path(cfg.out)
    if "stopped_at" in result:
        result["stopped_by"] = stop.signal_name or "a signal to another process"
    report = {"config": cfg.to_dict(), "task": data.task, "labels": data.label_names, "result": result,
              "precision": plan.precision.to_dict(), "memory_plan": plan.memory.to_dict(),
              "adapter_params": s.adapter_params, "trainable_params": s.trainable, "total_params": s.total,
              "skipped_rows": data.bad_rows, "skipped_steps": trainer.skipped_steps, "fingerprint": fingerprint,
              "processes": d.world, "backend": distributed.backend(d),
              "sharded": d.shard, "is_main": d.is_main, "memory_per_process": distributed.gather(d, memory.usage(trainer.device)),
              "gradient_checkpointing": cfg.gradient_checkpointing}
    report["peak_rss_mib"] = report["memory_per_process"][0].get("peak_rss_mib") if report["memory_per_process"] else None
    with distributed.whole_trainable(model):
        if d.is_main:
            try:
                save_adapter(model, out, metadata=meta)
                if loaded.tokenizer.chat_template and (cfg.chat_template or data.conversations):
                    write_atomic(out / CHAT_TEMPLATE_FILE, lambda tmp: Path(tmp).write_text(loaded.tokenizer.chat_template))
            except LorakitError as exc:
                last = ckpt.latest(trainer.checkpoint_root)
                kept = f"checkpoint {last.path} (step {last.step}) is intact" if last else "no checkpoint was written"
                raise OutputError(f"{exc}. The {kept}: free space and run the same command with --resume") from None
    if not d.is_main:
        distributed.barrier(d)  # return once rank 0 has written everything
        return report
    records = trainer.log.read()
    plot_metrics(records, out / "training.png", f"{loaded.name} on {data.source}")
    if cfg.norm_every:
        from lorakit.limits.monitor import plot_norm_trajectories

        plot_norm_trajectories(records, out / "norms.png", f"{loaded.name} on {data.source}: attention logits during training")
    write_atomic(out / "run.json", lambda tmp: Path(tmp).write_text(json.dumps(report, indent=2, default=str)))
    if "stopped_at" in result:
        print(f"lorakit: stopped by {result['stopped_by']} after step {result['stopped_at']}: the checkpoint is written and "
              f"the adapter so far is in {out}/. Resume with: {resume_command()}", file=sys.stderr, flush=True)
    trainer.say(f"wrote the adapter, metrics.jsonl, training.png and run.json to {out}/")
    distributed.barrier(d)
    return report
