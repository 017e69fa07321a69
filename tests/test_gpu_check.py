"""scripts/gpu_check.sh: its --dry-run runs the whole GPU acceptance path on CPU (so it cannot rot),
prints the summary table, and a failing parity check makes it exit non-zero."""

import os
import re
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "gpu_check.sh")


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHON": sys.executable}


def test_dry_run_passes_and_prints_one_summary_table():
    proc = subprocess.run(["bash", SCRIPT, "--dry-run", "--steps", "2"], capture_output=True, text=True,
                          env=_env(), timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert out.count("# GPU acceptance summary") == 1
    assert re.search(r"\| fp32 logits max \|cpu - cpu\| \| [\d.e-]+ \| 0\.0001 \| PASS \|", out)
    assert "| bf16 loss" in out and "FAIL" not in out
    for preset, layout in (("pythia-160m", "12"), ("looped-160m-mesh", "2+4x{1,1}+2"),
                           ("spiral-b-160m-mesh", "2+4x{1/8,1/4,1/2,1}+2"),
                           ("spiral-l-160m-mesh", "4+4x{1/16,1/8,1/4,1/2}+4")):
        assert re.search(rf"\| {re.escape(preset)} \| {re.escape(layout)} \| [\d.]+ \|", out), preset
    assert "| spiral-b-160m-mesh / looped-160m-mesh |" in out
    assert re.search(r"context +32: cached", out)
    assert "all parity checks passed" in out


def test_failing_parity_check_exits_1():
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "gpu_check.py"), "--dry-run",
                           "--models", "pythia-160m", "--steps", "2", "--skip-decode", "--logits-tol", "-1"],
                          capture_output=True, text=True, env={**_env(), "PYTHONPATH": ROOT}, timeout=300)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "FAIL" in proc.stdout and "FAILED: fp32 logits" in proc.stdout


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="a CUDA machine runs the real check")
def test_without_a_gpu_the_real_run_refuses_with_a_hint():
    proc = subprocess.run(["bash", SCRIPT], capture_output=True, text=True, env=_env(), timeout=60)
    assert proc.returncode == 2 and "--dry-run" in proc.stderr


def test_unmet_requirements_lists_only_what_this_python_lacks(tmp_path, capsys):
    """gpu_check.sh installs, next to a GPU machine's own CUDA torch, only the requirements its
    Python does not satisfy (scripts/unmet_requirements.py)."""
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    import unmet_requirements

    requirements = tmp_path / "requirements.txt"
    requirements.write_text("# comment\nnumpy\nmegatron-core>=999  # too new\npackaging<1\n"
                            "surely-not-installed-xyz\n-e .\n")
    parsed = unmet_requirements.read_requirements(str(requirements))
    assert unmet_requirements.unmet(parsed) == ["megatron-core>=999", "packaging<1", "surely-not-installed-xyz"]
    assert unmet_requirements.unmet(parsed, ["numpy", "Megatron_Core"]) == ["megatron-core>=999"]
    # --all (scripts/gpu_wheels.sh): the named specifiers, met or not
    assert unmet_requirements.unmet(parsed, ["numpy", "megatron-core"], met_too=True) == [
        "numpy", "megatron-core>=999"]
    with pytest.raises(SystemExit, match="torch not in the requirements file"):
        unmet_requirements.unmet(parsed, ["torch"])
    # the repository's own requirements are met by the environment the tests run in
    assert unmet_requirements.main([os.path.join(ROOT, "requirements.txt"), "megatron-core", "transformers"]) == 0
    assert capsys.readouterr().out == ""
