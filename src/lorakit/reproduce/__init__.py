"""Reproductions of the papers' claims: each runs an experiment and writes JSON/CSV and a PNG."""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path
from typing import Any

from dataclasses import dataclass

from lorakit.errors import LorakitError
from lorakit.files import write_atomic
from lorakit.options import option


def with_overrides(budget: Any, **values: int | None) -> Any:
    """``budget`` (a dataclass) with the values given (not None) in place of its own; each a positive integer,
    named as its command-line flag in the error."""
    given = {k: v for k, v in values.items() if v is not None}
    for name, value in given.items():
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise LorakitError(f"--{name.replace('_', '-')} {value} must be a positive integer")
    return dataclasses.replace(budget, **given)


@dataclass
class BudgetOptions:
    """How much of a paper's experiment a ``lorakit reproduce`` command runs (each takes the ones it has)."""

    full: bool = option(False, "the paper's budget: longer runs (celora: 400 / 200 steps; expressive: 5 seeds, 5000 "
                        "epochs, the full grid, hours on CPU)", exclusive="budget", section="budget")
    quick: bool = option(False, "a small budget (tiny models, short runs, seconds), for a smoke test", exclusive="budget",
                         section="budget")


def write_csv(path: str | Path, rows: list[dict[str, Any]]) -> None:
    """Rows of one shape as CSV (header from the first row), written atomically; nothing for no rows."""
    if not rows:
        return

    def write(tmp):
        with open(tmp, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)

    write_atomic(Path(path), write)
