"""Shared helpers for training tests: a deterministic synthetic corpus sharded like Megatron's sampler."""

import torch


def synthetic_sample(index: int, seq_length: int, vocab: int) -> torch.Tensor:
    """A learnable sequence: a random start then +1 steps (mod vocab), so loss can fall fast."""
    gen = torch.Generator().manual_seed(index)
    start = int(torch.randint(0, vocab, (1,), generator=gen))
    stride = 1 + index % 3
    return (start + stride * torch.arange(seq_length + 1)) % vocab


def micro_batches(seq_length, vocab, micro_batch_size, global_batch_size, dp_rank, dp_size,
                  consumed_samples=0, offset=0):
    """Yield micro-batch dicts for this DP rank, starting after ``consumed_samples``."""
    per_rank = global_batch_size // dp_size
    step = consumed_samples // global_batch_size
    while True:
        base = offset + step * global_batch_size + dp_rank * per_rank
        for first in range(base, base + per_rank, micro_batch_size):
            samples = torch.stack([synthetic_sample(i, seq_length, vocab) for i in range(first, first + micro_batch_size)])
            yield {"tokens": samples[:, :-1].contiguous(), "labels": samples[:, 1:].contiguous(),
                   "loss_mask": torch.ones(micro_batch_size, seq_length)}
        step += 1


def run_config(argv):
    from megatron_spiral.training.arguments import parse_args

    return parse_args(argv)
