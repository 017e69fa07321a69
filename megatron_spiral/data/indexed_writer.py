"""Write megatron's IndexedDataset (.bin/.idx) in constant memory.

megatron-core's ``IndexedDatasetBuilder`` keeps every sequence length in a Python list and computes
the byte pointers in a Python loop when finalizing: for a Pile shard (~7M documents) that is
hundreds of MB of Python ints and minutes of finalization, growing with the input. This writer
produces byte-identical files (tests compare against ``IndexedDatasetBuilder``) but spills the
lengths to a small int32 side file and writes the index in fixed-size chunks, so memory stays flat.

The format (megatron.core.datasets.indexed_dataset, non-multimodal): header ``MMIDIDX\\x00\\x00``,
version ``<Q`` 1, dtype code ``<B``, sequence count ``<Q``, document count ``<Q``, then int32
lengths, int64 byte pointers and int64 document indices. A document is one sequence, or (with
--split-sentences) one sequence per sentence; the document indices are the running sequence counts.
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
        self._doc_counts = None  # sequences per document, only once some document has != 1
        self.num_sequences = 0
        self.num_documents = 0
        self.num_tokens = 0
        self._max_id = np.iinfo(self.dtype).max

    def add_documents(self, tokens: np.ndarray, lengths: np.ndarray, sequences_per_document=None) -> None:
        """Append documents given as concatenated ``tokens`` and per-sequence ``lengths``; each
        document is one sequence unless ``sequences_per_document`` says otherwise."""
        lengths = np.asarray(lengths, dtype=np.int64)
        if sequences_per_document is not None:
            counts = np.asarray(sequences_per_document, dtype=np.int64)
            if int(counts.sum()) != lengths.size:
                raise ValueError(f"{int(counts.sum())} sequences announced, {lengths.size} lengths given")
            if self._doc_counts is None and not np.all(counts == 1):
                self._doc_counts = open(self.prefix + ".docs.tmp", "wb")
                self._doc_counts.write(np.ones(self.num_documents, dtype=np.int64).tobytes())
        else:
            counts = None
        if int(lengths.sum()) != tokens.size:
            raise ValueError(f"lengths sum to {int(lengths.sum())} but {tokens.size} tokens were given")
        if tokens.dtype != self.dtype:
            if tokens.size and (tokens.min() < 0 or tokens.max() > self._max_id):
                raise ValueError(f"token ids do not fit the dataset dtype {self.dtype}")
            tokens = tokens.astype(self.dtype)
        self._bin.write(tokens.tobytes(order="C"))
        self._lengths.write(lengths.astype(np.int32).tobytes())
        if self._doc_counts is not None:
            self._doc_counts.write((counts if counts is not None else np.ones(lengths.size, np.int64)).tobytes())
        self.num_sequences += lengths.size
        self.num_documents += lengths.size if counts is None else counts.size
        self.num_tokens += tokens.size

    def finalize(self) -> None:
        """Write the index. The writer cannot be used afterwards."""
        self._bin.close()
        self._lengths.close()
        if self._doc_counts is not None:
            self._doc_counts.close()
        n, docs = self.num_sequences, self.num_documents
        itemsize = self.dtype.itemsize
        with open(self.prefix + ".idx", "wb") as idx, open(self.prefix + ".lengths.tmp", "rb") as lf:
            idx.write(INDEX_HEADER)
            idx.write(struct.pack("<Q", 1))
            idx.write(struct.pack("<B", self._code))
            idx.write(struct.pack("<Q", n))
            idx.write(struct.pack("<Q", docs + 1))
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
            if self._doc_counts is None:
                for first in range(0, n + 1, _CHUNK):
                    idx.write(np.arange(first, min(n + 1, first + _CHUNK), dtype=np.int64).tobytes())
            else:
                idx.write(np.zeros(1, dtype=np.int64).tobytes())
                start = 0
                with open(self.prefix + ".docs.tmp", "rb") as df:
                    while True:
                        data = df.read(_CHUNK * 8)
                        if not data:
                            break
                        ends = np.cumsum(np.frombuffer(data, dtype=np.int64)) + start
                        idx.write(ends.tobytes())
                        start = int(ends[-1])
                os.remove(self.prefix + ".docs.tmp")
        os.remove(self.prefix + ".lengths.tmp")

    def close(self) -> None:
        """Close files without finalizing (on errors); the caller deletes the temporary prefix."""
        self._bin.close()
        self._lengths.close()
        if self._doc_counts is not None:
            self._doc_counts.close()

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
