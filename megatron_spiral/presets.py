"""Named configurations: every row of the paper's Table 1 (App. F dims), plus ``tiny``.

``pythia-1.4b-mesh`` is Table 1's BASELINE† (24 layers as 4+8x{1,1}+4 with untied core passes and
MeSH write/read between the blocks); ``pythia-{160m,410m,1b}-mesh`` are the same construction
at the other sizes (ours: Table 1 has no such rows).

Dims are Pythia's: 160M d=768 h=12; 410M d=1024 h=16; 1B d=2048 h=8; 1.4B d=2048 h=16.
Vocabulary: GPT-NeoX's 50277 tokens, padded by Megatron's rule to 50304. Sequence length 4096.
"""

from __future__ import annotations

from typing import Dict

from megatron_spiral.config import SpiralConfig, SpiralConfigError

GPT_NEOX_VOCAB_SIZE = 50277
C2F_B = "{1/8,1/4,1/2,1}"       # SpiralFormer-B schedule
C2F_L = "{1/16,1/8,1/4,1/2}"    # SpiralFormer-L schedule

# size: (hidden, heads, baseline layers, (pre, loop, post) of -B/Looped, (pre, loop, post) of -L)
_SIZES = {
    "160m": (768, 12, 12, (2, 4, 2), (4, 4, 4)),
    "410m": (1024, 16, 24, (4, 8, 4), (8, 8, 8)),
    "1b": (2048, 8, 16, (3, 5, 3), (5, 6, 5)),
    "1.4b": (2048, 16, 24, (4, 8, 4), (8, 8, 8)),
}

# Table 1 of the paper: (total params M, non-embedding params M, 4096-token prefill TFLOPs).
PAPER_TABLE1 = {
    "pythia-160m": (163.5, 85.1, 1.65),
    "looped-160m-anchor": (135.2, 56.7, 1.65),
    "looped-160m-mesh": (135.2, 56.7, 1.65),
    "spiral-b-160m-mesh": (135.2, 56.8, 1.48),
    "spiral-l-160m-mesh": (163.6, 85.1, 1.49),
    "pythia-410m": (407.4, 302.3, 4.59),
    "looped-410m-anchor": (306.7, 201.5, 4.59),
    "looped-410m-mesh": (306.7, 201.6, 4.59),
    "spiral-b-410m-anchor": (306.7, 201.6, 4.10),
    "spiral-b-410m-mesh": (306.8, 201.6, 4.11),
    "spiral-l-410m-mesh": (407.5, 302.4, 4.16),
    "pythia-1b": (1020.2, 805.7, 9.67),
    "looped-1b-anchor": (768.4, 553.9, 9.67),
    "looped-1b-mesh": (768.4, 554.0, 9.67),
    "spiral-b-1b-mesh": (768.6, 554.1, 8.95),
    "spiral-l-1b-mesh": (1020.4, 805.9, 8.96),
    "pythia-1.4b": (1423.0, 1208.6, 14.08),
    "pythia-1.4b-mesh": (1423.1, 1208.7, 14.08),   # BASELINE†: 4+8+8+4 unshared, 2-step MeSH
    "looped-1.4b-anchor": (1020.2, 805.7, 14.08),
    "looped-1.4b-mesh": (1020.2, 805.8, 14.08),
    "spiral-b-1.4b-mesh": (1020.4, 805.9, 12.92),
    "spiral-l-1.4b-mesh": (1423.2, 1208.8, 13.13),
}


# Peak learning rate per size (Pythia's; the MeSH paper: "6e-4 at 160M down to 2e-4 at 1.4B").
PAPER_PEAK_LR = {"160m": 6e-4, "410m": 3e-4, "1b": 3e-4, "1.4b": 2e-4}


def preset_size(name: str):
    """The Pythia size of a preset name ('spiral-b-410m-mesh' -> '410m'), None for 'tiny'."""
    return next((size for size in _SIZES if f"-{size}" in name), None)


def peak_lr(name: str) -> float:
    """The paper's peak LR for a preset (PAPER_PEAK_LR of its size)."""
    size = preset_size(name)
    if size is None:
        raise SpiralConfigError(f"preset {name!r} has no paper size; pass --lr explicitly")
    return PAPER_PEAK_LR[size]


def _layout(alloc, schedule: str) -> str:
    pre, loop, post = alloc
    return f"{pre}+{loop}x{schedule}+{post}"


# Pythia's choices, spelled out because Megatron-LM's defaults differ (tied, dropout 0.1).
PYTHIA_ARCHITECTURE = dict(untie_embeddings_and_output_weights=True, hidden_dropout=0.0,
                           attention_dropout=0.0)


def _build_presets() -> Dict[str, dict]:
    presets: Dict[str, dict] = {
        "tiny": dict(layout="1+2x{1/4,1/2,1}+1", hidden_size=64, num_attention_heads=4,
                     vocab_size=256, seq_length=64, **PYTHIA_ARCHITECTURE),
    }
    for size, (hidden, heads, layers, alloc_b, alloc_l) in _SIZES.items():
        common = dict(hidden_size=hidden, num_attention_heads=heads,
                      vocab_size=GPT_NEOX_VOCAB_SIZE, seq_length=4096, **PYTHIA_ARCHITECTURE)
        presets[f"pythia-{size}"] = dict(layout=str(layers), **common)
        # Non-recursive MeSH baseline: Pythia's layers as pre + loop + loop + post, the two
        # "core" passes with their own weights. Table 1 has it at 1.4B only; the others are ours.
        presets[f"pythia-{size}-mesh"] = dict(layout=_layout(alloc_b, "{1,1}"), topology="mesh",
                                              untie_core=True, **common)
        for topology in ("anchor", "mesh"):
            presets[f"looped-{size}-{topology}"] = dict(
                layout=_layout(alloc_b, "{1,1}"), topology=topology, **common)
        presets[f"spiral-b-{size}-mesh"] = dict(layout=_layout(alloc_b, C2F_B), topology="mesh", **common)
        presets[f"spiral-l-{size}-mesh"] = dict(layout=_layout(alloc_l, C2F_L), topology="mesh", **common)
    presets["spiral-b-410m-anchor"] = dict(presets["spiral-b-410m-mesh"], topology="anchor")
    return presets


PRESETS: Dict[str, dict] = _build_presets()


def preset_names() -> list:
    return list(PRESETS)


def get_preset(name: str, **overrides) -> SpiralConfig:
    """The preset's SpiralConfig with ``overrides`` applied (any SpiralConfig field)."""
    if name not in PRESETS:
        raise SpiralConfigError(f"unknown preset {name!r}; available: {', '.join(PRESETS)}")
    return SpiralConfig(**PRESETS[name]).replace(**overrides)
