#!/usr/bin/env python
"""Pretrain SpiralFormer (and its LoopedFormer / Pythia baselines) with megatron-core.

    torchrun --nproc_per_node=8 pretrain_spiral.py --preset spiral-b-410m-mesh \\
        --data-path /data/pile_text_document --tokenizer-type HuggingFaceTokenizer \\
        --tokenizer-model 20B_tokenizer.json --bf16 --save ckpt --load ckpt ...
    python pretrain_spiral.py --preset tiny --mock-data --train-iters 20     # one CPU process

Run ``--help`` for every flag (Megatron's names). Any failure prints one ``error:`` line naming
what failed and exits non-zero on every rank within seconds (megatron_spiral/training/failure.py).
"""

import sys

from megatron_spiral.quiet import quiet_backend_warnings

quiet_backend_warnings()  # the run states its layer spec instead (" > model: ... layer spec=local")


def main(argv=None) -> int:
    from megatron_spiral.training.arguments import parse_args
    from megatron_spiral.training.entry import pretrain
    from megatron_spiral.training.failure import run_guarded

    return run_guarded(lambda: pretrain(parse_args(argv)))


if __name__ == "__main__":  # dist_checkpointing's writer may spawn processes: keep the guard
    sys.exit(main())
