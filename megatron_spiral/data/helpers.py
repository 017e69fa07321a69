"""Make megatron's C++ dataset index helpers available, whatever the installation.

``GPTDataset`` and ``BlendedDataset`` import ``megatron.core.datasets.helpers``, which star-imports
the pybind11 extension ``helpers_cpp``. The PyPI wheel of megatron-core 0.16.1 ships it prebuilt for
CPython 3.11/x86-64 (checked on this machine), but a source checkout or another platform has only
``helpers.cpp`` and megatron's ``compile_helpers()`` calls ``sys.exit(1)`` when ``make`` fails.
``ensure_dataset_helpers()`` therefore tries, in order: the shipped extension, building it with
``make`` (needs a C++ compiler and pybind11), and finally NumPy reimplementations of the functions
GPT training uses. The fallback produces identical arrays (tests compare it against the C++
extension); only ``build_blending_indices`` is slow in Python, and its result is cached on disk.
"""

from __future__ import annotations

import importlib
import logging
import os
import subprocess
import sys
import types

import numpy as np

logger = logging.getLogger(__name__)
_MODULE = "megatron.core.datasets.helpers_cpp"


def ensure_dataset_helpers(allow_compile: bool = True) -> str:
    """Return how the helpers are provided: "extension", "compiled" or "python" (idempotent)."""
    if _MODULE in sys.modules:
        return getattr(sys.modules[_MODULE], "__provider__", "extension")
    try:
        importlib.import_module(_MODULE)
        return "extension"
    except ImportError:
        pass
    if allow_compile and _try_make():
        importlib.invalidate_caches()
        try:
            module = importlib.import_module(_MODULE)
            module.__provider__ = "compiled"
            return "compiled"
        except ImportError:
            pass
    logger.warning(
        "megatron's C++ dataset helpers are unavailable (no prebuilt helpers_cpp and `make` failed); "
        "using the NumPy fallback. Blended-dataset indices build slowly in Python for large runs; "
        "install a C++ compiler and pybind11 to get the fast path."
    )
    sys.modules[_MODULE] = python_helpers_module()
    return "python"


def _try_make() -> bool:
    try:
        import megatron.core.datasets as pkg
    except ImportError:
        return False
    directory = os.path.dirname(pkg.__file__)
    if not os.path.isfile(os.path.join(directory, "Makefile")):
        return False
    try:
        done = subprocess.run(["make", "-C", directory], capture_output=True, timeout=600)
    except (OSError, subprocess.SubprocessError):
        return False
    return done.returncode == 0


def python_helpers_module() -> types.ModuleType:
    """A stand-in for ``helpers_cpp`` holding the NumPy implementations below."""
    module = types.ModuleType(_MODULE, "NumPy fallback for megatron's helpers_cpp (megatron_spiral).")
    module.build_sample_idx_int32 = lambda *a: build_sample_idx(*a, dtype=np.int32)
    module.build_sample_idx_int64 = lambda *a: build_sample_idx(*a, dtype=np.int64)
    module.build_blending_indices = build_blending_indices
    module.build_exhaustive_blending_indices = build_exhaustive_blending_indices

    def _unsupported(*_a, **_k):
        raise NotImplementedError("BERT/T5 mappings are not available in the NumPy fallback.")

    module.build_mapping = module.build_blocks_mapping = _unsupported
    module.__provider__ = "python"
    return module


def build_sample_idx(
    sizes: np.ndarray,
    document_idx: np.ndarray,
    seq_length: int,
    num_epochs: int,
    tokens_per_epoch: int,
    drop_last_partial_sequence: bool = True,
    add_extra_token_to_sequence: int = 1,
    dtype=np.int32,
) -> np.ndarray:
    """Vectorized ``helpers.cpp::build_sample_idx``: row k = (position in document_idx, offset).

    Sample k starts at flattened token position k * seq_length. With the extra token, the C++ loop
    records the document *containing* that position; without it, a boundary that falls exactly on
    a document end is recorded as (that document, its length). The final partial sample (kept only
    when not dropping it) ends at the last document's last token.
    """
    extra = int(add_extra_token_to_sequence)
    total = int(num_epochs) * int(tokens_per_epoch)
    if drop_last_partial_sequence:
        num_samples = (total - extra) // seq_length
    else:
        num_samples = int(np.ceil(np.float32(total - extra) / seq_length))
    lengths = np.asarray(sizes)[np.asarray(document_idx)].astype(np.int64)
    ends = np.cumsum(lengths)
    positions = np.arange(num_samples + 1, dtype=np.int64) * seq_length
    side = "right" if extra else "left"
    doc = np.searchsorted(ends, positions, side=side)
    out = np.empty((num_samples + 1, 2), dtype=dtype)
    inside = doc < len(lengths)
    last = len(lengths) - 1
    d = np.where(inside, doc, last)
    out[:, 0] = d
    out[:, 1] = np.where(inside, positions - (ends[d] - lengths[d]), lengths[last] - extra)
    out[0] = (0, 0)
    return out


def _most_under_sampled(weights, counts, x, candidates):
    """helpers.cpp's greedy choice at sample x: the candidate whose count lags its share
    weights[j] * x the most; the first such on ties, as the C++ strict ``>`` scan picks."""
    return max(candidates, key=lambda j: weights[j] * x - counts[j])


def build_blending_indices(dataset_index, dataset_sample_index, weights, num_datasets, size, verbose=False):
    """``helpers.cpp::build_blending_indices``: greedily pick the most under-sampled dataset."""
    w = [float(x) for x in np.asarray(weights)[:num_datasets]]
    counts = [0] * num_datasets
    every = range(num_datasets)
    di = np.empty(size, dtype=np.int16)
    dsi = np.empty(size, dtype=np.int64)
    for i in range(size):
        best = _most_under_sampled(w, counts, max(float(i), 1.0), every)
        di[i] = best
        dsi[i] = counts[best]
        counts[best] += 1
    dataset_index[:size] = di
    dataset_sample_index[:size] = dsi


def build_exhaustive_blending_indices(dataset_index, dataset_sample_index, sizes, num_datasets):
    """``helpers.cpp::build_exhaustive_blending_indices``: draw exactly ``sizes[j]`` from each."""
    sizes = [int(s) for s in np.asarray(sizes)[:num_datasets]]
    total = sum(sizes)
    weights = [s / total for s in sizes]
    counts = [0] * num_datasets
    unspent = [j for j in range(num_datasets) if sizes[j] > 0]
    i = 0
    while unspent:
        best = _most_under_sampled(weights, counts, max(float(i), 1.0), unspent)
        dataset_index[i] = best
        dataset_sample_index[i] = counts[best]
        counts[best] += 1
        if counts[best] == sizes[best]:
            unspent.remove(best)
        i += 1
