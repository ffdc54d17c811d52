"""The ``lorakit`` command: parses arguments, calls the library, prints. No logic of its own.

    lorakit train [--model ...] [--data ...] [...]    fine-tune (no arguments: MiniLM on sentiment)
    lorakit eval  --adapter DIR [--model ...] [--data ...]
    lorakit merge --adapter DIR --out DIR [--model ...]
    lorakit export RUN_OR_ADAPTER --out FILE.gguf [--format gguf-lora|gguf] [--outtype ...] [--ollama]
    lorakit generate --adapter DIR (--prompt TEXT | --chat) [--temperature T] [--max-new-tokens N]
    lorakit info  DIR
    lorakit bench [--model ...] [--modes exact,bf16,celora,poly,dora] [--against peft]

Every command is one row of COMMANDS: its name, its help, the dataclass of its options (composed from the shared
groups of lorakit.train.config: model, data, adapter, output, precision, distributed) and the function it runs.
``parser()`` builds argparse from the table with ``lorakit.options.add_flags``; nothing here adds an argument.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from lorakit.adapters import LoraConfig
from lorakit.bench.versus_peft import BenchConfig
from lorakit.errors import ConfigError, LorakitError
from lorakit.export import ExportConfig
from lorakit.options import (add_flags, fill_defaults, finite_float, from_flags, group, is_finite, is_seed, option,
                             positive_int)
from lorakit.reproduce.celora import CeloraRun
from lorakit.reproduce.expressive import ExpressiveRun
from lorakit.reproduce.limits import PhaseRun, SpeedRun
from lorakit.train.config import (AdapterSource, AttentionOptions, ChatTemplateOptions, DataOptions, ModelOptions,
                                  OutputOptions, StepOptions, TrainCommand)


# ---------------------------------------------------------------------- each command's options
@dataclass
class EvalConfig(StepOptions, DataOptions, AdapterSource, ModelOptions):
    OMIT: ClassVar[tuple[str, ...]] = ("steps", "lr", "warmup", "seed")
    REQUIRED: ClassVar[tuple[str, ...]] = ("adapter",)
    DEFAULTS: ClassVar[dict[str, Any]] = {"batch_size": 64, "base_dtype": "auto"}
    NOTES: ClassVar[dict[str, str]] = {"data": "a file given here is evaluated whole", "batch_size": "rows per evaluation batch"}

    labels: list[str] | None = option(
        None, "label names in the order of the classifier's outputs, for an adapter that does not record them (PEFT's, "
        "or save_adapter without labels): neg,pos", parse=lambda v: [x.strip() for x in v.split(",") if x.strip()],
        metavar="NAMES")
    json: bool = option(False, "print the metrics as JSON")

    def __post_init__(self) -> None:
        fill_defaults(self)


@dataclass
class MergeConfig(OutputOptions, AdapterSource, ModelOptions):
    OMIT: ClassVar[tuple[str, ...]] = ("base_dtype",)
    REQUIRED: ClassVar[tuple[str, ...]] = ("adapter", "out")
    NOTES: ClassVar[dict[str, str]] = {"out": "the merged model's directory"}


@dataclass
class GenerateConfig(StepOptions, ChatTemplateOptions, AdapterSource, ModelOptions):
    OMIT: ClassVar[tuple[str, ...]] = ("steps", "batch_size", "lr", "warmup")
    DEFAULTS: ClassVar[dict[str, Any]] = {"base_dtype": "auto"}
    NOTES: ClassVar[dict[str, str]] = {"seed": "for sampling (with --temperature > 0)"}

    prompt: str | None = option(None, "one user turn; the reply is printed", exclusive="prompt or chat", required=True)
    chat: bool = option(False, "an interactive conversation (empty line or /exit ends it, /reset forgets it)",
                        exclusive="prompt or chat")
    system: str | None = option(None, "a system turn put first")
    max_new_tokens: int = option(128, "at most the model's context length (its position embeddings) less the prompt's "
                                 "tokens", parse=positive_int)
    temperature: float = option(0.0, "0: greedy; above 0: sampling", parse=finite_float(0), default_text="0, greedy")
    top_p: float | None = option(None, "nucleus sampling: keep the most likely tokens up to this probability mass, in "
                                 "(0, 1] (with --temperature > 0)", parse=finite_float(0, 1, lo_open=True),
                                 default_text="1")
    raw: bool = option(False, "feed --prompt as it is, without the chat template (not with --chat, --system or "
                       "--chat-template)")

    def __post_init__(self) -> None:
        fill_defaults(self)
        if self.seed is not None and not is_seed(self.seed):
            raise ConfigError(f"seed={self.seed!r} must be an integer from 0 to 2**63 - 1")
        if self.raw:  # checked before the model loads
            ignored = [flag for flag, on in (("--chat", self.chat), ("--system", self.system is not None),
                                             ("--chat-template", self.chat_template is not None)) if on]
            if ignored:
                raise ConfigError(f"--raw feeds --prompt as it is, without the chat template, so {' and '.join(ignored)} "
                                  f"would do nothing; drop --raw or {' and '.join(ignored)}")


@dataclass
class InfoConfig:
    dir: str = option(help="an adapter directory (a training run's output or a PEFT adapter)", positional=True,
                      metavar="DIR")


@dataclass
class NormsConfig(OutputOptions, AttentionOptions, DataOptions, AdapterSource, ModelOptions):
    OMIT: ClassVar[tuple[str, ...]] = ("overwrite", "text_column", "label_column", "device")
    DEFAULTS: ClassVar[dict[str, Any]] = {"out": "norms", "base_dtype": "auto"}
    DEFAULT_TEXTS: ClassVar[dict[str, str]] = {"data": "the adapter's training data (as eval), else the built-in set "
                                               "of the task", "max_length": "the task's"}
    NOTES: ClassVar[dict[str, str]] = {"out": "the directory for norms.json and norms.png",
                                       "attention": "measure with lorakit attention (shows its per-layer decision)"}

    rows: int = option(8, "rows of data in the forward pass", parse=positive_int)
    per_head: bool = option(False, "one row per head (default: per layer, worst head)")

    def __post_init__(self) -> None:
        fill_defaults(self)
        if not (is_finite(self.attention_tolerance) and self.attention_tolerance > 0):
            raise ConfigError(f"attention_tolerance={self.attention_tolerance!r} must be a positive number (e.g. 1e-3)")


@dataclass
class RankAdviceConfig(OutputOptions, StepOptions, DataOptions, ModelOptions):
    OMIT: ClassVar[tuple[str, ...]] = ("overwrite", "batch_size", "warmup", "seed", "text_column", "label_column",
                                       "max_length", "device")
    REQUIRED: ClassVar[tuple[str, ...]] = ("model",)
    ONE_OF: ClassVar[tuple[tuple[str, ...], ...]] = (("tuned", "data"), ("tol", "budget"))
    DEFAULTS: ClassVar[dict[str, Any]] = {"steps": 100, "lr": 1e-4, "out": "rank-advice", "base_dtype": "auto"}
    NOTES: ClassVar[dict[str, str]] = {"steps": "full fine-tuning steps with --data",
                                       "lr": "full fine-tuning learning rate with --data",
                                       "data": "data for a short full fine-tuning run",
                                       "out": "the directory for advice.json"}

    tuned: str | None = option(None, "a fully fine-tuned model directory of the same architecture", metavar="DIR")
    tol: float | None = option(None, "relative Frobenius error left per module, in [0, 1), e.g. 0.5",
                               parse=finite_float(0, 1, hi_open=True))
    budget: int | None = option(None, "adapter parameters to split across modules", parse=positive_int)
    lora: LoraConfig = group(LoraConfig, "LoRA adapter", only=("targets",),
                             factory=lambda: LoraConfig(targets="all-linear"))

    def __post_init__(self) -> None:
        fill_defaults(self)
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps <= 0:
            raise ConfigError(f"steps={self.steps!r} must be a positive integer (--steps: full fine-tuning steps)")
        if not (is_finite(self.lr) and self.lr > 0):
            raise ConfigError(f"lr={self.lr!r} must be a positive number (--lr: full fine-tuning learning rate)")


@dataclass
class LorakitOptions:
    """The options of ``lorakit`` itself, before a command."""

    version: str = option(f"lorakit {__import__('lorakit').__version__}", "print the version and exit",
                          action="version")


def resolve_device(device: str | None):
    from lorakit.train.config import resolve_device as resolve

    return resolve(device)


# ---------------------------------------------------------------------- what each command does
def cmd_train(cfg: TrainCommand, argv: list[str]) -> int:
    from lorakit.train import run
    from lorakit.train.evaluation import held_out_change
    from lorakit.train.job import launch_processes

    if cfg.nproc is not None:
        status = launch_processes(cfg.train, cfg.nproc, argv)
        if status is not None:
            return status
    report = run(cfg.train)
    if report.get("dry_run"):
        return 0 if report["plan"]["refusal"] is None else 1
    line = held_out_change(report)
    if line:
        print(line)
    return 0


def cmd_eval(a: EvalConfig, argv: list[str]) -> int:
    from lorakit.train.apply import evaluate_adapter

    res = evaluate_adapter(a.adapter, a.data, model=a.model, max_length=a.max_length, batch_size=a.batch_size,
                           text_column=a.text_column, label_column=a.label_column, labels=a.labels,
                           base_dtype=a.base_dtype, device=resolve_device(a.device))
    if a.json:
        print(json.dumps(res, indent=2))
    else:
        metrics = ", ".join(f"{k.removeprefix('eval_')} {v:.4f}" for k, v in res.items() if k.startswith("eval_"))
        print(f"{res['adapter']} on {res['data']} ({res['rows']:,} rows): {metrics}")
    return 0


def cmd_merge(a: MergeConfig, argv: list[str]) -> int:
    from lorakit.train.apply import merge_adapter

    path = merge_adapter(a.adapter, a.out, model=a.model, overwrite=a.overwrite, device=resolve_device(a.device))
    print(f"wrote the merged model to {path}/ (loads with transformers' from_pretrained)")
    return 0


def cmd_generate(a: GenerateConfig, argv: list[str]) -> int:
    from lorakit.train.apply import load_for_generation
    from lorakit.train.generate import chat_loop, check_sampling, generate

    top_p = 1.0 if a.top_p is None else a.top_p
    check_sampling(a.temperature, top_p, a.seed, given_top_p=a.top_p is not None)
    loaded = load_for_generation(a.adapter, a.model, chat_template=a.chat_template, base_dtype=a.base_dtype,
                                 device=resolve_device(a.device))
    options = dict(max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_p=top_p, seed=a.seed)
    if a.chat:
        chat_loop(loaded.model, loaded.tokenizer, system=a.system, **options)
    else:
        generate(loaded.model, loaded.tokenizer, a.prompt, system=a.system, raw=a.raw, stream=sys.stdout, **options)
        print()
    return 0


def cmd_info(a: InfoConfig, argv: list[str]) -> int:
    from lorakit.train.describe import describe

    print(describe(a.dir))
    return 0


def cmd_norms(a: NormsConfig, argv: list[str]) -> int:
    from lorakit.files import check_output_dir
    from lorakit.train.apply import model_norms

    out = check_output_dir(a.out)  # before the model loads
    report = model_norms(a.model, a.adapter, a.data, rows=a.rows, max_length=a.max_length, attention=a.attention,
                         tolerance=a.attention_tolerance, base_dtype=a.base_dtype)
    print(report.table(by="head" if a.per_head else "layer"))
    report.to_json(out / "norms.json")
    report.plot(out / "norms.png")
    print(f"wrote {out / 'norms.json'} and {out / 'norms.png'}")
    return 0


def cmd_rank_advice(a: RankAdviceConfig, argv: list[str]) -> int:
    from pathlib import Path

    from lorakit.expressive import advice as ad
    from lorakit.files import check_output_dir

    check_output_dir(a.out)  # before the model loads and the fine-tuning runs
    targets = a.lora.targets
    if a.tuned:
        base, deltas = ad.tuned_deltas(a.model, a.tuned, targets, base_dtype=a.base_dtype)
    elif a.base_dtype not in ("auto", "fp32"):
        raise ConfigError(f"--base-dtype {a.base_dtype} with --data: the short full fine-tuning trains the target "
                          "weights themselves, in fp32; drop --base-dtype (or give --tuned)")
    else:
        base, deltas, after = ad.full_finetune_deltas(a.model, a.data, targets, steps=a.steps, lr=a.lr,
                                                      out=Path(a.out) / "full-finetune", budget=a.budget)
        print("full fine-tuning, held-out: " + ", ".join(f"{k.removeprefix('eval_')} {v:.4f}" for k, v in after.items()))
    advice = ad.advise(ad.spectra(base, deltas), tol=a.tol, budget=a.budget)
    print(advice.table())
    path = advice.to_json(Path(a.out) / "advice.json")
    print(f"wrote {path}; train with: lorakit train --targets ... --rank-pattern {path}")
    return 0


def cmd_reproduce(a: CeloraRun | PhaseRun | SpeedRun | ExpressiveRun, argv: list[str]) -> int:
    from lorakit.files import check_output_dir

    check_output_dir(a.out)  # a file, a dangling link or a read-only place: refused before minutes of work
    a.run()
    return 0


def cmd_bench(cfg: BenchConfig, argv: list[str]) -> int:
    from lorakit.bench import versus_peft as vp

    report = vp.run(cfg, progress=lambda m: print(m, file=sys.stderr, flush=True))
    paths = vp.write(report, cfg.out)
    print(vp.markdown(report))
    print(f"wrote {paths['json']}, {paths['markdown']}, {paths['png']}")
    return 0


def cmd_export(cfg: ExportConfig, argv: list[str]) -> int:
    from lorakit.export import export_gguf
    from lorakit.export.ollama import create_command

    written = export_gguf(cfg.adapter, cfg.out, **cfg.export_arguments())
    kind = "llama.cpp LoRA adapter" if cfg.format == "gguf-lora" else "merged model"
    print(f"wrote the {kind} to {written['gguf']}")
    if "modelfile" in written:
        print(f"wrote {written['modelfile']}; load it into Ollama with:\n  {create_command(written['modelfile'])}")
    return 0


# ---------------------------------------------------------------------- the table of commands
@dataclass(frozen=True)
class Command:
    """One ``lorakit`` command: ``name`` ("reproduce celora": a subcommand of "reproduce"), its one-line help, its
    options (a dataclass; None for a command that only holds subcommands) and what it runs: ``run(config, argv)``."""

    name: str
    help: str
    config: type | None = None
    run: Callable[[Any, list[str]], int] | None = None
    description: str | None = None
    metavar: str | None = None  # the subcommands' placeholder in --help


_TRAIN = ("Fine-tune a LoRA adapter. With no arguments: MiniLM on fresh-vs-rotten sentiment, 200 steps. Every option "
          "is a field of lorakit.train.TrainConfig (the LoRA ones of its LoraConfig), with the same help.")
COMMANDS: tuple[Command, ...] = (
    Command("train", "fine-tune a LoRA adapter", TrainCommand, cmd_train, _TRAIN),
    Command("eval", "evaluate an adapter on held-out data", EvalConfig, cmd_eval),
    Command("merge", "merge an adapter into its base model and write a plain HF model directory", MergeConfig, cmd_merge),
    Command("export", "write an adapter as GGUF for llama.cpp and Ollama (a LoRA file or the merged model)", ExportConfig,
            cmd_export, "Write a fine-tune as GGUF: --format gguf-lora, a llama.cpp LoRA adapter for the base GGUF "
            "(llama-cli -m base.gguf --lora adapter.gguf); --format gguf, the base with the adapter merged (llama-cli -m "
            "model.gguf). --ollama adds a Modelfile."),
    Command("generate", "talk to a causal LM with its adapter (no merge needed)", GenerateConfig, cmd_generate,
            "Text from the base model plus the adapter: the prompt in the chat template (the one saved with the adapter, "
            "else the tokenizer's), the reply streamed as it is generated."),
    Command("info", "what an adapter directory holds", InfoConfig, cmd_info),
    Command("norms", "which side of the sqrt(log L) threshold each attention layer and head is on", NormsConfig,
            cmd_norms, "One forward pass on a few rows: per layer and head, max |entry| of X W_Q, X W_K, X W_V (adapters "
            "included), the adapter's share, the max logit and its certified bound, against sqrt(log L)."),
    Command("rank-advice", "per-module LoRA ranks from the spectrum of a full fine-tuning's weight change",
            RankAdviceConfig, cmd_rank_advice, "From a fully fine-tuned checkpoint (--tuned) or a short full fine-tuning "
            "lorakit runs itself (--data), the singular spectrum of each target module's weight change and the smallest "
            "rank reaching --tol, or the best split of --budget parameters; prints a rank_pattern."),
    Command("reproduce", "reproduce a paper's claim (writes JSON/CSV and a PNG)", metavar="EXPERIMENT"),
    Command("reproduce celora", "exact LoRA vs CE-LoRA on MiniLM sentiment and SmolLM2/Hamlet", CeloraRun, cmd_reproduce),
    Command("reproduce phase-transition", "poly attention's gradient error against G / sqrt(log L), and its time against "
            "exact attention (Hu et al. 2025)", PhaseRun, cmd_reproduce),
    Command("reproduce norm-speed", "the paper's Table 1 at CPU scale: standard vs norm-controlled, three sizes, time "
            "per epoch with attention auto", SpeedRun, cmd_reproduce),
    Command("reproduce expressive", "the expressive power of LoRA on synthetic linear, ReLU and transformer models: "
            "constructions vs gradient descent (Zeng & Lee 2024)", ExpressiveRun, cmd_reproduce),
    Command("bench", "our training step against PEFT's: time, memory, FLOP/s, same run", BenchConfig, cmd_bench,
            "Time lorakit's training step against PEFT's on the same model, data, precision and batch, alternating steps "
            "so machine drift cancels. Writes bench.json, bench.md and bench.png."),
)


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors as one `lorakit: error:` line (the usage is one `lorakit COMMAND --help` away)."""

    def error(self, message: str):
        self.exit(2, f"lorakit: error: {message} (see: {self.prog} --help)\n")


def parser() -> argparse.ArgumentParser:
    """argparse from COMMANDS: a subparser per row (a row "a b" under row "a"), its options from the row's config."""
    p = _Parser(prog="lorakit", description="Fast LoRA fine-tuning that tells you what your adapters can and cannot do.")
    add_flags(p, LorakitOptions)
    subparsers = {"": p.add_subparsers(dest="command", metavar="COMMAND")}
    for row in COMMANDS:
        parent, _, leaf = row.name.rpartition(" ")
        sub = subparsers[parent].add_parser(leaf, help=row.help, description=row.description or None)
        if row.config is None:
            subparsers[row.name] = sub.add_subparsers(dest=f"{row.name} command", metavar=row.metavar, required=True)
        else:
            add_flags(sub, row.config)
            sub.set_defaults(_row=row)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser().parse_args(argv)
    if args.command is None:
        parser().print_help()
        return 2
    row: Command = args._row
    rest = argv[argv.index(args.command) + 1 :] if args.command in argv else []
    try:
        return row.run(from_flags(row.config, args), rest)
    except LorakitError as exc:
        print(f"lorakit: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lorakit: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `lorakit info DIR | head` closed the pipe: stop quietly, as cat does
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
