"""tools/preprocess_data.py: round trips, worker-count invariance, bad input, atomic outputs."""

import gzip
import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import zstandard

from megatron_spiral.data.config import PreprocessConfig
from megatron_spiral.data.jsonl import InputError, iter_chunks, resolve_inputs
from megatron_spiral.data.preprocess import PreprocessError, run_preprocess
from megatron_spiral.data.tokenizer_training import TrainTokenizerConfig, train_tokenizer
from megatron_spiral.tokenizer import TokenizerConfig, build_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = ("alpha beta gamma delta epsilon zeta theta lambda Ünïcödé 中文 🙂 naïve 12345 {x: [1, 2]} "
         "the of and to in is was for on that with").split()


def make_records(n, seed=0):
    rng = random.Random(seed)
    recs = []
    for i in range(n):
        text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 80)))
        if i % 7 == 0:
            text += "\n\n  indented line\twith tab\r\n"
        recs.append({"text": text, "title": f"Doc {i}: {rng.choice(WORDS)}",
                     "meta": {"pile_set_name": rng.choice(["Pile-CC", "Github", "ArXiv"])}})
    return recs


def write_lines(path, lines):
    """``lines``: JSON-able objects or raw bytes; compression from the file name."""
    data = b"".join((l if isinstance(l, bytes) else json.dumps(l).encode()) + b"\n" for l in lines)
    if str(path).endswith((".zst", ".zstd")):
        data = zstandard.ZstdCompressor().compress(data)
    elif str(path).endswith(".gz"):
        data = gzip.compress(data)
    with open(path, "wb") as f:
        f.write(data)
    return str(path)


@pytest.fixture(scope="module")
def tok_cfg(tmp_path_factory):
    d = tmp_path_factory.mktemp("bpe")
    corpus = write_lines(d / "c.jsonl", make_records(300, seed=1))
    path = train_tokenizer(TrainTokenizerConfig(input=[corpus], output_dir=str(d), vocab_size=500, progress=False))
    return TokenizerConfig("HuggingFaceTokenizer", tokenizer_model=path)


def read_dataset(prefix):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(prefix)
    return ds, [ds[i].tolist() for i in range(len(ds))]


def run(tmp_path, tok_cfg, inputs, **kw):
    kw.setdefault("progress", False)
    cfg = PreprocessConfig(input=[str(p) for p in inputs], output_prefix=str(tmp_path / "out" / "ds"), **kw)
    return run_preprocess(cfg, tok_cfg)


def outputs(tmp_path):
    d = tmp_path / "out"
    return sorted(os.listdir(d)) if d.exists() else []


@pytest.mark.parametrize("suffix, workers", [(".jsonl", 1), (".jsonl", 2), (".jsonl.zst", 1), (".jsonl.zst", 2),
                                             (".jsonl.gz", 1), (".json", 1)])
def test_round_trip(tmp_path, tok_cfg, suffix, workers):
    recs = make_records(150)
    # Two input files, the second compressed the same way, to check file order is kept.
    inputs = [write_lines(tmp_path / f"a{suffix}", recs[:100]), write_lines(tmp_path / f"b{suffix}", recs[100:])]
    summary = run(tmp_path, tok_cfg, inputs, json_keys=["text", "title"], append_eod=True, workers=workers,
                  chunk_mb=0.002)  # ~2 KB chunks: many work items in flight
    tok = build_tokenizer(tok_cfg)
    assert summary.documents == 150 and summary.dtype == "uint16"
    for key in ("text", "title"):
        ds, docs = read_dataset(str(tmp_path / "out" / f"ds_{key}_document"))
        assert ds.index.dtype == np.uint16
        assert docs == [tok.tokenize(r[key]) + [tok.eod] for r in recs]
        assert summary.tokens[key] == sum(map(len, docs))
    assert outputs(tmp_path) == ["ds_text_document.bin", "ds_text_document.idx",
                                 "ds_title_document.bin", "ds_title_document.idx"]


def test_output_identical_for_any_worker_count(tmp_path, tok_cfg):
    src = write_lines(tmp_path / "a.jsonl.zst", make_records(400, seed=3))
    blobs = []
    for workers in (1, 2):
        cfg = PreprocessConfig(input=[src], output_prefix=str(tmp_path / f"w{workers}"), workers=workers,
                               append_eod=True, chunk_mb=0.001, progress=False)
        run_preprocess(cfg, tok_cfg)
        blobs.append([open(tmp_path / f"w{workers}_text_document{e}", "rb").read() for e in (".bin", ".idx")])
    assert blobs[0] == blobs[1]


def test_no_eod_and_inputs_from_directory_and_glob(tmp_path, tok_cfg):
    recs = make_records(40)
    d = tmp_path / "in"
    d.mkdir()
    write_lines(d / "02.jsonl", recs[20:])
    write_lines(d / "01.jsonl.zst", recs[:20])
    (d / "notes.txt").write_text("ignored")
    assert [os.path.basename(p) for p in resolve_inputs([str(d)])] == ["01.jsonl.zst", "02.jsonl"]
    assert resolve_inputs([str(d / "*.jsonl*")]) == resolve_inputs([str(d)])
    run(tmp_path, tok_cfg, [d])
    tok = build_tokenizer(tok_cfg)
    _, docs = read_dataset(str(tmp_path / "out" / "ds_text_document"))
    assert docs == [tok.tokenize(r["text"]) for r in recs]


def test_multiframe_zst_long_lines_crlf_blank_and_no_final_newline(tmp_path, tok_cfg):
    recs = make_records(30)
    recs[5]["text"] = "long " * 3000  # 15 KB line, larger than the 2 KB chunk
    part1 = b"".join(json.dumps(r).encode() + b"\r\n" for r in recs[:15]) + b"\n   \n"
    part2 = b"\n".join(json.dumps(r).encode() for r in recs[15:])  # no trailing newline
    c = zstandard.ZstdCompressor()
    path = tmp_path / "multi.jsonl.zst"
    path.write_bytes(c.compress(part1) + c.compress(part2))  # two zstd frames
    summary = run(tmp_path, tok_cfg, [path], chunk_mb=0.002, append_eod=True)
    tok = build_tokenizer(tok_cfg)
    _, docs = read_dataset(str(tmp_path / "out" / "ds_text_document"))
    assert docs == [tok.tokenize(r["text"]) + [tok.eod] for r in recs]
    assert summary.blank == 2 and summary.lines == 32


def test_chunks_are_line_aligned_and_bounded(tmp_path):
    recs = make_records(200)
    path = write_lines(tmp_path / "a.jsonl.gz", recs)
    chunks = list(iter_chunks(path, chunk_bytes=1000))
    longest = max(len(json.dumps(r)) + 1 for r in recs)
    assert all(len(c.blob) <= 1000 + longest and c.blob.endswith(b"\n") for c in chunks)
    assert [c.first_line for c in chunks][:2] == [1, 1 + chunks[0].blob.count(b"\n")]
    assert b"".join(c.blob for c in chunks) == gzip.decompress(open(path, "rb").read())


BAD = [
    (b'{"text": "unterminated', "malformed JSON"),
    (b'{"title": "no text key"}', "missing key"),
    (b'{"text": 42}', "non-string value"),
    (b'{"text": "bad \xff\xfe bytes"}', "invalid UTF-8"),
    (b'["not", "an", "object"]', "not a JSON object"),
    (b'{"text": "lone \\ud800 surrogate"}', "invalid UTF-8"),
]


@pytest.mark.parametrize("line, reason", BAD, ids=[r for _, r in BAD])
def test_bad_line_stops_with_location_and_writes_nothing(tmp_path, tok_cfg, line, reason):
    recs = make_records(10)
    path = write_lines(tmp_path / "in.jsonl.zst", recs[:6] + [line] + recs[6:])
    with pytest.raises(PreprocessError) as err:
        run(tmp_path, tok_cfg, [path])
    assert f"in.jsonl.zst:7: {reason}" in str(err.value) and "--skip-bad-lines" in str(err.value)
    assert outputs(tmp_path) == []  # neither outputs nor the hidden staging directory remain


def test_skip_bad_lines_counts_them(tmp_path, tok_cfg):
    recs = make_records(12)
    lines = recs[:3] + [b for b, _ in BAD] + recs[3:]
    path = write_lines(tmp_path / "in.jsonl", lines)
    summary = run(tmp_path, tok_cfg, [path], skip_bad_lines=True, append_eod=True)
    assert summary.documents == 12
    assert sum(summary.skipped.values()) == len(BAD)
    assert summary.skipped["invalid_utf8"] == 2 and summary.skipped["missing_key"] == 1
    assert [ex.line for ex in summary.examples] == list(range(4, 4 + len(BAD)))
    text = summary.format()
    assert "skipped    : 6 bad line(s)" in text and "malformed JSON: 1" in text
    tok = build_tokenizer(tok_cfg)
    _, docs = read_dataset(str(tmp_path / "out" / "ds_text_document"))
    assert docs == [tok.tokenize(r["text"]) + [tok.eod] for r in recs]


def test_cli_bad_input_exit_code_and_nothing_left(tmp_path, tok_cfg):
    path = write_lines(tmp_path / "in.jsonl", make_records(3) + [b"{oops"])
    done = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", "preprocess_data.py"), "--input", path, "--output-prefix",
         str(tmp_path / "out" / "ds"), "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model",
         tok_cfg.tokenizer_model, "--workers", "2", "--no-progress"],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 1, done.stderr
    assert "in.jsonl:4: malformed JSON" in done.stderr
    assert outputs(tmp_path) == []


def test_cli_help():
    done = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "preprocess_data.py"), "--help"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0
    for flag in ("--input", "--output-prefix", "--json-keys", "--append-eod", "--workers", "--log-interval",
                 "--skip-bad-lines", "--include-subsets", "--exclude-subsets", "--tokenizer-type",
                 "--tokenizer-model", "--vocab-file", "--merge-file", "--vocab-size"):
        assert flag in done.stdout


def test_rerun_replaces_and_failed_rerun_keeps_previous(tmp_path, tok_cfg):
    tok = build_tokenizer(tok_cfg)
    first, second = make_records(8, seed=5), make_records(5, seed=6)
    killed = tmp_path / "out" / ".ds.preprocess-999999999-x"  # staging dir of a SIGKILLed run (dead pid)
    killed.mkdir(parents=True)
    run(tmp_path, tok_cfg, [write_lines(tmp_path / "a.jsonl", first)])
    assert not killed.exists()
    stale_cache = tmp_path / "out" / "ds_text_document" / "cache" / "GPTDataset_indices"
    stale_cache.mkdir(parents=True)  # megatron's default index cache for this prefix
    summary = run(tmp_path, tok_cfg, [write_lines(tmp_path / "b.jsonl", second)])
    _, docs = read_dataset(str(tmp_path / "out" / "ds_text_document"))
    assert docs == [tok.tokenize(r["text"]) for r in second]
    assert not (tmp_path / "out" / "ds_text_document").exists() and summary.removed_caches
    before = [open(tmp_path / "out" / f"ds_text_document{e}", "rb").read() for e in (".bin", ".idx")]
    with pytest.raises(PreprocessError):
        run(tmp_path, tok_cfg, [write_lines(tmp_path / "c.jsonl", first + [b"{bad"])])
    after = [open(tmp_path / "out" / f"ds_text_document{e}", "rb").read() for e in (".bin", ".idx")]
    assert before == after and outputs(tmp_path) == ["ds_text_document.bin", "ds_text_document.idx"]


class _InterruptingTokenizer:
    """Delegates to a real tokenizer, then simulates Ctrl-C in the middle of the run."""

    def __init__(self, inner, after):
        self.inner, self.calls, self.after = inner, 0, after

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def tokenize_batch(self, texts):
        self.calls += 1
        if self.calls > self.after:
            raise KeyboardInterrupt
        return self.inner.tokenize_batch(texts)


def test_interrupt_leaves_nothing(tmp_path, tok_cfg):
    path = write_lines(tmp_path / "a.jsonl", make_records(100))
    cfg = PreprocessConfig(input=[path], output_prefix=str(tmp_path / "out" / "ds"), chunk_mb=0.001, progress=False)
    with pytest.raises(KeyboardInterrupt):
        run_preprocess(cfg, tok_cfg, tokenizer=_InterruptingTokenizer(build_tokenizer(tok_cfg), after=3))
    assert outputs(tmp_path) == []


def test_subset_filters(tmp_path, tok_cfg):
    recs = make_records(60)
    recs.append({"text": "no meta at all"})
    path = write_lines(tmp_path / "a.jsonl", recs)
    s = run(tmp_path, tok_cfg, [path], include_subsets=["Github,ArXiv"])
    want = [r for r in recs if r.get("meta", {}).get("pile_set_name") in ("Github", "ArXiv")]
    assert s.documents == len(want) and s.filtered == len(recs) - len(want)
    assert set(s.subsets) == {"Github", "ArXiv"}
    s = run(tmp_path, tok_cfg, [path], exclude_subsets=["Github"])
    assert s.documents == sum(1 for r in recs if r.get("meta", {}).get("pile_set_name") != "Github")
    s = run(tmp_path, tok_cfg, [path], include_subsets=["Pile-CC", "Githb"])
    assert any("Githb" in n for n in s.notes)
    with pytest.raises(PreprocessError, match="no documents"):
        run(tmp_path, tok_cfg, [path], include_subsets=["Enron Emails"])
    assert outputs(tmp_path) == ["ds_text_document.bin", "ds_text_document.idx"]


def test_input_errors(tmp_path, tok_cfg):
    with pytest.raises(InputError, match="no such file"):
        resolve_inputs([str(tmp_path / "missing.jsonl")])
    with pytest.raises(InputError, match="unsupported"):
        resolve_inputs([write_lines(tmp_path / "a.txt", [{"text": "x"}])])
    arr = tmp_path / "arr.json"
    arr.write_text(json.dumps([{"text": "a"}, {"text": "b"}], indent=1))
    with pytest.raises(InputError, match="JSON array"):
        run(tmp_path, tok_cfg, [arr])
    with pytest.raises(PreprocessError, match="not a directory"):
        run_preprocess(PreprocessConfig(input=[str(arr)], output_prefix=str(tmp_path) + "/"), tok_cfg)
    assert outputs(tmp_path) == []


def test_empty_documents_are_dropped_and_counted_like_megatron(tmp_path, tok_cfg):
    """Megatron-LM's encode() keeps a document with no tokens as a document without sequences (no
    EOD either) and goes on; strict mode must not stop on it."""
    recs = make_records(5)
    path = write_lines(tmp_path / "in.jsonl", recs[:2] + [{"text": ""}] + recs[2:])
    summary = run(tmp_path, tok_cfg, [path], append_eod=True)
    assert summary.empty == 1 and summary.documents == 6
    assert "1 empty (no tokens" in summary.format()
    tok = build_tokenizer(tok_cfg)
    ds, docs = read_dataset(str(tmp_path / "out" / "ds_text_document"))
    assert docs == [tok.tokenize(r["text"]) + [tok.eod] for r in recs]  # sequences: the 5 real ones
    assert ds.document_indices.tolist() == [0, 1, 2, 2, 3, 4, 5]  # the empty document has no sequence


def _punkt_for_tests(monkeypatch):
    """An untrained punkt (NLTK's defaults): the trained model may not be installed here."""
    from nltk.tokenize.punkt import PunktSentenceTokenizer

    import megatron_spiral.data.sentences as sentences

    monkeypatch.setattr(sentences, "load_punkt", lambda lang="english": PunktSentenceTokenizer())
    return PunktSentenceTokenizer()


@pytest.mark.parametrize("keep_newlines", [False, True])
def test_split_sentences_writes_one_sequence_per_sentence(tmp_path, tok_cfg, monkeypatch, keep_newlines):
    punkt = _punkt_for_tests(monkeypatch)
    texts = ["First one here. Second one follows!\nThird line? Yes.", "Single sentence", ""]
    path = write_lines(tmp_path / "in.jsonl", [{"text": t} for t in texts])
    summary = run(tmp_path, tok_cfg, [path], append_eod=True, split_sentences=True, keep_newlines=keep_newlines)
    tok = build_tokenizer(tok_cfg)
    from megatron_spiral.data.sentences import sentence_splitter

    splitter = sentence_splitter(keep_newlines, punkt=punkt)
    expected_docs = []
    for t in texts:
        seqs = [tok.tokenize(s) for s in splitter.tokenize(t)]
        seqs = [s for s in seqs if s]
        if seqs:
            seqs[-1] = seqs[-1] + [tok.eod]
        expected_docs.append(seqs)
    ds, seqs = read_dataset(str(tmp_path / "out" / "ds_text_sentence"))
    assert seqs == [s for d in expected_docs for s in d]
    assert len(expected_docs[0]) == 4  # the first text really was split
    counts = [len(d) for d in expected_docs]
    assert ds.document_indices.tolist() == [0, counts[0], counts[0] + 1, counts[0] + 1]
    assert summary.empty == 1
    if keep_newlines:  # the newline stays inside a sentence instead of being dropped by punkt
        assert any("\n" in s for s in splitter.tokenize(texts[0]))


def test_split_sentences_without_punkt_says_how_to_get_it(tmp_path, tok_cfg, monkeypatch):
    import megatron_spiral.data.sentences as sentences

    def missing(lang="english"):
        raise sentences.SentenceSplitError(sentences.PUNKT_HELP)

    monkeypatch.setattr(sentences, "load_punkt", missing)
    path = write_lines(tmp_path / "in.jsonl", make_records(2))
    with pytest.raises(PreprocessError, match="nltk.downloader punkt_tab"):
        run(tmp_path, tok_cfg, [path], split_sentences=True)
    assert outputs(tmp_path) == []


def test_truncated_zst_is_an_error_even_with_skip_bad_lines(tmp_path, tok_cfg):
    path = write_lines(tmp_path / "in.jsonl.zst", make_records(400))
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
    with pytest.raises(InputError, match=r"in.jsonl.zst is truncated: .* compressed byte [\d,]+"):
        run(tmp_path, tok_cfg, [path], skip_bad_lines=True)
    assert outputs(tmp_path) == []
    with open(path, "wb") as f:  # corrupt frame content
        f.write(data[:40] + bytes(64) + data[104:])
    with pytest.raises(InputError, match="in.jsonl.zst is (corrupt|truncated)"):
        run(tmp_path, tok_cfg, [path], skip_bad_lines=True)


def test_long_lines_refused_or_skipped(tmp_path, tok_cfg):
    recs = make_records(4)
    big = {"text": "word " * 300_000}  # ~1.5 MB
    path = write_lines(tmp_path / "in.jsonl", recs[:2] + [big] + recs[2:])
    limit = 2**20
    with pytest.raises(InputError, match=r"in.jsonl:3: a line of more than 1,048,576 bytes"):
        run(tmp_path, tok_cfg, [path], max_document_bytes=limit, chunk_mb=0.25)
    summary = run(tmp_path, tok_cfg, [path], max_document_bytes=limit, chunk_mb=0.25, skip_long_documents=True)
    assert summary.documents == 4 and summary.skipped["too_long"] == 1
    assert [ex.line for ex in summary.examples] == [3]
    tok = build_tokenizer(tok_cfg)
    _, docs = read_dataset(str(tmp_path / "out" / "ds_text_document"))
    assert docs == [tok.tokenize(r["text"]) for r in recs]


def test_partitions_and_megatron_flags_accepted(tmp_path, tok_cfg):
    path = write_lines(tmp_path / "in.jsonl", make_records(6))
    done = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", "preprocess_data.py"), "--input", path, "--output-prefix",
         str(tmp_path / "out" / "ds"), "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model",
         tok_cfg.tokenizer_model, "--workers", "1", "--partitions", "2", "--keep-sequential-samples",
         "--log-interval", "1000", "--no-progress"],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "--partitions 2: documents are written in input order" in done.stdout
    tok = build_tokenizer(tok_cfg)
    _, docs = read_dataset(str(tmp_path / "out" / "ds_text_document"))
    assert docs == [tok.tokenize(r["text"]) for r in make_records(6)]
