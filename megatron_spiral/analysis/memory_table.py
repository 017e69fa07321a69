"""Human-readable output of the memory model (``tools/model_report.py --memory`` / ``--fits-table``)."""

from __future__ import annotations

import argparse
import dataclasses
from typing import List, Optional

from megatron_spiral.analysis.memory import (GIB, MemorySetup, assumptions, largest_micro_batch,
                                             memory_report)
from megatron_spiral.config import SpiralConfig
from megatron_spiral.model.recompute import MODES, RecomputeConfig, mode_config

_RUN_FLAGS = (
    ("--micro-batch-size", dict(type=int, default=1, help="sequences per micro-batch per GPU")),
    ("--tensor-model-parallel-size", dict(type=int, default=1, help="tensor-parallel ranks (TP)")),
    ("--sequence-parallel", dict(action="store_true", help="sequence parallelism over the TP ranks")),
    ("--data-parallel-size", dict(type=int, default=1,
                                  help="data-parallel ranks (world size / TP); shards the optimizer "
                                       "state with --use-distributed-optimizer")),
    ("--use-distributed-optimizer", dict(action="store_true", help="ZeRO-1 optimizer sharding")),
    ("--bf16", dict(action="store_true", help="bf16 weights/activations, fp32 grads and main weights")),
    ("--gpu-memory-gb", dict(type=float, default=80.0,
                             help="GPU capacity for the fit check and --fits-table (GiB)")),
)


def add_memory_arguments(parser: argparse.ArgumentParser) -> None:
    """--memory, --fits-table and the run flags that decide memory (Megatron-LM names)."""
    from megatron_spiral.cli import add_dataclass_arguments

    group = parser.add_argument_group("memory report (--memory)")
    group.add_argument("--memory", action="store_true",
                       help="print per-GPU bytes of weights, gradients, optimizer state and "
                            "activations for the run flags below")
    group.add_argument("--fits-table", action="store_true",
                       help="print, for every Table 1 preset, the largest micro-batch that fits "
                            "--gpu-memory-gb per recompute mode")
    for flag, kwargs in _RUN_FLAGS:
        group.add_argument(flag, **kwargs)
    add_dataclass_arguments(parser, RecomputeConfig, "activation recomputation (--memory)")


def setup_from_args(args: argparse.Namespace, seq_length: int) -> MemorySetup:
    from megatron_spiral.cli import dataclass_from_args

    if args.sequence_parallel and args.tensor_model_parallel_size < 2:
        raise ValueError("--sequence-parallel needs --tensor-model-parallel-size > 1")
    for name in ("micro_batch_size", "tensor_model_parallel_size", "data_parallel_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
    return MemorySetup(
        micro_batch_size=args.micro_batch_size, seq_length=seq_length,
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        sequence_parallel=args.sequence_parallel, data_parallel_size=args.data_parallel_size,
        use_distributed_optimizer=args.use_distributed_optimizer, bf16=args.bf16,
        recompute=dataclass_from_args(RecomputeConfig, args))


def gib(value: float) -> str:
    return f"{value / GIB:9.2f} GiB"


def print_memory(name: str, config: SpiralConfig, setup: MemorySetup, capacity_gb: float) -> dict:
    report = memory_report(config, setup)
    print(f"memory report: {name} ({config.layout}), seq {setup.seq_length or config.seq_length}, "
          f"micro-batch {setup.micro_batch_size}, TP={setup.tensor_model_parallel_size} "
          f"SP={setup.sequence_parallel} DP={setup.data_parallel_size} "
          f"distributed optimizer={setup.use_distributed_optimizer}, "
          f"{'bf16' if setup.bf16 else 'fp32'}, recompute={setup.recompute.mode}")
    for label, value in (("weights", report.weights), ("gradients", report.gradients),
                         ("optimizer state", report.optimizer), ("activations", report.activations)):
        print(f"  {label:28s} {gib(value)}")
    for part, value in report.activation_parts.items():
        print(f"    {part:38s} {value / 2**20:12.1f} MiB")
    print(f"  {'backward working set':28s} {gib(report.backward_working)}")
    print(f"  {'total per GPU':28s} {gib(report.total)}  "
          f"({'fits' if report.total <= capacity_gb * GIB else 'does NOT fit'} {capacity_gb:g} GiB)")
    print(f"  assumes {assumptions(config, setup)}")
    return report.as_dict()


def fits_table(presets: List[str], base: MemorySetup, capacity_gb: float,
               modes=MODES, seq_length: Optional[int] = None) -> List[dict]:
    """Largest micro-batch per recompute mode for each preset (bf16 etc. taken from ``base``)."""
    from megatron_spiral.presets import get_preset

    rows = []
    for name in presets:
        config = get_preset(name)
        row = {"preset": name, "layout": config.layout}
        for mode in modes:
            # each preset at its own length (4096 for Table 1) unless the caller fixed one
            setup = dataclasses.replace(base, recompute=mode_config(mode),
                                        seq_length=seq_length or config.seq_length)
            row[mode] = largest_micro_batch(config, setup, int(capacity_gb * GIB))
        rows.append(row)
    return rows


def print_fits_table(rows: List[dict], base: MemorySetup, capacity_gb: float, modes=MODES,
                     seq_length: Optional[int] = None) -> None:
    print(f"largest micro-batch per GPU that fits {capacity_gb:g} GiB at {seq_length or 4096} tokens "
          f"({'bf16' if base.bf16 else 'fp32'}, TP={base.tensor_model_parallel_size}, "
          f"DP={base.data_parallel_size}, distributed optimizer={base.use_distributed_optimizer})")
    header = f"| {'preset':22s} | {'layout':26s} | " + " | ".join(f"{m:>9s}" for m in modes) + " |"
    print(header)
    print("|" + "|".join("-" * len(part) for part in header.split("|")[1:-1]) + "|")
    for row in rows:
        print(f"| {row['preset']:22s} | {row['layout']:26s} | "
              + " | ".join(f"{row[m]:9d}" for m in modes) + " |")
