"""Tokenizer and data iterators for a training run (megatron_spiral.data does the work)."""

from __future__ import annotations

import dataclasses

from megatron.core import parallel_state

from megatron_spiral.data.gpt_data import megatron_num_samples
from megatron_spiral.data.loader import build_train_valid_test_data_iterators
from megatron_spiral.tokenizer import build_tokenizer


def build_run_tokenizer(run):
    """The run's tokenizer. ``--mock-data`` without tokenizer flags gets a NullTokenizer whose
    vocabulary (ids + EOD + pad) matches the model's."""
    config = run.tokenizer
    no_files = not any((config.tokenizer_model, config.vocab_file, config.merge_file))
    if run.data.mock_data and no_files and config.tokenizer_type != "NullTokenizer":
        config = dataclasses.replace(config, tokenizer_type="NullTokenizer",
                                     vocab_size=max(run.model.vocab_size - 2, 1))
    return build_tokenizer(config)


def train_valid_test_num_samples(train, state) -> list:
    """Megatron-LM's get_train_valid_test_num_samples: ``megatron_num_samples`` of the run's
    iterations, with --train-samples replacing the train count. --eval-iters 0 builds no validation
    or test data."""
    counts = megatron_num_samples(state.train_iters, max(train.eval_iters, 0), train.eval_interval,
                                  state.global_batch_size)
    if train.train_samples:
        counts[0] = train.train_samples
    return counts


def build_iterators(run, state, tokenizer):
    """(train, valid, test) micro-batch iterators for this data-parallel rank, resumed at the
    state's consumed train and validation samples. Valid/test are None without such a split or with
    --eval-iters 0."""
    train = run.train
    train_iter, valid_iter, test_iter = build_train_valid_test_data_iterators(
        run.data, tokenizer, train_valid_test_num_samples(train, state), train.micro_batch_size,
        data_parallel_rank=parallel_state.get_data_parallel_rank(),
        data_parallel_size=parallel_state.get_data_parallel_world_size(),
        consumed_train_samples=state.consumed_train_samples,
        consumed_valid_samples=state.consumed_valid_samples,
    )
    if train.eval_iters <= 0:
        valid_iter = test_iter = None
    return train_iter, valid_iter, test_iter
