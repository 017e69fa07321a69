"""Activation recompute: every mode gives the gradients of no recompute (fp32; anchor and MeSH;
TP=2+SP on two gloo processes), each mode really drops saved tensors, and the flags validate as
Megatron-LM's do (core_v0.16.1 arguments.py / TransformerConfig)."""

import subprocess
import sys

import pytest
import torch

from distributed import run_on_ranks
from megatron_spiral.model.recompute import RecomputeConfig, RecomputeConfigError, mode_config

LENGTH = 30  # divisible by TP=2; compressed lengths are odd (padded for SP)

MODES = {
    "selective (core_attn)": dict(recompute_granularity="selective"),
    "full uniform 1": dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1),
    "full uniform 2": dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=2),
    "full block 1": dict(recompute_granularity="full", recompute_method="block", recompute_num_layers=1),
    "loop": dict(spiral_recompute_loop=True),
    "loop + full": dict(spiral_recompute_loop=True, recompute_granularity="full",
                        recompute_method="uniform", recompute_num_layers=1),
    "loop + selective": dict(spiral_recompute_loop=True, recompute_granularity="selective"),
    "loop + block 1": dict(spiral_recompute_loop=True, recompute_granularity="full",
                           recompute_method="block", recompute_num_layers=1),
}


def _model(topology, recompute, tp=1, dropout=0.0):
    from megatron_spiral.config import SpiralConfig
    from megatron_spiral.model.spiral_model import SpiralGPTModel, transformer_config

    spiral = SpiralConfig(layout="1+2x{1/4,1/3,1}+1", topology=topology, hidden_size=32,
                          num_attention_heads=4, vocab_size=128, seq_length=32, init_method_std=0.1,
                          transformer_impl="local")
    config = transformer_config(spiral, tensor_model_parallel_size=tp, sequence_parallel=tp > 1,
                                hidden_dropout=dropout, attention_dropout=dropout,
                                **recompute.transformer_config_overrides())
    return SpiralGPTModel(config, spiral, recompute_loop=recompute.spiral_recompute_loop).train()


def _loss_and_grads(topology, recompute, tp=1, dropout=0.0, seed=7):
    from megatron_spiral.parallel import initialize_parallel

    initialize_parallel(tensor_model_parallel_size=tp, seed=seed)
    model = _model(topology, recompute, tp, dropout)
    ids = torch.randint(0, 128, (2, LENGTH), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(LENGTH).unsqueeze(0).expand(2, -1)
    torch.manual_seed(11)  # same dropout stream for every mode
    loss = model(ids, pos, None, labels=torch.roll(ids, -1, 1)).mean()
    loss.backward()
    return loss.item(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def _assert_same(reference, other, what):
    loss0, grads0 = reference
    loss1, grads1 = other
    assert abs(loss0 - loss1) < 1e-6, f"{what}: loss {loss1} != {loss0}"
    for name, grad in grads0.items():
        torch.testing.assert_close(grads1[name], grad, rtol=1e-5, atol=1e-7,
                                   msg=lambda m, n=name: f"{what}: gradient of {n}: {m}")


@pytest.mark.parametrize("topology", ["anchor", "mesh"])
def test_every_recompute_mode_gives_the_gradients_of_no_recompute(topology):
    reference = _loss_and_grads(topology, RecomputeConfig())
    for name, fields in MODES.items():
        _assert_same(reference, _loss_and_grads(topology, RecomputeConfig(**fields)),
                     f"{topology}, {name}")


def test_recompute_restores_the_rng_so_dropout_masks_repeat():
    """megatron's tensor_parallel.checkpoint replays the forward under the saved CPU/CUDA/tracker RNG
    states: with dropout on, recomputed gradients still equal the stored-activation ones."""
    reference = _loss_and_grads("mesh", RecomputeConfig(), dropout=0.2)
    no_dropout = _loss_and_grads("mesh", RecomputeConfig())
    assert abs(reference[0] - no_dropout[0]) > 1e-4  # dropout really acts
    for name in ("full uniform 1", "loop", "selective (core_attn)"):
        _assert_same(reference, _loss_and_grads("mesh", RecomputeConfig(**MODES[name]), dropout=0.2),
                     f"dropout 0.2, {name}")


def _saved_bytes(model, ids):
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(ids, torch.arange(ids.shape[1]).unsqueeze(0), None, labels=ids).mean()
    return sum(seen.values())


def test_each_mode_keeps_fewer_tensors_and_eval_mode_does_not_checkpoint():
    from megatron_spiral.parallel import ensure_parallel

    ensure_parallel(seed=3)
    ids = torch.randint(0, 128, (1, LENGTH), generator=torch.Generator().manual_seed(0))
    baseline = _saved_bytes(_model("mesh", RecomputeConfig()), ids)
    saved = {name: _saved_bytes(_model("mesh", RecomputeConfig(**fields)), ids)
             for name, fields in MODES.items()}
    assert all(value < baseline for value in saved.values()), (baseline, saved)
    assert saved["full uniform 1"] < saved["full block 1"] < baseline
    assert saved["loop + full"] < saved["loop"] < baseline
    assert saved["loop + block 1"] < saved["loop"]  # the pre/post layers keep only their inputs
    # checkpointing is a training-time behaviour (megatron checks self.training): eval keeps all
    evaluated = _model("mesh", RecomputeConfig(**MODES["loop + full"])).eval()
    assert _saved_bytes(evaluated, ids) == _saved_bytes(_model("mesh", RecomputeConfig()).eval(), ids)


def test_loop_recompute_calls_the_update_hook_once_per_iteration():
    from megatron_spiral.parallel import ensure_parallel

    ensure_parallel(seed=3)
    model = _model("anchor", RecomputeConfig(spiral_recompute_loop=True))
    calls = []
    model.decoder.update_hook = lambda t, update: calls.append((t, tuple(update.shape)))
    ids = torch.randint(0, 128, (2, LENGTH), generator=torch.Generator().manual_seed(0))
    model(ids, torch.arange(LENGTH).unsqueeze(0).expand(2, -1), None, labels=ids).mean().backward()
    assert calls == [(t, (LENGTH, 2, 32)) for t in range(3)]  # not again during the backward


def _tp_compare_all(topology_modes):
    for topology, names in topology_modes:
        reference = _loss_and_grads(topology, RecomputeConfig(), tp=2)
        for name in names:
            _assert_same(reference, _loss_and_grads(topology, RecomputeConfig(**MODES[name]), tp=2),
                         f"TP=2+SP {topology}, {name}")
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()


def test_recompute_under_tp2_sequence_parallel_matches_no_recompute():
    run_on_ranks(_tp_compare_all, 2, [
        ("anchor", ["full uniform 1", "loop", "selective (core_attn)"]),
        ("mesh", ["full block 1", "loop + full", "loop + selective", "loop + block 1"]),
    ])


@pytest.mark.parametrize("fields, message", [
    (dict(recompute_granularity="full"), 'recompute_method must be "block" or "uniform"'),
    (dict(recompute_granularity="full", recompute_method="uniform"), "recompute_num_layers must be between"),
    (dict(recompute_granularity="selective", recompute_method="block"),
     "recompute method is not yet supported for selective recomputing granularity"),
    (dict(recompute_granularity="selective", recompute_num_layers=2), "recompute_num_layers must be None"),
    (dict(recompute_granularity="selective", recompute_modules=["moe"]), "Invalid choices for recompute_modules"),
    (dict(recompute_granularity="selective", recompute_modules=["mlp"]), "Invalid choices for recompute_modules"),
    (dict(recompute_granularity="half"), 'must be "full" or "selective"'),
])
def test_flag_validation_matches_megatron_messages(fields, message):
    with pytest.raises(RecomputeConfigError, match=message):
        RecomputeConfig(**fields)


def test_recompute_activations_means_selective_and_mode_names():
    """Megatron-LM: --recompute-activations sets recompute_granularity = 'selective'."""
    assert RecomputeConfig(recompute_activations=True).recompute_granularity == "selective"
    assert mode_config("loop+full").transformer_config_overrides() == dict(
        recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    assert mode_config("loop+full").spiral_recompute_loop and mode_config("none").mode == "none"
    assert mode_config("loop+block2").transformer_config_overrides() == dict(
        recompute_granularity="full", recompute_method="block", recompute_num_layers=2)
    for bad in ("full+selective", "block0", "loop+full+block1"):
        with pytest.raises(RecomputeConfigError, match="not one of"):
            mode_config(bad)


def test_loop_recompute_nests_uniform_in_the_core_but_not_block():
    """Under --spiral-recompute-loop the iteration checkpoint covers the core: block recompute
    (memory for little compute) then applies to the pre/post stacks only, uniform stays nested."""
    from megatron_spiral.parallel import ensure_parallel

    ensure_parallel(seed=3)
    block = _model("mesh", mode_config("loop+block1")).decoder
    assert block.core.config.recompute_granularity is None
    assert (block.pre.config.recompute_method, block.post.config.recompute_num_layers) == ("block", 1)
    uniform = _model("mesh", mode_config("loop+full")).decoder
    assert (uniform.core.config.recompute_method, uniform.core.config.recompute_num_layers) == ("uniform", 1)
    plain_block = _model("mesh", mode_config("block1")).decoder  # without loop the core keeps block
    assert plain_block.core.config.recompute_method == "block"


def test_pretrain_cli_accepts_and_rejects_recompute_flags():
    from megatron_spiral.training.arguments import parse_args

    run = parse_args(["--preset", "tiny", "--mock-data", "--recompute-granularity", "full", "--recompute-method", "block",
                      "--recompute-num-layers", "2", "--spiral-recompute-loop"])
    assert run.recompute.mode == "loop+full" and run.recompute.recompute_num_layers == 2
    proc = subprocess.run([sys.executable, "pretrain_spiral.py", "--preset", "tiny", "--mock-data", "--recompute-granularity",
                           "full"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert 'recompute_method must be "block" or "uniform" (add --recompute-method uniform)' in proc.stderr


def test_loop_recompute_with_a_sequence_shorter_than_a_chunk():
    """An iteration with no complete chunk adds zeros (nothing to recompute): the backward works and
    matches no recompute."""
    from megatron_spiral.parallel import ensure_parallel

    ensure_parallel(seed=3)
    grads = []
    for recompute in (RecomputeConfig(), RecomputeConfig(spiral_recompute_loop=True)):
        torch.manual_seed(0)
        model = _model("mesh", recompute)
        ids = torch.tensor([[5], [9]])  # L=1 < g=4 - omega: iteration 0 has no chunk
        model(ids, torch.zeros(1, 1, dtype=torch.long), None, labels=ids).mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], msg=name)
