"""Interruption: SIGINT and SIGTERM ask the loop to stop after the current step, with a checkpoint."""

from __future__ import annotations

import signal
import threading
from typing import Any


class StopOnSignal:
    """While active, SIGINT and SIGTERM ask the loop to stop after the current step (it then writes a checkpoint);
    a second signal stops at once. Only the main thread can install handlers; elsewhere this does nothing."""

    def __init__(self, signals=(signal.SIGINT, signal.SIGTERM)) -> None:
        self.signals = signals
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}

    def requested(self) -> bool:
        return self.signal_name is not None

    def _handle(self, signum, frame) -> None:
        if self.signal_name is not None:  # the second one: do not wait for the step
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
