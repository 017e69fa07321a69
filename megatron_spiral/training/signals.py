"""SIGTERM handling for SLURM preemption and time limits: every rank agrees before anyone exits."""

from __future__ import annotations

import signal


class ExitSignalHandler:
    """Records that a signal arrived; the loop asks all ranks (``any_rank``) before acting on it."""

    def __init__(self, signals=(signal.SIGTERM,)) -> None:
        self.received = False
        self._previous = {}
        for sig in signals:
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.received = True

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
