"""SpiralFormer for Hugging Face ``transformers`` (self-contained: torch + transformers only).

Copied verbatim into every export made by ``tools/convert_checkpoint.py``. It implements the
same equations as the megatron-core training model (paper §2, App. B), one function per
equation in ``equations_spiral.py``, on batch-first tensors ``[batch, sequence, hidden]``:

* Algorithm 1 (full forward, ``SpiralFormerModel.forward_full``): scoring / training-style calls.
* Algorithm 2 (``SpiralFormerModel.forward_cached`` + ``SpiralCache``): chunk-triggered
  incremental decoding with per-(block, iteration, layer) KV caches. At iteration t the coarse
  path (down-scale -> shared core on the compressed sequence -> cached latent) runs only for the
  chunks that close (rho_t = g_t - 1); every other position reads cached latents. The update of
  position i uses zhat of chunk pi(i - s_t) at in-chunk slot rho(i - s_t) (eq. 19 + 22), which
  under shift 'parallel' or integer shifts is an *older* chunk than the latest, so every
  compressed latent is kept (they are L/g_t x d: tiny). Prefill of k tokens runs batched.

Conventions shared with training (megatron_spiral.model): the partial first chunk under the half
offset holds g_t - omega_t tokens; self-aggregation's softmax runs over its real members only and
mean pooling divides by g_t (literal eq. 16); L_t = floor((L + omega_t) / g_t) keeps every complete
chunk; the compressed sequence uses RoPE positions 0..L_t-1 (chunk index); layers are GPT-NeoX
style pre-norm blocks (LayerNorm/RMSNorm, biases unless disabled, exact-erf GELU or SwiGLU MLP,
MHA or grouped-query attention, hidden/attention dropout in train mode, non-interleaved RoPE over
``rotary_percent`` of each head).

Padding: rows may hold different numbers of real tokens (``attention_mask``; left padding is the
HF convention). SpiralFormer's chunking depends on absolute positions, so every row keeps its own
position counter: the real tokens of a row are its positions 0, 1, 2, ... wherever its padding is.

No-overlap regime (App. E): with ``decode_coarse_schedule`` 'deferred' or 'background', a decode
step whose iteration has s_t >= g_t queues the coarse work of a closing chunk instead of running
it; that latent is first read by a later position, so the work runs in an idle slot
(``SpiralCache.run_deferred()``), in a worker thread (a side CUDA stream on GPU), or at the
latest right before the first position that reads it.
"""

from __future__ import annotations

import inspect
import math
from functools import partial
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.utils import logging

from .cache_spiral import (ATTENTION_FUNCTIONS, SpiralCache, _KV, _Span, check_positions, compact_rows,
                           mark_sequence_dynamic, reject_unknown_kwargs, take_cache_alias, uncompact_rows)
from .configuration_spiral import SpiralFormerConfig
from .equations_spiral import (
    chunk_index,
    in_chunk_index,
    num_chunks,
    to_chunks,
    real_slots,
    mean_downscale,
    self_aggregation_downscale,
    upscale_gain,
    allocation_weights,
    router_upscale,
    uniform_upscale,
    causal_shift,
    anchor_update,
    slot_weights,
    mesh_initial_memory,
    mesh_write,
    mesh_read,
    apply_rotary,
)

logger = logging.get_logger(__name__)

# transformers 5.x renamed ``past_key_values`` to ``cache`` (outputs, forward and generate kwargs);
# follow whichever name the installed version uses and accept the other one as an alias.
_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
_GENERATE_CACHE_KWARG = ("cache" if "cache" in inspect.signature(GenerationMixin.prepare_inputs_for_generation).parameters
                         else "past_key_values")


# ============================================================================ layers
class SpiralNorm(nn.Module):
    def __init__(self, hidden: int, eps: float, rms: bool) -> None:
        super().__init__()
        self.eps, self.rms = eps, rms
        self.weight = nn.Parameter(torch.ones(hidden))
        self.bias = None if rms else nn.Parameter(torch.zeros(hidden))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rms:
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)


class SpiralRotary(nn.Module):
    """cos/sin tables of megatron's RotaryEmbedding for arbitrary per-row positions."""

    def __init__(self, head_dim: int, percent: float, base: float) -> None:
        super().__init__()
        self.dim = int(head_dim * percent) if percent < 1.0 else head_dim
        self.base = base

    def forward(self, positions: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """positions [b, K] -> cos, sin [b, 1, K, rot] (float32)."""
        # Recomputed per call (rot/2 values): no per-device state for torch.compile to guard on.
        inv = 1.0 / (self.base ** (torch.arange(0, self.dim, 2, dtype=torch.float32,
                                                device=positions.device) / self.dim))
        freqs = positions.float().unsqueeze(-1) * inv
        emb = torch.cat((freqs, freqs), dim=-1).unsqueeze(1)
        return emb.cos(), emb.sin()


class SpiralAttention(nn.Module):
    """Causal self-attention. ``qkv_proj`` rows are [all query heads; all key heads; all value
    heads] (head-major within each block); megatron's per-group interleaving is undone at export.
    Grouped-query attention: query head h reads key/value group h // (heads / kv_heads)."""

    def __init__(self, config: SpiralFormerConfig) -> None:
        super().__init__()
        d = config.hidden_size
        self.heads, self.kv_heads, self.head_dim = (config.num_attention_heads, config.num_key_value_heads,
                                                    config.head_dim)
        self.config = config  # read at call time: set_attn_implementation() may switch it
        self.dropout = config.attention_dropout
        self.qkv_proj = nn.Linear(d, (self.heads + 2 * self.kv_heads) * self.head_dim, bias=config.qkv_bias)
        self.o_proj = nn.Linear(self.heads * self.head_dim, d, bias=config.linear_bias)
        self.o_proj.is_output_projection = True  # depth-scaled init (_init_weights)

    def forward(self, x, cos, sin, kv: Optional[_KV] = None, span: Optional[_Span] = None):
        b, k_len, _ = x.shape
        q, k, v = self.qkv_proj(x).split(
            [self.heads * self.head_dim, self.kv_heads * self.head_dim, self.kv_heads * self.head_dim], dim=-1)
        q, k, v = (t.view(b, k_len, -1, self.head_dim).transpose(1, 2) for t in (q, k, v))  # [b, heads, K, hd]
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if self.kv_heads != self.heads:
            k, v = (t.repeat_interleave(self.heads // self.kv_heads, dim=1) for t in (k, v))
        scale = 1.0 / math.sqrt(self.head_dim)
        keys, values, mask, causal = (k, v, None, True) if kv is None else kv.update(k, v, span)
        dropout = self.dropout if self.training else 0.0
        attend = ATTENTION_FUNCTIONS.get(self.config._attn_implementation, ATTENTION_FUNCTIONS["sdpa"])
        out = attend(q, keys, values, mask, causal, scale, dropout)
        return self.o_proj(out.transpose(1, 2).reshape(b, k_len, -1))


class SpiralMLP(nn.Module):
    """GELU MLP, or gated SiLU (``swiglu``: fc1 rows are [gate; up], as megatron's at TP=1)."""

    def __init__(self, config: SpiralFormerConfig) -> None:
        super().__init__()
        self.swiglu = config.swiglu
        rows = config.intermediate_size * (2 if self.swiglu else 1)
        self.fc1 = nn.Linear(config.hidden_size, rows, bias=config.linear_bias)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size, bias=config.linear_bias)
        self.fc2.is_output_projection = True  # depth-scaled init (_init_weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.fc1(x)
        if self.swiglu:
            gate, up = hidden.chunk(2, dim=-1)
            return self.fc2(F.silu(gate) * up)
        return self.fc2(F.gelu(hidden))


class SpiralLayer(GradientCheckpointingLayer):
    """Pre-norm GPT-NeoX block: x + Drop(Attn(Norm(x))), then + Drop(MLP(Norm(.))) (megatron's
    hidden dropout sits on each branch before the residual add)."""

    def __init__(self, config: SpiralFormerConfig) -> None:
        super().__init__()
        rms = config.normalization == "RMSNorm"
        self.input_norm = SpiralNorm(config.hidden_size, config.layer_norm_eps, rms)
        self.attn = SpiralAttention(config)
        self.mlp_norm = SpiralNorm(config.hidden_size, config.layer_norm_eps, rms)
        self.mlp = SpiralMLP(config)
        self.dropout = nn.Dropout(config.hidden_dropout)

    def forward(self, x, cos, sin, kv=None, span=None):
        x = x + self.dropout(self.attn(self.input_norm(x), cos, sin, kv, span))
        return x + self.dropout(self.mlp(self.mlp_norm(x)))


class SpiralResampler(nn.Module):
    """A^(t) (scorer, no bias) and B^(t) (router, R^d -> R^{g_t}) of iteration t; none at g_t = 1."""

    def __init__(self, config: SpiralFormerConfig, t: int) -> None:
        super().__init__()
        d = config.hidden_size
        self.g, self.omega, self.s = config.chunk_sizes[t], config.chunk_offsets[t], config.shifts[t]
        multi = self.g > 1
        self.scorer = nn.Linear(d, 1, bias=False) if multi and config.downscale == "self_aggregation" else None
        self.router = nn.Linear(d, self.g) if multi and config.upscale == "router" else None

    def downscale(self, members: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        """S_down on gathered chunks (eq. 8): members [..., g, d] -> [..., d]."""
        if self.g == 1:
            return members[..., 0, :]
        if self.scorer is not None:
            return self_aggregation_downscale(members, self.scorer(members).squeeze(-1), real)
        return mean_downscale(members, real)

    def allocation(self, zhat: torch.Tensor) -> Optional[torch.Tensor]:
        return None if self.router is None else allocation_weights(self.router(zhat), zhat.dtype)

    def upscale(self, zhat: torch.Tensor, length: int) -> torch.Tensor:
        """S_up (eq. 10): [b, L_t, d] -> [b, L, d]."""
        if self.g == 1:
            return zhat
        if self.router is not None:
            return router_upscale(zhat, self.allocation(zhat), length, self.omega)
        return uniform_upscale(zhat, self.g, length, self.omega)


class SpiralMeSH(nn.Module):
    """MeSH routers (App. B): pair 0 is the transitional pair, pair t + 1 serves iteration t."""

    def __init__(self, config: SpiralFormerConfig) -> None:
        super().__init__()
        d, slots, pairs = config.hidden_size, config.num_mesh_slots, config.num_iterations + 1
        self.num_slots = slots
        self.write_routers = nn.ModuleList(nn.Linear(d, slots) for _ in range(pairs))
        self.read_routers = nn.ModuleList(nn.Linear(d, slots) for _ in range(pairs))

    def initial(self, x: torch.Tensor, v: torch.Tensor):
        """Transitional write-read (eq. 24-27) routed by the embeddings x."""
        memory = mesh_write(mesh_initial_memory(x, self.num_slots), v, slot_weights(self.write_routers[0], x))
        return mesh_read(memory, slot_weights(self.read_routers[0], x)), memory

    def update(self, u_tilde, h, memory, t: int):
        """Main-loop write-read (eq. 28-30) routed by h^(t)."""
        write, read = slot_weights(self.write_routers[t + 1], h), slot_weights(self.read_routers[t + 1], h)
        memory = mesh_write(memory, u_tilde, write)
        return mesh_read(memory, read), memory


# ============================================================================ models
class SpiralFormerPreTrainedModel(PreTrainedModel):
    config_class = SpiralFormerConfig
    base_model_prefix = "model"
    _no_split_modules = ["SpiralLayer"]
    _skip_keys_device_placement = ["cache", "past_key_values"]
    supports_gradient_checkpointing = True  # per SpiralLayer call (GradientCheckpointingLayer)
    _supports_sdpa = True  # "sdpa" (default) and "eager" give equal logits
    # Not declared: cached decoding attends with per-row boolean masks, which the flash / flex
    # kernels do not take; from_pretrained(attn_implementation=...) raises transformers' own error.
    _supports_flash_attn = False
    _supports_flex_attn = False

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if getattr(module, "is_output_projection", False):  # std / sqrt(2 N), as in training
            std = std / math.sqrt(2.0 * self.config.init_depth)
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, SpiralNorm):
            nn.init.ones_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)


class SpiralFormerModel(SpiralFormerPreTrainedModel):
    """Embedding -> f_pre -> T multi-resolution iterations of the shared core -> f_post -> norm."""

    def __init__(self, config: SpiralFormerConfig) -> None:
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.embed_dropout = nn.Dropout(config.hidden_dropout)  # megatron's embedding dropout
        self.pre_layers = nn.ModuleList(SpiralLayer(config) for _ in range(config.num_pre_layers))
        untied = config.num_core_copies > 1
        self.core_layers = nn.ModuleList(SpiralLayer(config) for _ in range(0 if untied else config.num_loop_layers))
        # untie_core: iteration t runs core_passes[t] (its own weights) instead of core_layers
        self.core_passes = nn.ModuleList(
            nn.ModuleList(SpiralLayer(config) for _ in range(config.num_loop_layers))
            for _ in range(config.num_core_copies if untied else 0))
        self.post_layers = nn.ModuleList(SpiralLayer(config) for _ in range(config.num_post_layers))
        self.resamplers = nn.ModuleList(SpiralResampler(config, t) for t in range(config.num_iterations))
        looped = config.num_iterations > 0
        self.mesh = SpiralMeSH(config) if looped and config.topology == "mesh" else None
        self.final_norm = SpiralNorm(config.hidden_size, config.layer_norm_eps,
                                     config.normalization == "RMSNorm")
        self.rotary = SpiralRotary(config.head_dim, config.rotary_percent, config.rotary_base)
        self.gradient_checkpointing = False  # toggled by gradient_checkpointing_enable()
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def _scale_embeddings(self, x: torch.Tensor) -> torch.Tensor:
        """Token embeddings x (inputs_embeds are unscaled too), times sqrt(d) under
        embedding_scale='sqrt_d' (MeSH paper App. B)."""
        multiplier = self.config.embedding_multiplier
        return x if multiplier == 1.0 else x * multiplier

    # ------------------------------------------------------------ topology (eq. 4-6)
    def _topology_init(self, x, v):
        return self.mesh.initial(x, v) if self.mesh is not None else (v, v)  # INITTOPO

    def _topology_update(self, u_tilde, h, carrier, t: int):
        if self.mesh is not None:
            return self.mesh.update(u_tilde, h, carrier, t)
        return anchor_update(u_tilde, carrier), carrier

    def _blocks(self, hidden, span=None, cache=None, states: Optional[list] = None):
        """Algorithm 1 lines 1-10 around a per-iteration step (full or cached). With ``states``
        (output_hidden_states) it appends the full-resolution state after the embeddings, each
        f_pre layer, each loop iteration t (h^(t+1), after the topology update) and each f_post
        layer; the last entry is replaced by the final-norm output, as in transformers' models."""
        record = states.append if states is not None else (lambda _: None)
        positions = span.positions if span is not None else torch.arange(
            hidden.shape[1], device=hidden.device)[None]
        cos, sin = self.rotary(positions)
        x, h = hidden, hidden
        record(h)
        for n, layer in enumerate(self.pre_layers):
            h = layer(h, cos, sin, None if cache is None else cache.pre[n], span)
            record(h)
        if self.config.num_iterations:
            h, carrier = self._topology_init(x, h)
            for t in range(self.config.num_iterations):
                u = self._step_full(t, h) if cache is None else self._step_cached(t, h, span, cache)
                h, carrier = self._topology_update(u, h, carrier, t)  # eq. 11
                record(h)
        for n, layer in enumerate(self.post_layers):
            h = layer(h, cos, sin, None if cache is None else cache.post[n], span)
            record(h)
        h = self.final_norm(h)
        if states is not None:
            states[-1] = h
        return h

    # ------------------------------------------------------------ Algorithm 1
    def forward_full(self, inputs_embeds: torch.Tensor, states: Optional[list] = None) -> torch.Tensor:
        """Hidden states [b, L, d] of rows whose real tokens are positions 0..L-1."""
        return self._blocks(self.embed_dropout(self._scale_embeddings(inputs_embeds)), states=states)

    def _core(self, z: torch.Tensor, t: int, span: Optional[_Span] = None, cache=None) -> torch.Tensor:
        """f_loop on the compressed sequence (eq. 9); RoPE position = chunk index."""
        positions = span.positions if span is not None else torch.arange(z.shape[1], device=z.device)[None]
        cos, sin = self.rotary(positions)
        layers = self.core_passes[t] if len(self.core_passes) else self.core_layers
        for n, layer in enumerate(layers):
            z = layer(z, cos, sin, cache.core[t][n] if cache is not None else None, span)
        return z

    def _step_full(self, t: int, h: torch.Tensor) -> torch.Tensor:
        """One multi-resolution step on whole sequences: u~^(t) (eq. 8-10, 22)."""
        res, length = self.resamplers[t], h.shape[1]
        if num_chunks(length, res.g, res.omega) == 0:
            return torch.zeros_like(h)
        real = real_slots(length, res.g, res.omega, h.device)
        z = res.downscale(to_chunks(h, res.g, res.omega), real.expand(h.shape[0], -1, -1))  # eq. 8
        u = res.upscale(self._core(z, t), length)  # eq. 9-10
        return causal_shift(u, res.s)  # eq. 22

    # ------------------------------------------------------------ Algorithm 2
    @torch.compiler.disable  # per-row Python bookkeeping: runs eagerly inside a compiled model
    def forward_cached(self, inputs_embeds: torch.Tensor, counts: List[int], cache: SpiralCache,
                       states: Optional[list] = None) -> torch.Tensor:
        """Extend every row by counts[b] tokens (slots 0..counts[b]-1 of ``inputs_embeds``); returns
        the hidden states of those tokens. One call with K > 1 is a batched prefill; K = 1 a decode step."""
        b, width = inputs_embeds.shape[:2]
        if cache.lengths is None:
            cache.lengths = [0] * b
        elif len(cache.lengths) != b:
            raise ValueError(f"the cache holds {len(cache.lengths)} rows but the input has {b}")
        if width > 1:
            cache.drain()
        span = _Span(cache.lengths, counts, width, inputs_embeds.device)
        hidden = self._blocks(self.embed_dropout(self._scale_embeddings(inputs_embeds)), span, cache, states)
        cache.lengths = [p + c for p, c in zip(cache.lengths, counts)]
        return hidden

    def _closed_chunks(self, t, h, span: _Span, first: List[int], count: List[int], width: int, cache):
        """z^(t)_j (eq. 15-18) of the chunks that close in this call, gathered from the chunk
        buffer B^(t) (positions before the call) and the new states ``h``."""
        res = self.resamplers[t]
        g, omega, device = res.g, res.omega, h.device
        slot = torch.arange(width, device=device)
        chunks = torch.tensor(first, device=device)[:, None] + slot  # [b, M]
        positions = chunks[..., None] * g - omega + torch.arange(g, device=device)  # members, eq. 15
        closes = slot[None] < torch.tensor(count, device=device)[:, None]
        real = (positions >= 0) | ~closes[..., None]
        start = span.start_t[:, None, None]
        if g > 1:
            source = torch.cat([cache.ring[t], h], dim=1)
            index = torch.where(positions >= start, g + positions - start, positions % g)
        else:
            source, index = h, positions - start
        index = index.clamp(0, source.shape[1] - 1).reshape(h.shape[0], -1, 1).expand(-1, -1, h.shape[-1])
        members = source.gather(1, index).view(h.shape[0], width, g, h.shape[-1])
        return res.downscale(members, real), _Span(first, count, width, device)

    def _coarse_pass(self, t: int, z: torch.Tensor, span: _Span, cache: SpiralCache) -> None:
        """Chunk-triggered coarse computation (Algorithm 2 lines 34-36, plus eq. 21's beta)."""
        zhat = self._core(z, t, span, cache)
        cache.store_latents(t, zhat, self.resamplers[t].allocation(zhat), span)

    def _update_ring(self, t: int, h: torch.Tensor, span: _Span, cache: SpiralCache) -> None:
        """Write the newest g_t states h^(t) into B^(t) at slot position mod g_t (line 32)."""
        g, d = self.resamplers[t].g, h.shape[-1]
        ends = span.start_t + torch.tensor(span.count, device=h.device)
        positions = ends[:, None] - g + torch.arange(g, device=h.device)  # last g positions
        fresh = positions >= span.start_t[:, None]
        slots = (positions % g)[..., None].expand(-1, -1, d)
        new = h.gather(1, (positions - span.start_t[:, None]).clamp(0, h.shape[1] - 1)[..., None].expand(-1, -1, d))
        old = cache.ring[t].gather(1, slots)
        cache.ring[t] = cache.ring[t].scatter(1, slots, torch.where(fresh[..., None], new, old))

    def _step_cached(self, t: int, h: torch.Tensor, span: _Span, cache: SpiralCache) -> torch.Tensor:
        """LOOPUPDATEAT (Algorithm 2 lines 27-47) for every new position at once: u~^(t)."""
        res = self.resamplers[t]
        g, omega, s = res.g, res.omega, res.s
        first = [chunk_index(p, g, omega) for p in span.start]  # closed chunks before the call
        count = [chunk_index(p + c, g, omega) - j for p, c, j in zip(span.start, span.count, first)]
        width = max(count)
        cache.reserve_latents(t, h, max(first) + max(width, 1), g, res.router is not None)
        if g > 1 and cache.ring[t] is None:
            cache.ring[t] = h.new_zeros(h.shape[0], g, h.shape[-1])
        if width > 0:  # some row closes a chunk (rho = g_t - 1): coarse path
            z, core_span = self._closed_chunks(t, h, span, first, count, width, cache)
            job = partial(self._coarse_pass, t, z, core_span, cache)
            if cache.coarse_schedule != "inline" and span.width == 1 and s >= g:
                cache.submit(t, job, min(j for j, c in zip(first, count) if c))  # App. E
            else:
                cache.drain(t)
                job()
        if g > 1:
            self._update_ring(t, h, span, cache)
        needed = [chunk_index(p + c - 1 - s, g, omega) for p, c in zip(span.start, span.count) if p + c - 1 >= s]
        if not needed:
            return torch.zeros_like(h)
        cache.wait(t, max(needed))
        return self._shifted_update(t, h, span, cache)

    def _shifted_update(self, t: int, h: torch.Tensor, span: _Span, cache: SpiralCache) -> torch.Tensor:
        """u~_i = u_{i - s_t} = lambda_t beta_{pi(i-s), rho(i-s)} zhat_{pi(i-s)}  (eq. 19-22)."""
        res = self.resamplers[t]
        g, omega, d = res.g, res.omega, h.shape[-1]
        source = span.positions - res.s
        has = (source >= 0) & span.valid
        source = source.clamp(min=0)
        chunk = chunk_index(source, g, omega)
        zhat = cache.latents[t].gather(1, chunk[..., None].expand(-1, -1, d))
        if res.router is not None:
            beta = cache.allocations[t].gather(1, chunk[..., None].expand(-1, -1, g))
            beta = beta.gather(2, in_chunk_index(source, g, omega)[..., None])
            u = upscale_gain(g) * beta * zhat  # eq. 19 + 21
        elif g > 1:
            u = upscale_gain(g) / g * zhat  # eq. 20
        else:
            u = zhat
        return torch.where(has[..., None], u, torch.zeros_like(u))

    # ------------------------------------------------------------ HF entry point
    def _resolve_use_cache(self, use_cache: Optional[bool], cache) -> bool:
        if cache is not None:
            return True
        if use_cache is None:
            # Training and compiled scoring run Algorithm 1; a cache is built only for inference.
            use_cache = self.config.use_cache and not self.training and not torch.compiler.is_compiling()
        if use_cache and self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            logger.warning_once("use_cache=True is incompatible with gradient checkpointing; running without a cache.")
            use_cache = False
        return use_cache

    def forward(self, input_ids=None, attention_mask=None, cache=None, inputs_embeds=None, use_cache=None,
                output_hidden_states=None, output_attentions=None, return_dict=None, **kwargs):
        """Hidden states of ``input_ids`` (or ``inputs_embeds``); with a cache, Algorithm 2.

        ``past_key_values`` is accepted for ``cache``; ``position_ids`` / ``cache_position`` are
        checked against the positions SpiralFormer uses (each row's real tokens are 0, 1, 2, ...
        continuing the cache: its chunk schedule depends on them). Any other argument raises."""
        cache = take_cache_alias(cache, kwargs)
        position_ids, cache_position = kwargs.pop("position_ids", None), kwargs.pop("cache_position", None)
        reject_unknown_kwargs(kwargs)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if output_attentions if output_attentions is not None else self.config.output_attentions:
            raise ValueError("SpiralFormer does not return attention weights (output_attentions=True); "
                             "tools/probe_attention.py measures its attention patterns instead")
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        use_cache = self._resolve_use_cache(use_cache, cache)
        embeds = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        width = embeds.shape[1]
        embeds, counts, mask = compact_rows(embeds, attention_mask)
        states = [] if output_hidden_states else None
        if use_cache:
            if cache is None:
                cache = SpiralCache(self.config)
            elif not isinstance(cache, SpiralCache):
                raise TypeError(f"SpiralFormer decodes with its own SpiralCache (Algorithm 2), got "
                                f"{type(cache).__name__}; pass cache=model.new_cache() or cache=None")
            check_positions(position_ids, cache_position, mask, width, cache.lengths, cache.seen_tokens)
            hidden = self.forward_cached(embeds, counts, cache, states)
            cache.seen_tokens += width
        else:
            check_positions(position_ids, cache_position, mask, width, None, 0)
            hidden = self.forward_full(embeds, states)
        hidden = uncompact_rows(hidden, counts, mask)
        if states is not None:
            states = tuple(uncompact_rows(h, counts, mask) for h in states)
        out = BaseModelOutputWithPast(last_hidden_state=hidden, hidden_states=states,
                                      **{_CACHE_FIELD: cache if use_cache else None})
        return out if return_dict is not False else out.to_tuple()


class SpiralFormerForCausalLM(SpiralFormerPreTrainedModel, GenerationMixin):
    """SpiralFormer with an LM head over the real vocabulary, tied to the input embeddings when
    ``config.tie_word_embeddings`` (Megatron-LM's default without --untie-embeddings-and-output-weights)."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: SpiralFormerConfig) -> None:
        super().__init__(config)
        self.model = SpiralFormerModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # generate() must not build a DynamicCache; a SpiralCache is made below

    def new_cache(self, coarse_schedule: Optional[str] = None, max_length: Optional[int] = None) -> SpiralCache:
        """An empty Algorithm-2 cache ('inline', 'deferred' or 'background' coarse work);
        ``max_length`` (prompt + new tokens) allocates the caches once, avoiding growth copies.
        Pass it as ``model(..., cache=c)`` or ``model.generate(..., cache=c)``."""
        return SpiralCache(self.config, coarse_schedule, max_length)

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        """generate(): use the caller's SpiralCache or start one sized for generate's maximum length;
        refuse what SpiralCache cannot do instead of ignoring it."""
        mode = kwargs.get("generation_mode", args[0] if args else None)
        if "assisted" in str(getattr(mode, "value", mode)):
            raise ValueError("assisted / prompt-lookup decoding needs a cache that can crop() rejected draft "
                             "tokens; SpiralCache cannot (its chunk buffers keep only the last g_t states). "
                             "Use greedy, sampling or beam search.")
        if generation_config.cache_implementation is not None:
            raise ValueError(f"cache_implementation={generation_config.cache_implementation!r} is not supported: "
                             "SpiralFormer decodes with its own SpiralCache (Algorithm 2), made automatically; "
                             "pass cache=model.new_cache(coarse_schedule=..., max_length=...) to configure it")
        user = model_kwargs.pop("past_key_values", None)
        user = model_kwargs.get("cache", None) if user is None else user
        if user is not None:
            if not isinstance(user, SpiralCache):
                raise TypeError(f"generate() got a {type(user).__name__}; SpiralFormer needs a SpiralCache: "
                                "pass cache=model.new_cache()")
            model_kwargs.pop("cache", None)
            model_kwargs[_GENERATE_CACHE_KWARG] = user
            return
        if generation_config.use_cache is False:
            return
        length = kwargs.get("max_cache_length", args[-1] if args and isinstance(args[-1], int) else None)
        model_kwargs[_GENERATE_CACHE_KWARG] = SpiralCache(self.config, max_length=(length or 0) + 1)

    def forward(self, input_ids=None, attention_mask=None, cache=None, inputs_embeds=None, labels=None,
                use_cache=None, logits_to_keep=0, output_hidden_states=None, output_attentions=None,
                return_dict=None, num_items_in_batch=None, **kwargs):
        """Logits (and the shifted next-token loss when ``labels`` are given). ``num_items_in_batch``
        (passed by Trainer under gradient accumulation) makes the loss a sum over tokens divided by
        it, as in transformers' own causal LMs, so accumulated steps average to the batch mean."""
        if torch.compiler.is_compiling():  # the sequence length varies between calls: keep it symbolic
            input_ids, inputs_embeds, attention_mask, labels = mark_sequence_dynamic(
                input_ids, inputs_embeds, attention_mask, labels)
        outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, cache=cache,
                             inputs_embeds=inputs_embeds, use_cache=use_cache,
                             output_hidden_states=output_hidden_states, output_attentions=output_attentions,
                             return_dict=True, **kwargs)
        hidden = outputs.last_hidden_state
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            hidden = hidden[:, -logits_to_keep:]
        elif isinstance(logits_to_keep, torch.Tensor):
            hidden = hidden[:, logits_to_keep]
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size,
                                      num_items_in_batch=num_items_in_batch)
        out = CausalLMOutputWithPast(loss=loss, logits=logits, hidden_states=outputs.hidden_states,
                                     **{_CACHE_FIELD: getattr(outputs, _CACHE_FIELD)})
        return out if return_dict is not False else out.to_tuple()

    @staticmethod
    def _reorder_cache(cache, beam_idx):
        cache.reorder_cache(beam_idx)
        return cache
