"""The model is the paper's: Algorithm 1 composition, MeSH equations, parameter counts, API."""

import itertools

import pytest
import torch

from megatron_spiral import SpiralConfig, SpiralConfigError, build_model, parse_layout
from megatron_spiral.analysis.accounting import count_params
from megatron_spiral.model.topology import MeshTopology


def test_build_model_api_shape_and_any_length():
    model = build_model("tiny", layout="1+2x{1/4,1/2,1}+1", topology="mesh", downscale="mean",
                        upscale="uniform", shift="overlap", chunk_offset="half",
                        hidden_size=64, num_attention_heads=4, vocab_size=256, seq_length=64)
    for length in (1, 2, 3, 7, 37, 64):
        logits = model(torch.randint(0, 256, (2, length)))
        assert logits.shape == (2, length, 256) and logits.dtype == torch.float32
        assert torch.isfinite(logits).all()
    with pytest.raises(ValueError, match="exceeds seq_length"):
        model(torch.zeros(1, 65, dtype=torch.long))


def test_loss_path_and_gradients_reach_every_parameter():
    model = build_model("tiny", vocab_size=100)
    ids = torch.randint(0, 100, (2, 40))
    loss = model(ids, labels=ids)
    assert loss.shape == (2, 40)
    loss.mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


def _hidden(model, ids):
    """Run embedding -> decoder by hand, returning (embeddings x, rotary) for composition checks."""
    gpt = model.gpt
    pos = torch.arange(ids.shape[1]).unsqueeze(0)
    x = gpt.embedding(input_ids=ids, position_ids=pos)
    rope = gpt.rotary_pos_emb(ids.shape[1])
    return x, rope


def test_loopedformer_anchor_is_algorithm1_by_hand():
    """{1,1} + anchor: h1 = f_loop(h0) + h0, h2 = f_loop(h1) + h0 (eq. 5, g_t = 1, s_t = 0)."""
    # embedding_scale="none": the block is fed x directly here (the scale is tested in test_recipe.py)
    model = build_model("tiny", layout="1+2x{1,1}+1", topology="anchor", init_method_std=0.2,
                        embedding_scale="none").eval()
    block = model.gpt.decoder
    ids = torch.randint(0, 256, (2, 19))
    with torch.no_grad():
        x, rope = _hidden(model, ids)
        h0 = block.pre(hidden_states=x, attention_mask=None, rotary_pos_emb=rope)
        h = h0
        for _ in range(2):
            h = block.core(hidden_states=h, attention_mask=None, rotary_pos_emb=rope) + h0
        expected = block.final_layernorm(block.post(hidden_states=h, attention_mask=None, rotary_pos_emb=rope))
        torch.testing.assert_close(block(x, rotary_pos_emb=rope), expected)


def test_spiral_iteration_by_hand_mean_uniform_zero_offset():
    """One coarse iteration written out for g=2, omega=0, s=1: z_j = (h_2j + h_2j+1)/2, core at
    RoPE positions 0..L_t-1, u_i = sqrt(2)/2 zhat_{i//2}, u~_i = u_{i-1}, anchor update."""
    model = build_model("tiny", layout="0+1x{1/2}+0", topology="anchor", downscale="mean",
                        upscale="uniform", chunk_offset="zero", init_method_std=0.2,
                        embedding_scale="none").eval()
    block = model.gpt.decoder
    ids = torch.randint(0, 256, (1, 11))
    with torch.no_grad():
        x, rope = _hidden(model, ids)
        z = torch.stack([(x[2 * j] + x[2 * j + 1]) / 2 for j in range(5)])
        zhat = block.core(hidden_states=z, attention_mask=None, rotary_pos_emb=rope[:5])
        u = torch.zeros_like(x)
        for i in range(10):
            u[i] = (2 ** 0.5) / 2 * zhat[i // 2]
        shifted = torch.cat([torch.zeros_like(x[:1]), u[:-1]])
        expected = block.final_layernorm(shifted + x)
        torch.testing.assert_close(block(x, rotary_pos_emb=rope), expected)


def test_mesh_topology_matches_appendix_b_slot_by_slot():
    torch.manual_seed(0)
    d, slots, T, L = 6, 5, 2, 4
    mesh = MeshTopology(d, slots, T, init_method=lambda w: torch.nn.init.normal_(w, std=0.5))
    x, v = torch.randn(L, 1, d), torch.randn(L, 1, d)
    updates = [torch.randn(L, 1, d) for _ in range(T)]

    def weights(router, inp):
        return torch.softmax(router(inp), dim=-1)

    # Eq. 24-27 literally, with a Python list of slots.
    memory = [x.clone()] + [torch.zeros_like(x) for _ in range(slots - 1)]
    w_w, w_r = weights(mesh.write_routers[0], x), weights(mesh.read_routers[0], x)
    memory = [memory[b] + v * w_w[..., b:b + 1] for b in range(slots)]
    h = sum(memory[b] * w_r[..., b:b + 1] for b in range(slots))
    h_impl, mem_impl = mesh.initial_state(x, v)
    torch.testing.assert_close(h_impl, h)
    for t in range(T):  # eq. 28-30
        w_w, w_r = weights(mesh.write_routers[t + 1], h), weights(mesh.read_routers[t + 1], h)
        memory = [memory[b] + updates[t] * w_w[..., b:b + 1] for b in range(slots)]
        h_next = sum(memory[b] * w_r[..., b:b + 1] for b in range(slots))
        h_impl, mem_impl = mesh.update(updates[t], h_impl, mem_impl, t)
        torch.testing.assert_close(h_impl, h_next)
        h = h_next
    assert len(mesh.write_routers) == T + 1 and mesh.write_routers[0].bias is not None


def test_mesh_default_slots_is_t_plus_3():
    model = build_model("tiny", layout="1+1x{1/8,1/4,1/2,1}+1", topology="mesh")
    assert model.gpt.decoder.topology.write_routers[0].out_features == 4 + 3
    model = build_model("tiny", layout="1+1x{1/2,1}+1", topology="mesh", mesh_slots=9)
    assert model.gpt.decoder.topology.read_routers[2].out_features == 9


PARAM_CASES = list(itertools.product(("anchor", "mesh"), ("self_aggregation", "mean"), ("router", "uniform")))


@pytest.mark.parametrize("topology,downscale,upscale", PARAM_CASES)
def test_reported_params_equal_real_model(topology, downscale, upscale):
    model = build_model("tiny", layout="1+2x{1/6,1/3,1/2,1}+1", topology=topology,
                        downscale=downscale, upscale=upscale, vocab_size=300)
    real = sum(p.numel() for p in model.parameters())
    assert count_params(model.config).total == real


@pytest.mark.parametrize("layout,norm", [("3", "LayerNorm"), ("2+1x{1,1}+2", "RMSNorm")])
def test_baseline_and_loopedformer_param_counts(layout, norm):
    model = build_model("tiny", layout=layout, normalization=norm)
    assert count_params(model.config).total == sum(p.numel() for p in model.parameters())
    d = model.config.hidden_size
    per_layer = 12 * d * d + (13 if norm == "LayerNorm" else 11) * d
    assert count_params(model.config).breakdown["layers"] == parse_layout(layout).num_unique_layers * per_layer


def test_preset_160m_param_count_matches_built_model():
    model = build_model("spiral-b-160m-mesh", seq_length=64)
    assert sum(p.numel() for p in model.parameters()) == count_params(model.config).total


@pytest.mark.parametrize("bad,match", [
    (dict(layout="2+4x{1/8,1/4+2"), "cannot parse layout"),
    (dict(layout="2+4x{0,1}+2"), r"must lie in \(0, 1\]"),
    (dict(layout="2+4x{1/8,2}+2"), r"must lie in \(0, 1\]"),
    (dict(layout="2+0x{1}+2"), "N_loop >= 1"),
    (dict(layout="2+4x{1/8}+2", shift="6"), "breaks strict causality at iteration 0"),
    (dict(shift="sideways"), "not one of"),
    (dict(topology="ring"), "topology='ring' is not valid"),
    (dict(hidden_size=30, num_attention_heads=4), "not divisible by num_attention_heads"),
    (dict(mesh_slots=0), "mesh_slots must be >= 1"),
])
def test_config_validation_says_what_is_wrong(bad, match):
    with pytest.raises(SpiralConfigError, match=match):
        SpiralConfig(**bad)


def test_layout_notation_variants():
    a = parse_layout("2+4x{1/8,1/4,1/2,1}+2")
    assert parse_layout("2 + 4×{1/8, 1/4, 1/2, 1} + 2") == a
    assert (a.num_pre, a.num_loop, a.num_post, a.num_iterations) == (2, 4, 2, 4)
    cfg = SpiralConfig(layout="1+1x{1/3,1/6,0.5,1}+1", shift="parallel", chunk_offset="half")
    assert cfg.chunk_sizes == [3, 6, 2, 1]
    assert cfg.chunk_offsets == [1, 3, 1, 0]
    assert cfg.shifts == [3, 6, 2, 1]
    assert SpiralConfig(layout="1+1x{1/3,1/6}+1", shift="overlap").shifts == [2, 5]
    with pytest.raises(SpiralConfigError, match="unknown config field"):
        SpiralConfig().replace(hidden=3)


def test_padded_vocab_follows_megatron_rule():
    assert SpiralConfig(vocab_size=50277).padded_vocab_size == 50304
    assert SpiralConfig(vocab_size=256).padded_vocab_size == 256
