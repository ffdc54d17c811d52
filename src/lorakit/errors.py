"""Errors lorakit raises on bad input.

Every error names the bad value, what was expected and how to fix it. The command line
prints the message of a ``LorakitError`` without a traceback and exits with status 2.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class LorakitError(Exception):
    """Base class: a problem with the user's input, files or configuration."""


class ConfigError(LorakitError, ValueError):
    """A configuration value is out of range or inconsistent."""


class TargetError(ConfigError):
    """Target modules could not be resolved on this model."""


class AdapterFileError(LorakitError):
    """An adapter directory or file is missing, corrupt, or does not fit the model."""


class DataError(LorakitError):
    """A data file is missing, empty, malformed, or lacks a required column."""


class ModelError(LorakitError):
    """A model could not be found or loaded."""


class ExportError(LorakitError):
    """An adapter or model cannot be written in the asked format (what the format cannot carry, a bad output path)."""


class TrainingError(LorakitError):
    """Training cannot go on (for example, non-finite losses step after step)."""


def closest(name: str, candidates: Iterable[str], n: int = 5) -> str:
    """A short, human-readable list of the candidates closest to ``name`` (for error messages)."""
    pool = sorted(set(candidates))
    best = difflib.get_close_matches(name, pool, n=n, cutoff=0.3)
    if not best:
        best = pool[:n]
    return ", ".join(repr(b) for b in best) if best else "(none)"
