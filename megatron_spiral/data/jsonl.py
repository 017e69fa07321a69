"""Streaming JSON-lines input: path resolution and line-aligned chunks of (compressed) files.

Pile shards are ~15 GB of zstd-compressed JSON lines, so nothing here ever holds a whole file: files
are decompressed as streams and cut into chunks of complete lines (``blob``), each tagged with the
number of its first line so that errors can name ``file:line``. Chunks are what the preprocessing
workers receive: a single ``bytes`` object pickles far faster than a list of lines.
"""

from __future__ import annotations

import glob
import gzip
import io
import os
from dataclasses import dataclass
from typing import Iterator, List, Optional, Sequence

# (suffix, compression); longest suffixes first so ".jsonl.zst" wins over ".zst".
_SUFFIXES = (
    (".jsonl.zstd", "zst"),
    (".jsonl.zst", "zst"),
    (".json.zst", "zst"),
    (".jsonl.gz", "gz"),
    (".json.gz", "gz"),
    (".jsonl", None),
    (".json", None),
)
SUPPORTED = ", ".join(s for s, _ in _SUFFIXES)


class InputError(ValueError):
    """The input cannot be read as JSON lines; the message names the file and what to do."""


def compression_of(path: str) -> Optional[str]:
    """"zst", "gz" or None for a supported file name; raises InputError otherwise."""
    name = path.lower()
    for suffix, kind in _SUFFIXES:
        if name.endswith(suffix):
            return kind
    raise InputError(f"{path}: unsupported input file type; expected one of {SUPPORTED}.")


def _is_supported(path: str) -> bool:
    try:
        compression_of(path)
        return True
    except InputError:
        return False


def resolve_inputs(specs: Sequence[str]) -> List[str]:
    """Expand files, directories (their supported files, sorted) and globs into an ordered file list.

    Order is deterministic (sorted within each spec, specs in the given order) because the output
    document order, and so every training sample, depends on it.
    """
    files: List[str] = []
    for spec in specs:
        if os.path.isdir(spec):
            found = sorted(
                os.path.join(spec, n) for n in os.listdir(spec)
                if _is_supported(n) and os.path.isfile(os.path.join(spec, n))
            )
            if not found:
                raise InputError(f"directory {spec} holds no input files ({SUPPORTED}).")
        elif os.path.isfile(spec):
            compression_of(spec)
            found = [spec]
        elif glob.has_magic(spec):
            matches = sorted(p for p in glob.glob(spec, recursive=True) if os.path.isfile(p))
            found = [p for p in matches if _is_supported(p)]
            if not found:
                raise InputError(f"--input pattern {spec!r} matches no input files ({SUPPORTED}).")
        else:
            raise InputError(f"--input {spec!r}: no such file or directory.")
        files.extend(found)
    unique, seen = [], set()
    for f in files:
        key = os.path.realpath(f)
        if key not in seen:
            seen.add(key)
            unique.append(f)
    if not unique:
        raise InputError("no input files given (--input).")
    return unique


@dataclass
class Chunk:
    """Complete lines of one file: ``blob`` starts at line ``first_line`` (1-based)."""

    path: str
    first_line: int
    blob: bytes
    raw_offset: int  # compressed bytes consumed from the file so far (for progress)


class _RawCounter(io.RawIOBase):
    """Wraps the on-disk file to report how many (compressed) bytes were consumed."""

    def __init__(self, f) -> None:
        self._f = f
        self.consumed = 0

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        n = self._f.readinto(b)
        self.consumed += n or 0
        return n

    def close(self) -> None:
        self._f.close()
        super().close()


def _open_stream(path: str, raw: _RawCounter):
    kind = compression_of(path)
    if kind == "zst":
        import zstandard

        # read_across_frames: shards written by concatenating zstd files hold several frames.
        return zstandard.ZstdDecompressor().stream_reader(raw, read_size=1 << 20, read_across_frames=True)
    if kind == "gz":
        return gzip.GzipFile(fileobj=raw, mode="rb")
    return raw


def iter_chunks(path: str, chunk_bytes: int = 1 << 20) -> Iterator[Chunk]:
    """Yield line-aligned chunks of about ``chunk_bytes`` decompressed bytes from ``path``.

    Memory is bounded by ``chunk_bytes`` plus the longest line. A JSON array file (``[...]``) is
    rejected: it cannot be streamed line by line.
    """
    line_no = 1
    pending = b""
    first = True
    with open(path, "rb", buffering=0) as f:
        raw = _RawCounter(f)
        stream = _open_stream(path, raw)
        try:
            while True:
                try:
                    data = stream.read(chunk_bytes)
                except Exception as exc:  # OSError/EOFError from gzip, zstandard.ZstdError
                    raise InputError(f"{path}: cannot decompress near line {line_no}: {exc}") from exc
                if first and data:
                    first = False
                    if data.lstrip()[:1] == b"[":
                        raise InputError(
                            f"{path} is a JSON array, not JSON lines (one object per line). Convert "
                            f"it first, e.g. `jq -c '.[]' {path} > {os.path.splitext(path)[0]}.jsonl`."
                        )
                if not data:
                    break
                buf = pending + data if pending else data
                cut = buf.rfind(b"\n")
                if cut < 0:
                    pending = buf  # one line longer than the chunk: keep reading
                    continue
                blob, pending = buf[: cut + 1], buf[cut + 1 :]
                yield Chunk(path, line_no, blob, raw.consumed)
                line_no += blob.count(b"\n")
            if pending:
                yield Chunk(path, line_no, pending, raw.consumed)
        finally:
            if stream is not raw:
                stream.close()


def split_lines(blob: bytes) -> List[bytes]:
    """The lines of a chunk, without their terminators (a trailing newline adds no empty line)."""
    lines = blob.split(b"\n")
    if lines and not lines[-1]:
        lines.pop()
    return lines


def iter_texts(paths: Sequence[str], key: str = "text", max_bytes: Optional[int] = None) -> Iterator[str]:
    """Yield ``obj[key]`` strings from JSON lines, silently skipping unusable lines.

    Meant for tokenizer training, where a sample of the corpus is enough; ``max_bytes`` caps the
    amount of text (UTF-8 bytes of the values) yielded.
    """
    import json

    try:
        import orjson

        loads = orjson.loads
    except ImportError:  # pragma: no cover - orjson is in requirements.txt
        loads = json.loads
    total = 0
    for path in paths:
        for chunk in iter_chunks(path):
            for line in split_lines(chunk.blob):
                try:
                    value = loads(line).get(key)
                except Exception:
                    continue
                if isinstance(value, str) and value.strip():
                    yield value
                    total += len(value.encode("utf-8", "replace"))
                    if max_bytes is not None and total >= max_bytes:
                        return
