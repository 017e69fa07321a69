"""How a training process ends on failure: one clear message, a non-zero status, within seconds.

Every exception that escapes ``pretrain`` (``BaseException`` included: a truncated checkpoint
raises a bare ``EOFError``, Ctrl-C a ``KeyboardInterrupt``) becomes one line on stderr naming the
rank, what failed and what to do; errors we raise ourselves carry that text already, anything else
also gets its traceback (it is a bug or an unforeseen condition). A watchdog then guarantees the
process is gone a few seconds later even if exit-time cleanup blocks (a peer rank stuck in a
collective, a worker that does not stop), so torchrun sees the failure and stops the other ranks.
"""

from __future__ import annotations

import errno
import os
import shutil
import sys
import threading
import traceback
from typing import Callable, Optional, Tuple

EXIT_WATCHDOG_SECONDS = 10.0
INTERRUPTED = 130


class DiskFullError(OSError):
    """A write failed for lack of space; the message says where and how much was needed."""


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


def is_disk_full(err: BaseException) -> bool:
    """ENOSPC/EDQUOT, also when torch's zip writer reports it as a RuntimeError."""
    while err is not None:
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(err)
        if "No space left on device" in text or "Disk quota exceeded" in text or (
                "inline_container" in text and "file write failed" in text):
            return True
        err = err.__cause__ or err.__context__
    return False


def free_bytes(path: str) -> Optional[int]:
    """Free space of the filesystem holding ``path`` (or its nearest existing parent)."""
    path = os.path.abspath(path)
    while path and not os.path.exists(path):
        path = os.path.dirname(path)
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def disk_full_error(what: str, where: str, needed_bytes: Optional[int]) -> DiskFullError:
    free = free_bytes(where)
    need = f"about {needed_bytes / 2**20:,.1f} MiB needed" if needed_bytes else "size unknown"
    have = f"{free / 2**20:,.1f} MiB free" if free is not None else "free space unknown"
    return DiskFullError(errno.ENOSPC, f"disk full while {what} under {where} ({need}, {have} on that "
                                       "filesystem); free space there or point the flag elsewhere")


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
                watchdog_seconds: float = EXIT_WATCHDOG_SECONDS) -> int:
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
        _arm_exit_watchdog(status, watchdog_seconds)
        return status
