"""Parameter and FLOPs accounting, resolution-aware. Pure arithmetic on a SpiralConfig.

FLOPs count 2 per multiply-add of every matmul in one forward pass over a prefill of L tokens:
each layer's linears at its own length (pre/post at L, the shared core once per iteration at
L_t), attention scores and values as 4 * l^2 * d (the convention Table 1 uses: no causal
discount), the LM head, plus the resampling scorers/routers and MeSH routers/reads/writes.
Training FLOPs per token are 3x the forward (forward + backward); MFU uses these numbers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Tuple

from megatron_spiral.config import SpiralConfig
from megatron_spiral.model.chunking import num_chunks


def layer_param_tensors(config: SpiralConfig) -> Dict[str, Tuple[int, bool]]:
    """The parameter tensors of one layer as megatron-core's local spec names them:
    ``name -> (numel, split over tensor-parallel ranks)``.

    QKV projects to (heads + 2 * query_groups) * head_dim rows, the output projection from
    heads * head_dim; fc1 is 2 x ffn rows with SwiGLU (gate and up). Biases as Megatron-LM places
    them: QKV with add_bias_linear or add_qkv_bias, the others with add_bias_linear. The
    column-parallel QKV / fc1 split weight and bias over TP; the row-parallel proj / fc2 split the
    weight and replicate the bias (added after the reduce); norms are replicated.
    """
    d, kv, f = config.hidden_size, config.head_dim, config.ffn_size
    qkv_rows = (config.num_attention_heads + 2 * config.query_groups) * kv
    fc1_rows = 2 * f if config.swiglu else f
    tensors = {
        "input_layernorm.weight": (d, False),
        "self_attention.linear_qkv.weight": (qkv_rows * d, True),
        "self_attention.linear_proj.weight": (config.num_attention_heads * kv * d, True),
        "pre_mlp_layernorm.weight": (d, False),
        "mlp.linear_fc1.weight": (fc1_rows * d, True),
        "mlp.linear_fc2.weight": (f * d, True),
    }
    if config.normalization == "LayerNorm":
        tensors["input_layernorm.bias"] = tensors["pre_mlp_layernorm.bias"] = (d, False)
    if config.qkv_bias:
        tensors["self_attention.linear_qkv.bias"] = (qkv_rows, True)
    if config.linear_bias:
        tensors["self_attention.linear_proj.bias"] = (d, False)
        tensors["mlp.linear_fc1.bias"] = (fc1_rows, True)
        tensors["mlp.linear_fc2.bias"] = (d, False)
    return tensors


def _layer_sum(config: SpiralConfig, prefix: str = "", tp: int = 1) -> int:
    return sum(numel // tp if split else numel
               for name, (numel, split) in layer_param_tensors(config).items() if name.startswith(prefix))


def attention_params(config: SpiralConfig) -> int:
    """QKV and output projections with their biases (:func:`layer_param_tensors`)."""
    return _layer_sum(config, "self_attention.")


def mlp_params(config: SpiralConfig) -> int:
    """fc1 (2 x ffn rows with SwiGLU: gate and up) and fc2, with biases unless disabled."""
    return _layer_sum(config, "mlp.")


def layer_params(config: SpiralConfig) -> int:
    """One layer: attention + MLP + two norms. GPT-NeoX defaults (ffn = 4d, biases, MHA,
    LayerNorm) give 12 d^2 + 13 d."""
    return _layer_sum(config)


def layer_params_per_rank(config: SpiralConfig, tp: int) -> int:
    """One layer's parameters on one of ``tp`` tensor-parallel ranks."""
    return _layer_sum(config, tp=tp)


def norm_params(config: SpiralConfig) -> int:
    return config.hidden_size * (1 if config.normalization == "RMSNorm" else 2)


def resampler_params(config: SpiralConfig) -> int:
    d = config.hidden_size
    total = 0
    for g in config.chunk_sizes:
        if g == 1:
            continue  # both softmaxes would be over one element: no parameters are built
        if config.downscale == "self_aggregation":
            total += d
        if config.upscale == "router":
            total += d * g + g
    return total


def topology_params(config: SpiralConfig) -> int:
    if not config.parsed_layout.is_looped or config.topology != "mesh":
        return 0
    slots = config.num_mesh_slots
    return 2 * (config.num_iterations + 1) * (config.hidden_size * slots + slots)


@dataclass
class ParamCount:
    total: int
    non_embedding: int
    breakdown: Dict[str, int] = field(default_factory=dict)


def count_params(config: SpiralConfig) -> ParamCount:
    """Parameters of the built model (equal to ``sum(p.numel())`` of SpiralGPTModel at TP=1)."""
    d, vocab = config.hidden_size, config.padded_vocab_size
    parts = {
        "layers": config.num_weight_layers * layer_params(config),  # untied passes own theirs
        "final_norm": norm_params(config),
        "resampling": resampler_params(config),
        "topology": topology_params(config),
        "embedding": vocab * d,
        # Tied embeddings: the output layer reuses the embedding matrix (counted once).
        "output_layer": 0 if config.tied_embeddings else vocab * d,
    }
    total = sum(parts.values())
    return ParamCount(total, total - parts["embedding"] - parts["output_layer"], parts)


def layer_forward_flops(config: SpiralConfig, length: int) -> int:
    """Matmul FLOPs of one layer over a sequence of ``length`` tokens (GQA, kv_channels and SwiGLU
    change the projection shapes; attention is scores + values over heads * head_dim)."""
    d, f = config.hidden_size, config.ffn_size
    inner = config.num_attention_heads * config.head_dim
    qkv = d * (config.num_attention_heads + 2 * config.query_groups) * config.head_dim
    mlp = d * f * (3 if config.swiglu else 2)
    linear = 2 * length * (qkv + inner * d + mlp)
    attention = 4 * length * length * inner
    return linear + attention


@dataclass
class FlopsCount:
    total: int
    breakdown: Dict[str, int] = field(default_factory=dict)
    lengths: list = field(default_factory=list)


def forward_flops(config: SpiralConfig, seq_length: int = None) -> FlopsCount:
    """Forward FLOPs of one prefill sequence of ``seq_length`` tokens (default config.seq_length)."""
    length = seq_length or config.seq_length
    layout = config.parsed_layout
    d = config.hidden_size
    parts = {
        "pre_post_layers": (layout.num_pre + layout.num_post) * layer_forward_flops(config, length),
        "core_layers": 0,
        "resampling": 0,
        "topology": 0,
        "lm_head": 2 * length * d * config.padded_vocab_size,
    }
    lengths = []
    for g, omega in zip(config.chunk_sizes, config.chunk_offsets):
        latents = num_chunks(length, g, omega)
        lengths.append(latents)
        parts["core_layers"] += layout.num_loop * layer_forward_flops(config, latents)
        if g > 1:
            down = 4 * length * d if config.downscale == "self_aggregation" else length * d
            up = 2 * latents * d * g + length * d if config.upscale == "router" else length * d
            parts["resampling"] += down + up
    if layout.is_looped and config.topology == "mesh":
        slots = config.num_mesh_slots
        per_update = 2 * (2 * length * d * slots) + 2 * (2 * length * d * slots)  # routers + write/read
        parts["topology"] = per_update * (config.num_iterations + 1)
    return FlopsCount(sum(parts.values()), parts, lengths)


def training_flops_per_sequence(config: SpiralConfig, seq_length: int = None) -> int:
    """Forward + backward (x3) FLOPs of one training sequence; used for TFLOP/s and MFU."""
    return 3 * forward_flops(config, seq_length).total
