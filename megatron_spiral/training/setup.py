"""Build the distributed model, optimizer and learning-rate schedule with megatron-core.

DDP (contiguous grad buffers, optional overlapped reduce), Megatron's optimizer (distributed /
ZeRO-1 or not; BF16 params with FP32 main weights when --bf16), AdamW with decoupled weight decay,
and OptimizerParamScheduler (cosine to min_lr with linear warmup).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from megatron.core import parallel_state
from megatron.core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from megatron_spiral.config import SpiralConfig
from megatron_spiral.model.spiral_model import SpiralGPTModel, transformer_config
from megatron_spiral.training.arguments import OptimConfig, ParallelConfig, TrainConfig


@dataclass
class TrainingState:
    model: DistributedDataParallel       # model.module is the SpiralGPTModel
    optimizer: object                    # megatron MegatronOptimizer
    scheduler: OptimizerParamScheduler
    spiral: SpiralConfig
    num_microbatches: int
    global_batch_size: int
    iteration: int = 0
    consumed_train_samples: int = 0
    consumed_valid_samples: int = 0      # Megatron-LM's counter: validation resumes where it was
    skipped_iterations: int = 0
    nan_iterations: int = 0


def batch_geometry(train: TrainConfig, data_parallel_size: int) -> tuple:
    """(global batch, accumulation steps): global = micro x accumulation x DP."""
    per_step = train.micro_batch_size * data_parallel_size
    global_batch = train.global_batch_size or per_step
    if global_batch % per_step:
        raise ValueError(
            f"--global-batch-size {global_batch} is not a multiple of --micro-batch-size "
            f"{train.micro_batch_size} x data-parallel size {data_parallel_size} = {per_step}")
    return global_batch, global_batch // per_step


def build_model(spiral: SpiralConfig, parallel: ParallelConfig) -> tuple:
    """SpiralGPTModel wrapped in megatron's DDP; returns (ddp_model, transformer_config)."""
    bf16 = parallel.bf16
    config = transformer_config(
        spiral,
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        sequence_parallel=parallel.sequence_parallel,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        bf16=bf16,
    )
    model = SpiralGPTModel(config, spiral)
    if torch.cuda.is_available():
        model = model.cuda(torch.cuda.current_device())
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=parallel.overlap_grad_reduce,
        use_distributed_optimizer=parallel.use_distributed_optimizer,
        check_for_nan_in_grad=False,  # the loop checks loss and grads itself and names the step
        bucket_size=None,
    )
    ddp = DistributedDataParallel(config, ddp_config, model)
    # The forward-backward schedule drives gradient sync through these hooks (Megatron's wiring).
    config.finalize_model_grads_func = finalize_model_grads
    config.no_sync_func = ddp.no_sync
    config.grad_sync_func = ddp.start_grad_sync
    return ddp, config


def build_optimizer(ddp, optim: OptimConfig, parallel: ParallelConfig, train_iters: int,
                    global_batch_size: int):
    config = OptimizerConfig(
        optimizer="adam",
        lr=optim.lr,
        min_lr=optim.min_lr if optim.min_lr is not None else 0.1 * optim.lr,
        weight_decay=optim.weight_decay,
        adam_beta1=optim.adam_beta1,
        adam_beta2=optim.adam_beta2,
        adam_eps=optim.adam_eps,
        clip_grad=optim.clip_grad,
        bf16=parallel.bf16,
        params_dtype=torch.bfloat16 if parallel.bf16 else torch.float32,
        use_distributed_optimizer=parallel.use_distributed_optimizer,
    )
    optimizer = get_megatron_optimizer(config, [ddp])
    warmup = int(round(optim.lr_warmup_fraction * train_iters))
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=optim.lr,
        min_lr=config.min_lr,
        lr_warmup_steps=warmup * global_batch_size,
        lr_decay_steps=train_iters * global_batch_size,
        lr_decay_style=optim.lr_decay_style,
        start_wd=optim.weight_decay,
        end_wd=optim.weight_decay,
        wd_incr_steps=train_iters * global_batch_size,
        wd_incr_style="constant",
    )
    return optimizer, scheduler


def build_training_state(spiral: SpiralConfig, parallel: ParallelConfig, train: TrainConfig,
                         optim: OptimConfig) -> TrainingState:
    dp = parallel_state.get_data_parallel_world_size()
    global_batch, microbatches = batch_geometry(train, dp)
    ddp, _ = build_model(spiral, parallel)
    optimizer, scheduler = build_optimizer(ddp, optim, parallel, train.train_iters, global_batch)
    return TrainingState(ddp, optimizer, scheduler, spiral, microbatches, global_batch)
