"""Layer specs: local SDPA path, Transformer Engine selection and its clean fallback, CPU compat."""

import subprocess
import sys
import os

import pytest
import torch

from megatron_spiral import build_model
from megatron_spiral.model import layer_specs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_auto_selects_local_without_transformer_engine(monkeypatch):
    monkeypatch.setattr(layer_specs, "transformer_engine_available", lambda: False)
    assert layer_specs.resolve_transformer_impl("auto") == "local"
    with pytest.raises(RuntimeError, match="transformer_engine is not installed"):
        layer_specs.resolve_transformer_impl("transformer_engine")


def test_auto_selects_te_when_it_imports(monkeypatch):
    monkeypatch.setattr(layer_specs, "transformer_engine_available", lambda: True)
    assert layer_specs.resolve_transformer_impl("auto") == "transformer_engine"


@pytest.mark.skipif(not layer_specs.transformer_engine_available(), reason="Transformer Engine not installed")
def test_transformer_engine_model_matches_shapes_in_bf16():  # pragma: no cover - GPU machines with TE
    model = build_model("tiny", transformer_impl="transformer_engine", params_dtype=torch.bfloat16)
    logits = model(torch.randint(0, 256, (2, 64)).cuda())
    assert logits.shape == (2, 64, 256) and torch.isfinite(logits).all()


def test_sdpa_core_attention_matches_explicit_softmax():
    model = build_model("tiny", layout="2", init_method_std=0.2).eval()
    ids = torch.randint(0, 256, (2, 33))
    with torch.no_grad():
        fused = model(ids)
        recorded = []
        for layer in model.gpt.decoder.pre.layers:
            layer.self_attention.core_attention.attention_recorder = recorded.append
        explicit = model(ids)
    torch.testing.assert_close(explicit, fused, rtol=1e-4, atol=1e-5)
    probs = recorded[0]
    assert probs.shape == (2, 4, 33, 33)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 4, 33))
    assert probs.triu(1).abs().max() == 0  # causal


def test_cpu_compat_is_inert_when_cuda_is_present():
    code = (
        "import torch; torch.cuda.is_available = lambda: True\n"
        "before = torch.cuda.current_device\n"
        "from megatron_spiral.compat.cpu import enable_cpu_compat\n"
        "assert enable_cpu_compat() is False\n"
        "assert torch.cuda.current_device is before\n"
        "import megatron.core.optimizer.clip_grads as m; assert m.torch is torch\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONPATH": ROOT})


def test_rng_tracker_fork_switches_streams_on_cpu():
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker
    from megatron_spiral.parallel import ensure_parallel

    ensure_parallel(seed=5)
    tracker = get_cuda_rng_tracker()
    torch.manual_seed(5)
    plain = torch.rand(4)
    torch.manual_seed(5)
    with tracker.fork():
        forked = torch.rand(4)
    after = torch.rand(4)
    assert not torch.equal(plain, forked)
    assert torch.equal(plain, after)  # the default stream resumes where it was
