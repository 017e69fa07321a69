"""The pretraining driver: setup -> (resume) -> train with logging, eval, checkpoints, exits."""

from __future__ import annotations

import time
from typing import Iterator, Optional

from megatron_spiral.analysis.accounting import training_flops_per_sequence
from megatron_spiral.training.arguments import RunConfig
from megatron_spiral.training.checkpoint import load_training_checkpoint, save_training_checkpoint
from megatron_spiral.training.logger import TrainingLogger, loop_diagnostics, print_rank_0
from megatron_spiral.training.signals import ExitSignalHandler
from megatron_spiral.training.step import TrainingStopped, any_rank, evaluate, train_step


class Trainer:
    """Owns the loop; ``train_iterator`` / ``valid_iterator`` yield micro-batch dicts (tokens,
    labels, loss_mask[, position_ids]) already positioned after the consumed samples."""

    def __init__(self, run: RunConfig, state, tokenizer=None) -> None:
        self.run = run
        self.state = state
        self.tokenizer = tokenizer
        self.logger = TrainingLogger(
            run.train.train_iters, training_flops_per_sequence(state.spiral), state.spiral.seq_length,
            run.log.tensorboard_dir)
        self.signal_handler = ExitSignalHandler() if run.train.exit_signal_handler else None
        self.start_time = time.time()
        self.last_validation_loss: Optional[float] = None
        self.losses = []
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

    def save(self) -> None:
        if self.run.checkpoint.save:
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

    def train(self, train_iterator: Iterator, valid_iterator: Optional[Iterator] = None) -> str:
        """Run until --train-iters or an exit condition; returns why it stopped."""
        state, train = self.state, self.run.train
        saved_at = None
        reason = "finished"
        while state.iteration < train.train_iters:
            log_now = train.log_interval and (state.iteration + 1) % train.log_interval == 0
            diagnostics = {}
            if log_now and self.run.log.log_loop_diagnostics:
                with loop_diagnostics(state.model.module, diagnostics):
                    result = train_step(state, train_iterator, train.nan_policy)
            else:
                result = train_step(state, train_iterator, train.nan_policy)
            state.iteration += 1
            state.consumed_train_samples += state.global_batch_size
            self.losses.append(result.loss)
            self.logger.record(result.loss, result.finite)
            if log_now:
                self.logger.log(state.iteration, state.consumed_train_samples,
                                state.optimizer.param_groups[0]["lr"], state.global_batch_size,
                                result.grad_norm, state.skipped_iterations, state.nan_iterations,
                                diagnostics)
            self.consecutive_skips = 0 if result.finite else self.consecutive_skips + 1
            if self.consecutive_skips > train.max_skipped_iters:
                raise TrainingStopped(
                    f"iteration {state.iteration}: more than {train.max_skipped_iters} consecutive steps "
                    "skipped for NaN/Inf (--max-skipped-iters); stopping. Lower --lr or inspect the data.")
            if valid_iterator is not None and train.eval_interval and state.iteration % train.eval_interval == 0:
                self.validate(valid_iterator)
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
        self.logger.close()
        if self.signal_handler is not None:
            self.signal_handler.restore()
        return reason

    def validate(self, valid_iterator: Iterator) -> float:
        loss = evaluate(self.state, valid_iterator, self.run.train.eval_iters)
        self.logger.log_validation(self.state.iteration, loss, self.state.consumed_train_samples)
        self.last_validation_loss = loss
        return loss
