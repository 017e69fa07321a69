"""Incremental decoding (Algorithm 2) for megatron-spiral models.

The chunk-triggered decoder itself lives in the self-contained Hugging Face module
(``megatron_spiral/hf/modeling_spiral.py``, ``equations_spiral.py``, ``cache_spiral.py``) so exported models carry it. A
megatron checkpoint or in-memory ``SpiralLM`` is decoded by loading its weights into that module
(``to_hf`` / ``load_for_decoding``); logits match the megatron forward (tests/test_decode*.py).

    from megatron_spiral.inference import load_for_decoding, generate, SamplingConfig
    model, tokenizer_dir = load_for_decoding("runs/ckpt")          # or an HF export directory
    result = generate(model, [[1, 2, 3]], max_new_tokens=32, sampling=SamplingConfig(greedy=True))
"""

from __future__ import annotations

import json
import os
from typing import Optional, Tuple

import torch

from megatron_spiral.inference.generation import GenerationResult, SamplingConfig, generate, sample_next

__all__ = ["to_hf", "load_for_decoding", "generate", "sample_next", "SamplingConfig", "GenerationResult"]


def to_hf(spiral_lm, tokenizer_meta: Optional[dict] = None):
    """SpiralFormerForCausalLM (eval mode, same device) holding a TP=1 megatron SpiralLM's weights."""
    from megatron_spiral.hf.convert import hf_model_from_megatron

    return hf_model_from_megatron(spiral_lm, tokenizer_meta)


def is_hf_directory(path: str) -> bool:
    config = os.path.join(path, "config.json")
    if not os.path.isfile(config):
        return False
    with open(config) as f:
        return json.load(f).get("model_type") == "spiralformer"


def load_for_decoding(path: str, device: Optional[str] = None,
                      dtype: torch.dtype = torch.float32) -> Tuple[object, Optional[str]]:
    """(model, tokenizer directory or None) from an HF export or a megatron checkpoint."""
    from megatron_spiral.hf.modeling_spiral import SpiralFormerForCausalLM

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if is_hf_directory(path):
        model = SpiralFormerForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
        has_tokenizer = any(os.path.isfile(os.path.join(path, n))
                            for n in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"))
        return model, path if has_tokenizer else None
    from megatron_spiral.hf.convert import load_megatron_model

    spiral_lm, metadata, ckpt_dir = load_megatron_model(path, device=device)
    model = to_hf(spiral_lm, metadata.get("tokenizer")).to(dtype)
    del spiral_lm
    tok_dir = os.path.join(ckpt_dir, (metadata.get("tokenizer") or {}).get("directory") or "tokenizer")
    return model, tok_dir if os.path.isdir(tok_dir) else None
