"""The run directory (``--out``): which files are a run's, when lorakit train may write there, and how
``--overwrite`` replaces a previous run without losing it on a failure.

``--overwrite`` moves the previous run's files (``RUN_FILES`` and ``checkpoints/step-*``) aside into
``<out>/.lorakit-replaced/`` instead of deleting them. They are deleted once the new run has finished;
if it fails before writing a checkpoint of its own (a bad data row, a rank that does not fit, Ctrl-C),
its partial files go and the previous run's come back, so a run that never started never costs the old
one. A run killed outright (SIGKILL, power) leaves the folder; the next ``lorakit train`` on that
``--out`` settles it by the same rule before anything else. Files the run reads (``--data``,
``--chat-template`` ...) are never moved or deleted, and no other file in ``--out`` is touched.

What the run writes there as it goes: ``metrics.jsonl`` (``MetricsLog``), ``training.png`` (``plot_metrics``);
what makes a checkpoint this run's (``check_same_run``: the options, the base model's and the rows' fingerprints,
the step count) and the command that continues it (``resume_command``).
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lorakit.errors import ConfigError
from lorakit.options import flatten, spelling
from lorakit.files import OutputError, OutputLock, check_output_dir, entries, fsync_dir, write_atomic
from lorakit.train import checkpoint as ckpt
from lorakit.train import distributed
from lorakit.train.chat import CHAT_TEMPLATE_FILE
from lorakit.train.config import TrainConfig, resume_differences

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


# ---------------------------------------------------------------------- what the run writes as it goes
class MetricsLog:
    """metrics.jsonl, one JSON object per event, appended and flushed (survives a crash).
    ``writes=False`` (ranks other than 0) reads but never writes."""

    def __init__(self, path: Path, *, fresh: bool, writes: bool = True) -> None:
        self.path, self.writes = path, writes
        if not writes:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        if fresh and path.exists():  # a fresh run's own (run_dir moved a previous run's aside)
            path.unlink()
        elif path.exists():
            self._drop_torn_last_line()

    def _drop_torn_last_line(self) -> None:
        """A run killed mid-write leaves a last line without its newline: cut it, so appending stays valid JSONL."""
        raw = self.path.read_bytes()
        if raw and not raw.endswith(b"\n"):
            with open(self.path, "r+b") as fh:
                fh.truncate(raw.rfind(b"\n") + 1)

    def write(self, record: dict[str, Any]) -> None:
        if not self.writes:
            return
        try:
            with open(self.path, "a") as fh:
                fh.write(json.dumps(record, sort_keys=True) + "\n")
        except OSError as exc:
            raise OutputError(f"cannot write {self.path}: {exc.strerror or exc}; the last checkpoint is intact, free "
                              "space and continue with --resume") from None

    def read(self) -> list[dict[str, Any]]:
        """The records; a line that is not JSON (a torn write) is left out."""
        if not self.path.exists():
            return []
        records = []
        for line in self.path.read_text(errors="replace").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict):
                records.append(record)
        return records


def plot_metrics(records: list[dict[str, Any]], path: Path, title: str) -> None:
    """Training loss and held-out metrics against optimizer steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in records if r.get("event") == "train" and "loss" in r]
    evals = [r for r in records if r.get("event") == "eval"]
    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    ax[0].plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss")
    ax[0].plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="held-out loss")
    ax[0].set_xlabel("optimizer step")
    ax[0].set_ylabel("loss")
    ax[0].legend()
    key = "eval_accuracy" if any("eval_accuracy" in r for r in evals) else "eval_perplexity"
    ax[1].plot([r["step"] for r in evals], [r[key] for r in evals], "o-", color="tab:green")
    ax[1].set_xlabel("optimizer step")
    ax[1].set_ylabel(key.removeprefix("eval_").replace("_", " "))
    ax[1].set_title("held-out " + key.removeprefix("eval_"))
    fig.suptitle(title)
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)


# ---------------------------------------------------------------------- resume identity
def check_same_run(path: Path, state: dict[str, Any], cfg: TrainConfig, fingerprint: dict[str, str],
                   total_steps: int) -> None:
    """Refuse to continue a checkpoint of a different run: other options, model or data (README: "What lorakit writes, deletes and refuses")."""
    fix = ("Resume with the options of that run, or start afresh with --overwrite (this replaces that run's files) "
           "or another --out")
    try:
        saved = json.loads(state.get("config") or "{}")
    except (TypeError, ValueError):
        saved = {}
    if not isinstance(saved, dict):
        saved = {}
    problems = resume_differences(saved, cfg.to_dict())
    recorded = state.get("fingerprint") or {}
    for what, meaning in (("model", "the base model's weights"), ("data", "the tokenised training rows")):
        if what in recorded and what in fingerprint and recorded[what] != fingerprint[what]:
            problems.append(f"{meaning} differ from the checkpoint's ({what} fingerprint {fingerprint[what][:12]} "
                            f"here, {recorded[what][:12]} there)")
    if state["total_steps"] != total_steps and not problems:
        problems.append(f"the run has {total_steps} steps here and {state['total_steps']} in the checkpoint "
                        "(--steps/--epochs, --batch-size, --grad-accum)")
    if problems:
        raise ConfigError(f"--resume: {path} was written by a different run: {'; '.join(problems)}. {fix}")


def resume_command(argv: list[str] | None = None) -> str:
    """The command line of this run with --resume added (what to type to continue it).

    Under ``lorakit train --nproc N`` it is that command (the launcher passes it down); under a
    torchrun the user started, the same torchrun line with --resume, on any number of processes.
    """
    launched = os.environ.get(distributed.RESUME_ARGV_ENV)
    if argv is None and launched:
        argv = launched.split("\x1f")
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--resume" not in argv:
        argv.append("--resume")
    if not launched and distributed.launched_by_torchrun():
        return "your torchrun command with: " + shlex.join(argv) + " (on any number of processes)"
    return "lorakit " + shlex.join(argv)
