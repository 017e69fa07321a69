"""One-process convenience API for notebooks, tests and tools.

    from megatron_spiral import build_model
    model = build_model("tiny", topology="mesh", hidden_size=64)
    logits = model(input_ids)        # [batch, seq] -> float [batch, seq, padded_vocab]
"""

from __future__ import annotations

from typing import Optional

import torch

from megatron_spiral.config import SpiralConfig
from megatron_spiral.presets import get_preset


class SpiralLM(torch.nn.Module):
    """Wraps a SpiralGPTModel so it can be called on token ids alone.

    ``model.gpt`` is the megatron-core module (checkpointing, training); ``model.config`` the
    SpiralConfig. Any sequence length up to ``config.max_positions`` (--max-position-embeddings,
    default seq_length) works.
    """

    def __init__(self, gpt, config: SpiralConfig) -> None:
        super().__init__()
        self.gpt = gpt
        self.config = config

    def forward(self, input_ids: torch.Tensor, labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Logits [b, s, padded_vocab] (float), or the per-token loss [b, s] when labels are given."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
        seq = input_ids.shape[1]
        if seq > self.config.max_positions:
            raise ValueError(
                f"sequence length {seq} exceeds seq_length={self.config.seq_length} "
                f"(max_position_embeddings={self.config.max_positions}); build the model with a "
                "larger seq_length or max_position_embeddings")
        device = next(self.gpt.parameters()).device
        input_ids = input_ids.to(device)
        position_ids = torch.arange(seq, device=device).unsqueeze(0).expand_as(input_ids)
        if labels is not None:  # vocab-parallel cross entropy works on the TP-split logits
            return self.gpt(input_ids, position_ids, None, labels=labels.to(device))
        return self.gpt(input_ids, position_ids, None, runtime_gather_output=True).float()


def build_model(preset: str = "tiny", seed: int = 1234, params_dtype: torch.dtype = torch.float32,
                device: Optional[str] = None, recompute=None, **overrides) -> SpiralLM:
    """Build a model from a preset name; keyword arguments override any SpiralConfig field.
    ``recompute`` is an optional :class:`megatron_spiral.model.recompute.RecomputeConfig`.

    Sets up a one-rank process group and megatron's model-parallel state when none exists.
    """
    from megatron_spiral.model.spiral_model import SpiralGPTModel, transformer_config
    from megatron_spiral.parallel import ensure_parallel

    config = get_preset(preset, **overrides)
    ensure_parallel(seed=seed)
    extra = recompute.transformer_config_overrides() if recompute is not None else {}
    gpt = SpiralGPTModel(transformer_config(config, params_dtype=params_dtype, **extra), config,
                         recompute_loop=bool(recompute and recompute.spiral_recompute_loop))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return SpiralLM(gpt.to(device), config)
