"""Decoding state of SpiralFormer's Algorithm 2 (self-contained: torch + transformers only).

Copied verbatim into every export next to ``modeling_spiral.py``, which runs the equations;
this file holds what persists between calls: per-(block, iteration, layer) KV caches, the chunk
buffers B^(t), every compressed latent zhat^(t)_j with its allocation beta^(t)_j, per-row
positions, and the queue of deferred coarse work (App. E, no-overlap regime); and the calling
conventions of ``forward`` around them (padding -> per-row positions, position checks, argument
names of the installed transformers, torch.compile marks).
"""

from __future__ import annotations

import collections
from concurrent.futures import ThreadPoolExecutor
from typing import List, Optional

import torch
import torch.nn.functional as F
from transformers.cache_utils import Cache

from .configuration_spiral import SpiralFormerConfig


class _Span:
    """New tokens of one call: row b gets positions start[b] .. start[b] + count[b] - 1 in slots
    0..count[b]-1 of a width-K block (slots past count[b] are padding, computed and discarded)."""

    def __init__(self, start: List[int], count: List[int], width: int, device) -> None:
        self.start, self.count, self.width = list(start), list(count), width
        self.end = max(start) + width
        self.fresh = all(p == 0 for p in start)
        self.uniform = len(set(start)) == 1 and all(c == width for c in count)
        slot = torch.arange(width, device=device)
        self.start_t = torch.tensor(start, device=device)
        self.positions = self.start_t[:, None] + slot
        self.valid = slot[None] < torch.tensor(count, device=device)[:, None]
        self.rows = torch.arange(len(start), device=device)[:, None]
        self._mask = None

    def key_mask(self) -> Optional[torch.Tensor]:
        if self.uniform and self.width == 1:
            return None
        if self._mask is None:
            keys = torch.arange(self.end, device=self.positions.device)
            self._mask = (keys[None, None, :] <= self.positions[:, :, None]).unsqueeze(1)
        return self._mask


class _KV:
    """K/V of one attention layer, [b, heads, capacity, head_dim], indexed by absolute position."""

    def __init__(self, hint: int = 0) -> None:
        self.k = self.v = None
        self.hint = hint  # expected final length: allocate it at once (no growth spikes)

    def _reserve(self, like: torch.Tensor, need: int) -> None:
        cap = 0 if self.k is None else self.k.shape[2]
        if need <= cap:
            return
        b, h, _, hd = like.shape
        new_cap = self.hint if self.hint >= need else max(need, 2 * cap, 64)
        k, v = (like.new_zeros(b, h, new_cap, hd) for _ in range(2))
        if cap:
            k[:, :, :cap], v[:, :, :cap] = self.k, self.v
        self.k, self.v = k, v

    def update(self, k, v, span: _Span):
        """Write the new keys/values at their absolute positions; returns what the new queries
        attend over: (keys, values, boolean mask or None, causal)."""
        self._reserve(k, span.end)
        if span.uniform:
            p = span.start[0]
            self.k[:, :, p:p + span.width], self.v[:, :, p:p + span.width] = k, v
        else:
            self.k[span.rows, :, span.positions] = k.transpose(1, 2)
            self.v[span.rows, :, span.positions] = v.transpose(1, 2)
        if span.fresh:  # empty cache: plain causal attention over the new block
            return k, v, None, True
        return self.k[:, :, :span.end], self.v[:, :, :span.end], span.key_mask(), False

    def map_batch(self, fn) -> None:
        if self.k is not None:
            self.k, self.v = fn(self.k), fn(self.v)


_SIDE_STREAMS = {}


def _run_job(fn, event=None, device=None) -> None:
    """Run queued coarse work; on CUDA on a side stream ordered after the producer (``event``)."""
    with torch.no_grad():
        if event is None:
            fn()
            return
        with torch.cuda.device(device):
            stream = _SIDE_STREAMS.get(device)
            if stream is None:
                stream = _SIDE_STREAMS[device] = torch.cuda.Stream(device=device)
            stream.wait_event(event)
            with torch.cuda.stream(stream):
                fn()
            stream.synchronize()


class SpiralCache(Cache):
    """Decoding state of Algorithm 2 for a batch of rows with independent positions.

    Per block and layer: KV caches of the pre and post stacks (``pre[n]``, ``post[n]``) and one KV
    cache per loop iteration and core layer (``core[t][n]``: the compressed sequence of iteration
    t). Per iteration t: the chunk buffer B^(t) (``ring[t]``, the last g_t states h^(t), slot =
    position mod g_t), every compressed latent zhat^(t)_j so far (``latents[t]``) and its
    allocation beta^(t)_j (``allocations[t]``, router up-scaling). ``lengths[b]`` counts row b's
    real tokens; ``get_seq_length()`` counts input columns (HF's notion, padding included).
    """

    is_compileable = False
    # Assisted / prompt-lookup decoding rolls rejected draft tokens back with crop(); the chunk
    # buffers B^(t) keep only the last g_t states, so a rollback cannot be undone exactly.
    is_croppable = False

    def __init__(self, config: SpiralFormerConfig, coarse_schedule: Optional[str] = None,
                 max_length: Optional[int] = None) -> None:
        try:
            super().__init__(layers=[])
        except TypeError:  # transformers < 4.56
            super().__init__()
        self.config = config
        self.coarse_schedule = coarse_schedule or config.decode_coarse_schedule
        if self.coarse_schedule not in ("inline", "deferred", "background"):
            raise ValueError(f"coarse_schedule={self.coarse_schedule!r}: use inline, deferred or background")
        iters = config.num_iterations
        self.lengths: Optional[List[int]] = None
        self.seen_tokens = 0
        self.max_length = max_length or 0  # optional capacity hint (prompt + new tokens)
        self.latent_hints = [(self.max_length + o) // g + 1 if max_length else 0
                             for g, o in zip(config.chunk_sizes, config.chunk_offsets)]
        self.pre = [_KV(self.max_length) for _ in range(config.num_pre_layers)]
        self.core = [[_KV(self.latent_hints[t]) for _ in range(config.num_loop_layers)] for t in range(iters)]
        self.post = [_KV(self.max_length) for _ in range(config.num_post_layers)]
        self.ring: List[Optional[torch.Tensor]] = [None] * iters
        self.latents: List[Optional[torch.Tensor]] = [None] * iters
        self.allocations: List[Optional[torch.Tensor]] = [None] * iters
        self.coarse_passes = [0] * iters  # chunk computations run so far (for tests / stats)
        self._pending = [collections.deque() for _ in range(iters)]
        self._executor: Optional[ThreadPoolExecutor] = None

    # ------------------------------------------------------------ HF Cache interface
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    def get_max_cache_shape(self, layer_idx: int = 0):
        return None

    def get_mask_sizes(self, *args, **kwargs):
        raise NotImplementedError("SpiralCache builds its own masks")

    def __len__(self) -> int:
        return self.config.num_hidden_layers

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map_batch(lambda x: x.index_select(0, beam_idx.to(x.device)), beam_idx.tolist())

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.reorder_cache(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        index = torch.arange(len(self.lengths or [])).repeat_interleave(repeats)
        self.reorder_cache(index)

    def crop(self, max_length: int) -> None:
        raise NotImplementedError(
            "SpiralCache cannot be cropped: its chunk buffers B^(t) hold only the last g_t states, so "
            "rejected tokens cannot be rolled back. Assisted and prompt-lookup decoding need "
            "Cache.crop(); use greedy, sampling or beam search instead.")

    def _map_batch(self, fn, rows: List[int]) -> None:
        self.drain()
        for kv in self.pre + self.post + [kv for per_t in self.core for kv in per_t]:
            kv.map_batch(fn)
        for store in (self.ring, self.latents, self.allocations):
            for t, x in enumerate(store):
                if x is not None:
                    store[t] = fn(x)
        if self.lengths is not None:
            self.lengths = [self.lengths[r] for r in rows]

    # ------------------------------------------------------------ latent store
    def reserve_latents(self, t: int, like: torch.Tensor, need: int, g: int, router: bool) -> None:
        z = self.latents[t]
        cap = 0 if z is None else z.shape[1]
        if need <= cap:
            return
        self.drain(t)  # a queued job may hold the old tensors
        b, d = like.shape[0], like.shape[-1]
        hint = self.latent_hints[t]
        new_cap = hint if hint >= need else max(need, 2 * cap, 16)
        new_z = like.new_zeros(b, new_cap, d)
        new_a = like.new_zeros(b, new_cap, g) if router else None
        if cap:
            new_z[:, :cap] = z
            if router:
                new_a[:, :cap] = self.allocations[t]
        self.latents[t], self.allocations[t] = new_z, new_a

    def store_latents(self, t: int, zhat: torch.Tensor, beta: Optional[torch.Tensor], span: _Span) -> None:
        self.latents[t][span.rows, span.positions] = zhat
        if beta is not None:
            self.allocations[t][span.rows, span.positions] = beta
        self.coarse_passes[t] += 1

    # ------------------------------------------------------------ coarse-work scheduling (App. E)
    def submit(self, t: int, job, first_chunk: int) -> None:
        """Queue the coarse work of a closed chunk (first read by a later position)."""
        future = None
        if self.coarse_schedule == "background":
            if self._executor is None:
                self._executor = ThreadPoolExecutor(1, thread_name_prefix="spiral-coarse")
            event, device = None, self.latents[t].device
            if device.type == "cuda":
                event = torch.cuda.Event()
                event.record(torch.cuda.current_stream(device))
            future = self._executor.submit(_run_job, job, event, device)
        self._pending[t].append((first_chunk, job, future))

    def wait(self, t: int, needed_chunk: int) -> None:
        """Make zhat^(t)_j available for every j <= needed_chunk (FIFO per iteration)."""
        queue = self._pending[t]
        while queue and queue[0][0] <= needed_chunk:
            _, job, future = queue.popleft()
            if future is not None:
                future.result()
            else:
                _run_job(job)

    def drain(self, t: Optional[int] = None) -> None:
        for it in ([t] if t is not None else range(len(self._pending))):
            self.wait(it, float("inf"))

    def run_deferred(self) -> None:
        """Run all queued coarse work now (call it in an idle slot, e.g. after sampling)."""
        self.drain()

    @property
    def has_pending(self) -> bool:
        return any(self._pending)

    def close(self) -> None:
        self.drain()
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None


# ============================================================================ calling conventions
def compact_rows(embeds: torch.Tensor, attention_mask: Optional[torch.Tensor]):
    """Move each row's real columns (mask 1) to the front, keeping their order: [b, K, d] ->
    (compacted [b, K, d], real counts per row, boolean mask or None when every column is real)."""
    width = embeds.shape[1]
    if attention_mask is None:
        return embeds, [width] * embeds.shape[0], None
    if attention_mask.dim() != 2 or attention_mask.shape[1] < width:
        raise ValueError(f"attention_mask must be [batch, columns] covering the {width} new columns, "
                         f"got shape {tuple(attention_mask.shape)}")
    mask = attention_mask[:, -width:].to(device=embeds.device) != 0
    counts = mask.sum(dim=1).tolist()
    if all(c == width for c in counts):
        return embeds, counts, None
    order = torch.sort((~mask).to(torch.int8), dim=1, stable=True).indices
    return embeds.gather(1, order[..., None].expand(-1, -1, embeds.shape[-1])), counts, mask


def uncompact_rows(hidden: torch.Tensor, counts: List[int], mask: Optional[torch.Tensor]) -> torch.Tensor:
    """Inverse of :func:`compact_rows`. A padding column repeats the state of the nearest real column
    on its left (on its right for leading padding), so its logits are those of a real token (zeros
    would make token 0 the argmax of every pad column); a row without real columns gets zeros."""
    if mask is None:
        return hidden
    slot = (mask.long().cumsum(dim=1) - 1).clamp(min=0)  # real: own slot; pad: last real before it
    out = hidden.gather(1, slot[..., None].expand(-1, -1, hidden.shape[-1]))
    empty = torch.tensor([c == 0 for c in counts], device=hidden.device)[:, None, None]
    return torch.where(empty, torch.zeros_like(out), out)


def check_positions(position_ids, cache_position, mask, width: int, starts: Optional[List[int]], seen: int) -> None:
    """SpiralFormer's chunks depend on absolute positions, so it numbers each row's real tokens
    0, 1, 2, ... itself (continuing the cache). ``position_ids`` / ``cache_position`` are accepted
    when they say the same thing and refused otherwise (never silently overridden)."""
    if cache_position is not None:
        want = torch.arange(seen, seen + width, device=cache_position.device)
        if cache_position.shape[-1] != width or not torch.equal(cache_position.reshape(-1)[-width:], want):
            raise ValueError(f"cache_position must be {seen}..{seen + width - 1} (the cache holds {seen} columns)")
    if position_ids is None:
        return
    device = position_ids.device
    real = torch.ones(1, width, dtype=torch.bool, device=device) if mask is None else mask.to(device)
    offsets = torch.tensor(starts if starts is not None else [0], device=device)[:, None]
    want = offsets + real.long().cumsum(dim=1) - 1
    given = position_ids[:, -width:].to(device)
    if given.shape[0] == 1:
        given = given.expand_as(want)
    real = real.expand_as(want)
    if given.shape != want.shape or not torch.equal(given[real], want[real]):
        raise ValueError("position_ids must number each row's real tokens 0, 1, 2, ... continuing the cache "
                         "(SpiralFormer's chunk schedule depends on absolute positions; skip padding with "
                         "attention_mask instead); omit position_ids to let the model number them")


@torch.compiler.disable
def mark_sequence_dynamic(*tensors) -> list:
    """Under torch.compile, aliases of ``tensors`` with dim 1 (sequence) marked dynamic, so that a
    new length does not compile a new graph. Dynamo refuses mark_dynamic inside traced code, so this
    runs outside the graph (a graph break at the top of forward) and the rest of forward is traced
    with the marks; marking aliases leaves the caller's tensors as they were (marking them would
    flip a guard and recompile on the next identical call)."""
    out = []
    for tensor in tensors:
        if tensor is not None and tensor.dim() >= 2:
            tensor = tensor.view(tensor.shape)
            torch._dynamo.maybe_mark_dynamic(tensor, 1)
        out.append(tensor)
    return out


def take_cache_alias(cache, kwargs: dict):
    """``past_key_values`` (transformers < 5.24's name, still used by older callers) -> ``cache``."""
    if "past_key_values" in kwargs:
        old = kwargs.pop("past_key_values")
        if cache is not None and old is not None:
            raise ValueError("pass the cache once, as cache=... (past_key_values is its old name)")
        cache = old if cache is None else cache
    return cache


def reject_unknown_kwargs(kwargs: dict) -> None:
    """No argument is silently dropped: a misspelt or unsupported one is an error."""
    if kwargs:
        raise TypeError(f"SpiralFormer forward() got unsupported arguments {sorted(kwargs)}; it takes "
                        "input_ids / inputs_embeds, attention_mask, cache (or past_key_values), position_ids, "
                        "use_cache, labels, num_items_in_batch, logits_to_keep, output_hidden_states, return_dict")


# ============================================================================ attention
# Both implementations take the keys/values (and boolean mask) that _KV.update returns.
def sdpa_attention(q, k, v, mask: Optional[torch.Tensor], causal: bool, scale: float,
                   dropout: float = 0.0) -> torch.Tensor:
    """softmax(q k^T * scale) v by torch's fused kernel; ``mask`` is boolean (True = attend)."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale,
                                          dropout_p=dropout)


def eager_attention(q, k, v, mask: Optional[torch.Tensor], causal: bool, scale: float,
                    dropout: float = 0.0) -> torch.Tensor:
    """The same attention written out (attn_implementation="eager"); softmax in fp32."""
    scores = torch.matmul(q, k.transpose(-1, -2)).float() * scale
    if causal:  # top-left aligned, as SDPA's is_causal (only used when queries == keys)
        mask = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(v.dtype)
    return torch.matmul(F.dropout(probs, dropout) if dropout else probs, v)


ATTENTION_FUNCTIONS = {"eager": eager_attention, "sdpa": sdpa_attention}
