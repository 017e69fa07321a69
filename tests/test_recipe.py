"""The authors' training recipe (MeSH paper App. B), Table 1's BASELINE† row, the multi-seed report.

* embedding_scale='sqrt_d' multiplies the token embeddings by sqrt(d) before the first layer, and
  that scaled x is what every later use sees (MeSH slot 0, the transitional routers);
* output_init_depth='unrolled' draws the attention-out and MLP-fc2 weights with std
  init_std / sqrt(2 N_compute), N_compute the unrolled layer count (megatron's
  scaled_init_method_normal uses num_layers, i.e. the unique layers: 'unique');
* a config written before these fields existed (old checkpoint metadata, old config.json) keeps
  its old meaning; megatron and HF agree on every knob (full forward and cached decoding).
"""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from hf_helpers import one_cpu_thread, decode_logits, megatron_model  # noqa: F401

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LENGTH = 37


def _build(**knobs):
    from megatron_spiral import build_model

    kwargs = dict(layout="1+2x{1/4,1/2,1}+1", hidden_size=32, num_attention_heads=4, vocab_size=64,
                  seq_length=48, init_method_std=0.1, transformer_impl="local")
    kwargs.update(knobs)
    return build_model("tiny", seed=3, **kwargs).eval()


def _ids(vocab=64, length=LENGTH, seed=0):
    return torch.randint(0, vocab, (2, length), generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- config
def test_unrolled_depth_of_the_paper_layout_is_40():
    from megatron_spiral.config import SpiralConfig

    spiral = SpiralConfig(layout="4+8x{1/8,1/4,1/2,1}+4")
    assert spiral.num_compute_layers == 4 + 8 * 4 + 4 == 40
    assert spiral.init_depth == 40
    assert spiral.replace(output_init_depth="unique").init_depth == 16
    assert SpiralConfig(layout="12").init_depth == 12  # a plain stack: both counts agree


def test_defaults_are_the_authors_recipe_and_bad_values_are_refused():
    from megatron_spiral.config import SpiralConfig, SpiralConfigError

    spiral = SpiralConfig()
    assert (spiral.embedding_scale, spiral.output_init_depth, spiral.untie_core) == ("sqrt_d", "unrolled", False)
    assert spiral.embedding_multiplier == math.sqrt(64)
    with pytest.raises(SpiralConfigError, match="embedding_scale='sqrt' is not valid; choose one of sqrt_d, none"):
        SpiralConfig(embedding_scale="sqrt")
    with pytest.raises(SpiralConfigError, match="output_init_depth"):
        SpiralConfig(output_init_depth="deep")


def test_old_config_dicts_keep_their_old_meaning():
    from megatron_spiral.config import SpiralConfig
    from megatron_spiral.hf.configuration_spiral import SpiralFormerConfig

    old = {k: v for k, v in SpiralConfig().to_dict().items()
           if k not in ("embedding_scale", "output_init_depth", "untie_core")}
    spiral = SpiralConfig.from_dict(old)
    assert (spiral.embedding_scale, spiral.output_init_depth, spiral.untie_core) == ("none", "unique", False)
    assert SpiralConfig.from_dict(dict(old, embedding_scale="sqrt_d")).embedding_scale == "sqrt_d"
    hf = SpiralFormerConfig(layout="1+2x{1/4,1/2,1}+1")  # an old config.json lacks the fields
    assert (hf.embedding_scale, hf.output_init_depth, hf.untie_core) == ("none", "unique", False)


def test_cli_flags_exist():
    import argparse

    from megatron_spiral.cli import add_dataclass_arguments, dataclass_from_args
    from megatron_spiral.config import SpiralConfig

    parser = argparse.ArgumentParser()
    add_dataclass_arguments(parser, SpiralConfig, "model")
    args = parser.parse_args(["--spiral-embedding-scale", "none", "--spiral-output-init-depth", "unique",
                              "--spiral-untie-core", "--spiral-layout", "1+1x{1,1}+1"])
    spiral = dataclass_from_args(SpiralConfig, args)
    assert (spiral.embedding_scale, spiral.output_init_depth, spiral.untie_core) == ("none", "unique", True)


# ----------------------------------------------------------------------------- embedding scale
@pytest.mark.parametrize("topology", ["anchor", "mesh"])
def test_sqrt_d_scale_equals_scaled_embedding_weights(topology):
    """sqrt_d with weights W == no scale with weights sqrt(d) W: the scale is applied once, to x,
    before the first layer, and MeSH's slot 0 / transitional routers see the same scaled x."""
    scaled = _build(topology=topology, embedding_scale="sqrt_d")
    plain = _build(topology=topology, embedding_scale="none")
    plain.gpt.load_state_dict(scaled.gpt.state_dict())
    ids = _ids()
    with torch.no_grad():
        want = scaled(ids)
        assert (plain(ids) - want).abs().max() > 1e-2  # the knob changes the function
        plain.gpt.embedding.word_embeddings.weight.mul_(math.sqrt(32))
        torch.testing.assert_close(plain(ids), want, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- depth-aware init
def _output_weights(gpt):
    return [(name, p) for name, p in gpt.named_parameters()
            if name.endswith(("linear_proj.weight", "linear_fc2.weight"))]


@pytest.mark.parametrize("depth,expected_n", [("unrolled", 40), ("unique", 16)])
def test_output_projection_init_std(depth, expected_n):
    """std of every attention-out / MLP-fc2 weight = 0.02 / sqrt(2 N): N = 4 + 8*4 + 4 = 40
    unrolled, 16 unique (megatron's scaled_init_method_normal with num_layers); other weights 0.02."""
    model = _build(layout="4+8x{1/8,1/4,1/2,1}+4", hidden_size=64, init_method_std=0.02,
                   output_init_depth=depth, seq_length=16)
    outputs = _output_weights(model.gpt)
    assert len(outputs) == 2 * 16
    want = 0.02 / math.sqrt(2 * expected_n)
    for name, weight in outputs:
        assert abs(weight.std().item() / want - 1) < 0.06, (name, weight.std().item(), want)
    qkv = model.gpt.decoder.core.layers[0].self_attention.linear_qkv.weight
    assert abs(qkv.std().item() / 0.02 - 1) < 0.03


def test_hf_fresh_init_uses_the_same_depth():
    from megatron_spiral.hf.configuration_spiral import SpiralFormerConfig
    from megatron_spiral.hf.modeling_spiral import SpiralFormerForCausalLM

    torch.manual_seed(0)
    config = SpiralFormerConfig(layout="4+8x{1/8,1/4,1/2,1}+4", hidden_size=64, num_attention_heads=4,
                                output_init_depth="unrolled", initializer_range=0.02)
    model = SpiralFormerForCausalLM(config)
    want = 0.02 / math.sqrt(80)
    for layer in list(model.model.pre_layers) + list(model.model.core_layers):
        assert abs(layer.attn.o_proj.weight.std().item() / want - 1) < 0.06
        assert abs(layer.mlp.fc2.weight.std().item() / want - 1) < 0.06
        assert abs(layer.mlp.fc1.weight.std().item() / 0.02 - 1) < 0.03


# ----------------------------------------------------------------------------- parity
RECIPE_KNOBS = [
    dict(topology="mesh", embedding_scale="sqrt_d"),
    dict(topology="anchor", embedding_scale="sqrt_d", output_init_depth="unique"),
    dict(topology="mesh", embedding_scale="none", output_init_depth="unrolled"),
    dict(layout="3", embedding_scale="sqrt_d"),
    dict(layout="1+1x{1,1}+1", topology="mesh", untie_core=True, embedding_scale="sqrt_d"),
]


@pytest.mark.parametrize("knobs", RECIPE_KNOBS, ids=lambda k: "-".join(f"{a}={b}" for a, b in k.items()))
def test_hf_matches_megatron_and_decoding_matches_full_forward(knobs):
    from megatron_spiral.inference import to_hf

    mega = megatron_model(**knobs)
    hf = to_hf(mega)
    assert hf.config.embedding_scale == mega.config.embedding_scale
    ids = _ids(vocab=61, length=30, seed=2)
    with torch.no_grad():
        want = mega(ids)[..., :61]
        full = hf(ids, use_cache=False).logits
    assert want.std() > 0.1
    assert (full - want).abs().max().item() <= 1e-4
    for prompt in (1, 7):
        got = torch.cat([decode_logits(hf, ids[row:row + 1], prompt)[0] for row in range(2)])
        assert (got - want).abs().max().item() <= 1e-4, prompt


def test_old_checkpoint_loads_with_its_old_meaning(tmp_path):
    """A checkpoint whose metadata predates the recipe fields is rebuilt without the embedding
    scale (its training-time meaning), by the HF export path and by load_spiral_config."""
    from megatron_spiral.checkpointing import CONFIG_FILE, load_spiral_config, save_sharded_checkpoint
    from megatron_spiral.hf.convert import load_megatron_model

    old = megatron_model(embedding_scale="none", output_init_depth="unique")
    fields = {k: v for k, v in old.config.to_dict().items()
              if k not in ("embedding_scale", "output_init_depth", "untie_core")}
    ckpt = save_sharded_checkpoint(str(tmp_path / "ckpt"), 1, {"model": old.gpt.sharded_state_dict()}, fields)
    with open(os.path.join(ckpt, CONFIG_FILE)) as f:
        assert "embedding_scale" not in json.load(f)["model"]
    assert load_spiral_config(ckpt).embedding_scale == "none"
    loaded = load_megatron_model(str(tmp_path / "ckpt"))[0]
    assert loaded.config.embedding_scale == "none"
    ids = _ids(vocab=61, length=30)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), old(ids), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- Table 1 row 22
def test_baseline_dagger_counts_by_hand():
    """BASELINE† (Table 1, 1.4B): Pythia-1.4B's 24 layers as 4+8x{1,1}+4 with untied passes and
    a 2-step MeSH buffer. Hand count: each GPT-NeoX layer 12 d^2 + 13 d, final norm 2d; MeSH:
    3 router pairs x 2 x (d * 5 + 5) = 61,470 at d = 2048, B = T + 3 = 5."""
    from megatron_spiral.analysis.accounting import count_params, forward_flops
    from megatron_spiral.presets import PAPER_TABLE1, get_preset

    d = 2048
    pythia_non_embedding = 24 * (12 * d * d + 13 * d) + 2 * d
    routers = 3 * 2 * (d * 5 + 5)
    assert routers == 61_470
    config = get_preset("pythia-1.4b-mesh")
    assert (config.layout, config.topology, config.untie_core, config.num_mesh_slots) == ("4+8x{1,1}+4", "mesh", True, 5)
    assert count_params(get_preset("pythia-1.4b")).non_embedding == pythia_non_embedding
    assert count_params(config).non_embedding == pythia_non_embedding + 61_470
    total, non_emb, tflops = PAPER_TABLE1["pythia-1.4b-mesh"]
    assert abs(count_params(config).non_embedding / 1e6 - non_emb) < 0.05
    assert abs(forward_flops(config, 4096).total / 1e12 - tflops) / tflops <= 0.02


def test_model_report_lists_22_rows():
    out = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "model_report.py"), "--all-presets"],
                         capture_output=True, text=True, check=True, env={**os.environ, "PYTHONPATH": ROOT})
    table, ours = out.stdout.split("\n\n")
    rows = table.splitlines()[2:]
    assert len(rows) == 22
    assert [line.split()[0] for line in ours.splitlines()[1:]] == ["pythia-160m-mesh", "pythia-410m-mesh",
                                                                   "pythia-1b-mesh"]
    row = next(line for line in rows if line.startswith("pythia-1.4b-mesh "))
    assert "1208.7" in row.split()[3:5]  # ours next to the paper's


def test_peak_lr_per_size():
    from megatron_spiral.config import SpiralConfigError
    from megatron_spiral.presets import PAPER_PEAK_LR, peak_lr

    assert PAPER_PEAK_LR == {"160m": 6e-4, "410m": 3e-4, "1b": 3e-4, "1.4b": 2e-4}
    assert peak_lr("spiral-l-1.4b-mesh") == 2e-4 and peak_lr("looped-410m-anchor") == 3e-4
    assert peak_lr("pythia-1b-mesh") == 3e-4
    with pytest.raises(SpiralConfigError, match="pass --lr"):
        peak_lr("tiny")


# ----------------------------------------------------------------------------- multi-seed report
def _replicate():
    import importlib.util

    spec = importlib.util.spec_from_file_location("replicate_small", os.path.join(ROOT, "examples", "replicate_small.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up while being built
    spec.loader.exec_module(module)
    return module


def test_mean_std_and_two_standard_errors():
    rep = _replicate()
    mean, sd = rep.mean_std([1.0, 2.0, 4.0])
    assert mean == pytest.approx(7 / 3) and sd == pytest.approx(math.sqrt(((1 - 7 / 3) ** 2 + (2 - 7 / 3) ** 2
                                                                            + (4 - 7 / 3) ** 2) / 2))
    # means 5.0 and 5.3, sds 0.1 each, n = 3: SE = sqrt(2 * 0.01 / 3) = 0.0816; |diff| 0.3 > 2 SE
    d = rep.difference([4.9, 5.0, 5.1], [5.2, 5.3, 5.4])
    assert d["diff"] == pytest.approx(-0.3) and d["se"] == pytest.approx(math.sqrt(0.02 / 3))
    assert d["significant"] and d["paired_se"] == pytest.approx(0.0, abs=1e-12)
    assert not rep.difference([4.9, 5.0, 5.1], [5.0, 5.05, 5.2])["significant"]


def test_seeds_share_data_order_across_rows():
    import argparse

    rep = _replicate()
    args = argparse.Namespace(pre=1, loop=2, post=1, models=["looped-anchor", "looped-mesh"], hidden_size=64,
                              num_attention_heads=4, seq_length=64, micro_batch_size=2, global_batch_size=4,
                              train_iters=4, lr=1e-3, eval_iters=1, split="98,2,0", seed=10, loop_stats=False,
                              work_dir="/tmp/x")
    all_trials = rep.trials(rep.table1_runs(args), ["today", "authors"], 2)
    assert len(all_trials) == 8 and len({t.name for t in all_trials}) == 8

    def flag(trial, name):
        flags = rep.run_settings(trial, args)["flags"]
        return flags[flags.index(name) + 1]

    for trial in all_trials:
        assert flag(trial, "--data-seed") == flag(trial, "--seed") == str(10 + trial.seed_index)
        assert flag(trial, "--spiral-embedding-scale") == ("sqrt_d" if trial.recipe == "authors" else "none")


def test_residual_router_init_hands_the_loop_v():
    """mesh_router_init='residual': bias 4 on slot 1 for every router. With zero router weights
    every write and read puts w = e^4 / (e^4 + B - 1) on slot 1 and 1 / (e^4 + B - 1) on the
    others; h0 follows from eq. 24-27 by hand (below), ~w^2 v. Zero bias gives (x + v) / B."""
    from megatron_spiral.model.topology import MeshTopology

    B, d = 5, 8
    x, v = torch.randn(3, 1, d), torch.randn(3, 1, d)
    e4 = math.exp(4.0)
    w, other = e4 / (e4 + B - 1), 1 / (e4 + B - 1)  # slot-1 weight, weight of each other slot
    zero = lambda weight: torch.nn.init.zeros_(weight)  # noqa: E731
    residual = MeshTopology(d, B, 2, init_method=zero, router_init="residual")
    h0, _ = residual.initial_state(x, v)
    # read: slot 0 holds x + other * v, slot 1 holds w * v, slots 2.. hold other * v
    want = other * (x + other * v) + w * (w * v) + (B - 2) * other * (other * v)
    torch.testing.assert_close(h0, want, rtol=1e-5, atol=1e-6)
    uniform, _ = MeshTopology(d, B, 2, init_method=zero).initial_state(x, v)
    torch.testing.assert_close(uniform, (x + v) / B, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="at least 2 MeSH slots"):
        MeshTopology(d, 1, 2, router_init="residual")


def test_resume_refuses_a_different_embedding_scale(tmp_path):
    """A checkpoint trained without the scale (here: old metadata, which lacks the field and so
    means 'none') is not silently resumed under today's default 'sqrt_d'; the message says which
    flag to pass. Passing it resumes."""
    from megatron_spiral.checkpointing import CONFIG_FILE

    script = os.path.join(ROOT, "pretrain_spiral.py")
    tiny = ["--preset", "tiny", "--mock-data", "--seq-length", "32", "--micro-batch-size", "2",
            "--global-batch-size", "4", "--log-interval", "1", "--eval-iters", "0", "--save", str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    first = subprocess.run([sys.executable, script, *tiny, "--train-iters", "2", "--exit-interval", "1",
                            "--spiral-embedding-scale", "none"],
                           capture_output=True, text=True, env=env, timeout=300)
    assert first.returncode == 0, first.stderr[-2000:]
    meta_path = tmp_path / "iter_0000001" / CONFIG_FILE
    meta = json.loads(meta_path.read_text())
    for name in ("embedding_scale", "output_init_depth", "untie_core"):
        del meta["model"][name]  # as written before issue 12
    meta_path.write_text(json.dumps(meta))
    (tmp_path / "iter_0000001" / "checksums.json").unlink()  # such checkpoints predate checksums too
    resume = [sys.executable, script, *tiny, "--load", str(tmp_path), "--train-iters", "2"]
    refused = subprocess.run(resume, capture_output=True, text=True, env=env, timeout=300)
    assert refused.returncode != 0
    assert ("embedding_scale (--spiral-embedding-scale): checkpoint 'none', this run 'sqrt_d'"
            in refused.stdout + refused.stderr)
    again = subprocess.run(resume + ["--spiral-embedding-scale", "none"], capture_output=True, text=True,
                           env=env, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]


def test_loop_statistics_by_hand():
    """Anchor hands the loop v itself (ratio 1, no routers); MeSH with zeroed routers reads the
    uniform average, so every router entropy is log B and h0 = (x + v) / B (eq. 24-27)."""
    from megatron_spiral.analysis.loop_stats import loop_statistics, mean_token_norm

    ids = _ids()
    anchor = loop_statistics(_build(topology="anchor"), ids)
    assert anchor["h0_over_v"] == pytest.approx(1.0)
    assert not any(k.startswith(("read_entropy", "write_entropy")) for k in anchor)
    assert {f"update_norm/{t}" for t in range(3)} <= set(anchor)
    mesh = _build(topology="mesh")
    with torch.no_grad():
        for router in [*mesh.gpt.decoder.topology.write_routers, *mesh.gpt.decoder.topology.read_routers]:
            router.weight.zero_()
            router.bias.zero_()
        gpt = mesh.gpt
        x = gpt.embedding(input_ids=ids, position_ids=torch.arange(ids.shape[1])[None]) * math.sqrt(32)
        v = gpt.decoder.pre(hidden_states=x, attention_mask=None, rotary_pos_emb=gpt.rotary_pos_emb(ids.shape[1]))
    stats = loop_statistics(mesh, ids)
    B = mesh.config.num_mesh_slots
    for k in range(4):
        assert stats[f"read_entropy/{k}"] == pytest.approx(math.log(B), abs=1e-5)
    assert stats["h0_over_v"] == pytest.approx(mean_token_norm((x + v) / B) / mean_token_norm(v), rel=1e-4)


def test_loop_stats_cli_rejects_mismatched_seeds():
    out = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "loop_stats.py"), "--load", "a", "--load", "b",
                          "--data-prefix", "d", "--init-seeds", "1"], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": ROOT}, timeout=120)
    assert out.returncode == 2 and "--init-seeds needs one seed per --load (2), got 1" in out.stderr
