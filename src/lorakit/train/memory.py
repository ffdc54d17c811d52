"""This process's memory: resident set size from /proc/self/status (Linux), CUDA peak from torch."""

from __future__ import annotations

import torch


def rss_kib(field_name: str = "VmRSS") -> int:
    """A memory line of /proc/self/status in KiB: VmRSS (now) or VmHWM (peak resident set size)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field_name):
                return int(line.split()[1])
    raise OSError(f"{field_name} missing from /proc/self/status")


def reset_peak() -> None:
    """Start VmHWM afresh (writing 5 to /proc/self/clear_refs); silently nothing where that is not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass


def usage(device: torch.device) -> dict[str, float]:
    """Peak and current resident memory in MiB (and the CUDA allocator's peak on a GPU); {} where unreadable."""
    out: dict[str, float] = {}
    try:
        out = {"peak_rss_mib": rss_kib("VmHWM") / 1024, "rss_mib": rss_kib("VmRSS") / 1024}
    except OSError:
        pass
    if device.type == "cuda":
        out["cuda_peak_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out
