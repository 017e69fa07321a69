"""pretrain(): parallel setup, tokenizer, data, model, resume, train, report. Called by
pretrain_spiral.py; returns the process exit code."""

from __future__ import annotations

import json
import os

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_spiral.analysis.accounting import count_params, training_flops_per_sequence
from megatron_spiral.model.layer_specs import resolve_transformer_impl
from megatron_spiral.parallel import initialize_parallel
from megatron_spiral.training.arguments import RunConfig
from megatron_spiral.data.loader import shutdown_iterator
from megatron_spiral.training.checkpoint import acquire_save_dir, model_config_from_checkpoint
from megatron_spiral.training.data import build_iterators, build_run_tokenizer
from megatron_spiral.training.logger import print_rank_0
from megatron_spiral.training.loop import Trainer
from megatron_spiral.training.setup import build_training_state


def _describe(run: RunConfig, state) -> None:
    spiral = state.spiral
    params = count_params(spiral)
    dp = parallel_state.get_data_parallel_world_size()
    tp = parallel_state.get_tensor_model_parallel_world_size()
    print_rank_0(
        f" > model: {run.preset or 'custom'} layout={spiral.layout} topology={spiral.topology} "
        f"d={spiral.hidden_size} heads={spiral.num_attention_heads} seq={spiral.seq_length} "
        f"vocab={spiral.vocab_size}->{spiral.padded_vocab_size} "
        f"layer spec={resolve_transformer_impl(spiral.transformer_impl)}\n"
        f" > parameters: {params.total / 1e6:.2f}M total, {params.non_embedding / 1e6:.2f}M "
        f"non-embedding; training FLOPs/sequence {training_flops_per_sequence(spiral) / 1e9:.2f} GFLOP\n"
        f" > parallel: world={dist.get_world_size()} TP={tp} SP={state.model.module.config.sequence_parallel} "
        f"DP={dp} distributed optimizer={run.parallel.use_distributed_optimizer}; "
        f"global batch {state.global_batch_size} = micro {run.train.micro_batch_size} x "
        f"accumulation {state.num_microbatches} x DP {dp}; "
        f"precision {'bf16' if run.parallel.bf16 else 'fp32'} on {'GPU' if torch.cuda.is_available() else 'CPU'}")


def pretrain(run: RunConfig) -> int:
    initialize_parallel(run.parallel.tensor_model_parallel_size, run.parallel.seed,
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
    state = build_training_state(run.model, run.parallel, run.train, run.optim)
    _describe(run, state)
    trainer = Trainer(run, state, tokenizer)
    trainer.resume()
    train_iterator, valid_iterator = build_iterators(run, state, tokenizer)
    try:
        trainer.train(train_iterator, valid_iterator)
        if valid_iterator is not None and run.train.eval_iters > 0 and (
                not run.train.eval_interval or state.iteration % run.train.eval_interval):
            trainer.validate(valid_iterator)  # a final validation unless the last step just had one
    finally:  # stop loader workers now, on success and failure alike (no exit-time waits)
        for iterator in (train_iterator, valid_iterator):
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
    return 0
