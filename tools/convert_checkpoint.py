#!/usr/bin/env python
"""Convert SpiralFormer checkpoints between Megatron and Hugging Face formats.

Megatron -> Hugging Face (any TP size the checkpoint was saved with; built at TP=1 here):
  python tools/convert_checkpoint.py --load runs/spiral/ckpt --save-hf exports/spiral-hf
  # then, with only torch + transformers installed:
  #   AutoModelForCausalLM.from_pretrained("exports/spiral-hf", trust_remote_code=True)

Hugging Face -> Megatron (iteration 0, weights only; pretrain_spiral.py --load continues from it
with fresh optimizer state):
  python tools/convert_checkpoint.py --load-hf exports/spiral-hf --save runs/continued/ckpt

The export holds config.json (with auto_map), configuration_spiral.py, equations_spiral.py,
modeling_spiral.py, cache_spiral.py, model.safetensors, generation_config.json and the checkpoint's tokenizer files
(iter_*/tokenizer/) when it has them. The vocabulary is the real one (padded rows are dropped).
It is written to a temporary directory, verified against the megatron logits (max abs diff,
fp32 <= 1e-4) and only then renamed into place.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from megatron_spiral.quiet import quiet_backend_warnings


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    to_hf = parser.add_argument_group("Megatron -> Hugging Face")
    to_hf.add_argument("--load", metavar="CKPT_DIR",
                       help="megatron save directory (with latest_checkpointed_iteration.txt) or an iter_* directory")
    to_hf.add_argument("--save-hf", metavar="OUT_DIR", help="directory to write the Hugging Face model into")
    to_hf.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                       help="dtype of the exported weights (default float32)")
    to_hf.add_argument("--no-verify", action="store_true",
                       help="skip reloading the export and comparing its logits with megatron's")
    from_hf = parser.add_argument_group("Hugging Face -> Megatron")
    from_hf.add_argument("--load-hf", metavar="HF_DIR", help="directory written by --save-hf (or save_pretrained)")
    from_hf.add_argument("--save", metavar="CKPT_DIR", help="megatron save directory to write iteration 0 into")
    parser.add_argument("--force", action="store_true", help="replace an existing output")
    parser.add_argument("--json", action="store_true", help="print a JSON summary on stdout")
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    exporting = args.load is not None or args.save_hf is not None
    importing = args.load_hf is not None or args.save is not None
    if exporting == importing:
        parser.error("give either --load CKPT_DIR --save-hf OUT_DIR, or --load-hf HF_DIR --save CKPT_DIR")
    if exporting and not (args.load and args.save_hf):
        parser.error("--load and --save-hf go together")
    if importing and not (args.load_hf and args.save):
        parser.error("--load-hf and --save go together")

    quiet_backend_warnings(hide_deprecations=True)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    from megatron_spiral.checkpointing import CheckpointError
    from megatron_spiral.config import SpiralConfigError
    from megatron_spiral.hf.convert import ConversionError, export_to_hf, import_from_hf, progress_to_stderr
    from megatron_spiral.parallel import destroy_parallel

    import torch.distributed as dist

    owns_process_group = not dist.is_initialized()  # callers (tests) may hold their own
    try:
        if exporting:
            summary = export_to_hf(args.load, args.save_hf, dtype=args.dtype, force=args.force,
                                   verify=not args.no_verify, progress=progress_to_stderr)
            message = f"wrote {summary['output']}"
            if "max_abs_diff" in summary:
                message += f" (verified: max |logits diff| = {summary['max_abs_diff']:.2e})"
            if not summary.get("tokenizer"):
                message += "; the checkpoint has no tokenizer/ directory, so none was exported"
        else:
            if not os.path.isdir(args.load_hf):
                raise ConversionError(f"--load-hf {args.load_hf} is not a directory")
            final = import_from_hf(args.load_hf, args.save, force=args.force, progress=progress_to_stderr)
            summary = {"output": final}
            message = f"wrote {final}; continue training with --load {args.save}"
    except (CheckpointError, ConversionError, SpiralConfigError, ValueError, KeyError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    finally:
        if owns_process_group:
            destroy_parallel()
    print(message, file=sys.stderr)
    if args.json:
        print(json.dumps(summary, indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
