"""JSON lines -> Megatron indexed datasets, streamed, parallel and all-or-nothing.

The main process reads and decompresses the inputs into line-aligned chunks, hands them to
``--workers`` tokenizer processes (megatron_spiral/data/batch.py) and writes the results *in input
order*, so the output is byte-identical for any worker count. At most a few chunks per worker are in
flight: ``Pool.imap`` would read the whole input ahead into memory, which for a 15 GB shard is the
difference between flat memory and an OOM.

Outputs are written into a hidden staging directory next to the output prefix and moved into place
(``os.replace``) only after every dataset is complete; on any error, Ctrl-C or SIGTERM the staging
directory is deleted, so the output prefix only ever holds finished datasets (the old ones, or the
new ones).
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import signal
import sys
import tempfile
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Dict, Iterator, List

from megatron_spiral.data.batch import (
    REASONS,
    BadLine,
    BatchProcessor,
    BatchResult,
    ProcessorSpec,
    init_worker,
    run_in_worker,
)
from megatron_spiral.data.config import PreprocessConfig
from megatron_spiral.data.jsonl import InputError, iter_chunks, resolve_inputs

PILE_SUBSETS = (
    "Pile-CC", "PubMed Central", "Books3", "OpenWebText2", "ArXiv", "Github", "FreeLaw",
    "StackExchange", "USPTO Backgrounds", "PubMed Abstracts", "Gutenberg (PG-19)", "OpenSubtitles",
    "Wikipedia (en)", "DM Mathematics", "Ubuntu IRC", "BookCorpus2", "EuroParl", "HackerNews",
    "YoutubeSubtitles", "PhilPapers", "NIH ExPorter", "Enron Emails",
)


class PreprocessError(RuntimeError):
    """Preprocessing stopped; the message says where and how to fix it. Nothing was written."""


@dataclass
class Summary:
    files: List[str]
    outputs: Dict[str, str]
    dtype: str
    input_bytes: int = 0
    compressed_bytes: int = 0
    lines: int = 0
    documents: int = 0
    blank: int = 0
    filtered: int = 0
    empty: int = 0
    tokens: Counter = field(default_factory=Counter)
    skipped: Counter = field(default_factory=Counter)
    examples: List[BadLine] = field(default_factory=list)
    subsets: Counter = field(default_factory=Counter)
    seconds: Counter = field(default_factory=Counter)
    elapsed: float = 0.0
    removed_caches: List[str] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)

    def add(self, res: BatchResult) -> None:
        self.input_bytes += res.input_bytes
        self.lines += res.lines
        self.documents += res.documents
        self.blank += res.blank
        self.filtered += res.filtered
        self.empty += res.empty
        self.skipped.update(res.skipped)
        self.subsets.update(res.subsets)
        self.seconds.update(res.seconds)
        if len(self.examples) < 20:
            self.examples.extend(res.examples[: 20 - len(self.examples)])
        for key, arr in res.tokens.items():
            self.tokens[key] += int(arr.size)

    def format(self) -> str:
        el = max(self.elapsed, 1e-9)
        total_tokens = sum(self.tokens.values())
        rows = [
            "preprocess_data summary",
            f"  inputs     : {len(self.files)} file(s), {self.compressed_bytes / 2**20:,.1f} MiB on disk, "
            f"{self.input_bytes / 2**20:,.1f} MiB of JSON lines, {self.lines:,} lines",
            f"  documents  : {self.documents:,} written; {self.filtered:,} filtered out by subset; "
            f"{self.blank:,} blank lines ignored; {self.empty:,} empty (no tokens: kept as documents "
            "without sequences, as Megatron-LM)",
        ]
        skipped = sum(self.skipped.values())
        reasons = ", ".join(f"{REASONS[r]}: {n:,}" for r, n in sorted(self.skipped.items()))
        rows.append(f"  skipped    : {skipped:,} bad line(s){' (' + reasons + ')' if reasons else ''}")
        rows += [f"               e.g. {ex}" for ex in self.examples[:5]]
        for key, n in self.tokens.items():
            rows.append(f"  tokens     : {key}: {n:,} ({self.dtype}) -> {self.outputs[key]}.bin/.idx")
        if self.subsets:
            rows.append("  subsets    : " + ", ".join(f"{k}: {v:,}" for k, v in sorted(self.subsets.items(), key=str)))
        rows.append(
            f"  throughput : {self.elapsed:,.1f} s, {self.documents / el:,.0f} docs/s, "
            f"{total_tokens / el:,.0f} tokens/s, {self.input_bytes / 2**20 / el:,.1f} MB/s"
        )
        s = self.seconds
        rows.append(
            f"  time spent : read+decompress {s['read']:.1f} s, write {s['write']:.1f} s, waiting for "
            f"workers {s['wait']:.1f} s (main process); parse {s['parse']:.1f} s, tokenize "
            f"{s['tokenize']:.1f} s, pack {s['pack']:.1f} s (summed over workers; CPU {s['cpu']:.1f} s = "
            f"{total_tokens / max(s['cpu'], 1e-9):,.0f} tokens per CPU-second)"
        )
        rows += [f"  note       : {n}" for n in self.notes + [f"removed stale cache {c}" for c in self.removed_caches]]
        return "\n".join(rows)


class OutputStaging:
    """A hidden directory beside the output prefix; ``commit`` moves finished files into place."""

    def __init__(self, output_prefix: str, level: str = "document") -> None:
        self.level = level
        if not output_prefix or output_prefix.endswith(("/", os.sep)) or os.path.isdir(output_prefix):
            raise PreprocessError(
                f"--output-prefix {output_prefix!r} must be a path prefix such as data/pile_00, not a directory."
            )
        self.prefix = os.path.abspath(output_prefix)
        self.directory, base = os.path.split(self.prefix)
        os.makedirs(self.directory, exist_ok=True)
        self._tag = f".{base}.preprocess-"
        _remove_stale_staging(self.directory, self._tag)
        self.path = tempfile.mkdtemp(prefix=f"{self._tag}{os.getpid()}-", dir=self.directory)

    def final(self, key: str) -> str:
        return f"{self.prefix}_{key}_{self.level}"

    def staged(self, key: str) -> str:
        return os.path.join(self.path, f"{key}_{self.level}")

    def commit(self, keys: List[str]) -> List[str]:
        """Move every dataset into place; returns megatron cache dirs that became stale and were removed."""
        removed = []
        for key in keys:
            final = self.final(key)
            # The pair is published as a unit: the old .idx goes first, the new .idx comes last, so a
            # kill in between leaves a .bin without .idx (refused as missing, never mis-paired).
            if os.path.exists(final + ".idx"):
                os.remove(final + ".idx")
            os.replace(self.staged(key) + ".bin", final + ".bin")
            os.replace(self.staged(key) + ".idx", final + ".idx")
            # GPTDataset's default cache (PREFIX/cache/...) is keyed by path, not content: drop it.
            cache = os.path.join(final, "cache")
            if os.path.isdir(cache):
                shutil.rmtree(cache, ignore_errors=True)
                removed.append(cache)
                if os.path.isdir(final) and not os.listdir(final):
                    os.rmdir(final)
        return removed

    def cleanup(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def _remove_stale_staging(directory: str, tag: str) -> None:
    """Delete staging dirs left by killed runs (their pid is gone); live concurrent runs are kept."""
    for name in os.listdir(directory):
        if not name.startswith(tag):
            continue
        try:
            pid = int(name[len(tag):].split("-", 1)[0])
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(os.path.join(directory, name), ignore_errors=True)
        except (ValueError, PermissionError):
            pass


class _Progress:
    """tqdm bar on a terminal; a plain line every ``log_interval`` documents otherwise.

    The bar advances over on-disk (compressed) bytes, which is what bounds the ETA; the postfix gives
    documents/s, tokens/s and decompressed JSON MB/s.
    """

    def __init__(self, total_bytes: int, enabled: bool, log_interval: int) -> None:
        self.enabled, self.log_interval = enabled, max(1, log_interval)
        self.start = time.perf_counter()
        self.bar = None
        self._next_log = self.log_interval
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total_bytes, unit="B", unit_scale=True, unit_divisor=1024,
                            desc="preprocess", smoothing=0.05)

    def update(self, position: int, summary: Summary) -> None:
        if not self.enabled:
            return
        el = max(time.perf_counter() - self.start, 1e-9)
        tokens = sum(summary.tokens.values())
        rates = f"{summary.documents / el:,.0f} docs/s, {tokens / el:,.0f} tok/s, {summary.input_bytes / 2**20 / el:,.1f} MB/s of JSON"
        if self.bar is not None:
            self.bar.update(position - self.bar.n)
            self.bar.set_postfix_str(rates, refresh=False)
        elif summary.documents >= self._next_log:
            self._next_log = (summary.documents // self.log_interval + 1) * self.log_interval
            print(f"[preprocess] {summary.documents:,} documents, {tokens:,} tokens ({rates})", file=sys.stderr, flush=True)

    def warn(self, message: str) -> None:
        if self.bar is not None:
            self.bar.write(message, file=sys.stderr)
        else:
            print(message, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _timed(chunks: Iterator, seconds: Counter) -> Iterator:
    while True:
        t = time.perf_counter()
        try:
            chunk = next(chunks)
        except StopIteration:
            return
        finally:
            seconds["read"] += time.perf_counter() - t
        yield chunk


def _results(chunks, spec: ProcessorSpec, workers: int, tokenizer, seconds: Counter) -> Iterator[BatchResult]:
    """Results in input order, with a bounded number of chunks in flight."""
    if workers <= 1:
        processor = BatchProcessor(spec, tokenizer)
        for chunk in chunks:
            t = time.perf_counter()
            res = processor(chunk)
            seconds["wait"] += time.perf_counter() - t
            yield res
        return
    # spawn: workers start clean (no inherited tokenizer thread pools, no torch) and rebuild the tokenizer.
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(workers, initializer=init_worker, initargs=(spec,)) as pool:
        pending = deque()
        window = 2 * workers + 1
        for chunk in chunks:
            pending.append(pool.apply_async(run_in_worker, (chunk,)))
            if len(pending) >= window:
                t = time.perf_counter()
                res = pending.popleft().get()
                seconds["wait"] += time.perf_counter() - t
                yield res
        while pending:
            t = time.perf_counter()
            res = pending.popleft().get()
            seconds["wait"] += time.perf_counter() - t
            yield res


def _chunks(files: List[str], chunk_bytes: int, max_line_bytes: int, skip_long: bool):
    for path in files:
        yield from iter_chunks(path, chunk_bytes, max_line_bytes, skip_long)


def _raise_on_sigterm(signum, frame):
    raise KeyboardInterrupt("SIGTERM")


def run_preprocess(cfg: PreprocessConfig, tokenizer_config, tokenizer=None) -> Summary:
    """Preprocess ``cfg.input`` into ``{cfg.output_prefix}_{key}_document.bin/.idx``.

    Raises InputError/PreprocessError/TokenizerError with a message for the user; on any exception
    (KeyboardInterrupt included) no file is left at the output prefix.
    """
    from megatron_spiral.data.indexed_writer import IndexedDatasetWriter, optimal_dtype
    from megatron_spiral.tokenizer import build_tokenizer

    if not cfg.input:
        raise PreprocessError("--input is required (files, directories or globs of JSON lines).")
    if not cfg.output_prefix:
        raise PreprocessError("--output-prefix is required, e.g. --output-prefix data/pile_00.")
    keys = list(dict.fromkeys(cfg.json_keys or []))
    if not keys or any(not k or "/" in k or os.sep in k for k in keys):
        raise PreprocessError(f"--json-keys {cfg.json_keys} must be non-empty top-level key names without '/'.")
    if cfg.workers < 1 or cfg.chunk_mb <= 0 or cfg.partitions < 1:
        raise PreprocessError("--workers and --partitions must be >= 1 and --chunk-mb > 0.")
    if cfg.max_document_bytes < cfg.chunk_mb * 2**20:
        raise PreprocessError(f"--max-document-bytes {cfg.max_document_bytes:,} must be at least --chunk-mb "
                              f"({int(cfg.chunk_mb * 2**20):,} bytes).")
    if cfg.keep_newlines and not cfg.split_sentences:
        raise PreprocessError("--keep-newlines only applies with --split-sentences.")
    if cfg.split_sentences:
        from megatron_spiral.data.sentences import SentenceSplitError, load_punkt

        try:
            load_punkt()  # fail here, before any worker starts
        except SentenceSplitError as err:
            raise PreprocessError(str(err)) from None
    files = resolve_inputs(cfg.input)
    tokenizer = tokenizer if tokenizer is not None else build_tokenizer(tokenizer_config)
    dtype = optimal_dtype(tokenizer.vocab_size)
    include, exclude = cfg.subset_filter()
    spec = ProcessorSpec(tokenizer_config, keys, cfg.append_eod, cfg.skip_bad_lines, include, exclude,
                         cfg.subset_key, dtype.__name__, cfg.split_sentences, cfg.keep_newlines)

    staging = OutputStaging(cfg.output_prefix, "sentence" if cfg.split_sentences else "document")
    summary = Summary(files, {k: staging.final(k) for k in keys}, dtype.__name__)
    summary.compressed_bytes = sum(os.path.getsize(f) for f in files)
    if cfg.partitions > 1:
        summary.notes.append(
            f"--partitions {cfg.partitions}: documents are written in input order (Megatron-LM's order with "
            "--keep-sequential-samples); the parallelism comes from --workers")
    if cfg.subset_key == "meta.pile_set_name":
        unknown = sorted(((include or set()) | (exclude or set())) - set(PILE_SUBSETS))
        if unknown:
            summary.notes.append(f"not Pile subset names (typo?): {unknown}; known: {list(PILE_SUBSETS)}")
    file_base, acc = {}, 0
    for f in files:
        file_base[f], acc = acc, acc + os.path.getsize(f)
    progress = _Progress(summary.compressed_bytes, cfg.progress, cfg.log_interval)
    for note in summary.notes:
        progress.warn(f"warning: {note}")
    writers: Dict[str, IndexedDatasetWriter] = {}
    previous_sigterm = _install_sigterm()
    results = None
    start = time.perf_counter()
    try:
        writers = {k: IndexedDatasetWriter(staging.staged(k), dtype) for k in keys}
        chunks = _timed(_chunks(files, int(cfg.chunk_mb * 2**20), cfg.max_document_bytes, cfg.skip_long_documents),
                        summary.seconds)
        results = _results(chunks, spec, cfg.workers, tokenizer, summary.seconds)
        warned = 0
        for res in results:
            if res.error is not None:
                raise PreprocessError(
                    f"{res.error}\nNothing was written. Fix or delete that line, or rerun with "
                    "--skip-bad-lines to skip such lines (they are counted in the summary)."
                )
            t = time.perf_counter()
            for k in keys:
                writers[k].add_documents(res.tokens[k], res.lengths[k], res.sequences.get(k))
            summary.seconds["write"] += time.perf_counter() - t
            for ex in res.examples[: max(0, 10 - warned)]:
                progress.warn(f"skipped {ex}")
                warned += 1
            summary.add(res)
            progress.update(file_base[res.path] + res.raw_offset, summary)
        if summary.documents == 0:
            raise PreprocessError(
                f"no documents to write: {summary.lines:,} lines read, {summary.filtered:,} filtered out, "
                f"{sum(summary.skipped.values()):,} skipped, {summary.blank:,} blank. Check --json-keys "
                "and the subset filters."
            )
        t = time.perf_counter()
        for w in writers.values():
            w.finalize()
        summary.seconds["write"] += time.perf_counter() - t
        summary.removed_caches = staging.commit(keys)
        summary.elapsed = time.perf_counter() - start
        if include:
            missing = sorted(include - set(summary.subsets))
            if missing:
                summary.notes.append(f"--include-subsets names that matched no document: {missing}")
        return summary
    finally:
        if results is not None:
            results.close()  # terminates the worker pool if we stopped early
        for w in writers.values():
            w.close()
        progress.close()
        staging.cleanup()
        _restore_sigterm(previous_sigterm)


def _install_sigterm():
    """Make SIGTERM unwind like Ctrl-C so the staging directory is removed (main thread only)."""
    try:
        return signal.signal(signal.SIGTERM, _raise_on_sigterm)
    except ValueError:  # not in the main thread
        return None


def _restore_sigterm(previous) -> None:
    if previous is not None:
        signal.signal(signal.SIGTERM, previous)


__all__ = ["run_preprocess", "Summary", "PreprocessError", "InputError", "OutputStaging", "PILE_SUBSETS"]
