#!/usr/bin/env python
"""Benchmark tools/preprocess_data.py: tokens/s with 1 and 2 workers, and where the time goes.

Builds a >= 50 MB English-like corpus (sentences of Python standard-library docstrings, parsed
with ``ast`` -- nothing is imported or downloaded -- reshuffled into documents), writes it as a
Pile-like .jsonl.zst, trains a ~50k byte-level BPE on part of it with the same code as
tools/train_tokenizer.py, then runs the preprocessing pipeline. Prints figures; asserts nothing.

    python bench/bench_preprocess.py [--mb 64] [--workdir /tmp/bench_preprocess]
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import random
import re
import subprocess
import sys
import sysconfig
import textwrap
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def stdlib_text() -> tuple:
    """(sentences of docstrings, source code of functions) from the standard library's .py files.

    Files are parsed with ``ast``, never imported. Code documents matter: prose alone from docstrings
    has too few distinct words for a BPE to reach a ~50k vocabulary (it stops near 23k).
    """
    root = sysconfig.get_paths()["stdlib"]
    sentences, functions = set(), []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "idlelib", "__pycache__"))
        for name in sorted(filenames):
            if not name.endswith(".py"):
                continue
            try:
                with open(os.path.join(dirpath, name), encoding="utf-8") as f:
                    source = f.read()
                tree = ast.parse(source)
            except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
                continue
            lines = source.splitlines()
            for node in ast.walk(tree):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    segment = textwrap.dedent("\n".join(lines[node.lineno - 1 : node.end_lineno]))
                    if 200 <= len(segment) <= 20000:
                        functions.append(segment)
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    doc = ast.get_docstring(node)
                    if doc:
                        for s in re.split(r"(?<=[.!?])\s+", " ".join(doc.split())):
                            if 20 <= len(s) <= 400:
                                sentences.add(s)
    return sorted(sentences), functions


def write_corpus(path: str, megabytes: float, seed: int = 0) -> int:
    """Pile-like JSON lines: 3/4 prose (shuffled docstring sentences), 1/4 code; returns #documents."""
    import zstandard

    rng = random.Random(seed)
    sentences, functions = stdlib_text()
    target, written, docs = int(megabytes * 2**20), 0, 0
    cctx = zstandard.ZstdCompressor(level=3)
    with open(path, "wb") as raw, cctx.stream_writer(raw) as out:
        while written < target:
            if rng.random() < 0.25:
                text, subset = "\n\n".join(rng.sample(functions, rng.randint(1, 4))), "Github"
            else:
                paragraphs = [
                    " ".join(rng.choice(sentences) for _ in range(rng.randint(1, 8)))
                    for _ in range(rng.randint(1, 12))
                ]
                text, subset = "\n\n".join(paragraphs), rng.choice(["Pile-CC", "ArXiv", "Wikipedia (en)"])
            data = (json.dumps({"text": text, "meta": {"pile_set_name": subset}}) + "\n").encode("utf-8")
            out.write(data)
            written += len(data)
            docs += 1
    return docs


def stage_breakdown(corpus: str, tokenizer_json: str, megabytes: float = 8.0) -> dict:
    """Seconds per MB of JSON lines for each pipeline stage, in one process with one tokenizer
    thread, chunk by chunk exactly like a worker."""
    import numpy as np
    import orjson
    from tokenizers import Tokenizer

    from megatron_spiral.data.jsonl import iter_chunks, split_lines

    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    tok = Tokenizer.from_file(tokenizer_json)
    spent = dict.fromkeys(("read+decompress", "json", "tokenize", "pack", "write"), 0.0)
    size = tokens = 0
    chunks = iter_chunks(corpus)
    with open(os.devnull, "wb") as sink:
        while size < megabytes * 2**20:
            t0 = time.perf_counter()
            chunk = next(chunks, None)
            if chunk is None:
                break
            t1 = time.perf_counter()
            texts = [orjson.loads(line)["text"] for line in split_lines(chunk.blob)]
            t2 = time.perf_counter()
            ids = [e.ids for e in tok.encode_batch_fast(texts, add_special_tokens=False)]
            t3 = time.perf_counter()
            n = sum(map(len, ids))
            arr = np.fromiter((t for d in ids for t in d), dtype=np.uint16, count=n)
            t4 = time.perf_counter()
            sink.write(arr.tobytes())
            t5 = time.perf_counter()
            for key, dt in zip(spent, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4)):
                spent[key] += dt
            size += len(chunk.blob)
            tokens += n
    mb = size / 2**20
    out = {"MB measured": mb, "tokens": tokens}
    out.update({f"{k} s/MB": v / mb for k, v in spent.items()})
    out["tokenize-only tokens/s (1 thread)"] = tokens / spent["tokenize"]
    return out


def run_tool(corpus: str, tok_json: str, prefix: str, workers: int, tokenizer_threads: bool) -> dict:
    """Run tools/preprocess_data.py as a user would and parse its summary."""
    env = dict(os.environ)
    env.pop("TOKENIZERS_PARALLELISM", None)
    if not tokenizer_threads:
        env["TOKENIZERS_PARALLELISM"] = "false"
    tool = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools", "preprocess_data.py")
    cmd = [sys.executable, tool, "--input", corpus, "--output-prefix", prefix, "--workers", str(workers),
           "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", tok_json, "--append-eod",
           "--no-progress"]
    t = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    lines = done.stdout.splitlines()
    throughput = next(l for l in lines if "throughput" in l)
    m = re.search(r"([\d.,]+) s, ([\d,]+) docs/s, ([\d,]+) tokens/s, ([\d.,]+) MB/s", throughput)
    tokens = next(l for l in lines if "tokens     :" in l)
    return {
        "elapsed": float(m.group(1).replace(",", "")), "tokens_per_s": int(m.group(3).replace(",", "")),
        "mb_per_s": float(m.group(4).replace(",", "")), "wall": wall,
        "tokens": int(re.search(r": ([\d,]+) \(", tokens).group(1).replace(",", "")),
        "time_spent": next(l for l in lines if "time spent" in l).split(":", 1)[1].strip(),
    } | {"cpu": float(re.search(r"CPU ([\d.,]+) s", throughput + "".join(lines)).group(1).replace(",", ""))}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=float, default=64.0, help="corpus size in MB of JSON lines (default 64)")
    parser.add_argument("--vocab-size", type=int, default=50304, help="BPE vocabulary (default 50304)")
    parser.add_argument("--train-mb", type=float, default=64.0, help="MB of text to train the BPE on")
    parser.add_argument("--workdir", default="/tmp/bench_preprocess", help="scratch directory (reused)")
    parser.add_argument("--repeats", type=int, default=2, help="runs per configuration; the best is shown")
    args = parser.parse_args()

    from megatron_spiral.data.tokenizer_training import TrainTokenizerConfig, train_tokenizer

    os.makedirs(args.workdir, exist_ok=True)
    corpus = os.path.join(args.workdir, f"corpus_{args.mb:g}mb.jsonl.zst")
    if not os.path.exists(corpus):
        t = time.perf_counter()
        docs = write_corpus(corpus + ".tmp", args.mb)
        os.replace(corpus + ".tmp", corpus)
        print(f"corpus: {docs:,} documents, {args.mb:g} MB of JSON lines "
              f"({os.path.getsize(corpus) / 2**20:.1f} MB zstd) in {time.perf_counter() - t:.1f} s")
    tok_dir = os.path.join(args.workdir, f"bpe{args.vocab_size}")
    tok_json = os.path.join(tok_dir, "tokenizer.json")
    if not os.path.exists(tok_json):
        t = time.perf_counter()
        train_tokenizer(TrainTokenizerConfig(input=[corpus], output_dir=tok_dir, vocab_size=args.vocab_size,
                                             max_mb=args.train_mb, min_frequency=1, progress=False))
        print(f"tokenizer: trained on {args.train_mb:g} MB in {time.perf_counter() - t:.1f} s")
    from tokenizers import Tokenizer

    print(f"tokenizer: byte-level BPE, vocabulary {Tokenizer.from_file(tok_json).get_vocab_size():,}")
    print(f"machine: {os.cpu_count()} CPU cores, python {sys.version.split()[0]}")
    print("single-process stage costs (seconds per MB of JSON lines, one tokenizer thread):")
    for key, value in stage_breakdown(corpus, tok_json).items():
        print(f"  {key:36s} {value:,.3f}" if isinstance(value, float) else f"  {key:36s} {value:,}")
    runs = [
        ("--workers 1 (TOKENIZERS_PARALLELISM=false: one core)", 1, False),
        ("--workers 2 (two single-threaded worker processes)", 2, False),
        ("--workers 1 (tokenizers' own thread pool, default env)", 1, True),
    ]
    for label, workers, threads in runs:
        load = os.getloadavg()[0]
        prefix = os.path.join(args.workdir, f"out_w{workers}_{int(threads)}")
        r = max((run_tool(corpus, tok_json, prefix, workers, threads) for _ in range(args.repeats)),
                key=lambda x: x["tokens_per_s"])
        print(f"{label}: {r['tokens_per_s']:,} tokens/s, {r['mb_per_s']:.2f} MB/s "
              f"({r['tokens']:,} tokens in {r['elapsed']:.1f} s; {r['wall']:.1f} s wall incl. start-up)")
        print(f"  time spent: {r['time_spent']}")
        print(f"  tokenizer CPU time {r['cpu']:.1f} s over {r['elapsed']:.1f} s = {r['cpu'] / r['elapsed']:.2f} cores busy "
              f"on average; 1-min load average before the run {load:.2f} (other jobs on the machine compete)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
