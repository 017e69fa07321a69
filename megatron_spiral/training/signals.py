"""The exit signal (--exit-signal, SIGTERM by default) for SLURM preemption and time limits, and
Ctrl-C (SIGINT): the handler only records it; every rank agrees (``any_rank``) before anyone saves
and exits 0. A second Ctrl-C interrupts at once."""

from __future__ import annotations

import signal
from typing import Union


def parse_signal(name: Union[str, int, signal.Signals]) -> signal.Signals:
    """'SIGTERM' / 'TERM' / 15 -> signal.SIGTERM (Megatron-LM takes the name)."""
    if isinstance(name, signal.Signals):
        return name
    if isinstance(name, int) or str(name).isdigit():
        return signal.Signals(int(name))
    text = str(name).upper()
    return signal.Signals[text if text.startswith("SIG") else "SIG" + text]


class ExitSignalHandler:
    """Records that the exit signal arrived; the loop asks all ranks before acting on it."""

    def __init__(self, sig: Union[str, int, signal.Signals] = signal.SIGTERM) -> None:
        self.signal = parse_signal(sig)
        self.received = False
        self._previous = {sig: signal.signal(sig, self._handle) for sig in {self.signal, signal.SIGINT}}

    def _handle(self, signum, frame) -> None:
        if self.received and signum == signal.SIGINT:
            raise KeyboardInterrupt  # the user insists: stop without waiting for the save
        self.received = True

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
