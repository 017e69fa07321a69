"""Process-group and model-parallel setup (explicit; no hidden global configuration).

``initialize_parallel`` is what entry points call (torchrun sets RANK/WORLD_SIZE/MASTER_*);
``ensure_parallel`` gives notebooks and tests a one-rank gloo group when none exists.
"""

from __future__ import annotations

import os
import random
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

from megatron_spiral.compat.cpu import enable_cpu_compat


def default_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def limit_cpu_threads() -> None:
    """On CPU, give each local rank its share of the cores: oversubscribed OpenMP threads spin
    and made a 2-rank run on 2 cores ~50x slower in our measurements."""
    if torch.cuda.is_available() or "OMP_NUM_THREADS" in os.environ:
        return
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(local_ranks, 1)))


def initialize_parallel(
    tensor_model_parallel_size: int = 1,
    seed: int = 1234,
    backend: str = None,
    timeout_minutes: int = 30,
) -> None:
    """Initialise torch.distributed (from torchrun's env, or a single rank) and megatron's
    model-parallel groups, then seed the default and tensor-parallel RNG streams."""
    enable_cpu_compat()
    limit_cpu_threads()
    if not dist.is_initialized():
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        kwargs = {}
        if world_size == 1 and "MASTER_PORT" not in os.environ:
            # A lone process needs no rendezvous: an in-process store avoids port races.
            kwargs["store"] = dist.HashStore()
        dist.init_process_group(
            backend=backend or default_backend(), rank=rank, world_size=world_size,
            timeout=timedelta(minutes=timeout_minutes), **kwargs)
    world_size = dist.get_world_size()
    if world_size % tensor_model_parallel_size:
        raise ValueError(
            f"world size {world_size} is not divisible by --tensor-model-parallel-size "
            f"{tensor_model_parallel_size}")
    if parallel_state.model_parallel_is_initialized():
        current = parallel_state.get_tensor_model_parallel_world_size()
        if current != tensor_model_parallel_size:
            parallel_state.destroy_model_parallel()
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tensor_model_parallel_size)
    # Python's and numpy's generators too, as Megatron-LM's _set_random_seed: they are checkpointed,
    # and an unseeded one makes two identical runs save different checkpoints.
    random.seed(seed)
    np.random.seed(seed)
    model_parallel_cuda_manual_seed(seed)


def ensure_parallel(seed: int = 1234) -> None:
    """One-process convenience: create a one-rank group and TP=1 state if nothing exists yet."""
    if dist.is_initialized() and parallel_state.model_parallel_is_initialized():
        enable_cpu_compat()
        model_parallel_cuda_manual_seed(seed)
        return
    initialize_parallel(tensor_model_parallel_size=1, seed=seed)


def destroy_parallel() -> None:
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
