"""pretrain(): parallel setup, tokenizer, data, model, resume, train, report. Called by
pretrain_spiral.py; returns the process exit code."""

from __future__ import annotations

import dataclasses
import json
import os

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_spiral.analysis.accounting import count_params, training_flops_per_sequence
from megatron_spiral.model.layer_specs import resolve_transformer_impl
from megatron_spiral.model_args import describe_architecture
from megatron_spiral.parallel import initialize_parallel
from megatron_spiral.training.arguments import RunConfig
from megatron_spiral.data.loader import shutdown_iterator
from megatron_spiral.training.checkpoint import acquire_save_dir, model_config_from_checkpoint
from megatron_spiral.training.data import build_iterators, build_run_tokenizer
from megatron_spiral.training.logger import init_wandb, print_rank_0
from megatron_spiral.training.loop import FINISHED, Trainer
from megatron_spiral.training.setup import build_training_state


def _describe(run: RunConfig, state) -> None:
    spiral = state.spiral
    params = count_params(spiral)
    dp = parallel_state.get_data_parallel_world_size()
    tp = parallel_state.get_tensor_model_parallel_world_size()
    print_rank_0(
        f" > model: {run.preset or 'custom (no --preset)'} {describe_architecture(spiral)} "
        f"vocab={spiral.vocab_size}->{spiral.padded_vocab_size} "
        f"layer spec={resolve_transformer_impl(spiral.transformer_impl)} (attention: "
        f"{'Transformer Engine' if resolve_transformer_impl(spiral.transformer_impl) == 'transformer_engine' else 'torch SDPA'})\n"
        f" > parameters: {params.total / 1e6:.2f}M total, {params.non_embedding / 1e6:.2f}M "
        f"non-embedding; training FLOPs/sequence {training_flops_per_sequence(spiral) / 1e9:.2f} GFLOP\n"
        f" > parallel: world={dist.get_world_size()} TP={tp} SP={state.model.module.config.sequence_parallel} "
        f"DP={dp} distributed optimizer={run.parallel.use_distributed_optimizer}; "
        f"global batch {state.global_batch_size} = micro {run.train.micro_batch_size} x "
        f"accumulation {state.num_microbatches} x DP {dp}; "
        f"precision {'bf16' if run.parallel.bf16 else 'fp32'} on {'GPU' if torch.cuda.is_available() else 'CPU'}")


def distributed_backend(requested) -> str:
    """Megatron-LM's default is nccl; a machine without GPUs can only run gloo, and says so."""
    if requested:
        return requested
    if torch.cuda.is_available():
        return "nccl"
    if int(os.environ.get("RANK", "0")) == 0:
        print(" > no CUDA GPU: using the gloo distributed backend (Megatron-LM's default nccl needs GPUs)",
              flush=True)
    return "gloo"


def _wandb_run(run: RunConfig):
    log = run.log
    save_dir = log.wandb_save_dir or (os.path.join(run.checkpoint.save, "wandb") if run.checkpoint.save else None)
    config = {"preset": run.preset, "model": dataclasses.asdict(run.model)}
    for name in ("parallel", "train", "optim", "checkpoint", "log"):
        config.update(dataclasses.asdict(getattr(run, name)))
    return init_wandb(log.wandb_project, log.wandb_exp_name, save_dir, config)


def _final_evaluation(trainer: Trainer, iteration: int, valid_iterator, test_iterator) -> None:
    """Megatron-LM's end of pretrain(): the validation set, then the test set, once each."""
    if valid_iterator is not None:
        trainer.validate(valid_iterator, f"iteration {iteration} on validation set")
    if test_iterator is not None:
        trainer.validate(test_iterator, f"iteration {iteration} on test set")


def pretrain(run: RunConfig) -> int:
    initialize_parallel(run.parallel.tensor_model_parallel_size, run.parallel.seed,
                        backend=distributed_backend(run.parallel.distributed_backend),
                        timeout_minutes=run.parallel.distributed_timeout_minutes)
    ckpt = run.checkpoint
    save_lock = acquire_save_dir(ckpt.save) if ckpt.save else None  # a second run on it is refused
    if ckpt.async_save:
        print_rank_0(" > --async-save: checkpoints are saved synchronously (asynchronous dist_checkpointing "
                     "saves are not used by this trainer; see docs/reliability.md)")
    tokenizer = build_run_tokenizer(run)
    if ckpt.use_checkpoint_args:
        run.model = model_config_from_checkpoint(ckpt.load, run.model)
    if tokenizer is not None:
        run.model = run.model.replace(vocab_size=tokenizer.vocab_size)
    state = build_training_state(run.model, run.parallel, run.train, run.optim, run.recompute)
    _describe(run, state)
    trainer = Trainer(run, state, tokenizer, wandb_run=_wandb_run(run))
    trainer.resume()
    train_iterator, valid_iterator, test_iterator = build_iterators(run, state, tokenizer)
    try:
        reason = trainer.train(train_iterator, valid_iterator)
        if reason == FINISHED:
            _final_evaluation(trainer, state.iteration, valid_iterator, test_iterator)
        trainer.close()
    finally:  # stop loader workers now, on success and failure alike (no exit-time waits)
        for iterator in (train_iterator, valid_iterator, test_iterator):
            shutdown_iterator(iterator)
        if save_lock is not None:
            save_lock.release()
    if run.checkpoint.save and dist.get_rank() == 0:
        summary = {"iteration": state.iteration, "consumed_train_samples": state.consumed_train_samples,
                   "final_train_loss": trainer.losses[-1] if trainer.losses else None,
                   "validation_loss": trainer.last_validation_loss,
                   "skipped_iterations": state.skipped_iterations}
        with open(os.path.join(run.checkpoint.save, "run_summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
    dist.barrier()
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()
    report_clean_exit()
    return 0


def report_clean_exit() -> None:
    """Tell examples/slurm/launch_node.sh that this rank finished cleanly (saved on the exit signal
    included): torchrun exits 1 when SLURM's SIGTERM reaches it too, whatever the ranks did."""
    status_dir = os.environ.get("SPIRAL_EXIT_STATUS_DIR")
    if status_dir:
        with open(os.path.join(status_dir, f"rank{os.environ.get('RANK', '0')}"), "w") as f:
            f.write("0\n")
