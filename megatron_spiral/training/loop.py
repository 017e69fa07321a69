"""The pretraining driver: setup -> (resume) -> train with logging, eval, checkpoints, exits.

Follows Megatron-LM's train(): log every step into the writers, evaluate every --eval-interval,
save every --save-interval, and stop at --train-iters or at an exit condition (signal, duration,
--exit-interval), saving first. Only a run that reached --train-iters is evaluated at the end
(validation and test sets); an early exit ends without (Megatron-LM exits from the loop).
"""

from __future__ import annotations

import gc
import time
from typing import Iterator, Optional

from megatron_spiral.analysis.accounting import training_flops_per_sequence
from megatron_spiral.training.arguments import RunConfig
from megatron_spiral.training.checkpoint import load_training_checkpoint, save_training_checkpoint
from megatron_spiral.training.logger import (
    IterationStats,
    LogOptions,
    ScalarWriter,
    TrainingLogger,
    loop_diagnostics,
    params_l2_norm,
    print_rank_0,
)
from megatron_spiral.training.signals import ExitSignalHandler
from megatron_spiral.training.step import TrainingStopped, any_rank, evaluate, train_step

FINISHED = "finished"


def log_options(run: RunConfig) -> LogOptions:
    log = run.log
    return LogOptions(
        log_interval=run.train.log_interval, tensorboard_log_interval=log.tensorboard_log_interval,
        log_throughput=log.log_throughput, log_timers_to_tensorboard=log.log_timers_to_tensorboard,
        log_loss_scale_to_tensorboard=log.log_loss_scale_to_tensorboard,
        log_validation_ppl_to_tensorboard=log.log_validation_ppl_to_tensorboard,
        log_world_size_to_tensorboard=log.log_world_size_to_tensorboard)


class Trainer:
    """Owns the loop; ``train_iterator`` / ``valid_iterator`` yield micro-batch dicts (tokens,
    labels, loss_mask[, position_ids]) already positioned after the consumed samples."""

    def __init__(self, run: RunConfig, state, tokenizer=None, wandb_run=None) -> None:
        self.run = run
        self.state = state
        self.tokenizer = tokenizer
        if not state.train_iters:
            state.train_iters = run.train.train_iters
        writer = ScalarWriter(run.log.tensorboard_dir, run.log.tensorboard_queue_size, wandb_run)
        self.logger = TrainingLogger(
            state.train_iters, training_flops_per_sequence(state.spiral), state.spiral.seq_length,
            options=log_options(run), writer=writer)
        self.signal_handler = (ExitSignalHandler(run.train.exit_signal)
                               if run.train.exit_signal_handler else None)
        self.start_time = time.time()
        self.last_validation_loss: Optional[float] = None
        self.losses = []
        self._param_gather_overlap = run.parallel.overlap_param_gather
        self.consecutive_skips = 0
        self.loaded_iteration: Optional[int] = None

    def resume(self) -> None:
        ckpt = self.run.checkpoint
        if not ckpt.load:
            return
        directory = load_training_checkpoint(self.state, ckpt.load, options=ckpt, tokenizer=self.tokenizer)
        if directory is None:
            return  # nothing there: a fresh start (the log says so)
        self.loaded_iteration = self.state.iteration
        print_rank_0(f" > loaded checkpoint {directory} at iteration {self.state.iteration} "
                     f"({self.state.consumed_train_samples} consumed samples)")

    def _sync_params(self) -> None:
        """With --overlap-param-gather the last step's all-gather may still be in flight: finish it
        before weights are read (save, evaluate), as Megatron-LM's force_param_sync."""
        if self._param_gather_overlap:
            self.state.model.start_param_sync(force_sync=True)

    def save(self) -> None:
        if self.run.checkpoint.save:
            self._sync_params()
            directory = save_training_checkpoint(self.state, self.run.checkpoint.save, self.tokenizer)
            print_rank_0(f" > saved checkpoint at iteration {self.state.iteration} to {directory}")

    def _exit_reason(self) -> Optional[str]:
        train, it = self.run.train, self.state.iteration
        if self.signal_handler is not None and any_rank(self.signal_handler.received):
            return "exit signal received"
        if train.exit_duration_in_mins is not None:
            minutes = (time.time() - self.start_time) / 60.0
            if any_rank(minutes > train.exit_duration_in_mins):
                return f"exit duration of {train.exit_duration_in_mins} min reached"
        if train.exit_interval and it % train.exit_interval == 0:
            return f"exit interval {train.exit_interval} reached"
        return None

    def _step(self, train_iterator: Iterator, diagnostics: Optional[dict]):
        state = self.state
        if diagnostics is not None:
            with loop_diagnostics(state.model.module, diagnostics):
                return train_step(state, train_iterator, self.run.train.nan_policy)
        return train_step(state, train_iterator, self.run.train.nan_policy)

    def _stats(self, result, write_norms: bool) -> IterationStats:
        state = self.state
        params_norm = None
        if self.run.log.log_params_norm and write_norms:
            params_norm = params_l2_norm(state.model.module)
        return IterationStats(
            loss=result.loss, skipped=not result.applied, nan=not result.finite,
            learning_rate=state.optimizer.param_groups[0]["lr"],
            loss_scale=float(state.optimizer.get_loss_scale().item()),
            grad_norm=result.grad_norm, params_norm=params_norm)

    def train(self, train_iterator: Iterator, valid_iterator: Optional[Iterator] = None) -> str:
        """Run until --train-iters or an exit condition; returns why it stopped."""
        state, train = self.state, self.run.train
        saved_at = None
        reason = FINISHED
        if train.manual_gc:
            gc.disable()  # Megatron-LM: collect at fixed steps so that ranks pause together
            gc.collect()
        while state.iteration < state.train_iters:
            it = state.iteration + 1
            log_now = bool(train.log_interval) and it % train.log_interval == 0
            tb_now = it % self.run.log.tensorboard_log_interval == 0
            diagnostics = {} if log_now and self.run.log.log_loop_diagnostics else None
            result = self._step(train_iterator, diagnostics)
            state.iteration += 1
            state.consumed_train_samples += state.global_batch_size
            self.losses.append(result.loss)
            self.logger.record(result.loss, result.finite, skipped=not result.applied)
            stats = self._stats(result, write_norms=log_now or tb_now)
            self.logger.write_step(state.iteration, state.consumed_train_samples, state.global_batch_size, stats)
            if log_now:
                self.logger.log(state.iteration, state.consumed_train_samples, state.global_batch_size,
                                stats, diagnostics or {})
            self.consecutive_skips = 0 if result.finite else self.consecutive_skips + 1
            if self.consecutive_skips > train.max_skipped_iters:
                raise TrainingStopped(
                    f"iteration {state.iteration}: more than {train.max_skipped_iters} consecutive steps "
                    "skipped for NaN/Inf (--max-skipped-iters); stopping. Lower --lr or inspect the data.")
            if train.manual_gc and train.manual_gc_interval and state.iteration % train.manual_gc_interval == 0:
                gc.collect()
            if (valid_iterator is not None and train.eval_interval and train.eval_iters > 0
                    and state.iteration % train.eval_interval == 0):
                self.validate(valid_iterator, f"iteration {state.iteration}")
            ckpt = self.run.checkpoint
            if ckpt.save and ckpt.save_interval and state.iteration % ckpt.save_interval == 0:
                self.save()
                saved_at = state.iteration
            exit_reason = self._exit_reason()
            if exit_reason:
                reason = exit_reason
                break
        if saved_at != state.iteration and state.iteration != self.loaded_iteration:
            self.save()  # (a relaunch of a finished run does not re-publish the checkpoint it loaded)
        print_rank_0(f" > training stopped at iteration {state.iteration}: {reason}")
        if train.manual_gc:
            gc.enable()
        if self.signal_handler is not None:
            self.signal_handler.restore()
        return reason

    def validate(self, valid_iterator: Iterator, prefix: Optional[str] = None) -> float:
        """One evaluation of --eval-iters batches, printed as Megatron-LM's validation block."""
        train = self.run.train
        self._sync_params()
        if train.manual_gc and train.manual_gc_eval:
            gc.collect()
        loss = evaluate(self.state, valid_iterator, train.eval_iters)
        if train.manual_gc and train.manual_gc_eval:
            gc.collect(generation=0)
        prefix = prefix or f"iteration {self.state.iteration}"
        self.logger.log_validation(prefix, self.state.iteration, loss, self.state.consumed_train_samples)
        if "test set" not in prefix:
            self.last_validation_loss = loss
        return loss

    def close(self) -> None:
        self.logger.close()
