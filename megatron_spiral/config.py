"""SpiralConfig: the architecture of a SpiralFormer (or its looped / non-looped baselines).

The paper's layer-allocation notation is accepted directly (§3.1, App. F)::

    "2+4x{1/8,1/4,1/2,1}+2"   N_pre + N_loop x {r_0, ..., r_{T-1}} + N_post   ("×" also accepted)
    "2+4x{1,1}+2"             LoopedFormer: the same core twice at full resolution
    "12"                      non-looped baseline (Pythia-style GPT-NeoX stack of 12 layers)

Derived per-iteration quantities (all pure functions of the config):
chunk size g_t = floor(1/r_t) (eq. 13), offset omega_t (eq. 12: floor(g_t/2) for ``half``, 0 for
``zero``), shift s_t (eq. 22: g_t-1 for ``overlap``, g_t for ``parallel``, or an explicit integer
that must be >= g_t - 1 for every t, Proposition 1).
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from fractions import Fraction
from typing import List, Optional, Tuple

TOPOLOGIES = ("anchor", "mesh")
DOWNSCALES = ("self_aggregation", "mean")
UPSCALES = ("router", "uniform")
SHIFT_MODES = ("overlap", "parallel")
CHUNK_OFFSETS = ("half", "zero")
NORMALIZATIONS = ("LayerNorm", "RMSNorm")
TRANSFORMER_IMPLS = ("auto", "local", "transformer_engine")
POSITION_EMBEDDING_TYPES = ("rope",)
# Megatron-LM position embeddings SpiralFormer cannot use, and why (shown by the error).
_REJECTED_POSITION_EMBEDDINGS = {
    "learned_absolute": "a learned absolute table indexes token positions, but the shared core "
                        "runs on compressed sequences whose positions are chunk indices",
    "none": "the shared core needs positions on the compressed sequence",
    "mrope": "multimodal RoPE needs image/video position ids",
    "relative": "T5-style relative buckets are not implemented for the looped core",
    "yarn": "YaRN context extension is not implemented",
}
EMBEDDING_SCALES = ("sqrt_d", "none")
OUTPUT_INIT_DEPTHS = ("unrolled", "unique")
MESH_ROUTER_INITS = ("uniform", "residual")

# The authors' training recipe (MeSH paper App. B, the codebase of every Table 1 row) is the default;
# a config written before these fields existed (old checkpoint metadata, old HF exports) meant this:
LEGACY_RECIPE = {"embedding_scale": "none", "output_init_depth": "unique", "untie_core": False}


class SpiralConfigError(ValueError):
    """A configuration value is invalid; the message says which and how to fix it."""


@dataclass(frozen=True)
class Layout:
    """Parsed layer allocation N_pre + N_loop x {r_t} + N_post."""

    num_pre: int
    num_loop: int
    resolutions: Tuple[Fraction, ...]
    num_post: int

    @property
    def is_looped(self) -> bool:
        return len(self.resolutions) > 0

    @property
    def num_iterations(self) -> int:
        return len(self.resolutions)

    @property
    def num_unique_layers(self) -> int:
        return self.num_pre + self.num_loop + self.num_post

    def __str__(self) -> str:
        if not self.is_looped:
            return str(self.num_pre)
        rs = ",".join(str(r) for r in self.resolutions)
        return f"{self.num_pre}+{self.num_loop}x{{{rs}}}+{self.num_post}"


_LOOPED_RE = re.compile(r"^(\d+)\+(\d+)[x×*]\{([^{}]*)\}\+(\d+)$")


def parse_resolution(text: str) -> Fraction:
    """``"1/8"`` / ``"0.125"`` / ``"1"`` -> Fraction 1/g in (0, 1] (g an integer chunk size)."""
    try:
        value = Fraction(text.strip())
    except (ValueError, ZeroDivisionError):
        raise SpiralConfigError(
            f"resolution {text!r} is not a number; write fractions like 1/8 or decimals like 0.125"
        ) from None
    if not (0 < value <= 1):
        raise SpiralConfigError(f"resolution {text!r} must lie in (0, 1] (eq. 7: L_t = r_t L)")
    if value.numerator != 1:
        # A chunk holds g_t = 1/r_t tokens (eq. 13); rounding 3/8 down to g = 2 would silently run 1/2.
        lower, upper = Fraction(1, int(1 / value) + 1), Fraction(1, int(1 / value))
        raise SpiralConfigError(
            f"resolution {text!r}: a chunk holds g = 1/r tokens (eq. 13), and 1/r = {1 / value} is not "
            f"an integer; use r = 1/g, e.g. {lower} or {upper}")
    return value


def parse_layout(text: str) -> Layout:
    """Parse the paper's layout notation (see module docstring)."""
    compact = re.sub(r"\s+", "", str(text))
    if compact.isdigit():
        layers = int(compact)
        if layers < 1:
            raise SpiralConfigError("a non-looped layout needs at least one layer, e.g. '12'")
        return Layout(layers, 0, (), 0)
    match = _LOOPED_RE.match(compact)
    if not match:
        raise SpiralConfigError(
            f"cannot parse layout {text!r}: expected 'N_pre+N_loopx{{r_0,...,r_T-1}}+N_post' "
            "(e.g. '2+4x{1/8,1/4,1/2,1}+2', '×' also accepted) or a plain layer count like '12'"
        )
    pre, loop, rs, post = match.groups()
    if not rs:
        raise SpiralConfigError(f"layout {text!r} has an empty resolution schedule {{}}")
    resolutions = tuple(parse_resolution(r) for r in rs.split(","))
    if int(loop) < 1:
        raise SpiralConfigError(f"layout {text!r}: the shared core needs N_loop >= 1 layers")
    return Layout(int(pre), int(loop), resolutions, int(post))


def _help(text: str, **extra) -> dict:
    return {"help": text, **extra}


@dataclass
class SpiralConfig:
    """Architecture of one model. Field names double as Megatron flags (``--hidden-size``)."""

    layout: str = field(default="1+2x{1/4,1/2,1}+1", metadata=_help(
        "layer allocation in the paper's notation: 'N_pre+N_loopx{r_0,...}+N_post' "
        "(e.g. '4+8x{1/8,1/4,1/2,1}+4'; LoopedFormer: '{1,1}'), or a plain layer count "
        "for the non-looped baseline", flag="--spiral-layout"))
    topology: str = field(default="mesh", metadata=_help(
        "loop-state topology: 'anchor' (eq. 5) or 'mesh' (MeSH memory slots, eq. 24-30)",
        choices=TOPOLOGIES, flag="--spiral-topology"))
    mesh_slots: Optional[int] = field(default=None, metadata=_help(
        "MeSH buffer slots B (default T+3)", flag="--spiral-mesh-slots"))
    downscale: str = field(default="self_aggregation", metadata=_help(
        "down-scaling operator: 'self_aggregation' (eq. 17-18) or 'mean' pooling (eq. 16)",
        choices=DOWNSCALES, flag="--spiral-downscale"))
    upscale: str = field(default="router", metadata=_help(
        "up-scaling operator: output-dependent 'router' (eq. 21) or 'uniform' broadcast (eq. 20)",
        choices=UPSCALES, flag="--spiral-upscale"))
    shift: str = field(default="overlap", metadata=_help(
        "causal right-shift s_t (eq. 22): 'overlap' (g_t-1), 'parallel' (g_t) or an integer "
        ">= g_t-1 for every iteration", flag="--spiral-shift"))
    chunk_offset: str = field(default="half", metadata=_help(
        "chunk offset omega_t (eq. 12): 'half' (floor(g_t/2)) or 'zero'",
        choices=CHUNK_OFFSETS, flag="--spiral-chunk-offset"))

    hidden_size: int = field(default=64, metadata=_help("model width d"))
    num_attention_heads: int = field(default=4, metadata=_help("attention heads per layer"))
    ffn_hidden_size: Optional[int] = field(default=None, metadata=_help(
        "MLP width (default 4 x hidden size; with --swiglu int(8h/3 / 64) * 64, as Megatron-LM)"))
    vocab_size: int = field(default=256, metadata=_help(
        "real tokenizer vocabulary; padded to a multiple of --make-vocab-size-divisible-by"))
    make_vocab_size_divisible_by: int = field(default=128, metadata=_help(
        "pad the vocabulary to a multiple of this (Megatron's rule; kept independent of TP so "
        "checkpoints reshard)"))
    seq_length: int = field(default=64, metadata=_help("maximum training sequence length L"))
    normalization: str = field(default="LayerNorm", metadata=_help(
        "norm inside every block: 'LayerNorm' (Pythia/GPT-NeoX, 12d^2+13d per layer) or "
        "'RMSNorm'", choices=NORMALIZATIONS))
    layernorm_epsilon: float = field(default=1e-5, metadata=_help(
        "epsilon of every norm (Megatron-LM's --norm-epsilon; --layernorm-epsilon is an alias)",
        flag="--norm-epsilon"))
    rotary_percent: float = field(default=1.0, metadata=_help(
        "fraction of each head's dimensions that RoPE rotates (Pythia used 0.25)"))
    rotary_base: int = field(default=10000, metadata=_help("RoPE base period"))
    init_method_std: float = field(default=0.02, metadata=_help("std of weight initialisation"))
    embedding_scale: str = field(default="sqrt_d", metadata=_help(
        "scale the token embeddings before the first layer: 'sqrt_d' (x sqrt(d_model), the "
        "authors' recipe, MeSH paper App. B) or 'none' (plain Pythia/GPT-NeoX)",
        choices=EMBEDDING_SCALES, flag="--spiral-embedding-scale"))
    output_init_depth: str = field(default="unrolled", metadata=_help(
        "depth N in the output-projection init std init_std/sqrt(2N): 'unrolled' (layers of the "
        "unrolled graph, pre + N_loop*T + post, the authors' recipe, MeSH paper App. B) or "
        "'unique' (distinct layers, megatron's default)",
        choices=OUTPUT_INIT_DEPTHS, flag="--spiral-output-init-depth"))
    mesh_router_init: str = field(default="uniform", metadata=_help(
        "initial MeSH router biases: 'uniform' (zero: every read averages the B slots, so "
        "h^(0) ~ (x + v)/B) or 'residual' (bias 4 on slot 1: reads/writes start on one slot, "
        "h^(0) ~ v and each step adds u~, an Anchor-like start); init only",
        choices=MESH_ROUTER_INITS, flag="--spiral-mesh-router-init"))
    untie_core: bool = field(default=False, metadata=_help(
        "give every loop iteration its own core weights (no sharing): '4+8x{1,1}+4' untied is "
        "the non-recursive MeSH baseline of Table 1 (BASELINE†)", flag="--spiral-untie-core"))
    transformer_impl: str = field(default="auto", metadata=_help(
        "layer implementation: 'transformer_engine' when it imports ('auto'), else 'local' "
        "(megatron parallel linears + torch SDPA)", choices=TRANSFORMER_IMPLS))

    # ---- Megatron-LM architecture flags. Defaults here are the behaviour of checkpoints written
    # before these fields existed (untied, no dropout, biases, GELU, MHA); ``megatron_default`` is
    # what a run without --preset gets when the flag is absent, as in Megatron-LM.
    untie_embeddings_and_output_weights: bool = field(default=True, metadata=_help(
        "separate input embedding and output layer matrices; absent on a run without --preset: "
        "TIED, as in Megatron-LM (every preset is untied, like Pythia)", megatron_default=False))
    hidden_dropout: float = field(default=0.0, metadata=_help(
        "dropout on embeddings and on every layer's attention/MLP output, in the pre, core and "
        "post stacks (Megatron-LM default 0.1 without --preset; presets 0.0 as Pythia)",
        megatron_default=0.1))
    attention_dropout: float = field(default=0.0, metadata=_help(
        "dropout on attention probabilities (Megatron-LM default 0.1 without --preset; "
        "presets 0.0)", megatron_default=0.1))
    disable_bias_linear: bool = field(default=False, metadata=_help(
        "no biases in the QKV, output, and MLP linears (Megatron-LM's add_bias_linear=False); "
        "--add-qkv-bias puts the QKV bias back"))
    add_qkv_bias: bool = field(default=False, metadata=_help(
        "keep a bias on the QKV projection even with --disable-bias-linear"))
    swiglu: bool = field(default=False, metadata=_help(
        "gated SiLU MLP; without --ffn-hidden-size the MLP width is int(8h/3 / 64) * 64 "
        "(Megatron-LM's rule)"))
    group_query_attention: bool = field(default=False, metadata=_help(
        "grouped-query attention with --num-query-groups key/value heads"))
    num_query_groups: int = field(default=1, metadata=_help(
        "key/value head groups under --group-query-attention (Megatron-LM default 1)"))
    kv_channels: Optional[int] = field(default=None, metadata=_help(
        "per-head dimension (default hidden size / heads)"))
    max_position_embeddings: Optional[int] = field(default=None, metadata=_help(
        "longest sequence the RoPE table covers; must be >= --seq-length (default: "
        "--seq-length)"))
    position_embedding_type: str = field(default="rope", metadata=_help(
        "position embedding; SpiralFormer uses RoPE (the only accepted value)"))

    # ------------------------------------------------------------------ validation
    def __post_init__(self) -> None:
        self.shift = str(self.shift)
        self.validate()

    def validate(self) -> None:
        layout = parse_layout(self.layout)
        _choice("topology", self.topology, TOPOLOGIES)
        _choice("downscale", self.downscale, DOWNSCALES)
        _choice("upscale", self.upscale, UPSCALES)
        _choice("chunk_offset", self.chunk_offset, CHUNK_OFFSETS)
        _choice("normalization", self.normalization, NORMALIZATIONS)
        _choice("transformer_impl", self.transformer_impl, TRANSFORMER_IMPLS)
        _choice("embedding_scale", self.embedding_scale, EMBEDDING_SCALES)
        _choice("output_init_depth", self.output_init_depth, OUTPUT_INIT_DEPTHS)
        _choice("mesh_router_init", self.mesh_router_init, MESH_ROUTER_INITS)
        if not isinstance(self.untie_core, bool):
            raise SpiralConfigError(f"untie_core must be true or false, got {self.untie_core!r}")
        for name in ("hidden_size", "num_attention_heads", "vocab_size", "seq_length",
                     "make_vocab_size_divisible_by"):
            if int(getattr(self, name)) < 1:
                raise SpiralConfigError(f"{name} must be a positive integer, got {getattr(self, name)}")
        _check_position_embedding(self.position_embedding_type)
        for name in ("hidden_dropout", "attention_dropout"):
            if not 0.0 <= float(getattr(self, name)) < 1.0:
                raise SpiralConfigError(f"{name} must lie in [0, 1), got {getattr(self, name)}")
        if self.kv_channels is not None and self.kv_channels < 1:
            raise SpiralConfigError(f"kv_channels must be a positive integer, got {self.kv_channels}")
        if self.num_query_groups < 1 or self.num_attention_heads % self.num_query_groups:
            raise SpiralConfigError(
                f"num_query_groups={self.num_query_groups} must be >= 1 and divide "
                f"num_attention_heads={self.num_attention_heads}")
        if self.max_position_embeddings is not None and self.max_position_embeddings < self.seq_length:
            raise SpiralConfigError(
                f"max_position_embeddings ({self.max_position_embeddings}) must be greater than or "
                f"equal to seq_length ({self.seq_length}); raise --max-position-embeddings or "
                "lower --seq-length")
        if self.kv_channels is None and self.hidden_size % self.num_attention_heads:
            raise SpiralConfigError(
                f"hidden_size={self.hidden_size} is not divisible by num_attention_heads="
                f"{self.num_attention_heads}; pick a head count that divides the width")
        if not 0 < self.rotary_percent <= 1:
            raise SpiralConfigError(f"rotary_percent must lie in (0, 1], got {self.rotary_percent}")
        if self.mesh_slots is not None and self.mesh_slots < 1:
            raise SpiralConfigError(f"mesh_slots must be >= 1 (B memory slots), got {self.mesh_slots}")
        self.shifts  # raises on a causality-breaking integer shift

    # ------------------------------------------------------------------ derived quantities
    @property
    def parsed_layout(self) -> Layout:
        return parse_layout(self.layout)

    @property
    def resolutions(self) -> Tuple[Fraction, ...]:
        return self.parsed_layout.resolutions

    @property
    def num_iterations(self) -> int:
        return self.parsed_layout.num_iterations

    @property
    def chunk_sizes(self) -> List[int]:
        """g_t = floor(1 / r_t) (eq. 13)."""
        return [int(1 // r) for r in self.resolutions]

    @property
    def chunk_offsets(self) -> List[int]:
        """omega_t (eq. 12): floor(g_t / 2) for 'half', 0 for 'zero'."""
        return [g // 2 if self.chunk_offset == "half" else 0 for g in self.chunk_sizes]

    @property
    def shifts(self) -> List[int]:
        """s_t (eq. 22). Integers below g_t - 1 break strict causality (Proposition 1)."""
        sizes = self.chunk_sizes
        if self.shift == "overlap":
            return [g - 1 for g in sizes]
        if self.shift == "parallel":
            return [g for g in sizes]
        try:
            value = int(self.shift)
        except ValueError:
            raise SpiralConfigError(
                f"shift={self.shift!r} is not one of {SHIFT_MODES} or an integer") from None
        for t, g in enumerate(sizes):
            if value < g - 1:
                raise SpiralConfigError(
                    f"shift={value} breaks strict causality at iteration {t} (chunk size g={g}): "
                    f"Proposition 1 needs s_t >= g_t - 1 = {g - 1}; use 'overlap', 'parallel' or "
                    f"an integer >= {max(sizes) - 1}")
        return [value] * len(sizes)

    @property
    def num_compute_layers(self) -> int:
        """N_compute: layers of the unrolled graph, N_pre + N_loop * T + N_post (4 + 8*4 + 4 = 40
        for '4+8x{1/8,1/4,1/2,1}+4'); a non-looped stack counts its layers."""
        layout = self.parsed_layout
        return layout.num_pre + layout.num_loop * layout.num_iterations + layout.num_post

    @property
    def num_core_copies(self) -> int:
        """Distinct core weight sets: T when every iteration has its own (untie_core), else 1."""
        return self.num_iterations if self.untie_core and self.parsed_layout.is_looped else 1

    @property
    def num_weight_layers(self) -> int:
        """Layers that own parameters: N_pre + N_loop * (T untied, else 1) + N_post."""
        layout = self.parsed_layout
        return layout.num_pre + layout.num_loop * self.num_core_copies + layout.num_post

    @property
    def init_depth(self) -> int:
        """N in the output-projection init std init_std / sqrt(2 N) (output_init_depth): the
        unrolled count N_compute, or the layers owning weights (megatron's num_layers)."""
        if self.output_init_depth == "unrolled":
            return self.num_compute_layers
        return self.num_weight_layers

    @property
    def embedding_multiplier(self) -> float:
        """Factor applied to the token embeddings before the first layer (embedding_scale)."""
        return math.sqrt(self.hidden_size) if self.embedding_scale == "sqrt_d" else 1.0

    @property
    def num_mesh_slots(self) -> int:
        """B = T + 3 by default (Yu et al. 2025)."""
        return self.mesh_slots if self.mesh_slots is not None else self.num_iterations + 3

    @property
    def ffn_size(self) -> int:
        """MLP width: --ffn-hidden-size, else Megatron-LM's default (4h; int(8h/3/64)*64 with SwiGLU)."""
        if self.ffn_hidden_size:
            return self.ffn_hidden_size
        if self.swiglu:
            return int((4 * self.hidden_size * 2 / 3) / 64) * 64
        return 4 * self.hidden_size

    @property
    def head_dim(self) -> int:
        """Per-head width: --kv-channels, else hidden / heads (Megatron-LM)."""
        return self.kv_channels or self.hidden_size // self.num_attention_heads

    @property
    def query_groups(self) -> int:
        """Key/value heads: --num-query-groups under GQA, else one per query head."""
        return self.num_query_groups if self.group_query_attention else self.num_attention_heads

    @property
    def tied_embeddings(self) -> bool:
        return not self.untie_embeddings_and_output_weights

    @property
    def linear_bias(self) -> bool:
        return not self.disable_bias_linear

    @property
    def qkv_bias(self) -> bool:
        """Megatron-LM: the QKV projection has a bias when add_bias_linear or add_qkv_bias."""
        return self.linear_bias or self.add_qkv_bias

    @property
    def max_positions(self) -> int:
        """Length the RoPE table covers: --max-position-embeddings, default --seq-length."""
        return self.max_position_embeddings or self.seq_length

    @property
    def padded_vocab_size(self) -> int:
        multiple = self.make_vocab_size_divisible_by
        return -(-self.vocab_size // multiple) * multiple

    def replace(self, **overrides) -> "SpiralConfig":
        unknown = set(overrides) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise SpiralConfigError(
                f"unknown config field(s) {sorted(unknown)}; valid fields: "
                f"{sorted(f.name for f in dataclasses.fields(self))}")
        return dataclasses.replace(self, **overrides)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "SpiralConfig":
        """Rebuild a saved config. Recipe fields it lacks (written before they existed) take
        their old meaning (LEGACY_RECIPE: no embedding scale, unique-depth init, shared core),
        so an old checkpoint keeps computing what it was trained to compute."""
        return cls(**{**LEGACY_RECIPE, **values})


def _check_position_embedding(kind: str) -> None:
    if kind in POSITION_EMBEDDING_TYPES:
        return
    why = _REJECTED_POSITION_EMBEDDINGS.get(kind, "it is not a Megatron-LM position embedding type")
    raise SpiralConfigError(
        f"--position-embedding-type {kind}: SpiralFormer uses RoPE ({why}); use "
        "--position-embedding-type rope (--rotary-percent/--rotary-base tune it)")


def _choice(name: str, value: str, allowed: Tuple[str, ...]) -> None:
    if value not in allowed:
        raise SpiralConfigError(f"{name}={value!r} is not valid; choose one of {', '.join(allowed)}")

