"""Sampling loop over SpiralFormer's Algorithm-2 cache, with critical-path timing.

Works on the Hugging Face module (``megatron_spiral.hf.modeling_spiral.SpiralFormerForCausalLM``),
whichever way it was obtained (an export directory, or a megatron checkpoint converted in memory
by :func:`megatron_spiral.inference.load_for_decoding`). Prompts of different lengths decode
together; every row keeps its own absolute positions, so a batch gives the same tokens as
decoding each prompt alone.

Timing model (App. E): ``critical_s[k]`` is the time from feeding token k to having its logits
(what a user waits for); ``idle_s[k]`` the queued coarse work run after sampling
(``coarse_schedule='deferred'``), i.e. in the slot where a server streams the token out.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import List, Optional, Sequence

import torch


@dataclass
class SamplingConfig:
    greedy: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: Optional[int] = None

    def validate(self) -> None:
        if not self.greedy and self.temperature <= 0:
            raise ValueError(f"--temperature must be > 0 (got {self.temperature}); use --greedy for argmax")
        if self.top_k < 0:
            raise ValueError(f"--top-k must be >= 0 (0 disables it), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"--top-p must lie in (0, 1], got {self.top_p}")


@dataclass
class GenerationResult:
    tokens: List[List[int]]                      # generated ids per prompt (EOS included if hit)
    critical_s: List[float] = field(default_factory=list)   # per decode step
    idle_s: List[float] = field(default_factory=list)       # deferred coarse work per step
    prefill_s: float = 0.0


def sample_next(logits: torch.Tensor, sampling: SamplingConfig,
                generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """logits [b, V] -> token ids [b] (greedy, or temperature / top-k / top-p sampling)."""
    logits = logits.float()
    if sampling.greedy:
        return logits.argmax(dim=-1)
    logits = logits / sampling.temperature
    if sampling.top_k > 0:
        k = min(sampling.top_k, logits.shape[-1])
        kth = logits.topk(k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cumulative - sorted_logits.softmax(dim=-1) >= sampling.top_p  # keep the top-1 always
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(-1).to(logits.device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def generate(model, prompts: Sequence[Sequence[int]], max_new_tokens: int,
             sampling: Optional[SamplingConfig] = None, eos_token_id: Optional[int] = None,
             coarse_schedule: str = "inline") -> GenerationResult:
    """Decode ``max_new_tokens`` after each prompt with the chunk-triggered cache (Algorithm 2)."""
    sampling = sampling or SamplingConfig(greedy=True)
    sampling.validate()
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    vocab = model.config.vocab_size
    bad = [t for p in prompts for t in p if not 0 <= int(t) < vocab]
    if bad:
        raise ValueError(f"token id {bad[0]} is outside the model's vocabulary [0, {vocab})")
    device = next(model.parameters()).device
    generator = None
    if sampling.seed is not None:
        generator = torch.Generator().manual_seed(sampling.seed)
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for row, prompt in enumerate(prompts):  # right padding; rows keep their own positions
        ids[row, : len(prompt)] = torch.tensor([int(t) for t in prompt])
        mask[row, : len(prompt)] = 1
    ids, mask = ids.to(device), mask.to(device)
    cache = model.new_cache(coarse_schedule, max_length=width + max_new_tokens)
    result = GenerationResult(tokens=[[] for _ in prompts])
    start = time.perf_counter()
    logits = model(ids, attention_mask=mask, past_key_values=cache, use_cache=True).logits
    last = torch.tensor([len(p) - 1 for p in prompts], device=device)
    logits = logits[torch.arange(len(prompts), device=device), last]
    _sync(device)
    result.prefill_s = time.perf_counter() - start
    finished = [False] * len(prompts)
    try:
        for step in range(max_new_tokens):
            token = sample_next(logits, sampling, generator)
            for row, value in enumerate(token.tolist()):
                if not finished[row]:
                    result.tokens[row].append(value)
                    finished[row] = eos_token_id is not None and value == eos_token_id
            if all(finished) or step == max_new_tokens - 1:
                break
            start = time.perf_counter()
            cache.run_deferred()  # idle slot: the token is out, the next one has not arrived
            result.idle_s.append(time.perf_counter() - start)
            start = time.perf_counter()
            logits = model(token[:, None], past_key_values=cache, use_cache=True).logits[:, -1]
            _sync(device)
            result.critical_s.append(time.perf_counter() - start)
    finally:
        cache.close()
    return result
