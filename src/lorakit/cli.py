"""The ``lorakit`` command: parses arguments, calls the library, prints. No logic of its own.

    lorakit train [--model ...] [--data ...] [...]    fine-tune (no arguments: MiniLM on sentiment)
    lorakit eval  --adapter DIR [--model ...] [--data ...]
    lorakit merge --adapter DIR --out DIR [--model ...]
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


def _targets(value: str) -> str | list[str]:
    """A preset or regex stays a string; "a,b,c" becomes a list of names."""
    return [v.strip() for v in value.split(",") if v.strip()] if "," in value else value


def _keep_ratio(value: str) -> float | dict[str, float]:
    """0.6, or "v_proj=0.55,down_proj=0.65"."""
    try:
        if "=" not in value:
            return float(value)
        pairs = (item.split("=", 1) for item in value.split(",") if item.strip())
        return {k.strip(): float(v) for k, v in pairs}
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is neither a number nor name=ratio pairs (v_proj=0.55,o_proj=0.55)") from None


def _svd_rank(value: str) -> int | str:
    if value == "balanced":
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is neither an integer nor 'balanced'") from None


def _layers(value: str) -> list[int]:
    """"0-5", "0,2,4" or "0-3,8" -> the sorted layer indices."""
    out: set[int] = set()
    try:
        for part in (p.strip() for p in value.split(",")):
            first, dash, last = part.partition("-")
            lo, hi = int(first), int(last) if dash else int(first)
            if lo < 0 or hi < lo:
                raise ValueError
            out.update(range(lo, hi + 1))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a list of layer indices; use e.g. 0-5 or 0,2,4 or 0-3,8") from None
    return sorted(out)


def _rank_pattern(value: str) -> dict[str, int]:
    from pathlib import Path

    if value.endswith(".json") or Path(value).is_file():
        try:
            doc = json.loads(Path(value).read_text())
        except (OSError, ValueError, RecursionError) as exc:
            raise argparse.ArgumentTypeError(f"cannot read {value}: {type(exc).__name__}: {str(exc)[:100]}") from None
        doc = doc.get("rank_pattern", doc) if isinstance(doc, dict) else doc
        if not isinstance(doc, dict) or not all(isinstance(v, int) and not isinstance(v, bool) for v in doc.values()):
            raise argparse.ArgumentTypeError(f"{value}: expected {{module: rank}} or an object with a rank_pattern")
        return doc
    out = {}
    for part in value.split(","):
        name, _, r = part.partition("=")
        if not name or not r.strip().isdigit():
            raise argparse.ArgumentTypeError(f"--rank-pattern {value!r}: use name=r,name=r or a JSON file")
        out[name.strip()] = int(r)
    return out


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="fine-tune a LoRA adapter", description="Fine-tune a LoRA adapter. "
                       "With no arguments: MiniLM on fresh-vs-rotten sentiment, 200 steps.")
    p.add_argument("--model", default="builtin:minilm", help="builtin:minilm | builtin:smollm2 | a local model directory | a .gguf file")
    p.add_argument("--data", default=None, help="builtin:rotten-tomatoes | builtin:hamlet | FILE.csv | FILE.jsonl | FILE.parquet | FILE.txt "
                   "(default: rotten-tomatoes for an encoder, hamlet for builtin:smollm2)")
    p.add_argument("--eval-data", default=None, help="a held-out file (default: a fixed 10%% of --data)")
    p.add_argument("--task", choices=["classify", "causal-lm"], default=None, help="default: inferred from the data")
    p.add_argument("--text-column", default="text")
    p.add_argument("--label-column", default="label")
    p.add_argument("--skip-bad-rows", action="store_true", help="skip malformed data rows (counted in the report) instead of stopping")
    p.add_argument("--loss-on", choices=["assistant", "all"], default="assistant",
                   help="conversations (\"messages\" rows): the loss on assistant turns (default) or on every token; "
                        "prompt/response rows: on the response or on every token")
    p.add_argument("--chat-template", default=None, metavar="FILE",
                   help="a Jinja chat template for conversational data, replacing the tokenizer's (needed when it has "
                        "none, e.g. examples/chat_templates/gemma3.jinja for the Gemma 3 GGUF)")
    p.add_argument("--packing", action=argparse.BooleanOptionalAction, default=None,
                   help="causal LM: pack several rows into each sequence of --max-length tokens, no attention across "
                        "rows (default: on where a check shows the model keeps packed rows apart exactly)")
    p.add_argument("--targets", type=_targets, default="attn-qv", help="attn-qv | attn-qkv | all-linear | a regex | comma-separated names")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--rank-pattern", type=_rank_pattern, default=None,
                   help="per-module ranks: a JSON file (rank-advice's advice.json or {module: rank}) or name=r,name=r")
    p.add_argument("--layers", type=_layers, default=None,
                   help="adapt the targets in these blocks only: 0-5, 0,2,4 (PEFT's layers_to_transform)")
    p.add_argument("--layers-pattern", default=None,
                   help="the name of the block list the --layers index (layers, layer, h, ...; default: the first "
                        "numbered segment of a module's path)")
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--rslora", action="store_true", help="scale by alpha/sqrt(r) instead of alpha/r")
    p.add_argument("--dora", action="store_true", help="DoRA: also train a magnitude per output feature, "
                   "W' = m (W0 + s B A) / ||W0 + s B A||_row (Liu et al. 2024; PEFT's use_dora)")
    p.add_argument("--init", choices=["kaiming", "gaussian", "pissa"], default="kaiming")
    ce = p.add_argument_group("CE-LoRA (approximate frozen-weight backward)")
    ce.add_argument("--backward", choices=["exact", "celora"], default="exact")
    ce.add_argument("--keep-ratio", type=_keep_ratio, default=None,
                    help="kept output features: one number (all but query/key/gate) or v_proj=0.55,down_proj=0.65 "
                         "(default: the architecture's preset)")
    ce.add_argument("--refresh-every", type=int, default=200, help="optimizer steps between feature re-selections")
    ce.add_argument("--svd-rank", type=_svd_rank, default=None, help="Double-LoRA rank r0: an integer (0 = none) or "
                    "'balanced' (default: the adapter rank)")
    ce.add_argument("--selection", choices=["score", "weight", "sample"], default="score")
    lim = p.add_argument_group("computational limits (attention norms)")
    lim.add_argument("--attention", choices=["poly", "auto", "softmax1", "exact"], default=None,
                     help="lorakit attention: auto = polynomial where the certified logit bound allows it (default: the model's own)")
    lim.add_argument("--attention-tolerance", type=float, default=1e-3,
                     help="allowed attention-output error relative to max|v| for poly/auto")
    lim.add_argument("--norm-cap", type=float, default=None, help="clip the spectral norm of (alpha/r) B A after every step")
    lim.add_argument("--norm-every", type=int, default=None,
                     help="measure the attention norms every N steps (metrics.jsonl, norms.png)")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=int, default=None)
    length.add_argument("--steps", type=int, default=None, help="optimizer steps (default 200 when --epochs is not given)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--lr", type=float, default=None, help="default 2e-3 for classify, 2e-4 for causal-lm")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--warmup", type=float, default=0.06, help="a fraction of the steps (< 1) or a step count")
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--max-length", type=int, default=None, help="tokens per row (default 128 classify, 256 causal-lm)")
    p.add_argument("--bf16", action="store_true",
                   help="bf16 training: frozen weights stored in bf16, adapters and optimizer in fp32 (CPU); bf16 autocast on GPU")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-every", type=int, default=None, help="evaluate every N steps (default: four times per run)")
    p.add_argument("--eval-limit", type=int, default=None, help="evaluate on the first N held-out rows only")
    p.add_argument("--save-every", type=int, default=100, help="checkpoint every N steps")
    p.add_argument("--log-every", type=int, default=10, help="log the training loss every N steps (metrics.jsonl)")
    p.add_argument("--max-bad-steps", type=int, default=5,
                   help="stop after this many steps in a row with a non-finite loss or gradient (each is skipped)")
    p.add_argument("--out", default="out")
    p.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint in OUT/checkpoints "
                   "(refused if it was written with other options, another model or other data)")
    p.add_argument("--overwrite", action="store_true", help="replace a previous run in OUT (its adapter, metrics.jsonl, "
                   "plots, run.json and checkpoints; other files there stay). Without it a non-empty OUT is refused")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when present)")
    dp = p.add_argument_group("several processes (torch.distributed)")
    dp.add_argument("--nproc", type=int, default=None,
                    help="train on N processes of this machine (torchrun; gloo on CPU, nccl on CUDA); --batch-size is the "
                         "global batch. On several machines run torchrun ... -m lorakit train instead")
    dp.add_argument("--shard", action="store_true",
                    help="FSDP2: split the frozen base across the processes (for a model too big for one process)")


def cmd_train(a: argparse.Namespace) -> int:
    from lorakit.train import TrainConfig, distributed, run
    from lorakit.train.trainer import check_output
    from lorakit.train.models import builtin_default_task

    data = a.data
    if data is None:
        data = "builtin:hamlet" if (a.task or builtin_default_task(a.model)) == "causal-lm" else "builtin:rotten-tomatoes"
    cfg = TrainConfig(
        model=a.model, data=data, task=a.task, eval_data=a.eval_data, text_column=a.text_column, label_column=a.label_column,
        skip_bad_rows=a.skip_bad_rows, loss_on=a.loss_on, chat_template=a.chat_template, packing=a.packing, targets=a.targets, rank=a.rank, alpha=a.alpha, dropout=a.dropout, rslora=a.rslora, dora=a.dora,
        init=a.init, rank_pattern=a.rank_pattern, layers=a.layers, layers_pattern=a.layers_pattern, backward=a.backward, keep_ratio=a.keep_ratio, refresh_every=a.refresh_every, svd_rank=a.svd_rank,
        selection=a.selection, norm_cap=a.norm_cap, attention=a.attention, attention_tolerance=a.attention_tolerance,
        norm_every=a.norm_every, epochs=a.epochs, steps=a.steps, batch_size=a.batch_size, grad_accum=a.grad_accum, lr=a.lr,
        weight_decay=a.weight_decay, warmup=a.warmup, max_grad_norm=a.max_grad_norm, max_length=a.max_length, bf16=a.bf16,
        seed=a.seed, eval_every=a.eval_every, eval_limit=a.eval_limit, save_every=a.save_every, max_bad_steps=a.max_bad_steps,
        log_every=a.log_every, out=a.out, resume=a.resume, overwrite=a.overwrite, quiet=a.quiet, device=a.device, shard=a.shard,
    )
    if a.nproc is not None and not distributed.launched_by_torchrun():
        if a.nproc < 1:
            raise ConfigError(f"--nproc {a.nproc} must be >= 1")
        cfg.validate()  # bad options fail here, once, before any process starts
        check_output(cfg)
        distributed.rank_batch_size(cfg.batch_size, distributed.Dist(world=a.nproc))
        if a.nproc > 1:
            return distributed.launch(a.nproc, _without_nproc(a.argv))
    report = run(cfg)
    result = report["result"]
    if "after" in result and int(os.environ.get("RANK", "0")) == 0:
        before, after = result.get("before", {}), result["after"]
        key = "eval_accuracy" if "eval_accuracy" in after else "eval_loss"
        if key in before:
            print(f"held-out {key.removeprefix('eval_')}: {before[key]:.4f} -> {after[key]:.4f}")
        else:
            print(f"held-out {key.removeprefix('eval_')}: {after[key]:.4f}")
    return 0


def _without_nproc(argv: list[str]) -> list[str]:
    """The train arguments minus --nproc (torchrun's workers must not launch again)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            out.append(arg)
    return out


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="evaluate an adapter on held-out data")
    p.add_argument("--adapter", required=True)
    p.add_argument("--model", default=None, help="default: the base model recorded in the adapter")
    p.add_argument("--data", default=None, help="default: the held-out rows of the training run (its run.json), else "
                   "the built-in set of the adapter's task; a file given here is evaluated whole")
    p.add_argument("--text-column", default=None, help="default: the training run's, else text")
    p.add_argument("--label-column", default=None, help="default: the training run's, else label")
    p.add_argument("--max-length", type=int, default=None, help="default: the training run's")
    p.add_argument("--labels", type=lambda v: [x.strip() for x in v.split(",") if x.strip()], default=None,
                   help="label names in the order of the classifier's outputs, for an adapter that does not record "
                        "them (PEFT's, or save_adapter without labels): neg,pos")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")


def cmd_eval(a: argparse.Namespace) -> int:
    from lorakit.train.apply import evaluate_adapter

    res = evaluate_adapter(a.adapter, a.data, model=a.model, max_length=a.max_length, batch_size=a.batch_size,
                           text_column=a.text_column, label_column=a.label_column, labels=a.labels)
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


def cmd_merge(a: argparse.Namespace) -> int:
    from lorakit.train.apply import merge_adapter

    path = merge_adapter(a.adapter, a.out, model=a.model, overwrite=a.overwrite)
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
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default); above 0: sampling")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: keep the most likely tokens up to this "
                   "probability mass (with --temperature > 0)")
    p.add_argument("--seed", type=int, default=None, help="for sampling")
    p.add_argument("--chat-template", default=None, metavar="FILE", help="a Jinja chat template (default: the "
                   "adapter's chat_template.jinja, else the tokenizer's)")
    p.add_argument("--raw", action="store_true", help="feed --prompt as it is, without the chat template")


def cmd_generate(a: argparse.Namespace) -> int:
    from lorakit.train.apply import load_for_generation
    from lorakit.train.generate import chat_loop, generate

    loaded = load_for_generation(a.adapter, a.model, chat_template=a.chat_template)
    options = dict(max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_p=a.top_p, seed=a.seed)
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
    p.add_argument("--rows", type=int, default=8)
    p.add_argument("--max-length", type=int, default=None)
    p.add_argument("--attention", choices=["poly", "auto", "softmax1", "exact"], default=None,
                   help="measure with lorakit attention (shows its per-layer decision)")
    p.add_argument("--attention-tolerance", type=float, default=1e-3,
                   help="with --attention auto: the error poly must stay under (as in lorakit train)")
    hidden_alias(p, "--tolerance", "attention_tolerance", float)
    p.add_argument("--per-head", action="store_true", help="one row per head (default: per layer, worst head)")
    p.add_argument("--out", default="norms", help="directory for norms.json and norms.png")


def cmd_norms(a: argparse.Namespace) -> int:
    from lorakit.files import check_output_dir
    from lorakit.train.apply import model_norms

    out = check_output_dir(a.out)  # before the model loads

    report = model_norms(a.model, a.adapter, a.data, rows=a.rows, max_length=a.max_length, attention=a.attention,
                         tolerance=a.attention_tolerance)
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
    goal.add_argument("--tol", type=float, help="relative Frobenius error left per module, e.g. 0.5")
    goal.add_argument("--budget", type=int, help="adapter parameters to split across modules")
    p.add_argument("--targets", type=_targets, default="all-linear")
    p.add_argument("--steps", type=int, default=100, help="full fine-tuning steps with --data")
    p.add_argument("--lr", type=float, default=1e-4, help="full fine-tuning learning rate with --data")
    p.add_argument("--out", default="rank-advice", help="directory for advice.json")


def cmd_rank_advice(a: argparse.Namespace) -> int:
    from pathlib import Path

    from lorakit.expressive import advice as ad
    from lorakit.files import check_output_dir

    check_output_dir(a.out)  # before the model loads and the fine-tuning runs
    if a.tuned:
        base, deltas = ad.tuned_deltas(a.model, a.tuned, a.targets)
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
    c.add_argument("--seeds", type=int, default=None)
    c.add_argument("--minilm-steps", type=int, default=None)
    c.add_argument("--smollm2-steps", type=int, default=None)
    c.add_argument("--eval-limit", type=int, default=None)
    c.add_argument("--rank", type=int, default=8)


    pt = exp.add_parser("phase-transition", help="poly attention's gradient error against G / sqrt(log L), and its "
                        "time against exact attention (Hu et al. 2025)")
    pt.add_argument("--out", default="reproduce/phase-transition")
    pt.add_argument("--quick", action="store_true", help="a small grid (seconds), for a smoke test")
    ns = exp.add_parser("norm-speed", help="the paper's Table 1 at CPU scale: standard vs norm-controlled, three sizes, "
                        "time per epoch with attention auto")
    ns.add_argument("--out", default="reproduce/norm-speed")
    ns.add_argument("--quick", action="store_true", help="tiny models and short sequences, for a smoke test")
    ns.add_argument("--length", type=int, default=None, help="tokens per sequence (default 4096)")
    ns.add_argument("--sequences", type=int, default=None, help="sequences per epoch (default 8)")
    ns.add_argument("--epochs", type=int, default=None)


    xp = exp.add_parser("expressive", help="the expressive power of LoRA on synthetic linear, ReLU and transformer "
                        "models: constructions vs gradient descent (Zeng & Lee 2024)")
    xp.add_argument("--experiment", dest="experiment_names", default="linear,fnn,flt,tfn,depth,bias",
                    help="comma-separated: linear, fnn, flt, tfn, depth, bias (default: all)")
    xp.add_argument("--out", default="reproduce/expressive")
    size = xp.add_mutually_exclusive_group()
    size.add_argument("--full", action="store_true", help="the paper's budget (5 seeds, 5000 epochs, full grid): hours on CPU")
    size.add_argument("--quick", action="store_true", help="D = 8, 2 seeds, 30 epochs: a smoke test")


def cmd_reproduce(a: argparse.Namespace) -> int:
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
            budget = rl.SpeedBudget.quick() if a.quick else rl.SpeedBudget()
            for name in ("length", "sequences", "epochs"):
                value = getattr(a, name)
                if value is not None:
                    if value <= 0:
                        raise LorakitError(f"--{name} {value} must be positive")
                    setattr(budget, name, value)
            rl.norm_speed(a.out, budget)
        return 0
    if a.experiment == "celora":
        from lorakit.reproduce import celora as rc

        budget = rc.Budget.full() if a.full else rc.Budget()
        for field, value in (("seeds", a.seeds), ("minilm_steps", a.minilm_steps), ("smollm2_steps", a.smollm2_steps),
                             ("eval_limit", a.eval_limit)):
            if value is not None:
                setattr(budget, field, value)
        parts = tuple(p.strip() for p in a.parts.split(",") if p.strip())
        unknown = set(parts) - {"minilm", "smollm2", "errors"}
        if unknown:
            raise LorakitError(f"--parts {sorted(unknown)} unknown; choose from minilm, smollm2, errors")
        rc.run(a.out, budget=budget, parts=parts, rank=a.rank)
    return 0


def _add_bench(sub) -> None:
    p = sub.add_parser("bench", help="our training step against PEFT's: time, memory, FLOP/s, same run",
                       description="Time lorakit's training step against PEFT's on the same model, data, precision and "
                       "batch, alternating steps so machine drift cancels. Writes bench.json, bench.md and bench.png.")
    p.add_argument("--model", default="builtin:smollm2", help="builtin:minilm, builtin:smollm2 or a model directory")
    p.add_argument("--task", choices=("causal-lm", "classify"), default=None, help="default: the model's kind")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-length", type=int, default=256, help="tokens per row (every row is full)")
    p.add_argument("--steps", type=int, default=20, help="measured steps per contender")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--modes", default="exact,bf16", help="comma-separated: exact, bf16, celora, poly, dora (DoRA against PEFT DoRA)")
    p.add_argument("--against", default="peft")
    p.add_argument("--rank", dest="r", type=int, default=16, help="LoRA rank r (as in lorakit train)")
    hidden_alias(p, "--r", "r", int)
    p.add_argument("--alpha", type=float, default=32.0)
    p.add_argument("--targets", type=_targets, default="all-linear")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--quality-steps", type=int, default=50,
                   help="bf16 mode: held-out loss after this many bf16 and fp32 steps (0 skips it)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory probes (one fresh process each)")
    p.add_argument("--caller", choices=vp_callers(), default="loop",
                   help="who calls the model, for both contenders: loop (own loop), lorakit (lorakit train's engine), "
                   "hf-trainer (HF Trainer's training_step)")
    p.add_argument("--model-dropout", type=float, default=None, help="set every dropout of the base model to this p")
    p.add_argument("--out", default="bench")


def hidden_alias(p: argparse.ArgumentParser, spelling: str, dest: str, kind: type) -> None:
    """An older spelling of an option, still accepted, not shown in --help."""
    p.add_argument(spelling, dest=dest, type=kind, default=argparse.SUPPRESS, help=argparse.SUPPRESS)


def vp_callers() -> tuple[str, ...]:
    from lorakit.bench.versus_peft import CALLERS

    return CALLERS


def cmd_bench(a: argparse.Namespace) -> int:
    from lorakit.bench import versus_peft as vp

    cfg = vp.BenchConfig(model=a.model, task=a.task, batch_size=a.batch_size, max_length=a.max_length, steps=a.steps,
                         warmup=a.warmup, modes=tuple(m.strip() for m in a.modes.split(",") if m.strip()),
                         against=a.against, r=a.r, alpha=a.alpha, targets=a.targets, lr=a.lr,
                         quality_steps=a.quality_steps, memory=not a.no_memory, caller=a.caller,
                         model_dropout=a.model_dropout)
    report = vp.run(cfg, progress=lambda m: print(m, file=sys.stderr, flush=True))
    paths = vp.write(report, a.out)
    print(vp.markdown(report))
    print(f"wrote {paths['json']}, {paths['markdown']}, {paths['png']}")
    return 0


COMMANDS: dict[str, tuple[Callable, Callable]] = {
    "train": (_add_train, cmd_train),
    "eval": (_add_eval, cmd_eval),
    "merge": (_add_merge, cmd_merge),
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
