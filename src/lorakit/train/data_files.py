"""Reading data files: CSV, JSONL and Parquet rows (plain, gzip or bz2), plain text; each refusal names the file
and the row. Nothing here tokenises (``data_rows``) or decides a split (``data``)."""

from __future__ import annotations

import bz2
import csv
import gzip
import io
import json
import sys
import zlib
from pathlib import Path
from typing import Any

from lorakit.errors import DataError

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


def _kind_or_error(path: Path) -> str:
    _check_file(path)
    return _kind(path)
