#!/usr/bin/env python
"""Small-scale replication of the paper's Table 1 (and optionally Table 2) on local text.

Trains, for the same number of tokens and on the same data order:

  baseline          N-layer GPT-NeoX stack              N = pre + 2 x loop + post (equal compute)
  looped-{anchor,mesh}   pre + loop x {1,1} + post      LoopedFormer
  spiral-b-{anchor,mesh} pre + loop x {1/8,1/4,1/2,1} + post   SpiralFormer-B (same params)
  spiral-l-mesh     p + loop x {1/16,1/8,1/4,1/2} + p   SpiralFormer-L, p = (N - loop) / 2
                                                        (the baseline's parameter count)

then prints params (total / non-embedding), analytic FLOPs (prefill of one --seq-length sequence,
as Table 1 reports for 4096 tokens, and the whole run's training FLOPs) and validation loss /
perplexity, like Table 1. ``--ablations`` adds Table 2's one-change-at-a-time variants of SpiralFormer-B (MeSH):
fine-to-coarse schedule, parallel shift, zero offset, mean down-scaling, uniform up-scaling, both.

Data: without --data-path, builds the demo corpus (docstrings and docs of the installed Python
packages: tools/build_demo_corpus.py), trains a byte-level BPE tokenizer and preprocesses it, in
--work-dir (reused when present). Validation uses the held-out documents of --split.

CPU default: d=128, 4 heads, seq 256, 1+2x...+1 allocations, 160 steps of 16 sequences
(~0.66M tokens per model), two trainings at a time with one thread each: ~10 minutes on 2 cores.
Scale with flags, e.g. on GPUs: --hidden-size 768 --num-attention-heads 12 --pre 2 --loop 4
--post 2 --seq-length 2048 --train-iters 5000 --global-batch-size 64 --jobs 1.

Example:
  python examples/replicate_small.py                       # Table 1 rows
  python examples/replicate_small.py --ablations           # + Table 2 rows
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Dict, List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


@dataclass
class Run:
    name: str
    label: str
    layout: str
    topology: str = "mesh"
    flags: Dict[str, str] = field(default_factory=dict)   # extra --spiral-* flags
    group: str = "table1"


def table1_runs(args) -> List[Run]:
    pre, loop, post = args.pre, args.loop, args.post
    baseline = pre + 2 * loop + post
    side = max((baseline - loop) // 2, 0)
    runs = {
        "baseline": Run("baseline", "Baseline (Pythia-style)", str(baseline)),
        "looped-anchor": Run("looped-anchor", "LoopedFormer*", f"{pre}+{loop}x{{1,1}}+{post}", "anchor"),
        "looped-mesh": Run("looped-mesh", "LoopedFormer†", f"{pre}+{loop}x{{1,1}}+{post}", "mesh"),
        "spiral-b-anchor": Run("spiral-b-anchor", "SpiralFormer-B*",
                               f"{pre}+{loop}x{{1/8,1/4,1/2,1}}+{post}", "anchor"),
        "spiral-b-mesh": Run("spiral-b-mesh", "SpiralFormer-B†", f"{pre}+{loop}x{{1/8,1/4,1/2,1}}+{post}", "mesh"),
        "spiral-l-mesh": Run("spiral-l-mesh", "SpiralFormer-L†", f"{side}+{loop}x{{1/16,1/8,1/4,1/2}}+{side}", "mesh"),
    }
    unknown = [m for m in args.models if m not in runs]
    if unknown:
        raise SystemExit(f"unknown --models {unknown}; choose from {', '.join(runs)}")
    return [runs[name] for name in args.models]


def ablation_runs(args) -> List[Run]:
    pre, loop, post = args.pre, args.loop, args.post
    main = f"{pre}+{loop}x{{1/8,1/4,1/2,1}}+{post}"
    rows = [
        ("abl-fine-to-coarse", "(2) Schedule: fine-to-coarse", f"{pre}+{loop}x{{1,1/2,1/4,1/8}}+{post}", {}),
        ("abl-parallel", "(3) Causality: parallel s=g", main, {"--spiral-shift": "parallel"}),
        ("abl-zero-offset", "(4) Offset: zero", main, {"--spiral-chunk-offset": "zero"}),
        ("abl-mean", "(5a) Downscale: mean pooling", main, {"--spiral-downscale": "mean"}),
        ("abl-uniform", "(5b) Upscale: uniform", main, {"--spiral-upscale": "uniform"}),
        ("abl-both", "(5c) Both: pooling + broadcast", main,
         {"--spiral-downscale": "mean", "--spiral-upscale": "uniform"}),
    ]
    return [Run(name, label, layout, "mesh", flags, "table2") for name, label, layout, flags in rows]


# ----------------------------------------------------------------------------- data
def say(line: str) -> None:
    """One write per line: trainings run in threads and must not interleave their lines."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _run(cmd: List[str], log: Optional[str] = None, env=None) -> None:
    say("+ " + " ".join(cmd))
    if log is None:
        subprocess.run(cmd, check=True, env=env)
        return
    with open(log, "w") as handle:
        proc = subprocess.run(cmd, stdout=handle, stderr=subprocess.STDOUT, env=env)
    if proc.returncode:
        tail = open(log).read()[-3000:]
        raise SystemExit(f"command failed (exit {proc.returncode}); last lines of {log}:\n{tail}")


def prepare_data(args) -> tuple:
    """(data prefix, tokenizer.json) -- given, or built from the demo corpus in --work-dir."""
    if args.data_path:
        if not args.tokenizer_model:
            raise SystemExit("--data-path needs --tokenizer-model (the tokenizer it was preprocessed with)")
        return args.data_path, args.tokenizer_model
    py, work = sys.executable, args.work_dir
    corpus = os.path.join(work, "corpus.jsonl")
    tokenizer_dir = os.path.join(work, "tokenizer")
    tokenizer = os.path.join(tokenizer_dir, "tokenizer.json")
    prefix = os.path.join(work, "data", "demo")
    dataset = prefix + "_text_document"
    os.makedirs(work, exist_ok=True)
    if not (os.path.exists(corpus) and os.path.getsize(corpus)):
        _run([py, os.path.join(ROOT, "tools", "build_demo_corpus.py"), "--output", corpus,
              "--max-mb", str(args.corpus_mb)])
    if not os.path.exists(tokenizer):
        _run([py, os.path.join(ROOT, "tools", "train_tokenizer.py"), "--input", corpus, "--type", "bpe",
              "--vocab-size", str(args.vocab_size), "--output-dir", tokenizer_dir])
    if not (os.path.exists(dataset + ".bin") and os.path.exists(dataset + ".idx")):
        _run([py, os.path.join(ROOT, "tools", "preprocess_data.py"), "--input", corpus,
              "--output-prefix", prefix, "--json-keys", "text", "--append-eod", "--workers", "2",
              "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", tokenizer])
    return dataset, tokenizer


# ----------------------------------------------------------------------------- training
def train(run: Run, args, data: str, tokenizer: str) -> dict:
    save = os.path.join(args.work_dir, "runs", run.name)
    summary_path = os.path.join(save, "run_summary.json")
    settings = run_settings(run, args)
    settings_path = os.path.join(save, "replicate_settings.json")
    if os.path.exists(summary_path) and os.path.exists(settings_path) and not args.retrain:
        if json.load(open(settings_path)) == settings:  # same command as before: reuse
            say(f"= {run.name}: reusing {summary_path}")
            return json.load(open(summary_path))
    if os.path.isdir(save):
        import shutil

        shutil.rmtree(save)
    os.makedirs(save)
    cmd = [sys.executable, os.path.join(ROOT, "pretrain_spiral.py"), *settings["flags"],
           "--data-path", data, "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", tokenizer,
           "--save", save,
           # each run its own index cache: concurrent runs must not race on the shared one
           "--data-cache-path", os.path.join(save, "data_cache")]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads_per_job), PYTHONWARNINGS="ignore")
    for name in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(name, None)
    start = time.time()
    _run(cmd, log=os.path.join(save, "train.log"), env=env)
    say(f"= {run.name}: done in {time.time() - start:.0f} s")
    with open(settings_path, "w") as f:
        json.dump(settings, f, indent=1)
    return json.load(open(summary_path))


def run_settings(run: Run, args) -> dict:
    flags = ["--preset", "tiny", "--spiral-layout", run.layout, "--spiral-topology", run.topology,
             "--hidden-size", str(args.hidden_size), "--num-attention-heads", str(args.num_attention_heads),
             "--seq-length", str(args.seq_length), "--micro-batch-size", str(args.micro_batch_size),
             "--global-batch-size", str(args.global_batch_size), "--train-iters", str(args.train_iters),
             "--lr", str(args.lr), "--min-lr", str(args.lr / 10), "--lr-decay-style", "cosine",
             "--lr-warmup-fraction", "0.05", "--adam-beta2", "0.95", "--eval-interval", "0", "--eval-iters", str(args.eval_iters),
             "--log-interval", str(max(args.train_iters // 8, 1)), "--split", args.split,
             "--seed", str(args.seed), "--no-log-loop-diagnostics"]
    for flag, value in run.flags.items():
        flags += [flag, value]
    return {"flags": flags}


# ----------------------------------------------------------------------------- report
def model_config(run: Run, args, vocab_size: int):
    from megatron_spiral.config import SpiralConfig

    extra = {flag[len("--spiral-"):].replace("-", "_"): value for flag, value in run.flags.items()}
    return SpiralConfig(layout=run.layout, topology=run.topology, hidden_size=args.hidden_size,
                        num_attention_heads=args.num_attention_heads, vocab_size=vocab_size,
                        seq_length=args.seq_length, **extra)


def tokenizer_vocab(tokenizer: str) -> int:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(tokenizer).get_vocab_size()


def report(runs: List[Run], results: Dict[str, dict], args, vocab_size: int) -> str:
    from megatron_spiral.analysis.accounting import count_params, forward_flops, training_flops_per_sequence

    sequences = args.train_iters * args.global_batch_size
    lines = [
        f"{sequences * args.seq_length / 1e6:.2f}M training tokens per model ({args.train_iters} steps x "
        f"{args.global_batch_size} x {args.seq_length}), d={args.hidden_size}, heads={args.num_attention_heads}, "
        f"vocab={vocab_size}; validation: {args.eval_iters} x {args.micro_batch_size} held-out sequences "
        f"(--split {args.split}). * Anchor, † MeSH.",
        "",
        "| model | config | params total / non-emb (M) | prefill GFLOPs / seq | training PFLOPs | "
        "val loss | val PPL |",
        "|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        config = model_config(run, args, vocab_size)
        params = count_params(config)
        prefill = forward_flops(config, args.seq_length).total
        training = training_flops_per_sequence(config, args.seq_length) * sequences
        loss = results.get(run.name, {}).get("validation_loss")
        shown = f"{loss:.4f} | {math.exp(loss):.2f}" if loss is not None else "- | -"
        lines.append(f"| {run.label} | {run.layout.replace('x', '×')} | {params.total / 1e6:.3f} / "
                     f"{params.non_embedding / 1e6:.3f} | {prefill / 1e9:.3f} | {training / 1e15:.4f} | "
                     f"{shown} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work-dir", default=os.path.join(ROOT, "replicate_output"),
                        help="corpus, tokenizer, dataset, checkpoints and logs (default: %(default)s)")
    parser.add_argument("--data-path", help="use this preprocessed dataset prefix instead of the demo corpus")
    parser.add_argument("--tokenizer-model", help="tokenizer.json of --data-path")
    parser.add_argument("--corpus-mb", type=float, default=8, help="demo corpus size (default: %(default)s)")
    parser.add_argument("--vocab-size", type=int, default=4096, help="demo tokenizer vocabulary (default: %(default)s)")
    parser.add_argument("--models", nargs="+",
                        default=["baseline", "looped-anchor", "looped-mesh", "spiral-b-anchor",
                                 "spiral-b-mesh", "spiral-l-mesh"],
                        help="Table 1 rows to train (default: all six)")
    parser.add_argument("--ablations", action="store_true", help="also train Table 2's SpiralFormer-B variants")
    parser.add_argument("--pre", type=int, default=1, help="N_pre of the recursive models (default: %(default)s)")
    parser.add_argument("--loop", type=int, default=2, help="N_loop (default: %(default)s)")
    parser.add_argument("--post", type=int, default=1, help="N_post (default: %(default)s)")
    parser.add_argument("--hidden-size", type=int, default=128, help="model width d (default: %(default)s)")
    parser.add_argument("--num-attention-heads", type=int, default=4, help="heads (default: %(default)s)")
    parser.add_argument("--seq-length", type=int, default=256, help="tokens per sequence (default: %(default)s)")
    parser.add_argument("--micro-batch-size", type=int, default=8, help="(default: %(default)s)")
    parser.add_argument("--global-batch-size", type=int, default=16, help="sequences per step (default: %(default)s)")
    parser.add_argument("--train-iters", type=int, default=160, help="steps per model: equal tokens for all (default: %(default)s)")
    parser.add_argument("--lr", type=float, default=2e-3, help="peak LR, cosine to 10%% (default: %(default)s)")
    parser.add_argument("--eval-iters", type=int, default=16, help="validation micro-batches (default: %(default)s)")
    parser.add_argument("--split", default="98,2,0", help="train,valid,test documents (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=1234, help="weights seed, same for every model (default: %(default)s)")
    parser.add_argument("--jobs", type=int, default=2, help="trainings run at once (default: %(default)s)")
    parser.add_argument("--threads-per-job", type=int, default=1, help="OMP threads per training (default: %(default)s)")
    parser.add_argument("--retrain", action="store_true", help="retrain even when a finished run matches")
    parser.add_argument("--markdown", help="also write the table to this file")
    args = parser.parse_args(argv)
    args.work_dir = os.path.abspath(args.work_dir)

    start = time.time()
    runs = table1_runs(args) + (ablation_runs(args) if args.ablations else [])
    data, tokenizer = prepare_data(args)
    vocab_size = tokenizer_vocab(tokenizer)
    for run in runs:  # fail on a bad configuration before training anything
        model_config(run, args, vocab_size)
    with ThreadPoolExecutor(max_workers=max(args.jobs, 1)) as pool:
        futures = {run.name: pool.submit(train, run, args, data, tokenizer) for run in runs}
        results = {name: future.result() for name, future in futures.items()}
    table = report(runs, results, args, vocab_size)
    print()
    print(table)
    print(f"\ntotal wall time {time.time() - start:.0f} s; checkpoints in {args.work_dir}/runs "
          f"(probe them with tools/probe_attention.py)")
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
