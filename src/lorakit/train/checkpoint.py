"""Training checkpoints that are complete or absent, never half-written.

Layout: ``<out>/checkpoints/step-000100/`` holding the adapter (raw, PEFT format), the
trainer state (optimizer, scheduler, RNG states, position in the data) and
``manifest.json`` with the SHA-256 of every file. A checkpoint is written into a temporary
directory, every file fsynced, the manifest written last, then the directory renamed into
place and its parent fsynced. ``latest`` picks the newest checkpoint whose manifest and
checksums verify, and says which ones it skipped.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lorakit.errors import LorakitError
from lorakit.files import write_directory

MANIFEST = "manifest.json"
STATE = "trainer_state.pt"
PREFIX = "step-"


class CheckpointError(LorakitError):
    """A checkpoint could not be written, or none usable could be found."""


@dataclass
class Found:
    path: Path
    step: int
    skipped: list[str]  # newer checkpoints that failed verification, with the reason


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fingerprint_model(model: torch.nn.Module) -> str:
    """SHA-256 over every tensor's name, shape, dtype and 257 evenly spaced values: the same base model
    gives the same fingerprint, another one (weights, architecture, dtype) a different one, in milliseconds."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        flat = t.detach().reshape(-1)
        if flat.numel() and flat.device.type != "meta":
            h.update(flat[:: max(1, flat.numel() // 257)][:257].float().cpu().numpy().tobytes())
    return h.hexdigest()


def fingerprint_rows(rows: list[dict[str, Any]]) -> str:
    """SHA-256 of tokenised training rows (their token ids and labels, in order)."""
    h = hashlib.sha256()
    for row in rows:
        h.update(json.dumps([row["input_ids"], row["labels"]]).encode())
    return h.hexdigest()


def rng_state() -> dict[str, Any]:
    """Every RNG a training step may draw from, in a form torch.load(weights_only=True) accepts."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *map(float, np_state[2:])],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, *rest = state["python"]
    random.setstate((version, tuple(rest[0]), rest[1]) if isinstance(rest[0], list) else state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), float(cached)))
    if "cuda" in state and torch.cuda.is_available():
        # One state per GPU the checkpoint's process saw; a resume on fewer GPUs (N -> M processes) restores those
        # it has. Each process draws from its own device's generator, so device i's state is all it needs.
        for index, cuda_state in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, index)


def write(root: Path, step: int, write_files) -> Path:
    """Write checkpoint ``step`` under ``root`` atomically; ``write_files(tmp_dir)`` fills it.

    On any failure (disk full, permission) the temporary directory is removed, earlier
    checkpoints are untouched, and CheckpointError says what failed (lorakit.files.write_directory).
    """
    final = Path(root) / f"{PREFIX}{step:06d}"

    def fill(tmp: Path) -> None:
        write_files(tmp)
        files = {f.name: {"sha256": sha256(f), "bytes": f.stat().st_size} for f in sorted(tmp.iterdir())}
        (tmp / MANIFEST).write_text(json.dumps({"step": step, "files": files}, indent=2, sort_keys=True))

    try:  # the manifest is written last; re-running a step replaces the old directory whole
        return write_directory(final, fill, replace=True)
    except LorakitError as exc:  # OutputError, or the adapter's own save failing the same way
        raise CheckpointError(f"cannot write checkpoint {final}: {exc}; earlier checkpoints are untouched") from None


def verify(path: Path) -> str | None:
    """None if the checkpoint at ``path`` is complete and intact, else the reason it is not."""
    manifest = path / MANIFEST
    if not manifest.is_file():
        return "no manifest (interrupted while writing)"
    try:
        doc = json.loads(manifest.read_text())
        files = doc["files"]
    except (ValueError, KeyError, TypeError):
        return "unreadable manifest"
    for name, meta in files.items():
        f = path / name
        if not f.is_file():
            return f"{name} missing"
        if f.stat().st_size != meta.get("bytes") or sha256(f) != meta.get("sha256"):
            return f"{name} does not match its checksum"
    return None


def step_of(path: Path) -> int | None:
    name = path.name
    if not name.startswith(PREFIX):
        return None
    try:
        return int(name[len(PREFIX):])
    except ValueError:
        return None


def latest(root: Path) -> Found | None:
    """The newest complete checkpoint under ``root`` (None if there is none at all)."""
    root = Path(root)
    if not root.is_dir():
        return None
    candidates = sorted(((step_of(p), p) for p in root.iterdir() if p.is_dir() and step_of(p) is not None), reverse=True)
    skipped = []
    for step, path in candidates:
        reason = verify(path)
        if reason is None:
            return Found(path, step, skipped)
        skipped.append(f"{path.name}: {reason}")
    if skipped:
        raise CheckpointError(f"no complete checkpoint under {root}; found only damaged ones: {'; '.join(skipped)}")
    return None


def prune(root: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` complete checkpoints, and stale temporary directories."""
    root = Path(root)
    if not root.is_dir():
        return
    complete = sorted((step_of(p), p) for p in root.iterdir() if p.is_dir() and step_of(p) is not None and verify(p) is None)
    for _, path in complete[: max(0, len(complete) - keep)]:
        shutil.rmtree(path, ignore_errors=True)
    for p in root.iterdir():
        if p.name.startswith(".") and (p.name.endswith(".tmp") or p.name.endswith(".old")) and p.is_dir():
            shutil.rmtree(p, ignore_errors=True)


def load_state(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path / STATE, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch.load raises many types for a damaged file
        raise CheckpointError(f"{path / STATE} could not be read ({exc})") from None
