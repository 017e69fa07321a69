#!/usr/bin/env python
"""Training-step speed of the Pythia baseline, LoopedFormer and SpiralFormer-B/-L at one scale.

Times forward + backward (loss on every token, gradients of every parameter) of each model,
interleaved round-robin in one process (model A, B, C, D, A, B, ...) so load changes on a shared
machine hit every model alike, and reports the median over rounds. Prints per model: time per
step, tokens/s, analytic training FLOPs (megatron_spiral.analysis.accounting: 3 x forward, no
causal discount), achieved FLOP/s (and MFU on GPU), activation memory (bytes of the tensors saved
for backward, distinct storages; on GPU also the peak allocated above the weights), and the ratios
SpiralFormer / LoopedFormer and SpiralFormer-L / baseline in time and in FLOPs. The goal is that
each time ratio is within 0.03 of its FLOPs ratio: resampling, routers and MeSH must not eat the
savings of running the core on compressed sequences.

Layer allocations are the paper's Table 1 rows of --size (e.g. 160m: 12 layers; 2+4x{1,1}+2;
2+4x{1/8,1/4,1/2,1}+2; 4+4x{1/16,1/8,1/4,1/2}+4); --hidden-size / --num-attention-heads /
--seq-length shrink them for a CPU.

With --recompute MODE ... every model is also built under each activation-recompute mode (none,
selective, full, loop, loop+full; megatron_spiral/model/recompute.py) and a second table puts the
modes side by side: step time, saved-activation bytes (measured, and the memory model's
prediction) and their ratios to no recompute.

Examples:
  python bench/bench_training_speed.py                       # CPU: 160m layouts, d=256, seq 1024
  python bench/bench_training_speed.py --recompute none full loop   # recompute modes side by side
  python bench/bench_training_speed.py --size 410m --seq-length 4096 --paper-dims   # GPU, bf16
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional

from megatron_spiral.quiet import quiet_backend_warnings

quiet_backend_warnings(hide_deprecations=True)

import torch

MODELS = {  # name -> preset family (size is appended)
    "baseline": "pythia-{size}",
    "looped": "looped-{size}-{topology}",
    "spiral-b": "spiral-b-{size}-mesh",
    "spiral-l": "spiral-l-{size}-mesh",
}
LABELS = {"baseline": "Baseline (Pythia)", "looped": "LoopedFormer", "spiral-b": "SpiralFormer-B",
          "spiral-l": "SpiralFormer-L"}
# dense BF16 tensor-core peaks (FLOP/s) used for MFU; --peak-tflops overrides
PEAK_BF16 = {"H200": 989e12, "H100 SXM": 989e12, "H100 80GB HBM3": 989e12, "H100 PCIe": 756e12,
             "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}


@dataclass
class Entry:
    name: str
    preset: str
    model: torch.nn.Module
    config: object
    flops: int                      # analytic training FLOPs of one step (all sequences)
    causal_flops: int               # the same with attention scores/values counted causally (half)
    times: List[float] = field(default_factory=list)
    last_time: float = 0.0
    saved_bytes: int = 0
    peak_bytes: Optional[int] = None
    mode: str = "none"              # activation-recompute mode (--recompute)

    @property
    def median(self) -> float:
        return statistics.median(self.times)


def causal_training_flops(config, seq_length: int) -> int:
    """Training FLOPs of one sequence with attention counted as what a causal kernel computes:
    accounting.py (Table 1's convention) counts 4 l^2 d per layer call with no causal discount;
    flash-style causal kernels skip the masked half, so this subtracts 2 l^2 d per layer call."""
    from megatron_spiral.analysis.accounting import forward_flops

    forward = forward_flops(config, seq_length)
    layout, d = config.parsed_layout, config.hidden_size
    half = (layout.num_pre + layout.num_post) * 2 * seq_length ** 2 * d
    half += layout.num_loop * sum(2 * length ** 2 * d for length in forward.lengths)
    return 3 * (forward.total - half)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def train_step(model, ids: torch.Tensor) -> None:
    for param in model.parameters():
        param.grad = None
    loss = model(ids, labels=ids).float().mean()
    loss.backward()


def saved_tensor_bytes(model, ids: torch.Tensor) -> int:
    """Bytes of the distinct storages autograd saved for backward during one forward pass that
    are still alive after it (parameters excluded).

    Alive, not merely packed: megatron-core's bias-dropout-add records a graph under
    ``enable_grad`` even inside a no-grad checkpoint, which the checkpoint then frees, and a freed
    address can be reused by a later saved tensor, so a storage counts while it lives."""
    from torch.multiprocessing.reductions import StorageWeakRef

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept: Dict[int, tuple] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in params and (ptr not in kept or kept[ptr][1].expired()):
            kept[ptr] = (storage.nbytes(), StorageWeakRef(storage))
        return tensor

    for param in model.parameters():
        param.grad = None
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = model(ids, labels=ids).float().mean()
    total = sum(size for size, ref in kept.values() if not ref.expired())
    del loss
    return total


def peak_activation_bytes(model, ids: torch.Tensor) -> int:
    """GPU: peak allocated during a training step minus what was allocated before it."""
    for param in model.parameters():
        param.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    train_step(model, ids)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def _fwd_bwd_ms(fn, device: str, repeats: int) -> float:
    """Fastest of ``repeats`` forward+backward runs of ``fn() -> tensor`` (one warm-up)."""
    times = []
    for index in range(repeats + 1):
        sync(device)
        start = time.perf_counter()
        fn().float().sum().backward()
        sync(device)
        if index:
            times.append(time.perf_counter() - start)
    return min(times) * 1e3


def breakdown(entry: Entry, ids: torch.Tensor, device: str, repeats: int) -> Dict[str, float]:
    """Forward+backward milliseconds of each part of the model run in isolation on inputs of the
    step's shapes: embedding, pre/post stacks, the core at each L_t, down/up-scaling + shift of
    every iteration, the topology (MeSH routers, writes and reads), LM head + loss."""
    from megatron_spiral.model.resampling import causal_shift

    model, gpt = entry.model, entry.model.gpt
    block = gpt.decoder
    batch, length = ids.shape
    param = next(model.parameters())

    def hidden(rows: int) -> torch.Tensor:
        return torch.randn(rows, batch, entry.config.hidden_size, device=device,
                           dtype=param.dtype, requires_grad=True)

    rope = gpt.rotary_pos_emb(length)
    positions = torch.arange(length, device=device).unsqueeze(0).expand_as(ids)
    parts = {"embedding": _fwd_bwd_ms(lambda: gpt.embedding(input_ids=ids, position_ids=positions),
                                      device, repeats)}
    for name in ("pre", "post"):
        stack = getattr(block, name)
        if stack is not None:
            x = hidden(length)
            parts[f"{name} ({len(stack.layers)} layers @ {length})"] = _fwd_bwd_ms(
                lambda: stack(hidden_states=x, attention_mask=None, rotary_pos_emb=rope), device, repeats)
    if block.topology is not None:
        for t, resampler in enumerate(block.resamplers):
            rows = resampler.num_chunks(length)
            x = hidden(rows)
            parts[f"core t={t} ({len(block.core.layers)} layers @ {rows})"] = _fwd_bwd_ms(
                lambda: block.core(hidden_states=x, attention_mask=None, rotary_pos_emb=rope[:rows]),
                device, repeats)
        state = hidden(length)

        def resample():
            total = 0
            for resampler in block.resamplers:
                update = resampler.upscale(resampler.downscale(state), length)
                total = total + causal_shift(update, resampler.shift)
            return total

        def topology():
            h, carrier = block.topology.initial_state(state, state)
            for t in range(len(block.resamplers)):
                h, carrier = block.topology.update(state, h, carrier, t)
            return h

        parts["resampling (all t)"] = _fwd_bwd_ms(resample, device, repeats)
        parts[f"topology {entry.config.topology} (all t)"] = _fwd_bwd_ms(topology, device, repeats)
    x = hidden(length)

    def head():
        logits, _ = gpt.output_layer(block.final_layernorm(x))
        return gpt.compute_language_model_loss(ids, logits)

    parts["final norm + LM head + loss"] = _fwd_bwd_ms(head, device, repeats)
    return parts


def peak_flops(device: str, dtype: torch.dtype, override: Optional[float]) -> Optional[float]:
    if override:
        return override * 1e12
    if not device.startswith("cuda") or dtype != torch.bfloat16:
        return None
    name = torch.cuda.get_device_name()
    for key, value in PEAK_BF16.items():
        if key in name:
            return value
    return None


def build_entries(args, device: str, dtype: torch.dtype) -> List[Entry]:
    from megatron_spiral import build_model
    from megatron_spiral.analysis.accounting import training_flops_per_sequence
    from megatron_spiral.model.recompute import mode_config
    from megatron_spiral.presets import PRESETS

    entries = []
    for name in args.models:
        preset = MODELS[name].format(size=args.size, topology=args.topology)
        if preset not in PRESETS:
            raise SystemExit(f"no preset {preset!r} for --size {args.size}")
        overrides = dict(seq_length=args.seq_length, transformer_impl="local")
        if not args.paper_dims:
            overrides.update(hidden_size=args.hidden_size, num_attention_heads=args.num_attention_heads)
        if args.vocab_size:
            overrides["vocab_size"] = args.vocab_size
        for mode in args.recompute or ["none"]:
            # same seed: every mode of a model has the same weights
            model = build_model(preset, seed=1234, params_dtype=dtype, device=device,
                                recompute=mode_config(mode), **overrides)
            model.train()
            flops = training_flops_per_sequence(model.config, args.seq_length) * args.micro_batch_size
            causal = causal_training_flops(model.config, args.seq_length) * args.micro_batch_size
            entries.append(Entry(name, preset, model, model.config, flops, causal, mode=mode))
    return entries


def predicted_saved_bytes(entry: Entry, args, dtype: torch.dtype) -> int:
    """The memory model's activation bytes (megatron_spiral/analysis/memory.py) for this entry."""
    from megatron_spiral.analysis.memory import MemorySetup, activation_bytes
    from megatron_spiral.model.recompute import mode_config

    setup = MemorySetup(micro_batch_size=args.micro_batch_size, seq_length=args.seq_length,
                        bf16=dtype == torch.bfloat16, recompute=mode_config(entry.mode))
    return activation_bytes(entry.config, setup)


def print_recompute_table(entries: List[Entry], args, dtype: torch.dtype) -> None:
    """Recompute modes side by side per model: time and saved bytes, ratios to mode 'none'."""
    print(f"\n| {'model':17s} | {'recompute':11s} | {'ms/step':>8s} | {'time / none':>11s} | "
          f"{'saved MiB':>9s} | {'model MiB':>9s} | {'none / saved':>12s} |")
    print(f"|{'-' * 19}|{'-' * 13}|{'-' * 10}|{'-' * 13}|{'-' * 11}|{'-' * 11}|{'-' * 14}|")
    by_key = {(e.name, e.mode): e for e in entries}
    for e in entries:
        base = by_key.get((e.name, "none"))
        # same-round ratios cancel slow load drifts of a shared machine
        time_ratio = (statistics.median(x / y for x, y in zip(e.times, base.times))
                      if base else float("nan"))
        saved_ratio = base.saved_bytes / e.saved_bytes if base and e.saved_bytes else float("nan")
        print(f"| {LABELS[e.name]:17s} | {e.mode:11s} | {e.median * 1e3:8.1f} | {time_ratio:11.3f} | "
              f"{fmt_bytes(e.saved_bytes):>9s} | {fmt_bytes(predicted_saved_bytes(e, args, dtype)):>9s} | "
              f"{saved_ratio:12.2f} |")
    # the CPU goals: full >= 4x less saved memory at <= 1.4x step time; loop-aware
    # recompute at least halves SpiralFormer's saved bytes at <= 1.25x step time. The loop-aware
    # candidate per model is the fastest of loop / loop+blockN (block recompute of the pre/post
    # stacks) that halves it: SpiralFormer-L's full-length pre/post stacks outweigh its loop.
    def ratios(name, mode):
        e, base = by_key.get((name, mode)), by_key.get((name, "none"))
        if e is None or base is None or not e.saved_bytes:
            return None
        return base.saved_bytes / e.saved_bytes, statistics.median(
            x / y for x, y in zip(e.times, base.times))

    loop_modes = [m for m in dict.fromkeys(e.mode for e in entries)
                  if m == "loop" or m.startswith("loop+block")]
    goals = [("full", name, "full", 4.0, 1.4) for name in MODELS]
    for name in ("spiral-b", "spiral-l"):
        measured = {mode: ratios(name, mode) for mode in loop_modes}
        measured = {mode: value for mode, value in measured.items() if value}
        halving = [mode for mode, (saved, _) in measured.items() if saved >= 2.0]
        if measured:
            best = (min(halving, key=lambda mode: measured[mode][1]) if halving
                    else max(measured, key=lambda mode: measured[mode][0]))
            goals.append(("loop-aware", name, best, 2.0, 1.25))
    for goal, name, mode, memory_goal, time_goal in goals:
        measured = ratios(name, mode)
        if measured is None:
            continue
        saved, slower = measured
        verdict = "met" if saved >= memory_goal and slower <= time_goal else "NOT met"
        print(f"goal {goal:10s} {LABELS[name]:17s} {'(' + mode + ')':13s}: {saved:5.2f}x less saved "
              f"(goal >= {memory_goal:g}x) at {slower:5.3f}x step time (goal <= {time_goal:g}x): {verdict}")


def recompute_mode(name: str) -> str:
    """argparse type of --recompute: a mode name model/recompute.py's mode_config understands."""
    from megatron_spiral.model.recompute import RecomputeConfigError, mode_config

    try:
        mode_config(name)
    except RecomputeConfigError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return name


def fmt_bytes(value: Optional[int]) -> str:
    return "-" if value is None else f"{value / 2**20:,.0f}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    gpu = torch.cuda.is_available()
    parser.add_argument("--size", default="160m", choices=["160m", "410m", "1b", "1.4b"],
                        help="Table 1 scale whose layer allocations are used (default: %(default)s)")
    parser.add_argument("--paper-dims", action="store_true",
                        help="use the size's own width/heads (Pythia's) instead of --hidden-size/--num-attention-heads")
    parser.add_argument("--hidden-size", type=int, default=256, help="model width d (default: %(default)s)")
    parser.add_argument("--num-attention-heads", type=int, default=4, help="heads (default: %(default)s)")
    parser.add_argument("--seq-length", type=int, default=4096 if gpu else 1024,
                        help="tokens per sequence (default: 4096 on GPU, 1024 on CPU)")
    parser.add_argument("--micro-batch-size", type=int, default=1, help="sequences per step (default: %(default)s)")
    parser.add_argument("--vocab-size", type=int, default=None,
                        help="vocabulary (default: GPT-NeoX's 50277, padded to 50304)")
    parser.add_argument("--topology", default="mesh", choices=["mesh", "anchor"],
                        help="LoopedFormer topology (SpiralFormer presets use MeSH; default: %(default)s)")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS),
                        help="models to time (default: all four)")
    parser.add_argument("--rounds", type=int, default=7 if gpu else 5,
                        help="timed round-robin rounds; the median is reported (default: 7 GPU / 5 CPU)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first (default: %(default)s)")
    parser.add_argument("--device", default="cuda" if gpu else "cpu")
    parser.add_argument("--dtype", default="bfloat16" if gpu else "float32", choices=["float32", "bfloat16"],
                        help="parameter/activation dtype (default: bf16 on GPU, fp32 on CPU)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--peak-tflops", type=float, default=None, help="peak for MFU (default: from the GPU name)")
    parser.add_argument("--no-memory", action="store_true", help="skip the activation-memory pass")
    parser.add_argument("--recompute", nargs="+", default=None, metavar="MODE", type=recompute_mode,
                        help="also build every model under these activation-recompute modes and print "
                             "them side by side (ratios to 'none', which is added when missing): none, "
                             "selective, full (uniform, 1 layer), blockN (full, block, N layers per "
                             "stack), each optionally prefixed by loop+ (e.g. loop+full, loop+block2)")
    parser.add_argument("--breakdown", action="store_true",
                        help="also time each part (stacks, core per loop, resampling, topology, head) "
                             "in isolation and print its share of the step")
    args = parser.parse_args(argv)
    if args.recompute and "none" not in args.recompute:
        args.recompute.insert(0, "none")
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)  # argparse choices: float32, bfloat16
    device = args.device

    entries = build_entries(args, device, dtype)
    if args.threads:  # after building: megatron_spiral.parallel sets its own thread count
        torch.set_num_threads(args.threads)
    first = entries[0].config
    where = (torch.cuda.get_device_name() if device.startswith("cuda")
             else f"CPU ({torch.get_num_threads()} threads)")
    print(f"# training-step benchmark: size {args.size} layouts, d={first.hidden_size}, "
          f"heads={first.num_attention_heads}, seq {args.seq_length}, micro-batch {args.micro_batch_size}, "
          f"vocab {first.padded_vocab_size}, {args.dtype}, {where}, torch {torch.__version__}")
    print(f"# {args.warmup} warm-up + {args.rounds} timed rounds, round-robin over models; median shown")

    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, first.vocab_size, (args.micro_batch_size, args.seq_length),
                        generator=generator).to(device)
    for round_index in range(args.warmup + args.rounds):
        for entry in entries:
            sync(device)
            start = time.perf_counter()
            train_step(entry.model, ids)
            sync(device)
            entry.last_time = time.perf_counter() - start
            if round_index >= args.warmup:
                entry.times.append(entry.last_time)
        kind = "timed" if round_index >= args.warmup else "warm-up"
        print(f"  round {round_index + 1}/{args.warmup + args.rounds} ({kind}): "
              + "  ".join(f"{e.name}{'' if e.mode == 'none' else '/' + e.mode} {e.last_time:.3f}s"
                          for e in entries), file=sys.stderr)
    if not args.no_memory:
        for entry in entries:
            entry.saved_bytes = saved_tensor_bytes(entry.model, ids)
            if device.startswith("cuda"):
                entry.peak_bytes = peak_activation_bytes(entry.model, ids)

    peak = peak_flops(device, dtype, args.peak_tflops)
    tokens = args.micro_batch_size * args.seq_length
    header = (f"| {'model':18s} | {'layout':26s} | {'ms/step':>8s} | {'spread':>6s} | {'tokens/s':>9s} | "
              f"{'TFLOPs/step':>11s} | {'TFLOP/s':>8s} |" + (f" {'MFU':>6s} |" if peak else "")
              + f" {'saved MiB':>9s} |" + (f" {'peak MiB':>8s} |" if device.startswith("cuda") else ""))
    print()
    print(header)
    print("|" + "|".join("-" * (len(part) + 0) for part in header.split("|")[1:-1]) + "|")
    for e in entries:
        spread = (max(e.times) - min(e.times)) / e.median
        label = LABELS[e.name] if e.mode == "none" else f"{e.name}/{e.mode}"
        row = (f"| {label:18s} | {e.config.layout:26s} | {e.median * 1e3:8.1f} | {spread:6.1%} | "
               f"{tokens / e.median:9.0f} | {e.flops / 1e12:11.4f} | {e.flops / e.median / 1e12:8.3f} |")
        if peak:
            row += f" {e.flops / e.median / peak:6.1%} |"
        row += f" {fmt_bytes(e.saved_bytes if not args.no_memory else None):>9s} |"
        if device.startswith("cuda"):
            row += f" {fmt_bytes(e.peak_bytes):>8s} |"
        print(row)

    by_name = {e.name: e for e in entries if e.mode == "none"}
    print()
    print(f"| {'ratio':38s} | time (med) | per-round | FLOPs (T.1) | time-FL. | FLOPs causal | time-FLc |")
    print(f"|{'-' * 40}|{'-' * 12}|{'-' * 11}|{'-' * 13}|{'-' * 10}|{'-' * 14}|{'-' * 10}|")
    worst = 0.0
    for num, den in (("spiral-b", "looped"), ("spiral-l", "baseline"), ("spiral-b", "baseline"),
                     ("looped", "baseline")):
        if num in by_name and den in by_name:
            a, b = by_name[num], by_name[den]
            time_ratio, flops_ratio = a.median / b.median, a.flops / b.flops
            causal_ratio = a.causal_flops / b.causal_flops
            # same-round ratios cancel slow drifts of a shared machine's load
            paired = statistics.median(x / y for x, y in zip(a.times, b.times))
            gap = time_ratio - flops_ratio
            if (num, den) in (("spiral-b", "looped"), ("spiral-l", "baseline")):
                worst = max(worst, abs(gap))
            print(f"| {LABELS[num] + ' / ' + LABELS[den]:38s} | {time_ratio:10.3f} | {paired:9.3f} | "
                  f"{flops_ratio:11.3f} | {gap:+8.3f} | {causal_ratio:12.3f} | {time_ratio - causal_ratio:+8.3f} |")
    if args.recompute and not args.no_memory:
        print_recompute_table(entries, args, dtype)
    if args.breakdown:
        entries = [e for e in entries if e.mode == "none"]
        print("\nper-part forward+backward in isolation (fastest of 3), ms and share of the median step")
        for e in entries:
            parts = breakdown(e, ids, device, repeats=3)
            overhead = sum(v for k, v in parts.items() if k.startswith(("resampling", "topology")))
            print(f"  {LABELS[e.name]} ({e.config.layout}): step {e.median * 1e3:.1f} ms, parts sum "
                  f"{sum(parts.values()):.1f} ms; resampling + topology = {overhead:.1f} ms "
                  f"({overhead / (e.median * 1e3):.1%} of the step)")
            for name, ms in parts.items():
                print(f"      {name:36s} {ms:9.1f} ms  {ms / (e.median * 1e3):6.1%}")
    print(f"\nmax |time ratio - FLOPs ratio (Table 1 convention)| of the SpiralFormer rows: {worst:.3f} "
          f"({'within' if worst <= 0.03 else 'OUTSIDE'} the 0.03 goal). 'per-round' is the median of "
          f"same-round ratios; 'FLOPs causal' counts attention as a causal kernel computes it.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
