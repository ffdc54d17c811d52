"""The ``lorakit`` command: parses arguments, calls the library, prints. No logic of its own.

    lorakit train [--model ...] [--data ...] [...]    fine-tune (no arguments: MiniLM on sentiment)
    lorakit eval  --adapter DIR [--model ...] [--data ...]
    lorakit merge --adapter DIR --out DIR [--model ...]
    lorakit export RUN_OR_ADAPTER --out FILE.gguf [--format gguf-lora|gguf] [--outtype ...] [--ollama]
    lorakit generate --adapter DIR (--prompt TEXT | --chat) [--temperature T] [--max-new-tokens N]
    lorakit info  DIR
    lorakit bench [--model ...] [--modes exact,bf16,celora,poly,dora] [--against peft]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence

from lorakit.errors import ConfigError, LorakitError
from lorakit.options import (add_flags, finite_float, from_flags, parse_names, positive_float, positive_int,
                             seed_int)


def resolve_device(device: str | None):
    from lorakit.train.config import resolve_device as resolve

    return resolve(device)


def _add_train(sub) -> None:
    from lorakit.train.config import TrainConfig

    p = sub.add_parser("train", help="fine-tune a LoRA adapter", description="Fine-tune a LoRA adapter. "
                       "With no arguments: MiniLM on fresh-vs-rotten sentiment, 200 steps. Every option is a field of "
                       "lorakit.train.TrainConfig (the LoRA ones of its LoraConfig), with the same help.")
    add_flags(p, TrainConfig)
    processes = next(g for g in p._action_groups if g.title == "several processes (torch.distributed)")
    processes.add_argument("--nproc", type=positive_int, default=None,
                           help="train on N processes of this machine (torchrun; gloo on CPU, nccl on CUDA); --batch-size "
                                "is the global batch. On several machines run torchrun ... -m lorakit train instead")


def cmd_train(a: argparse.Namespace) -> int:
    from lorakit.train import TrainConfig, run
    from lorakit.train.trainer import held_out_change, launch_processes

    cfg = from_flags(TrainConfig, a)
    if a.nproc is not None:
        status = launch_processes(cfg, a.nproc, a.argv)
        if status is not None:
            return status
    report = run(cfg)
    if report.get("dry_run"):
        return 0 if report["plan"]["refusal"] is None else 1
    line = held_out_change(report)
    if line:
        print(line)
    return 0


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="evaluate an adapter on held-out data")
    p.add_argument("--adapter", required=True)
    p.add_argument("--model", default=None, help="default: the base model recorded in the adapter")
    p.add_argument("--data", default=None, help="default: the held-out rows of the training run (its run.json), else "
                   "the built-in set of the adapter's task; a file given here is evaluated whole")
    p.add_argument("--text-column", default=None, help="default: the training run's, else text")
    p.add_argument("--label-column", default=None, help="default: the training run's, else label")
    p.add_argument("--max-length", type=positive_int, default=None, help="default: the training run's")
    p.add_argument("--labels", type=lambda v: [x.strip() for x in v.split(",") if x.strip()], default=None,
                   help="label names in the order of the classifier's outputs, for an adapter that does not record "
                        "them (PEFT's, or save_adapter without labels): neg,pos")
    p.add_argument("--batch-size", type=positive_int, default=64)
    add_base_dtype(p)
    add_device(p)
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")


def cmd_eval(a: argparse.Namespace) -> int:
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


def _add_merge(sub) -> None:
    p = sub.add_parser("merge", help="merge an adapter into its base model and write a plain HF model directory")
    p.add_argument("--adapter", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--model", default=None, help="default: the base model recorded in the adapter")
    p.add_argument("--overwrite", action="store_true")
    add_device(p)


def cmd_merge(a: argparse.Namespace) -> int:
    from lorakit.train.apply import merge_adapter

    path = merge_adapter(a.adapter, a.out, model=a.model, overwrite=a.overwrite, device=resolve_device(a.device))
    print(f"wrote the merged model to {path}/ (loads with transformers' from_pretrained)")
    return 0


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="talk to a causal LM with its adapter (no merge needed)",
                       description="Text from the base model plus the adapter: the prompt in the chat template (the one "
                       "saved with the adapter, else the tokenizer's), the reply streamed as it is generated.")
    p.add_argument("--adapter", default=None, help="an adapter directory (without it: the --model alone)")
    p.add_argument("--model", default=None, help="default: the base model recorded in the adapter")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--prompt", default=None, help="one user turn; the reply is printed")
    what.add_argument("--chat", action="store_true", help="an interactive conversation (empty line or /exit ends it, "
                      "/reset forgets it)")
    p.add_argument("--system", default=None, help="a system turn put first")
    p.add_argument("--max-new-tokens", type=positive_int, default=128, help="at most the model's context length "
                   "(its position embeddings) less the prompt's tokens (default: 128)")
    p.add_argument("--temperature", type=finite_float(0), default=0.0, help="0: greedy (default); above 0: sampling")
    p.add_argument("--top-p", type=finite_float(0, 1, lo_open=True), default=None,
                   help="nucleus sampling: keep the most likely tokens up to this probability mass, in (0, 1] "
                   "(with --temperature > 0; default: 1)")
    p.add_argument("--seed", type=seed_int, default=None, help="for sampling (with --temperature > 0)")
    p.add_argument("--chat-template", default=None, metavar="FILE", help="a Jinja chat template (default: the "
                   "adapter's chat_template.jinja, else the tokenizer's)")
    p.add_argument("--raw", action="store_true", help="feed --prompt as it is, without the chat template (not with "
                   "--chat, --system or --chat-template)")
    add_base_dtype(p)
    add_device(p)


def cmd_generate(a: argparse.Namespace) -> int:
    from lorakit.errors import ConfigError
    from lorakit.train.apply import load_for_generation
    from lorakit.train.generate import chat_loop, check_sampling, generate

    if a.raw:  # checked before the model loads
        ignored = [flag for flag, on in (("--chat", a.chat), ("--system", a.system is not None),
                                         ("--chat-template", a.chat_template is not None)) if on]
        if ignored:
            raise ConfigError(f"--raw feeds --prompt as it is, without the chat template, so {' and '.join(ignored)} "
                              f"would do nothing; drop --raw or {' and '.join(ignored)}")
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


def _add_info(sub) -> None:
    p = sub.add_parser("info", help="what an adapter directory holds")
    p.add_argument("dir")


def cmd_info(a: argparse.Namespace) -> int:
    from lorakit.train.apply import describe

    print(describe(a.dir))
    return 0


def _add_norms(sub) -> None:
    p = sub.add_parser("norms", help="which side of the sqrt(log L) threshold each attention layer and head is on",
                       description="One forward pass on a few rows: per layer and head, max |entry| of X W_Q, X W_K, X W_V "
                       "(adapters included), the adapter's share, the max logit and its certified bound, against sqrt(log L).")
    p.add_argument("--model", default=None, help="builtin:minilm | builtin:smollm2 | a local model directory | a .gguf file (default: the adapter's base)")
    p.add_argument("--adapter", default=None, help="an adapter directory (ours or PEFT's)")
    p.add_argument("--data", default=None, help="default: the built-in set of the task")
    p.add_argument("--rows", type=positive_int, default=8)
    p.add_argument("--max-length", type=positive_int, default=None)
    p.add_argument("--attention", choices=["poly", "auto", "softmax1", "exact"], default=None,
                   help="measure with lorakit attention (shows its per-layer decision)")
    p.add_argument("--attention-tolerance", type=positive_float, default=1e-3,
                   help="with --attention auto: the error poly must stay under (as in lorakit train)")
    hidden_alias(p, "--tolerance", "attention_tolerance", positive_float)
    p.add_argument("--per-head", action="store_true", help="one row per head (default: per layer, worst head)")
    p.add_argument("--out", default="norms", help="directory for norms.json and norms.png")
    add_base_dtype(p)


def cmd_norms(a: argparse.Namespace) -> int:
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


def _add_rank_advice(sub) -> None:
    p = sub.add_parser("rank-advice", help="per-module LoRA ranks from the spectrum of a full fine-tuning's weight change",
                       description="From a fully fine-tuned checkpoint (--tuned) or a short full fine-tuning lorakit runs "
                       "itself (--data), the singular spectrum of each target module's weight change and the smallest "
                       "rank reaching --tol, or the best split of --budget parameters; prints a rank_pattern.")
    p.add_argument("--model", required=True, help="the base model: builtin:minilm | builtin:smollm2 | a local model directory | a .gguf file")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--tuned", help="a fully fine-tuned model directory of the same architecture")
    src.add_argument("--data", help="data for a short full fine-tuning run (builtin:rotten-tomatoes, FILE.csv, ...)")
    goal = p.add_mutually_exclusive_group(required=True)
    goal.add_argument("--tol", type=finite_float(0, 1, hi_open=True),
                      help="relative Frobenius error left per module, in [0, 1), e.g. 0.5")
    goal.add_argument("--budget", type=positive_int, help="adapter parameters to split across modules")
    p.add_argument("--targets", type=parse_names, default="all-linear")
    p.add_argument("--steps", type=positive_int, default=100, help="full fine-tuning steps with --data")
    p.add_argument("--lr", type=positive_float, default=1e-4, help="full fine-tuning learning rate with --data")
    p.add_argument("--out", default="rank-advice", help="directory for advice.json")
    add_base_dtype(p)


def cmd_rank_advice(a: argparse.Namespace) -> int:
    from pathlib import Path

    from lorakit.expressive import advice as ad
    from lorakit.files import check_output_dir

    check_output_dir(a.out)  # before the model loads and the fine-tuning runs
    if a.tuned:
        base, deltas = ad.tuned_deltas(a.model, a.tuned, a.targets, base_dtype=a.base_dtype)
    elif a.base_dtype not in ("auto", "fp32"):
        raise ConfigError(f"--base-dtype {a.base_dtype} with --data: the short full fine-tuning trains the target "
                          "weights themselves, in fp32; drop --base-dtype (or give --tuned)")
    else:
        base, deltas, after = ad.full_finetune_deltas(a.model, a.data, a.targets, steps=a.steps, lr=a.lr,
                                                      out=Path(a.out) / "full-finetune", budget=a.budget)
        print("full fine-tuning, held-out: " + ", ".join(f"{k.removeprefix('eval_')} {v:.4f}" for k, v in after.items()))
    advice = ad.advise(ad.spectra(base, deltas), tol=a.tol, budget=a.budget)
    print(advice.table())
    path = advice.to_json(Path(a.out) / "advice.json")
    print(f"wrote {path}; train with: lorakit train --targets ... --rank-pattern {path}")
    return 0


def _add_reproduce(sub) -> None:
    p = sub.add_parser("reproduce", help="reproduce a paper's claim (writes JSON/CSV and a PNG)")
    exp = p.add_subparsers(dest="experiment", metavar="EXPERIMENT", required=True)
    c = exp.add_parser("celora", help="exact LoRA vs CE-LoRA on MiniLM sentiment and SmolLM2/Hamlet")
    c.add_argument("--out", default="reproduce/celora")
    c.add_argument("--full", action="store_true", help="longer runs (400 / 200 steps)")
    c.add_argument("--parts", default="minilm,smollm2,errors", help="any of minilm, smollm2, errors")
    c.add_argument("--seeds", type=positive_int, default=None)
    c.add_argument("--minilm-steps", type=positive_int, default=None)
    c.add_argument("--smollm2-steps", type=positive_int, default=None)
    c.add_argument("--eval-limit", type=positive_int, default=None)
    c.add_argument("--rank", type=positive_int, default=8)
    add_base_dtype(c)


    pt = exp.add_parser("phase-transition", help="poly attention's gradient error against G / sqrt(log L), and its "
                        "time against exact attention (Hu et al. 2025)")
    pt.add_argument("--out", default="reproduce/phase-transition")
    pt.add_argument("--quick", action="store_true", help="a small grid (seconds), for a smoke test")
    ns = exp.add_parser("norm-speed", help="the paper's Table 1 at CPU scale: standard vs norm-controlled, three sizes, "
                        "time per epoch with attention auto")
    ns.add_argument("--out", default="reproduce/norm-speed")
    ns.add_argument("--quick", action="store_true", help="tiny models and short sequences, for a smoke test")
    ns.add_argument("--length", type=positive_int, default=None, help="tokens per sequence (default 4096)")
    ns.add_argument("--sequences", type=positive_int, default=None, help="sequences per epoch (default 8)")
    ns.add_argument("--epochs", type=positive_int, default=None)


    xp = exp.add_parser("expressive", help="the expressive power of LoRA on synthetic linear, ReLU and transformer "
                        "models: constructions vs gradient descent (Zeng & Lee 2024)")
    xp.add_argument("--experiment", dest="experiment_names", default="linear,fnn,flt,tfn,depth,bias",
                    help="comma-separated: linear, fnn, flt, tfn, depth, bias (default: all)")
    xp.add_argument("--out", default="reproduce/expressive")
    size = xp.add_mutually_exclusive_group()
    size.add_argument("--full", action="store_true", help="the paper's budget (5 seeds, 5000 epochs, full grid): hours on CPU")
    size.add_argument("--quick", action="store_true", help="D = 8, 2 seeds, 30 epochs: a smoke test")


def cmd_reproduce(a: argparse.Namespace) -> int:
    from lorakit.files import check_output_dir
    from lorakit.reproduce import with_overrides

    check_output_dir(a.out)  # a file, a dangling link or a read-only place: refused before minutes of work

    if a.experiment == "expressive":
        from lorakit.reproduce import expressive as rx

        budget = rx.Budget.full() if a.full else rx.Budget.quick() if a.quick else rx.Budget()
        rx.run(a.out, tuple(e.strip() for e in a.experiment_names.split(",") if e.strip()), budget)
        return 0
    if a.experiment in ("phase-transition", "norm-speed"):
        from lorakit.reproduce import limits as rl

        if a.experiment == "phase-transition":
            rl.phase_transition(a.out, rl.PhaseBudget.quick() if a.quick else rl.PhaseBudget())
        else:
            budget = with_overrides(rl.SpeedBudget.quick() if a.quick else rl.SpeedBudget(), length=a.length,
                                    sequences=a.sequences, epochs=a.epochs)
            rl.norm_speed(a.out, budget)
        return 0
    if a.experiment == "celora":
        from lorakit.reproduce import celora as rc

        budget = with_overrides(rc.Budget.full() if a.full else rc.Budget(), seeds=a.seeds, minilm_steps=a.minilm_steps,
                                smollm2_steps=a.smollm2_steps, eval_limit=a.eval_limit)
        parts = tuple(p.strip() for p in a.parts.split(",") if p.strip())
        unknown = set(parts) - {"minilm", "smollm2", "errors"}
        if unknown:
            raise LorakitError(f"--parts {sorted(unknown)} unknown; choose from minilm, smollm2, errors")
        rc.run(a.out, budget=budget, parts=parts, rank=a.rank, base_dtype=a.base_dtype)
    return 0


def _add_bench(sub) -> None:
    from lorakit.bench.versus_peft import BenchConfig

    p = sub.add_parser("bench", help="our training step against PEFT's: time, memory, FLOP/s, same run",
                       description="Time lorakit's training step against PEFT's on the same model, data, precision and "
                       "batch, alternating steps so machine drift cancels. Writes bench.json, bench.md and bench.png.")
    add_flags(p, BenchConfig)
    p.add_argument("--out", default="bench", help="directory for bench.json, bench.md and bench.png")


def _add_export(sub) -> None:
    from lorakit.export import ExportConfig

    p = sub.add_parser("export", help="write an adapter as GGUF for llama.cpp and Ollama (a LoRA file or the merged model)",
                       description="Write a fine-tune as GGUF: --format gguf-lora, a llama.cpp LoRA adapter for the base "
                       "GGUF (llama-cli -m base.gguf --lora adapter.gguf); --format gguf, the base with the adapter "
                       "merged (llama-cli -m model.gguf). --ollama adds a Modelfile.")
    add_flags(p, ExportConfig)


def cmd_export(a: argparse.Namespace) -> int:
    from dataclasses import asdict

    from lorakit.export import ExportConfig, export_gguf
    from lorakit.export.ollama import create_command

    cfg = asdict(from_flags(ExportConfig, a))
    written = export_gguf(cfg.pop("adapter"), cfg.pop("out"), **cfg)
    kind = "llama.cpp LoRA adapter" if cfg["format"] == "gguf-lora" else "merged model"
    print(f"wrote the {kind} to {written['gguf']}")
    if "modelfile" in written:
        print(f"wrote {written['modelfile']}; load it into Ollama with:\n  {create_command(written['modelfile'])}")
    return 0


def add_base_dtype(p: argparse.ArgumentParser) -> None:
    """--base-dtype, as ``lorakit train`` declares it (TrainConfig.base_dtype): the frozen base's storage."""
    from lorakit.train.config import TrainConfig
    from lorakit.train.precision import BASE_DTYPE_CHOICES

    p.add_argument("--base-dtype", choices=BASE_DTYPE_CHOICES, default="auto",
                   help=TrainConfig.__dataclass_fields__["base_dtype"].metadata["help"] + " (default: auto, fp32 when "
                   "the model fits in the memory available in fp32, else bf16)")


def add_device(p: argparse.ArgumentParser) -> None:
    """--device, as ``lorakit train`` declares it (TrainConfig.device): where the model runs."""
    from lorakit.train.config import TrainConfig

    field = TrainConfig.__dataclass_fields__["device"]
    p.add_argument("--device", default=None, help=f"{field.metadata['help']} (default: {field.metadata['default_text']})")


def hidden_alias(p: argparse.ArgumentParser, spelling: str, dest: str, kind: type) -> None:
    """An older spelling of an option, still accepted, not shown in --help."""
    p.add_argument(spelling, dest=dest, type=kind, default=argparse.SUPPRESS, help=argparse.SUPPRESS)


def cmd_bench(a: argparse.Namespace) -> int:
    from lorakit.bench import versus_peft as vp

    cfg = from_flags(vp.BenchConfig, a)
    report = vp.run(cfg, progress=lambda m: print(m, file=sys.stderr, flush=True))
    paths = vp.write(report, a.out)
    print(vp.markdown(report))
    print(f"wrote {paths['json']}, {paths['markdown']}, {paths['png']}")
    return 0


COMMANDS: dict[str, tuple[Callable, Callable]] = {
    "train": (_add_train, cmd_train),
    "eval": (_add_eval, cmd_eval),
    "merge": (_add_merge, cmd_merge),
    "export": (_add_export, cmd_export),
    "generate": (_add_generate, cmd_generate),
    "info": (_add_info, cmd_info),
    "norms": (_add_norms, cmd_norms),
    "rank-advice": (_add_rank_advice, cmd_rank_advice),
    "reproduce": (_add_reproduce, cmd_reproduce),
    "bench": (_add_bench, cmd_bench),
}


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors as one `lorakit: error:` line (the usage is one `lorakit COMMAND --help` away)."""

    def error(self, message: str):
        self.exit(2, f"lorakit: error: {message} (see: {self.prog} --help)\n")


def parser() -> argparse.ArgumentParser:
    p = _Parser(prog="lorakit", description="Fast LoRA fine-tuning that tells you what your adapters can and cannot do.")
    from lorakit import __version__

    p.add_argument("--version", action="version", version=f"lorakit {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for add, _ in COMMANDS.values():
        add(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser().parse_args(argv)
    args.argv = argv[argv.index(args.command) + 1 :] if args.command in argv else []
    if args.command is None:
        parser().print_help()
        return 2
    try:
        return COMMANDS[args.command][1](args)
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
