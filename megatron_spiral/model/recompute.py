"""Activation recomputation: Megatron-LM's flags, plus a loop-aware mode of our own.

Megatron-LM's (core_v0.16.1) flags keep their names, defaults and meanings:

* ``--recompute-granularity full``: megatron-core's TransformerBlock recompute. Here each of the
  pre, core and post stacks is its own TransformerBlock, so ``--recompute-method`` /
  ``--recompute-num-layers`` apply to every stack (clipped to its depth): ``uniform`` N
  checkpoints the input of every group of N layers, ``block`` N checkpoints the first N layers of
  each stack and keeps the rest. The core is recomputed at each of its T calls.
* ``--recompute-granularity selective`` (or ``--recompute-activations``): megatron's selective
  recompute of ``--recompute-modules`` (default ``core_attn``). It works with the local spec:
  megatron's SelfAttention checkpoints whatever core-attention module the spec gives it (our SDPA
  module included). SDPA's fused kernels keep only q, k, v, the output and a log-sum-exp, so
  ``core_attn`` frees little there (megatron-core itself warns so for fused attention); the
  s x s probabilities it was designed to drop exist only in unfused attention.
* ``--spiral-recompute-loop`` (ours): recompute each loop iteration as a whole,
  down-scale -> core -> up-scale -> shift. A coarse iteration then keeps only its input state
  (and its output, which the topology needs) instead of every core layer's activations at L_t.
  It combines with ``full``. With ``uniform`` the core keeps its layer checkpoints inside the
  iteration's, so the backward re-materialises one group of layers at a time (the core's forward
  runs three times instead of two). With ``block`` the core has no checkpoints of its own (the
  iteration's already covers it): block N then recomputes the first N layers of the pre and
  post stacks only, the cheap way to add their memory to the loop's. It also combines with
  ``selective``.

Recomputation uses megatron's ``tensor_parallel.checkpoint``, which restores the CPU, CUDA and
tensor-parallel RNG tracker states before re-running, so dropout masks of the recomputed forward
equal the original ones.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, List, Optional

GRANULARITIES = ("full", "selective")
METHODS = ("uniform", "block")
# The megatron-core 0.16.1 selective module that works here. "mlp" returns the fc2 bias (a
# parameter) through the checkpoint, so with the shared core called T times each backward replays
# the earlier calls again (measured: a tiny model never finishes its backward); "layernorm"
# discards outputs by resizing storages, which the memory model does not account for.
MODULES = ("core_attn",)


class RecomputeConfigError(ValueError):
    """An invalid combination of recompute flags; the message says how to fix it."""


def _h(text: str, **extra) -> dict:
    return {"help": text, **extra}


@dataclass
class RecomputeConfig:
    """Activation-recompute settings. Field names are Megatron-LM's flags."""

    recompute_granularity: Optional[str] = field(default=None, metadata=_h(
        "'full' checkpoints whole transformer layers (megatron's block recompute, on the pre, core "
        "and post stacks); 'selective' checkpoints --recompute-modules inside each layer. "
        "Default: no recompute", choices=GRANULARITIES))
    recompute_method: Optional[str] = field(default=None, metadata=_h(
        "with 'full': 'uniform' checkpoints the input of every group of --recompute-num-layers "
        "layers; 'block' checkpoints only the first --recompute-num-layers layers of each stack",
        choices=METHODS))
    recompute_num_layers: Optional[int] = field(default=None, metadata=_h(
        "with 'full': layers per checkpointed group (uniform) or layers checkpointed per stack "
        "(block); clipped to each stack's depth. Must be unset with 'selective'"))
    recompute_activations: bool = field(default=False, metadata=_h(
        "shorthand for --recompute-granularity selective (Megatron-LM)"))
    recompute_modules: Optional[List[str]] = field(default=None, metadata=_h(
        "with 'selective': submodules to recompute; only core_attn (the default) is supported "
        "here", metavar="MODULE"))
    spiral_recompute_loop: bool = field(default=False, metadata=_h(
        "ours: recompute every loop iteration (down-scale -> core -> up-scale -> shift) in the "
        "backward pass, so each iteration keeps only its input; combines with the flags above",
        flag="--spiral-recompute-loop"))

    def __post_init__(self) -> None:
        # Megatron-LM: --recompute-activations sets the granularity to selective.
        if self.recompute_activations:
            self.recompute_granularity = "selective"
        self.validate()

    def validate(self) -> None:
        """Megatron-LM's checks (arguments.py and TransformerConfig), same messages."""
        granularity = self.recompute_granularity
        if granularity is not None and granularity not in GRANULARITIES:
            raise RecomputeConfigError(
                f'When using recompute_granuarlity: {granularity} must be "full" or "selective".')
        if self.recompute_method is not None and self.recompute_method not in METHODS:
            raise RecomputeConfigError(
                f'recompute_method: {self.recompute_method} must be "block" or "uniform".')
        if granularity == "selective":
            if self.recompute_method is not None:
                raise RecomputeConfigError(
                    "recompute method is not yet supported for selective recomputing granularity "
                    "(drop --recompute-method)")
            if self.recompute_num_layers is not None:
                raise RecomputeConfigError(
                    "When using recompute_granularity: selective recompute_num_layers must be None "
                    "(drop --recompute-num-layers)")
        if granularity == "full":
            if self.recompute_method is None:
                raise RecomputeConfigError(
                    'Using recompute_granularity: full so recompute_method must be "block" or '
                    '"uniform" (add --recompute-method uniform)')
            if self.recompute_num_layers is None or self.recompute_num_layers < 1:
                raise RecomputeConfigError(
                    "When using recompute_granularity: full recompute_num_layers must be between "
                    "1 and the number of layers of a stack (add --recompute-num-layers 1)")
        invalid = sorted(set(self.recompute_modules or ()) - set(MODULES))
        if invalid:
            raise RecomputeConfigError(
                f"Invalid choices for recompute_modules: {invalid}. Allowed modules are: "
                f"{list(MODULES)}")

    @property
    def mode(self) -> str:
        """Short name used by reports and benchmarks: none | full | selective | loop | loop+full ..."""
        parts = (["loop"] if self.spiral_recompute_loop else []) + (
            [self.recompute_granularity] if self.recompute_granularity else [])
        return "+".join(parts) or "none"

    def transformer_config_overrides(self) -> dict:
        """The fields megatron-core's TransformerConfig takes (``transformer_config(**...)``)."""
        if self.recompute_granularity is None:
            return {}
        overrides = dict(recompute_granularity=self.recompute_granularity,
                         recompute_method=self.recompute_method,
                         recompute_num_layers=self.recompute_num_layers)
        if self.recompute_modules is not None:
            overrides["recompute_modules"] = list(self.recompute_modules)
        return overrides


def mode_config(mode: str) -> RecomputeConfig:
    """RecomputeConfig of a benchmark/report mode name: none, selective, full (uniform, 1 layer),
    blockN (full, block, N layers per stack), each optionally prefixed by ``loop+``."""
    parts = mode.split("+") if mode != "none" else []
    loop = "loop" in parts
    rest = [part for part in parts if part != "loop"]
    block = re.fullmatch(r"block([1-9][0-9]*)", rest[0]) if len(rest) == 1 else None
    if len(rest) > 1 or (rest and rest[0] not in ("full", "selective") and not block):
        raise RecomputeConfigError(
            f"recompute mode {mode!r} is not one of none, selective, full, blockN, each optionally "
            "prefixed by loop+ (e.g. loop+full, loop+block2)")
    granularity = None if not rest else ("selective" if rest[0] == "selective" else "full")
    return RecomputeConfig(
        recompute_granularity=granularity,
        recompute_method=("block" if block else "uniform") if granularity == "full" else None,
        recompute_num_layers=(int(block.group(1)) if block else 1) if granularity == "full" else None,
        spiral_recompute_loop=loop)


MODES = ("none", "selective", "full", "loop", "loop+full")


def stack_recompute_overrides(config, num_layers: int, inside_loop_checkpoint: bool = False) -> dict:
    """Recompute fields of one stack's TransformerConfig: ``recompute_num_layers`` clipped to the
    stack's depth (megatron's uniform recompute would index past the last layer otherwise).

    ``inside_loop_checkpoint``: the core under ``--spiral-recompute-loop``. The iteration
    checkpoint already recomputes it whole, so ``block`` (recompute a few layers to save memory
    cheaply) adds nothing there and is dropped; ``uniform`` stays nested, so its backward
    re-materialises one group of core layers at a time."""
    if config.recompute_granularity != "full":
        return {}
    if inside_loop_checkpoint and config.recompute_method == "block":
        return dict(recompute_granularity=None, recompute_method=None, recompute_num_layers=None)
    return dict(recompute_num_layers=min(config.recompute_num_layers, num_layers))


def checkpointed(function: Callable, *args):
    """Run ``function(*args)`` keeping only its inputs for backward; the backward re-runs it under
    the saved RNG states (megatron's reentrant ``tensor_parallel.checkpoint``)."""
    from megatron.core import tensor_parallel

    return tensor_parallel.checkpoint(function, False, *args)
