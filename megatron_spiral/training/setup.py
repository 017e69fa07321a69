"""Build the distributed model, optimizer and learning-rate schedule with megatron-core.

DDP (contiguous grad buffers, optional overlapped reduce and param gather), Megatron's optimizer
(distributed / ZeRO-1 or not; BF16/FP16 params with FP32 main weights, FP16 with dynamic loss
scaling), Adam with decoupled weight decay or SGD, and OptimizerParamScheduler set up from the
flags exactly as Megatron-LM's get_optimizer_param_scheduler does.
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
    train_iters: int = 0                 # --train-iters, or --train-samples // global batch
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


def params_dtype(parallel: ParallelConfig) -> torch.dtype:
    return torch.bfloat16 if parallel.bf16 else torch.float16 if parallel.fp16 else torch.float32


def resolve_train_iters(train: TrainConfig, global_batch_size: int) -> int:
    """Megatron-LM's update_train_iters: sample-based runs train train_samples // global batch steps."""
    if train.train_iters is not None:
        return train.train_iters
    return train.train_samples // global_batch_size


def build_model(spiral: SpiralConfig, parallel: ParallelConfig, recompute=None) -> tuple:
    """SpiralGPTModel wrapped in megatron's DDP; returns (ddp_model, transformer_config).
    ``recompute``: optional RecomputeConfig (--recompute-* / --spiral-recompute-loop)."""
    bf16 = parallel.bf16
    recompute_fields = recompute.transformer_config_overrides() if recompute is not None else {}
    config = transformer_config(
        spiral,
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        sequence_parallel=parallel.sequence_parallel,
        params_dtype=params_dtype(parallel),
        bf16=bf16,
        fp16=parallel.fp16,
        **recompute_fields,
    )
    model = SpiralGPTModel(config, spiral,
                           recompute_loop=bool(recompute and recompute.spiral_recompute_loop))
    if torch.cuda.is_available():
        model = model.cuda(torch.cuda.current_device())
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=parallel.overlap_grad_reduce,
        use_distributed_optimizer=parallel.use_distributed_optimizer,
        overlap_param_gather=parallel.overlap_param_gather,
        check_for_nan_in_grad=False,  # the loop checks loss and grads itself and names the step
        bucket_size=None,
    )
    ddp = DistributedDataParallel(config, ddp_config, model)
    # The forward-backward schedule drives gradient sync through these hooks (Megatron's wiring).
    config.finalize_model_grads_func = finalize_model_grads
    config.no_sync_func = ddp.no_sync
    config.grad_sync_func = ddp.start_grad_sync
    return ddp, config


def optimizer_config(optim: OptimConfig, parallel: ParallelConfig) -> OptimizerConfig:
    return OptimizerConfig(
        optimizer=optim.optimizer,
        lr=optim.lr,
        min_lr=optim.min_lr,
        weight_decay=optim.weight_decay,
        adam_beta1=optim.adam_beta1,
        adam_beta2=optim.adam_beta2,
        adam_eps=optim.adam_eps,
        sgd_momentum=optim.sgd_momentum,
        clip_grad=optim.clip_grad,
        bf16=parallel.bf16,
        fp16=parallel.fp16,
        loss_scale=parallel.loss_scale,
        initial_loss_scale=parallel.initial_loss_scale,
        min_loss_scale=parallel.min_loss_scale,
        loss_scale_window=parallel.loss_scale_window,
        hysteresis=parallel.hysteresis,
        params_dtype=params_dtype(parallel),
        use_distributed_optimizer=parallel.use_distributed_optimizer,
        overlap_param_gather=parallel.overlap_param_gather,
    )


def schedule_steps(optim: OptimConfig, train: TrainConfig, global_batch_size: int) -> dict:
    """Warmup / decay / weight-decay / WSD lengths in samples, as Megatron-LM computes them: from
    the *-iters flags (times the global batch) in iteration-based runs, from the *-samples flags in
    sample-based runs; --lr-warmup-fraction is a fraction of the decay length."""
    if train.train_iters is not None:
        decay = (optim.lr_decay_iters or train.train_iters) * global_batch_size
        wd_incr = train.train_iters * global_batch_size
        wsd = optim.lr_wsd_decay_iters * global_batch_size if optim.lr_wsd_decay_iters is not None else None
        warmup_exact = optim.lr_warmup_iters * global_batch_size
    else:
        decay = optim.lr_decay_samples or train.train_samples
        wd_incr = train.train_samples
        wsd = optim.lr_wsd_decay_samples
        warmup_exact = optim.lr_warmup_samples
    warmup = optim.lr_warmup_fraction * decay if optim.lr_warmup_fraction is not None else warmup_exact
    return {"lr_warmup_steps": warmup, "lr_decay_steps": decay, "wd_incr_steps": wd_incr, "wsd_decay_steps": wsd}


def build_optimizer(ddp, optim: OptimConfig, parallel: ParallelConfig, train: TrainConfig,
                    global_batch_size: int):
    config = optimizer_config(optim, parallel)
    optimizer = get_megatron_optimizer(config, [ddp])
    weight_decay = optim.weight_decay
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=optim.lr_warmup_init,
        max_lr=optim.lr,
        min_lr=optim.min_lr,
        lr_decay_style=optim.lr_decay_style,
        start_wd=weight_decay if optim.start_weight_decay is None else optim.start_weight_decay,
        end_wd=weight_decay if optim.end_weight_decay is None else optim.end_weight_decay,
        wd_incr_style=optim.weight_decay_incr_style,
        lr_wsd_decay_style=optim.lr_wsd_decay_style,
        **schedule_steps(optim, train, global_batch_size),
    )
    return optimizer, scheduler


def build_training_state(spiral: SpiralConfig, parallel: ParallelConfig, train: TrainConfig,
                         optim: OptimConfig, recompute=None) -> TrainingState:
    dp = parallel_state.get_data_parallel_world_size()
    global_batch, microbatches = batch_geometry(train, dp)
    ddp, config = build_model(spiral, parallel, recompute)
    optimizer, scheduler = build_optimizer(ddp, optim, parallel, train, global_batch)
    # The schedule multiplies the loss by the (dynamic) loss scale before backward (Megatron-LM's
    # wiring); without it --fp16 gradients would be divided by a scale they never got.
    config.grad_scale_func = optimizer.scale_loss
    return TrainingState(ddp, optimizer, scheduler, spiral, microbatches, global_batch,
                         train_iters=resolve_train_iters(train, global_batch))
