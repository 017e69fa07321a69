"""Save and resume the full training state through megatron.core.dist_checkpointing.

A checkpoint holds model, optimizer, LR schedule, RNG states, iteration and consumed train and
validation samples (layout in megatron_spiral.checkpointing). It reshards across TP sizes; RNG
states are restored only when the TP layout is unchanged (they are per-rank). Loading follows
Megatron-LM (``load_checkpoint`` in megatron/training/checkpointing.py, core_v0.16.1): no
checkpoint at --load starts from scratch; --finetune (or a weights-only checkpoint) loads weights
and resets iteration, optimizer, schedule and RNG; --no-load-optim skips optimizer and schedule;
--no-load-rng skips RNG. Rank 0 verifies the files (checksums) and every rank loads what it chose.

Two defects of megatron-core 0.16's optimizers over plain ``torch.optim.Adam`` (no apex/TE) are
handled here: Adam's state is created lazily, so state is materialised before the first
``sharded_state_dict``; and a loaded state dict makes every parameter share one ``step`` tensor,
which Adam would then increment once per parameter per step (wrong bias correction), so each
parameter gets its own copy after loading.
"""

from __future__ import annotations

import os
import random
from typing import Callable, Optional, Tuple

import numpy as np
import torch
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

from megatron_spiral import checkpointing as layout
from megatron_spiral.compat.torch_adam import enable_torch_adam_fixes
from megatron_spiral.config import LEGACY_RECIPE
from megatron_spiral.training import resume_checks

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


def _print_rank_0(message: str) -> None:
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_rank() == 0:
        print(message, flush=True)


def on_rank_0(fn: Callable):
    """Run ``fn`` on rank 0 only and give every rank its result; an error there is raised on every
    rank with the same message (so no rank waits for one that gave up)."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return fn()
    box = [None, None]
    if dist.get_rank() == 0:
        try:
            box[0] = fn()
        except layout.CheckpointError as err:
            box[1] = str(err)
        except OSError as err:
            box[1] = f"{type(err).__name__}: {err}"
    dist.broadcast_object_list(box, src=0)
    if box[1] is not None:
        raise layout.CheckpointError(box[1])
    return box[0]


def acquire_save_dir(save_dir: str):
    """Lock ``save_dir`` for this run (rank 0) and clear staging left by interrupted saves.
    Returns the lock (rank 0) or None; call ``release_save_dir`` at the end."""
    import torch.distributed as dist

    from megatron_spiral.training.save_lock import SaveDirLock

    holder = {}

    def acquire():
        holder["lock"] = SaveDirLock(save_dir, log=_print_rank_0)
        for path in layout.remove_leftovers(save_dir):
            _print_rank_0(f" > removed {path} (left by an interrupted save)")
        return True

    on_rank_0(acquire)
    return holder.get("lock") if (not dist.is_initialized() or dist.get_rank() == 0) else None


def save_training_checkpoint(state, save_dir: str, tokenizer=None) -> str:
    """Save everything needed to resume exactly. All ranks call this."""
    materialize_adam_state(state.optimizer)
    sharded = _sharded_state(state, with_optimizer=True, rng_value=_rng_state())
    sharded["opt_param_scheduler"] = state.scheduler.state_dict()
    sharded["iteration"] = state.iteration
    sharded["consumed_train_samples"] = state.consumed_train_samples
    sharded["consumed_valid_samples"] = getattr(state, "consumed_valid_samples", 0)
    sharded["skipped_iterations"] = state.skipped_iterations
    sharded["nan_iterations"] = state.nan_iterations
    return layout.save_sharded_checkpoint(
        save_dir, state.iteration, sharded, state.spiral.to_dict(), tokenizer=tokenizer,
        has_optimizer=True,
        use_distributed_optimizer=_is_distributed(state.optimizer),
        tensor_model_parallel_size=parallel_state.get_tensor_model_parallel_world_size(),
        data_parallel_size=parallel_state.get_data_parallel_world_size(),
    )


def has_checkpoint(load_path: str) -> bool:
    """Whether ``load_path`` names a checkpoint (a save dir with a tracker, or an iter_* dir)."""
    return bool(load_path) and (os.path.isfile(os.path.join(load_path, layout.TRACKER_FILE))
                                or os.path.isfile(os.path.join(load_path, layout.CONFIG_FILE)))


def _no_checkpoint(load_path: str, options, log) -> None:
    """Megatron-LM's fresh start (or its --exit-on-missing-checkpoint)."""
    tracker = os.path.join(load_path, layout.TRACKER_FILE)
    orphans = layout.iteration_dirs(load_path)
    hint = (f"; {orphans[0][1]} exists without a tracker (its save was interrupted): pass it as --load "
            "to use it, or --ckpt-fallback" if orphans else "")
    if getattr(options, "exit_on_missing_checkpoint", False):
        raise layout.CheckpointError(f"no checkpoint found at {load_path} (no {tracker}) and "
                                     f"--exit-on-missing-checkpoint is set{hint}")
    log(f"WARNING: could not find the metadata file {tracker}\n"
        f"    will not load any checkpoints and will start from random\n"
        f" > no checkpoint found at {load_path}, starting from scratch{hint}")


def locate_checkpoint(load_path: str, fallback: bool = False, log=_print_rank_0) -> Tuple[str, int, bool]:
    """(checkpoint dir, iteration, checksums verified), checked for completeness and integrity."""
    if fallback:
        ckpt_dir, iteration = layout.resolve_with_fallback(load_path, log=log)
        verified = layout.check_intact(ckpt_dir)
    elif not has_checkpoint(load_path) and layout.iteration_dirs(load_path):
        raise layout.CheckpointError(f"{load_path} holds checkpoints but no {layout.TRACKER_FILE}")
    else:
        ckpt_dir, iteration = layout.resolve_checkpoint(load_path)
        verified = layout.check_intact(ckpt_dir)
    return ckpt_dir, iteration, verified


def model_config_from_checkpoint(load_path: str, current, log=_print_rank_0):
    """--use-checkpoint-args: this run's SpiralConfig with every architecture field taken from
    the checkpoint (fields it predates keep their old meaning; vocab_size still comes from the tokenizer)."""
    import dataclasses

    if not has_checkpoint(load_path):
        log(f" > --use-checkpoint-args: no checkpoint at {load_path}; using the command line's model flags")
        return current
    ckpt_dir, _ = layout.resolve_checkpoint(load_path)
    saved = layout.read_metadata(ckpt_dir).get("model", {})
    names = {f.name for f in dataclasses.fields(current)} - resume_checks.IMPLEMENTATION_FIELDS
    taken = {k: v for k, v in saved.items() if k in names}
    defaults = {f.name: LEGACY_RECIPE.get(f.name, resume_checks._field_default(f))
                for f in dataclasses.fields(current) if f.name in names and f.name not in saved}
    log(f" > --use-checkpoint-args: model flags taken from {ckpt_dir}")
    return current.replace(**taken, **defaults)


def load_training_checkpoint(state, load_path: str, load_optimizer: bool = True, options=None,
                             tokenizer=None, log=_print_rank_0) -> Optional[str]:
    """Resume ``state`` from ``load_path`` (a save dir or an iter_* dir). Returns the directory, or
    None when there is no checkpoint there (a fresh start, said in the log).

    ``options`` is the run's CheckpointConfig (finetune, no_load_rng, schedule flags, fallback)."""
    opt = lambda name: bool(getattr(options, name, False))  # noqa: E731
    if not has_checkpoint(load_path) and not (opt("ckpt_fallback") and layout.iteration_dirs(load_path)):
        _no_checkpoint(load_path, options, log)
        return None
    ckpt_dir, iteration, verified = on_rank_0(lambda: locate_checkpoint(load_path, opt("ckpt_fallback"), log))
    meta = layout.read_metadata(ckpt_dir)
    release = not meta.get("has_optimizer")  # weights only (e.g. converted from Hugging Face)
    finetune = opt("finetune") or release
    resume_checks.check_model(meta.get("model", {}), state.spiral, ckpt_dir, finetune, log)
    resume_checks.check_tokenizer(meta.get("tokenizer"), tokenizer, ckpt_dir)
    with_optimizer = load_optimizer and not opt("no_load_optim") and not finetune
    if with_optimizer:
        resume_checks.check_optimizer_layout(meta, _is_distributed(state.optimizer), ckpt_dir)
    same_tp = meta.get("tensor_model_parallel_size") == parallel_state.get_tensor_model_parallel_world_size()
    with_rng = not finetune and not opt("no_load_rng") and same_tp
    if with_optimizer:
        materialize_adam_state(state.optimizer)  # a fresh optimizer cannot describe its state
    template = _sharded_state(state, with_optimizer, rng_value=_rng_state() if with_rng else None)
    try:
        loaded = dist_checkpointing.load(template, ckpt_dir)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as err:  # EOFError from a truncated file is a BaseException subclass too
        checked = "its checksums matched, so " if verified else "it has no checksums to verify; "
        raise layout.CheckpointError(
            f"could not load checkpoint {ckpt_dir} ({checked}the model or flags may not fit it): "
            f"{type(err).__name__}: {err}") from err
    if with_optimizer:  # refuse before anything is applied
        resume_checks.apply_schedule_rule(loaded["opt_param_scheduler"], state.scheduler,
                                          opt("override_opt_param_scheduler"),
                                          opt("use_checkpoint_opt_param_scheduler"), ckpt_dir, log)
    state.model.module.load_state_dict(loaded["model"])
    if with_optimizer:
        if _is_distributed(state.optimizer):
            enable_torch_adam_fixes()
            # It re-allocates state only when empty; otherwise it expects a 'step' the file lacks.
            for torch_opt in _torch_optimizers(state.optimizer):
                torch_opt.state.clear()
        state.optimizer.load_state_dict(loaded["optimizer"])
        untie_adam_steps(state.optimizer)
        state.scheduler.load_state_dict(loaded["opt_param_scheduler"])
    else:
        # BF16/FP16 optimizers keep FP32 main weights: copy the loaded weights into them (Megatron's
        # reload_model_params), or the first step would write back the random initialisation.
        state.optimizer.reload_model_params()
    if not finetune:
        state.iteration = int(loaded.get("iteration", iteration))
        state.consumed_train_samples = int(loaded.get("consumed_train_samples", 0))
        if hasattr(state, "consumed_valid_samples"):
            state.consumed_valid_samples = int(loaded.get("consumed_valid_samples", 0))
        state.skipped_iterations = int(loaded.get("skipped_iterations", 0))
        state.nan_iterations = int(loaded.get("nan_iterations", 0))
    if with_rng and "rng_state" in loaded:
        _set_rng_state(loaded["rng_state"])
    skipped = [name for name, done in (("optimizer and LR schedule", with_optimizer), ("RNG", with_rng)) if not done]
    if finetune or skipped:
        why = "weights-only checkpoint" if release else ("--finetune" if opt("finetune") else "flags/TP change")
        log(f" > loaded {'weights only' if finetune else 'without ' + ' and '.join(skipped)} from {ckpt_dir} "
            f"({why}){'; iteration and consumed samples start at 0' if finetune else ''}")
    return ckpt_dir


def latest_iteration(save_dir: str) -> Optional[int]:
    if save_dir and os.path.isfile(os.path.join(save_dir, layout.TRACKER_FILE)):
        return layout.read_tracker(save_dir)
    return None
