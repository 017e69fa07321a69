"""Resumable, data-parallel batch iterators over the megatron datasets.

Sample order is a pure function of the dataset (already shuffled by megatron with ``--data-seed``):
global sample ``i`` of the training run is ``dataset[i]``. A global batch is the next
``global_batch_size`` samples; it is consumed as micro-batches of ``micro_batch_size * dp`` samples,
of which data-parallel rank ``r`` takes the ``r``-th slice of ``micro_batch_size``. So

* resuming with ``consumed_samples = iteration * global_batch_size`` continues exactly where the
  checkpointed run stopped (no sample repeated or skipped, no state beyond one integer), and
* every micro-batch is disjoint across DP ranks, and the union over ranks is the single-rank batch.

This is Megatron-LM's ``MegatronPretrainingSampler`` contract, without its training package.
"""

from __future__ import annotations

import atexit
import os
import signal
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

import torch

from megatron_spiral.data.config import DataConfig


class ResumableDistributedSampler:
    """Batch sampler: this rank's micro-batches of indices, from ``consumed_samples`` on.

    With ``cyclic=True`` (validation/test) indices wrap around the dataset forever; otherwise the
    iteration stops before a step that would need samples past ``total_samples``.
    """

    def __init__(
        self,
        total_samples: int,
        consumed_samples: int,
        micro_batch_size: int,
        data_parallel_rank: int = 0,
        data_parallel_size: int = 1,
        cyclic: bool = False,
    ) -> None:
        if total_samples <= 0:
            raise ValueError(f"the dataset is empty (total_samples={total_samples}).")
        if micro_batch_size <= 0 or data_parallel_size <= 0:
            raise ValueError("micro_batch_size and data_parallel_size must be positive.")
        if not 0 <= data_parallel_rank < data_parallel_size:
            raise ValueError(f"data_parallel_rank {data_parallel_rank} not in [0, {data_parallel_size}).")
        step = micro_batch_size * data_parallel_size
        if consumed_samples < 0 or consumed_samples % step:
            raise ValueError(
                f"consumed_samples={consumed_samples} must be a non-negative multiple of "
                f"micro_batch_size * data_parallel_size = {step} (it counts whole global batches)."
            )
        if not cyclic and consumed_samples > total_samples:
            raise ValueError(
                f"consumed_samples={consumed_samples} exceeds the {total_samples} samples of the dataset; "
                "the resumed run asks for more training samples than were built (raise train samples)."
            )
        if not cyclic and total_samples < step:
            raise ValueError(f"the dataset has {total_samples} samples, fewer than one step of {step}.")
        self.total_samples = total_samples
        self.consumed_samples = consumed_samples
        self.micro_batch_size = micro_batch_size
        self.rank, self.world = data_parallel_rank, data_parallel_size
        self.cyclic = cyclic

    @property
    def step(self) -> int:
        return self.micro_batch_size * self.world

    def __len__(self) -> int:
        if self.cyclic:
            raise TypeError("a cyclic sampler has no length")
        return (self.total_samples - self.consumed_samples) // self.step

    def __iter__(self) -> Iterator[List[int]]:
        start = self.consumed_samples + self.rank * self.micro_batch_size
        while self.cyclic or start - self.rank * self.micro_batch_size + self.step <= self.total_samples:
            batch = range(start, start + self.micro_batch_size)
            yield [i % self.total_samples for i in batch] if self.cyclic else list(batch)
            start += self.step


class _WorkerSigterm:
    """worker_init_fn: loader workers outlive a SLURM SIGTERM, but not their parent's exit.

    SLURM signals every process of the job; the training process decides when to stop (it saves
    first), so a worker must not die on that SIGTERM underneath it. But Python's exit-time
    multiprocessing cleanup stops daemon workers with SIGTERM and then joins them: a worker that
    ignored SIGTERM unconditionally hung every failing run forever. So a worker ignores SIGTERM only
    while its parent is alive and has not started shutting its loaders down (``release``).
    """

    def __init__(self) -> None:
        import multiprocessing

        self.parent = os.getpid()
        self.releasing = multiprocessing.Event()
        atexit.register(self.release)  # runs before multiprocessing's own exit hook (LIFO)

    def release(self) -> None:
        """From now on workers exit on SIGTERM (the parent is exiting)."""
        self.releasing.set()

    def __call__(self, worker_id: int) -> None:
        signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum, frame) -> None:
        if self.releasing.is_set() or os.getppid() != self.parent:
            os._exit(0)


def shutdown_iterator(iterator) -> None:
    """Stop a DataLoader iterator's worker processes now (a no-op for in-process loading)."""
    init = getattr(iterator, "_worker_init_fn", None)
    if isinstance(init, _WorkerSigterm):
        init.release()
    shutdown = getattr(iterator, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()


def build_data_loader(
    dataset,
    consumed_samples: int,
    micro_batch_size: int,
    data_parallel_rank: int = 0,
    data_parallel_size: int = 1,
    num_workers: int = 2,
    cyclic: bool = False,
) -> torch.utils.data.DataLoader:
    """DataLoader yielding this rank's micro-batches: dicts of [micro_batch_size, seq_length] tensors
    (``tokens``, ``labels``, ``loss_mask``, ``position_ids``; blends add ``dataset_id``)."""
    sampler = ResumableDistributedSampler(
        len(dataset), consumed_samples, micro_batch_size, data_parallel_rank, data_parallel_size, cyclic
    )
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=num_workers,
        worker_init_fn=_WorkerSigterm() if num_workers > 0 else None,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=num_workers > 0,
    )


class VocabularyCheckedBatches:
    """A micro-batch iterator that refuses token ids outside the tokenizer's vocabulary.

    Data preprocessed with another tokenizer would otherwise fail far from its cause: an index
    error (CPU) or a device-side assert (CUDA) in the embedding at TP=1, and at TP > 1 megatron's
    vocab-parallel embedding and cross entropy silently treat such ids as zero vectors / zero
    logits. The check is one max over each CPU batch. Attributes (e.g. the DataLoader iterator's
    worker handles used by :func:`shutdown_iterator`) are the wrapped iterator's."""

    def __init__(self, batches: Iterator, vocab_size: int, split: str) -> None:
        self.batches = batches
        self.vocab_size = vocab_size
        self.split = split

    def __iter__(self) -> "VocabularyCheckedBatches":
        return self

    def __next__(self) -> dict:
        batch = next(self.batches)
        top = max(int(batch["tokens"].max()), int(batch["labels"].max()))
        if top >= self.vocab_size:
            from megatron_spiral.data.gpt_data import DataError  # not on the per-batch path

            raise DataError(
                f"token id {top} in a {self.split} batch is outside the tokenizer's vocabulary "
                f"({self.vocab_size} ids): the dataset was preprocessed with another tokenizer. "
                "Train with the tokenizer it was made with (--tokenizer-type / --tokenizer-model), "
                "or preprocess it again with tools/preprocess_data.py and this tokenizer.")
        return batch

    def __getattr__(self, name: str):
        return getattr(self.batches, name)


def build_train_valid_test_data_iterators(
    data_config: DataConfig,
    tokenizer,
    train_val_test_num_samples: Sequence[Optional[int]],
    micro_batch_size: int,
    data_parallel_rank: int = 0,
    data_parallel_size: int = 1,
    consumed_train_samples: int = 0,
    consumed_valid_samples: int = 0,
    is_built_on_rank: Callable[[], bool] = lambda: True,
) -> Tuple[Optional[Iterator], Optional[Iterator], Optional[Iterator]]:
    """Datasets + loaders in one call: (train, valid, test) iterators of micro-batch dicts, or None.

    The train iterator ends after the built samples; valid/test cycle forever (evaluation draws
    ``eval_iters`` batches at a time). Resume by passing the checkpoint's consumed sample counts.
    """
    from megatron_spiral.data.gpt_data import build_train_valid_test_datasets

    datasets = build_train_valid_test_datasets(data_config, tokenizer, train_val_test_num_samples, is_built_on_rank)
    consumed = (consumed_train_samples, consumed_valid_samples, 0)
    iterators = []
    for i, dataset in enumerate(datasets):
        if dataset is None or len(dataset) == 0:
            iterators.append(None)
            continue
        cyclic = i > 0
        loader = build_data_loader(
            dataset,
            consumed[i],
            micro_batch_size,
            data_parallel_rank,
            data_parallel_size,
            data_config.num_workers,
            cyclic=cyclic,
        )
        iterators.append(VocabularyCheckedBatches(iter(loader), tokenizer.vocab_size,
                                                  ("training", "validation", "test")[i]))
    return tuple(iterators)
