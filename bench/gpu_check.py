#!/usr/bin/env python
"""GPU acceptance run (scripts/gpu_check.sh calls this): parity, speed, memory and decode on one GPU.

1. parity: a tiny model built on CPU and copied to the GPU gives the same fp32 logits (TF32 off)
   and, cast to bf16 on the GPU, a loss close to the CPU fp32 loss;
2. speed: --steps bf16 training steps (megatron DDP + mixed-precision Adam, the real training
   path) of pythia-160m, looped-160m-mesh, spiral-b-160m-mesh and spiral-l-160m-mesh at
   --seq-length tokens: ms/step (median after --warmup steps), tokens/s, MFU, and the time ratios
   SpiralFormer-B / LoopedFormer and SpiralFormer-L / Pythia next to their FLOPs ratios;
3. memory: peak allocated bytes of those runs next to the memory model's prediction
   (megatron_spiral/analysis/memory.py);
4. decode: bench/bench_decode.py on the GPU.

It prints one summary table and exits 1 when a parity check fails. ``--dry-run`` runs the same code
on CPU at tiny dims in seconds (CI), so the script cannot rot; its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import List, Optional

BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, BENCH)
sys.path.insert(0, os.path.dirname(BENCH))

from megatron_spiral.quiet import quiet_backend_warnings  # noqa: E402

quiet_backend_warnings(hide_deprecations=True)

import torch  # noqa: E402

SPEED_PRESETS = ("pythia-160m", "looped-160m-mesh", "spiral-b-160m-mesh", "spiral-l-160m-mesh")
RATIOS = (("spiral-b-160m-mesh", "looped-160m-mesh"), ("spiral-l-160m-mesh", "pythia-160m"))
TINY_DIMS = dict(hidden_size=32, num_attention_heads=2, vocab_size=100)


@dataclass
class Check:
    name: str
    value: float
    limit: float
    passed: bool


@dataclass
class SpeedRow:
    preset: str
    layout: str
    ms: float
    tokens_per_s: float
    flops: int
    mfu: Optional[float]
    peak_bytes: Optional[int]
    predicted_bytes: int
    final_loss: float
    times: List[float] = field(default_factory=list)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


# ------------------------------------------------------------------ 1. parity
def parity_checks(device: str, logits_tol: float, loss_tol: float) -> List[Check]:
    """fp32 logits of CPU vs ``device`` (same weights), and bf16-on-device loss vs fp32 CPU."""
    from megatron_spiral import build_model

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    cpu_model = build_model("tiny", seed=0, device="cpu").eval()
    ids = torch.randint(0, cpu_model.config.vocab_size, (2, cpu_model.config.seq_length),
                        generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        cpu_logits = cpu_model(ids)
        cpu_loss = cpu_model(ids, labels=ids).float().mean().item()
        other = build_model("tiny", seed=1, device=device).eval()  # other weights, then ours
        other.load_state_dict(cpu_model.state_dict())
        logits_gap = (other(ids.to(device)).cpu() - cpu_logits).abs().max().item()
        other = other.to(dtype=torch.bfloat16)
        bf16_loss = other(ids.to(device), labels=ids.to(device)).float().mean().item()
    loss_gap = abs(bf16_loss - cpu_loss)
    return [Check(f"fp32 logits max |{device} - cpu|", logits_gap, logits_tol, logits_gap <= logits_tol),
            Check(f"bf16 loss |{device} - cpu fp32| (cpu loss {cpu_loss:.4f})", loss_gap, loss_tol,
                  loss_gap <= loss_tol)]


# ------------------------------------------------------------------ 2./3. speed and memory
def _batches(vocab: int, batch: int, length: int, device: str):
    generator = torch.Generator().manual_seed(1)
    while True:
        tokens = torch.randint(0, vocab, (batch, length + 1), generator=generator)
        yield {"tokens": tokens[:, :-1].to(device), "labels": tokens[:, 1:].to(device),
               "loss_mask": torch.ones(batch, length, device=device)}


def speed_run(preset: str, args, device: str, peak_flops: Optional[float]) -> SpeedRow:
    """``args.steps`` bf16 training steps through the real training path (DDP + optimizer)."""
    from megatron_spiral.analysis.accounting import training_flops_per_sequence
    from megatron_spiral.analysis.memory import MemorySetup, memory_report
    from megatron_spiral.presets import get_preset
    from megatron_spiral.training.arguments import OptimConfig, ParallelConfig, TrainConfig
    from megatron_spiral.training.setup import build_training_state
    from megatron_spiral.training.step import train_step

    overrides = dict(seq_length=args.seq_length)
    if args.dry_run:
        overrides.update(TINY_DIMS, transformer_impl="local")
    spiral = get_preset(preset, **overrides)
    batch = args.micro_batch_size
    state = build_training_state(
        spiral, ParallelConfig(bf16=True), TrainConfig(micro_batch_size=batch, train_iters=args.steps),
        OptimConfig(lr=1e-4))
    data = _batches(spiral.vocab_size, batch, args.seq_length, device)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times, loss = [], float("nan")
    for _ in range(args.steps):
        sync(device)
        start = time.perf_counter()
        result = train_step(state, data)
        sync(device)
        times.append(time.perf_counter() - start)
        loss = result.loss
    peak = torch.cuda.max_memory_allocated() if device.startswith("cuda") else None
    timed = times[args.warmup:] or times
    ms = statistics.median(timed) * 1e3
    flops = training_flops_per_sequence(spiral, args.seq_length) * batch
    predicted = memory_report(spiral, MemorySetup(micro_batch_size=batch, seq_length=args.seq_length,
                                                  bf16=True)).total
    del state
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return SpeedRow(preset, spiral.layout, ms, batch * args.seq_length / (ms / 1e3), flops,
                    flops / (ms / 1e3) / peak_flops if peak_flops else None, peak, predicted, loss, timed)


# ------------------------------------------------------------------ 4. decode
def decode_run(args, device: str) -> str:
    import bench_decode

    argv = ["--device", device, "--dtype", "bfloat16" if device.startswith("cuda") else "float32"]
    if args.dry_run:
        argv += ["--hidden-size", "32", "--heads", "2", "--vocab-size", "100", "--contexts", "32",
                 "--tokens", "4", "--recompute-steps", "1", "--repeats", "1"]
    else:
        argv += ["--hidden-size", "768", "--heads", "12", "--contexts", "1024", "4096"]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        bench_decode.main(argv)
    return out.getvalue()


# ------------------------------------------------------------------ summary
def gib(value: Optional[int]) -> str:
    return "-" if value is None else f"{value / 2 ** 30:.2f}"


def print_summary(checks: List[Check], rows: List[SpeedRow], decode: str, device_name: str) -> None:
    print(f"\n# GPU acceptance summary ({device_name}, torch {torch.__version__})")
    print("\n| parity check | value | limit | result |\n|---|---|---|---|")
    for c in checks:
        print(f"| {c.name} | {c.value:.3g} | {c.limit:.3g} | {'PASS' if c.passed else 'FAIL'} |")
    print("\n| model | layout | ms/step | tokens/s | TFLOP/s | MFU | peak GiB | predicted GiB | "
          "peak / predicted | final loss |\n|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ratio = "-" if r.peak_bytes is None else f"{r.peak_bytes / r.predicted_bytes:.2f}"
        mfu = "-" if r.mfu is None else f"{r.mfu:.1%}"
        print(f"| {r.preset} | {r.layout} | {r.ms:.1f} | {r.tokens_per_s:,.0f} | "
              f"{r.flops / (r.ms / 1e3) / 1e12:.2f} | {mfu} | {gib(r.peak_bytes)} | "
              f"{gib(r.predicted_bytes)} | {ratio} | {r.final_loss:.3f} |")
    by_name = {r.preset: r for r in rows}
    print("\n| ratio | time | FLOPs | time - FLOPs |\n|---|---|---|---|")
    for num, den in RATIOS:
        if num in by_name and den in by_name:
            a, b = by_name[num], by_name[den]
            t, f = a.ms / b.ms, a.flops / b.flops
            print(f"| {num} / {den} | {t:.3f} | {f:.3f} | {t - f:+.3f} |")
    lines = [line for line in decode.splitlines() if line.startswith("context")]
    print("\ndecode (bench/bench_decode.py, cached vs full recompute per token):")
    for line in lines:
        print("  " + line)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true",
                        help="CPU, tiny dims, 3 steps: exercise every code path in seconds")
    parser.add_argument("--steps", type=int, default=None, help="training steps per model (default 30; dry run 3)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed first steps (default 5; dry run 1)")
    parser.add_argument("--seq-length", type=int, default=None, help="tokens per sequence (default 4096; dry run 64)")
    parser.add_argument("--micro-batch-size", type=int, default=None, help="sequences per step (default 4; dry run 2)")
    parser.add_argument("--logits-tol", type=float, default=1e-4, help="fp32 parity limit (max |delta logit|)")
    parser.add_argument("--loss-tol", type=float, default=2e-2, help="bf16 loss closeness limit")
    parser.add_argument("--skip-decode", action="store_true", help="skip the decode benchmark")
    parser.add_argument("--models", nargs="+", default=list(SPEED_PRESETS), choices=SPEED_PRESETS,
                        help="presets to time (default: all four)")
    args = parser.parse_args(argv)
    dry = args.dry_run
    args.steps = args.steps or (3 if dry else 30)
    args.warmup = args.warmup if args.warmup is not None else (1 if dry else 5)
    args.seq_length = args.seq_length or (64 if dry else 4096)
    args.micro_batch_size = args.micro_batch_size or (2 if dry else 4)
    if args.warmup >= args.steps:
        parser.error(f"--warmup {args.warmup} must be below --steps {args.steps}")
    if not dry and not torch.cuda.is_available():
        parser.error("no CUDA device visible to torch; run on a GPU machine, or pass --dry-run")
    device = "cpu" if dry else "cuda"
    if dry:
        torch.set_num_threads(1)
    from bench_training_speed import peak_flops
    from megatron_spiral.parallel import initialize_parallel

    initialize_parallel(tensor_model_parallel_size=1, seed=1234)
    device_name = torch.cuda.get_device_name() if device == "cuda" else "CPU (dry run)"
    peak = peak_flops(device, torch.bfloat16, None)
    start = time.perf_counter()
    print(f"[gpu_check] parity on {device_name}", flush=True)
    checks = parity_checks(device, args.logits_tol, args.loss_tol)
    rows = []
    for preset in args.models:
        print(f"[gpu_check] {args.steps} bf16 steps of {preset} at {args.seq_length} tokens "
              f"x {args.micro_batch_size}", flush=True)
        rows.append(speed_run(preset, args, device, peak))
        print(f"[gpu_check]   {rows[-1].ms:.1f} ms/step, loss {rows[-1].final_loss:.3f}", flush=True)
    decode = ""
    if not args.skip_decode:
        print("[gpu_check] decode benchmark", flush=True)
        decode = decode_run(args, device)
    print_summary(checks, rows, decode, device_name)
    failed = [c.name for c in checks if not c.passed]
    bad_loss = [r.preset for r in rows if not math.isfinite(r.final_loss)]
    print(f"\n[gpu_check] {time.perf_counter() - start:.0f} s; "
          + ("all parity checks passed" if not failed else f"FAILED: {', '.join(failed)}")
          + (f"; non-finite training loss: {', '.join(bad_loss)}" if bad_loss else ""))
    return 1 if failed or bad_loss else 0


if __name__ == "__main__":
    sys.exit(main())
