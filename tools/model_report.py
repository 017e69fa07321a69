#!/usr/bin/env python
"""Parameters and resolution-aware prefill FLOPs of a SpiralFormer configuration.

Examples:
  python tools/model_report.py --preset spiral-b-410m-mesh
  python tools/model_report.py --spiral-layout "2+4x{1/8,1/4,1/2,1}+2" --hidden-size 768 \\
      --num-attention-heads 12 --vocab-size 50277 --seq-length 4096 --json
  python tools/model_report.py --all-presets          # every Table 1 row next to the paper's
  python tools/model_report.py --num-layers 12 --hidden-size 768 --num-attention-heads 12 \\
      --seq-length 2048 --swiglu --group-query-attention --num-query-groups 4   # tied (Megatron)
  python tools/model_report.py --preset spiral-l-1.4b-mesh --memory --bf16 --micro-batch-size 4 \
      --use-distributed-optimizer --data-parallel-size 8 --spiral-recompute-loop   # per-GPU bytes
  python tools/model_report.py --fits-table --bf16     # largest micro-batch on 80 GB per recompute mode
"""

from __future__ import annotations

import argparse
import json
import sys

from megatron_spiral.analysis.accounting import count_params, forward_flops
from megatron_spiral.config import SpiralConfig
from megatron_spiral.model_args import add_model_arguments, describe_architecture, model_config_from_args
from megatron_spiral.training.megatron_flags import add_refused_megatron_flags, refused_flags_message
from megatron_spiral.analysis.memory_table import add_memory_arguments
from megatron_spiral.presets import PAPER_TABLE1, PRESETS, get_preset


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=list(PRESETS), metavar="NAME",
                        help="start from a named preset (" + ", ".join(PRESETS) + ")")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object with params_total, params_non_embedding, "
                             "prefill_flops (and details)")
    parser.add_argument("--all-presets", action="store_true",
                        help="print every Table 1 preset next to the paper's numbers")
    add_model_arguments(parser, skip=())
    add_memory_arguments(parser)  # --memory / --fits-table (megatron_spiral/analysis/memory_table.py)
    add_refused_megatron_flags(parser)  # last: a Megatron-LM flag we cannot honour says why
    return parser


def report(config: SpiralConfig) -> dict:
    params = count_params(config)
    flops = forward_flops(config)
    return {
        "layout": config.layout,
        "topology": config.topology if config.parsed_layout.is_looped else None,
        "tied_embeddings": config.tied_embeddings,
        "untie_core": config.untie_core,
        "seq_length": config.seq_length,
        "params_total": params.total,
        "params_non_embedding": params.non_embedding,
        "prefill_flops": flops.total,
        "params_breakdown": params.breakdown,
        "flops_breakdown": flops.breakdown,
        "iteration_lengths": flops.lengths,
        "chunk_sizes": config.chunk_sizes,
        "chunk_offsets": config.chunk_offsets,
        "shifts": config.shifts,
    }


def print_human(name: str, config: SpiralConfig, info: dict) -> None:
    print(f"model        : {name}")
    print(f"architecture : {describe_architecture(config)}")
    print(f"layout       : {config.layout}   topology={info['topology']}  d={config.hidden_size} "
          f"heads={config.num_attention_heads}  vocab={config.vocab_size}->{config.padded_vocab_size}"
          + ("  (untied: each iteration its own core weights)" if config.untie_core else ""))
    if config.parsed_layout.is_looped:
        print(f"schedule     : g_t={info['chunk_sizes']} omega_t={info['chunk_offsets']} "
              f"s_t={info['shifts']}  L_t={info['iteration_lengths']} (L={config.seq_length})")
        print(f"resampling   : down={config.downscale} up={config.upscale}")
    print(f"params       : {info['params_total'] / 1e6:.1f}M total / "
          f"{info['params_non_embedding'] / 1e6:.1f}M non-embedding")
    print(f"prefill FLOPs: {info['prefill_flops'] / 1e12:.3f}e12 ({config.seq_length} tokens)")
    if name in PAPER_TABLE1:
        total, non_emb, tflops = PAPER_TABLE1[name]
        print(f"paper Table 1: {total}M / {non_emb}M, {tflops}e12")


def print_all_presets() -> None:
    header = f"{'preset':24s} {'total M':>9s} {'paper':>8s} {'non-emb M':>10s} {'paper':>8s} {'TFLOPs':>8s} {'paper':>7s}"
    print(header)
    print("-" * len(header))
    for name, (p_total, p_non_emb, p_flops) in PAPER_TABLE1.items():
        info = report(get_preset(name))
        print(f"{name:24s} {info['params_total'] / 1e6:9.1f} {p_total:8.1f} "
              f"{info['params_non_embedding'] / 1e6:10.1f} {p_non_emb:8.1f} "
              f"{info['prefill_flops'] / 1e12:8.3f} {p_flops:7.2f}")
    ours = [name for name in PRESETS if name not in PAPER_TABLE1 and name != "tiny"]
    if ours:
        print(f"\npresets with no Table 1 row (ours: the BASELINE\u2020 construction at other sizes)")
        for name in ours:
            info = report(get_preset(name))
            print(f"{name:24s} {info['params_total'] / 1e6:9.1f} {'-':>8s} "
                  f"{info['params_non_embedding'] / 1e6:10.1f} {'-':>8s} {info['prefill_flops'] / 1e12:8.3f} {'-':>7s}")


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    refused = refused_flags_message(args)
    if refused:
        parser.error(refused)
    if args.all_presets:
        print_all_presets()
        return 0
    if args.fits_table and not (args.preset or args.layout or args.num_layers):
        config = get_preset(next(iter(PAPER_TABLE1)))  # the table covers every preset; no model needed
    else:
        # Same resolution as pretrain_spiral.py: Megatron-LM defaults (tied, ...) without --preset.
        config = model_config_from_args(args, parser.error, require_dims=False, vocab_from_flags=True)
    name = args.preset or "custom"
    if args.memory or args.fits_table:
        return memory_main(parser, args, name, config)
    info = report(config)
    if args.json:
        print(json.dumps(info))
    else:
        print_human(name, config, info)
    return 0


def memory_main(parser, args, name: str, config: SpiralConfig) -> int:
    """--memory: per-GPU bytes of this run; --fits-table: every Table 1 preset's largest micro-batch."""
    from megatron_spiral.analysis import memory_table
    from megatron_spiral.model.recompute import RecomputeConfigError

    try:
        setup = memory_table.setup_from_args(args, config.seq_length)
    except (ValueError, RecomputeConfigError) as err:
        parser.exit(2, f"model_report.py: error: {err}\n")
    if args.fits_table:
        length = args.seq_length  # an explicit --seq-length applies to every preset
        rows = memory_table.fits_table(list(PAPER_TABLE1), setup, args.gpu_memory_gb, seq_length=length)
        if args.json:
            print(json.dumps(rows))
        else:
            memory_table.print_fits_table(rows, setup, args.gpu_memory_gb, seq_length=length)
        return 0
    if args.json:
        from megatron_spiral.analysis.memory import memory_report

        print(json.dumps(memory_report(config, setup).as_dict()))
    else:
        memory_table.print_memory(name, config, setup, args.gpu_memory_gb)
    return 0


if __name__ == "__main__":
    sys.exit(main())
