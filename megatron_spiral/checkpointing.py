"""Checkpoint layout shared by training, conversion and analysis tools (Megatron's layout).

    SAVE_DIR/
      latest_checkpointed_iteration.txt      "100"  (written last, atomically)
      iter_0000100/                          megatron.core.dist_checkpointing directory
        spiral_config.json                   {"model": SpiralConfig fields, "tokenizer": {...}|null,
                                              "iteration": 100, "tensor_model_parallel_size": 2}
        tokenizer/                           tokenizer files, when training knew its tokenizer
        common.pt, *.distcp, metadata.json   dist_checkpointing payload; the sharded state dict
                                             is {"model": GPTModel.sharded_state_dict(), ...}

Any TP size can load a checkpoint saved at any other TP size (dist_checkpointing reshards).
A checkpoint directory is written under a temporary name and renamed into place only when
complete, so a crash mid-save never leaves a half-written ``iter_*`` directory or a tracker that
points at one.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Optional, Tuple

TRACKER_FILE = "latest_checkpointed_iteration.txt"
CONFIG_FILE = "spiral_config.json"
TOKENIZER_DIR = "tokenizer"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt or incomplete; the message names the file."""


def iteration_dir(save_dir: str, iteration: int) -> str:
    return os.path.join(save_dir, f"iter_{iteration:07d}")


def staging_dir(save_dir: str, iteration: int) -> str:
    return os.path.join(save_dir, f".tmp_iter_{iteration:07d}")


def read_tracker(load_dir: str) -> int:
    """Iteration named by ``latest_checkpointed_iteration.txt``."""
    path = os.path.join(load_dir, TRACKER_FILE)
    if not os.path.isfile(path):
        raise CheckpointError(f"no checkpoint tracker {path}; is --load a directory written by --save?")
    text = open(path).read().strip()
    if not text.isdigit():
        raise CheckpointError(f"corrupt tracker file {path}: expected an iteration number, got {text!r}")
    return int(text)


def write_tracker(save_dir: str, iteration: int) -> None:
    """Atomic replace: readers see the old or the new iteration, never a partial file."""
    path = os.path.join(save_dir, TRACKER_FILE)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(f"{iteration}\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def resolve_checkpoint(path: str) -> Tuple[str, int]:
    """Accept a save directory (with a tracker) or an ``iter_*`` directory; return (dir, iteration)."""
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint path {path} does not exist")
    if os.path.isfile(os.path.join(path, TRACKER_FILE)):
        iteration = read_tracker(path)
        ckpt = iteration_dir(path, iteration)
        if not os.path.isdir(ckpt):
            raise CheckpointError(
                f"{os.path.join(path, TRACKER_FILE)} points at iteration {iteration} but {ckpt} is missing")
        return ckpt, iteration
    config_path = os.path.join(path, CONFIG_FILE)
    if os.path.isfile(config_path):
        return path, int(read_metadata(path).get("iteration", 0))
    raise CheckpointError(
        f"{path} is neither a save directory (no {TRACKER_FILE}) nor a checkpoint (no {CONFIG_FILE})")


def write_metadata(ckpt_dir: str, model_config: dict, iteration: int, tokenizer: Optional[dict] = None,
                   **extra) -> None:
    payload = {"model": model_config, "tokenizer": tokenizer, "iteration": iteration, **extra}
    with open(os.path.join(ckpt_dir, CONFIG_FILE), "w") as f:
        json.dump(payload, f, indent=2, sort_keys=True)


def read_metadata(ckpt_dir: str) -> dict:
    path = os.path.join(ckpt_dir, CONFIG_FILE)
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {ckpt_dir} has no {CONFIG_FILE}; it is incomplete") from None
    except json.JSONDecodeError as err:
        raise CheckpointError(f"corrupt {path}: {err}") from None


def load_spiral_config(ckpt_dir: str):
    from megatron_spiral.config import SpiralConfig

    return SpiralConfig.from_dict(read_metadata(ckpt_dir)["model"])  # old metadata: old recipe


def check_complete(ckpt_dir: str) -> None:
    """Fail with the missing file's name if the dist_checkpointing payload is incomplete."""
    for name in ("metadata.json", "common.pt", ".metadata"):
        if not os.path.isfile(os.path.join(ckpt_dir, name)):
            raise CheckpointError(f"checkpoint {ckpt_dir} is incomplete: {name} is missing")


def publish(staging: str, final: str) -> None:
    """Move a fully written checkpoint into place (replacing an older one of the same name)."""
    if os.path.isdir(final):
        shutil.rmtree(final)
    os.replace(staging, final)


def load_model_weights(gpt_model, ckpt_dir: str) -> None:
    """Load only the model weights of a checkpoint into ``gpt_model`` (any TP layout)."""
    from megatron.core import dist_checkpointing

    check_complete(ckpt_dir)
    try:
        state = dist_checkpointing.load({"model": gpt_model.sharded_state_dict()}, ckpt_dir)
    except Exception as err:  # dist_checkpointing raises many types; name the checkpoint
        raise CheckpointError(f"could not load model weights from {ckpt_dir}: {err}") from err
    gpt_model.load_state_dict(state["model"])


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


def _is_writer() -> bool:
    import torch.distributed as dist

    return not dist.is_initialized() or dist.get_rank() == 0


def save_sharded_checkpoint(save_dir: str, iteration: int, sharded_state_dict: dict, model_config: dict,
                            tokenizer=None, **metadata) -> str:
    """Save ``sharded_state_dict`` (at least {"model": ...}) as ``iter_{iteration}`` atomically.

    All ranks call this. ``tokenizer`` (optional, a megatron_spiral.tokenizer.SpiralTokenizer)
    writes its Hugging Face files into ``iter_*/tokenizer``. Returns the final directory.
    """
    from megatron.core import dist_checkpointing

    staging, final = staging_dir(save_dir, iteration), iteration_dir(save_dir, iteration)
    if _is_writer():
        os.makedirs(save_dir, exist_ok=True)
        if os.path.isdir(staging):
            shutil.rmtree(staging)  # leftovers of a crashed save
        os.makedirs(staging)
    _barrier()
    dist_checkpointing.save(sharded_state_dict, staging)
    _barrier()
    if _is_writer():
        tokenizer_meta = None
        if tokenizer is not None:
            tokenizer.save_hf(os.path.join(staging, TOKENIZER_DIR))
            tokenizer_meta = {"type": type(tokenizer).__name__, "vocab_size": tokenizer.vocab_size,
                              "eod": tokenizer.eod, "pad": tokenizer.pad, "directory": TOKENIZER_DIR}
        write_metadata(staging, model_config, iteration, tokenizer_meta, **metadata)
        publish(staging, final)
        write_tracker(save_dir, iteration)
    _barrier()
    return final
