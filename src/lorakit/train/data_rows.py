"""Tokenising rows: classification texts, text blocks, prompt/response rows, conversations (``chat``); which rows are
malformed, and --skip-bad-rows. Rows are plain dicts: {"input_ids": [...], "labels": int} for classification and
{"input_ids": [...], "labels": [...]} (-100 where no loss) for causal LM."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lorakit.errors import DataError
from lorakit.kernels.linear_cross_entropy import IGNORE_INDEX
from lorakit.train.chat import ChatRows, is_chat_row, preview

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


# many parameters: the rows, their file, the text columns and the present ones, then how to treat a bad row
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


def _all_skipped(kept, path: Path, skipped: int, first: str) -> None:
    """Refuse a file whose every row was skipped as malformed, with the first one's error."""
    if not kept and skipped:
        raise DataError(f"{path}: no usable rows: every row was skipped as malformed ({skipped} in all); the first: "
                        f"{first}")
