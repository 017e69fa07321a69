#!/usr/bin/env python
"""Loop-state statistics of a checkpoint (or of its freshly initialised twin) on dataset tokens.

Prints one JSON line per checkpoint ({"load", "final", "init"}): ||h0||/||v||, per-iteration update and state norms, MeSH router entropies
(megatron_spiral/analysis/loop_stats.py defines them).

Examples:
  python tools/loop_stats.py --load runs/looped-mesh --data-prefix data/demo_text_document
  python tools/loop_stats.py --load runs/a --load runs/b --init-seeds 1234 1235 --data-prefix data/demo_text_document
"""

from __future__ import annotations

import argparse
import json
import sys

from megatron_spiral.quiet import quiet_backend_warnings


def dataset_batch(prefix: str, num_sequences: int, seq_length: int):
    """[num_sequences, seq_length] tokens from the last documents of a preprocessed dataset."""
    import numpy as np
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(prefix)
    need, pieces, index = num_sequences * seq_length, [], len(dataset) - 1
    while need > 0 and index >= 0:
        tokens = np.asarray(dataset[index], dtype=np.int64)
        pieces.append(tokens[:need])
        need -= len(pieces[-1])
        index -= 1
    if need > 0:
        raise SystemExit(f"loop_stats.py: {prefix} holds fewer than {num_sequences} x {seq_length} tokens; "
                         "ask for fewer --num-sequences")
    return torch.from_numpy(np.concatenate(pieces)).view(num_sequences, seq_length)


def _init_model(ckpt: str, seed: int):
    """A freshly initialised model of the checkpoint's config (old metadata: the old recipe)."""
    from megatron_spiral.api import build_model
    from megatron_spiral.checkpointing import read_metadata, resolve_checkpoint
    from megatron_spiral.config import LEGACY_RECIPE

    fields = {**LEGACY_RECIPE, **read_metadata(resolve_checkpoint(ckpt)[0])["model"], "transformer_impl": "local"}
    return build_model("tiny", seed=seed, device="cpu", **fields)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--load", required=True, action="append",
                        help="checkpoint save directory or iter_* directory (repeat for several: one "
                             "process start for all, one JSON line each)")
    parser.add_argument("--data-prefix", required=True, help="preprocessed dataset prefix (no .bin/.idx)")
    parser.add_argument("--num-sequences", type=int, default=8, help="sequences measured (default: %(default)s)")
    parser.add_argument("--seq-length", type=int, help="tokens per sequence (default: the model's)")
    parser.add_argument("--init-seeds", type=int, nargs="+",
                        help="also measure a freshly initialised model of each checkpoint's config with "
                             "these seeds (one per --load)")
    args = parser.parse_args(argv)
    if args.init_seeds is not None and len(args.init_seeds) != len(args.load):
        parser.error(f"--init-seeds needs one seed per --load ({len(args.load)}), got {len(args.init_seeds)}")
    quiet_backend_warnings()
    import torch

    from megatron_spiral.analysis.loop_stats import loop_statistics
    from megatron_spiral.checkpointing import CheckpointError
    from megatron_spiral.hf.convert import load_megatron_model

    torch.set_num_threads(1)
    for k, path in enumerate(args.load):
        try:
            models = {"final": load_megatron_model(path)[0]}
            if args.init_seeds is not None:
                models["init"] = _init_model(path, args.init_seeds[k])
        except CheckpointError as err:
            raise SystemExit(f"loop_stats.py: {err}") from None
        length = args.seq_length or models["final"].config.seq_length
        ids = dataset_batch(args.data_prefix, args.num_sequences, length)
        line = {"load": path, **{when: loop_statistics(model, ids) for when, model in models.items()}}
        print(json.dumps(line, sort_keys=True), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
