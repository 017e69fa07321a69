#!/usr/bin/env python
"""Generate text with a SpiralFormer, from a Megatron checkpoint or a Hugging Face export.

Decoding uses the chunk-triggered KV caches of Algorithm 2 (prefill batched, coarse work only
when a chunk closes); prompts of different lengths decode together with exactly the tokens each
would get alone.

Examples:
  python tools/generate.py --load runs/spiral/ckpt --prompt "The capital of France is" --greedy
  python tools/generate.py --hf exports/spiral-hf --prompt-file prompts.txt \\
      --temperature 0.8 --top-p 0.95 --max-new-tokens 128 --seed 7
  python tools/generate.py --load runs/spiral/ckpt --prompt-ids "17 4 99" --greedy   # no tokenizer
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from megatron_spiral.quiet import quiet_backend_warnings


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--load", metavar="CKPT_DIR", help="megatron checkpoint (save directory or iter_* directory)")
    source.add_argument("--hf", metavar="HF_DIR", help="Hugging Face export (tools/convert_checkpoint.py --save-hf)")
    prompts = parser.add_argument_group("prompts (at least one)")
    prompts.add_argument("--prompt", action="append", default=[], metavar="TEXT", help="a prompt; repeat for a batch")
    prompts.add_argument("--prompt-file", metavar="FILE", help="one prompt per line")
    prompts.add_argument("--prompt-ids", action="append", default=[], metavar="IDS",
                         help="a prompt as whitespace-separated token ids (works without a tokenizer)")
    parser.add_argument("--tokenizer", metavar="DIR",
                        help="tokenizer directory (default: the one saved with the checkpoint / export)")
    sampling = parser.add_argument_group("sampling")
    sampling.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate per prompt (default 64)")
    sampling.add_argument("--greedy", action="store_true", help="argmax decoding (ignores temperature/top-k/top-p)")
    sampling.add_argument("--temperature", type=float, default=1.0, help="softmax temperature (default 1.0)")
    sampling.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0: off)")
    sampling.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1.0: off)")
    sampling.add_argument("--seed", type=int, default=1234, help="sampling seed (default 1234)")
    sampling.add_argument("--ignore-eos", action="store_true", help="keep generating after the EOS token")
    runtime = parser.add_argument_group("runtime")
    runtime.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    runtime.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    runtime.add_argument("--coarse-schedule", default="inline", choices=["inline", "deferred", "background"],
                         help="where coarse work of no-overlap iterations (s_t >= g_t) runs: inline "
                              "(Algorithm 2), deferred to the slot after sampling, or a background thread")
    runtime.add_argument("--json", action="store_true", help="print one JSON object per prompt")
    runtime.add_argument("--timing", action="store_true", help="print prefill and per-token latency to stderr")
    return parser


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 1


def _load_tokenizer(directory: str):
    """A fast tokenizer straight from tokenizer.json (no remote code needed), else AutoTokenizer."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if os.path.isfile(os.path.join(directory, "tokenizer.json")):
        return PreTrainedTokenizerFast.from_pretrained(directory)
    return AutoTokenizer.from_pretrained(directory, trust_remote_code=True)


def _read_prompts(args):
    texts = list(args.prompt)
    if args.prompt_file:
        if not os.path.isfile(args.prompt_file):
            raise ValueError(f"--prompt-file {args.prompt_file} does not exist")
        with open(args.prompt_file, encoding="utf-8") as f:
            texts += [line.rstrip("\n") for line in f if line.strip()]
    id_prompts = []
    for text in args.prompt_ids:
        try:
            id_prompts.append([int(t) for t in text.split()])
        except ValueError:
            raise ValueError(f"--prompt-ids {text!r} must be whitespace-separated integers") from None
    if not texts and not id_prompts:
        raise ValueError("give at least one --prompt, --prompt-file or --prompt-ids")
    return texts, id_prompts


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    quiet_backend_warnings(hide_deprecations=True)
    try:
        texts, id_prompts = _read_prompts(args)
        if args.max_new_tokens < 1:
            raise ValueError("--max-new-tokens must be >= 1")
    except ValueError as err:
        return _fail(str(err))

    import torch

    from transformers.utils import logging as hf_logging

    from megatron_spiral.inference import SamplingConfig, generate, load_for_decoding

    hf_logging.disable_progress_bar()

    path = args.load or args.hf
    if not os.path.exists(path):
        return _fail(f"{path} does not exist")
    if args.hf and not os.path.isfile(os.path.join(args.hf, "config.json")):
        return _fail(f"--hf {args.hf} has no config.json; pass a directory written by convert_checkpoint.py --save-hf")
    dtype = getattr(torch, args.dtype)  # argparse choices: float32, bfloat16, float16
    sampling = SamplingConfig(greedy=args.greedy, temperature=args.temperature, top_k=args.top_k,
                              top_p=args.top_p, seed=args.seed)
    import torch.distributed as dist

    owns_process_group = not dist.is_initialized()  # a megatron checkpoint sets one up to load
    try:
        sampling.validate()
        print(f"loading {path} ...", file=sys.stderr, flush=True)
        model, tokenizer_dir = load_for_decoding(path, device=args.device, dtype=dtype)
    except Exception as err:  # checkpoint/config errors carry their own explanation
        return _fail(f"could not load {path}: {err}")
    finally:
        if args.load and owns_process_group:
            from megatron_spiral.parallel import destroy_parallel

            destroy_parallel()

    tokenizer_dir = args.tokenizer or tokenizer_dir
    if texts and tokenizer_dir is None:
        return _fail(f"{path} has no tokenizer; pass --tokenizer DIR or use --prompt-ids")
    tokenizer = None
    if tokenizer_dir is not None:
        try:
            tokenizer = _load_tokenizer(tokenizer_dir)
        except Exception as err:
            if texts:
                return _fail(f"cannot load the tokenizer in {tokenizer_dir}: {err}")
    prompts = [tokenizer(t, add_special_tokens=False).input_ids for t in texts] + id_prompts
    if any(not p for p in prompts):
        return _fail("a prompt encodes to zero tokens; give non-empty prompts")
    eos = None if args.ignore_eos else model.config.eos_token_id
    try:
        start = time.perf_counter()
        result = generate(model, prompts, args.max_new_tokens, sampling, eos_token_id=eos,
                          coarse_schedule=args.coarse_schedule)
        elapsed = time.perf_counter() - start
    except ValueError as err:
        return _fail(str(err))

    for index, (prompt, tokens) in enumerate(zip(prompts, result.tokens)):
        is_text = index < len(texts)
        if tokenizer is not None:  # decode prompt + completion together so spacing is right
            full = tokenizer.decode(prompt + tokens)
            completion = full[len(tokenizer.decode(prompt)):]
        else:
            completion = full = " ".join(map(str, tokens))
        label = texts[index] if is_text else " ".join(map(str, prompt))
        if args.json:
            print(json.dumps({"prompt": label, "prompt_ids": prompt, "completion": completion, "ids": tokens}))
        elif is_text:
            print(full)
        else:
            print(f"[{label}] -> {completion}")
    if args.timing:
        steps = sorted(result.critical_s)
        median = steps[len(steps) // 2] * 1e3 if steps else float("nan")
        print(f"prefill {result.prefill_s * 1e3:.1f} ms, median per-token {median:.2f} ms, "
              f"total {elapsed:.2f} s for {sum(map(len, result.tokens))} tokens", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
