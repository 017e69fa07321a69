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


# ------------------------------------------------------------------ architecture flags (issue 13)
ARCHITECTURES = {  # the Megatron-LM layer flags the memory model covers, one at a time and together
    "swiglu": dict(swiglu=True),
    "gqa 2 of 4": dict(group_query_attention=True, num_query_groups=2),
    "kv_channels 12": dict(kv_channels=12),
    "no bias": dict(disable_bias_linear=True),
    "qkv bias only": dict(disable_bias_linear=True, add_qkv_bias=True),
    "hidden dropout": dict(hidden_dropout=0.1),
    "attention dropout": dict(attention_dropout=0.1),
    "tied": dict(untie_embeddings_and_output_weights=False),
    "all": dict(swiglu=True, group_query_attention=True, num_query_groups=2, kv_channels=12,
                disable_bias_linear=True, add_qkv_bias=True, hidden_dropout=0.1, attention_dropout=0.1,
                untie_embeddings_and_output_weights=False, rotary_percent=0.5),
}


def _measure_against_model(preset, extra, recompute):
    from megatron_spiral import build_model

    ids = torch.randint(0, 200, (2, 64), generator=torch.Generator().manual_seed(0))
    model = build_model(preset, seed=1, recompute=recompute, **TINY, **extra)
    measured = _bench().saved_tensor_bytes(model.train(), ids)
    predicted = activation_bytes(model.config, MemorySetup(micro_batch_size=2, recompute=recompute,
                                                           device="cpu"))
    return predicted, measured


def test_architecture_flags_activation_bytes_equal_retained_saved_storages():
    """SwiGLU, GQA, --kv-channels, biases, hidden / attention dropout (CPU: SDPA's math kernel),
    tied embeddings, alone and together, on the baseline (recompute none / full) and
    SpiralFormer-B (MeSH; none / full / loop), plus selective, loop + full block and Anchor under
    loop: fp32 predictions against what autograd keeps. Each total lies within 10%, and what a
    flag adds over the same model without it is exact to the byte (a 10% bound alone would pass
    a wrong SwiGLU term at these dims). Measured worst error of the totals: 0 (torch 2.13 CPU)."""
    cases = [(preset, name, mode, mode_config(mode))
             for preset, modes in (("pythia-160m", ("none", "full")),  # loop: nothing to loop over
                                   ("spiral-b-160m-mesh", ("none", "full", "loop")))
             for name in ARCHITECTURES for mode in modes]
    cases += [("spiral-b-160m-mesh", name, "selective", mode_config("selective"))
              for name in ("gqa 2 of 4", "attention dropout", "all")]
    cases += [("spiral-b-160m-mesh", "hidden dropout", "loop+full block 1", RecomputeConfig(
        spiral_recompute_loop=True, recompute_granularity="full", recompute_method="block",
        recompute_num_layers=1))]
    cases += [("looped-160m-anchor", "hidden dropout", "loop", mode_config("loop"))]
    baselines, failures, worst = {}, [], 0.0
    for preset, name, mode, recompute in cases:
        if (preset, mode) not in baselines:
            baselines[preset, mode] = _measure_against_model(preset, {}, recompute)
        base_predicted, base_measured = baselines[preset, mode]
        predicted, measured = _measure_against_model(preset, ARCHITECTURES[name], recompute)
        error = abs(predicted - measured) / measured
        worst = max(worst, error)
        if error > 0.10 or predicted - base_predicted != measured - base_measured:
            failures.append(f"{preset} {name} {mode}: predicted {predicted} ({predicted - base_predicted:+d} "
                            f"over no flag), measured {measured} ({measured - base_measured:+d})")
    assert not failures, "\n".join(failures)
    assert worst < 0.10


def test_architecture_terms_of_one_layer():
    """The per-layer terms by flag (d = 32, 4 heads, l = 64, b = 2, fp32): what each variant adds."""
    from megatron_spiral.analysis.memory import layer_internal_parts

    def parts(device="cpu", **extra):
        config = get_preset("pythia-160m", **TINY, **extra)
        return layer_internal_parts(config, 64, MemorySetup(micro_batch_size=2, device=device))

    tokens, base = 128, parts()
    assert base["attention q, k, v, output"] == 6 * tokens * 32 * 4          # QKV (3) + q, k, out
    assert base["mlp"] == 2 * tokens * 128 * 4 and "dropout masks" not in base
    gqa = parts(group_query_attention=True, num_query_groups=2)
    assert gqa["attention q, k, v, output"] == 4 * tokens * 32 * 4           # repeated k, v replace QKV
    assert parts(kv_channels=12)["attention q, k, v, output"] == 6 * tokens * 4 * 12 * 4
    assert parts(swiglu=True)["mlp"] == 5 * tokens * 64 * 4                  # ffn int(8h/3/64)*64 = 64
    assert parts(disable_bias_linear=True) == base
    assert parts(hidden_dropout=0.1)["dropout masks"] == 2 * tokens * 32 * 4
    assert parts("cuda", hidden_dropout=0.1)["dropout masks"] == 2 * tokens * 32  # bool masks
    cpu, cuda = parts(attention_dropout=0.1), parts("cuda", attention_dropout=0.1)
    assert cpu["attention core"] == 3 * 2 * 4 * 64 * 64 * 4                  # probs, mask, dropped
    assert cuda == base                                                      # flash: RNG seed only
    with pytest.raises(ValueError, match="device"):
        MemorySetup(device="gpu")


def _tp2_params_per_rank(configs):
    from megatron.core import parallel_state

    from megatron_spiral.analysis.memory import params_per_rank
    from megatron_spiral.config import SpiralConfig
    from megatron_spiral.model.spiral_model import SpiralGPTModel, transformer_config
    from megatron_spiral.parallel import initialize_parallel

    initialize_parallel(tensor_model_parallel_size=2, seed=3)
    for knobs in configs:
        spiral = SpiralConfig(**knobs)
        model = SpiralGPTModel(transformer_config(spiral, tensor_model_parallel_size=2), spiral)
        real = sum(p.numel() for p in model.parameters())
        assert real == params_per_rank(spiral, 2), (knobs, real, params_per_rank(spiral, 2))
    parallel_state.destroy_model_parallel()


def test_params_per_rank_equals_the_tp2_shard_under_every_layer_flag():
    """The TP split comes from accounting.layer_param_tensors, whose names and split flags are
    megatron's (``tensor_model_parallel`` on the built parameters); per-rank numel on two gloo
    ranks equals params_per_rank for GQA, --kv-channels, no bias, qkv bias, SwiGLU, tied, untied core."""
    from distributed import run_on_ranks
    from megatron_spiral import build_model
    from megatron_spiral.analysis.accounting import layer_param_tensors

    for knobs in (dict(), dict(swiglu=True, group_query_attention=True, num_query_groups=2,
                               kv_channels=12, disable_bias_linear=True, add_qkv_bias=True)):
        model = build_model("pythia-160m", **TINY, layout="1", **knobs)
        layer = model.gpt.decoder.pre.layers[0]
        built = {name: (p.numel(), bool(getattr(p, "tensor_model_parallel", False)))
                 for name, p in layer.named_parameters()}
        assert built == layer_param_tensors(model.config)
    base = dict(layout="1+2x{1/4,1}+1", hidden_size=32, num_attention_heads=4, vocab_size=200,
                seq_length=32, transformer_impl="local")
    run_on_ranks(_tp2_params_per_rank, 2, [
        base,
        {**base, "group_query_attention": True, "num_query_groups": 2, "kv_channels": 12,
         "disable_bias_linear": True, "add_qkv_bias": True, "swiglu": True},
        {**base, "disable_bias_linear": True, "untie_embeddings_and_output_weights": False,
         "normalization": "RMSNorm", "untie_core": True},
    ])


def test_model_report_memory_cli_takes_the_architecture_flags(capsys):
    """--swiglu, GQA, --kv-channels, --disable-bias-linear and both dropouts reach the memory model
    (in-process: tools/model_report.py's main), and the report says what it assumes."""
    spec = importlib.util.spec_from_file_location("model_report", os.path.join(ROOT, "tools", "model_report.py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    flags = ["--swiglu", "--group-query-attention", "--num-query-groups", "4", "--kv-channels", "96",
             "--disable-bias-linear", "--hidden-dropout", "0.1", "--attention-dropout", "0.1"]
    assert tool.main(["--preset", "pythia-160m", "--memory", "--bf16", "--json", *flags]) == 0
    info = json.loads(capsys.readouterr().out)
    config = get_preset("pythia-160m", swiglu=True, group_query_attention=True, num_query_groups=4,
                        kv_channels=96, disable_bias_linear=True, hidden_dropout=0.1, attention_dropout=0.1)
    expected = memory_report(config, MemorySetup(bf16=True, seq_length=config.seq_length))
    plain = memory_report(get_preset("pythia-160m"), MemorySetup(bf16=True))
    assert info["total"] == expected.total != plain.total
    assert info["activation_parts"]["embedding dropout mask"] == 4096 * 768  # bool, at L
    assert tool.main(["--preset", "pythia-160m", "--memory", *flags]) == 0
    assert "assumes CUDA: torch SDPA runs its flash" in capsys.readouterr().out
