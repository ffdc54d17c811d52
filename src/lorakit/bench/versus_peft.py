"""``lorakit bench``: our LoRA training step against PEFT's, same model, data, precision and batch, one run.

For every mode the contenders start from the same base weights and the same adapter
initialisation, train on the same sequence of fixed-shape batches of real text with AdamW, and
take turns step by step after a warm-up (ours, PEFT, ours, PEFT, ...), so machine drift
cancels (``harness.alternate``). Per contender: median step time, tokens/s, achieved GFLOP/s
(FLOPs of one step counted from the shapes of the matrix products it runs, attention included)
as a fraction of the peak GEMM throughput measured in the same run, the loss trajectory, and the
peak resident memory of a fresh process that runs only that contender.

Modes (ours / against):
    exact   lorakit fp32 (fused LoRA kernel; the attached model's fast     vs PEFT fp32
            forward: fused head + cross-entropy or the one-row last layer,
            lorakit_sdpa; dropout is torch's, so the trajectories match)
    bf16    lorakit ``use_bf16`` (bf16 frozen weights, fp32 adapters)       vs PEFT fp32 and PEFT under bf16 autocast
    celora  lorakit CE-LoRA backward                                        vs PEFT fp32
    poly    lorakit poly attention (degree 2, forced)                       vs PEFT fp32
    dora    lorakit DoRA (the fused kernel, magnitude applied after it)     vs PEFT DoRA fp32
bf16 also reports the held-out loss after ``quality_steps`` steps of bf16 and of fp32 training.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import itertools
import json
import math
import statistics
import subprocess
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from lorakit.adapters import LoraConfig, attach
from lorakit.speed.gemm import peak_gemm
from lorakit.adapters.precision import use_bf16
from lorakit.train.config import resolve_device
from lorakit.adapters.targets import compact_target_list, resolve
from lorakit.bench.harness import Contender, alternate
from lorakit.bench.workloads import fixed_batches, labelled_batches, machine
from lorakit.errors import LorakitError
from lorakit.options import build, fill_defaults, group, is_finite, is_int, is_seed, option
from lorakit.train.config import DataOptions, ModelOptions, OutputOptions, StepOptions, TaskOptions
from lorakit.train.memory import reset_peak, rss_kib

MODES = ("exact", "bf16", "celora", "poly", "dora")
AGAINST = ("peft",)
# Who calls the model, for both contenders alike: "loop", an own loop (model(**batch).loss.backward(), AdamW);
# "lorakit", lorakit train's engine (train.distributed.LossOf); "hf-trainer", HF Trainer's training_step with
# the num_items_in_batch it computes, and its AdamW.
CALLERS = ("loop", "lorakit", "hf-trainer")
# copies of the fp32 weights the timing process holds at most (base, ours, PEFT fp32, PEFT autocast)
WEIGHT_COPIES = 4


class BenchError(LorakitError):
    """The benchmark cannot run as asked (names what and how to fix it)."""


def parse_modes(value: str) -> tuple[str, ...]:
    return tuple(m.strip() for m in value.split(",") if m.strip())


@dataclass
class BenchConfig(OutputOptions, StepOptions, TaskOptions, DataOptions, ModelOptions):
    """What ``lorakit bench`` runs; its flags are generated from these fields (lorakit.options), the shared ones
    declared once in lorakit.train.config (model, data, steps, output) and the adapter's in LoraConfig."""

    OMIT: ClassVar[tuple[str, ...]] = ("overwrite", "data", "text_column", "label_column")
    DEFAULTS: ClassVar[dict[str, Any]] = {"model": "builtin:smollm2", "base_dtype": "fp32", "max_length": 256,
                                          "batch_size": 4, "steps": 20, "warmup": 2, "lr": 1e-4, "seed": 0,
                                          "out": "bench"}
    DEFAULT_TEXTS: ClassVar[dict[str, str]] = {"task": "the model's kind"}
    NOTES: ClassVar[dict[str, str]] = {
        "steps": "measured steps per contender", "warmup": "unmeasured steps per contender first (a count)",
        "batch_size": "rows per step of both contenders", "lr": "of both contenders",
        "max_length": "every row is full", "base_dtype": "for both contenders", "out": "bench.json, bench.md, bench.png",
        "device": "where both contenders run (autocast and timing follow it: a GPU step is timed after synchronising)"}

    modes: tuple[str, ...] = option(("exact", "bf16"), "comma-separated: exact, bf16, celora, poly, dora (DoRA against "
                                    "PEFT DoRA)", parse=parse_modes,
                                    default_text="exact,bf16")
    against: str = option("peft", "the competitor")
    lora: LoraConfig = group(LoraConfig, "LoRA adapter (as in lorakit train)", only=("r", "alpha", "targets"),
                             factory=lambda: LoraConfig(r=16, alpha=32.0, targets="all-linear"), aliases={"r": ("--r",)})
    quality_steps: int = option(50, "bf16 mode: held-out loss after this many bf16 and fp32 steps (0 skips it)")
    memory: bool = option(True, "peak memory of each contender, each in a fresh process (--no-memory skips the probes)")
    caller: str = option("loop", "who calls the model, for both contenders: loop (own loop), lorakit (lorakit train's "
                         "engine), hf-trainer (HF Trainer's training_step)", choices=CALLERS)
    model_dropout: float | None = option(None, "set every dropout of the base model to this p",
                                         default_text="the model's own")

    def __post_init__(self) -> None:
        if isinstance(self.lora, dict):  # from bench.json
            self.lora = build(LoraConfig, self.lora)
        if isinstance(self.modes, list):
            self.modes = tuple(self.modes)
        fill_defaults(self)
        if isinstance(self.warmup, float) and self.warmup.is_integer():
            self.warmup = int(self.warmup)

    def to_dict(self) -> dict[str, Any]:
        """bench.json's "config": the fields, the adapter's as r, alpha and targets."""
        doc = {k: v for k, v in asdict(self).items() if k != "lora"}
        return {**doc, "r": self.r, "alpha": self.alpha, "targets": self.targets}

    # the adapter's options, as the contenders read them
    r = property(lambda self: self.lora.r)
    alpha = property(lambda self: self.lora.alpha)
    targets = property(lambda self: self.lora.targets)

    def validate(self) -> None:
        unknown = [m for m in self.modes if m not in MODES]
        if unknown or not self.modes:
            raise BenchError(f"unknown mode {unknown[0]!r}; modes are {', '.join(MODES)}" if unknown
                             else f"give at least one mode of {', '.join(MODES)}")
        if self.against not in AGAINST:
            raise BenchError(f"--against {self.against!r}: lorakit benchmarks against {', '.join(AGAINST)}")
        if importlib.util.find_spec(self.against) is None:
            raise BenchError(f"{self.against} is not installed: pip install {self.against} "
                             "(or lorakit[bench]; make test installs it)")
        for name in ("batch_size", "max_length", "steps"):
            value = getattr(self, name)
            if not is_int(value, 1):
                raise BenchError(f"{name}={value!r} must be a positive integer")
        for name in ("warmup", "quality_steps"):
            value = getattr(self, name)
            if not is_int(value, 0):
                raise BenchError(f"{name}={value!r} must be an integer >= 0")
        for flag, value in (("--lr", self.lr),):
            if not (is_finite(value) and value > 0):
                raise BenchError(f"{flag} {value!r} must be a finite number > 0")
        if not is_seed(self.seed):
            raise BenchError(f"--seed {self.seed!r} must be an integer from 0 to 2**63 - 1")
        if self.task not in (None, "causal-lm", "classify"):
            raise BenchError(f"task={self.task!r} is not 'causal-lm' or 'classify'")
        if self.caller not in CALLERS:
            raise BenchError(f"--caller {self.caller!r} is not one of {', '.join(CALLERS)}")
        if self.model_dropout is not None and not 0.0 <= self.model_dropout < 1.0:
            raise BenchError(f"--model-dropout {self.model_dropout!r} must be in [0, 1)")


# ---------------------------------------------------------------------------- the model and its size
def model_task(spec: str, task: str | None) -> str:
    from lorakit.architectures import is_encoder
    from lorakit.train.models import builtin_default_task, model_config

    if task:
        return task
    return builtin_default_task(spec) or ("classify" if is_encoder(model_config(spec).model_type) else "causal-lm")


def parameter_count(spec: str, task: str) -> int:
    """Parameters of the model from its config alone (built on the meta device: nothing is allocated)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from lorakit.train.models import model_config

    config = model_config(spec)
    cls = AutoModelForSequenceClassification if task == "classify" else AutoModelForCausalLM
    with torch.device("meta"):
        model = cls.from_config(config)
    return sum(p.numel() for p in model.parameters())


def check_fits(spec: str, task: str, available: int | None = None) -> int:
    """Refuse, before loading, a model whose weight copies would not fit in memory; returns the estimate in bytes."""
    import psutil

    params = parameter_count(spec, task)
    need = params * 4 * WEIGHT_COPIES
    available = psutil.virtual_memory().available if available is None else available
    if need > available:
        raise BenchError(f"{spec} has {params / 1e9:.2f}B parameters: the benchmark holds up to {WEIGHT_COPIES} float32 "
                         f"copies of them ({need / 2**30:.1f} GiB) and this machine has {available / 2**30:.1f} GiB "
                         "available. Benchmark a smaller model or on a machine with more memory")
    return need


# ---------------------------------------------------------------------------- contenders
def lora_config(cfg: BenchConfig, mode: str) -> LoraConfig:
    return cfg.lora.replace(backward="celora" if mode == "celora" else "exact", use_dora=mode == "dora")


def peft_config(base: nn.Module, cfg: LoraConfig):
    """PEFT's LoraConfig selecting exactly the modules lorakit adapts on ``base``."""
    import peft

    res = resolve(base, cfg)
    # PEFT's field names are spelled once, in LoraConfig.to_peft; what is not an adapter option is left out.
    doc = cfg.replace(modules_to_save=list(res.modules_to_save)).to_peft(compact_target_list(res.targets, base, cfg),
                                                                         fan_in_fan_out=False)
    return peft.LoraConfig(**{k: v for k, v in doc.items() if k not in _PEFT_FILE_ONLY})


_PEFT_FILE_ONLY = ("peft_type", "task_type", "base_model_name_or_path", "inference_mode")  # adapter_config.json's own


def ours_name(peft_name: str) -> str:
    """The lorakit parameter path of a PEFT model's parameter: PEFT's in-memory names are lorakit's, but for
    the prefix, the DoRA magnitude (a module in PEFT, a parameter here) and modules_to_save (trained in place)."""
    return (peft_name.removeprefix("base_model.model.")
            .replace(".lora_magnitude_vector.default.weight", ".lora_magnitude_vector.default")
            .replace(".modules_to_save.default.", "."))


def peft_twin(base: nn.Module, ours: nn.Module, cfg: LoraConfig) -> nn.Module:
    """PEFT's model on a copy of ``base``, with the same targets and the same adapter (and head) weights as ``ours``."""
    import peft

    twin = peft.get_peft_model(copy.deepcopy(base), peft_config(base, cfg))
    ours_params = dict(ours.named_parameters())
    with torch.no_grad():
        for name, p in twin.named_parameters():
            if ".lora_" in name or ".modules_to_save." in name:
                p.copy_(ours_params[ours_name(name)])
    return twin


def build_ours(base: nn.Module, cfg: BenchConfig, mode: str) -> nn.Module:
    torch.manual_seed(cfg.seed)
    model = attach(copy.deepcopy(base), lora_config(cfg, mode))  # the fast forward, as for any caller
    if mode == "poly":
        from lorakit.limits import use_attention

        use_attention(model, "poly", degree=2)
    return model


@dataclass
class Runner:
    """One contender's training loop: AdamW over the trainable parameters, batches in a fixed cycle, the
    random state reset at every step so that models with dropout see the same masks in every contender."""

    name: str
    model: nn.Module
    batches: list[dict[str, torch.Tensor]]
    lr: float
    bf16_autocast: bool = False
    seed: int = 0
    losses: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.model.train()
        self.optimizer = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=self.lr)
        self._cycle = itertools.cycle(self.batches)

    @functools.cached_property
    def device(self) -> torch.device:
        """Where the model is (its first parameter's device, read once: not in the timed step): autocast and the
        timing follow it."""
        return next(self.model.parameters()).device

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16_autocast)

    def step(self) -> None:
        from lorakit import celora

        batch = next(self._cycle)
        torch.manual_seed(self.seed + len(self.losses))  # the same dropout masks for every contender at step i
        with self.autocast():
            loss = self.loss(batch)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        celora.step(self.model)  # a no-op for models without CE-LoRA
        self.losses.append(float(loss.detach()))

    def loss(self, batch):
        return self.model(**batch).loss

    @torch.no_grad()
    def eval_loss(self, batches) -> float:
        self.model.eval()
        try:
            with self.autocast():
                return statistics.fmean(float(self.model(**b).loss) for b in batches)
        finally:
            self.model.train()


class LorakitEngineRunner(Runner):
    """lorakit train's caller: the loss comes from its engine (``LossOf``), as in ``Trainer.fit``."""

    def __post_init__(self) -> None:
        from lorakit.train.distributed import LossOf

        super().__post_init__()
        self.engine = LossOf(self.model)

    def loss(self, batch):
        return self.engine(batch)


class HFTrainerRunner(Runner):
    """HF Trainer's caller: ``Trainer.training_step`` (its compute_loss, loss kwargs and backward) with the
    ``num_items_in_batch`` that ``Trainer.get_batch_samples`` counts, then the Trainer's own AdamW."""

    def __post_init__(self) -> None:
        import tempfile

        from transformers import Trainer, TrainingArguments

        self.model.train()
        self._folder = tempfile.TemporaryDirectory(prefix="lorakit-bench-")
        args = TrainingArguments(output_dir=self._folder.name, per_device_train_batch_size=len(self.batches[0]["input_ids"]),
                                 learning_rate=self.lr, lr_scheduler_type="constant", optim="adamw_torch",
                                 use_cpu=self.device.type == "cpu",
                                 report_to=[], save_strategy="no", logging_strategy="no", disable_tqdm=True)
        self.trainer = Trainer(model=self.model, args=args)
        self.trainer.create_optimizer_and_scheduler(num_training_steps=10**9)
        self.optimizer = self.trainer.optimizer
        self._cycle = itertools.cycle(self.batches)

    def step(self) -> None:
        batch = next(self._cycle)
        torch.manual_seed(self.seed + len(self.losses))
        samples, items = self.trainer.get_batch_samples(iter([batch]), 1, self.model.device)
        with self.autocast():
            loss = self.trainer.training_step(self.model, samples[0], items)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.losses.append(float(loss))


RUNNERS = {"loop": Runner, "lorakit": LorakitEngineRunner, "hf-trainer": HFTrainerRunner}



def contender_names(mode: str) -> list[str]:
    against = "peft dora fp32" if mode == "dora" else "peft fp32"
    return [f"lorakit {mode}", against] + (["peft bf16 autocast"] if mode == "bf16" else [])


def contenders(base: nn.Module, cfg: BenchConfig, mode: str, batches, only: str | None = None) -> list[Runner]:
    """Ours first, then PEFT fp32 (and PEFT under bf16 autocast for the bf16 mode); ``only``: just that one."""
    ours = build_ours(base, cfg, mode)
    lcfg = lora_config(cfg, mode)
    runners = []
    runner = RUNNERS[cfg.caller]
    for name in contender_names(mode):
        if only not in (None, name):
            continue
        if name.startswith("lorakit"):
            runners.append(runner(name, use_bf16(ours, when="always") if mode == "bf16" else ours, batches, cfg.lr))
        else:
            runners.append(runner(name, peft_twin(base, ours, lcfg), batches, cfg.lr,
                                  bf16_autocast=name.endswith("autocast")))
    return runners


# ---------------------------------------------------------------------------- FLOPs and the machine's peak
def _attention_flops(q_shape, k_shape, v_shape, causal: bool) -> int:
    b, h, lq, d = q_shape
    lk, dv = k_shape[-2], v_shape[-1]
    full = 2 * b * h * lq * lk * (d + dv)
    return full // 2 if causal and lq == lk else full


def _sdpa_cpu_forward(query, key, value, dropout_p=0.0, is_causal=False, *args, out_shape=None, **kwargs) -> int:
    return _attention_flops(query, key, value, is_causal)


def _sdpa_cpu_backward(grad_out, query, key, value, out, logsumexp, dropout_p=0.0, is_causal=False, *args,
                       out_shape=None, **kwargs) -> int:
    return 2 * _attention_flops(query, key, value, is_causal)  # dQ, dK, dV, dP: twice the forward's products


def step_flops(step: Callable[[], None]) -> int:
    """FLOPs of one call of ``step`` from the shapes of its matrix products (torch's FlopCounterMode), with
    CPU flash attention counted as 4 b h Lq Lk d forward and twice that backward (halved when causal)."""
    from torch.utils.flop_counter import FlopCounterMode

    aten = torch.ops.aten
    mapping = {aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu_forward,
               aten._scaled_dot_product_flash_attention_for_cpu_backward: _sdpa_cpu_backward}
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        step()
    return int(counter.get_total_flops())


# ---------------------------------------------------------------------------- memory: one fresh process a contender
def _memory_probe(cfg: BenchConfig, mode: str, contender: str) -> dict[str, float]:
    """Runs in a child process: build only ``contender``, warm it up, then peak RSS over two steps."""
    import gc

    base, _, batches = _load(cfg, model_task(cfg.model, cfg.task), count=2)
    (runner,) = contenders(base, cfg, mode, batches, only=contender)
    del base
    gc.collect()
    runner.step()
    before = rss_kib("VmRSS")
    reset_peak()
    cuda = runner.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(runner.device)
    for _ in range(2):
        runner.step()
    out = {"peak_rss_mb": rss_kib("VmHWM") / 1024, "rss_before_steps_mb": before / 1024}
    if cuda:
        out["cuda_peak_mb"] = torch.cuda.max_memory_allocated(runner.device) / 2**20
    return out


def measure_memory(cfg: BenchConfig, mode: str, contender: str) -> dict[str, float] | None:
    if not Path("/proc/self/status").exists():
        return None
    payload = json.dumps({"config": asdict(cfg), "mode": mode, "contender": contender})
    done = subprocess.run([sys.executable, "-m", "lorakit.bench.versus_peft", payload], capture_output=True, text=True)
    if done.returncode != 0:
        raise BenchError(f"the memory probe for {contender} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------- the run
def _load(cfg: BenchConfig, task: str, count: int | None = None):
    """(base model, tokenizer, the training batches): ``count`` batches, default warm-up + measured steps."""
    from lorakit.train.models import load_model

    device = resolve_device(cfg.device)
    loaded = load_model(cfg.model, task, label_names=["negative", "positive"] if task == "classify" else None,
                        dtype=cfg.base_dtype, device=device)
    if cfg.model_dropout is not None:
        for module in loaded.model.modules():
            if isinstance(module, nn.Dropout):
                module.p = cfg.model_dropout
    count = cfg.warmup + cfg.steps if count is None else count
    return loaded.model, loaded.tokenizer, on(device, fixed_batches(loaded.tokenizer, task, cfg.batch_size,
                                                                    cfg.max_length, count))


def on(device: torch.device, batches: list[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
    return [{k: v.to(device) for k, v in b.items()} for b in batches]


def run(cfg: BenchConfig, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    cfg.validate()
    task = model_task(cfg.model, cfg.task)
    check_fits(cfg.model, task)
    say = progress or (lambda _m: None)
    base, tokenizer, batches = _load(cfg, task)
    tokens = cfg.batch_size * cfg.max_length
    device = next(base.parameters()).device
    report: dict[str, Any] = {
        "benchmark": "lorakit-vs-peft", "model": cfg.model, "task": task, "config": cfg.to_dict(), "machine": machine(),
        "device": str(device), "peak_gemm_gflops": {"float32": peak_gemm(torch.float32, device=device),
                                                    "bfloat16": peak_gemm(torch.bfloat16, device=device)},
        "modes": {},
    }
    say(f"peak GEMM: fp32 {report['peak_gemm_gflops']['float32']:.0f} GFLOP/s, "
        f"bf16 {report['peak_gemm_gflops']['bfloat16']:.0f} GFLOP/s")
    for mode in cfg.modes:
        runners = contenders(base, cfg, mode, batches)
        timings = alternate([Contender(r.name, r.step, str(r.device)) for r in runners], warmup=cfg.warmup, steps=cfg.steps,
                            progress=lambda m, mode=mode: say(f"{mode}: {m}"))
        entry: dict[str, Any] = {"contenders": {}}
        for r in runners:
            t = timings[r.name].summary()
            precision = "bfloat16" if (r.bf16_autocast or r.name.endswith("bf16")) else "float32"
            flops = step_flops(r.step)
            t.update(tokens_per_s=tokens / t["median_s"], step_gflop=flops / 1e9, precision=precision,
                     achieved_gflops=flops / t["median_s"] / 1e9,
                     fraction_of_peak=flops / t["median_s"] / 1e9 / report["peak_gemm_gflops"][precision],
                     losses=r.losses[: cfg.warmup + cfg.steps])
            entry["contenders"][r.name] = t
        ours, ref = runners[0].name, runners[1].name
        entry["ratio_to_peft_fp32"] = entry["contenders"][ours]["median_s"] / entry["contenders"][ref]["median_s"]
        # the same from each round's pair of steps: robust to drift slower than a round
        entry["median_round_ratio_to_peft_fp32"] = statistics.median(
            a / b for a, b in zip(timings[ours].seconds, timings[ref].seconds))
        diffs = [abs(a - b) / abs(b) for a, b in zip(runners[0].losses, runners[1].losses) if math.isfinite(b) and b != 0]
        entry["loss_max_relative_difference"] = max(diffs) if diffs else None
        if mode == "bf16":
            entry["ratio_to_peft_bf16_autocast"] = (entry["contenders"][ours]["median_s"]
                                                    / entry["contenders"]["peft bf16 autocast"]["median_s"])
        del runners  # the models: the quality run and the memory probes need the memory
        if mode == "bf16" and cfg.quality_steps:
            entry["quality"] = bf16_quality(base, cfg, tokenizer, task, batches, say)
        if cfg.memory:
            for name in entry["contenders"]:
                say(f"{mode}: peak memory of {name} (fresh process)")
                entry["contenders"][name].update(measure_memory(cfg, mode, name) or {})
            mem = entry["contenders"]
            if "peak_rss_mb" in mem[ours]:
                entry["peak_rss_ratio_to_peft_fp32"] = mem[ours]["peak_rss_mb"] / mem[ref]["peak_rss_mb"]
        report["modes"][mode] = entry
        say(f"{mode}: {summary_line(mode, entry)}")
    return report


def bf16_quality(base, cfg: BenchConfig, tokenizer, task: str, batches, say) -> dict[str, float]:
    """Held-out loss after ``quality_steps`` steps of lorakit bf16 and lorakit fp32 training from the same start:
    the benchmark's text blocks (causal LM: the blocks after them are held out), or real labelled sentiment
    snippets (classification: the benchmark's blocks carry arbitrary labels)."""
    device = next(base.parameters()).device
    if task == "classify":
        batches = on(device, labelled_batches(tokenizer, cfg.batch_size, cfg.max_length, cfg.quality_steps))
        held_out = on(device, labelled_batches(tokenizer, cfg.batch_size, cfg.max_length, 4, held_out=True))
    else:
        held_out = on(device, fixed_batches(tokenizer, task, cfg.batch_size, cfg.max_length, 2, first=len(batches)))
    fp32 = Runner("fp32", build_ours(base, cfg, "exact"), batches, cfg.lr)
    bf16 = Runner("bf16", use_bf16(build_ours(base, cfg, "exact"), when="always"), batches, cfg.lr)
    before = fp32.eval_loss(held_out)
    for i in range(cfg.quality_steps):
        fp32.step()
        bf16.step()
        if (i + 1) % 10 == 0:
            say(f"bf16 quality: step {i + 1}/{cfg.quality_steps}: fp32 {fp32.losses[-1]:.4f}, bf16 {bf16.losses[-1]:.4f}")
    a, b = fp32.eval_loss(held_out), bf16.eval_loss(held_out)
    return {"steps": cfg.quality_steps, "eval_loss_before": before, "eval_loss_fp32": a, "eval_loss_bf16": b,
            "relative_difference": abs(b - a) / a}


# ---------------------------------------------------------------------------- report files
def summary_line(mode: str, entry: dict[str, Any]) -> str:
    against = "PEFT DoRA fp32" if mode == "dora" else "PEFT fp32"  # ratio_to_peft_fp32: against PEFT doing the same
    parts = [f"{entry['ratio_to_peft_fp32']:.3f} x {against} (median of round ratios {entry['median_round_ratio_to_peft_fp32']:.3f})"]
    if "ratio_to_peft_bf16_autocast" in entry:
        parts.append(f"{entry['ratio_to_peft_bf16_autocast']:.3f} x PEFT bf16 autocast")
    if entry.get("loss_max_relative_difference") is not None:
        parts.append(f"loss max rel. diff {entry['loss_max_relative_difference']:.1e}")
    if "peak_rss_ratio_to_peft_fp32" in entry:
        parts.append(f"peak RSS {entry['peak_rss_ratio_to_peft_fp32']:.3f} x PEFT")
    return ", ".join(parts)


def markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    c = report["config"]
    dropout = "" if c.get("model_dropout") is None else f", model dropout {c['model_dropout']:g}"
    lines = [f"# lorakit vs PEFT: {report['model']} ({report['task']}), batch {c['batch_size']} x "
             f"{c['max_length']}, LoRA r={c['r']} on {c['targets']}; caller: {c.get('caller', 'loop')}{dropout}",
             "", f"Machine: {m.get('cpu')}, {m.get('threads')} threads, torch {m.get('torch')}"
             f"{', ' + m['gpu'] if 'gpu' in m else ''}. Peak GEMM measured in this run: "
             f"fp32 {report['peak_gemm_gflops']['float32']:.0f} GFLOP/s, bf16 {report['peak_gemm_gflops']['bfloat16']:.0f} GFLOP/s.",
             "", "| mode | contender | median step (s) | tokens/s | GFLOP/step | GFLOP/s | of peak | peak RSS (MB) | vs PEFT fp32 (same method) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for mode, entry in report["modes"].items():
        ref = list(entry["contenders"].values())[1]["median_s"]  # PEFT fp32 (PEFT DoRA fp32 for dora)
        for name, c in entry["contenders"].items():
            rss = f"{c['peak_rss_mb']:.0f}" if "peak_rss_mb" in c else "-"
            lines.append(f"| {mode} | {name} | {c['median_s']:.3f} | {c['tokens_per_s']:.0f} | {c['step_gflop']:.1f} | "
                         f"{c['achieved_gflops']:.0f} | {c['fraction_of_peak']:.0%} | {rss} | {c['median_s'] / ref:.3f} |")
    lines.append("")
    for mode, entry in report["modes"].items():
        lines.append(f"- {mode}: {summary_line(mode, entry)}")
        if "quality" in entry:
            q = entry["quality"]
            lines.append(f"  - held-out loss {q['eval_loss_before']:.4f} before, after {q['steps']} steps: fp32 {q['eval_loss_fp32']:.4f}, bf16 "
                         f"{q['eval_loss_bf16']:.4f} ({q['relative_difference']:.2%} apart)")
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, values, colours = [], [], []
    for mode, entry in report["modes"].items():
        for name, c in entry["contenders"].items():
            labels.append(f"{mode}\n{name}")
            values.append(c["median_s"])
            colours.append("tab:blue" if name.startswith("lorakit") else "tab:gray")
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(labels)), 4))
    ax.bar(range(len(values)), values, color=colours)
    ax.set_xticks(range(len(values)), labels, fontsize=7)
    ax.set_ylabel("median step time (s)")
    ax.set_title(f"{report['model']}, {report['config']['batch_size']} x {report['config']['max_length']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write(report: dict[str, Any], out: str | Path) -> dict[str, Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "bench.json", "markdown": out / "bench.md", "png": out / "bench.png"}
    paths["json"].write_text(json.dumps(report, indent=2) + "\n")
    paths["markdown"].write_text(markdown(report))
    plot(report, paths["png"])
    return paths


if __name__ == "__main__":  # the memory probe's child process
    spec = json.loads(sys.argv[1])
    config = build(BenchConfig, spec["config"])
    print(json.dumps(_memory_probe(config, spec["mode"], spec["contender"])))
