"""Side-by-side timing: contenders take turns, step by step, so machine drift cancels.

A contender is a name and a function that runs one training step. After ``warmup`` turns
each, the contenders alternate (A, B, C, A, B, C, ...) for ``steps`` rounds; each step is
timed with a wall clock (synchronising CUDA when the model lives there). The median is
reported: it ignores the occasional step that the operating system interrupts.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class Contender:
    name: str
    step: Callable[[], Any]
    device: str = "cpu"
    extra_timers: dict[str, list[float]] = field(default_factory=dict)


@dataclass
class Timing:
    name: str
    seconds: list[float]
    extra: dict[str, list[float]] = field(default_factory=dict)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    def summary(self) -> dict[str, Any]:
        out = {"median_s": self.median, "min_s": min(self.seconds), "max_s": max(self.seconds), "steps": len(self.seconds)}
        for key, values in self.extra.items():
            if values:
                out[f"{key}_median_s"] = statistics.median(values)
        return out


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def alternate(contenders: list[Contender], *, warmup: int = 2, steps: int = 10,
              progress: Callable[[str], None] | None = None) -> dict[str, Timing]:
    """Warm each contender up, then time them in turn; returns {name: Timing}."""
    for c in contenders:
        for _ in range(warmup):
            c.step()
        for values in c.extra_timers.values():
            values.clear()
    timings = {c.name: Timing(c.name, []) for c in contenders}
    for i in range(steps):
        for c in contenders:
            _sync(c.device)
            t = time.perf_counter()
            c.step()
            _sync(c.device)
            timings[c.name].seconds.append(time.perf_counter() - t)
        if progress:
            progress(f"round {i + 1}/{steps}: " + ", ".join(f"{c.name} {timings[c.name].seconds[-1]:.3f}s" for c in contenders))
    for c in contenders:
        timings[c.name].extra = {k: list(v) for k, v in c.extra_timers.items()}
    return timings


class SectionTimer:
    """Accumulates the wall time spent inside wrapped calls during one step (reset per step)."""

    def __init__(self, per_step: list[float]) -> None:
        self.per_step = per_step
        self.current = 0.0

    def wrap(self, fn: Callable) -> Callable:
        def timed(*args, **kwargs):
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.current += time.perf_counter() - t

        return timed

    def close_step(self) -> None:
        self.per_step.append(self.current)
        self.current = 0.0
