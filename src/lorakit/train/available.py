"""How much memory this process may use: MemAvailable, the cgroup's limit and use, or --max-memory."""

from __future__ import annotations

import os
import re
from pathlib import Path

from lorakit.errors import ConfigError


# ---------------------------------------------------------------------------------------------- what may be used
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


def parse_memory(text: str | int) -> int:
    """Bytes of a memory size: 22GB (10^9), 22.5GiB (2^30), 20000MB, 512M (2^20, as free -h), or a plain byte count."""
    if isinstance(text, int) and not isinstance(text, bool):
        if text <= 0:
            raise ConfigError(f"--max-memory {text} must be a positive number of bytes, e.g. 22GB or 20GiB")
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*", str(text))
    unit = m.group(2).lower() if m else None
    if m is None or unit not in _UNITS:
        raise ConfigError(f"--max-memory {text!r} is not a memory size; write e.g. 22GB, 22.5GiB, 20000MB or a byte count")
    value = int(float(m.group(1)) * _UNITS[unit])
    if value <= 0:
        raise ConfigError(f"--max-memory {text!r} must be more than 0 bytes, e.g. 22GB")
    return value


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _stat(path: Path, key: str) -> int:
    try:
        for line in path.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key and value.strip().isdigit():
                return int(value)
    except OSError:
        pass
    return 0


def _cgroup_room(proc: Path, cgroup: Path) -> int | None:
    """The cgroup's memory limit minus what it uses now (reclaimable page cache not counted as used); None
    without a limit. cgroup v2 (memory.max, memory.current) at this process's own group or the root, else v1."""
    own = ""
    try:
        for line in (proc / "self" / "cgroup").read_text().splitlines():
            if line.startswith("0::"):
                own = line[3:].strip().lstrip("/")
    except OSError:
        pass
    for group in dict.fromkeys([cgroup / own, cgroup]):
        limit = _read_int(group / "memory.max")
        if limit is not None:
            used = _read_int(group / "memory.current") or 0
            return max(0, limit - max(0, used - _stat(group / "memory.stat", "inactive_file")))
    v1 = cgroup / "memory"
    limit = _read_int(v1 / "memory.limit_in_bytes")
    if limit is not None and limit < 2**60:
        used = _read_int(v1 / "memory.usage_in_bytes") or 0
        return max(0, limit - max(0, used - _stat(v1 / "memory.stat", "total_inactive_file")))
    return None


def available_memory(max_memory: str | int | None = None, *, proc: str | os.PathLike = "/proc",
                     cgroup: str | os.PathLike = "/sys/fs/cgroup") -> tuple[int, str]:
    """(bytes this process may use, where that comes from): the smallest of MemAvailable (/proc/meminfo), the
    cgroup's limit minus its usage, and ``max_memory`` (--max-memory) when given."""
    found: list[tuple[int, str]] = []
    if max_memory is not None:
        found.append((parse_memory(max_memory), "--max-memory"))
    meminfo = None
    try:
        for line in (Path(proc) / "meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                meminfo = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    if meminfo is not None:
        found.append((meminfo, "MemAvailable"))
    room = _cgroup_room(Path(proc), Path(cgroup))
    if room is not None:
        found.append((room, "cgroup limit"))
    if not found:
        raise ConfigError("cannot tell how much memory this process may use (no /proc/meminfo, no cgroup limit); "
                          "give --max-memory, e.g. --max-memory 16GB")
    return min(found, key=lambda f: f[0])
