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


def build_iterators(run, state, tokenizer):
    """(train, valid) micro-batch iterators for this data-parallel rank, resumed at the state's
    consumed train and validation samples. Valid is None when the split has no validation data."""
    train = run.train
    num_samples = megatron_num_samples(train.train_iters, train.eval_iters, train.eval_interval,
                                       state.global_batch_size)
    train_iter, valid_iter, _ = build_train_valid_test_data_iterators(
        run.data, tokenizer, num_samples, train.micro_batch_size,
        data_parallel_rank=parallel_state.get_data_parallel_rank(),
        data_parallel_size=parallel_state.get_data_parallel_world_size(),
        consumed_train_samples=state.consumed_train_samples,
        consumed_valid_samples=state.consumed_valid_samples,
    )
    return train_iter, valid_iter
