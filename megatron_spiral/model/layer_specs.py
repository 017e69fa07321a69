"""Layer specs: a local one that runs everywhere and megatron-core's Transformer Engine one.

The local spec is megatron's TransformerLayer with megatron's tensor-parallel linears, torch
``scaled_dot_product_attention`` as core attention (it dispatches to FlashAttention-2 kernels on
GPU) and norms that support sequence parallelism (megatron's own torch-norm wrapper refuses SP).
The TE spec is selected when ``transformer_engine`` imports; its attention runs in BF16 at every
resolution because the compressed sequence is just a shorter sequence.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules


def transformer_engine_available() -> bool:
    return importlib.util.find_spec("transformer_engine") is not None


def resolve_transformer_impl(requested: str) -> str:
    """'auto' -> 'transformer_engine' when TE imports, else 'local'."""
    if requested == "auto":
        return "transformer_engine" if transformer_engine_available() else "local"
    if requested == "transformer_engine" and not transformer_engine_available():
        raise RuntimeError(
            "transformer_impl='transformer_engine' was requested but transformer_engine is not "
            "installed; install it (see requirements-gpu.txt) or use --transformer-impl local")
    return requested


class SequenceParallelNorm(torch.nn.Module):
    """LayerNorm or RMSNorm whose parameters are marked ``sequence_parallel``.

    Under sequence parallelism each tensor-parallel rank normalises its own tokens, so the norm
    gradients are partial sums that megatron all-reduces for parameters carrying that mark.
    """

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.rms = config.normalization == "RMSNorm"
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        self.bias = None
        if not self.rms:
            self.bias = torch.nn.Parameter(torch.zeros(hidden_size, dtype=config.params_dtype))
        for param in self.parameters():
            param.sequence_parallel = config.sequence_parallel

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.rms:
            return F.rms_norm(hidden, self.weight.shape, self.weight, self.eps)
        return F.layer_norm(hidden, self.weight.shape, self.weight, self.bias, self.eps)


class SDPACoreAttention(MegatronModule):
    """Causal core attention with torch SDPA; drop-in for megatron's DotProductAttention.

    Inputs are [s, b, heads_per_partition, head_dim]; output is [s, b, heads_per_partition *
    head_dim]. Grouped-query attention repeats the key/value groups.
    """

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str = "self",
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection=None,
    ) -> None:
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError("SDPACoreAttention does not support context parallelism")
        self.attn_mask_type = attn_mask_type
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        head_dim = config.kv_channels
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
        # Probes (tools/probe_attention.py) set a callable that receives the explicit attention
        # probabilities [b, heads, s, s]; None in training, where SDPA's fused kernels run.
        self.attention_recorder = None

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: Optional[torch.Tensor],
        attn_mask_type: Optional[AttnMaskType] = None,
        attention_bias: Optional[torch.Tensor] = None,
        packed_seq_params=None,
    ) -> torch.Tensor:
        if packed_seq_params is not None:
            raise ValueError("packed sequences are not supported by SDPACoreAttention")
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, heads, s, d]
        if k.shape[1] != q.shape[1]:
            repeat = q.shape[1] // k.shape[1]
            k = k.repeat_interleave(repeat, dim=1)
            v = v.repeat_interleave(repeat, dim=1)
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        causal = mask_type == AttnMaskType.causal and attention_mask is None
        if self.attention_recorder is not None:
            out = self._explicit_attention(q, k, v, causal, attention_mask)
            s, b = out.shape[2], out.shape[0]
            return out.permute(2, 0, 1, 3).reshape(s, b, -1)
        dropout = self.dropout if self.training else 0.0
        # As megatron's DotProductAttention: heads are split over TP ranks, so attention dropout
        # draws from the tensor-parallel RNG stream (different per rank) unless SP is on.
        rng = (tensor_parallel.get_cuda_rng_tracker().fork()
               if dropout > 0 and not self.config.sequence_parallel else contextlib.nullcontext())
        with rng:
            out = F.scaled_dot_product_attention(
                q, k, v,
                attn_mask=None if causal else _sdpa_mask(attention_mask),
                dropout_p=dropout,
                is_causal=causal,
                scale=self.softmax_scale,
            )
        s, b = out.shape[2], out.shape[0]
        return out.permute(2, 0, 1, 3).reshape(s, b, -1)


    def _explicit_attention(self, q, k, v, causal, attention_mask):
        scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * self.softmax_scale
        if causal:
            length = scores.shape[-1]
            future = torch.ones(length, length, dtype=torch.bool, device=q.device).triu(1)
            scores = scores.masked_fill(future, float("-inf"))
        elif attention_mask is not None:
            scores = scores.masked_fill(attention_mask, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        self.attention_recorder(probs)
        return torch.matmul(probs.to(v.dtype), v)


def _sdpa_mask(attention_mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    # Megatron masks are True where attention is *forbidden*; SDPA wants True where allowed.
    return None if attention_mask is None else ~attention_mask


def local_layer_spec() -> ModuleSpec:
    """Megatron TransformerLayer with parallel linears, SDPA attention and SP-capable norms."""
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=SequenceParallelNorm,
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": AttnMaskType.causal},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=ColumnParallelLinear,
                    core_attention=SDPACoreAttention,
                    linear_proj=RowParallelLinear,
                    q_layernorm=IdentityOp,
                    k_layernorm=IdentityOp,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=SequenceParallelNorm,
            mlp=ModuleSpec(
                module=MLP,
                submodules=MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear),
            ),
            mlp_bda=get_bias_dropout_add,
            # Same checkpoint keys as the TE spec (norms fused into the following linear there).
            sharded_state_dict_keys_map={
                "input_layernorm.": "self_attention.linear_qkv.layer_norm_",
                "pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_",
            },
        ),
    )


def transformer_engine_layer_spec() -> ModuleSpec:
    """megatron-core's TE spec (fused norm+linear, TE attention)."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

    return get_gpt_layer_with_transformer_engine_spec()


def final_norm_module(impl: str):
    """The module class for the final norm (and any stand-alone norm) of the chosen impl."""
    if impl == "transformer_engine":
        from megatron.core.extensions.transformer_engine import TENorm

        return TENorm
    return SequenceParallelNorm


def layer_spec(impl: str) -> ModuleSpec:
    return transformer_engine_layer_spec() if impl == "transformer_engine" else local_layer_spec()
