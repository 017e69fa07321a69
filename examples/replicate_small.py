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

Seeds and recipes: ``--seeds N`` trains every row N times (seed k sets both the weights seed and
the data-order seed to --seed + k, so the rows of one seed see the same data in the same order) and
reports mean +- standard deviation over the seeds, then which differences exceed two standard
errors. ``--recipes authors today`` trains each row under both recipes (authors: embeddings x
sqrt(d) and unrolled-depth init, today's defaults; today: neither, the code before issue 12).
``--loop-stats`` also measures ||h0||/||v||, per-iteration update norms and MeSH router entropies
at initialisation and after training (tools/loop_stats.py) and over training (TensorBoard).

Example:
  python examples/replicate_small.py                       # Table 1 rows
  python examples/replicate_small.py --ablations           # + Table 2 rows
  python examples/replicate_small.py --models looped-anchor looped-mesh --seeds 3 \
      --recipes authors today --loop-stats                 # the multi-seed MeSH-vs-Anchor study
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
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


# Recipe name -> SpiralConfig fields (docs/recipe.md). "authors" is the MeSH paper's App. B.
RECIPES = {
    "authors": {"embedding_scale": "sqrt_d", "output_init_depth": "unrolled"},
    "today": {"embedding_scale": "none", "output_init_depth": "unique"},
}


@dataclass(frozen=True)
class Trial:
    """One training: a row under one recipe with one seed index."""

    run: Run
    recipe: str
    seed_index: int

    @property
    def name(self) -> str:
        return f"{self.run.name}-{self.recipe}-s{self.seed_index}"


def trials(runs: List[Run], recipes: List[str], seeds: int) -> List[Trial]:
    """Seed-major order, so the first seed of every row finishes before the second starts."""
    return [Trial(run, recipe, k) for k in range(seeds) for recipe in recipes for run in runs]


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
        # MeSH whose routers start on one slot (h0 ~ v, residual steps): the Anchor-like start
        "looped-mesh-res": Run("looped-mesh-res", "LoopedFormer† (residual router init)",
                               f"{pre}+{loop}x{{1,1}}+{post}", "mesh", {"--spiral-mesh-router-init": "residual"}),
        "spiral-b-mesh-res": Run("spiral-b-mesh-res", "SpiralFormer-B† (residual router init)",
                                 f"{pre}+{loop}x{{1/8,1/4,1/2,1}}+{post}", "mesh",
                                 {"--spiral-mesh-router-init": "residual"}),
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
def train(trial: Trial, args, data: str, tokenizer: str) -> dict:
    run = trial.run
    save = os.path.join(args.work_dir, "runs", trial.name)
    summary_path = os.path.join(save, "run_summary.json")
    settings = run_settings(trial, args)
    settings_path = os.path.join(save, "replicate_settings.json")
    if os.path.exists(summary_path) and os.path.exists(settings_path) and not args.retrain:
        if json.load(open(settings_path)) == settings:  # same command as before: reuse
            say(f"= {trial.name}: reusing {summary_path}")
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
    summary = json.load(open(summary_path))
    summary["train_seconds"] = time.time() - start
    if args.loop_stats and not run.layout.isdigit():  # a plain stack has no loop to measure
        summary["loop_trajectory"] = read_trajectory(os.path.join(save, "tensorboard"))
    with open(summary_path, "w") as f:
        json.dump(summary, f, indent=1)
    say(f"= {trial.name}: done in {time.time() - start:.0f} s, validation loss "
        f"{summary.get('validation_loss')}")
    with open(settings_path, "w") as f:
        json.dump(settings, f, indent=1)
    return summary


def measure_loop_stats(all_trials: List[Trial], results: Dict[str, dict], args, data: str) -> None:
    """tools/loop_stats.py (one process for every looped run) at initialisation with the run's
    seed and on its trained checkpoint; stored as results[name]["loop_stats"]."""
    chosen = [t for t in all_trials if t.name in results and not t.run.layout.isdigit()
              and "loop_stats" not in results[t.name]]  # a reused run keeps its measurement
    if not chosen:
        return
    cmd = [sys.executable, os.path.join(ROOT, "tools", "loop_stats.py"), "--data-prefix", data, "--init-seeds"]
    cmd += [str(args.seed + t.seed_index) for t in chosen]
    for trial in chosen:
        cmd += ["--load", os.path.join(args.work_dir, "runs", trial.name)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode:
        say(f"! loop_stats.py failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
        return
    for trial, line in zip(chosen, proc.stdout.strip().splitlines()):
        results[trial.name]["loop_stats"] = json.loads(line)
        with open(os.path.join(args.work_dir, "runs", trial.name, "run_summary.json"), "w") as f:
            json.dump(results[trial.name], f, indent=1)


def read_trajectory(tensorboard_dir: str) -> Dict[str, list]:
    """The per-loop diagnostics the trainer logged (loop/* tags): tag -> [[step, value], ...]."""
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError:
        return {}
    events = EventAccumulator(tensorboard_dir, size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [[e.step, e.value] for e in events.Scalars(tag)]
            for tag in events.Tags().get("scalars", []) if tag.startswith("loop/")}


def run_settings(trial: Trial, args) -> dict:
    run, seed = trial.run, args.seed + trial.seed_index
    flags = ["--preset", "tiny", "--spiral-layout", run.layout, "--spiral-topology", run.topology,
             "--hidden-size", str(args.hidden_size), "--num-attention-heads", str(args.num_attention_heads),
             "--seq-length", str(args.seq_length), "--micro-batch-size", str(args.micro_batch_size),
             "--global-batch-size", str(args.global_batch_size), "--train-iters", str(args.train_iters),
             "--lr", str(args.lr), "--min-lr", str(args.lr / 10), "--lr-decay-style", "cosine",
             "--lr-warmup-fraction", "0.05", "--adam-beta2", "0.95", "--eval-interval", "0", "--eval-iters", str(args.eval_iters),
             "--log-interval", str(max(args.train_iters // 8, 1)), "--split", args.split,
             "--seed", str(seed), "--data-seed", str(seed)]
    flags += ["--log-loop-diagnostics", "--tensorboard-dir", os.path.join(
        args.work_dir, "runs", trial.name, "tensorboard")] if args.loop_stats else ["--no-log-loop-diagnostics"]
    for field_name, value in RECIPES[trial.recipe].items():
        flags += ["--spiral-" + field_name.replace("_", "-"), value]
    for flag, value in run.flags.items():
        flags += [flag, value]
    return {"flags": flags, "seed": seed}


# ----------------------------------------------------------------------------- statistics
def mean_std(values: List[float]) -> tuple:
    """(mean, sample standard deviation with n - 1; 0 for one value)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))


def difference(a: List[float], b: List[float]) -> dict:
    """mean(a) - mean(b) with its standard error, unpaired (sqrt(s_a^2/n_a + s_b^2/n_b)) and,
    when both lists hold the same seeds in the same order, paired (sd of a_k - b_k over sqrt n)."""
    (mean_a, sd_a), (mean_b, sd_b) = mean_std(a), mean_std(b)
    out = {"diff": mean_a - mean_b, "se": math.sqrt(sd_a ** 2 / len(a) + sd_b ** 2 / len(b)), "n": (len(a), len(b))}
    if len(a) == len(b) and len(a) > 1:
        out["paired_se"] = mean_std([x - y for x, y in zip(a, b)])[1] / math.sqrt(len(a))
    out["significant"] = out["se"] > 0 and abs(out["diff"]) > 2 * out["se"]
    return out


TWINS = [("looped-mesh", "looped-anchor"), ("spiral-b-mesh", "spiral-b-anchor"),
         ("looped-mesh-res", "looped-anchor"), ("spiral-b-mesh-res", "spiral-b-anchor"),
         ("looped-mesh-res", "looped-mesh"), ("spiral-b-mesh-res", "spiral-b-mesh")]


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


def losses_by_row(all_trials: List[Trial], results: Dict[str, dict]) -> Dict[tuple, List[float]]:
    """(row name, recipe) -> validation losses in seed order (missing runs left out)."""
    out: Dict[tuple, List[float]] = {}
    for trial in sorted(all_trials, key=lambda t: t.seed_index):
        loss = results.get(trial.name, {}).get("validation_loss")
        if loss is not None:
            out.setdefault((trial.run.name, trial.recipe), []).append(loss)
    return out


def report(runs: List[Run], all_trials: List[Trial], results: Dict[str, dict], args, vocab_size: int) -> str:
    from megatron_spiral.analysis.accounting import count_params, forward_flops, training_flops_per_sequence

    sequences = args.train_iters * args.global_batch_size
    losses = losses_by_row(all_trials, results)
    lines = [
        f"{sequences * args.seq_length / 1e6:.2f}M training tokens per model ({args.train_iters} steps x "
        f"{args.global_batch_size} x {args.seq_length}), d={args.hidden_size}, heads={args.num_attention_heads}, "
        f"vocab={vocab_size}; validation: {args.eval_iters} x {args.micro_batch_size} held-out sequences "
        f"(--split {args.split}); seeds {args.seed}..{args.seed + args.seeds - 1} (weights and data order). "
        "* Anchor, † MeSH. Loss: mean ± sample std over n seeds.",
        "",
        "| model | config | recipe | params total / non-emb (M) | prefill GFLOPs / seq | training PFLOPs | "
        "val loss | n | val PPL (of mean) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for recipe in args.recipes:
        for run in runs:
            config = model_config(run, args, vocab_size)
            params = count_params(config)
            prefill = forward_flops(config, args.seq_length).total
            training = training_flops_per_sequence(config, args.seq_length) * sequences
            values = losses.get((run.name, recipe), [])
            if values:
                mean, sd = mean_std(values)
                shown = f"{mean:.4f} ± {sd:.4f} | {len(values)} | {math.exp(mean):.2f}"
            else:
                shown = "- | 0 | -"
            lines.append(f"| {run.label} | {run.layout.replace('x', '×')} | {recipe} | {params.total / 1e6:.3f} / "
                         f"{params.non_embedding / 1e6:.3f} | {prefill / 1e9:.3f} | {training / 1e15:.4f} | "
                         f"{shown} |")
    pairs = [((a, r), (b, r)) for r in args.recipes for a, b in TWINS]
    pairs += [((run.name, r1), (run.name, r2)) for run in runs
              for i, r1 in enumerate(args.recipes) for r2 in args.recipes[i + 1:]]
    rows = []
    for first, second in pairs:
        if len(losses.get(first, [])) < 2 or len(losses.get(second, [])) < 2:
            continue
        d = difference(losses[first], losses[second])
        paired = f"{d['paired_se']:.4f}" if "paired_se" in d else "-"
        rows.append(f"| {first[0]} ({first[1]}) − {second[0]} ({second[1]}) | {d['diff']:+.4f} | "
                    f"{d['se']:.4f} | {paired} | {'yes' if d['significant'] else 'no'} |")
    if rows:
        lines += ["", "Differences of mean validation loss (negative: the first is better). SE: standard "
                  "error of the difference, unpaired; paired SE uses the per-seed differences.", "",
                  "| comparison | Δ loss | SE | paired SE | \|Δ\| > 2 SE |", "|---|---|---|---|---|"] + rows
    stats = loop_stats_table(runs, all_trials, results, args)
    if stats:
        lines += ["", stats]
    return "\n".join(lines)


def loop_stats_table(runs: List[Run], all_trials: List[Trial], results: Dict[str, dict], args) -> str:
    """Mean ± std over seeds of the loop statistics (init -> final), for the looped rows."""
    gathered: Dict[tuple, Dict[str, List[float]]] = {}
    for trial in all_trials:
        stats = results.get(trial.name, {}).get("loop_stats")
        if not stats:
            continue
        row = gathered.setdefault((trial.run.name, trial.recipe), {})
        for when in ("init", "final"):
            values = stats[when]
            reads = [v for k, v in values.items() if k.startswith("read_entropy/")]
            updates = [v for k, v in values.items() if k.startswith("update_norm/")]
            row.setdefault(f"h0_over_v/{when}", []).append(values["h0_over_v"])
            if reads:
                row.setdefault(f"read_entropy/{when}", []).append(sum(reads) / len(reads))
            if updates:
                row.setdefault(f"update_first/{when}", []).append(updates[0])
                row.setdefault(f"update_last/{when}", []).append(updates[-1])
    if not gathered:
        return ""

    def cell(row, key):
        values = row.get(key)
        if not values:
            return "-"
        mean, sd = mean_std(values)
        return f"{mean:.3f} ± {sd:.3f}"

    lines = ["Loop statistics on 8 held-out sequences, init → final (mean ± std over seeds): ||h0||/||v||, "
             "mean MeSH read-router entropy (nats; uniform = log B), mean token norm of the first and last "
             "iteration's update u~.", "",
             "| model | recipe | ‖h0‖/‖v‖ init | final | read entropy init | final | ‖u~_0‖ init | final | "
             "‖u~_T-1‖ init | final |", "|---|---|---|---|---|---|---|---|---|---|"]
    for recipe in args.recipes:
        for run in runs:
            row = gathered.get((run.name, recipe))
            if row is None:
                continue
            cells = [cell(row, f"{k}/{w}") for k in ("h0_over_v", "read_entropy", "update_first", "update_last")
                     for w in ("init", "final")]
            lines.append(f"| {run.name} | {recipe} | " + " | ".join(cells) + " |")
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
    parser.add_argument("--seed", type=int, default=1234,
                        help="first seed (weights and data order), same for every model (default: %(default)s)")
    parser.add_argument("--seeds", type=int, default=1,
                        help="train every row with seeds --seed, --seed+1, ...; report mean ± std (default: %(default)s)")
    parser.add_argument("--recipes", nargs="+", choices=list(RECIPES), default=["authors"],
                        help="training recipes to run each row under: 'authors' (embeddings x sqrt(d), "
                             "unrolled-depth init; the default) and/or 'today' (neither) (default: authors)")
    parser.add_argument("--loop-stats", action="store_true",
                        help="measure ||h0||/||v||, update norms and MeSH router entropies (init, final, "
                             "and over training via TensorBoard)")
    parser.add_argument("--jobs", type=int, default=2, help="trainings run at once (default: %(default)s)")
    parser.add_argument("--threads-per-job", type=int, default=1, help="OMP threads per training (default: %(default)s)")
    parser.add_argument("--retrain", action="store_true", help="retrain even when a finished run matches")
    parser.add_argument("--markdown", help="also write the table to this file")
    args = parser.parse_args(argv)
    args.work_dir = os.path.abspath(args.work_dir)
    if args.seeds < 1:
        parser.error(f"--seeds must be >= 1, got {args.seeds}")

    start = time.time()
    runs = table1_runs(args) + (ablation_runs(args) if args.ablations else [])
    data, tokenizer = prepare_data(args)
    vocab_size = tokenizer_vocab(tokenizer)
    for run in runs:  # fail on a bad configuration before training anything
        model_config(run, args, vocab_size)
    all_trials = trials(runs, args.recipes, args.seeds)
    results, failed = {}, []
    with ThreadPoolExecutor(max_workers=max(args.jobs, 1)) as pool:
        futures = {pool.submit(train, trial, args, data, tokenizer): trial.name for trial in all_trials}
        for future in as_completed(futures):
            try:
                results[futures[future]] = future.result()
            except (Exception, SystemExit) as err:  # one failed training must not lose the others
                failed.append(futures[future])
                say(f"! {futures[future]} failed: {err}")
            if args.markdown:  # the table so far: a study cut short still reports what ran
                with open(args.markdown, "w") as f:
                    f.write(report(runs, all_trials, results, args, vocab_size) + "\n")
    if args.loop_stats:
        say("measuring loop statistics (init and final) of the looped runs")
        measure_loop_stats(all_trials, results, args, data)
    table = report(runs, all_trials, results, args, vocab_size)
    print()
    print(table)
    print(f"\ntotal wall time {time.time() - start:.0f} s; checkpoints in {args.work_dir}/runs "
          f"(probe them with tools/probe_attention.py)")
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(table + "\n")
    if failed:
        print(f"{len(failed)} training(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
