"""Reproductions of the papers' claims: each runs an experiment and writes JSON/CSV and a PNG."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from lorakit.files import write_atomic


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
