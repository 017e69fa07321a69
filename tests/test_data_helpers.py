"""megatron's dataset index helpers: available from the wheel, and the NumPy fallback is exact."""

import numpy as np
import pytest

from megatron_spiral.data import helpers as H
from megatron_spiral.data.indexed_writer import IndexedDatasetWriter, optimal_dtype


def test_helpers_available_here():
    assert H.ensure_dataset_helpers() in ("extension", "compiled", "python")
    from megatron.core.datasets import helpers  # what GPTDataset imports

    assert hasattr(helpers, "build_sample_idx")


def _cpp():
    try:
        from megatron.core.datasets import helpers_cpp
    except ImportError:
        pytest.skip("no C++ helpers to compare with")
    if getattr(helpers_cpp, "__provider__", "extension") == "python":
        pytest.skip("C++ helpers replaced by the fallback in this process")
    return helpers_cpp


def test_fallback_build_sample_idx_matches_cpp():
    cpp = _cpp()
    rng = np.random.default_rng(0)
    for trial in range(300):
        n = int(rng.integers(1, 30))
        sizes = rng.integers(0 if trial % 3 == 0 else 1, 40, size=n).astype(np.int32)
        sizes[0] = max(sizes[0], 3)
        epochs = int(rng.integers(1, 3))
        doc_idx = np.tile(np.arange(n, dtype=np.int32), epochs)
        rng.shuffle(doc_idx)
        seq = int(rng.integers(2, 25))
        for drop in (True, False):
            for extra in (0, 1):
                if not drop and sizes[doc_idx[-1]] == 0:
                    continue  # the C++ reads past the end in this corner; megatron never builds it
                want = cpp.build_sample_idx_int32(sizes, doc_idx, seq, epochs, int(sizes.sum()), drop, extra)
                got = H.build_sample_idx(sizes, doc_idx, seq, epochs, int(sizes.sum()), drop, extra)
                assert np.array_equal(want, got), (trial, drop, extra)


def test_fallback_blending_matches_cpp():
    cpp = _cpp()
    rng = np.random.default_rng(1)
    for _ in range(30):
        k = int(rng.integers(1, 6))
        w = rng.random(k)
        w /= w.sum()
        size = int(rng.integers(1, 400))
        a = [np.zeros(size, np.int16), np.zeros(size, np.int64)]
        b = [x.copy() for x in a]
        cpp.build_blending_indices(a[0], a[1], w, k, size, False)
        H.build_blending_indices(b[0], b[1], w, k, size, False)
        assert all(np.array_equal(x, y) for x, y in zip(a, b))
        sizes = rng.integers(1, 40, size=k).astype(np.int64)
        a = [np.zeros(int(sizes.sum()), np.int16), np.zeros(int(sizes.sum()), np.int64)]
        b = [x.copy() for x in a]
        cpp.build_exhaustive_blending_indices(a[0], a[1], sizes, k)
        H.build_exhaustive_blending_indices(b[0], b[1], sizes, k)
        assert all(np.array_equal(x, y) for x, y in zip(a, b))


def test_gpt_dataset_with_fallback_equals_cpp(tmp_path, monkeypatch):
    """End to end: megatron's GPTDataset built through the NumPy module gives the same samples."""
    _cpp()
    from megatron.core.datasets import helpers as mh

    from megatron_spiral.data.config import DataConfig
    from megatron_spiral.data.gpt_data import build_train_valid_test_datasets
    from megatron_spiral.tokenizer import NullTokenizer

    rng = np.random.default_rng(2)
    docs = [rng.integers(0, 1000, size=int(rng.integers(1, 90))) for _ in range(300)]
    w = IndexedDatasetWriter(str(tmp_path / "d"), optimal_dtype(1002))
    w.add_documents(np.concatenate(docs), np.array([len(d) for d in docs]))
    w.finalize()
    tok = NullTokenizer(1000)

    def build(cache):
        cfg = DataConfig(data_path=[str(tmp_path / "d")], split="90,10,0", seq_length=64,
                         data_cache_path=str(tmp_path / cache))
        return build_train_valid_test_datasets(cfg, tok, [100, 10, 0])

    fast = build("c1")
    fallback = H.python_helpers_module()
    for name in ("build_sample_idx_int32", "build_sample_idx_int64", "build_blending_indices"):
        monkeypatch.setattr(mh, name, getattr(fallback, name))
    slow = build("c2")
    for a, b in zip(fast[:2], slow[:2]):
        assert np.array_equal(a.sample_index, b.sample_index)
        assert all(np.array_equal(a[i]["tokens"], b[i]["tokens"]) for i in range(len(a)))


def test_writer_is_byte_identical_to_megatron_builder(tmp_path):
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

    rng = np.random.default_rng(3)
    for vocab in (1000, 100000):  # uint16 and int32 token files
        dtype = optimal_dtype(vocab)
        docs = [rng.integers(0, vocab, size=int(rng.integers(1, 200))) for _ in range(500)]
        ref = IndexedDatasetBuilder(str(tmp_path / f"ref{vocab}.bin"), dtype=dtype)
        for d in docs:
            ref.add_document(torch.tensor(d), [len(d)])
        ref.finalize(str(tmp_path / f"ref{vocab}.idx"))
        ours = IndexedDatasetWriter(str(tmp_path / f"ours{vocab}"), dtype)
        for part in (docs[:1], docs[1:123], docs[123:]):
            ours.add_documents(np.concatenate(part), np.array([len(d) for d in part]))
        ours.finalize()
        for ext in (".bin", ".idx"):
            assert (tmp_path / f"ref{vocab}{ext}").read_bytes() == (tmp_path / f"ours{vocab}{ext}").read_bytes()
        ds = IndexedDataset(str(tmp_path / f"ours{vocab}"))
        assert ds.index.dtype == dtype and len(ds) == 500 and np.array_equal(ds[77], docs[77])
    assert optimal_dtype(50277) == np.uint16 and optimal_dtype(128256) == np.int32
    with pytest.raises(ValueError, match="lengths"):
        IndexedDatasetWriter(str(tmp_path / "bad"), np.uint16).add_documents(np.arange(3), np.array([2]))
