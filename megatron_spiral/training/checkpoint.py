"""Save and resume the full training state through megatron.core.dist_checkpointing.

A checkpoint holds model, optimizer, LR schedule, RNG states, iteration and consumed samples
(layout in megatron_spiral.checkpointing). It reshards across TP sizes; RNG states are restored
only when the TP layout is unchanged (they are per-rank).

Two defects of megatron-core 0.16's optimizers over plain ``torch.optim.Adam`` (no apex/TE) are
handled here: Adam's state is created lazily, so state is materialised before the first
``sharded_state_dict``; and a loaded state dict makes every parameter share one ``step`` tensor,
which Adam would then increment once per parameter per step (wrong bias correction), so each
parameter gets its own copy after loading.
"""

from __future__ import annotations

import os
import random
from typing import Optional

import numpy as np
import torch
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

from megatron_spiral import checkpointing as layout
from megatron_spiral.compat.torch_adam import enable_torch_adam_fixes
from megatron_spiral.config import LEGACY_RECIPE

_OPTIM_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}


def _torch_optimizers(optimizer):
    """The torch optimizers inside a (possibly chained) megatron optimizer."""
    chained = getattr(optimizer, "chained_optimizers", None) or [optimizer]
    return [opt.optimizer for opt in chained]


def _is_distributed(optimizer) -> bool:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    chained = getattr(optimizer, "chained_optimizers", None) or [optimizer]
    return any(isinstance(opt, DistributedOptimizer) for opt in chained)


def materialize_adam_state(optimizer) -> None:
    """Create Adam's lazy per-parameter state (zeros, step 0) so it can be checkpointed."""
    for torch_opt in _torch_optimizers(optimizer):
        for group in torch_opt.param_groups:
            for param in group["params"]:
                state = torch_opt.state[param]
                if "step" not in state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)


def untie_adam_steps(optimizer) -> None:
    """Give every parameter its own ``step`` tensor after a load (see module docstring)."""
    for torch_opt in _torch_optimizers(optimizer):
        for state in torch_opt.state.values():
            if "step" in state and torch.is_tensor(state["step"]):
                state["step"] = state["step"].detach().clone()


def _rng_state() -> dict:
    state = {
        "random": random.getstate(),
        "np": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "tracker": get_cuda_rng_tracker().get_states(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["random"])
    np.random.set_state(state["np"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    get_cuda_rng_tracker().set_states(state["tracker"])


def _rng_sharded_object(value) -> ShardedObject:
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    dp_rank = parallel_state.get_data_parallel_rank()
    return ShardedObject("rng_state", value, (tp_size,), (tp_rank,), replica_id=dp_rank)


def _sharded_state(state, with_optimizer: bool, rng_value=None) -> dict:
    model_sd = state.model.module.sharded_state_dict()
    sharded = {"model": model_sd}
    if with_optimizer:
        sharded["optimizer"] = state.optimizer.sharded_state_dict(model_sd, metadata=_OPTIM_METADATA)
    if rng_value is not None:
        sharded["rng_state"] = _rng_sharded_object(rng_value)
    return sharded


def save_training_checkpoint(state, save_dir: str, tokenizer=None) -> str:
    """Save everything needed to resume exactly. All ranks call this."""
    materialize_adam_state(state.optimizer)
    sharded = _sharded_state(state, with_optimizer=True, rng_value=_rng_state())
    sharded["opt_param_scheduler"] = state.scheduler.state_dict()
    sharded["iteration"] = state.iteration
    sharded["consumed_train_samples"] = state.consumed_train_samples
    sharded["skipped_iterations"] = state.skipped_iterations
    sharded["nan_iterations"] = state.nan_iterations
    return layout.save_sharded_checkpoint(
        save_dir, state.iteration, sharded, state.spiral.to_dict(), tokenizer=tokenizer,
        has_optimizer=True,
        tensor_model_parallel_size=parallel_state.get_tensor_model_parallel_world_size(),
        data_parallel_size=parallel_state.get_data_parallel_world_size(),
    )


def load_training_checkpoint(state, load_path: str, load_optimizer: bool = True) -> Optional[str]:
    """Resume ``state`` from ``load_path`` (a save dir or an iter_* dir). Returns the directory."""
    ckpt_dir, iteration = layout.resolve_checkpoint(load_path)
    layout.check_complete(ckpt_dir)
    meta = layout.read_metadata(ckpt_dir)
    saved_model = dict(LEGACY_RECIPE, **meta.get("model", {}))  # absent recipe fields: old meaning
    for key in ("layout", "hidden_size", "num_attention_heads", "topology", "downscale", "upscale",
                "embedding_scale", "untie_core"):
        if key in saved_model and saved_model[key] != getattr(state.spiral, key):
            raise layout.CheckpointError(
                f"checkpoint {ckpt_dir} was trained with {key}={saved_model[key]!r} but this run "
                f"builds {key}={getattr(state.spiral, key)!r}; pass the same model flags (or --preset)")
    with_optimizer = load_optimizer and bool(meta.get("has_optimizer"))
    same_tp = meta.get("tensor_model_parallel_size") == parallel_state.get_tensor_model_parallel_world_size()
    if with_optimizer:
        materialize_adam_state(state.optimizer)  # a fresh optimizer cannot describe its state
    template = _sharded_state(state, with_optimizer, rng_value=_rng_state() if (with_optimizer and same_tp) else None)
    try:
        loaded = dist_checkpointing.load(template, ckpt_dir)
    except Exception as err:  # name the checkpoint, keep the cause
        raise layout.CheckpointError(f"could not load checkpoint {ckpt_dir}: {err}") from err
    state.model.module.load_state_dict(loaded["model"])
    if not with_optimizer:  # weights only (e.g. converted from Hugging Face): a fresh run from them
        return ckpt_dir
    if _is_distributed(state.optimizer):
        enable_torch_adam_fixes()
        # It re-allocates state only when empty; otherwise it expects a 'step' the file lacks.
        for torch_opt in _torch_optimizers(state.optimizer):
            torch_opt.state.clear()
    state.optimizer.load_state_dict(loaded["optimizer"])
    untie_adam_steps(state.optimizer)
    state.scheduler.load_state_dict(loaded["opt_param_scheduler"])
    state.iteration = int(loaded.get("iteration", iteration))
    state.consumed_train_samples = int(loaded.get("consumed_train_samples", 0))
    state.skipped_iterations = int(loaded.get("skipped_iterations", 0))
    state.nan_iterations = int(loaded.get("nan_iterations", 0))
    if "rng_state" in loaded:
        _set_rng_state(loaded["rng_state"])
    return ckpt_dir


def latest_iteration(save_dir: str) -> Optional[int]:
    if save_dir and os.path.isfile(os.path.join(save_dir, layout.TRACKER_FILE)):
        return layout.read_tracker(save_dir)
    return None
