"""The step loop of ``lorakit train``, to be read top to bottom (after nanoGPT's train.py).

One optimizer step: ``grad_accum`` micro-batches forward and backward (DDP reduces on the last only), the
gradient clipped (a step with a non-finite loss or norm is skipped), AdamW and the schedule stepped, then the
per-step hooks (norm cap, monitors, CE-LoRA refresh). Every ``log_every`` steps a train record, every
``eval_every`` a held-out evaluation, every ``save_every`` a checkpoint; a stop signal on any process ends the
run after the step, with a checkpoint. The state it moves (model, optimizer, position, log) is ``state.Trainer``.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm

from lorakit.train import distributed
from lorakit.train.state import Clock, LogWindow, MicroBatch

if TYPE_CHECKING:
    from lorakit.train.state import Trainer


def fit(t: Trainer) -> dict[str, Any]:
    """Train to ``t.total_steps`` (or a stop signal); returns before/after metrics, steps and training seconds."""
    cfg = t.cfg
    result: dict[str, Any] = {"resumed_from": t.resume() if cfg.resume else None}
    if t.step == 0:
        result["before"] = t.evaluate_and_log("held-out before training")
    t.model.train()
    bar = tqdm(total=t.total_steps, initial=t.step, disable=cfg.quiet or not t.dist.is_main, desc="train",
               unit="step", dynamic_ncols=True)
    batches = t.micro_batches()
    window, clock = LogWindow(), Clock()
    while t.step < t.total_steps:
        loss, tokens = forward_backward(t, [next(batches) for _ in range(cfg.grad_accum)])
        grad_norm = float(distributed.full(torch.nn.utils.clip_grad_norm_(t.params, cfg.max_grad_norm)))
        loss, tokens = distributed.step_totals(t.dist, loss, tokens, t.device)
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            t.skip_bad_step(loss, grad_norm)
            window = LogWindow()
            continue
        optimizer_step(t)
        window.add(loss, tokens)
        record = t.run_hooks()
        bar.update(1)
        if t.step % cfg.log_every == 0 or t.step == t.total_steps:
            record.update(window.record(), lr=t.scheduler.get_last_lr()[0], grad_norm=grad_norm, epoch=t.epoch)
            bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:,.0f}")
            window = LogWindow()
        if record:
            t.log.write({"event": "train", "step": t.step, **record})
        with clock.aside(window):  # evaluation and checkpoints are not training time
            if t.step % t.eval_every == 0 and t.step < t.total_steps:
                t.evaluate_and_log(f"step {t.step}")
            if cfg.save_every and t.step % cfg.save_every == 0:
                t.save_checkpoint()
        if t.stop_everywhere():
            bar.close()
            t.save_checkpoint()
            return {**result, "stopped_at": t.step}
    bar.close()
    after = t.evaluate_and_log("held-out after training")
    return {**result, "after": after, "steps": t.step, "train_seconds": clock.seconds()}


def forward_backward(t: Trainer, micro: list[MicroBatch]) -> tuple[float, int]:
    """Accumulate the gradients of one optimizer step; returns this process's weighted loss and tokens."""
    loss_sum, tokens = 0.0, 0
    for i, mb in enumerate(micro):
        with distributed.gradient_sync(t.engine, i + 1 == len(micro)):  # DDP reduces on the last only
            with t.autocast():
                loss = t.engine(mb.batch)
            (loss.float() * mb.weight).backward()
        loss_sum += loss.detach().float().item() * mb.weight
        tokens += mb.tokens
    return loss_sum, tokens


def optimizer_step(t: Trainer) -> None:
    t.bad_in_a_row = 0
    t.optimizer.step()
    t.scheduler.step()
    t.optimizer.zero_grad(set_to_none=True)
    t.step += 1
