"""Presets and the model report reproduce the paper's Table 1."""

import json
import subprocess
import sys
import os

import pytest

from megatron_spiral.analysis.accounting import count_params, forward_flops
from megatron_spiral.presets import PAPER_TABLE1, PRESETS, get_preset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

REQUIRED = ([f"pythia-{s}" for s in ("160m", "410m", "1b", "1.4b")]
            + [f"looped-{s}-{t}" for s in ("160m", "410m", "1b", "1.4b") for t in ("anchor", "mesh")]
            + [f"spiral-b-{s}-mesh" for s in ("160m", "410m", "1b", "1.4b")]
            + ["spiral-b-410m-anchor"]
            + [f"spiral-l-{s}-mesh" for s in ("160m", "410m", "1b", "1.4b")] + ["tiny"]
            + [f"pythia-{s}-mesh" for s in ("160m", "410m", "1b", "1.4b")])  # BASELINE† (1.4b) + ours


def test_every_required_preset_exists():
    assert sorted(REQUIRED) == sorted(PRESETS)


@pytest.mark.parametrize("name", list(PAPER_TABLE1))
def test_table1_row(name):
    total, non_emb, tflops = PAPER_TABLE1[name]
    config = get_preset(name)
    params = count_params(config)
    assert abs(params.non_embedding / 1e6 - non_emb) / non_emb <= 0.005
    assert abs(params.total / 1e6 - total) / total <= 0.015
    assert abs(forward_flops(config, 4096).total / 1e12 - tflops) / tflops <= 0.02


def test_table1_layouts_and_dims():
    assert get_preset("spiral-l-1b-mesh").layout == "5+6x{1/16,1/8,1/4,1/2}+5"
    assert get_preset("looped-1b-anchor").layout == "3+5x{1,1}+3"
    c = get_preset("pythia-1b")
    assert (c.hidden_size, c.num_attention_heads, c.layout, c.padded_vocab_size) == (2048, 8, "16", 50304)
    assert get_preset("spiral-b-410m-anchor").topology == "anchor"


def test_spiral_is_cheaper_than_looped_at_every_scale():
    for size in ("160m", "410m", "1b", "1.4b"):
        looped = forward_flops(get_preset(f"looped-{size}-mesh")).total
        spiral = forward_flops(get_preset(f"spiral-b-{size}-mesh")).total
        assert 0.85 < spiral / looped < 0.95  # paper: 7-11% fewer FLOPs


def test_model_report_cli_json():
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", "model_report.py"), "--preset", "spiral-b-160m-mesh",
         "--seq-length", "4096", "--json"], capture_output=True, text=True, check=True,
        env={**os.environ, "PYTHONPATH": ROOT})
    info = json.loads(out.stdout)
    assert {"params_total", "params_non_embedding", "prefill_flops"} <= set(info)
    assert abs(info["prefill_flops"] / 1e12 - 1.48) / 1.48 <= 0.02


def test_model_report_rejects_bad_layout_with_exit_code():
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", "model_report.py"), "--spiral-layout", "2+4x{1/8+2"],
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ROOT})
    assert out.returncode == 2 and "cannot parse layout" in out.stderr


@pytest.mark.parametrize("size,d,layers", [("160m", 768, 12), ("410m", 1024, 24), ("1b", 2048, 16)])
def test_pythia_presets_are_untied_gpt_neox_by_closed_form(size, d, layers):
    """Table 1's Pythia rows: L (12d^2 + 13d) + final LayerNorm 2d + two untied 50304 x d matrices.
    Megatron-LM ties embeddings by default, so the presets must say untied explicitly."""
    config = get_preset(f"pythia-{size}")
    assert not config.tied_embeddings and config.hidden_dropout == 0.0 == config.attention_dropout
    expected = layers * (12 * d * d + 13 * d) + 2 * d + 2 * 50304 * d
    assert count_params(config).total == expected
    tied = count_params(config.replace(untie_embeddings_and_output_weights=False))
    assert tied.total == expected - 50304 * d and tied.non_embedding == count_params(config).non_embedding
