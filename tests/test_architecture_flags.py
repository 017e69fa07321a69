"""Megatron-LM architecture flags: each is honoured with Megatron-LM's meaning (core_v0.16.1
``megatron/training/arguments.py``: ``validate_args`` / ``core_transformer_config_from_args``) or
stops with the reason; params/FLOPs accounting stays exact for every combination."""

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from megatron_spiral import SpiralConfig, SpiralConfigError, build_model
from megatron_spiral.analysis.accounting import count_params, forward_flops
from megatron_spiral.model_args import describe_architecture

CUSTOM = ["--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "32", "--mock-data"]


def _parse(argv):
    from megatron_spiral.training.arguments import parse_args

    return parse_args(argv)


def _parse_error(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        _parse(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def _build(config: SpiralConfig):
    return build_model("tiny", **config.to_dict())


# ----------------------------------------------------------------------------- --num-layers
def test_num_layers_without_layout_builds_a_plain_gpt_of_that_depth():
    """Megatron-LM: --num-layers N is an N-layer GPT; no looped default may sneak in."""
    run = _parse(["--num-layers", "2"] + CUSTOM)
    assert run.model.layout == "2"
    block = _build(run.model).gpt.decoder
    assert len(block.pre.layers) == 2 and block.core is None and block.post is None
    assert block.topology is None and len(block.resamplers) == 0
    line = describe_architecture(run.model)
    assert "non-looped GPT, 2 unique layers" in line and "embeddings=tied" in line
    assert "dropout(hidden=0.1, attention=0.1)" in line


def test_num_layers_must_match_a_layout_and_is_required_without_one(capsys):
    err = _parse_error(["--num-layers", "3", "--spiral-layout", "1+2x{1/2,1}+1"] + CUSTOM, capsys)
    assert "--num-layers 3 does not match the layout 1+2x{1/2,1}+1, which has 4 unique layers" in err
    run = _parse(["--num-layers", "4", "--spiral-layout", "1+2x{1/2,1}+1"] + CUSTOM)
    assert run.model.layout == "1+2x{1/2,1}+1"
    assert _parse(["--preset", "pythia-160m", "--num-layers", "12", "--mock-data"]).model.layout == "12"
    err = _parse_error(CUSTOM, capsys)
    assert "--num-layers is required" in err
    err = _parse_error(["--num-layers", "2", "--mock-data"], capsys)
    assert "--hidden-size, --num-attention-heads, --seq-length required without --preset" in err


# ----------------------------------------------------------------------------- defaults
def test_megatron_defaults_without_preset_and_pythia_choices_with_one():
    """Megatron-LM: tied embeddings unless --untie-embeddings-and-output-weights; dropout 0.1.
    Presets spell out Pythia's untied embeddings and zero dropout."""
    custom = _parse(["--num-layers", "2"] + CUSTOM).model
    assert custom.tied_embeddings and custom.hidden_dropout == 0.1 and custom.attention_dropout == 0.1
    flags = ["--untie-embeddings-and-output-weights", "--attention-dropout", "0", "--hidden-dropout", "0"]
    explicit = _parse(["--num-layers", "2"] + CUSTOM + flags).model
    assert not explicit.tied_embeddings and explicit.hidden_dropout == 0.0 == explicit.attention_dropout
    preset = _parse(["--preset", "spiral-b-160m-mesh", "--mock-data"]).model
    assert not preset.tied_embeddings and preset.hidden_dropout == 0.0 == preset.attention_dropout
    tied_preset = _parse(["--preset", "tiny", "--no-untie-embeddings-and-output-weights", "--mock-data"]).model
    assert tied_preset.tied_embeddings


def test_old_configs_without_the_new_fields_keep_the_old_model():
    """A checkpoint's model metadata written before these fields existed lacks them: the dataclass
    defaults must rebuild the old architecture (untied, no dropout, biases, GELU, MHA)."""
    old = SpiralConfig(layout="1+1x{1/2,1}+1", hidden_size=32, num_attention_heads=4, vocab_size=64)
    assert not old.tied_embeddings and old.hidden_dropout == 0.0 == old.attention_dropout
    assert (old.linear_bias, old.qkv_bias, old.swiglu, old.query_groups) == (True, True, False, 4)
    assert old.ffn_size == 128 and old.head_dim == 8 and old.max_positions == old.seq_length


# ----------------------------------------------------------------------------- tied embeddings
def test_tied_embeddings_share_one_matrix_and_accumulate_both_gradients():
    """GPTModel(share_embeddings_and_output_weights=True): the output layer reads the embedding
    matrix, whose gradient is the sum of the input-side and output-side gradients."""
    common = dict(layout="1+1x{1/2,1}+1", hidden_size=32, num_attention_heads=4, vocab_size=128,
                  seq_length=32, init_method_std=0.1)
    tied = build_model("tiny", seed=3, untie_embeddings_and_output_weights=False, **common)
    untied = build_model("tiny", seed=3, **common)
    assert tied.gpt.output_layer.weight is None
    emb = tied.gpt.embedding.word_embeddings.weight
    assert tied.gpt.shared_embedding_or_output_weight() is emb
    state = {k: v for k, v in tied.gpt.state_dict().items()}
    state["output_layer.weight"] = emb.detach().clone()  # the untied twin starts from equal matrices
    untied.gpt.load_state_dict(state, strict=False)
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(0))
    labels = torch.roll(ids, -1, 1)
    tied(ids, labels=labels).mean().backward()
    untied(ids, labels=labels).mean().backward()
    expected = untied.gpt.embedding.word_embeddings.weight.grad + untied.gpt.output_layer.weight.grad
    assert untied.gpt.output_layer.weight.grad.abs().sum() > 0
    torch.testing.assert_close(emb.grad, expected)
    assert count_params(tied.config).breakdown["output_layer"] == 0
    assert count_params(tied.config).total == sum(p.numel() for p in tied.parameters())


# ----------------------------------------------------------------------------- layer shapes
def test_swiglu_mlp_is_gated_silu_with_megatrons_width():
    """Megatron-LM: --swiglu without --ffn-hidden-size gives int((4h * 2/3) / 64) * 64; fc1 holds
    [gate; up] and the MLP computes fc2(silu(gate) * up)."""
    model = build_model("tiny", layout="1", hidden_size=96, num_attention_heads=4, swiglu=True,
                        init_method_std=0.2).eval()
    assert model.config.ffn_size == 256  # int(256.0 / 64) * 64
    mlp = model.gpt.decoder.pre.layers[0].mlp
    assert tuple(mlp.linear_fc1.weight.shape) == (512, 96)
    x = torch.randn(5, 1, 96)
    with torch.no_grad():
        out, bias = mlp(x)
        gate, up = F.linear(x, mlp.linear_fc1.weight, mlp.linear_fc1.bias).chunk(2, dim=-1)
        expected = F.linear(F.silu(gate) * up, mlp.linear_fc2.weight)
    torch.testing.assert_close(out + bias, expected + mlp.linear_fc2.bias)
    assert SpiralConfig(hidden_size=96, num_attention_heads=4, swiglu=True, ffn_hidden_size=100).ffn_size == 100


def test_gqa_and_kv_channels_shape_the_projections():
    model = build_model("tiny", layout="1", hidden_size=64, num_attention_heads=8,
                        group_query_attention=True, num_query_groups=2, kv_channels=12)
    attention = model.gpt.decoder.pre.layers[0].self_attention
    assert tuple(attention.linear_qkv.weight.shape) == ((8 + 2 * 2) * 12, 64)
    assert tuple(attention.linear_proj.weight.shape) == (64, 8 * 12)
    assert attention.config.num_query_groups == 2
    # --num-query-groups without --group-query-attention is ignored, as in Megatron-LM
    assert SpiralConfig(num_attention_heads=4, num_query_groups=2).query_groups == 4
    with pytest.raises(SpiralConfigError, match="num_query_groups=3 must be >= 1 and divide"):
        SpiralConfig(num_attention_heads=4, group_query_attention=True, num_query_groups=3)


def test_disable_bias_linear_removes_every_linear_bias_and_add_qkv_bias_restores_one():
    """Megatron-LM: add_bias_linear=False drops QKV/proj/fc1/fc2 biases; add_qkv_bias keeps QKV's."""
    model = build_model("tiny", disable_bias_linear=True)
    linear_biases = [n for n, _ in model.named_parameters() if n.endswith("bias") and "linear_" in n]
    assert linear_biases == []
    model = build_model("tiny", disable_bias_linear=True, add_qkv_bias=True)
    kinds = {n.split(".")[-2] for n, _ in model.named_parameters() if n.endswith("bias") and "linear_" in n}
    assert kinds == {"linear_qkv"}


def test_norm_epsilon_and_its_alias_reach_the_norms():
    run = _parse(["--num-layers", "1", "--norm-epsilon", "1e-3"] + CUSTOM)
    assert run.model.layernorm_epsilon == 1e-3
    assert _parse(["--num-layers", "1", "--layernorm-epsilon", "2e-4"] + CUSTOM).model.layernorm_epsilon == 2e-4
    model = _build(run.model)
    assert model.gpt.decoder.pre.layers[0].input_layernorm.eps == 1e-3
    assert model.gpt.decoder.final_layernorm.eps == 1e-3


# ----------------------------------------------------------------------------- dropout
def test_dropout_is_active_in_train_and_off_in_eval_including_the_core():
    """Hidden and attention dropout act inside the shared core too (each iteration's layers)."""
    common = dict(layout="0+1x{1/2,1}+0", hidden_size=32, num_attention_heads=4, vocab_size=64,
                  init_method_std=0.2, seed=4)
    for knob in ("hidden_dropout", "attention_dropout"):
        model = build_model("tiny", **{knob: 0.3}, **common)
        reference = build_model("tiny", **common).eval()
        reference.load_state_dict(model.state_dict())
        core = model.gpt.decoder.core
        z = torch.randn(9, 1, 32)
        rope = model.gpt.rotary_pos_emb(9)
        model.train()
        a = core(hidden_states=z, attention_mask=None, rotary_pos_emb=rope)
        b = core(hidden_states=z, attention_mask=None, rotary_pos_emb=rope)
        assert not torch.allclose(a, b), f"{knob} inactive in the core in train()"
        model.eval()
        ids = torch.randint(0, 64, (1, 20))
        with torch.no_grad():
            torch.testing.assert_close(model(ids), reference(ids))


# ----------------------------------------------------------------------------- positions
def test_max_position_embeddings_default_bound_and_error(capsys):
    run = _parse(["--num-layers", "1"] + CUSTOM)
    assert run.model.max_positions == 32
    run = _parse(["--num-layers", "1", "--max-position-embeddings", "48"] + CUSTOM)
    model = _build(run.model)
    assert model(torch.zeros(1, 48, dtype=torch.long)).shape[1] == 48  # RoPE covers 48 positions
    with pytest.raises(ValueError, match="exceeds seq_length=32"):
        model(torch.zeros(1, 49, dtype=torch.long))
    err = _parse_error(["--num-layers", "1", "--max-position-embeddings", "16"] + CUSTOM, capsys)
    assert "max_position_embeddings (16) must be greater than or equal to seq_length (32)" in err


def test_position_embedding_types(capsys):
    assert _parse(["--num-layers", "1", "--position-embedding-type", "rope"] + CUSTOM)
    assert _parse(["--num-layers", "1", "--use-rotary-position-embeddings"] + CUSTOM)
    for kind in ("learned_absolute", "none", "mrope", "yarn"):
        err = _parse_error(["--num-layers", "1", "--position-embedding-type", kind] + CUSTOM, capsys)
        assert f"--position-embedding-type {kind}: SpiralFormer uses RoPE" in err


@pytest.mark.parametrize("flags,reason", [
    (["--squared-relu"], "squared ReLU is not implemented"),
    (["--openai-gelu"], "exact-erf GELU"),
    (["--encoder-num-layers", "2"], "use --num-layers"),
    (["--rotary-interleaved"], "non-interleaved"),
    (["--attention-backend", "unfused"], "use --attention-backend auto or flash"),
])
def test_unsupported_model_flags_stop_with_the_reason(flags, reason, capsys):
    err = _parse_error(["--num-layers", "1"] + CUSTOM + flags, capsys)
    assert reason in err and "unrecognized arguments" not in err


def test_accepted_megatron_flags_parse():
    run = _parse(["--num-layers", "1", "--use-flash-attn", "--attention-backend", "flash",
                  "--use-mcore-models", "--no-masked-softmax-fusion", "--no-bias-dropout-fusion",
                  "--no-rope-fusion", "--normalization", "RMSNorm"] + CUSTOM)
    assert run.model.normalization == "RMSNorm"


def test_query_groups_must_split_over_tensor_parallel_ranks(capsys):
    err = _parse_error(["--num-layers", "1", "--group-query-attention", "--tensor-model-parallel-size", "2"]
                       + CUSTOM, capsys)
    assert "--num-query-groups 1 is not divisible by --tensor-model-parallel-size 2" in err


@pytest.mark.parametrize("knobs", [
    dict(swiglu=True, untie_embeddings_and_output_weights=False),
    dict(group_query_attention=True, num_query_groups=1, kv_channels=20, disable_bias_linear=True),
])
def test_new_knobs_keep_strict_causality(knobs):
    """Changing tokens >= j never changes logits < j (tests/test_causality.py's detector)."""
    from test_causality import _assert_causal, _tiny

    _assert_causal(_tiny(topology="mesh", **knobs), 29, (1, 5, 13, 28))


def test_pretrain_log_says_exactly_what_was_built(tmp_path):
    """pretrain_spiral.py --num-layers 2 (no preset) trains the 2-layer tied GPT and says so."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    argv = [sys.executable, os.path.join(root, "pretrain_spiral.py"), "--num-layers", "2", "--swiglu",
            "--group-query-attention", "--num-query-groups", "2", "--micro-batch-size", "2",
            "--train-iters", "2", "--log-interval", "1", "--eval-iters", "0"] + CUSTOM
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": root})
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(ln for ln in proc.stdout.splitlines() if " > model:" in ln)
    for part in ("custom (no --preset)", "layout=2 (non-looped GPT, 2 unique layers)", "GQA 4 heads/2 kv groups",
                 "SwiGLU", "embeddings=tied", "dropout(hidden=0.1, attention=0.1)"):
        assert part in line, (part, line)
    params = next(ln for ln in proc.stdout.splitlines() if " > parameters:" in ln)
    config = SpiralConfig(layout="2", hidden_size=64, num_attention_heads=4, seq_length=32, swiglu=True,
                          group_query_attention=True, num_query_groups=2,
                          untie_embeddings_and_output_weights=False, vocab_size=256)
    assert f"{count_params(config).total / 1e6:.2f}M total" in params


# ----------------------------------------------------------------------------- accounting
GRID = list(itertools.product((False, True), (False, True), (False, True), (False, True)))


@pytest.mark.parametrize("tied,swiglu,gqa,no_bias", GRID)
def test_param_report_equals_the_built_model(tied, swiglu, gqa, no_bias):
    model = build_model("tiny", layout="1+1x{1/2,1}+1", hidden_size=64, num_attention_heads=4,
                        vocab_size=200, untie_embeddings_and_output_weights=not tied, swiglu=swiglu,
                        group_query_attention=gqa, num_query_groups=2, disable_bias_linear=no_bias,
                        add_qkv_bias=no_bias and gqa, kv_channels=24 if gqa else None,
                        normalization="RMSNorm" if swiglu else "LayerNorm")
    real = sum(p.numel() for p in model.parameters())
    params = count_params(model.config)
    assert params.total == real
    embedding = model.gpt.embedding.word_embeddings.weight.numel()
    output = 0 if tied else model.gpt.output_layer.weight.numel()
    assert params.non_embedding == real - embedding - output


@pytest.mark.parametrize("knobs", [
    dict(),
    dict(swiglu=True, group_query_attention=True, num_query_groups=2, kv_channels=24,
         untie_embeddings_and_output_weights=False, disable_bias_linear=True),
])
def test_forward_flops_equal_measured_matmul_flops(knobs):
    """torch's FlopCounterMode counts every matmul of the forward (2 per multiply-add); the
    explicit-attention path (probe recorder) makes the attention matmuls visible to it."""
    model = build_model("tiny", layout="2", hidden_size=64, num_attention_heads=4, vocab_size=128,
                        seq_length=32, **knobs).eval()
    for layer in model.gpt.decoder.layers:
        layer.self_attention.core_attention.attention_recorder = lambda probs: None
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.randint(0, 128, (1, 32)))
    assert counter.get_total_flops() == forward_flops(model.config, 32).total


# ----------------------------------------------------------------------------- HF and decoding
HF_KNOBS = [
    dict(untie_embeddings_and_output_weights=False),
    dict(swiglu=True, disable_bias_linear=True),
    dict(group_query_attention=True, num_query_groups=2, kv_channels=12, disable_bias_linear=True,
         add_qkv_bias=True, untie_embeddings_and_output_weights=False),
]


@pytest.mark.parametrize("knobs", HF_KNOBS, ids=lambda k: "-".join(k))
def test_hf_export_and_decoding_match_megatron(knobs, tmp_path):
    """Export (save_pretrained / from_pretrained round trip), full forward and Algorithm-2
    decoding all give the megatron logits; importing the export back restores them."""
    from hf_helpers import decode_logits, megatron_model, write_export
    from megatron_spiral.hf.convert import hf_model_from_megatron, import_from_hf, load_megatron_model
    from megatron_spiral.hf.modeling_spiral import SpiralFormerForCausalLM

    mega = megatron_model(**knobs)
    directory = write_export(hf_model_from_megatron(mega), tmp_path / "hf")
    model = SpiralFormerForCausalLM.from_pretrained(directory).eval()
    if knobs.get("untie_embeddings_and_output_weights") is False:
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    ids = torch.randint(0, 61, (2, 30), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = mega(ids)[..., :61]
        full = model(ids, use_cache=False).logits
    decoded = torch.cat([decode_logits(model, ids[r:r + 1], 5)[0] for r in range(2)])
    assert (full - want).abs().max().item() <= 1e-4
    assert (decoded - want).abs().max().item() <= 1e-4
    import_from_hf(directory, str(tmp_path / "mega"))
    back, _, _ = load_megatron_model(str(tmp_path / "mega"))
    for name in knobs:
        assert getattr(back.config, name) == getattr(mega.config, name), name
    with torch.no_grad():
        assert (back(ids)[..., :61] - want).abs().max().item() <= 1e-5


def test_hf_dropout_follows_train_and_eval():
    from hf_helpers import hf_model

    model = hf_model(hidden_dropout=0.3, attention_dropout=0.3)
    reference = hf_model()
    reference.load_state_dict(model.state_dict())
    ids = torch.randint(0, 61, (1, 20))
    with torch.no_grad():
        torch.testing.assert_close(model(ids, use_cache=False).logits, reference(ids, use_cache=False).logits)
        model.train()
        assert not torch.allclose(model(ids, use_cache=False).logits, model(ids, use_cache=False).logits)


def test_exports_written_before_the_new_fields_convert_back_to_the_old_model():
    """An older config.json has no seq_length / num_key_value_heads / head_dim / swiglu / bias
    keys and max_position_embeddings = the training length: it must rebuild the old model."""
    from megatron_spiral.hf.configuration_spiral import SpiralFormerConfig
    from megatron_spiral.hf.convert import spiral_fields_from_hf

    old = SpiralFormerConfig(layout="1+1x{1/2,1}+1", hidden_size=32, num_attention_heads=4,
                             vocab_size=61, max_position_embeddings=48, intermediate_size=128)
    config = SpiralConfig(**spiral_fields_from_hf(old))
    assert (config.seq_length, config.max_position_embeddings, config.tied_embeddings) == (48, None, False)
    assert (config.query_groups, config.head_dim, config.ffn_hidden_size, config.swiglu) == (4, 8, None, False)
    assert config.qkv_bias and config.hidden_dropout == 0.0
