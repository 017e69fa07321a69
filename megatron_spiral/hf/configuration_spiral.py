"""SpiralFormer configuration for Hugging Face ``transformers`` (self-contained: no megatron import).

This file is copied verbatim into every exported model directory next to ``modeling_spiral.py``;
``AutoConfig.from_pretrained(dir, trust_remote_code=True)`` loads it through ``config.json``'s
``auto_map``. Field names follow megatron-spiral's ``SpiralConfig`` (the training-side config), so
an export converts back without loss; HF-conventional aliases (``intermediate_size``,
``layer_norm_eps``, ``max_position_embeddings``) are what ``transformers`` tooling reads.

Recipe fields (MeSH paper App. B): ``embedding_scale`` ('sqrt_d' multiplies the token embeddings by
sqrt(hidden_size) before the first layer), ``output_init_depth`` (N of the output-projection init std
initializer_range / sqrt(2 N): 'unrolled' = N_pre + N_loop T + N_post, 'unique' = layers owning
weights) and ``untie_core`` (each loop iteration has its own core weights). Their defaults here are
the *old* behaviour ('none', 'unique', False) because a config.json written before they existed
means exactly that; exports always write all three explicitly.

Derived per-iteration quantities (recomputed from ``layout``/``shift``/``chunk_offset``, never
trusted from JSON):

    chunk size  g_t     = floor(1 / r_t)                              (paper eq. 13)
    offset      omega_t = floor(g_t / 2) ('half') or 0 ('zero')       (eq. 12)
    shift       s_t     = g_t - 1 ('overlap'), g_t ('parallel') or an integer >= g_t - 1 (eq. 22)
"""

from __future__ import annotations

import math
import re
from fractions import Fraction
from typing import List, Optional, Tuple

from transformers import PretrainedConfig

_LOOPED_RE = re.compile(r"^(\d+)\+(\d+)[x×*]\{([^{}]*)\}\+(\d+)$")
_DERIVED = ("num_pre_layers", "num_loop_layers", "num_post_layers", "chunk_sizes", "chunk_offsets",
            "shifts", "num_mesh_slots", "num_hidden_layers", "num_iterations", "num_compute_layers",
            "num_core_copies", "init_depth")


def parse_layout(text: str) -> Tuple[int, int, Tuple[Fraction, ...], int]:
    """``"2+4x{1/8,1/4,1/2,1}+2"`` -> (N_pre, N_loop, (r_0, ...), N_post); ``"12"`` -> (12, 0, (), 0)."""
    compact = re.sub(r"\s+", "", str(text))
    if compact.isdigit():
        if int(compact) < 1:
            raise ValueError("a non-looped layout needs at least one layer, e.g. '12'")
        return int(compact), 0, (), 0
    match = _LOOPED_RE.match(compact)
    if not match:
        raise ValueError(f"cannot parse layout {text!r}: expected 'N_pre+N_loopx{{r_0,...}}+N_post' "
                         "(e.g. '2+4x{1/8,1/4,1/2,1}+2') or a layer count like '12'")
    pre, loop, rs, post = match.groups()
    resolutions = tuple(Fraction(r.strip()) for r in rs.split(","))
    if not resolutions or any(not 0 < r <= 1 for r in resolutions) or int(loop) < 1:
        raise ValueError(f"layout {text!r}: resolutions must lie in (0, 1] and N_loop >= 1")
    return int(pre), int(loop), resolutions, int(post)


class SpiralFormerConfig(PretrainedConfig):
    """Architecture of a SpiralFormer (paper §2, App. B-F); see the module docstring."""

    model_type = "spiralformer"
    keys_to_ignore_at_inference = ["cache", "past_key_values"]  # output name by transformers version

    def __init__(
        self,
        layout: str = "1+2x{1/4,1/2,1}+1",
        topology: str = "mesh",
        mesh_slots: Optional[int] = None,
        downscale: str = "self_aggregation",
        upscale: str = "router",
        shift: str = "overlap",
        chunk_offset: str = "half",
        hidden_size: int = 64,
        num_attention_heads: int = 4,
        intermediate_size: Optional[int] = None,
        vocab_size: int = 256,
        max_position_embeddings: int = 64,
        normalization: str = "LayerNorm",
        layer_norm_eps: float = 1e-5,
        rotary_percent: float = 1.0,
        rotary_base: int = 10000,
        initializer_range: float = 0.02,
        make_vocab_size_divisible_by: int = 128,
        decode_coarse_schedule: str = "inline",
        embedding_scale: str = "none",
        output_init_depth: str = "unique",
        untie_core: bool = False,
        use_cache: bool = True,
        tie_word_embeddings: bool = False,
        seq_length: Optional[int] = None,
        num_key_value_heads: Optional[int] = None,
        head_dim: Optional[int] = None,
        disable_bias_linear: bool = False,
        add_qkv_bias: bool = False,
        swiglu: bool = False,
        hidden_dropout: float = 0.0,
        attention_dropout: float = 0.0,
        **kwargs,
    ) -> None:
        for name in _DERIVED:  # derived values in a config.json are informational only
            kwargs.pop(name, None)
        self.layout = str(layout)
        self.topology = topology
        self.mesh_slots = mesh_slots
        self.downscale = downscale
        self.upscale = upscale
        self.shift = str(shift)
        self.chunk_offset = chunk_offset
        self.hidden_size = int(hidden_size)
        self.num_attention_heads = int(num_attention_heads)
        # Megatron-LM's architecture flags (same names as megatron_spiral's SpiralConfig).
        self.swiglu = bool(swiglu)
        self.disable_bias_linear = bool(disable_bias_linear)
        self.add_qkv_bias = bool(add_qkv_bias)
        self.hidden_dropout = float(hidden_dropout)
        self.attention_dropout = float(attention_dropout)
        self.num_key_value_heads = int(num_key_value_heads or self.num_attention_heads)
        if head_dim is None and self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size={self.hidden_size} is not divisible by "
                             f"num_attention_heads={self.num_attention_heads}; set head_dim")
        self.head_dim = int(head_dim or self.hidden_size // self.num_attention_heads)
        default_ffn = (int((4 * self.hidden_size * 2 / 3) / 64) * 64 if self.swiglu
                       else 4 * self.hidden_size)  # Megatron-LM's rule
        self.intermediate_size = int(intermediate_size or default_ffn)
        self.vocab_size = int(vocab_size)
        self.max_position_embeddings = int(max_position_embeddings)
        # Training length; exports made before it was recorded trained at max_position_embeddings.
        self.seq_length = int(seq_length or self.max_position_embeddings)
        self.normalization = normalization
        self.layer_norm_eps = float(layer_norm_eps)
        self.rotary_percent = float(rotary_percent)
        self.rotary_base = rotary_base
        self.initializer_range = float(initializer_range)
        self.make_vocab_size_divisible_by = int(make_vocab_size_divisible_by)
        self.decode_coarse_schedule = decode_coarse_schedule
        self.embedding_scale = embedding_scale
        self.output_init_depth = output_init_depth
        self.untie_core = bool(untie_core)
        self.use_cache = use_cache
        self._derive()
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)

    def _derive(self) -> None:
        pre, loop, resolutions, post = parse_layout(self.layout)
        checks = [("topology", self.topology, ("anchor", "mesh")),
                  ("downscale", self.downscale, ("self_aggregation", "mean")),
                  ("upscale", self.upscale, ("router", "uniform")),
                  ("chunk_offset", self.chunk_offset, ("half", "zero")),
                  ("normalization", self.normalization, ("LayerNorm", "RMSNorm")),
                  ("decode_coarse_schedule", self.decode_coarse_schedule,
                   ("inline", "deferred", "background")),
                  ("embedding_scale", self.embedding_scale, ("sqrt_d", "none")),
                  ("output_init_depth", self.output_init_depth, ("unrolled", "unique"))]
        for name, value, allowed in checks:
            if value not in allowed:
                raise ValueError(f"{name}={value!r} is not valid; choose one of {', '.join(allowed)}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_key_value_heads={self.num_key_value_heads} must divide "
                             f"num_attention_heads={self.num_attention_heads}")
        self.num_pre_layers, self.num_loop_layers, self.num_post_layers = pre, loop, post
        self.num_iterations = len(resolutions)
        self.num_hidden_layers = pre + loop + post
        self.chunk_sizes: List[int] = [int(1 // r) for r in resolutions]
        self.chunk_offsets: List[int] = [g // 2 if self.chunk_offset == "half" else 0
                                         for g in self.chunk_sizes]
        if self.shift == "overlap":
            self.shifts = [g - 1 for g in self.chunk_sizes]
        elif self.shift == "parallel":
            self.shifts = list(self.chunk_sizes)
        else:
            try:
                value = int(self.shift)
            except ValueError:
                raise ValueError(f"shift={self.shift!r} is not 'overlap', 'parallel' or an integer") from None
            if any(value < g - 1 for g in self.chunk_sizes):
                raise ValueError(f"shift={value} breaks strict causality (Proposition 1 needs "
                                 f"s_t >= g_t - 1 for chunk sizes {self.chunk_sizes})")
            self.shifts = [value] * len(self.chunk_sizes)
        self.num_mesh_slots = self.mesh_slots if self.mesh_slots is not None else self.num_iterations + 3
        self.num_core_copies = self.num_iterations if self.untie_core and self.num_iterations else 1
        self.num_compute_layers = pre + loop * self.num_iterations + post
        weight_layers = pre + loop * self.num_core_copies + post
        self.init_depth = self.num_compute_layers if self.output_init_depth == "unrolled" else weight_layers

    @property
    def embedding_multiplier(self) -> float:
        """Factor on the token embeddings before the first layer (embedding_scale)."""
        return math.sqrt(self.hidden_size) if self.embedding_scale == "sqrt_d" else 1.0

    @property
    def linear_bias(self) -> bool:
        return not self.disable_bias_linear

    @property
    def qkv_bias(self) -> bool:
        """Megatron-LM: the QKV projection has a bias when add_bias_linear or add_qkv_bias."""
        return self.linear_bias or self.add_qkv_bias
