"""Training data path: GPTDataset blends, mock data, resumable and data-parallel iterators."""

import json
import signal

import numpy as np
import pytest
import torch

from megatron_spiral.data.config import DataConfig, PreprocessConfig
from megatron_spiral.data.gpt_data import DataError, build_train_valid_test_datasets, megatron_num_samples, parse_blend
from megatron_spiral.data.loader import ResumableDistributedSampler, build_data_loader, build_train_valid_test_data_iterators
from megatron_spiral.data.preprocess import run_preprocess
from megatron_spiral.tokenizer import TokenizerConfig, build_tokenizer

VOCAB = 60000
SEQ = 32
TOK_CFG = TokenizerConfig("NullTokenizer", vocab_size=VOCAB)


def _make_source(path, first_id, n_docs, seed):
    """Documents of globally unique ids, so every token tells which document/position it came from."""
    rng = np.random.default_rng(seed)
    docs, nxt = [], first_id
    for _ in range(n_docs):
        n = int(rng.integers(1, 40))
        docs.append(list(range(nxt, nxt + n)))
        nxt += n
    with open(path, "w") as f:
        for d in docs:
            f.write(json.dumps({"text": " ".join(map(str, d))}) + "\n")
    return docs


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    d = tmp_path_factory.mktemp("gpt")
    out = {}
    for name, first, n, seed in (("a", 0, 200, 1), ("b", 20000, 300, 2)):
        docs = _make_source(d / f"{name}.jsonl", first, n, seed)
        cfg = PreprocessConfig(input=[str(d / f"{name}.jsonl")], output_prefix=str(d / name), append_eod=True,
                               progress=False)
        run_preprocess(cfg, TOK_CFG)
        out[name] = (str(d / f"{name}_text_document"), docs)
    out["cache"] = str(d / "cache")
    return out


def _stream(gpt_dataset, docs, eod):
    """The token stream megatron samples from: source documents in the dataset's document order."""
    return [t for j in gpt_dataset.document_index for t in docs[j] + [eod]]


def _window_ok(sample, gpt_dataset, stream, idx):
    text = torch.cat([sample["tokens"], sample["labels"][-1:]]).tolist()
    start = int(gpt_dataset.shuffle_index[idx]) * SEQ
    return text == stream[start:start + SEQ + 1]


def test_blend_samples_are_windows_of_the_source_documents(corpora):
    (pa, da), (pb, db) = corpora["a"], corpora["b"]
    cfg = DataConfig(data_path=["0.3", pa, "0.7", pb], split="90,8,2", seq_length=SEQ,
                     data_cache_path=corpora["cache"], num_workers=0)
    tok = build_tokenizer(TOK_CFG)
    train, valid, test = build_train_valid_test_datasets(cfg, tok, [200, 20, 10])
    assert len(train) == 200 and len(valid) == 20 and len(test) == 10
    streams = [_stream(ds, docs, tok.eod) for ds, docs in zip(train.datasets, (da, db))]
    counts = np.bincount(train.dataset_index, minlength=2)
    assert abs(counts[1] / counts.sum() - 0.7) < 0.02
    for i in range(len(train)):
        sample = train[i]
        assert sample["tokens"].shape == (SEQ,) and sample["tokens"].dtype == torch.int64
        assert set(sample) >= {"tokens", "labels", "loss_mask", "position_ids"} and "attention_mask" not in sample
        assert torch.equal(sample["tokens"][1:], sample["labels"][:-1])
        assert torch.equal(sample["position_ids"], torch.arange(SEQ)) and bool(sample["loss_mask"].all())
        d = int(train.dataset_index[i])
        assert _window_ok(sample, train.datasets[d], streams[d], int(train.dataset_sample_index[i]))
    # Train documents are the first 90% of each source, valid the next 8%.
    assert set(train.datasets[0].document_index) <= set(range(180))
    assert set(valid.datasets[0].document_index) <= set(range(180, 196))


def test_single_dataset_eod_mask_loss_and_cache_reuse(corpora):
    pa, da = corpora["a"]
    tok = build_tokenizer(TOK_CFG)
    cfg = DataConfig(data_path=[pa], split="100,0,0", seq_length=SEQ, eod_mask_loss=True,
                     data_cache_path=corpora["cache"], num_workers=0)
    train, valid, test = build_train_valid_test_datasets(cfg, tok, [50, 0, 0])
    assert valid is None and test is None
    stream = _stream(train, da, tok.eod)
    for i in range(len(train)):
        s = train[i]
        assert _window_ok(s, train, stream, i)
        assert torch.equal(s["loss_mask"] == 0, s["tokens"] == tok.eod)
    again = build_train_valid_test_datasets(cfg, tok, [50, 0, 0])[0]  # from the on-disk cache
    assert np.array_equal(again.sample_index, train.sample_index)


def _batches(iterator, n):
    return [next(iterator)["tokens"] for _ in range(n)]


def test_resume_skips_exactly_the_consumed_samples(corpora):
    pa, _ = corpora["a"]
    (pb, _) = corpora["b"]
    cfg = DataConfig(data_path=[pa, pb], split="98,2,0", seq_length=SEQ, data_cache_path=corpora["cache"],
                     num_workers=0)
    tok = build_tokenizer(TOK_CFG)
    nums = megatron_num_samples(train_iters=10, eval_iters=2, eval_interval=5, global_batch_size=8)
    assert nums == [80, 48, 16]
    full, valid, _ = build_train_valid_test_data_iterators(cfg, tok, [80, 48, 0], micro_batch_size=4)
    reference = _batches(full, 20)  # 10 iterations x 2 micro-batches of 4
    with pytest.raises(StopIteration):
        next(full)
    resumed, _, _ = build_train_valid_test_data_iterators(cfg, tok, [80, 48, 0], micro_batch_size=4,
                                                          consumed_train_samples=3 * 8)
    rest = _batches(resumed, 14)
    assert all(torch.equal(a, b) for a, b in zip(reference[6:], rest))
    assert all(b.shape == (4, SEQ) for b in rest)
    assert valid is not None and next(valid)["tokens"].shape == (4, SEQ)


def test_data_parallel_ranks_see_disjoint_slices(corpora):
    pa, _ = corpora["a"]
    tok = build_tokenizer(TOK_CFG)
    cfg = DataConfig(data_path=[pa], split="100,0,0", seq_length=SEQ, data_cache_path=corpora["cache"])
    train = build_train_valid_test_datasets(cfg, tok, [64, 0, 0])[0]
    single = [b["tokens"] for b in build_data_loader(train, 8, micro_batch_size=4, num_workers=0)]
    ranks = [[b["tokens"] for b in build_data_loader(train, 8, 2, r, 2, num_workers=0)] for r in range(2)]
    assert len(train) >= 64  # a single GPTDataset holds whole epochs
    assert len(single) == len(ranks[0]) == len(ranks[1]) == (len(train) - 8) // 4
    for whole, r0, r1 in zip(single, *ranks):
        assert torch.equal(torch.cat([r0, r1]), whole)
    samples = [tuple(row.tolist()) for r in ranks for b in r for row in b]
    assert len(set(samples)) == len(samples)  # no sample seen twice across ranks and steps
    # Two DataLoader worker processes return the same batches in the same order.
    multi = [b["tokens"] for b in build_data_loader(train, 8, 2, 1, 2, num_workers=2)]
    assert all(torch.equal(a, b) for a, b in zip(ranks[1], multi))


def test_sampler_contract():
    s = ResumableDistributedSampler(20, 4, micro_batch_size=2, data_parallel_rank=1, data_parallel_size=2)
    assert list(s) == [[6, 7], [10, 11], [14, 15], [18, 19]] and len(s) == 4
    cyc = iter(ResumableDistributedSampler(6, 4, 2, 0, 2, cyclic=True))
    assert [next(cyc) for _ in range(3)] == [[4, 5], [2, 3], [0, 1]]
    with pytest.raises(ValueError, match="multiple"):
        ResumableDistributedSampler(20, 3, 2, 0, 2)
    with pytest.raises(ValueError, match="exceeds"):
        ResumableDistributedSampler(20, 24, 2, 0, 2)


def test_mock_data():
    tok = build_tokenizer(TokenizerConfig("NullTokenizer", vocab_size=1000))
    cfg = DataConfig(mock_data=True, seq_length=64, num_workers=0)
    train, valid, test = build_train_valid_test_datasets(cfg, tok, [16, 4, 4])
    sample = train[0]
    assert sample["tokens"].shape == (64,) and int(sample["tokens"].max()) <= tok.eod
    assert torch.equal(sample["tokens"][1:], sample["labels"][:-1])
    again = build_train_valid_test_datasets(cfg, tok, [16, 4, 4])[0]
    assert torch.equal(again[3]["tokens"], train[3]["tokens"])  # deterministic


def test_empty_split_is_refused_instead_of_hanging(tmp_path):
    path = tmp_path / "tiny.jsonl"
    path.write_text("".join(json.dumps({"text": " ".join(map(str, range(i, i + 50)))}) + "\n" for i in range(5)))
    run_preprocess(PreprocessConfig(input=[str(path)], output_prefix=str(tmp_path / "t"), progress=False), TOK_CFG)
    cfg = DataConfig(data_path=[str(tmp_path / "t_text_document")], split="949,50,1", seq_length=SEQ,
                     data_cache_path=str(tmp_path / "cache"))
    previous = signal.signal(signal.SIGALRM, lambda *a: pytest.fail("dataset build hung"))
    signal.alarm(60)
    try:
        with pytest.raises(DataError, match="valid part documents \\[5, 5\\)"):
            build_train_valid_test_datasets(cfg, build_tokenizer(TOK_CFG), [10, 2, 2])
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_bad_data_flags(tmp_path):
    tok = build_tokenizer(TOK_CFG)
    with pytest.raises(DataError, match="no indexed dataset"):
        build_train_valid_test_datasets(DataConfig(data_path=[str(tmp_path / "x")]), tok, [1, 1, 1])
    (tmp_path / "y.bin").write_bytes(b"")
    (tmp_path / "y.idx").write_bytes(b"")
    with pytest.raises(DataError, match="without its extension"):
        build_train_valid_test_datasets(DataConfig(data_path=[str(tmp_path / "y.bin")]), tok, [1, 1, 1])
    with pytest.raises(ValueError, match="--mock-data"):
        build_train_valid_test_datasets(DataConfig(), tok, [1, 1, 1])


def test_parse_blend():
    assert parse_blend(["a", "b"]) == (["a", "b"], None)
    assert parse_blend(["0.3", "a", "0.7", "b"]) == (["a", "b"], [0.3, 0.7])
    assert parse_blend(["0.3 a 0.7 b"]) == (["a", "b"], [0.3, 0.7])
    assert parse_blend(None) is None
    for bad in (["0.3", "a", "b"], ["a", "0.3", "b", "0.7"], ["-1", "a"]):
        with pytest.raises(DataError):
            parse_blend(bad)
