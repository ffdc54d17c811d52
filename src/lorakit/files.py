"""Ground floor: writing files so that nothing is half-written, lost or silently replaced.

- ``write_atomic(path, write)``: write to a temporary name in the same directory, fsync, rename.
- ``check_output_dir(path, ...)``: what every command that writes a directory asks before it
  loads anything: the path is a directory (or can become one), is writable, and is none of the
  command's inputs, contains none and lies inside none.
- ``OutputLock(path)``: one writer per output directory (fcntl lock, pid recorded).
- ``cache_dir()``: where lorakit keeps what it makes once (converted models, compiled kernels).

A write that fails (disk full, read-only, permission) raises ``OutputError`` naming the file
and the reason; the temporary file is removed and what was there before is untouched.
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from lorakit.errors import LorakitError


def cache_dir() -> Path:
    """Where lorakit keeps what it makes once (converted built-in models, compiled kernels): $LORAKIT_CACHE, else
    ~/.cache/lorakit."""
    return Path(os.environ.get("LORAKIT_CACHE", Path.home() / ".cache" / "lorakit"))


LOCK_NAME = ".lorakit.lock"


class OutputError(LorakitError):
    """An output path cannot be used, or writing to it failed."""


def _umask() -> int:
    """The process umask, read without changing it (Linux); 0o022 where /proc is not there."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022


def write_errors() -> tuple[type[BaseException], ...]:
    """What a full disk or a failed write raises from the writers lorakit uses (torch, safetensors, matplotlib)."""
    from safetensors import SafetensorError

    return (OSError, RuntimeError, SafetensorError)


def write_atomic(path: str | os.PathLike, write: Callable[[str], Any]) -> None:
    """Call ``write(tmp_path)``, fsync, then rename onto ``path``: never a half-written file."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from None
    try:
        write(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, write_errors()):
            raise OutputError(f"cannot write {path}: {_reason(exc)}; what was there before is untouched") from None
        raise


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    text = str(exc)
    if "No space left" in text or "errno: 28" in text.lower() or "error code: 28" in text:
        return "No space left on device"
    return text.splitlines()[0] if text else type(exc).__name__


def fsync_dir(path: str | os.PathLike) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# ---------------------------------------------------------------------- output directories
def check_output_dir(path: str | os.PathLike, *, flag: str = "--out", inputs: Mapping[str, str | os.PathLike | None] = {}) -> Path:
    """Refuse an output directory that cannot be written, or that is, contains or lies in an input.

    ``inputs``: {flag: path} of what the command reads (an adapter, a model directory, a data file).
    Nothing is created or written here.
    """
    p = Path(path).expanduser()
    try:
        os.stat(p)
        exists = True
    except FileNotFoundError:
        exists = False
        if p.is_symlink():
            raise OutputError(f"{flag} {p} is a symlink to {os.readlink(p)}, which does not exist; remove the link or "
                              "choose another directory") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise OutputError(f"{flag} {p} is a symlink loop; remove the link or choose another directory") from None
        raise OutputError(f"{flag} {p} cannot be used: {exc.strerror or exc}") from None
    if exists and not p.is_dir():
        raise OutputError(f"{flag} {p} is a file, not a directory; choose a directory (it is created if missing)")
    resolved = p.resolve()
    for name, given in inputs.items():
        if given is None:
            continue
        other = Path(given).expanduser().resolve()
        if resolved == other:
            how = "is"
        elif other in resolved.parents:
            how = "lies inside"
        elif resolved in other.parents:
            how = "contains"
        else:
            continue
        raise OutputError(f"{flag} {p} {how} the {name} {given}; writing there could replace what is read. "
                          f"Choose an {flag} outside it")
    existing = p if exists else next((a for a in resolved.parents if a.exists()), Path("/"))
    if not existing.is_dir():
        raise OutputError(f"{flag} {p} cannot be created: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputError(f"{flag} {p} cannot be written ({existing} is read-only or not yours); choose another directory")
    return p


def entries(path: str | os.PathLike) -> list[str]:
    """The names in a directory (none if it does not exist), lorakit's lock file left out."""
    p = Path(path)
    if not p.is_dir():
        return []
    return sorted(e.name for e in p.iterdir() if e.name != LOCK_NAME)


class OutputLock:
    """An exclusive lock on an output directory, held while a job writes there.

    A second job on the same directory is refused at once with the first one's pid. The lock is
    the kernel's (fcntl.flock), so a job killed with SIGKILL leaves no stale lock behind, only a
    small file that the next job reuses. The file is removed on release, and so is the directory if
    this lock created it and nothing was written there.
    """

    def __init__(self, directory: str | os.PathLike, what: str = "lorakit train") -> None:
        self.directory, self.what = Path(directory), what
        self.path = self.directory / LOCK_NAME
        self.fd: int | None = None
        self.created = False

    def __enter__(self) -> OutputLock:
        import fcntl

        try:
            self.created = not self.directory.exists()
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(f"cannot create {self.directory}: {exc.strerror or exc}") from None
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:
                raise OutputError(f"cannot write to {self.directory}: {exc.strerror or exc}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise OutputError(f"another {self.what} (pid {holder}) is writing to {self.directory}; wait for it to "
                                  "finish or choose another --out") from None
            try:  # the holder may have removed the file between our open and our lock: then lock the new one
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        self.fd = fd
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)
        except OSError as exc:
            self.__exit__()
            raise OutputError(f"cannot write to {self.directory}: {exc.strerror or exc}") from None
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(OSError):
            os.unlink(self.path)
        os.close(self.fd)
        self.fd = None
        if self.created:  # a job that failed before writing anything leaves no empty directory behind
            with contextlib.suppress(OSError):
                self.directory.rmdir()


def write_directory(path: str | os.PathLike, fill: Callable[[Path], Any], *, replace: bool = False,
                    first: tuple[str, ...] = ()) -> Path:
    """Write a directory as one unit: ``fill(tmp)`` writes the files into a temporary directory, each is
    fsynced, then the whole is renamed to ``path``.

    Where ``path`` already exists: ``replace=True`` swaps the directories (the old one is moved aside,
    then deleted); otherwise the new files are renamed into it, the names in ``first`` first, and
    other files there are kept. On any failure the temporary directory is removed and ``path`` is
    as it was.
    """
    import shutil

    path = Path(path)
    exists = path.is_dir()
    home = path if exists and not replace else path.parent
    try:
        home.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=home))
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from None
    try:
        fill(tmp)
        names = sorted(p.name for p in tmp.iterdir())
        for name in names:
            if (tmp / name).is_file():
                with open(tmp / name, "rb") as fh:
                    os.fsync(fh.fileno())
                os.chmod(tmp / name, 0o666 & ~_umask())  # writers that use mkstemp (transformers' safetensors) leave 0600
        fsync_dir(tmp)
        if not exists or replace:
            os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp creates 0700
        if not exists:
            os.rename(tmp, path)
        elif replace:
            old = path.parent / f".{path.name}.old"
            shutil.rmtree(old, ignore_errors=True)
            os.rename(path, old)
            os.rename(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            for name in [n for n in first if n in names] + [n for n in names if n not in first]:
                os.replace(tmp / name, path / name)
            os.rmdir(tmp)
        fsync_dir(home)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, write_errors()):
            raise OutputError(f"cannot write {path}: {_reason(exc)}; what was there before is untouched") from None
        raise
    return path
