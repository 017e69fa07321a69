"""Unshared loop passes (untie_core): iteration t runs its own core weights.

An untied model whose passes all hold the same weights computes exactly the tied model (logits)
and its per-pass gradients sum to the tied core's gradient; the passes are otherwise independent
parameters. Causality, parameter accounting, dist_checkpointing resharding (TP=2+SP -> TP=1), the
HF export and Algorithm-2 decoding hold for every topology and schedule.
"""

import pytest
import torch

from distributed import run_on_ranks
from hf_helpers import one_cpu_thread, decode_logits, megatron_model  # noqa: F401
from test_causality import _assert_causal

SCHEDULES = ["1+2x{1/4,1/2,1}+1", "1+1x{1,1}+1", "0+1x{1/3,1/6,1}+1"]


def _pair(layout, topology, **knobs):
    """(tied, untied) models; the untied passes are overwritten with the tied core's weights."""
    from megatron_spiral import build_model

    common = dict(layout=layout, topology=topology, hidden_size=32, num_attention_heads=4, vocab_size=64,
                  seq_length=48, init_method_std=0.2, transformer_impl="local", **knobs)
    tied = build_model("tiny", seed=1, **common).eval()
    untied = build_model("tiny", seed=1, untie_core=True, **common).eval()
    state = {}
    for key, value in tied.gpt.state_dict().items():
        if key.startswith("decoder.core."):
            for t in range(tied.config.num_iterations):
                state[key.replace("decoder.core.", f"decoder.core.passes.{t}.", 1)] = value
        else:
            state[key] = value
    untied.gpt.load_state_dict(state, strict=True)
    return tied, untied


def _ids(length=29, seed=0):
    return torch.randint(0, 64, (2, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("layout", SCHEDULES)
@pytest.mark.parametrize("topology", ["anchor", "mesh"])
def test_equal_passes_compute_the_tied_model_and_gradients_add_up(layout, topology):
    tied, untied = _pair(layout, topology)
    ids = _ids()
    labels = torch.roll(ids, -1, 1)
    tied_loss, untied_loss = tied(ids, labels=labels).mean(), untied(ids, labels=labels).mean()
    torch.testing.assert_close(untied_loss, tied_loss, rtol=1e-6, atol=1e-6)
    tied_loss.backward()
    untied_loss.backward()
    passes = untied.gpt.decoder.core.passes
    assert len(passes) == tied.config.num_iterations
    for name, param in tied.gpt.decoder.core.named_parameters():
        per_pass = [dict(stack.named_parameters())[name].grad for stack in passes]
        assert all(g is not None and g.abs().sum() > 0 for g in per_pass), name  # every pass is used
        torch.testing.assert_close(sum(per_pass), param.grad, rtol=1e-4, atol=1e-6)


def test_passes_are_independent_weights():
    from megatron_spiral import build_model

    model = build_model("tiny", layout="1+2x{1/4,1/2,1}+1", untie_core=True, transformer_impl="local").eval()
    first, second = (stack.layers[0].self_attention.linear_qkv.weight for stack in model.gpt.decoder.core.passes[:2])
    assert not torch.equal(first, second)  # drawn separately at init
    ids = _ids()
    with torch.no_grad():
        before = model(ids)
        weight = model.gpt.decoder.core.passes[2].layers[1].mlp.linear_fc2.weight
        weight.add_(torch.randn(weight.shape, generator=torch.Generator().manual_seed(0)))
        assert (model(ids) - before).abs().max() > 1e-3


@pytest.mark.parametrize("layout", SCHEDULES)
@pytest.mark.parametrize("topology", ["anchor", "mesh"])
def test_untied_core_is_strictly_causal(layout, topology):
    from megatron_spiral import build_model

    model = build_model("tiny", layout=layout, topology=topology, untie_core=True, hidden_size=32,
                        num_attention_heads=2, vocab_size=64, seq_length=64, init_method_std=0.3).eval()
    _assert_causal(model, 29, cut_points=(1, 5, 6, 11, 17, 28))


@pytest.mark.parametrize("layout,topology", [("1+2x{1/4,1/2,1}+1", "mesh"), ("2+1x{1,1}+0", "anchor")])
def test_parameter_count_matches_the_built_model(layout, topology):
    from megatron_spiral import build_model
    from megatron_spiral.analysis.accounting import count_params, layer_params

    model = build_model("tiny", layout=layout, topology=topology, untie_core=True, transformer_impl="local")
    counted = count_params(model.config)
    assert counted.total == sum(p.numel() for p in model.gpt.parameters())
    tied = count_params(model.config.replace(untie_core=False))
    layout_ = model.config.parsed_layout
    extra = (model.config.num_iterations - 1) * layout_.num_loop * layer_params(model.config)
    assert counted.total - tied.total == extra


KNOBS = [
    dict(layout="1+2x{1/8,1/4,1/2,1}+1", topology="mesh", untie_core=True),
    dict(layout="1+2x{1/8,1/4,1/2,1}+1", topology="anchor", untie_core=True, shift="parallel"),
    dict(layout="1+1x{1,1}+1", topology="mesh", untie_core=True, embedding_scale="none"),
]


@pytest.mark.parametrize("knobs", KNOBS, ids=lambda k: f"{k['topology']}-{k['layout']}")
def test_hf_export_and_decoding_match_megatron(knobs):
    from megatron_spiral.hf.convert import hf_to_megatron_state_dict, megatron_to_hf_state_dict
    from megatron_spiral.inference import to_hf

    mega = megatron_model(**knobs)
    hf = to_hf(mega)
    assert len(hf.model.core_passes) == mega.config.num_iterations and len(hf.model.core_layers) == 0
    ids = torch.randint(0, 61, (2, 30), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = mega(ids)[..., :61]
        assert (hf(ids, use_cache=False).logits - want).abs().max().item() <= 1e-4
        for prompt in (1, 9):
            got = torch.cat([decode_logits(hf, ids[row:row + 1], prompt)[0] for row in range(2)])
            assert (got - want).abs().max().item() <= 1e-4, prompt
    gpt_state = {k: v for k, v in mega.gpt.state_dict().items() if not k.endswith("_extra_state")}
    hf_state = megatron_to_hf_state_dict(gpt_state, 61, 4)
    back = hf_to_megatron_state_dict(hf_state, gpt_state, 4)
    for key, value in back.items():
        torch.testing.assert_close(value, gpt_state[key], msg=key)


def _save_untied_tp2(save_dir, ids_path, logits_path):
    from megatron_spiral.checkpointing import save_sharded_checkpoint
    from megatron_spiral.config import SpiralConfig
    from megatron_spiral.model.spiral_model import SpiralGPTModel, transformer_config
    from megatron_spiral.parallel import destroy_parallel, initialize_parallel

    initialize_parallel(tensor_model_parallel_size=2, seed=5)
    spiral = SpiralConfig(layout="1+1x{1/4,1/2,1}+1", hidden_size=32, num_attention_heads=4, vocab_size=64,
                          seq_length=32, init_method_std=0.1, untie_core=True, transformer_impl="local")
    model = SpiralGPTModel(transformer_config(spiral, tensor_model_parallel_size=2, sequence_parallel=True),
                           spiral).eval()
    ids = torch.load(ids_path)
    with torch.no_grad():
        logits = model(ids, torch.arange(ids.shape[1]).unsqueeze(0).expand_as(ids), None,
                       runtime_gather_output=True)
    if torch.distributed.get_rank() == 0:
        torch.save(logits.float(), logits_path)
    save_sharded_checkpoint(save_dir, 2, {"model": model.sharded_state_dict()}, spiral.to_dict())
    destroy_parallel()


def test_tp2_sequence_parallel_checkpoint_loads_at_tp1(tmp_path):
    """Each pass keeps megatron's TP sharding in dist_checkpointing (a plain ModuleList would be
    saved as replicated shards and fail to reshard)."""
    from megatron_spiral.hf.convert import load_megatron_model

    ids = torch.randint(0, 64, (2, 30), generator=torch.Generator().manual_seed(6))
    torch.save(ids, tmp_path / "ids.pt")
    run_on_ranks(_save_untied_tp2, 2, str(tmp_path / "ckpt"), str(tmp_path / "ids.pt"), str(tmp_path / "logits.pt"))
    model = load_megatron_model(str(tmp_path / "ckpt"))[0]
    assert model.config.untie_core
    with torch.no_grad():
        got = model(ids)
    torch.testing.assert_close(got, torch.load(tmp_path / "logits.pt"), rtol=1e-4, atol=1e-5)
