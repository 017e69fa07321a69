"""The memory model (megatron_spiral/analysis/memory.py) against what autograd really keeps, and
tools/model_report.py --memory / --fits-table.

The activation part must lie within 10% of the distinct storages autograd saves for backward
(bench/bench_training_speed.py's measurement) for the baseline, LoopedFormer (anchor, MeSH),
SpiralFormer-B/-L (MeSH and anchor) under every recompute mode, at tiny CPU dims."""

import importlib.util
import re
import json
import os
import subprocess
import sys

import pytest
import torch

from megatron_spiral.analysis.memory import (GIB, MemorySetup, activation_bytes, bytes_per_parameter,
                                             largest_micro_batch, memory_report, params_per_rank)
from megatron_spiral.model.recompute import MODES, RecomputeConfig, mode_config
from megatron_spiral.presets import PAPER_TABLE1
from megatron_spiral.presets import get_preset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = [  # (preset, overrides): the 160m Table 1 layouts, shrunk
    ("pythia-160m", {}),
    ("looped-160m-anchor", {}),
    ("looped-160m-mesh", {}),
    ("spiral-b-160m-mesh", {}),
    ("spiral-l-160m-mesh", {}),
    ("spiral-b-160m-mesh", dict(topology="anchor", downscale="mean", upscale="uniform",
                                chunk_offset="zero")),
]
TINY = dict(hidden_size=32, num_attention_heads=4, vocab_size=200, seq_length=64, transformer_impl="local")


def _bench():
    spec = importlib.util.spec_from_file_location(
        "bench_training_speed", os.path.join(ROOT, "bench", "bench_training_speed.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_activation_bytes_within_10_percent_of_autograd_saved_storages(dtype):
    from megatron_spiral import build_model

    measure = _bench().saved_tensor_bytes
    ids = torch.randint(0, 200, (2, 64), generator=torch.Generator().manual_seed(0))
    failures, worst = [], 0.0
    for preset, extra in MODELS:
        for mode in MODES + ("block2", "loop+block1"):
            recompute = mode_config(mode)
            model = build_model(preset, seed=1, params_dtype=dtype, recompute=recompute, **TINY, **extra)
            measured = measure(model.train(), ids)
            predicted = activation_bytes(model.config, MemorySetup(
                micro_batch_size=2, bf16=dtype == torch.bfloat16, recompute=recompute))
            error = abs(predicted - measured) / measured
            worst = max(worst, error)
            if error > 0.10:
                failures.append(f"{preset} {extra} {mode}: predicted {predicted}, measured {measured}")
    assert not failures, "\n".join(failures)
    assert worst < 0.10


def test_recompute_modes_order_the_saved_bytes_as_designed():
    """Full recompute keeps a layer input per layer; loop recompute drops the core's L_t work, so it
    helps SpiralFormer-B (most compute in the core) more than -L (pre/post at L dominate)."""
    def saved(preset, mode):
        return activation_bytes(get_preset(preset), MemorySetup(micro_batch_size=1,
                                                                recompute=mode_config(mode)))

    for preset in ("pythia-1.4b", "spiral-b-1.4b-mesh", "spiral-l-1.4b-mesh"):
        assert saved(preset, "full") * 4 < saved(preset, "none")
    assert saved("pythia-1.4b", "loop") == saved("pythia-1.4b", "none")  # nothing to loop over
    b_gain = saved("spiral-b-1.4b-mesh", "none") / saved("spiral-b-1.4b-mesh", "loop")
    l_gain = saved("spiral-l-1.4b-mesh", "none") / saved("spiral-l-1.4b-mesh", "loop")
    assert b_gain > 2 > l_gain > 1


def test_weights_and_optimizer_bytes_follow_megatron_theoretical_memory():
    """Megatron-LM theoretical_memory_usage.py: 18 bytes/parameter under bf16 mixed precision,
    6 + 12/DP with the distributed optimizer."""
    assert sum(bytes_per_parameter(MemorySetup(bf16=True)).values()) == 18
    assert sum(bytes_per_parameter(MemorySetup(bf16=True, use_distributed_optimizer=True,
                                               data_parallel_size=8)).values()) == 6 + 12 / 8
    config = get_preset("pythia-160m")
    report = memory_report(config, MemorySetup(bf16=True))
    assert report.weights == 2 * 162_322_944 and report.optimizer == 12 * 162_322_944  # Table 1's 163.5M row
    # TP=2 splits the big matrices and the vocabulary: a bit over half stays per rank
    half = params_per_rank(config, 2) / params_per_rank(config, 1)
    assert 0.5 < half < 0.51


def test_tensor_parallel_and_sequence_parallel_shrink_activations():
    config = get_preset("spiral-b-410m-mesh")
    one = activation_bytes(config, MemorySetup(bf16=True))
    tp = activation_bytes(config, MemorySetup(bf16=True, tensor_model_parallel_size=2))
    sp = activation_bytes(config, MemorySetup(bf16=True, tensor_model_parallel_size=2, sequence_parallel=True))
    assert sp < tp < one and sp < 0.55 * one


def _saved_vs_predicted_on_tp2(cases):
    import dataclasses

    from megatron_spiral.api import SpiralLM
    from megatron_spiral.model.spiral_model import SpiralGPTModel, transformer_config
    from megatron_spiral.parallel import initialize_parallel

    initialize_parallel(tensor_model_parallel_size=2, seed=1)
    measure = _bench().saved_tensor_bytes
    ids = torch.randint(0, 200, (2, 64), generator=torch.Generator().manual_seed(0))
    failures = []
    for preset, extra, sequence_parallel, mode in cases:
        recompute = mode_config(mode)
        spiral = dataclasses.replace(get_preset(preset), **TINY, **extra)
        config = transformer_config(spiral, tensor_model_parallel_size=2,
                                    sequence_parallel=sequence_parallel,
                                    **recompute.transformer_config_overrides())
        model = SpiralLM(SpiralGPTModel(config, spiral, recompute_loop=recompute.spiral_recompute_loop),
                         spiral)
        measured = measure(model.train(), ids)
        predicted = activation_bytes(spiral, MemorySetup(
            micro_batch_size=2, tensor_model_parallel_size=2, sequence_parallel=sequence_parallel,
            recompute=recompute))
        if abs(predicted - measured) > 0.01 * measured:
            failures.append(f"{preset} {extra} SP={sequence_parallel} {mode}: "
                            f"predicted {predicted}, measured {measured}")
    assert not failures, "\n".join(failures)


def test_activation_bytes_per_rank_under_tp2_and_sequence_parallel():
    """Per-rank saved bytes on 2 gloo ranks equal the model (measured: within 128 bytes). Under SP
    the resampling runs on the all-gathered sequence, so the self-aggregation scorer keeps a
    full-length state; shards handed back to the loop are copies, not views of the gathered
    tensor, and identity-resampled iterations never gather."""
    from distributed import run_on_ranks

    cases = [(preset, extra, sp, mode) for preset, extra in MODELS[1:]
             for sp in (True, False) for mode in ("none", "full", "loop")]
    run_on_ranks(_saved_vs_predicted_on_tp2, 2, cases)


def test_largest_micro_batch_is_the_edge_of_the_capacity():
    config = get_preset("spiral-b-1.4b-mesh")
    setup = MemorySetup(bf16=True, recompute=RecomputeConfig(spiral_recompute_loop=True))
    best = largest_micro_batch(config, setup, 80 * GIB)
    assert best >= 1

    def total(batch):
        return memory_report(config, MemorySetup(**{**setup.__dict__, "micro_batch_size": batch})).total

    assert total(best) <= 80 * GIB < total(best + 1)
    assert largest_micro_batch(config, setup, 1 * GIB) == 0


def _report(*argv):
    return subprocess.run([sys.executable, os.path.join(ROOT, "tools", "model_report.py"), *argv],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": ROOT})


def test_model_report_memory_cli_prints_parts_and_refuses_bad_flags():
    proc = _report("--preset", "spiral-l-1.4b-mesh", "--memory", "--bf16", "--micro-batch-size", "2",
                   "--recompute-granularity", "full", "--recompute-method", "uniform",
                   "--recompute-num-layers", "1", "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    info = json.loads(proc.stdout)
    expected = memory_report(get_preset("spiral-l-1.4b-mesh"), MemorySetup(
        micro_batch_size=2, bf16=True, recompute=mode_config("full")))
    assert info["total"] == expected.total and info["activations"] < info["weights"] * 4
    human = _report("--preset", "tiny", "--memory", "--spiral-recompute-loop")
    assert human.returncode == 0 and "recompute=loop" in human.stdout and "total per GPU" in human.stdout
    bad = _report("--preset", "tiny", "--memory", "--recompute-granularity", "full")
    assert bad.returncode == 2 and 'recompute_method must be "block" or "uniform"' in bad.stderr
    bad_sp = _report("--preset", "tiny", "--memory", "--sequence-parallel")
    assert bad_sp.returncode == 2 and "--tensor-model-parallel-size > 1" in bad_sp.stderr


def test_fits_table_lists_every_table1_preset_per_mode():
    proc = _report("--fits-table", "--bf16", "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(proc.stdout)
    assert len(rows) == len(PAPER_TABLE1) and all(set(MODES) <= set(row) for row in rows)
    by_name = {row["preset"]: row for row in rows}
    assert by_name["pythia-1.4b"]["full"] > by_name["pythia-1.4b"]["none"] >= 1
    assert by_name["spiral-b-1.4b-mesh"]["loop"] > by_name["spiral-b-1.4b-mesh"]["none"]


def test_bench_recompute_modes_side_by_side(capsys):
    """bench/bench_training_speed.py --recompute: one row per model and mode, ratios to 'none'
    (added when missing), the memory model's prediction next to the measurement, goal lines."""
    bench = _bench()
    args = ["--hidden-size", "32", "--num-attention-heads", "2", "--seq-length", "64", "--vocab-size", "100",
            "--rounds", "1", "--warmup", "0", "--threads", "1", "--device", "cpu", "--dtype", "float32",
            "--models", "spiral-b", "--recompute", "full", "loop"]
    assert bench.main(args) == 0
    out = capsys.readouterr().out
    for label in ("SpiralFormer-B",):
        for mode in ("none", "full", "loop"):
            assert re.search(rf"\| {label} +\| {re.escape(mode)} +\| +[\d.]+ \| +[\d.]+ \|", out), \
                (label, mode)
    assert re.search(r"\| SpiralFormer-B +\| none +\| +[\d.]+ \| +1\.000 \|", out)
    assert re.search(r"goal full +SpiralFormer-B +\(full\)", out)
    assert re.search(r"goal loop-aware SpiralFormer-B +\(loop\)", out)
