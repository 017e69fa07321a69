"""Turn one chunk of JSON lines into token arrays: the per-worker half of preprocessing.

Everything a worker process does lives here and imports only numpy, orjson and the tokenizer, so
``spawn``-ed workers start fast. A chunk comes back as one concatenated token array plus a length
array per JSON key (cheap to pickle, written with a single ``write`` by the main process), together
with counters and, in strict mode, the first bad line.

A line is either kept for *all* keys or skipped for all keys, so the datasets of several keys stay
aligned document by document.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections import Counter
from dataclasses import dataclass, field
from itertools import chain
from typing import Dict, List, Optional, Sequence, Set, Tuple

import numpy as np

from megatron_spiral.data.jsonl import Chunk, split_lines

try:
    import orjson

    _loads = orjson.loads
except ImportError:  # pragma: no cover - orjson is in requirements.txt; json is the slow fallback
    orjson = None
    _loads = json.loads

REASONS = {
    "invalid_utf8": "invalid UTF-8",
    "malformed_json": "malformed JSON",
    "not_object": "not a JSON object",
    "missing_key": "missing key",
    "non_string": "non-string value",
    "tokenizer_error": "tokenizer error",
    "too_long": "longer than --max-document-bytes",
}
MAX_EXAMPLES = 20  # bad-line locations kept per chunk for the report


@dataclass
class BadLine:
    path: str
    line: int
    reason: str
    detail: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {REASONS[self.reason]}: {self.detail}"


@dataclass
class BatchResult:
    """What one chunk produced; ``error`` is set (and arrays empty) when strict mode hit a bad line."""

    path: str
    raw_offset: int
    input_bytes: int
    lines: int = 0
    documents: int = 0
    blank: int = 0
    filtered: int = 0
    empty: int = 0  # documents with no tokens: written with no sequence, as Megatron-LM does
    tokens: Dict[str, np.ndarray] = field(default_factory=dict)
    lengths: Dict[str, np.ndarray] = field(default_factory=dict)  # per sequence
    sequences: Dict[str, Optional[np.ndarray]] = field(default_factory=dict)  # per document (None: all 1)
    skipped: Counter = field(default_factory=Counter)
    examples: List[BadLine] = field(default_factory=list)
    subsets: Counter = field(default_factory=Counter)
    error: Optional[BadLine] = None
    seconds: Dict[str, float] = field(default_factory=dict)


@dataclass
class ProcessorSpec:
    """Picklable recipe for a BatchProcessor (workers rebuild the tokenizer from it)."""

    tokenizer_config: object
    json_keys: Sequence[str]
    append_eod: bool
    skip_bad_lines: bool
    include: Optional[Set[str]]
    exclude: Optional[Set[str]]
    subset_key: str
    dtype: str
    split_sentences: bool = False
    keep_newlines: bool = False


class BatchProcessor:
    def __init__(self, spec: ProcessorSpec, tokenizer=None) -> None:
        from megatron_spiral.tokenizer import build_tokenizer

        self.spec = spec
        self.tokenizer = tokenizer if tokenizer is not None else build_tokenizer(spec.tokenizer_config)
        self.dtype = np.dtype(spec.dtype)
        self.keys = list(spec.json_keys)
        self.subset_path = spec.subset_key.split(".")
        self.filtering = bool(spec.include or spec.exclude)
        self.splitter = None
        if spec.split_sentences:
            from megatron_spiral.data.sentences import sentence_splitter

            self.splitter = sentence_splitter(spec.keep_newlines)

    # --- parsing ------------------------------------------------------------------------------------
    @staticmethod
    def _parse(line: bytes) -> Tuple[Optional[dict], Optional[Tuple[str, str]]]:
        try:
            obj = _loads(line)
        except Exception as exc:  # orjson.JSONDecodeError / ValueError / UnicodeDecodeError
            return None, _classify_parse_error(line, exc)
        if orjson is None and not _is_valid_unicode(obj):
            return None, ("invalid_utf8", "the line contains an unpaired surrogate escape")
        if not isinstance(obj, dict):
            return None, ("not_object", f"the line is a JSON {type(obj).__name__}, expected an object")
        return obj, None

    def _subset_of(self, obj: dict) -> Optional[str]:
        value = obj
        for part in self.subset_path:
            if not isinstance(value, dict):
                return None
            value = value.get(part)
        return value if isinstance(value, str) else None

    def _values(self, obj: dict) -> Tuple[Optional[List[str]], Optional[Tuple[str, str]]]:
        values = []
        for key in self.keys:
            if key not in obj:
                keys = ", ".join(list(obj)[:8])
                return None, ("missing_key", f"no key {key!r} (the object has: {keys or 'no keys'})")
            value = obj[key]
            if not isinstance(value, str):
                return None, ("non_string", f"{key!r} is a JSON {type(value).__name__}, expected a string")
            values.append(value)
        return values, None

    # --- main entry ---------------------------------------------------------------------------------
    def __call__(self, chunk: Chunk) -> BatchResult:
        t0, cpu0 = time.perf_counter(), time.process_time()
        res = BatchResult(chunk.path, chunk.raw_offset, len(chunk.blob))
        for line_no in getattr(chunk, "long_lines", ()):  # dropped while reading (--skip-long-documents)
            res.lines += 1
            res.skipped["too_long"] += 1
            if len(res.examples) < MAX_EXAMPLES:
                res.examples.append(BadLine(chunk.path, line_no, "too_long", "skipped (--skip-long-documents)"))
        texts: List[List[str]] = [[] for _ in self.keys]
        line_nos: List[int] = []
        for i, line in enumerate(split_lines(chunk.blob)):
            res.lines += 1
            line_no = chunk.first_line + i
            if not line.strip():
                res.blank += 1
                continue
            obj, bad = self._parse(line)
            if bad is None and self.filtering:
                name = self._subset_of(obj)
                if (self.spec.include and name not in self.spec.include) or (
                    self.spec.exclude and name in self.spec.exclude
                ):
                    res.filtered += 1
                    continue
                res.subsets[name] += 1
            if bad is None:
                values, bad = self._values(obj)
            if bad is not None:
                if self._reject(res, BadLine(chunk.path, line_no, *bad)):
                    return res
                continue
            for bucket, value in zip(texts, values):
                bucket.append(value)
            line_nos.append(line_no)
        t1 = time.perf_counter()
        ids_per_key, dropped = self._tokenize(texts, line_nos, chunk.path, res)
        if res.error is not None:
            return res
        t2 = time.perf_counter()
        self._pack(ids_per_key, dropped, res)
        res.seconds = {"parse": t1 - t0, "tokenize": t2 - t1, "pack": time.perf_counter() - t2,
                       "cpu": time.process_time() - cpu0}
        return res

    def _reject(self, res: BatchResult, bad: BadLine) -> bool:
        """Record a bad line; True means stop (strict mode)."""
        if not self.spec.skip_bad_lines:
            res.error = bad
            return True
        res.skipped[bad.reason] += 1
        if len(res.examples) < MAX_EXAMPLES:
            res.examples.append(bad)
        return False

    def _units(self, text: str) -> List[str]:
        """What is tokenized separately: the document, or its sentences (Megatron-LM splits texts
        into 1,000,000-character pieces before sentence splitting; so do we, for identical output)."""
        if self.splitter is None:
            return [text]
        piece = 1_000_000
        return [sentence for i in range(0, len(text), piece) for sentence in self.splitter.tokenize(text[i:i + piece])]

    def _tokenize(self, texts, line_nos, path, res):
        """Per key, per document: the token lists of its units (documents or sentences)."""
        ids_per_key = []
        dropped: Set[int] = set()
        for key, bucket in zip(self.keys, texts):
            units = [self._units(text) for text in bucket]
            flat = [u for doc in units for u in doc]
            owner = [j for j, doc in enumerate(units) for _ in doc]
            try:
                flat_ids = self.tokenizer.tokenize_batch(flat)
            except Exception:
                flat_ids = []  # find the offending document(s) one by one
                for unit, j in zip(flat, owner):
                    try:
                        flat_ids.append(self.tokenizer.tokenize(unit))
                    except Exception as exc:
                        flat_ids.append([])
                        if j not in dropped:
                            dropped.add(j)
                            if self._reject(res, BadLine(path, line_nos[j], "tokenizer_error", f"{key!r}: {exc}")):
                                return None, None
            per_doc: List[List[List[int]]] = [[] for _ in bucket]
            for j, ids in zip(owner, flat_ids):
                per_doc[j].append(ids)
            ids_per_key.append(per_doc)
        return ids_per_key, dropped

    def _pack(self, ids_per_key, dropped, res: BatchResult) -> None:
        """Megatron-LM's encode: units with no tokens are left out, EOD goes after the last one, a
        document with no tokens at all becomes a document with no sequence."""
        eod = self.tokenizer.eod
        for key, per_doc in zip(self.keys, ids_per_key):
            docs = [d for j, d in enumerate(per_doc) if j not in dropped] if dropped else per_doc
            lengths, counts, flat = [], [], []
            for units in docs:
                seqs = [u for u in units if u]
                if seqs and self.spec.append_eod:
                    seqs[-1].append(eod)
                counts.append(len(seqs))
                for seq in seqs:
                    lengths.append(len(seq))
                    flat.append(seq)
                if not seqs and key == self.keys[0]:
                    res.empty += 1
            lengths_arr = np.asarray(lengths, dtype=np.int64)
            res.tokens[key] = np.fromiter(chain.from_iterable(flat), dtype=self.dtype, count=int(lengths_arr.sum()))
            res.lengths[key] = lengths_arr
            counts_arr = np.asarray(counts, dtype=np.int64)
            res.sequences[key] = None if np.all(counts_arr == 1) else counts_arr
            res.documents = len(docs)


def _classify_parse_error(line: bytes, exc: Exception) -> Tuple[str, str]:
    try:
        line.decode("utf-8")
    except UnicodeDecodeError as err:
        return "invalid_utf8", f"byte {err.start} (0x{line[err.start]:02x}) is not valid UTF-8"
    try:  # the stdlib parser gives a position; it also accepts lone surrogates, which orjson rejects
        json.loads(line)
    except ValueError as err:
        return "malformed_json", str(err)
    return "invalid_utf8", f"unpaired surrogate escape ({exc})"


def _is_valid_unicode(obj) -> bool:
    try:
        json.dumps(obj, ensure_ascii=False).encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


# --- worker processes ----------------------------------------------------------------------------
# A pool initializer is the only way to give each worker a long-lived tokenizer without pickling it
# with every task; this dict is that per-process slot (each worker process has its own copy).
_WORKER: Dict[str, BatchProcessor] = {}


def init_worker(spec: ProcessorSpec) -> None:
    """Pool initializer: the main process handles Ctrl-C; one tokenizer thread per worker process."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _WORKER["processor"] = BatchProcessor(spec)


def run_in_worker(chunk: Chunk) -> BatchResult:
    return _WORKER["processor"](chunk)
