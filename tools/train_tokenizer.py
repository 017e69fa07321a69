#!/usr/bin/env python
"""Train a byte-level BPE (tokenizer.json) or SentencePiece tokenizer offline from JSON lines.

Example (a ~50k byte-level BPE from 1 GB of the first Pile shard):

    python tools/train_tokenizer.py --input pile/train/00.jsonl.zst --output-dir tok/ \\
        --type bpe --vocab-size 50304 --max-mb 1024

then preprocess with ``--tokenizer-type HuggingFaceTokenizer --tokenizer-model tok/tokenizer.json``.
BPE tokenizers get <|endoftext|> (EOD, id 0) and <|padding|> (pad, id 1); the directory also holds
tokenizer_config.json and special_tokens_map.json for transformers.AutoTokenizer.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_spiral.cli import add_dataclass_arguments, dataclass_from_args  # noqa: E402
from megatron_spiral.data.tokenizer_training import TrainTokenizerConfig  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="train_tokenizer.py",
        description=__doc__.split("\n\n")[0],
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_dataclass_arguments(parser, TrainTokenizerConfig, "tokenizer training")
    return parser


def main(argv=None) -> int:
    cfg = dataclass_from_args(TrainTokenizerConfig, build_parser().parse_args(argv))
    from megatron_spiral.data.jsonl import InputError
    from megatron_spiral.data.tokenizer_training import train_tokenizer, usage_flags
    from megatron_spiral.tokenizer import TokenizerError

    try:
        path = train_tokenizer(cfg)
    except (InputError, TokenizerError, ValueError, RuntimeError) as exc:
        print(f"train_tokenizer.py: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("train_tokenizer.py: interrupted.", file=sys.stderr)
        return 130
    print(f"wrote {path}\nuse it with: {usage_flags(path)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
