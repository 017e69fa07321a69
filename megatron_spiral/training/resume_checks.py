"""What a resume compares between the checkpoint and this run, and the messages it refuses with.

* Every SpiralConfig field (generically, ``dataclasses.fields``): a field an older checkpoint lacks
  counts as its default. ``IMPLEMENTATION_FIELDS`` choose how layers are computed, not what they
  are, and ``INITIALISATION_FIELDS`` only shape the initial weights: both may differ.
* The tokenizer: vocabulary size, EOD/pad ids and the vocabulary's sha256 fingerprint.
* The LR/WD schedule, by Megatron-LM's rule (``OptimizerParamScheduler._check_and_set``): a
  changed value is refused unless ``--override-opt-param-scheduler`` (use the new flags) or
  ``--use-checkpoint-opt-param-scheduler`` (keep the checkpoint's) is given.
* Whether the optimizer state is distributed (the two layouts are not interchangeable).
"""

from __future__ import annotations

import dataclasses
from typing import List, Optional, Tuple

from megatron_spiral.checkpointing import CheckpointError
from megatron_spiral.config import LEGACY_RECIPE, SpiralConfig

IMPLEMENTATION_FIELDS = frozenset({"transformer_impl"})
# Fields that only shape the initial weights: a resumed run never draws them again.
INITIALISATION_FIELDS = frozenset({"init_method_std", "output_init_depth", "mesh_router_init"})

# OptimizerParamScheduler.state_dict() keys Megatron-LM checks on load, with the flags that set them.
SCHEDULE_FIELDS = (
    ("max_lr", "--lr"),
    ("min_lr", "--min-lr"),
    ("lr_warmup_steps", "--lr-warmup-fraction / --lr-warmup-iters"),
    ("lr_decay_steps", "--train-iters / --lr-decay-iters"),
    ("lr_decay_style", "--lr-decay-style"),
    ("start_wd", "--weight-decay"),
    ("end_wd", "--weight-decay"),
    ("wd_incr_steps", "--train-iters"),
)


def _field_default(field: dataclasses.Field):
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return field.default_factory()  # type: ignore[misc]
    return None


def _normalise(value):
    return str(value) if isinstance(value, (int, float, str)) and not isinstance(value, bool) else value


def model_differences(saved: dict, current: SpiralConfig) -> List[Tuple[str, object, object]]:
    """(field, checkpoint value, this run's value) for every architecture field that differs."""
    diffs = []
    for field in dataclasses.fields(SpiralConfig):
        if field.name in IMPLEMENTATION_FIELDS or field.name in INITIALISATION_FIELDS:
            continue
        # A field the checkpoint lacks was written before it existed: the old behaviour (recipe
        # fields: LEGACY_RECIPE; the others' defaults are the old behaviour).
        old = saved.get(field.name, LEGACY_RECIPE.get(field.name, _field_default(field)))
        new = getattr(current, field.name)
        if old != new and _normalise(old) != _normalise(new):
            diffs.append((field.name, old, new))
    return diffs


def _flag(name: str) -> str:
    from megatron_spiral.config import SpiralConfig as _S

    for field in dataclasses.fields(_S):
        if field.name == name:
            return field.metadata.get("flag", "--" + name.replace("_", "-"))
    return "--" + name.replace("_", "-")


def check_model(saved: dict, current: SpiralConfig, ckpt_dir: str, finetune: bool, log=print) -> None:
    """Refuse a checkpoint whose architecture differs, naming every field, old and new value."""
    diffs = model_differences(saved, current)
    if not diffs:
        return
    listing = "; ".join(f"{name} ({_flag(name)}): checkpoint {old!r}, this run {new!r}" for name, old, new in diffs)
    if finetune:
        log(f" > --finetune: model fields differ from {ckpt_dir} ({listing}); loading the weights anyway "
            "(a shape mismatch is refused by the load)")
        return
    raise CheckpointError(
        f"checkpoint {ckpt_dir} was trained with a different model: {listing}. Pass the checkpoint's values "
        "(or --use-checkpoint-args to take them from the checkpoint; --finetune to load its weights into a "
        "different configuration)")


def check_tokenizer(saved: Optional[dict], tokenizer, ckpt_dir: str) -> None:
    """Refuse a tokenizer whose vocabulary differs from the checkpoint's (even with --finetune:
    the embedding rows would mean other tokens)."""
    if not saved or tokenizer is None:
        return
    from megatron_spiral.checkpointing import tokenizer_metadata

    current = tokenizer_metadata(tokenizer)
    for key, what in (("vocab_size", "vocabulary size"), ("sha256", "vocabulary (sha256 of its files)"),
                      ("eod", "EOD id"), ("pad", "pad id")):
        old, new = saved.get(key), current.get(key)
        if old is not None and new is not None and old != new:
            raise CheckpointError(
                f"checkpoint {ckpt_dir} was trained with another tokenizer: {what} {old!r} there, {new!r} with "
                f"this run's tokenizer flags. Pass the tokenizer it was trained with (its copy is in "
                f"{ckpt_dir}/tokenizer)")


def schedule_differences(saved: dict, scheduler) -> List[Tuple[str, str, object, object]]:
    """(key, flags, checkpoint value, this run's value) of the schedule values that differ."""
    diffs = []
    for key, flags in SCHEDULE_FIELDS:
        if key in saved and hasattr(scheduler, key):
            old, new = saved[key], getattr(scheduler, key)
            if old != new:
                diffs.append((key, flags, old, new))
    return diffs


def apply_schedule_rule(saved: dict, scheduler, override: bool, use_checkpoint: bool, ckpt_dir: str,
                        log=print) -> None:
    """Megatron-LM's rule, with a message instead of its bare assert; configures ``scheduler``
    so that its ``load_state_dict`` keeps the chosen values."""
    diffs = schedule_differences(saved, scheduler)
    scheduler.override_opt_param_scheduler = override
    scheduler.use_checkpoint_opt_param_scheduler = use_checkpoint or not override
    if not diffs:
        return
    listing = "; ".join(f"{key} ({flags}): checkpoint {old!r}, this run {new!r}" for key, flags, old, new in diffs)
    if override:
        log(f" > --override-opt-param-scheduler: using this run's schedule ({listing})")
    elif use_checkpoint:
        log(f" > --use-checkpoint-opt-param-scheduler: keeping the checkpoint's schedule ({listing})")
    else:
        raise CheckpointError(
            f"the learning-rate schedule differs from checkpoint {ckpt_dir}: {listing}. Pass "
            "--override-opt-param-scheduler to use the new flags (the step count is kept) or "
            "--use-checkpoint-opt-param-scheduler to keep the checkpoint's schedule")


def check_optimizer_layout(meta: dict, distributed: bool, ckpt_dir: str) -> None:
    saved = meta.get("use_distributed_optimizer")
    if saved is not None and bool(saved) != distributed:
        have = "with" if saved else "without"
        now = "--use-distributed-optimizer" if distributed else "no --use-distributed-optimizer"
        raise CheckpointError(
            f"checkpoint {ckpt_dir} holds optimizer state saved {have} --use-distributed-optimizer but this "
            f"run has {now}; the two layouts do not convert. Pass the same flag as the run that saved it, or "
            "--no-load-optim to load weights, iteration and RNG with a fresh optimizer")
