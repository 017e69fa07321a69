"""Training datasets: megatron-core's GPTDataset over (blends of) indexed datasets, or mock data.

``build_train_valid_test_datasets`` wraps ``BlendedMegatronDatasetBuilder`` with what megatron-core
0.16.1 leaves to Megatron-LM's training package or gets wrong outside it:

* the ``--data-path`` blend is parsed and every prefix checked up front (a missing ``.idx`` or a
  prefix given with its ``.bin`` suffix gets a message instead of a deep traceback);
* a split that leaves a dataset part with no documents is refused: GPTDataset would otherwise loop
  forever looking for tokens (``_get_num_epochs`` with an empty epoch);
* ``BlendedDataset`` calls ``torch.distributed.get_rank()`` unconditionally when it has a cache
  path, so building a blend outside ``torch.distributed`` (tests, tools, single-process runs) crashes;
  there we answer rank 0 for the duration of the build;
* the C++ index helpers are made available (megatron_spiral/data/helpers.py).
"""

from __future__ import annotations

import contextlib
import os
import warnings
from typing import Callable, List, Optional, Sequence, Tuple

from megatron_spiral.data.config import DataConfig
from megatron_spiral.data.helpers import ensure_dataset_helpers
from megatron_spiral.data.index_cache import atomic_numpy_saves, repair_index_cache

Blend = Tuple[List[str], Optional[List[float]]]
SPLIT_NAMES = ("train", "valid", "test")


class DataError(ValueError):
    """The data flags do not describe usable datasets; the message says how to fix them."""


def _as_float(token: str) -> Optional[float]:
    try:
        return float(token)
    except ValueError:
        return None


def parse_blend(values: Optional[Sequence[str]], flag: str = "--data-path") -> Optional[Blend]:
    """``['0.3', 'a', '0.7', 'b']`` -> (['a', 'b'], [0.3, 0.7]); ``['a', 'b']`` -> (['a', 'b'], None).

    Items may also hold several whitespace-separated tokens (a blend pasted as one string).
    """
    if not values:
        return None
    tokens = [t for v in values for t in str(v).split()]
    numeric = [_as_float(t) is not None for t in tokens]
    if not any(numeric):
        return tokens, None
    if len(tokens) % 2 or not all(numeric[0::2]) or any(numeric[1::2]):
        raise DataError(
            f"{flag} {' '.join(tokens)!r}: a weighted blend alternates WEIGHT PREFIX pairs "
            "(e.g. '0.3 data/a_text_document 0.7 data/b_text_document'); an unweighted one lists prefixes only."
        )
    weights = [float(t) for t in tokens[0::2]]
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise DataError(f"{flag}: blend weights must be >= 0 with a positive sum, got {weights}.")
    return tokens[1::2], weights


def check_prefix(prefix: str) -> None:
    """Raise DataError unless ``prefix.bin`` and ``prefix.idx`` exist."""
    if os.path.isfile(prefix + ".bin") and os.path.isfile(prefix + ".idx"):
        return
    stem, ext = os.path.splitext(prefix)
    if ext in (".bin", ".idx") and os.path.isfile(stem + ".idx"):
        raise DataError(f"{prefix!r}: pass the dataset prefix without its extension: {stem!r}.")
    if os.path.isfile(prefix + "_text_document.idx"):
        raise DataError(f"{prefix!r} is an output prefix; the dataset is {prefix + '_text_document'!r}.")
    raise DataError(
        f"no indexed dataset at {prefix!r} ({prefix}.bin/.idx missing). Create it with "
        "tools/preprocess_data.py and pass PREFIX_KEY_document (e.g. data/pile_00_text_document)."
    )


def open_checked(prefix: str):
    """megatron's IndexedDataset for ``prefix``, refused with a message when the .idx is unreadable or
    the .bin does not hold exactly the bytes the .idx points at (truncated, or not its pair)."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    try:
        dataset = IndexedDataset(prefix)
    except Exception as err:  # noqa: BLE001 - struct/numpy/assert errors of a damaged index
        raise DataError(f"{prefix}.idx is not a readable megatron index ({type(err).__name__}: {err}); "
                        "re-create it with tools/preprocess_data.py.") from None
    index = dataset.index
    count = len(index.sequence_lengths)
    expected = 0 if count == 0 else int(index.sequence_pointers[-1]) + int(index.sequence_lengths[-1]) * index.dtype_size
    actual = os.path.getsize(prefix + ".bin")
    if actual != expected:
        raise DataError(
            f"{prefix}.bin has {actual:,} bytes but its .idx describes {expected:,} ({count:,} sequences): the .bin is "
            f"{'truncated' if actual < expected else 'not the one this index was written with'}. Re-create the "
            "dataset with tools/preprocess_data.py (or copy both files again).")
    return dataset


def _document_ranges(num_docs: int, split_matrix) -> List[Optional[Tuple[int, int]]]:
    # Same rounding as BlendedMegatronDatasetBuilder._build_megatron_dataset_splits.
    return [
        None if part is None else (int(round(part[0] * num_docs)), int(round(part[1] * num_docs)))
        for part in split_matrix
    ]


def check_splits(blend: Blend, split: Optional[str], flag: str, only: Optional[int] = None) -> None:
    """Refuse blends whose datasets have an empty (or single-token) part for a requested split."""
    from megatron.core.datasets.blended_megatron_dataset_config import (
        convert_split_vector_to_split_matrix,
        parse_and_normalize_split,
    )
    matrix = convert_split_vector_to_split_matrix(parse_and_normalize_split(split or "1,0,0"))
    for prefix in blend[0]:
        check_prefix(prefix)
        dataset = open_checked(prefix)  # keep alive: sequence_lengths is a view of its mmap
        lengths = dataset.sequence_lengths
        for i, rng in enumerate(_document_ranges(len(lengths), matrix)):
            if rng is None or (only is not None and i != only):
                continue
            beg, end = rng
            if end <= beg or int(lengths[beg:end].sum()) < 2:
                raise DataError(
                    f"{flag}: dataset {prefix} has {len(lengths)} documents and --split {split} gives its "
                    f"{SPLIT_NAMES[i]} part documents [{beg}, {end}) with no usable tokens. Give that part "
                    "more weight, set it to 0 (e.g. --split 98,2,0), or add data."
                )


@contextlib.contextmanager
def _rank_zero_without_distributed():
    """Let megatron's BlendedDataset ask for the rank when torch.distributed is not initialized."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        yield
        return
    original = dist.get_rank
    dist.get_rank = lambda group=None: 0
    try:
        yield
    finally:
        dist.get_rank = original


def gpt_dataset_config(data_config: DataConfig, tokenizer):
    """The megatron GPTDatasetConfig for ``data_config`` (no position/attention resets, no mask)."""
    from megatron.core.datasets.gpt_dataset import GPTDatasetConfig

    per_split = None
    if not data_config.mock_data and not data_config.data_path:
        per_split = [
            parse_blend(data_config.train_data_path, "--train-data-path"),
            parse_blend(data_config.valid_data_path, "--valid-data-path"),
            parse_blend(data_config.test_data_path, "--test-data-path"),
        ]
    blend = None if data_config.mock_data else parse_blend(data_config.data_path)
    return GPTDatasetConfig(
        random_seed=data_config.data_seed,
        sequence_length=data_config.seq_length,
        blend=blend,
        blend_per_split=per_split,
        split=data_config.split if blend is not None else None,
        path_to_cache=data_config.data_cache_path,
        mmap_bin_files=data_config.mmap_bin_files,
        tokenizer=tokenizer,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=data_config.eod_mask_loss,
        create_attention_mask=False,
    )


def build_train_valid_test_datasets(
    data_config: DataConfig,
    tokenizer,
    train_val_test_num_samples: Sequence[Optional[int]],
    is_built_on_rank: Callable[[], bool] = lambda: True,
):
    """(train, valid, test) megatron datasets yielding dicts of ``seq_length``-token tensors.

    ``train_val_test_num_samples``: samples each split must provide (see ``megatron_num_samples``).
    A split is None when it has no data (weight 0, or no --*-data-path). Every sample is built from
    ``seq_length + 1`` consecutive tokens of the document stream: ``tokens`` = the first
    ``seq_length``, ``labels`` = the last ``seq_length``.
    """
    data_config.validate()
    ensure_dataset_helpers()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # megatron.core's "Transformer Engine not installed"
        from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
        from megatron.core.datasets.gpt_dataset import GPTDataset, MockGPTDataset

    if tokenizer.pad == tokenizer.eod:
        raise DataError("the tokenizer's pad id equals its EOD id; GPTDataset would mask every EOD.")
    config = gpt_dataset_config(data_config, tokenizer)
    if config.blend is not None:
        check_splits(config.blend, config.split, "--data-path")
    elif config.blend_per_split is not None:
        flags = ("--train-data-path", "--valid-data-path", "--test-data-path")
        for blend, flag in zip(config.blend_per_split, flags):
            if blend is not None:
                check_splits(blend, None, flag, only=0)
    cls = MockGPTDataset if config.mock else GPTDataset
    repair_index_cache(_cache_dirs(config))
    with _rank_zero_without_distributed(), atomic_numpy_saves():
        datasets = BlendedMegatronDatasetBuilder(
            cls, list(train_val_test_num_samples), is_built_on_rank, config
        ).build()
    for dataset in datasets:
        _disable_mask_cache(dataset)
    return tuple(datasets)


def _disable_mask_cache(dataset) -> None:
    """megatron-core 0.16.1's GPTDataset caches the first sample's loss mask *after* zeroing that
    sample's pad positions in place, so every later sample inherits them: the masks depend on which
    sample a process read first, and a resumed run (first sample = the next one, not sample 0)
    computes other losses than the uninterrupted run (measured: validation 5.448368 vs 5.447865).
    Computing the masks per sample (cheap without an attention mask) removes the history."""
    if dataset is None:
        return
    for child in getattr(dataset, "datasets", None) or []:  # BlendedDataset
        _disable_mask_cache(child)
    if hasattr(dataset, "masks_and_position_ids_are_cacheable"):
        dataset.masks_and_position_ids_are_cacheable = False


def _cache_dirs(config) -> List[str]:
    """Where megatron keeps this build's index cache: --data-cache-path, else PREFIX/cache/..."""
    if config.path_to_cache:
        return [config.path_to_cache]
    blends = [config.blend] if config.blend is not None else list(config.blend_per_split or [])
    return [os.path.join(prefix, "cache", "GPTDataset_indices") for blend in blends if blend for prefix in blend[0]]


def megatron_num_samples(train_iters: int, eval_iters: int, eval_interval: int, global_batch_size: int) -> List[int]:
    """Megatron-LM's train/valid/test sample counts for an iteration schedule: validation for every
    --eval-interval evaluation plus the final one, test for one evaluation."""
    evaluations = (train_iters // eval_interval if eval_interval else 0) + 1
    return [train_iters * global_batch_size, evaluations * eval_iters * global_batch_size,
            eval_iters * global_batch_size]
