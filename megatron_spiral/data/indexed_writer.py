"""Write megatron's IndexedDataset (.bin/.idx) in constant memory.

megatron-core's ``IndexedDatasetBuilder`` keeps every sequence length in a Python list and computes
the byte pointers in a Python loop when finalizing: for a Pile shard (~7M documents) that is
hundreds of MB of Python ints and minutes of finalization, growing with the input. This writer
produces byte-identical files (tests compare against ``IndexedDatasetBuilder``) but spills the
lengths to a small int32 side file and writes the index in fixed-size chunks, so memory stays flat.

The format (megatron.core.datasets.indexed_dataset, non-multimodal): header ``MMIDIDX\\x00\\x00``,
version ``<Q`` 1, dtype code ``<B``, sequence count ``<Q``, document count ``<Q``, then int32
lengths, int64 byte pointers and int64 document indices. Every document is one sequence here, so
the document indices are simply 0..N.
"""

from __future__ import annotations

import os
import struct
from typing import Type

import numpy as np

INDEX_HEADER = b"MMIDIDX\x00\x00"
_CHUNK = 1 << 20  # entries per index write


def megatron_indexed_dataset():
    """Import megatron.core.datasets.indexed_dataset lazily and without its CPU-only warnings.

    Importing it imports all of megatron.core (seconds, plus "Transformer Engine and Apex are not
    installed" warnings that mean nothing for preprocessing), so only the main process does it.
    """
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        from megatron.core.datasets import indexed_dataset
    return indexed_dataset


def optimal_dtype(vocab_size: int) -> Type[np.number]:
    """Token dtype for a vocabulary: megatron's ``DType.optimal_dtype`` (uint16 below 65500 ids)."""
    return megatron_indexed_dataset().DType.optimal_dtype(vocab_size)


def dtype_code(dtype: Type[np.number]) -> int:
    """megatron's DType code (``DType.code_from_dtype``)."""
    return megatron_indexed_dataset().DType.code_from_dtype(dtype)


class IndexedDatasetWriter:
    """Append documents to ``{prefix}.bin``; ``finalize()`` writes ``{prefix}.idx``.

    Use as a context manager or call ``close()``: files of an unfinished writer are incomplete
    (callers write under a temporary prefix and move the finished files into place).
    """

    def __init__(self, prefix: str, dtype: Type[np.number]) -> None:
        self.prefix = prefix
        self.dtype = np.dtype(dtype)
        self._code = dtype_code(self.dtype.type)
        self._bin = open(prefix + ".bin", "wb")
        self._lengths = open(prefix + ".lengths.tmp", "wb")
        self.num_documents = 0
        self.num_tokens = 0
        self._max_id = np.iinfo(self.dtype).max

    def add_documents(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Append documents given as concatenated ``tokens`` and per-document ``lengths``."""
        lengths = np.asarray(lengths, dtype=np.int64)
        if int(lengths.sum()) != tokens.size:
            raise ValueError(f"lengths sum to {int(lengths.sum())} but {tokens.size} tokens were given")
        if tokens.dtype != self.dtype:
            if tokens.size and (tokens.min() < 0 or tokens.max() > self._max_id):
                raise ValueError(f"token ids do not fit the dataset dtype {self.dtype}")
            tokens = tokens.astype(self.dtype)
        self._bin.write(tokens.tobytes(order="C"))
        self._lengths.write(lengths.astype(np.int32).tobytes())
        self.num_documents += lengths.size
        self.num_tokens += tokens.size

    def finalize(self) -> None:
        """Write the index. The writer cannot be used afterwards."""
        self._bin.close()
        self._lengths.close()
        n = self.num_documents
        itemsize = self.dtype.itemsize
        with open(self.prefix + ".idx", "wb") as idx, open(self.prefix + ".lengths.tmp", "rb") as lf:
            idx.write(INDEX_HEADER)
            idx.write(struct.pack("<Q", 1))
            idx.write(struct.pack("<B", self._code))
            idx.write(struct.pack("<Q", n))
            idx.write(struct.pack("<Q", n + 1))
            # Pass 1: lengths verbatim. Pass 2: byte pointers (exclusive running sum * itemsize).
            for chunk in _read_int32_chunks(lf):
                idx.write(chunk.tobytes())
            lf.seek(0)
            start = 0
            for chunk in _read_int32_chunks(lf):
                ends = np.cumsum(chunk, dtype=np.int64) * itemsize + start
                pointers = np.empty_like(ends)
                pointers[0] = start
                pointers[1:] = ends[:-1]
                idx.write(pointers.tobytes())
                start = int(ends[-1])
            for first in range(0, n + 1, _CHUNK):
                idx.write(np.arange(first, min(n + 1, first + _CHUNK), dtype=np.int64).tobytes())
        os.remove(self.prefix + ".lengths.tmp")

    def close(self) -> None:
        """Close files without finalizing (on errors); the caller deletes the temporary prefix."""
        self._bin.close()
        self._lengths.close()

    def __enter__(self) -> "IndexedDatasetWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _read_int32_chunks(f):
    while True:
        data = f.read(_CHUNK * 4)
        if not data:
            return
        yield np.frombuffer(data, dtype=np.int32)
