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
from typing import Iterator, List, Optional, Sequence, Tuple

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
    long_lines: Tuple[int, ...] = ()  # numbers of lines dropped before this chunk for their length


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


class _ZstdStream:
    """Decompress a zstd file frame after frame, and notice a truncated one.

    zstandard's ``stream_reader`` returns a clean end of stream when the input stops inside a frame
    (measured: half a file read as 131072 bytes, no error), which silently drops the rest of a
    truncated shard. A ``decompressobj`` per frame tells us: at the end of the input the current
    frame must be finished. Shards written by concatenating zstd files hold several frames.
    """

    def __init__(self, path: str, raw: _RawCounter, read_size: int = 1 << 18) -> None:
        import zstandard

        self.path, self.raw, self.read_size = path, raw, read_size
        self._zstd = zstandard
        self._frame = zstandard.ZstdDecompressor().decompressobj()
        self._fed = False  # current frame has received input
        self._buffer = bytearray()
        self._done = False

    def _fill(self) -> None:
        data = self.raw.read(self.read_size)
        if not data:
            self._done = True
            if self._fed and not self._frame.eof:
                raise InputError(
                    f"{self.path} is truncated: the zstd stream ends inside a frame at compressed byte "
                    f"{self.raw.consumed:,} (the file is incomplete; download or copy it again). "
                    "--skip-bad-lines does not skip this: it is for malformed JSON lines only.")
            return
        while data:
            try:
                out = self._frame.decompress(data)
            except self._zstd.ZstdError as exc:
                raise InputError(
                    f"{self.path} is corrupt: zstd error near compressed byte {self.raw.consumed:,}: {exc} "
                    "(re-download the file; --skip-bad-lines does not skip this)") from exc
            self._fed = True
            self._buffer += out
            if self._frame.eof:
                data = self._frame.unused_data
                self._frame = self._zstd.ZstdDecompressor().decompressobj()
                self._fed = False
            else:
                data = b""

    def read(self, n: int) -> bytes:
        while len(self._buffer) < n and not self._done:
            self._fill()
        out = bytes(self._buffer[:n])
        del self._buffer[:n]
        return out

    def close(self) -> None:
        self._buffer = bytearray()


def _open_stream(path: str, raw: _RawCounter):
    kind = compression_of(path)
    if kind == "zst":
        return _ZstdStream(path, raw)
    if kind == "gz":
        return gzip.GzipFile(fileobj=raw, mode="rb")
    return raw


def iter_chunks(path: str, chunk_bytes: int = 1 << 20, max_line_bytes: Optional[int] = None,
                skip_long_lines: bool = False) -> Iterator[Chunk]:
    """Yield line-aligned chunks of about ``chunk_bytes`` decompressed bytes from ``path``.

    Memory is bounded by ``chunk_bytes`` plus the longest line, and the longest line by
    ``max_line_bytes``: a longer one raises InputError (or, with ``skip_long_lines``, is dropped
    while it streams past and reported in the next chunk's ``long_lines``). A JSON array file
    (``[...]``) is rejected: it cannot be streamed line by line.
    """
    line_no = 1
    pending = b""
    first = True
    dropping = False  # inside a too-long line that is being skipped
    long_lines: List[int] = []

    def too_long(size: int) -> None:
        if not skip_long_lines:
            raise InputError(
                f"{path}:{line_no}: a line of more than {max_line_bytes:,} bytes (--max-document-bytes; "
                f"{size:,} read so far). Raise --max-document-bytes, or pass --skip-long-documents to skip such lines.")
        long_lines.append(line_no)

    with open(path, "rb", buffering=0) as f:
        raw = _RawCounter(f)
        stream = _open_stream(path, raw)
        try:
            while True:
                try:
                    data = stream.read(chunk_bytes)
                except InputError:
                    raise
                except Exception as exc:  # OSError/EOFError from gzip (truncated or corrupt)
                    raise InputError(
                        f"{path} is truncated or corrupt: cannot decompress near line {line_no} (compressed "
                        f"byte {raw.consumed:,}): {exc}. Download or copy the file again; --skip-bad-lines "
                        "does not skip this (it is for malformed JSON lines only).") from exc
                if first and data:
                    first = False
                    if data.lstrip()[:1] == b"[":
                        raise InputError(
                            f"{path} is a JSON array, not JSON lines (one object per line). Convert "
                            f"it first, e.g. `jq -c '.[]' {path} > {os.path.splitext(path)[0]}.jsonl`."
                        )
                if not data:
                    break
                if dropping:
                    nl = data.find(b"\n")
                    if nl < 0:
                        continue
                    data, dropping, line_no = data[nl + 1:], False, line_no + 1
                if max_line_bytes and pending:
                    nl = data.find(b"\n")
                    size = len(pending) + (nl if nl >= 0 else len(data))
                    if size > max_line_bytes:
                        too_long(size)
                        pending = b""
                        if nl < 0:
                            dropping = True
                            continue
                        data, line_no = data[nl + 1:], line_no + 1
                if not data:
                    continue
                buf = pending + data if pending else data
                cut = buf.rfind(b"\n")
                if cut < 0:
                    pending = buf  # one line longer than the chunk: keep reading
                    if max_line_bytes and len(pending) > max_line_bytes:
                        too_long(len(pending))
                        pending, dropping = b"", True
                    continue
                blob, pending = buf[: cut + 1], buf[cut + 1 :]
                yield Chunk(path, line_no, blob, raw.consumed, tuple(long_lines))
                long_lines.clear()
                line_no += blob.count(b"\n")
            if pending or long_lines:
                yield Chunk(path, line_no, pending, raw.consumed, tuple(long_lines))
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
