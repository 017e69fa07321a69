"""The log line's throughput and MFU arithmetic, and the GPU peak lookup (no GPU needed)."""

import time

import pytest
import torch

from megatron_spiral.training import logger as logger_module
from megatron_spiral.training.logger import IterationStats, LogOptions, TrainingLogger, gpu_peak_tflops


def _pretend_gpu(monkeypatch, name):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: name)


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA H100 80GB HBM3", 989.4),
    ("NVIDIA H100 PCIe", 756.0),          # must not fall through to the SXM figure
    ("NVIDIA A100-SXM4-80GB", 312.0),
    ("NVIDIA L40S", 362.1),               # not the L40's
    ("NVIDIA L40", 181.0),
    ("Some Future Accelerator", None),    # unknown: no MFU rather than a wrong one
])
def test_gpu_peak_lookup(monkeypatch, name, peak):
    _pretend_gpu(monkeypatch, name)
    assert gpu_peak_tflops() == peak


def test_no_peak_on_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_peak_tflops() is None


def _one_interval(log, seconds, iterations, global_batch):
    for _ in range(iterations):
        log.record(2.0, finite=True)
    log.interval_start = time.time() - seconds
    stats = IterationStats(loss=2.0, skipped=False, nan=False, learning_rate=1e-4, loss_scale=1.0, grad_norm=1.0)
    return log.log(iteration=iterations, consumed=iterations * global_batch, global_batch=global_batch,
                   stats=stats, diagnostics={})


def test_mfu_from_flops_time_and_peak(monkeypatch, capsys):
    _pretend_gpu(monkeypatch, "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(logger_module, "is_last_rank", lambda: True)
    log = TrainingLogger(train_iters=100, flops_per_sequence=5 * 10 ** 12, seq_length=4096,
                         options=LogOptions(log_throughput=True))
    scalars = _one_interval(log, seconds=4.0, iterations=2, global_batch=8)
    # 2 iterations x 8 sequences in 4 s = 4 seq/s; x 5 TFLOP = 20 TFLOP/s on one GPU
    assert scalars["throughput"] == pytest.approx(20.0, rel=1e-2)
    assert scalars["tokens-per-second"] == pytest.approx(4 * 4096, rel=1e-2)
    assert scalars["iteration-time"] == pytest.approx(2.0, rel=1e-2)
    assert scalars["mfu"] == pytest.approx(100 * 20.0 / 989.4, rel=1e-2)
    out = capsys.readouterr().out
    assert "MFU: 2.0%" in out and "throughput per GPU (TFLOP/s/GPU): 20.0 |" in out
    # Megatron-LM's fields first, ours after them.
    assert out.index("number of nan iterations") < out.index("tokens per second") < out.index("MFU")


def test_cpu_line_has_no_mfu(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    log = TrainingLogger(train_iters=10, flops_per_sequence=10 ** 9, seq_length=64)
    scalars = _one_interval(log, seconds=1.0, iterations=1, global_batch=4)
    assert "mfu" not in scalars
    out = capsys.readouterr().out
    assert "MFU" not in out and "lm loss: 2.000000E+00" in out
    assert "throughput" not in out  # only with --log-throughput, as Megatron-LM


def test_interval_counts_skipped_and_nan_iterations_like_megatron(monkeypatch, capsys):
    """training_log: the loss averages advanced steps only; skipped and NaN counts are per interval."""
    monkeypatch.setattr(logger_module, "is_last_rank", lambda: True)
    log = TrainingLogger(train_iters=10, flops_per_sequence=10 ** 9, seq_length=64)
    log.record(3.0, finite=True)
    log.record(float("nan"), finite=False)
    log.record(1.0, finite=True, skipped=True)   # an fp16 overflow: skipped, not NaN
    log.record(5.0, finite=True)
    stats = IterationStats(loss=5.0, skipped=False, nan=False, learning_rate=1e-4, loss_scale=2.0)
    log.log(iteration=4, consumed=16, global_batch=4, stats=stats, diagnostics={})
    out = capsys.readouterr().out
    assert "lm loss: 4.000000E+00 |" in out and "loss scale: 2.0 |" in out
    assert "number of skipped iterations:   2 | number of nan iterations:   1 |" in out
    log.log(iteration=5, consumed=20, global_batch=4, stats=stats, diagnostics={})
    assert "number of skipped iterations:   0 |" in capsys.readouterr().out
