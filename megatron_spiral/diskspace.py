"""Disk-full errors that say so: where, how much was needed, how much is free.

torch's zip writer reports ENOSPC as ``RuntimeError: [enforce fail at inline_container.cc:...]
file write failed`` (no word of disk space); ``is_disk_full`` recognises it and the plain OSErrors.
"""

from __future__ import annotations

import errno
import os
import shutil
from typing import Optional


class DiskFullError(OSError):
    """A write failed (or would fail) for lack of space; the message says where and how much."""


def is_disk_full(err: Optional[BaseException]) -> bool:
    """ENOSPC/EDQUOT anywhere in the exception chain, also when torch wraps it in a RuntimeError."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
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
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def disk_full_error(what: str, where: str, needed_bytes: Optional[int], flag: str = "") -> DiskFullError:
    """The error to raise: ``disk full while WHAT under WHERE (about N MiB needed, M MiB free)``."""
    free = free_bytes(where)
    need = f"about {needed_bytes / 2**20:,.1f} MiB needed" if needed_bytes else "size unknown"
    have = f"{free / 2**20:,.1f} MiB free" if free is not None else "free space unknown"
    fix = f"free space there or point {flag} elsewhere" if flag else "free space there or write elsewhere"
    return DiskFullError(errno.ENOSPC, f"disk full while {what} under {where} ({need}, {have} on that "
                                       f"filesystem); {fix}")
