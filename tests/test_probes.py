"""Attention probes (paper §4.1, App. I): the metrics on hand-made matrices, dynamic-head
selection, the recorder on a real core, and tools/probe_attention.py end to end."""

import json
import math
import os
import subprocess
import sys
from fractions import Fraction

import numpy as np
import pytest
import torch

from megatron_spiral.analysis.probes import (
    ProbeAccumulator, ProbeError, TokenWindows, build_report, cross_loop_range, dynamic_heads,
    key_marginal_entropy, lam_window, local_attention_mass, normalize_heatmap, num_dynamic,
    probe_model, split_range)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _uniform_causal(length):
    rows = torch.tril(torch.ones(length, length))
    return rows / rows.sum(-1, keepdim=True)


# ----------------------------------------------------------------------------- entropy
def test_entropy_of_uniform_causal_attention_matches_hand_computation():
    # L = 4: A(q, k) = 1/(q+1) for k <= q. Column means: p(k) = (1/4) sum_{q>=k} 1/(q+1)
    # = [25/48, 13/48, 7/48, 3/48] -- *not* uniform, so the normalised entropy is below 1.
    p = [25 / 48, 13 / 48, 7 / 48, 3 / 48]
    expected = -sum(x * math.log(x) for x in p) / math.log(4)
    assert expected == pytest.approx(0.8278, abs=1e-4)  # 1.1476 nats / ln 4
    got = key_marginal_entropy(_uniform_causal(4))
    assert got.item() == pytest.approx(expected, abs=1e-6)


def test_entropy_uniform_over_all_keys_is_one_and_one_hot_is_zero():
    full = torch.full((2, 3, 6, 6), 1 / 6)  # [batch, heads, L, L], non-causal, metric only
    torch.testing.assert_close(key_marginal_entropy(full), torch.ones(2, 3))
    one_hot = torch.zeros(5, 5)
    one_hot[:, 0] = 1.0  # every query on key 0 (a causal "attention sink")
    assert key_marginal_entropy(one_hot).item() == pytest.approx(0.0, abs=1e-7)
    # every query on itself: the key marginal is uniform -> entropy 1
    assert key_marginal_entropy(torch.eye(5)).item() == pytest.approx(1.0, abs=1e-6)
    assert key_marginal_entropy(torch.ones(1, 1)).item() == 0.0


def test_entropy_renormalises_and_batches_independently():
    a = _uniform_causal(4)
    stacked = torch.stack([a, torch.eye(4), 3 * torch.eye(4)])  # unnormalised rows renormalise
    got = key_marginal_entropy(stacked)
    assert got[0].item() == pytest.approx(key_marginal_entropy(a).item())
    assert got[1].item() == pytest.approx(1.0, abs=1e-6) and got[2].item() == pytest.approx(1.0, abs=1e-6)


# ----------------------------------------------------------------------------- LAM
def test_lam_window_is_ceil_gamma_r():
    assert [lam_window(Fraction(1, g)) for g in (16, 8, 4, 2, 1)] == [2, 4, 8, 16, 32]
    assert lam_window(Fraction(1, 3)) == 11  # ceil(32/3)
    assert lam_window(Fraction(1, 8), gamma=4) == 1


def test_lam_by_hand_on_small_matrix():
    a = torch.tensor([
        [1.0, 0.0, 0.0, 0.0],
        [0.5, 0.5, 0.0, 0.0],
        [0.2, 0.3, 0.5, 0.0],
        [0.1, 0.2, 0.3, 0.4],
    ])
    # M = 1: keys q-1 only -> (0 + 0.5 + 0.3 + 0.3) / 4
    assert local_attention_mass(a, 1).item() == pytest.approx(1.1 / 4)
    # M = 2: keys q-2, q-1 -> (0 + 0.5 + (0.2+0.3) + (0.2+0.3)) / 4
    assert local_attention_mass(a, 2).item() == pytest.approx(1.5 / 4)
    # M >= L-1: all strictly earlier keys -> 1 - mean diagonal
    expected = (0 + 0.5 + 0.5 + 0.6) / 4
    assert local_attention_mass(a, 3).item() == pytest.approx(expected)
    assert local_attention_mass(a, 100).item() == pytest.approx(expected)


def test_lam_extremes_and_batch_shape():
    length = 10
    previous = torch.zeros(length, length)
    previous[0, 0] = 1.0
    previous[torch.arange(1, length), torch.arange(0, length - 1)] = 1.0  # attend to q-1
    assert local_attention_mass(previous, 1).item() == pytest.approx((length - 1) / length)
    assert local_attention_mass(torch.eye(length), 32).item() == 0.0  # self is outside W_t(q)
    batch = torch.stack([previous, torch.eye(length)]).unsqueeze(0)  # [1, 2, L, L]
    torch.testing.assert_close(local_attention_mass(batch, 1),
                               torch.tensor([[(length - 1) / length, 0.0]]))


# ----------------------------------------------------------------------------- head selection
def test_cross_loop_range_and_dynamic_heads_on_hand_table():
    # [T=3, layers=2, heads=5]
    values = np.zeros((3, 2, 5))
    values[:, 0, 0] = [0.1, 0.9, 0.5]    # range 0.8
    values[:, 0, 3] = [0.2, 0.2, 0.25]   # range 0.05
    values[:, 1, 1] = [0.6, 0.0, 0.3]    # range 0.6
    values[:, 1, 4] = [0.3, 0.4, 0.0]    # range 0.4
    values[:, 1, 2] = [0.5, 0.5, 0.5]    # range 0
    ranges = cross_loop_range(values)
    np.testing.assert_allclose(ranges[0], [0.8, 0, 0, 0.05, 0])
    np.testing.assert_allclose(ranges[1], [0, 0.6, 0, 0, 0.4])
    assert num_dynamic(10) == 4  # 40% of 10 heads
    assert dynamic_heads(ranges) == [(0, 0), (1, 1), (1, 4), (0, 3)]
    assert dynamic_heads(ranges, fraction=0.2) == [(0, 0), (1, 1)]
    assert num_dynamic(128) == 51 and num_dynamic(3) == 1 and num_dynamic(5) == 2


def test_dynamic_heads_ties_and_nan_are_deterministic():
    ranges = np.array([[0.5, np.nan, 0.5], [0.5, 0.1, 0.2]])
    assert dynamic_heads(ranges, fraction=0.5) == [(0, 0), (0, 2), (1, 0)]


def test_heatmap_normalisation():
    np.testing.assert_allclose(normalize_heatmap(np.array([[1.0, 3.0], [2.0, 5.0]])),
                               [[0.0, 0.5], [0.25, 1.0]])
    assert not normalize_heatmap(np.full((2, 3), 0.7)).any()
    assert not normalize_heatmap(np.array([[1.0, np.nan]])).any()


def test_report_averages_each_head_over_samples_first():
    acc = ProbeAccumulator(num_loops=2, num_layers=1, num_heads=2)
    # two samples: head 0 entropy 0.2 and 0.6 at loop 0 (mean 0.4), 0.4 at loop 1 twice
    acc.add(0, 0, {"entropy": torch.tensor([[0.2, 0.1], [0.6, 0.1]]), "lam": torch.zeros(2, 2)})
    acc.add(1, 0, {"entropy": torch.tensor([[0.4, 0.9], [0.4, 0.5]]), "lam": torch.ones(2, 2)})
    from megatron_spiral.analysis.probes import LoopInfo

    loops = [LoopInfo(0, Fraction(1, 2), 2, 8, 16), LoopInfo(1, Fraction(1), 1, 16, 32)]
    report = build_report(loops, acc, fraction=0.5)
    entropy = report["metrics"]["entropy"]
    np.testing.assert_allclose(entropy["values"], [[[0.4, 0.1]], [[0.4, 0.7]]], atol=1e-7)
    np.testing.assert_allclose(entropy["range"], [[0.0, 0.6]], atol=1e-7)  # per-sample ranges would differ
    np.testing.assert_allclose(entropy["sample_std"], [[[0.2, 0.0]], [[0.0, 0.2]]], atol=1e-6)
    assert entropy["dynamic_heads"] == [[0, 1]]
    assert report["metrics"]["lam"]["per_loop_all"][1]["mean"] == 1.0


# ----------------------------------------------------------------------------- on a real model
def test_recorder_sees_each_loop_at_native_length_and_matches_by_hand():
    from megatron_spiral import build_model

    model = build_model("tiny", layout="1+2x{1/4,1/2,1}+1", seq_length=64, transformer_impl="local",
                        init_method_std=0.1)
    ids = torch.randint(0, 256, (3, 64), generator=torch.Generator().manual_seed(0))
    loops, acc = probe_model(model, [ids[:2], ids[2:]], 64, gamma=8)
    assert [(l.length, l.window) for l in loops] == [(16, 2), (32, 4), (64, 8)]
    assert (acc.counts == 3).all()
    # by hand: capture the raw probabilities of core layer 1 and recompute
    seen = []
    core_attention = model.gpt.decoder.core.layers[1].self_attention.core_attention
    core_attention.attention_recorder = seen.append
    with torch.no_grad():
        model(ids)
    core_attention.attention_recorder = None
    assert [p.shape[-1] for p in seen] == [16, 32, 64]
    for t, probs in enumerate(seen):
        assert torch.allclose(probs.sum(-1), torch.ones(()), atol=1e-5)
        assert probs.triu(1).abs().max() == 0  # causal at L_t
        torch.testing.assert_close(
            torch.tensor(acc.means()["entropy"][t, 1], dtype=torch.float32),
            key_marginal_entropy(probs).mean(0), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(
            torch.tensor(acc.means()["lam"][t, 1], dtype=torch.float32),
            local_attention_mass(probs, loops[t].window).mean(0), atol=1e-5, rtol=1e-5)


def test_probe_refuses_non_looped_model():
    from megatron_spiral import build_model

    model = build_model("tiny", layout="3", transformer_impl="local")
    with pytest.raises(ProbeError, match="non-looped"):
        probe_model(model, [torch.zeros(1, 8, dtype=torch.long)], 8)


# ----------------------------------------------------------------------------- data
def _write_dataset(prefix, documents):
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.int32)
    for doc in documents:
        builder.add_item(torch.tensor(doc, dtype=torch.int32))
        builder.end_document()
    builder.finalize(prefix + ".idx")


def test_token_windows_cross_documents_and_respect_split(tmp_path):
    prefix = str(tmp_path / "toy")
    docs = [list(range(0, 5)), list(range(5, 12)), list(range(12, 15)), list(range(15, 40))]
    _write_dataset(prefix, docs)
    windows = TokenWindows(prefix, seq_length=6, num_samples=6, seed=0)
    assert len(windows) == 6  # 40 tokens -> 6 windows of 6, all taken
    for i in range(6):
        np.testing.assert_array_equal(windows.window(i), np.arange(6 * i, 6 * i + 6))
    assert split_range(4, "50,50,0", "valid") == (2, 4)
    valid = TokenWindows(prefix, seq_length=4, num_samples=7, seed=0, split="50,50,0", split_name="valid")
    assert valid.window(0).tolist() == [12, 13, 14, 15]
    with pytest.raises(ProbeError, match="fewer than --num-samples"):
        TokenWindows(prefix, seq_length=6, num_samples=7)
    with pytest.raises(ProbeError, match="no indexed dataset"):
        TokenWindows(str(tmp_path / "missing"), 6, 1)


# ----------------------------------------------------------------------------- the tool
def _run_tool(*args):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    for name in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(name, None)  # this process's one-rank group must not leak into the tool's
    return subprocess.run([sys.executable, os.path.join(ROOT, "tools", "probe_attention.py"), *args],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)


@pytest.fixture(scope="module")
def tiny_checkpoints(tmp_path_factory):
    """A SpiralFormer and a LoopedFormer checkpoint plus a small dataset, written once."""
    from megatron_spiral import build_model
    from megatron_spiral.checkpointing import save_sharded_checkpoint

    root = tmp_path_factory.mktemp("probe")
    paths = {}
    for name, layout in (("spiral", "1+2x{1/4,1/2,1}+1"), ("looped", "1+2x{1,1}+1"),
                         ("plain", "2")):
        model = build_model("tiny", layout=layout, hidden_size=32, num_attention_heads=4,
                            vocab_size=100, seq_length=32, init_method_std=0.1)
        save_dir = str(root / name)
        save_sharded_checkpoint(save_dir, 5, {"model": model.gpt.sharded_state_dict()},
                                model.config.to_dict())
        paths[name] = save_dir
    rng = np.random.default_rng(0)
    prefix = str(root / "data_text_document")
    _write_dataset(prefix, [rng.integers(0, 100, size=n).tolist() for n in (50, 90, 17, 200, 70)])
    paths["data"] = prefix
    paths["root"] = root
    return paths


def test_probe_tool_end_to_end(tiny_checkpoints):
    out = str(tiny_checkpoints["root"] / "out_spiral")
    result = _run_tool("--load", tiny_checkpoints["spiral"], "--data-path", tiny_checkpoints["data"],
                       "--num-samples", "10", "--micro-batch-size", "3", "--out", out, "--no-progress")
    assert result.returncode == 0, result.stderr
    report = json.load(open(os.path.join(out, "probe_report.json")))
    assert report["model_kind"] == "SpiralFormer" and report["iteration"] == 5
    assert report["num_samples"] == 10 and report["seq_length"] == 32
    assert [(l["resolution"], l["length"], l["window"]) for l in report["loops"]] == \
        [("1/4", 8, 8), ("1/2", 16, 16), ("1", 32, 32)]
    assert (report["num_layers"], report["num_heads"]) == (2, 4)
    for metric in ("entropy", "lam"):
        m = report["metrics"][metric]
        values = np.asarray(m["values"])
        assert values.shape == (3, 2, 4) and np.isfinite(values).all()
        assert ((values >= -1e-6) & (values <= 1 + 1e-6)).all()
        np.testing.assert_allclose(m["range"], values.max(0) - values.min(0), atol=1e-12)
        assert len(m["dynamic_heads"]) == 3  # round(0.4 * 8)
        ranked = sorted(np.asarray(m["range"]).ravel(), reverse=True)
        assert min(m["range"][l][h] for l, h in m["dynamic_heads"]) == pytest.approx(ranked[2])
        assert len(m["per_loop_dynamic"]) == 3
    # full resolution with M_t = L_t: LAM = 1 - mean diagonal of a near-uniform random init,
    # i.e. well above zero; and entropy of a near-uniform causal attention is ~0.88 at L=32
    assert 0.5 < report["metrics"]["entropy"]["per_loop_all"][2]["mean"] < 1.0
    for name in ("distributions_dynamic.png", "distributions_all.png", "heatmaps.png"):
        path = os.path.join(out, name)
        assert os.path.getsize(path) > 1000
        assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert sorted(os.listdir(out)) == sorted(report["figures"] + ["probe_report.json"])
    assert "loop-wise means" in result.stdout

    # an existing --out is refused without --overwrite, and left untouched
    again = _run_tool("--load", tiny_checkpoints["spiral"], "--data-path", tiny_checkpoints["data"],
                      "--num-samples", "2", "--out", out, "--no-progress")
    assert again.returncode != 0 and "--overwrite" in again.stderr
    assert json.load(open(os.path.join(out, "probe_report.json")))["num_samples"] == 10


def test_probe_tool_looped_control_and_errors(tiny_checkpoints, capsys):
    root = tiny_checkpoints["root"]
    out = str(root / "out_looped")
    ok = _run_tool("--load", tiny_checkpoints["looped"], "--data-path", tiny_checkpoints["data"],
                   "--num-samples", "4", "--seq-length", "16", "--split", "60,40,0",
                   "--split-name", "valid", "--out", out, "--no-progress")
    assert ok.returncode == 0, ok.stderr
    report = json.load(open(os.path.join(out, "probe_report.json")))
    assert report["model_kind"] == "LoopedFormer"
    assert [(l["length"], l["window"]) for l in report["loops"]] == [(16, 32), (16, 32)]

    tool = _tool_module()
    cases = [
        (["--load", str(root / "nowhere")], "does not exist"),
        (["--load", tiny_checkpoints["plain"]], "non-looped"),
        (["--load", tiny_checkpoints["spiral"], "--num-samples", "500"], "fewer than --num-samples"),
        (["--load", tiny_checkpoints["spiral"], "--data-path", str(root / "nodata")], "no indexed dataset"),
    ]
    for extra, message in cases:
        bad_out = str(root / "bad_out")
        args = ["--data-path", tiny_checkpoints["data"], "--out", bad_out, "--no-progress",
                "--num-samples", "2"] + extra  # later flags win
        assert tool.main(args) != 0
        assert message in capsys.readouterr().err
        assert not os.path.exists(bad_out)
        assert not [n for n in os.listdir(root) if n.startswith(".bad_out")]  # no staging left


def _tool_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "probe_attention_tool", os.path.join(ROOT, "tools", "probe_attention.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_probe_tool_help():
    result = _run_tool("--help")
    assert result.returncode == 0
    for flag in ("--load", "--data-path", "--num-samples", "--out", "--seq-length", "--split-name"):
        assert flag in result.stdout
