"""Causal down-scaling, up-scaling and right shift (paper §2.3.2-2.3.4, eq. 16-22).

The functions work on full-length sequences in Megatron's [sequence, batch, hidden] layout; the
SpiralBlock gathers sequence-parallel shards before calling them (chunks may straddle shards).
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from megatron_spiral.model import chunking


def mean_downscale(hidden: torch.Tensor, chunk_size: int, offset: int) -> torch.Tensor:
    """Mean pooling, eq. 16: z_j = (1/g_t) sum_{i in I_{t,j}} h_i.

    Literal to the equation: the partial first chunk under an offset is also divided by g_t (its
    missing slots count as zeros), exactly as Algorithm 2's zero-initialised chunk buffer.
    """
    return chunking.to_chunks(hidden, chunk_size, offset).sum(dim=1) / chunk_size


def self_aggregation_downscale(
    hidden: torch.Tensor, scores: torch.Tensor, chunk_size: int, offset: int
) -> torch.Tensor:
    """Self-aggregation, eq. 17-18: z_j = sum_{i in I_{t,j}} softmax_i(A(h_i)) h_i.

    ``scores`` [L, b] are A^(t)(h_i). The softmax runs over the chunk's real members only, so the
    partial first chunk under a non-zero offset is not diluted by empty slots.
    """
    length = hidden.shape[0]
    chunked_scores = chunking.to_chunks(scores.float(), chunk_size, offset)  # [L_t, g, b]
    real = chunking.real_slot_mask(length, chunk_size, offset, device=hidden.device)
    chunked_scores = chunked_scores.masked_fill(~real.unsqueeze(-1), float("-inf"))
    weights = torch.softmax(chunked_scores, dim=1).to(hidden.dtype)  # alpha, [L_t, g, b]
    chunked = chunking.to_chunks(hidden, chunk_size, offset)  # [L_t, g, b, d]
    return (weights.unsqueeze(-1) * chunked).sum(dim=1)


def upscale_gain(chunk_size: int) -> float:
    """lambda_t = sqrt(g_t) (§2.3.3, gain scaling)."""
    return math.sqrt(chunk_size)


def router_upscale(
    latents: torch.Tensor, router_logits: torch.Tensor, length: int, offset: int
) -> torch.Tensor:
    """Output-dependent allocation, eq. 19 + 21: u_i = lambda_t beta_{pi(i), rho(i)} zhat_{pi(i)}.

    ``latents`` [L_t, b, d] are zhat; ``router_logits`` [L_t, b, g] are B^(t)(zhat_j).
    Positions outside V_t (the dropped tail) receive a zero update.
    """
    chunk_size = router_logits.shape[-1]
    beta = torch.softmax(router_logits.float(), dim=-1).to(latents.dtype)  # [L_t, b, g]
    scaled = upscale_gain(chunk_size) * beta.permute(0, 2, 1).unsqueeze(-1) * latents.unsqueeze(1)
    return chunking.from_chunks(scaled, length, offset)  # [L, b, d]


def uniform_upscale(latents: torch.Tensor, chunk_size: int, length: int, offset: int) -> torch.Tensor:
    """Uniform broadcast, eq. 20: u_i = (lambda_t / g_t) zhat_{pi(i)}."""
    scale = upscale_gain(chunk_size) / chunk_size
    expanded = (scale * latents).unsqueeze(1).expand(-1, chunk_size, -1, -1)
    return chunking.from_chunks(expanded, length, offset)


def causal_shift(update: torch.Tensor, shift: int) -> torch.Tensor:
    """Causal right-shift, eq. 22: u~[i] = 0 for i < s_t, u[i - s_t] otherwise."""
    if shift == 0:
        return update
    length = update.shape[0]
    kept = update[: max(length - shift, 0)]
    pad = update.new_zeros((min(shift, length),) + tuple(update.shape[1:]))
    return torch.cat([pad, kept], dim=0)


class Resampler(torch.nn.Module):
    """Down- and up-scaling of one loop iteration t with its own lightweight parameters.

    Holds A^(t): R^d -> R (self-aggregation scorer, no bias: a constant cancels in the softmax)
    and B^(t): R^d -> R^{g_t} (allocation router, with bias). Iterations at full resolution
    (g_t = 1) need neither: both softmaxes are over a single element.
    """

    def __init__(
        self,
        hidden_size: int,
        chunk_size: int,
        offset: int,
        shift: int,
        downscale: str,
        upscale: str,
        init_method: Optional[Callable[[torch.Tensor], None]] = None,
        params_dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        self.chunk_size = chunk_size
        self.offset = offset
        self.shift = shift
        self.downscale_mode = downscale
        self.upscale_mode = upscale
        self.scorer = None
        self.router = None
        if chunk_size > 1 and downscale == "self_aggregation":
            self.scorer = torch.nn.Linear(hidden_size, 1, bias=False, dtype=params_dtype)
        if chunk_size > 1 and upscale == "router":
            self.router = torch.nn.Linear(hidden_size, chunk_size, bias=True, dtype=params_dtype)
            torch.nn.init.zeros_(self.router.bias)
        for module in (self.scorer, self.router):
            if module is not None and init_method is not None:
                init_method(module.weight)

    def num_chunks(self, length: int) -> int:
        return chunking.num_chunks(length, self.chunk_size, self.offset)

    def downscale(self, hidden: torch.Tensor) -> torch.Tensor:
        """S_down^(t): [L, b, d] -> [L_t, b, d] (eq. 8)."""
        if self.chunk_size == 1:
            return hidden
        if self.scorer is not None:
            scores = self.scorer(hidden).squeeze(-1)
            return self_aggregation_downscale(hidden, scores, self.chunk_size, self.offset)
        return mean_downscale(hidden, self.chunk_size, self.offset)

    def upscale(self, latents: torch.Tensor, length: int) -> torch.Tensor:
        """S_up^(t): [L_t, b, d] -> [L, b, d] (eq. 10)."""
        if self.chunk_size == 1:
            return latents
        if self.router is not None:
            return router_upscale(latents, self.router(latents), length, self.offset)
        return uniform_upscale(latents, self.chunk_size, length, self.offset)

    def extra_repr(self) -> str:
        return (f"g={self.chunk_size}, omega={self.offset}, s={self.shift}, "
                f"down={self.downscale_mode}, up={self.upscale_mode}")


def pad_to_multiple(hidden: torch.Tensor, multiple: int) -> torch.Tensor:
    """Append zero rows so the sequence length divides ``multiple`` (sequence-parallel sharding).

    Appending at the end is causally inert: earlier positions never attend to later ones.
    """
    extra = (-hidden.shape[0]) % multiple
    if not extra:
        return hidden
    return F.pad(hidden, (0, 0) * (hidden.dim() - 1) + (0, extra))
