"""SpiralGPTModel: megatron-core's GPTModel with the SpiralBlock as its decoder.

Megatron provides the vocab-parallel embedding, RoPE tables, output layer and vocab-parallel
cross-entropy; only the decoder differs. GPTModel is constructed with an empty layer list (no
parameters, nothing allocated) and its decoder is then replaced by the SpiralBlock, so every other
part of GPTModel (forward, loss, sharded_state_dict) is megatron's own.
"""

from __future__ import annotations

import functools
import math

import torch
from megatron.core.models.gpt.gpt_model import GPTModel
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_spiral.config import SpiralConfig
from megatron_spiral.model.layer_specs import final_norm_module, layer_spec, resolve_transformer_impl
from megatron_spiral.model.spiral_block import SpiralBlock

_EMPTY_DECODER = TransformerBlockSubmodules(layer_specs=[], layer_norm=IdentityOp)


def transformer_config(
    spiral: SpiralConfig,
    tensor_model_parallel_size: int = 1,
    sequence_parallel: bool = False,
    params_dtype: torch.dtype = torch.float32,
    bf16: bool = False,
    use_cpu_initialization: bool = None,
    **overrides,
) -> TransformerConfig:
    """megatron TransformerConfig of the layers: GPT-NeoX style by default (GELU MLP 4d, biases,
    no dropout); the Megatron-LM architecture fields of ``spiral`` (SwiGLU, GQA, kv_channels,
    biases, dropout) map onto TransformerConfig as Megatron-LM's ``core_transformer_config_from_args``
    maps its flags.

    ``num_layers`` is the number of *unique* layers (N_pre + N_loop + N_post). The output
    projections (attention out, MLP fc2) are drawn with std init_std / sqrt(2 N), N =
    ``spiral.init_depth`` (the unrolled layer count under the authors' recipe).
    """
    if use_cpu_initialization is None:
        # CPU init draws every full weight from one generator, so TP=1 and TP=2 get equal weights.
        use_cpu_initialization = not torch.cuda.is_available()
    kwargs = dict(
        num_layers=spiral.parsed_layout.num_unique_layers,
        hidden_size=spiral.hidden_size,
        num_attention_heads=spiral.num_attention_heads,
        num_query_groups=spiral.query_groups,
        kv_channels=spiral.head_dim,
        ffn_hidden_size=spiral.ffn_size,
        normalization=spiral.normalization,
        layernorm_epsilon=spiral.layernorm_epsilon,
        init_method_std=spiral.init_method_std,
        add_bias_linear=spiral.linear_bias,
        add_qkv_bias=spiral.qkv_bias,
        gated_linear_unit=spiral.swiglu,
        activation_func=torch.nn.functional.silu if spiral.swiglu else torch.nn.functional.gelu,
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        bias_dropout_fusion=False,
        hidden_dropout=spiral.hidden_dropout,
        attention_dropout=spiral.attention_dropout,
        tensor_model_parallel_size=tensor_model_parallel_size,
        sequence_parallel=sequence_parallel and tensor_model_parallel_size > 1,
        params_dtype=params_dtype,
        bf16=bf16,
        use_cpu_initialization=use_cpu_initialization,
        gradient_accumulation_fusion=False,
        output_layer_init_method=output_projection_init(spiral),
    )
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


def output_projection_std(spiral: SpiralConfig) -> float:
    """Depth-aware init (MeSH paper App. B): std = init_std / sqrt(2 * N), N = spiral.init_depth."""
    return spiral.init_method_std / math.sqrt(2.0 * spiral.init_depth)


def output_projection_init(spiral: SpiralConfig):
    """Initialiser of the attention-out and MLP-fc2 weights with :func:`output_projection_std`."""
    return functools.partial(torch.nn.init.normal_, mean=0.0, std=output_projection_std(spiral))


class SpiralGPTModel(GPTModel):
    """GPTModel whose decoder runs Algorithm 1. Call it exactly like GPTModel:
    ``model(input_ids [b, s], position_ids, attention_mask=None, labels=None)``."""

    def __init__(
        self,
        config: TransformerConfig,
        spiral: SpiralConfig,
        pre_process: bool = True,
        post_process: bool = True,
        parallel_output: bool = True,
        pg_collection=None,
        recompute_loop: bool = False,
    ) -> None:
        impl = resolve_transformer_impl(spiral.transformer_impl)
        super().__init__(
            config=config,
            transformer_layer_spec=_EMPTY_DECODER,
            vocab_size=spiral.padded_vocab_size,
            max_sequence_length=spiral.max_positions,
            pre_process=pre_process,
            post_process=post_process,
            parallel_output=parallel_output,
            share_embeddings_and_output_weights=spiral.tied_embeddings,
            position_embedding_type="rope",
            rotary_percent=spiral.rotary_percent,
            rotary_base=spiral.rotary_base,
            pg_collection=pg_collection,
        )
        self.spiral_config = spiral
        self.transformer_impl = impl
        self.decoder = SpiralBlock(
            config, spiral, layer_spec(impl), final_norm_module(impl), pg_collection=pg_collection,
            recompute_loop=recompute_loop)  # --spiral-recompute-loop (model/recompute.py)
