#!/usr/bin/env python
"""Tokenize JSON lines (e.g. the Pile's .jsonl.zst shards) into Megatron indexed datasets.

Example (one Pile shard, GPT-NeoX-20B tokenizer, pretraining with EOD separators):

    python tools/preprocess_data.py --input pile/train/00.jsonl.zst --output-prefix data/pile_00 \\
        --tokenizer-type HuggingFaceTokenizer --tokenizer-model 20B_tokenizer.json \\
        --append-eod --workers 2

writes data/pile_00_text_document.bin/.idx, readable by megatron.core's IndexedDataset and usable as
``--data-path data/pile_00_text_document``. docs/data.md has every flag and the full Pile recipe.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_spiral.cli import add_dataclass_arguments, dataclass_from_args  # noqa: E402
from megatron_spiral.data.config import PreprocessConfig  # noqa: E402
from megatron_spiral.tokenizer import TokenizerConfig  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="preprocess_data.py",
        description=__doc__.split("\n\n")[0],
        epilog="Exit status: 0 on success, 1 on bad input or flags (nothing is written), 130 if interrupted.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_dataclass_arguments(parser, PreprocessConfig, "input and output")
    add_dataclass_arguments(parser, TokenizerConfig, "tokenizer", "Local tokenizer files only; nothing is downloaded.")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    cfg = dataclass_from_args(PreprocessConfig, args)
    tok_cfg = dataclass_from_args(TokenizerConfig, args)
    from megatron_spiral.data.jsonl import InputError
    from megatron_spiral.data.preprocess import PreprocessError, run_preprocess
    from megatron_spiral.tokenizer import TokenizerError

    try:
        summary = run_preprocess(cfg, tok_cfg)
    except (InputError, PreprocessError, TokenizerError) as exc:
        print(f"preprocess_data.py: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("preprocess_data.py: interrupted; nothing was written.", file=sys.stderr)
        return 130
    print(summary.format())
    return 0


if __name__ == "__main__":
    sys.exit(main())
