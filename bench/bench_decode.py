#!/usr/bin/env python
"""Decode throughput and per-token latency of SpiralFormer's chunk-triggered cache (Algorithm 2).

Prints (not a timed test):
  1. tokens/s with the cache vs recomputing the full sequence per token (logits of the last
     position only), at each --contexts length, and the speed-up;
  2. per-token latency distribution (median, p99, max, max/median) under chunk_offset=half vs
     zero: the half offset interleaves the chunk closings of the resolutions (App. D);
  3. the no-overlap regime (shift=parallel, App. E): per-token critical-path latency with the
     coarse work inline vs deferred to the idle slot after sampling vs in a background thread.

Example (the figures in docs/huggingface.md, "Decode benchmark"):
  python bench/bench_decode.py --hidden-size 256 --heads 4 --layout "2+4x{1/8,1/4,1/2,1}+2"
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from megatron_spiral.hf.configuration_spiral import SpiralFormerConfig
from megatron_spiral.hf.modeling_spiral import SpiralFormerForCausalLM


def build(args, **overrides) -> SpiralFormerForCausalLM:
    torch.manual_seed(0)
    kwargs = dict(layout=args.layout, hidden_size=args.hidden_size, num_attention_heads=args.heads,
                  vocab_size=args.vocab_size, max_position_embeddings=max(args.contexts) + args.tokens)
    kwargs.update(overrides)
    model = SpiralFormerForCausalLM(SpiralFormerConfig(**kwargs)).eval()
    return model.to(device=args.device, dtype=args.dtype)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@torch.no_grad()
def decode_latencies(model, context: int, tokens: int, device: str, schedule: str = "inline"):
    """Per-token critical-path seconds of ``tokens`` greedy steps after a ``context`` prefill,
    and the seconds of deferred coarse work run in the idle slot after each step."""
    gen = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, model.config.vocab_size, (1, context), generator=gen).to(device)
    cache = model.new_cache(schedule, max_length=context + tokens + 1)
    logits = model(prompt, past_key_values=cache, use_cache=True, logits_to_keep=1).logits
    critical, idle = [], []
    for _ in range(tokens):
        token = logits[:, -1].argmax(-1, keepdim=True)
        start = time.perf_counter()
        cache.run_deferred()  # idle slot (no-op unless coarse work was deferred)
        sync(device)
        idle.append(time.perf_counter() - start)
        start = time.perf_counter()
        logits = model(token, past_key_values=cache, use_cache=True).logits
        sync(device)
        critical.append(time.perf_counter() - start)
    cache.close()
    return critical, idle


@torch.no_grad()
def recompute_latency(model, context: int, steps: int, device: str) -> float:
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (1, context), generator=gen).to(device)
    model(ids, use_cache=False, logits_to_keep=1)  # warm-up
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        logits = model(ids, use_cache=False, logits_to_keep=1).logits
        sync(device)
        times.append(time.perf_counter() - start)
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return statistics.median(times)


def describe(seconds, label: str) -> str:
    ordered = sorted(seconds)
    median = statistics.median(ordered)
    p99 = ordered[min(len(ordered) - 1, int(round(0.99 * (len(ordered) - 1))))]
    return (f"{label:<34} median {median * 1e3:7.2f} ms  p99 {p99 * 1e3:7.2f} ms  "
            f"max {ordered[-1] * 1e3:7.2f} ms  max/median {ordered[-1] / median:5.2f}")


def per_position_min(runs):
    """Element-wise min over repeated runs: removes scheduler noise, keeps the periodic pattern."""
    return [min(values) for values in zip(*runs)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layout", default="2+4x{1/8,1/4,1/2,1}+2")
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocab-size", type=int, default=50277, help="GPT-NeoX's by default")
    parser.add_argument("--contexts", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--tokens", type=int, default=128, help="decode steps per measurement")
    parser.add_argument("--recompute-steps", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3, help="runs for the per-position-min latency")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (1 gives stable figures on a shared, loaded machine)")
    args = parser.parse_args(argv)
    args.dtype = getattr(torch, args.dtype)  # argparse choices: float32, bfloat16
    if args.threads:
        torch.set_num_threads(args.threads)
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU ({torch.get_num_threads()} threads)"
    print(f"# SpiralFormer decode benchmark: layout {args.layout}, d={args.hidden_size}, "
          f"heads={args.heads}, vocab={args.vocab_size}, {args.dtype}, {device_name}, torch {torch.__version__}")

    print("\n## 1. cached decode vs full recompute (offset half, shift overlap)")
    model = build(args)
    for context in args.contexts:
        cached, _ = decode_latencies(model, context, args.tokens, args.device)
        cached_s = statistics.median(cached)
        recompute_s = recompute_latency(model, context, args.recompute_steps, args.device)
        print(f"context {context:5d}: cached {1 / cached_s:8.1f} tok/s ({cached_s * 1e3:.2f} ms/token)  "
              f"recompute {1 / recompute_s:7.1f} tok/s ({recompute_s * 1e3:.1f} ms/token)  "
              f"speed-up {recompute_s / cached_s:6.1f}x")

    context = args.contexts[0]
    print(f"\n## 2. per-token latency after a {context}-token prompt, {args.tokens} steps")
    for offset in ("half", "zero"):
        model = build(args, chunk_offset=offset)
        runs = [decode_latencies(model, context, args.tokens, args.device)[0] for _ in range(args.repeats)]
        print(describe(runs[0], f"offset={offset} (one run)"))
        print(describe(per_position_min(runs), f"offset={offset} (min of {args.repeats} runs)"))

    print("\n## 3. no-overlap regime (shift=parallel): critical path vs coarse-work schedule")
    model = build(args, shift="parallel")
    for schedule in ("inline", "deferred", "background"):
        runs = [decode_latencies(model, context, args.tokens, args.device, schedule) for _ in range(args.repeats)]
        critical = per_position_min([r[0] for r in runs])
        idle = per_position_min([r[1] for r in runs])
        print(describe(critical, f"{schedule:<10} critical path") +
              f"  idle-slot work median {statistics.median(idle) * 1e3:.2f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
