"""TrainConfig: everything ``lorakit train`` accepts, declared once.

TrainConfig holds the adapter's LoraConfig (``lora``, with its CE-LoRA and norm-control groups);
every field carries its help text, and ``lorakit train``'s flags are generated from the fields
(``lorakit.options``). It is validated on construction; ``to_dict`` is what run.json and every
checkpoint record, ``from_dict`` reads it back.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from lorakit.adapters import LoraConfig
from lorakit.errors import ConfigError
from lorakit.limits.attention import MODES as ATTENTION_MODES
from lorakit.options import (build, fill_defaults, flatten, group, is_finite, is_seed, option, positive_float,
                             positive_int, seed_int, spelling)
from lorakit.train.chat import LOSS_ON, read_chat_template
from lorakit.train.models import TASKS, builtin_default_task
from lorakit.train.precision import BASE_DTYPE_CHOICES, GROUP_SIZES, QUANT_FORMATS, QUANTIZED, quant_spec

DEFAULT_STEPS = 200
DEFAULT_LR = {"classify": 2e-3, "causal-lm": 2e-4}
DEFAULT_MAX_LENGTH = {"classify": 128, "causal-lm": 256}
DEFAULT_DATA = {"classify": "builtin:rotten-tomatoes", "causal-lm": "builtin:hamlet"}

_MODEL = "model"
_DATA = "data"
_TRAINING = "training"
_PRECISION = "precision and memory"
_OUTPUT = "output"
_LIMITS = "computational limits (attention norms)"
_PROCESSES = "several processes (torch.distributed)"


def task_defaults(task: str) -> dict[str, Any]:
    """What None means for a task's options, in one place: {"lr", "max_length", "data"} of "classify" or
    "causal-lm" (a learning rate for an adapter, tokens per row, the built-in data)."""
    if task not in DEFAULT_LR:
        raise ConfigError(f"task={task!r} must be one of {', '.join(DEFAULT_LR)}")
    return {"lr": DEFAULT_LR[task], "max_length": DEFAULT_MAX_LENGTH[task], "data": DEFAULT_DATA[task]}


def default_data(model: str, task: str | None) -> str:
    """The built-in data of the task (given, or the built-in model's): Hamlet for a causal LM, else sentiment."""
    return task_defaults(task or builtin_default_task(model) or "classify")["data"]


# ---------------------------------------------------------------------- the shared option groups
# Each option of every lorakit command is declared once, here or in a command's own configuration; a command's
# configuration inherits the groups it takes (``class TrainConfig(..., DataOptions, ModelOptions)``: the last
# group's fields come first), leaves out with OMIT the options of a group it does not take, says in DEFAULTS what a
# None default means for it (``lorakit.options.fill_defaults``) and in NOTES what the option is for it.
@dataclass
class ModelOptions:
    """The base model: which, its storage precision, where it runs."""

    model: str | None = option(None, "builtin:minilm | builtin:smollm2 | a local model directory | a .gguf file",
                               default_text="the base model recorded in the adapter", section=_MODEL)
    base_dtype: str | None = option(
        None, "the frozen base's storage: its weights are read straight into it; adapters and AdamW state stay fp32 "
        "(products in fp32 where this CPU's bf16 ones are slower, each weight widened for its product only)",
        choices=BASE_DTYPE_CHOICES, default_text="auto: fp32 when the run fits in memory with it, else bf16; int8 / int4: "
        "the frozen linear weights packed (QLoRA), the rest in bf16",
        section=_MODEL)
    device: str | None = option(None, "cpu, cuda, cuda:1 ...", default_text="cuda when present", section=_MODEL)


@dataclass
class AdapterSource:
    """The adapter a command reads (eval, merge, generate, norms)."""

    adapter: str | None = option(None, "an adapter directory: a training run's output or a PEFT LoRA adapter",
                                 default_text="none: the --model alone", metavar="DIR", section=_MODEL)


@dataclass
class DataOptions:
    """The rows: which file or built-in set, its columns, their length in tokens."""

    data: str | None = option(
        None, "builtin:rotten-tomatoes | builtin:hamlet | FILE.csv | FILE.jsonl | FILE.parquet | FILE.txt",
        default_text="rotten-tomatoes for an encoder, hamlet for builtin:smollm2 or --task causal-lm; for an adapter, "
        "the held-out rows of its training run (run.json), else the built-in set of its task", section=_DATA)
    text_column: str | None = option(None, "the column holding the text (csv, jsonl, parquet)",
                                     default_text="the training run's, else text", section=_DATA)
    label_column: str | None = option(None, "the column holding the label (classification)",
                                      default_text="the training run's, else label", section=_DATA)
    max_length: int | None = option(None, "tokens per row", parse=positive_int,
                                    default_text="128 classify, 256 causal-lm (for an adapter: its training run's)",
                                    section=_DATA)


@dataclass
class TaskOptions:
    task: str | None = option(None, "what to train", choices=TASKS, default_text="inferred from the data",
                              section=_DATA)


@dataclass
class ChatTemplateOptions:
    chat_template: str | None = option(
        None, "a Jinja chat template for conversational data, replacing the tokenizer's (needed when it has none, e.g. "
        "examples/chat_templates/gemma3.jinja for the Gemma 3 GGUF)", metavar="FILE",
        default_text="an adapter's chat_template.jinja, else the tokenizer's", section=_DATA)


@dataclass
class AttentionOptions:
    attention: str | None = option(
        None, "lorakit attention: auto = polynomial where the certified logit bound allows it", choices=ATTENTION_MODES,
        default_text="the model's own", section=_LIMITS)
    attention_tolerance: float = option(1e-3, "allowed attention-output error relative to max|v| for poly/auto",
                                        aliases=("--tolerance",), parse=positive_float, section=_LIMITS)


@dataclass
class StepOptions:
    """How long and how fast a run trains."""

    steps: int | None = option(None, "optimizer steps", default_text=f"{DEFAULT_STEPS} when --epochs is not given",
                               parse=positive_int, section=_TRAINING)
    batch_size: int | None = option(None, "rows per optimizer step (over all processes); with packing, sequences",
                                    parse=positive_int, section=_TRAINING)
    lr: float | None = option(None, "peak learning rate (AdamW)", default_text="2e-3 for classify, 2e-4 for causal-lm",
                              parse=positive_float, section=_TRAINING)
    warmup: float | None = option(None, "linear warm-up: a fraction of the steps (< 1) or a step count",
                                  section=_TRAINING)
    seed: int | None = option(None, "random seed (data order, initialisation, dropout, sampling)", parse=seed_int,
                              section=_TRAINING)


@dataclass
class EpochOptions:
    epochs: int | None = option(None, "passes over the training rows (instead of --steps)", parse=positive_int,
                                section=_TRAINING)
    eval_limit: int | None = option(None, "evaluate on the first N held-out rows only", parse=positive_int,
                                    section=_TRAINING)


@dataclass
class PrecisionOptions:
    bf16: bool = option(False, "bf16 training: frozen weights stored in bf16, adapters and optimizer in fp32 (CPU, where "
                        "this CPU's bf16 products are faster); bf16 autocast on GPU", section=_PRECISION)
    gradient_checkpointing: bool = option(
        False, "activation checkpointing: keep each layer's input only and recompute the layer in the backward "
        "(~1/3 more compute, activations of one layer instead of all)", section=_PRECISION)
    quant_format: str | None = option(
        None, "--base-dtype int4's format: nf4 (QLoRA's code book, absmax per block) or int4 (asymmetric, per group)",
        choices=QUANT_FORMATS, default_text="nf4 (QLoRA's); a GGUF model whose linear weights are Q4_0/Q4_1/Q4_K "
        "blocks: int4 groups of 32, its own blocks re-packed (nothing rounded again)", section=_PRECISION)
    group_size: int | None = option(None, "weights per nf4 block / int4 group (int8 has none: a scale per output "
                                    "channel)", parse=positive_int, choices=GROUP_SIZES,
                                    default_text="64 (QLoRA's block size); a GGUF model with no --quant-format: its own "
                                    "blocks (32)", section=_PRECISION)
    double_quant: bool = option(False, "nf4: quantise the block constants again (QLoRA's double quantisation)",
                                section=_PRECISION)
    quantize_head: bool = option(False, "with --base-dtype int8/int4, pack the LM head too", section=_PRECISION)
    max_memory: str | None = option(None, "the memory this run may use, e.g. 20GB (the plan refuses a run above it)",
                                    default_text="the memory available now (MemAvailable, the cgroup limit)",
                                    section=_PRECISION)


@dataclass
class OutputOptions:
    out: str | None = option(None, "where the command writes", section=_OUTPUT)
    overwrite: bool = option(False, "replace what an earlier run wrote in --out (train: its adapter, metrics.jsonl, "
                             "plots, run.json and checkpoints; other files there stay). Without it a non-empty --out "
                             "is refused", section=_OUTPUT)


@dataclass
class DistributedOptions:
    shard: bool = option(False, "FSDP2: split the frozen base across the processes (for a model too big for one process)",
                         section=_PROCESSES)


@dataclass
class TrainConfig(DistributedOptions, OutputOptions, PrecisionOptions, EpochOptions, StepOptions, AttentionOptions,
                  ChatTemplateOptions, TaskOptions, DataOptions, ModelOptions):  # the last group's fields come first
    """Everything ``lorakit train`` accepts. None means "the default for the task"."""

    DEFAULTS: ClassVar[dict[str, Any]] = {"model": "builtin:minilm", "base_dtype": "auto", "text_column": "text",
                                          "label_column": "label", "batch_size": 32, "warmup": 0.06, "seed": 0,
                                          "out": "out"}
    DEFAULT_TEXTS: ClassVar[dict[str, str]] = {
        "data": "rotten-tomatoes for an encoder, hamlet for builtin:smollm2 or --task causal-lm",
        "max_length": "128 classify, 256 causal-lm", "chat_template": "the tokenizer's"}
    NOTES: ClassVar[dict[str, str]] = {"out": "the run's directory: adapter, metrics.jsonl, plots, run.json, checkpoints"}

    eval_data: str | None = option(None, "a held-out file", default_text="a fixed 10% of --data", section=_DATA)
    skip_bad_rows: bool = option(False, "skip malformed data rows (counted in the report) instead of stopping",
                                 section=_DATA)
    loss_on: str = option(
        "assistant", "conversations (\"messages\" rows): the loss on assistant turns or on every token; prompt/response "
        "rows: on the response or on every token", choices=LOSS_ON, section=_DATA)
    packing: bool | None = option(
        None, "causal LM: pack several rows into each sequence of --max-length tokens, no attention across rows",
        default_text="on where a check shows the model keeps packed rows apart exactly", section=_DATA)
    lora: LoraConfig = group(LoraConfig, "LoRA adapter")
    norm_every: int | None = option(None, "measure the attention norms every N steps (metrics.jsonl, norms.png)",
                                    section=_LIMITS)
    eval_batch_size: int = option(64, "rows per evaluation batch", section=_TRAINING)
    grad_accum: int = option(1, "micro-batches per optimizer step", section=_TRAINING)
    weight_decay: float = option(0.0, "AdamW weight decay", section=_TRAINING)
    max_grad_norm: float = option(1.0, "clip the gradient norm to this", section=_TRAINING)
    dry_run: bool = option(False, "print the memory plan and the precision, then exit before any weight is read",
                           section=_PRECISION)
    eval_every: int | None = option(None, "evaluate every N steps", default_text="four times per run", section=_TRAINING)
    save_every: int | None = option(100, "checkpoint every N steps", section=_OUTPUT)
    keep_checkpoints: int = option(2, "complete checkpoints kept in OUT/checkpoints (older ones are removed)",
                                   section=_OUTPUT)
    max_bad_steps: int = option(5, "stop after this many steps in a row with a non-finite loss or gradient (each is "
                                "skipped)", section=_TRAINING)
    log_every: int = option(10, "log the training loss every N steps (metrics.jsonl)", section=_OUTPUT)
    resume: bool = option(False, "continue from the newest complete checkpoint in OUT/checkpoints (refused if it was "
                          "written with other options, another model or other data)", section=_OUTPUT)
    quiet: bool = option(False, "no progress bar or messages", section=_OUTPUT)

    def __post_init__(self) -> None:
        if isinstance(self.lora, dict):  # from run.json or a checkpoint
            self.lora = build(LoraConfig, self.lora)
        fill_defaults(self)
        if self.data is None and isinstance(self.model, str):
            self.data = default_data(self.model, self.task)
        self.validate()

    def validate(self) -> None:
        if not isinstance(self.lora, LoraConfig):
            raise ConfigError(f"lora={self.lora!r} must be a lorakit.LoraConfig")
        positive = {"batch_size": self.batch_size, "eval_batch_size": self.eval_batch_size, "grad_accum": self.grad_accum,
                    "log_every": self.log_every, "keep_checkpoints": self.keep_checkpoints,
                    "max_bad_steps": self.max_bad_steps}
        for name, value in positive.items():
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{name}={value!r} must be a positive integer")
        for name in ("epochs", "steps", "eval_every", "save_every", "max_length", "eval_limit", "norm_every"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                raise ConfigError(f"{name}={value!r} must be a positive integer")
        if self.task is not None and self.task not in TASKS:
            raise ConfigError(f"task={self.task!r} must be one of {', '.join(TASKS)} (or None: inferred from the data)")
        if self.epochs is not None and self.steps is not None:
            raise ConfigError("give either --epochs or --steps, not both")
        if self.lr is not None and not (is_finite(self.lr) and self.lr > 0):
            raise ConfigError(f"lr={self.lr!r} must be a positive number")
        if not (is_finite(self.warmup) and self.warmup >= 0):
            raise ConfigError(f"warmup={self.warmup!r} must be a finite number >= 0 (a fraction below 1, or a step count)")
        if self.warmup >= 1 and self.warmup != int(self.warmup):
            raise ConfigError(f"warmup={self.warmup!r} is a step count (>= 1) that is not whole; give a fraction of the "
                              f"steps below 1 (e.g. 0.06) or a whole number of steps (e.g. {int(self.warmup)})")
        if not (is_finite(self.max_grad_norm) and self.max_grad_norm > 0):
            raise ConfigError(f"max_grad_norm={self.max_grad_norm!r} must be a finite number > 0 (e.g. 1.0)")
        tol = self.attention_tolerance
        if not (is_finite(tol) and tol > 0):
            raise ConfigError(f"attention_tolerance={tol!r} must be a positive number (e.g. 1e-3): the attention-output "
                              "error allowed relative to max|v|")
        if not (is_finite(self.weight_decay) and self.weight_decay >= 0):
            raise ConfigError(f"weight_decay={self.weight_decay!r} must be a finite number >= 0 (e.g. 0.01)")
        if not is_seed(self.seed):
            raise ConfigError(f"seed={self.seed!r} must be an integer from 0 to 2**63 - 1")
        if self.resume and self.overwrite:
            raise ConfigError("--resume continues the run in --out and --overwrite replaces it; give one of them")
        check_device(self.device)
        if self.base_dtype not in BASE_DTYPE_CHOICES:
            raise ConfigError(f"base_dtype={self.base_dtype!r} must be one of {', '.join(BASE_DTYPE_CHOICES)}")
        quant_spec(self)  # the packed formats' options
        if self.max_memory is not None:
            from lorakit.train.memory_plan import parse_memory

            parse_memory(self.max_memory)
        if self.loss_on not in LOSS_ON:
            raise ConfigError(f"loss_on={self.loss_on!r} must be one of {', '.join(LOSS_ON)}")
        if self.chat_template is not None:
            read_chat_template(self.chat_template)  # a missing or non-Jinja file fails before any model is loaded
        if self.attention is not None:
            from lorakit.limits.attention import AttentionPolicy

            AttentionPolicy(mode=self.attention, tolerance=self.attention_tolerance)  # fails on a bad mode or tolerance
        if self.shard:
            self._check_shard()

    def _check_shard(self) -> None:
        needs_whole = {"--norm-cap": self.lora.norm_control.cap is not None, "--attention": self.attention is not None,
                       "--norm-every": self.norm_every is not None}
        bad = [name for name, used in needs_whole.items() if used]
        if flag := self.lora.variant.needs_whole_weights:  # e.g. CE-LoRA's approximation of G W0
            bad.append(flag)
        on_cpu = resolve_device(self.device).type == "cpu"
        if self.base_dtype in QUANTIZED:
            raise ConfigError(f"--base-dtype {self.base_dtype} cannot be used with --shard: FSDP2 does not shard packed "
                              "weights; use --base-dtype bf16 with --shard, or drop --shard")
        if (self.bf16 or self.base_dtype in ("bf16", "fp16")) and on_cpu:
            raise ConfigError("--bf16 on CPU keeps frozen weights in bf16 and adapters in fp32, and FSDP2 (--shard) "
                              "needs one dtype per sharded block; on CPU use --shard without --bf16, or --bf16 without "
                              "--shard")
        if bad:
            raise ConfigError(f"{', '.join(bad)} cannot be used with --shard: it needs the whole frozen weights between "
                              "steps and --shard keeps a slice in each process; drop --shard (DDP keeps a whole copy "
                              "per process) or the option")

    def lora_config(self) -> LoraConfig:
        """The adapter's configuration, its base model recorded (a local model by its absolute path, so the adapter
        works from any directory) unless ``lora.base_model`` names one."""
        if self.lora.base_model is not None:
            return self.lora
        base = self.model if self.model.startswith("builtin:") else str(Path(self.model).expanduser().resolve())
        return self.lora.replace(base_model=base)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> TrainConfig:
        """The configuration ``to_dict`` (run.json's "config") recorded; an unknown field is refused."""
        unknown = sorted(set(flatten(cls, doc)) - set(flatten(cls, cls().to_dict())))
        if unknown:
            raise ConfigError(f"unknown TrainConfig fields {unknown}; this configuration was written by another lorakit")
        return build(cls, doc)


@dataclass
class TrainCommand:
    """``lorakit train``'s options: a TrainConfig (what run.json records) and how many processes run it."""

    train: TrainConfig = group(TrainConfig)
    nproc: int | None = option(
        None, "train on N processes of this machine (torchrun; gloo on CPU, nccl on CUDA); --batch-size is the global "
        "batch. On several machines run torchrun ... -m lorakit train instead", parse=positive_int, section=_PROCESSES)


def check_device(device: str | None) -> None:
    """A device string torch understands and this machine has (None: cuda when present, else cpu)."""
    if device is None:
        return
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise ConfigError(f"device={device!r} is not a device; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device={device!r}: CUDA is not available on this machine; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"device={device!r}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                              f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    elif dev.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise ConfigError(f"device={device!r}: MPS is not available on this machine; use --device cpu")
    elif dev.type != "cpu":
        raise ConfigError(f"device={device!r}: lorakit trains on cpu, cuda or mps")


def resolve_device(device: str | None) -> torch.device:
    """The device a command runs on: ``device`` (checked: ``check_device``), else cuda when present, else cpu."""
    check_device(device)
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


# Options that change neither the model, the data nor the training trajectory: a resume may change them.
RESUME_MAY_CHANGE = ("out", "resume", "overwrite", "quiet", "device", "shard", "gradient_checkpointing", "max_memory",
                     "dry_run", "eval_every", "eval_limit",
                     "eval_batch_size", "save_every", "keep_checkpoints", "log_every", "max_bad_steps")
# Paths compared by what they name, not how they are spelled.
_PATH_FIELDS = ("model", "data", "eval_data")
# Checkpoints written before TrainConfig held a LoraConfig recorded these flat names.
_FLAT_NAMES = {"rank": "lora.r", "alpha": "lora.alpha", "targets": "lora.targets", "dropout": "lora.dropout",
               "rslora": "lora.rslora", "dora": "lora.use_dora", "init": "lora.init", "rank_pattern": "lora.rank_pattern",
               "layers": "lora.layers_to_transform", "layers_pattern": "lora.layers_pattern",
               "backward": "lora.backward", "keep_ratio": "lora.celora.keep_ratio",
               "refresh_every": "lora.celora.refresh_every", "svd_rank": "lora.celora.svd_rank",
               "selection": "lora.celora.selection", "norm_cap": "lora.norm_control.cap"}


def resume_differences(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """The options of ``now`` that differ from the checkpoint's ``saved`` config, as "--flag X here, Y there"."""
    def norm(name: str, value: Any) -> Any:
        if name in _PATH_FIELDS and isinstance(value, str) and not value.startswith("builtin:"):
            return str(Path(value).expanduser().resolve())
        if name == "lora.rank_pattern" and not value:
            return {}
        if name == "group_size" and value == 64:  # checkpoints before --group-size had no value of its own saved 64
            return None  # (the model's fingerprint still refuses a resume on other packed weights)
        return value

    saved = {_FLAT_NAMES.get(k, k): v for k, v in flatten(TrainConfig, saved).items() if k != "extra"}
    now = flatten(TrainConfig, now)
    out = []
    for name in sorted(set(saved) | set(now)):
        if name in RESUME_MAY_CHANGE or name not in saved:  # a field added after the checkpoint was written
            continue
        a, b = norm(name, now.get(name)), norm(name, saved.get(name))
        if a != b and not (isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and list(a) == list(b)):
            out.append(f"{spelling(TrainConfig, name)} {now.get(name)!r} here, {saved.get(name)!r} in the checkpoint")
    return out
