"""SIGTERM/SIGINT handling for SLURM preemption, time limits and Ctrl-C: every rank agrees before
anyone exits (it saves first when --save is set). A second Ctrl-C interrupts at once."""

from __future__ import annotations

import signal


class ExitSignalHandler:
    """Records that a signal arrived; the loop asks all ranks (``any_rank``) before acting on it."""

    def __init__(self, signals=(signal.SIGTERM, signal.SIGINT)) -> None:
        self.received = False
        self._previous = {}
        for sig in signals:
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.received and signum == signal.SIGINT:
            raise KeyboardInterrupt  # the user insists: stop without waiting for the save
        self.received = True

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
