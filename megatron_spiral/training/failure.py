"""How a training process ends on failure: one clear message, a non-zero status, within seconds.

Every exception that escapes ``pretrain`` (``BaseException`` included: a truncated checkpoint
raises a bare ``EOFError``, Ctrl-C a ``KeyboardInterrupt``) becomes one line on stderr naming the
rank, what failed and what to do; errors we raise ourselves carry that text already, anything else
also gets its traceback (it is a bug or an unforeseen condition). A watchdog then guarantees the
process is gone a few seconds later even if exit-time cleanup blocks (a peer rank stuck in a
collective, a worker that does not stop), so torchrun sees the failure and stops the other ranks.
"""

from __future__ import annotations

import os
import sys
import threading
import traceback
from typing import Callable, Optional, Tuple

from megatron_spiral.diskspace import DiskFullError, is_disk_full

EXIT_WATCHDOG_SECONDS = 10.0
INTERRUPTED = 130


def _known_error_types() -> tuple:
    """Errors whose message already says what failed and how to fix it (no traceback needed)."""
    import importlib

    known = [DiskFullError]
    for module, name in (("megatron_spiral.checkpointing", "CheckpointError"),
                         ("megatron_spiral.config", "SpiralConfigError"),
                         ("megatron_spiral.data.gpt_data", "DataError"),
                         ("megatron_spiral.training.step", "NonFiniteError"),
                         ("megatron_spiral.training.step", "TrainingStopped"),
                         ("megatron_spiral.tokenizer", "TokenizerError")):
        try:  # a failure may come before (or from) importing one of these
            known.append(getattr(importlib.import_module(module), name))
        except Exception:  # noqa: BLE001
            pass
    return tuple(known)


def _is_peer_failure(err: BaseException) -> bool:
    text = str(err)
    return any(s in text for s in ("Connection closed by peer", "Connection reset by peer", "Broken pipe",
                                   "connection refused", "Socket Timeout", "Timed out waiting"))


def describe(err: BaseException) -> Tuple[str, int, bool]:
    """(message, exit status, show traceback) for an exception that ended the run."""
    if isinstance(err, KeyboardInterrupt):
        return "interrupted (SIGINT); pass --exit-signal-handler to save before exiting", INTERRUPTED, False
    if isinstance(err, _known_error_types()):
        return str(err), 1, False
    if is_disk_full(err):
        return f"disk full: {err}; free space or write elsewhere", 1, False
    if _is_peer_failure(err):
        return (f"a collective operation failed ({type(err).__name__}: {str(err).splitlines()[0]}); another "
                "rank most likely failed first: see its error", 1, False)
    text = str(err).strip() or "(no message)"
    return f"{type(err).__name__}: {text}", 1, True


def _arm_exit_watchdog(status: int, seconds: float) -> None:
    """Hard-exit if normal interpreter shutdown has not finished within ``seconds``."""
    timer = threading.Timer(seconds, lambda: os._exit(status))
    timer.daemon = True
    timer.start()


def run_guarded(fn: Callable[[], int], prog: str = "pretrain_spiral.py",
                watchdog_seconds: Optional[float] = EXIT_WATCHDOG_SECONDS) -> int:
    """Run ``fn``; on any failure print one message and return a non-zero status (argparse's
    SystemExit passes through unchanged)."""
    try:
        return fn()
    except SystemExit:
        raise
    except BaseException as err:  # noqa: BLE001 - every failure must end the process cleanly
        message, status, show_traceback = describe(err)
        rank = os.environ.get("RANK")
        prefix = f"[rank {rank}] " if rank is not None and os.environ.get("WORLD_SIZE", "1") != "1" else ""
        if show_traceback:
            traceback.print_exception(err, file=sys.stderr)
        print(f"{prefix}{prog}: error: {message}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        if watchdog_seconds is not None:
            _arm_exit_watchdog(status, watchdog_seconds)
        return status
