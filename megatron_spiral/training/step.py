"""One optimizer step and one evaluation pass, with megatron's forward-backward schedule.

The loss is the mean over non-masked tokens of the global batch. A step whose loss or gradients
are not finite is never applied: it is skipped (and counted) or the run stops, naming the
iteration.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Iterator, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func


class NonFiniteError(RuntimeError):
    """Raised under --nan-policy stop when a step's loss or gradients are NaN/Inf."""


class TrainingStopped(RuntimeError):
    """The loop gave up (e.g. too many consecutive skipped steps); the message says why."""


@dataclass
class StepResult:
    loss: float
    grad_norm: Optional[float]
    applied: bool
    finite: bool
    num_tokens: int


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def _loss_func(loss_mask: torch.Tensor, output: torch.Tensor):
    """Megatron's 3-tuple convention: (sum of token losses, token count, values to report)."""
    losses = output.float().reshape(-1)
    mask = loss_mask.float().reshape(-1)
    loss_sum = (losses * mask).sum()
    num_tokens = mask.sum().to(torch.int)
    report = torch.stack([loss_sum.detach().clone(), num_tokens.detach().float()])
    return loss_sum, num_tokens, {"lm loss": report}


def forward_step(data_iterator: Iterator, model):
    """Megatron forward_step_func: one micro-batch -> (per-token losses, loss function)."""
    batch = next(data_iterator)
    device = _device()
    tokens = batch["tokens"].to(device, non_blocking=True)
    labels = batch["labels"].to(device, non_blocking=True)
    loss_mask = batch["loss_mask"].to(device, non_blocking=True)
    position_ids = batch.get("position_ids")
    if position_ids is None:
        position_ids = torch.arange(tokens.shape[1], device=device).unsqueeze(0).expand_as(tokens)
    output = model(tokens, position_ids.to(device), None, labels=labels)
    return output, partial(_loss_func, loss_mask)


def _reduce_reports(reports, device) -> tuple:
    """Sum (loss, tokens) over micro-batches and data-parallel ranks -> (mean loss, tokens)."""
    total = torch.zeros(2, device=device, dtype=torch.float64)
    for report in reports:
        total += report["lm loss"].to(device, torch.float64)
    dist.all_reduce(total, group=parallel_state.get_data_parallel_group())
    tokens = int(total[1].item())
    return (total[0] / max(tokens, 1)).item(), tokens


def gradients_finite(model) -> bool:
    """True on every rank iff no rank holds a NaN/Inf gradient (local check + global MIN)."""
    finite = all(bool(torch.isfinite(buffer.grad_data).all()) for buffer in model.buffers)
    return all_ranks_agree(finite)


def all_ranks_agree(flag: bool) -> bool:
    """Logical AND of a per-rank flag over the whole world."""
    value = torch.tensor([1 if flag else 0], dtype=torch.int32, device=_device())
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item())


def any_rank(flag: bool) -> bool:
    return not all_ranks_agree(not flag)


def uses_dynamic_loss_scale(optimizer) -> bool:
    from megatron.core.optimizer.grad_scaler import DynamicGradScaler

    inner = getattr(optimizer, "chained_optimizers", None) or [optimizer]  # get_megatron_optimizer may chain
    return any(isinstance(getattr(o, "grad_scaler", None), DynamicGradScaler) for o in inner)


def train_step(state, data_iterator: Iterator, nan_policy: str = "skip") -> StepResult:
    """Forward/backward over ``state.num_microbatches`` micro-batches, then the optimizer step."""
    model, optimizer = state.model, state.optimizer
    model.zero_grad_buffer()
    optimizer.zero_grad()
    seq_length = state.spiral.seq_length
    reports = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=data_iterator,
        model=[model],
        num_microbatches=state.num_microbatches,
        seq_length=seq_length,
        micro_batch_size=None,
        forward_only=False,
    )
    loss, tokens = _reduce_reports(reports, _device())
    # Under --fp16 dynamic loss scaling an overflowing gradient is the scaler's signal: the
    # optimizer skips the step and halves the scale (Megatron-LM turns its NaN check off then).
    finite = math.isfinite(loss) and (uses_dynamic_loss_scale(optimizer) or gradients_finite(model))
    iteration = state.iteration + 1
    if not finite:
        state.nan_iterations += 1
        if nan_policy == "stop":
            raise NonFiniteError(
                f"iteration {iteration}: loss or gradients are NaN/Inf (loss={loss}); stopping as "
                "requested by --nan-policy stop. Lower --lr, check the data, or resume from the "
                "last checkpoint.")
        state.skipped_iterations += 1
        model.zero_grad_buffer()
        optimizer.zero_grad()
        return StepResult(loss, None, applied=False, finite=False, num_tokens=tokens)
    applied, grad_norm, _ = optimizer.step()
    if applied:
        state.scheduler.step(increment=state.global_batch_size)
    else:
        state.skipped_iterations += 1
    return StepResult(loss, grad_norm, applied=bool(applied), finite=True, num_tokens=tokens)


@torch.no_grad()
def evaluate(state, data_iterator: Iterator, eval_iters: int) -> float:
    """Mean validation loss over ``eval_iters`` global batches."""
    model = state.model
    model.eval()
    total, tokens = 0.0, 0
    for _ in range(eval_iters):
        reports = get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=data_iterator,
            model=[model],
            num_microbatches=state.num_microbatches,
            seq_length=state.spiral.seq_length,
            micro_batch_size=None,
            forward_only=True,
        )
        loss, count = _reduce_reports(reports, _device())
        total += loss * count
        tokens += count
        # Megatron-LM's consumed_valid_samples: checkpointed, so a resumed run validates on the
        # same samples as an uninterrupted one.
        state.consumed_valid_samples = getattr(state, "consumed_valid_samples", 0) + state.global_batch_size
    model.train()
    return total / max(tokens, 1)
