"""megatron-core's dataset index cache, made crash-safe from our side.

GPTDataset/BlendedDataset write their sample indices with plain ``numpy.save`` into the cache; a
kill mid-write leaves a short ``.npy`` that every later run trusts (cache hit = all files exist) and
fails on with ``EOFError: No data left in file``. So during a build every ``numpy.save`` to a path
goes to a temporary file renamed into place when complete, and before a build, cache files that do
not load are deleted together with their group (same ``HASH-Class-split-`` prefix) so megatron
rebuilds them.
"""

from __future__ import annotations

import contextlib
import os
from typing import Callable, Iterable, List

import numpy


@contextlib.contextmanager
def atomic_numpy_saves():
    """Within the block, ``numpy.save(path, ...)`` is all-or-nothing."""
    original = numpy.save

    def save(file, arr, *args, **kwargs):
        if not isinstance(file, (str, os.PathLike)):
            return original(file, arr, *args, **kwargs)
        path = os.fspath(file)
        if not path.endswith(".npy"):
            path += ".npy"
        tmp = f"{path}.tmp-{os.getpid()}"
        try:
            with open(tmp, "wb") as f:
                original(f, arr, *args, **kwargs)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise

    numpy.save = save
    try:
        yield
    finally:
        numpy.save = original


def _group(name: str) -> str:
    """``HASH-GPTDataset-train-sample_index.npy`` -> ``HASH-GPTDataset-train-``."""
    parts = name.split("-")
    return "-".join(parts[:3]) + "-" if len(parts) >= 4 else name


def repair_index_cache(directories: Iterable[str], log: Callable[[str], None] = print) -> List[str]:
    """Delete unreadable cache files (and their group, and stray temporaries); returns what went."""
    removed: List[str] = []
    for directory in directories:
        if not directory or not os.path.isdir(directory):
            continue
        names = sorted(os.listdir(directory))
        broken = set()
        for name in names:
            path = os.path.join(directory, name)
            if ".npy.tmp-" in name:
                broken.add(name)
            elif name.endswith(".npy"):
                try:
                    numpy.load(path, allow_pickle=True, mmap_mode="r")
                except Exception:  # noqa: BLE001 - EOFError, ValueError: short or torn file
                    broken.add(_group(name))
        for name in names:
            if name in broken or any(name.startswith(g) for g in broken if g.endswith("-")):
                try:
                    os.remove(os.path.join(directory, name))
                    removed.append(os.path.join(directory, name))
                except OSError:
                    pass
    if removed:
        log(f" > removed {len(removed)} damaged dataset index cache file(s) (an interrupted write); megatron "
            f"rebuilds them: {', '.join(removed[:4])}{' ...' if len(removed) > 4 else ''}")
    return removed
