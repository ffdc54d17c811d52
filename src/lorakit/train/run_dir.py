"""The run directory (``--out``): which files are a run's, when lorakit train may write there, and how
``--overwrite`` replaces a previous run without losing it on a failure.

``--overwrite`` moves the previous run's files (``RUN_FILES`` and ``checkpoints/step-*``) aside into
``<out>/.lorakit-replaced/`` instead of deleting them. They are deleted once the new run has finished;
if it fails before writing a checkpoint of its own (a bad data row, a rank that does not fit, Ctrl-C),
its partial files go and the previous run's come back, so a run that never started never costs the old
one. A run killed outright (SIGKILL, power) leaves the folder; the next ``lorakit train`` on that
``--out`` settles it by the same rule before anything else. Files the run reads (``--data``,
``--chat-template`` ...) are never moved or deleted, and no other file in ``--out`` is touched.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from lorakit.options import flatten, spelling
from lorakit.files import OutputError, OutputLock, check_output_dir, entries, fsync_dir
from lorakit.train import checkpoint as ckpt
from lorakit.train.chat import CHAT_TEMPLATE_FILE
from lorakit.train.config import TrainConfig

# What a run writes into --out, besides checkpoints/step-*: --overwrite replaces exactly these (the README's
# "What lorakit writes, deletes and refuses" lists them from here; a test holds the two lists together).
RUN_FILES = ("adapter_config.json", "adapter_model.safetensors", "metrics.jsonl", "run.json", "training.png", "norms.png",
             CHAT_TEMPLATE_FILE)
CHECKPOINTS = "checkpoints"
REPLACED = ".lorakit-replaced"  # the previous run's files while the new one has not finished


def _held(out: Path) -> list[str]:
    return [name for name in entries(out) if name != REPLACED]


def _inputs(cfg: TrainConfig) -> dict[Path, str]:
    """{resolved path: flag} of every file or folder the run reads (any string option naming an existing path)."""
    found: dict[Path, str] = {}
    for name, value in flatten(TrainConfig, cfg.to_dict()).items():
        for item in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(item, str) and item and not item.startswith("builtin:") and name != "out":
                p = Path(item).expanduser()
                with contextlib.suppress(OSError, ValueError):
                    if p.exists():
                        found[p.resolve()] = spelling(TrainConfig, name)
    return found


def check_output(cfg: TrainConfig) -> Path:
    """Refuse an --out that cannot hold this run, before anything is loaded (nothing is written here)."""
    out = check_output_dir(cfg.out)
    model = Path(cfg.model).expanduser()
    model_folder = (model.parent if model.is_file() else model) if not cfg.model.startswith("builtin:") else None
    if (out / "config.json").is_file() or (model_folder is not None and out.resolve() == model_folder.resolve()):
        raise OutputError(f"--out {out} is a model directory (the --model's, or one holding config.json); an adapter "
                          "written there would make the model load as a PEFT model. Choose another --out")
    held = _held(out)
    if held and not (cfg.resume or cfg.overwrite):
        shown = ", ".join(held[:5]) + (" ..." if len(held) > 5 else "")
        raise OutputError(f"--out {out} already holds files ({shown}); lorakit train does not replace them. Continue "
                          "that run with --resume, replace it with --overwrite, or choose another --out")
    if cfg.resume and held and ckpt.latest(out / CHECKPOINTS) is None:
        what = "a run's files" if any(name in RUN_FILES for name in held) else f"files that are not a lorakit run's ({', '.join(held[:5])})"
        raise OutputError(f"--resume: {out} holds {what} but no checkpoint to continue from; start afresh with "
                          "--overwrite or choose another --out")
    for path, flag in _inputs(cfg).items():
        if path.parent == out.resolve() and path.name in RUN_FILES and path.name != CHAT_TEMPLATE_FILE:
            raise OutputError(f"{flag} {path} is a file lorakit train writes into --out {out}; move it out of --out or "
                              "choose another --out")
    return out


def _move(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    os.rename(src, dst)


def replaced_names(out: Path, keep: set[Path]) -> list[str]:
    """The previous run's files in ``out`` that --overwrite replaces (relative names), the run's inputs left out."""
    names = [name for name in RUN_FILES if (out / name).is_file() and (out / name).resolve() not in keep]
    root = out / CHECKPOINTS
    if root.is_dir():
        names += [f"{CHECKPOINTS}/{p.name}" for p in sorted(root.iterdir())
                  if ckpt.step_of(p) is not None or p.name.startswith(f".{ckpt.PREFIX}")]
    return names


def move_aside(out: Path, keep: set[Path]) -> Path | None:
    """--overwrite: the previous run's files into ``out/.lorakit-replaced`` (renames, nothing is deleted)."""
    names = replaced_names(out, keep)
    if not names:
        return None
    aside = out / REPLACED
    try:
        aside.mkdir()
        for name in names:
            _move(out / name, aside / name)
        fsync_dir(out)
    except OSError as exc:
        if aside.is_dir():  # (mkdir itself may be what failed)
            restore(out, aside)
        raise OutputError(f"--overwrite: cannot move the previous run's files aside in {out}: {exc.strerror or exc}; "
                          "they are where they were") from None
    return aside


def restore(out: Path, aside: Path) -> None:
    """The previous run's files back where they were; the failed run's own files of the same names go."""
    for p in sorted(aside.iterdir()):
        if p.name == CHECKPOINTS and p.is_dir():
            for step in sorted(p.iterdir()):
                target = out / CHECKPOINTS / step.name
                if target.is_dir():
                    shutil.rmtree(target)
                _move(step, target)
        else:
            _move(p, out / p.name)
    shutil.rmtree(aside, ignore_errors=True)
    fsync_dir(out)


def _discard_partial_run(out: Path, keep: set[Path]) -> None:
    """A run that failed before its first checkpoint: its files in ``out`` go (they would pass for a finished run's)."""
    for name in RUN_FILES:
        p = out / name
        if p.is_file() and p.resolve() not in keep:
            p.unlink()
    root = out / CHECKPOINTS
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith(f".{ckpt.PREFIX}"):
                shutil.rmtree(p, ignore_errors=True)
        with contextlib.suppress(OSError):
            root.rmdir()


def settle(out: Path, keep: set[Path]) -> str | None:
    """Decide what happens to ``out/.lorakit-replaced``: restored when the newer run wrote no checkpoint, else deleted.
    Returns what was done, for a note (None: nothing was aside)."""
    aside = out / REPLACED
    if not aside.is_dir():
        return None
    try:
        newer = ckpt.latest(out / CHECKPOINTS)
    except ckpt.CheckpointError:
        newer = None
    if newer is None:
        _discard_partial_run(out, keep)
        restore(out, aside)
        return f"the previous run's files in {out} are back (the run that replaced them wrote no checkpoint)"
    shutil.rmtree(aside)
    return None


def settle_leftover(cfg: TrainConfig) -> None:
    """What a run killed outright during --overwrite left aside is settled (under the lock) before --out is checked."""
    out = Path(cfg.out).expanduser()
    if (out / REPLACED).is_dir():
        with OutputLock(out):
            note = settle(out, set(_inputs(cfg)))
        if note:
            print(f"lorakit: {note}", flush=True)


@contextlib.contextmanager
def claim_output(cfg: TrainConfig) -> Iterator[Path]:
    """check_output, then the lock on --out for the whole run; with --overwrite the previous run's files are moved aside,
    deleted when this run has finished, and put back if it fails before its first checkpoint."""
    settle_leftover(cfg)
    out = check_output(cfg)
    with OutputLock(out):
        keep = set(_inputs(cfg))
        check_output(cfg)  # again under the lock: another run may have written there meanwhile
        aside = move_aside(out, keep) if cfg.overwrite else None
        try:
            yield out
        except BaseException:
            if aside is not None:
                settle(out, keep)
            raise
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)
