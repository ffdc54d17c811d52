"""``lorakit train`` as a recipe (after torchtune): the TrainConfig decides everything, in one direction.

    flags -> TrainConfig -> plan_run (memory and precision, before any weight is read: refuse early)
    -> prepare (tokenizer, data, model at the storage precision) -> attach -> apply_speed_paths (one place)
    -> step_hooks -> Trainer -> loop.fit -> adapter files, metrics.jsonl, training.png, run.json

``run(TrainConfig)`` is the whole job; under torchrun (or ``lorakit train --nproc N``) every process runs it and
rank 0 writes. ``launch_processes`` is what ``--nproc N`` checks before it starts the workers.
"""

from __future__ import annotations

import contextlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorakit.adapters import attach, save_adapter
from lorakit.errors import ConfigError, LorakitError
from lorakit.files import OutputError, write_atomic
from lorakit.speed.allocator import block_cache_limit
from lorakit.speed.checkpointing import use_gradient_checkpointing
from lorakit.speed.forward import fast_path
from lorakit.train import checkpoint as ckpt
from lorakit.train import distributed, loop, memory
from lorakit.train.chat import CHAT_TEMPLATE_FILE, read_chat_template
from lorakit.train.config import TrainConfig, task_defaults
from lorakit.train.data import Dataset, DataSpec, infer_task, read_dataset
from lorakit.train.distributed import Dist
from lorakit.train.hooks import StepHook, step_hooks
from lorakit.train.models import gguf_identity
from lorakit.train.packing import pack_rows, packing_is_exact, padding_fraction
from lorakit.train.plan import RunPlan, plan_run
from lorakit.train.precision import PrecisionPlan, apply_precision
from lorakit.train.run_dir import check_output, claim_output, plot_metrics, resume_command, settle_leftover
from lorakit.train.signals import StopOnSignal
from lorakit.train.state import Trainer


def run(cfg: TrainConfig, *, hooks: list[StepHook] | None = None) -> dict[str, Any]:
    """The whole job: load, attach, train, write the adapter and the report into cfg.out.

    Under torchrun (or ``lorakit train --nproc N``) every process runs this; rank 0 writes.
    """
    d = distributed.from_environment(shard=cfg.shard, device=cfg.device)
    try:
        if d.is_main and not cfg.dry_run:  # a bad --out first, before the model is looked at
            settle_leftover(cfg)
            check_output(cfg)
        block_cache_limit()  # a bad LORAKIT_BLOCK_CACHE_MIB before the model is read (attach reads it)
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


# ---------------------------------------------------------------------- building the parts
def prepare(cfg: TrainConfig, dtype: torch.dtype | str | None = None, quant=None):
    """Load model and data as ``cfg`` says (the data decides the task), the base stored in ``dtype`` (default:
    ``cfg.base_dtype``), its frozen linear weights packed as ``quant`` says (a ``precision.QuantSpec``; default:
    cfg's --base-dtype int8/int4 options); returns (LoadedModel, Dataset)."""
    from lorakit.train.precision import quant_spec

    from lorakit.train.models import check_max_length, load_model, load_tokenizer

    cfg.task = cfg.task or infer_task(cfg.data, label_column=cfg.label_column)
    check_causal_lm_options(cfg)
    check_max_length(cfg.model, cfg.max_length or task_defaults(cfg.task)["max_length"])
    tokenizer = load_tokenizer(cfg.model)
    template = read_chat_template(cfg.chat_template) if cfg.chat_template else None
    data = read_dataset(DataSpec.from_config(cfg, chat_template=template), tokenizer)
    if template is not None and not data.conversations:
        data.notes.append(f"--chat-template {cfg.chat_template} is not used: {cfg.data} holds no conversations "
                          "(\"messages\" or ShareGPT \"conversations\" rows)")
    loaded = load_model(cfg.model, cfg.task, label_names=data.label_names, tokenizer=tokenizer,
                        dtype=cfg.base_dtype if dtype is None else dtype, quant=quant or quant_spec(cfg))
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


def apply_speed_paths(model: nn.Module, cfg: TrainConfig, precision: PrecisionPlan) -> str | None:
    """The speed paths of the adapted model, in one place: the precision plan's storage and compute dtypes
    (``apply_precision``), then activation checkpointing under --gradient-checkpointing. (The fused LM head and
    the rest of ``lorakit.speed`` are the adapted model's own forward.) Returns the precision note, if any."""
    note = apply_precision(model, precision)
    if cfg.gradient_checkpointing:
        use_gradient_checkpointing(model)
    return note


def pack_training_rows(cfg: TrainConfig, model: nn.Module, data: Dataset) -> str | None:
    """Pack the causal-LM training rows where the model keeps packed rows apart exactly; what was done, as a note."""
    if data.task != "causal-lm" or cfg.packing is False:
        return None
    max_length = cfg.max_length or task_defaults(data.task)["max_length"]
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


def adapter_metadata(cfg: TrainConfig, data: Dataset) -> dict[str, str]:
    """What the adapter files record besides the weights: the task, the labels, the GGUF file it was trained on."""
    meta = {"lorakit_task": data.task}
    base_file = gguf_identity(cfg.model)
    if base_file is not None:  # the adapter records which file it was trained on
        meta.update(lorakit_base_size=str(base_file["size"]), lorakit_base_sha256=base_file["sha256"])
    if data.label_names:
        meta["lorakit_labels"] = json.dumps(data.label_names)
    return meta


@dataclass
class Job:
    """The parts of one run, built from its config and plan."""

    cfg: TrainConfig
    plan: RunPlan
    dist: Dist
    loaded: Any  # models.LoadedModel
    data: Dataset
    trainer: Trainer
    fingerprint: dict[str, str]
    meta: dict[str, str]
    n_rows: int  # training rows before packing
    packing_note: str | None
    precision_note: str | None


def build(cfg: TrainConfig, d: Dist, hooks: list[StepHook] | None, plan: RunPlan) -> Job:
    """Model, data, adapter, speed paths, hooks and the Trainer, in the order the data flow names."""
    torch.manual_seed(cfg.seed)
    memory.reset_peak()
    loaded, data = prepare(cfg, plan.precision.storage, plan.precision.quant)
    model = loaded.model
    fingerprint = {"model": ckpt.fingerprint_model(model), "data": ckpt.fingerprint_rows(data.train)}
    if not d.shard:  # under --shard, FSDP2 moves only this process's slice of the weights to its device
        model.to(plan.device)
    attach(model, cfg.lora_config())
    precision_note = apply_speed_paths(model, cfg, plan.precision)
    pad_id = loaded.tokenizer.pad_token_id
    hooks = step_hooks(cfg, model, data, pad_id, hooks)
    n_rows = len(data.train)
    packing = pack_training_rows(cfg, model, data)
    meta = adapter_metadata(cfg, data)
    trainer = Trainer(model, data, cfg, pad_id=pad_id, hooks=hooks, checkpoint_meta=meta, dist=d,
                      fingerprint=fingerprint, precision=plan.precision)
    return Job(cfg, plan, d, loaded, data, trainer, fingerprint, meta, n_rows, packing, precision_note)


def announce(job: Job) -> Any:
    """What the run is, said once before training; returns the adapter summary."""
    from lorakit.adapters import summary

    cfg, d, data, trainer = job.cfg, job.dist, job.data, job.trainer
    s = summary(trainer.model)
    trainer.say(f"{job.loaded.name} on {data.source} ({data.task}): {job.n_rows:,} training rows, {len(data.eval):,} held out; "
                f"{s.adapter_params:,} adapter parameters in {len(s.rows)} modules, {s.trainable:,} trainable")
    if d.active:
        how = "FSDP2, base sharded" if d.shard else "DDP over the adapter"
        trainer.say(f"{d.world} processes ({how}, {distributed.backend(d)}): "
                    f"{trainer.rank_batch} rows each of the global batch of {cfg.batch_size}")
    for note in data.notes + ([job.packing_note] if job.packing_note else []):
        trainer.say("note: " + note)
    trainer.say(f"precision: {job.plan.precision.why}" + (f"; {job.precision_note}" if job.precision_note else ""))
    trainer.say(f"memory plan: ~{job.plan.memory.total / 1e9:.1f} GB ({job.plan.available_text()})")
    path = fast_path(trainer.model)
    if path is not None:
        trainer.say(f"training calls: {path.describe()}")
    return s


def _run(cfg: TrainConfig, d: Dist, hooks: list[StepHook] | None, plan: RunPlan) -> dict[str, Any]:
    job = build(cfg, d, hooks, plan)
    s = announce(job)
    with StopOnSignal() as stop:
        job.trainer.stop_requested = stop.requested
        result = loop.fit(job.trainer)
    if "stopped_at" in result:
        result["stopped_by"] = stop.signal_name or "a signal to another process"
    report = run_report(job, s, result)
    save_adapter_files(job)
    if not d.is_main:
        distributed.barrier(d)  # return once rank 0 has written everything
        return report
    write_report(job, report)
    distributed.barrier(d)
    return report


# ---------------------------------------------------------------------- the outputs
def run_report(job: Job, s: Any, result: dict[str, Any]) -> dict[str, Any]:
    """run.json's content (every process builds it; rank 0 writes it)."""
    cfg, d, data, plan, trainer = job.cfg, job.dist, job.data, job.plan, job.trainer
    report = {"config": cfg.to_dict(), "task": data.task, "labels": data.label_names, "result": result,
              "precision": plan.precision.to_dict(), "memory_plan": plan.memory.to_dict(),
              "adapter_params": s.adapter_params, "trainable_params": s.trainable, "total_params": s.total,
              "skipped_rows": data.bad_rows, "skipped_steps": trainer.skipped_steps, "fingerprint": job.fingerprint,
              "processes": d.world, "backend": distributed.backend(d),
              "sharded": d.shard, "is_main": d.is_main, "memory_per_process": distributed.gather(d, memory.usage(trainer.device)),
              "gradient_checkpointing": cfg.gradient_checkpointing}
    report["peak_rss_mib"] = report["memory_per_process"][0].get("peak_rss_mib") if report["memory_per_process"] else None
    return report


def save_adapter_files(job: Job) -> None:
    """The adapter (PEFT format) and the chat template it was trained with, by rank 0; a failed write names the
    checkpoint to resume from."""
    cfg, out, model, tokenizer = job.cfg, Path(job.cfg.out), job.trainer.model, job.loaded.tokenizer
    with distributed.whole_trainable(model):
        if job.dist.is_main:
            try:
                save_adapter(model, out, metadata=job.meta)
                if tokenizer.chat_template and (cfg.chat_template or job.data.conversations):
                    write_atomic(out / CHAT_TEMPLATE_FILE, lambda tmp: Path(tmp).write_text(tokenizer.chat_template))
            except LorakitError as exc:
                last = ckpt.latest(job.trainer.checkpoint_root)
                kept = f"checkpoint {last.path} (step {last.step}) is intact" if last else "no checkpoint was written"
                raise OutputError(f"{exc}. The {kept}: free space and run the same command with --resume") from None


def write_report(job: Job, report: dict[str, Any]) -> None:
    """training.png (and norms.png), run.json, and what the run wrote or how to resume it (rank 0)."""
    cfg, out, trainer, title = job.cfg, Path(job.cfg.out), job.trainer, f"{job.loaded.name} on {job.data.source}"
    result = report["result"]
    records = trainer.log.read()
    plot_metrics(records, out / "training.png", title)
    if cfg.norm_every:
        from lorakit.limits.monitor import plot_norm_trajectories

        plot_norm_trajectories(records, out / "norms.png", f"{title}: attention logits during training")
    write_atomic(out / "run.json", lambda tmp: Path(tmp).write_text(json.dumps(report, indent=2, default=str)))
    if "stopped_at" in result:
        print(f"lorakit: stopped by {result['stopped_by']} after step {result['stopped_at']}: the checkpoint is written and "
              f"the adapter so far is in {out}/. Resume with: {resume_command()}", file=sys.stderr, flush=True)
    trainer.say(f"wrote the adapter, metrics.jsonl, training.png and run.json to {out}/")
