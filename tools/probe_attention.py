#!/usr/bin/env python
"""Attention probes of a SpiralFormer / LoopedFormer checkpoint (paper §4, App. I).

For every loop iteration t, layer l of the loop-shared core and head h, on samples of
--seq-length tokens cut from a Megatron indexed dataset, at the loop's native length L_t:

  key-marginal entropy  H = -sum_k p(k) log p(k) / log L_t,  p(k) = mean_q A(q, k)
  Local Attention Mass  LAM = mean_q sum_{q-M_t <= k < q} A(q, k),  M_t = ceil(gamma r_t)

Each head's metric is averaged over the samples; cross-loop ranges and the dynamic heads (top
40% by range, per metric) are computed on those averages. Writes into --out:

  probe_report.json           metadata, loops (r_t, g_t, L_t, M_t) and per metric: values
                              [T][layers][heads], sample_std, range [layers][heads],
                              range_normalized, dynamic_heads [[l, h], ...], per-loop summaries
  distributions_dynamic.png   Fig. 4 style (ridgelines + box plots, dynamic heads)
  distributions_all.png       the same over all heads (Fig. 8)
  heatmaps.png                layer x head heatmaps of Delta H and Delta LAM, dynamic heads
                              boxed (Fig. 5; Fig. 7 for a LoopedFormer control)

--out appears complete or not at all (written next to it and renamed into place).

Examples:
  python tools/probe_attention.py --load ckpt/spiral --data-path data/pile_val_text_document \\
      --num-samples 500 --out probes/spiral
  python tools/probe_attention.py --load ckpt/looped ... --out probes/looped   # the control
  python tools/probe_attention.py --load demo_output/checkpoints \\
      --data-path demo_output/data/demo_text_document --split 98,2,0 --split-name valid \\
      --num-samples 64 --out probes/demo
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile

from megatron_spiral.quiet import quiet_backend_warnings

quiet_backend_warnings(hide_deprecations=True)


def build_parser() -> argparse.ArgumentParser:
    from megatron_spiral.analysis.probes import DYNAMIC_FRACTION, GAMMA

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--load", required=True, metavar="CKPT",
                        help="checkpoint: a --save directory (latest iteration) or an iter_* directory")
    parser.add_argument("--data-path", required=True, metavar="PREFIX",
                        help="Megatron indexed dataset prefix (PREFIX.bin / PREFIX.idx), ideally "
                             "held-out text (the paper uses the Pile validation set)")
    parser.add_argument("--out", required=True, metavar="DIR", help="output directory")
    parser.add_argument("--num-samples", type=int, default=500,
                        help="number of sequences to average over (default: %(default)s, as the paper)")
    parser.add_argument("--seq-length", type=int, default=None,
                        help="tokens per sample (default: the model's seq_length)")
    parser.add_argument("--micro-batch-size", type=int, default=1,
                        help="sequences per forward pass; explicit attention needs batch x heads "
                             "x L^2 floats per layer (default: %(default)s)")
    parser.add_argument("--gamma", type=int, default=GAMMA,
                        help="LAM window scale, M_t = ceil(gamma r_t) (default: %(default)s, eq. 23)")
    parser.add_argument("--dynamic-fraction", type=float, default=DYNAMIC_FRACTION,
                        help="fraction of heads called dynamic, per metric (default: %(default)s)")
    parser.add_argument("--split", default="100,0,0",
                        help="train,valid,test document proportions, Megatron's rule (use the "
                             "training run's --split with --split-name valid to probe held-out "
                             "documents of the training dataset)")
    parser.add_argument("--split-name", default="all", choices=["all", "train", "valid", "test"],
                        help="which split of --split to draw samples from (default: all documents)")
    parser.add_argument("--seed", type=int, default=1234, help="seed of the sample choice")
    parser.add_argument("--device", default=None,
                        help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --out")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def _fail(message: str) -> int:
    print(f"probe_attention.py: error: {message}", file=sys.stderr)
    return 1


def run(args) -> int:
    import torch
    from tqdm import tqdm

    from megatron_spiral.analysis.probe_plots import write_figures
    from megatron_spiral.analysis.probes import ProbeError, TokenWindows, build_report, probe_model
    from megatron_spiral.api import build_model
    from megatron_spiral.checkpointing import (
        CheckpointError, load_model_weights, load_spiral_config, resolve_checkpoint)

    out = os.path.abspath(args.out)
    if os.path.isdir(out) and os.listdir(out) and not args.overwrite:
        return _fail(f"--out {out} exists and is not empty; pass --overwrite or pick another directory")
    if os.path.exists(out) and not os.path.isdir(out):
        return _fail(f"--out {out} exists and is not a directory")
    for name in ("num_samples", "micro_batch_size", "gamma"):
        if getattr(args, name) < 1:
            return _fail(f"--{name.replace('_', '-')} must be >= 1")
    if not 0 < args.dynamic_fraction <= 1:
        return _fail("--dynamic-fraction must lie in (0, 1]")

    try:
        ckpt_dir, iteration = resolve_checkpoint(args.load)
        config = load_spiral_config(ckpt_dir)
        layout = config.parsed_layout
        if not layout.is_looped:
            raise ProbeError(
                f"checkpoint {ckpt_dir} is a non-looped model (layout {config.layout!r}); the "
                "probes compare loop iterations of a SpiralFormer or LoopedFormer core")
        seq_length = args.seq_length or config.seq_length
        if seq_length < 2:
            raise ProbeError("--seq-length must be at least 2")
        if seq_length > config.seq_length:
            print(f"warning: probing at {seq_length} tokens, beyond the model's seq_length "
                  f"{config.seq_length} (RoPE extrapolation)", file=sys.stderr)
        windows = TokenWindows(args.data_path, seq_length, args.num_samples, args.seed,
                               args.split, args.split_name)
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        overrides = config.to_dict()
        # the local spec exposes attention probabilities; seq_length only sizes RoPE tables
        overrides.update(transformer_impl="local", seq_length=max(seq_length, config.seq_length))
        model = build_model("tiny", device=device, **overrides)
        load_model_weights(model.gpt, ckpt_dir)
        vocab = config.vocab_size

        def checked(batches):
            for batch in batches:
                top = int(batch.max())
                if top >= vocab:
                    raise ProbeError(f"dataset token id {top} is outside the model's vocabulary "
                                     f"({vocab}); was {args.data_path} made with its tokenizer?")
                yield batch

        print(f"probing {ckpt_dir} (iteration {iteration}): layout {config.layout}, "
              f"{layout.num_loop} core layers x {config.num_attention_heads} heads, "
              f"{len(windows)} samples x {seq_length} tokens on {device}", file=sys.stderr)
        bar = tqdm(total=len(windows), unit="seq", desc="probe", disable=args.no_progress)
        loops, accumulator = probe_model(
            model, checked(windows.batches(args.micro_batch_size, device)), seq_length,
            gamma=args.gamma, progress=bar.update)
        bar.close()
    except (CheckpointError, ProbeError) as err:
        return _fail(str(err))

    kind = "LoopedFormer" if all(r == 1 for r in config.resolutions) else "SpiralFormer"
    report = build_report(
        loops, accumulator, args.dynamic_fraction,
        checkpoint=ckpt_dir, iteration=iteration, data_path=args.data_path,
        split=args.split, split_name=args.split_name, model_kind=kind, layout=config.layout,
        topology=config.topology, seq_length=seq_length, num_samples=len(windows),
        gamma=args.gamma, seed=args.seed)

    parent = os.path.dirname(out) or "."
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.tmp-", dir=parent)
    try:
        figures = write_figures(report, staging)
        report["figures"] = sorted(figures)
        with open(os.path.join(staging, "probe_report.json"), "w") as f:
            json.dump(report, f, indent=1)
        if os.path.isdir(out):
            shutil.rmtree(out)
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _print_summary(report, out)
    return 0


def _print_summary(report: dict, out: str) -> None:
    print(f"{report['model_kind']} {report['layout']}: loop-wise means "
          f"(all heads | dynamic heads), {report['num_samples']} samples")
    print(f"{'loop':>4} {'r_t':>6} {'L_t':>6} {'M_t':>4}   {'H all':>7} {'H dyn':>7}   "
          f"{'LAM all':>7} {'LAM dyn':>7}")
    entropy, lam = report["metrics"]["entropy"], report["metrics"]["lam"]
    for i, loop in enumerate(report["loops"]):
        print(f"{loop['t']:>4} {loop['resolution']:>6} {loop['length']:>6} {loop['window']:>4}   "
              f"{entropy['per_loop_all'][i]['mean']:7.4f} {entropy['per_loop_dynamic'][i]['mean']:7.4f}   "
              f"{lam['per_loop_all'][i]['mean']:7.4f} {lam['per_loop_dynamic'][i]['mean']:7.4f}")
    print(f"wrote {out}/probe_report.json and {', '.join(report['figures'])}")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return run(args)


if __name__ == "__main__":  # dist_checkpointing may spawn processes: keep the guard
    sys.exit(main())
