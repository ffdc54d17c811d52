"""``lorakit train --nproc N``: N torchrun workers on this machine, signals forwarded to them, and the command line
each worker is given (``RESUME_ARGV_ENV``: what ``resume_command`` prints)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys

# ---------------------------------------------------------------------- launching
RESUME_ARGV_ENV = "LORAKIT_LAUNCH_ARGV"


def launch(nproc: int, train_argv: list[str]) -> int:
    """Run ``lorakit train train_argv`` (its --nproc left out) on ``nproc`` processes of this machine through torchrun.

    SIGINT and SIGTERM are passed on as SIGTERM to every worker (listed through /proc; to torchrun
    where they cannot be listed, which passes it on but then exits non-zero): the workers finish the
    step, checkpoint and exit 0, and so does torchrun. Returns torchrun's exit status.
    """
    train_argv = without_nproc(train_argv)  # the workers must not launch again
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "lorakit", "train", *train_argv]
    env = dict(os.environ)
    env[RESUME_ARGV_ENV] = "\x1f".join(["train", f"--nproc={nproc}", *train_argv])
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)

    def forward(signum, frame):
        workers = _children(proc.pid)
        for pid in workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        if not workers:
            proc.send_signal(signal.SIGTERM)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        return proc.wait()
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def without_nproc(argv: list[str]) -> list[str]:
    """The train arguments minus --nproc."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            out.append(arg)
    return out


def _children(pid: int) -> list[int]:
    """The child processes of ``pid`` (Linux /proc; [] elsewhere)."""
    from pathlib import Path

    out: list[int] = []
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            out += [int(c) for c in (task / "children").read_text().split()]
    except OSError:
        return []
    return out
