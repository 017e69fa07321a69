"""pretrain_spiral.py as users run it: plain python and torchrun, SIGTERM from outside, --help."""

import os
import signal
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "pretrain_spiral.py")
TINY = ["--preset", "tiny", "--mock-data", "--seq-length", "32", "--micro-batch-size", "2",
        "--global-batch-size", "4", "--log-interval", "2", "--eval-interval", "3", "--eval-iters", "1"]


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}


def test_help_is_grouped_and_explained():
    out = subprocess.run([sys.executable, SCRIPT, "--help"], capture_output=True, text=True, check=True).stdout
    for group in ("model:", "parallelism and precision:", "training:", "optimizer and learning-rate schedule:",
                  "checkpointing:", "logging:", "data:", "tokenizer:"):
        assert group in out
    for flag in ("--spiral-layout", "--tensor-model-parallel-size", "--exit-signal-handler", "--data-path",
                 "--use-distributed-optimizer", "--lr-warmup-fraction", "--tokenizer-model"):
        assert flag in out


def test_plain_python_run_logs_validates_and_saves(tmp_path):
    proc = subprocess.run([sys.executable, SCRIPT, *TINY, "--train-iters", "6", "--save", str(tmp_path)],
                          capture_output=True, text=True, env=_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert " iteration        6/       6 | consumed samples:           24 |" in proc.stdout
    assert "validation loss at iteration 6" in proc.stdout
    assert (tmp_path / "latest_checkpointed_iteration.txt").read_text().strip() == "6"
    assert (tmp_path / "run_summary.json").exists()


def test_torchrun_sigterm_saves_and_exits_zero(tmp_path):
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    cmd = [torchrun, "--nproc_per_node=2", SCRIPT, *TINY, "--train-iters", "100000", "--exit-signal-handler",
           "--save", str(tmp_path), "--eval-interval", "0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env(),
                            start_new_session=True)
    lines = []
    deadline = time.time() + 240
    for line in proc.stdout:
        lines.append(line)
        if " iteration        4/" in line:
            break
        assert time.time() < deadline, "no log line in time:\n" + "".join(lines[-30:])
    import psutil

    # The training processes get SIGTERM (torchrun forwards the one SLURM sends it the same way).
    for child in psutil.Process(proc.pid).children(recursive=True):
        child.send_signal(signal.SIGTERM)
    rest, _ = proc.communicate(timeout=240)
    output = "".join(lines) + rest
    assert proc.returncode == 0, output[-3000:]
    assert "exit signal received" in output
    iteration = int((tmp_path / "latest_checkpointed_iteration.txt").read_text())
    assert iteration >= 4 and (tmp_path / f"iter_{iteration:07d}").is_dir()


def test_bad_flag_combination_exits_2_with_message():
    proc = subprocess.run([sys.executable, SCRIPT, "--preset", "tiny"], capture_output=True, text=True, env=_env())
    assert proc.returncode == 2 and "no training data" in proc.stderr
