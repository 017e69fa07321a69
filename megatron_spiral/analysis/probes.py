"""Attention probes of the loop-shared core (paper §4.1, App. I): key-marginal entropy and Local
Attention Mass per (loop iteration t, core layer l, head h), at each loop's native length L_t.

Definitions (A = one head's causal attention matrix at loop t, shape [L_t, L_t], rows sum to 1):

    p(k)  = (1/L_t) sum_q A(q, k), renormalised             key-marginal distribution
    H     = -sum_k p(k) log p(k) / log L_t   in [0, 1]        normalised key-marginal entropy
    M_t   = ceil(gamma * r_t), gamma = 32                    window size (eq. 23)
    W_t(q)= {k : q - M_t <= k < q}                           causal local window (excludes q)
    LAM   = (1/L_t) sum_q sum_{k in W_t(q)} A(q, k)          Local Attention Mass

Protocol (§4.2 / App. I.1): each head's metric is averaged over the samples first; cross-loop
ranges Delta m_{l,h} = max_t m - min_t m are taken on those averages; *dynamic heads* are the top
40% of heads of the core by Delta m, selected separately per metric.

Everything here but :func:`probe_model` is pure arithmetic on tensors / arrays, so the metrics can
be checked on hand-made matrices. The command-line front end is ``tools/probe_attention.py``;
figures are drawn by :mod:`megatron_spiral.analysis.probe_plots`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch

GAMMA = 32
DYNAMIC_FRACTION = 0.4
METRICS = ("entropy", "lam")
METRIC_LABELS = {"entropy": "key-marginal entropy H", "lam": "Local Attention Mass (LAM)"}


class ProbeError(RuntimeError):
    """The probe cannot run as asked (checkpoint, dataset or model); the message says why."""


# ----------------------------------------------------------------------------- metrics (§4.1)
def key_marginal_entropy(attention: torch.Tensor) -> torch.Tensor:
    """Normalised entropy of the key-marginal distribution, §4.1.

    ``attention`` [..., L, L] (queries x keys) -> [...]. p(k) is the query-average of the
    attention column k, renormalised to sum to 1; the entropy (0 log 0 = 0) is divided by log L.
    A one-key sequence (L = 1) has no spread to measure and gets 0.
    """
    length = attention.shape[-1]
    if attention.shape[-2] != length:
        raise ValueError(f"attention must be square [..., L, L], got {tuple(attention.shape)}")
    if length < 2:
        return attention.new_zeros(attention.shape[:-2], dtype=torch.float32)
    marginal = attention.float().mean(dim=-2)
    marginal = marginal / marginal.sum(dim=-1, keepdim=True)
    entropy = -torch.special.xlogy(marginal, marginal).sum(dim=-1)
    return entropy / math.log(length)


def lam_window(resolution, gamma: int = GAMMA) -> int:
    """M_t = ceil(gamma * r_t) (eq. 23); exact for fractional r_t such as 1/8."""
    return math.ceil(Fraction(resolution) * gamma)


def local_attention_mass(attention: torch.Tensor, window: int) -> torch.Tensor:
    """LAM, §4.1: mean over queries q of the mass on keys q - M <= k < q (``window`` = M).

    ``attention`` [..., L, L] -> [...]. The query itself (k = q) is outside the window, and
    queries near the start have truncated windows (q = 0 contributes 0), as defined.
    """
    length = attention.shape[-1]
    if attention.shape[-2] != length:
        raise ValueError(f"attention must be square [..., L, L], got {tuple(attention.shape)}")
    if window < 1:
        raise ValueError(f"LAM window must be >= 1, got {window}")
    mass = attention.new_zeros(attention.shape[:-2], dtype=torch.float32)
    for distance in range(1, min(window, length - 1) + 1):
        # diagonal(offset=-d) holds A(q, q - d) for q = d .. L-1
        mass = mass + torch.diagonal(attention, offset=-distance, dim1=-2, dim2=-1).float().sum(-1)
    return mass / length


# ----------------------------------------------------------------------------- head statistics
def cross_loop_range(values: np.ndarray) -> np.ndarray:
    """Delta m_{l,h} = max_t m^(t)_{l,h} - min_t m^(t)_{l,h}; ``values`` [T, layers, heads]."""
    values = np.asarray(values, dtype=np.float64)
    return values.max(axis=0) - values.min(axis=0)


def num_dynamic(total_heads: int, fraction: float = DYNAMIC_FRACTION) -> int:
    """How many heads form the top ``fraction`` (rounded half up, at least one)."""
    return max(1, min(total_heads, int(math.floor(fraction * total_heads + 0.5))))


def dynamic_heads(ranges: np.ndarray, fraction: float = DYNAMIC_FRACTION) -> List[Tuple[int, int]]:
    """(layer, head) of the top ``fraction`` of heads by cross-loop range, largest first.

    ``ranges`` [layers, heads]. Ties keep (layer, head) order, so the selection is deterministic.
    Non-finite ranges rank last.
    """
    ranges = np.asarray(ranges, dtype=np.float64)
    flat = np.where(np.isfinite(ranges), ranges, -np.inf).ravel()
    order = np.argsort(-flat, kind="stable")[: num_dynamic(flat.size, fraction)]
    heads = ranges.shape[1]
    return [(int(i // heads), int(i % heads)) for i in order]


def normalize_heatmap(values: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Min-max normalisation to [0, 1] over all cells (App. I.1, Fig. 5); all zeros when the
    range is negligible or any value is non-finite."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0 or not np.all(np.isfinite(values)):
        return np.zeros_like(values)
    low, high = values.min(), values.max()
    if high - low <= eps * max(1.0, abs(high), abs(low)):
        return np.zeros_like(values)
    return (values - low) / (high - low)


def _five_numbers(values: np.ndarray) -> Dict[str, float]:
    values = np.asarray(values, dtype=np.float64)
    q1, median, q3 = np.percentile(values, [25, 50, 75])
    return {"mean": float(values.mean()), "median": float(median), "q1": float(q1),
            "q3": float(q3), "min": float(values.min()), "max": float(values.max())}


def summarize_metric(values: np.ndarray, fraction: float = DYNAMIC_FRACTION) -> dict:
    """Per-metric summary of sample-averaged head values ``values`` [T, layers, heads]."""
    values = np.asarray(values, dtype=np.float64)
    ranges = cross_loop_range(values)
    dynamic = dynamic_heads(ranges, fraction)
    rows = np.array([l for l, _ in dynamic]), np.array([h for _, h in dynamic])
    per_loop_all = [_five_numbers(values[t].ravel()) for t in range(values.shape[0])]
    per_loop_dynamic = [_five_numbers(values[t][rows]) for t in range(values.shape[0])]
    return {
        "values": values.tolist(),
        "range": ranges.tolist(),
        "range_normalized": normalize_heatmap(ranges).tolist(),
        "dynamic_heads": [list(head) for head in dynamic],
        "per_loop_all": per_loop_all,
        "per_loop_dynamic": per_loop_dynamic,
    }


# ----------------------------------------------------------------------------- accumulation
@dataclass
class LoopInfo:
    """One loop iteration as the probe sees it."""

    t: int
    resolution: Fraction
    chunk_size: int
    length: int      # L_t at the probe's sequence length
    window: int      # M_t

    def to_dict(self) -> dict:
        return {"t": self.t, "resolution": str(self.resolution), "chunk_size": self.chunk_size,
                "length": self.length, "window": self.window}


@dataclass
class ProbeAccumulator:
    """Running per-(t, layer, head) sums of each metric over samples (float64)."""

    num_loops: int
    num_layers: int
    num_heads: int
    sums: Dict[str, np.ndarray] = field(default_factory=dict)
    squares: Dict[str, np.ndarray] = field(default_factory=dict)
    counts: np.ndarray = None

    def __post_init__(self) -> None:
        shape = (self.num_loops, self.num_layers, self.num_heads)
        for name in METRICS:
            self.sums[name] = np.zeros(shape)
            self.squares[name] = np.zeros(shape)
        self.counts = np.zeros(shape[:2], dtype=np.int64)

    def add(self, t: int, layer: int, metrics: Dict[str, torch.Tensor]) -> None:
        """``metrics[name]`` [batch, heads] for one call of core layer ``layer`` at loop ``t``."""
        batch = None
        for name in METRICS:
            value = metrics[name].detach().double().cpu().numpy()
            batch = value.shape[0]
            self.sums[name][t, layer] += value.sum(axis=0)
            self.squares[name][t, layer] += (value ** 2).sum(axis=0)
        self.counts[t, layer] += batch

    def means(self) -> Dict[str, np.ndarray]:
        if (self.counts == 0).any():
            missing = [(int(t), int(l)) for t, l in zip(*np.nonzero(self.counts == 0))]
            raise ProbeError(f"no attention was recorded for (loop, layer) {missing[:4]}...")
        return {name: self.sums[name] / self.counts[..., None] for name in METRICS}

    def stds(self) -> Dict[str, np.ndarray]:
        out = {}
        for name, mean in self.means().items():
            var = self.squares[name] / self.counts[..., None] - mean ** 2
            out[name] = np.sqrt(np.clip(var, 0.0, None))
        return out


# ----------------------------------------------------------------------------- the model side
def core_attention_modules(spiral_block) -> List[torch.nn.Module]:
    """The core attention module of every layer of the loop-shared core, in layer order."""
    if getattr(spiral_block, "core", None) is None or spiral_block.topology is None:
        raise ProbeError("the model has no loop-shared core (a non-looped layout such as '12'); "
                         "the probes compare loop iterations of a SpiralFormer or LoopedFormer")
    modules = []
    for layer in spiral_block.core.layers:
        core_attention = layer.self_attention.core_attention
        if not hasattr(core_attention, "attention_recorder"):
            raise ProbeError(
                f"{type(core_attention).__name__} cannot expose attention probabilities; build "
                "the model with transformer_impl='local' (the probe tool does this)")
        modules.append(core_attention)
    return modules


def loop_infos(config, seq_length: int, gamma: int = GAMMA) -> List[LoopInfo]:
    from megatron_spiral.model.chunking import num_chunks

    return [LoopInfo(t, r, g, num_chunks(seq_length, g, omega), lam_window(r, gamma))
            for t, (r, g, omega) in enumerate(zip(config.resolutions, config.chunk_sizes,
                                                    config.chunk_offsets))]


class CoreAttentionRecorder:
    """Installs ``attention_recorder`` callables on the core's attention modules and turns each
    call into per-head metrics. Core layer l's k-th call in a forward pass is loop iteration
    ``active[k]`` (iterations whose L_t = 0 skip the core); its length must equal L_t."""

    def __init__(self, modules: Sequence[torch.nn.Module], loops: Sequence[LoopInfo],
                 accumulator: ProbeAccumulator) -> None:
        self.modules = list(modules)
        self.loops = list(loops)
        self.active = [info.t for info in loops if info.length > 0]
        self.accumulator = accumulator
        self.calls = [0] * len(self.modules)

    def __enter__(self) -> "CoreAttentionRecorder":
        for layer, module in enumerate(self.modules):
            module.attention_recorder = self._make_hook(layer)
        return self

    def __exit__(self, *exc) -> None:
        for module in self.modules:
            module.attention_recorder = None

    def start_forward(self) -> None:
        self.calls = [0] * len(self.modules)

    def finish_forward(self) -> None:
        expected = len(self.active)
        if any(count != expected for count in self.calls):
            raise ProbeError(f"core layers were called {self.calls} times in one forward pass; "
                             f"expected {expected} (one per loop iteration)")

    def _make_hook(self, layer: int) -> Callable[[torch.Tensor], None]:
        def hook(probs: torch.Tensor) -> None:
            call = self.calls[layer]
            if call >= len(self.active):
                raise ProbeError(f"core layer {layer} was called more often than there are loops")
            info = self.loops[self.active[call]]
            if probs.shape[-1] != info.length:
                raise ProbeError(
                    f"core layer {layer}, loop {info.t}: attention over {probs.shape[-1]} keys, "
                    f"expected L_t = {info.length}")
            self.calls[layer] = call + 1
            self.accumulator.add(info.t, layer, {
                "entropy": key_marginal_entropy(probs),
                "lam": local_attention_mass(probs, info.window),
            })
        return hook


@torch.no_grad()
def probe_model(model, batches: Iterable[torch.Tensor], seq_length: int, gamma: int = GAMMA,
                progress: Optional[Callable[[int], None]] = None) -> Tuple[List[LoopInfo], ProbeAccumulator]:
    """Run ``model`` (a SpiralLM) over ``batches`` of token ids [b, seq_length] and accumulate
    per-head metrics of the loop-shared core. ``progress(n)`` is called with each batch size."""
    block = model.gpt.decoder
    modules = core_attention_modules(block)
    loops = loop_infos(model.config, seq_length, gamma)
    if not any(info.length > 0 for info in loops):
        raise ProbeError(f"--seq-length {seq_length} is shorter than every loop's chunk; nothing to probe")
    probe_loops = [info for info in loops if info.length > 0]
    accumulator = ProbeAccumulator(len(loops), len(modules), model.config.num_attention_heads)
    was_training = model.training
    model.eval()
    try:
        with CoreAttentionRecorder(modules, loops, accumulator) as recorder:
            for batch in batches:
                recorder.start_forward()
                model(batch)
                recorder.finish_forward()
                if progress is not None:
                    progress(batch.shape[0])
    finally:
        model.train(was_training)
    if len(probe_loops) != len(loops):  # drop loops the core never ran at this length
        keep = [info.t for info in probe_loops]
        for name in METRICS:
            accumulator.sums[name] = accumulator.sums[name][keep]
            accumulator.squares[name] = accumulator.squares[name][keep]
        accumulator.counts = accumulator.counts[keep]
        accumulator.num_loops = len(keep)
    return probe_loops, accumulator


def build_report(loops: Sequence[LoopInfo], accumulator: ProbeAccumulator,
                 fraction: float = DYNAMIC_FRACTION, **meta) -> dict:
    """The JSON-serialisable result: metadata, loops and a summary per metric."""
    means, stds = accumulator.means(), accumulator.stds()
    report = dict(meta)
    report.update({
        "dynamic_fraction": fraction,
        "num_layers": accumulator.num_layers,
        "num_heads": accumulator.num_heads,
        "loops": [info.to_dict() for info in loops],
        "metrics": {},
    })
    for name in METRICS:
        summary = summarize_metric(means[name], fraction)
        summary["sample_std"] = stds[name].tolist()
        summary["label"] = METRIC_LABELS[name]
        report["metrics"][name] = summary
    return report


# ----------------------------------------------------------------------------- data
def split_range(num_documents: int, split: str, name: str) -> Tuple[int, int]:
    """[begin, end) documents of split ``name`` ('train'|'valid'|'test'|'all'), with Megatron's
    rule (the same documents pretrain_spiral.py --split uses for that split)."""
    if name == "all":
        return 0, num_documents
    from megatron.core.datasets.blended_megatron_dataset_config import (
        convert_split_vector_to_split_matrix, parse_and_normalize_split)

    names = ("train", "valid", "test")
    if name not in names:
        raise ProbeError(f"--split-name must be one of all, {', '.join(names)}; got {name!r}")
    try:
        matrix = convert_split_vector_to_split_matrix(parse_and_normalize_split(split))
    except (AssertionError, ZeroDivisionError, ValueError):
        raise ProbeError(f"cannot parse --split {split!r}; write proportions like 98,2,0") from None
    bookends = matrix[names.index(name)]
    if bookends is None:
        raise ProbeError(f"--split {split} gives the {name} split no documents")
    return (int(round(bookends[0] * num_documents)), int(round(bookends[1] * num_documents)))


class TokenWindows:
    """Samples = windows of ``seq_length`` tokens cut from the concatenated documents [begin, end)
    of a Megatron indexed dataset, ``num_samples`` of them picked at random (seeded, no repeats)
    among the non-overlapping windows, in stream order."""

    def __init__(self, prefix: str, seq_length: int, num_samples: int, seed: int = 1234,
                 split: str = "100,0,0", split_name: str = "all") -> None:
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        if not IndexedDataset.exists(prefix):
            raise ProbeError(f"no indexed dataset at {prefix!r}: expected {prefix}.bin and "
                             f"{prefix}.idx (written by tools/preprocess_data.py)")
        self.dataset = IndexedDataset(prefix)
        begin, end = split_range(len(self.dataset), split, split_name)
        self.documents = np.arange(begin, end)
        lengths = self.dataset.sequence_lengths[begin:end].astype(np.int64)
        self.starts = np.concatenate([[0], np.cumsum(lengths)])
        total = int(self.starts[-1])
        available = total // seq_length
        if available < num_samples:
            raise ProbeError(
                f"dataset {prefix} ({split_name} documents {begin}..{end}) holds {total} tokens = "
                f"{available} windows of {seq_length} tokens, fewer than --num-samples "
                f"{num_samples}; lower --num-samples or --seq-length, or probe a larger dataset")
        rng = np.random.default_rng(seed)
        self.windows = np.sort(rng.choice(available, size=num_samples, replace=False))
        self.seq_length = seq_length

    def __len__(self) -> int:
        return len(self.windows)

    def window(self, index: int) -> np.ndarray:
        start = int(self.windows[index]) * self.seq_length
        stop = start + self.seq_length
        doc = int(np.searchsorted(self.starts, start, side="right")) - 1
        pieces = []
        while start < stop:
            offset = start - int(self.starts[doc])
            take = min(stop - start, int(self.starts[doc + 1]) - start)
            if take > 0:
                pieces.append(np.asarray(self.dataset.get(int(self.documents[doc]), offset, take)))
            start += max(take, 0)
            doc += 1
        return np.concatenate(pieces).astype(np.int64)

    def batches(self, batch_size: int, device=None):
        for first in range(0, len(self), batch_size):
            rows = [self.window(i) for i in range(first, min(first + batch_size, len(self)))]
            yield torch.from_numpy(np.stack(rows)).to(device)

    def max_token(self) -> int:
        return max(int(self.window(i).max()) for i in range(len(self)))
