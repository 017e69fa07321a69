"""Flags of pretrain_spiral.py, generated from dataclasses (Megatron's names, grouped --help).

``parse_args`` returns a :class:`RunConfig` of plain dataclasses; nothing is global. Model flags
given explicitly override the ``--preset``'s values; others keep the preset's.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import List, Optional

from megatron_spiral.cli import add_dataclass_arguments, dataclass_from_args, explicit_overrides
from megatron_spiral.config import SpiralConfig, SpiralConfigError
from megatron_spiral.presets import PRESETS, get_preset


def _h(text: str, **extra) -> dict:
    return {"help": text, **extra}


@dataclass
class ParallelConfig:
    tensor_model_parallel_size: int = field(default=1, metadata=_h("tensor-parallel ranks (TP)"))
    sequence_parallel: bool = field(default=False, metadata=_h(
        "shard activations along the sequence over the TP ranks (needs TP > 1)"))
    use_distributed_optimizer: bool = field(default=False, metadata=_h(
        "shard optimizer state over data-parallel ranks (ZeRO-1)"))
    overlap_grad_reduce: bool = field(default=False, metadata=_h(
        "overlap the data-parallel gradient reduce with the backward pass"))
    bf16: bool = field(default=False, metadata=_h(
        "BF16 parameters with FP32 main weights (GPU; on CPU the run uses BF16 parameters)"))
    seed: int = field(default=1234, metadata=_h("random seed (weights, data order, dropout)"))
    distributed_timeout_minutes: int = field(default=30, metadata=_h("collective timeout"))


@dataclass
class TrainConfig:
    micro_batch_size: int = field(default=4, metadata=_h("sequences per micro-batch per DP rank"))
    global_batch_size: Optional[int] = field(default=None, metadata=_h(
        "sequences per optimizer step = micro batch x accumulation steps x DP (default: micro x DP)"))
    train_iters: int = field(default=100, metadata=_h("optimizer steps to train"))
    eval_interval: int = field(default=50, metadata=_h("evaluate every N iterations (0: never)"))
    eval_iters: int = field(default=10, metadata=_h("validation batches per evaluation"))
    log_interval: int = field(default=10, metadata=_h("print a log line every N iterations"))
    exit_interval: Optional[int] = field(default=None, metadata=_h(
        "exit (saving first when --save is set) when the iteration is a multiple of N"))
    exit_duration_in_mins: Optional[float] = field(default=None, metadata=_h(
        "exit (saving first when --save is set) after this many minutes of training"))
    exit_signal_handler: bool = field(default=False, metadata=_h(
        "on SIGTERM (SLURM preemption / time limit) all ranks agree, save and exit 0"))
    nan_policy: str = field(default="skip", metadata=_h(
        "on NaN/Inf loss or gradients: 'skip' the step (counted in the log) or 'stop' the run",
        choices=["skip", "stop"]))
    max_skipped_iters: int = field(default=10, metadata=_h(
        "stop when more than this many consecutive steps were skipped for NaN/Inf"))


@dataclass
class OptimConfig:
    lr: float = field(default=3e-4, metadata=_h("peak learning rate"))
    min_lr: Optional[float] = field(default=None, metadata=_h(
        "final learning rate of the decay (default: 10%% of --lr, the paper's schedule)"))
    lr_decay_style: str = field(default="cosine", metadata=_h(
        "learning-rate decay", choices=["cosine", "linear", "constant", "inverse-square-root"]))
    lr_warmup_fraction: float = field(default=0.01, metadata=_h(
        "fraction of --train-iters spent warming up linearly (paper: 1%%)"))
    weight_decay: float = field(default=0.01, metadata=_h("AdamW weight decay (paper: 0.01)"))
    adam_beta1: float = field(default=0.9, metadata=_h("AdamW beta1 (paper: 0.9)"))
    adam_beta2: float = field(default=0.95, metadata=_h("AdamW beta2 (paper: 0.95)"))
    adam_eps: float = field(default=1e-8, metadata=_h("AdamW epsilon"))
    clip_grad: float = field(default=1.0, metadata=_h("global gradient-norm clip (0: off)"))


@dataclass
class CheckpointConfig:
    """Megatron-LM's checkpoint flags, with its meanings and defaults (docs/reliability.md)."""

    save: Optional[str] = field(default=None, metadata=_h(
        "directory to save checkpoints to (locked against a second run while this one lives)"))
    load: Optional[str] = field(default=None, metadata=_h(
        "directory (or iter_* directory) to resume from; a directory without a checkpoint starts "
        "from scratch (as Megatron-LM), so --save X --load X works on the first launch. A checkpoint "
        "without optimizer state (e.g. converted from Hugging Face) starts a fresh run from its weights"))
    save_interval: Optional[int] = field(default=None, metadata=_h("save every N iterations"))
    no_load_optim: bool = field(default=False, metadata=_h(
        "do not load the optimizer state or the LR schedule (iteration, consumed samples and RNG are "
        "still loaded, as in Megatron-LM)"))
    no_load_rng: bool = field(default=False, metadata=_h("do not load the RNG states"))
    finetune: bool = field(default=False, metadata=_h(
        "load the weights only: iteration, consumed samples, optimizer, LR schedule and RNG start "
        "fresh (Megatron-LM); model fields may differ where the weights still fit"))
    use_checkpoint_args: bool = field(default=False, metadata=_h(
        "take the model's architecture flags from the --load checkpoint instead of the command line"))
    exit_on_missing_checkpoint: bool = field(default=False, metadata=_h(
        "with --load: exit with an error instead of starting from scratch when no checkpoint is there"))
    override_opt_param_scheduler: bool = field(default=False, metadata=_h(
        "on resume, use this command line's LR/WD schedule (lr, min-lr, warmup, decay iterations and "
        "style, weight decay) instead of the checkpoint's; the step count is kept"))
    use_checkpoint_opt_param_scheduler: bool = field(default=False, metadata=_h(
        "on resume, keep the checkpoint's LR/WD schedule and ignore the schedule flags given here"))
    ckpt_fallback: bool = field(default=False, metadata=_h(
        "when the checkpoint the tracker names is missing or corrupt, resume from the newest intact "
        "older one (said in the log) instead of stopping"))
    ckpt_format: str = field(default="torch_dist", metadata=_h(
        "checkpoint format; only megatron-core's 'torch_dist' (dist_checkpointing: resharding, "
        "per-file checksums) is written and read here"))
    async_save: bool = field(default=False, metadata=_h(
        "accepted for Megatron-LM launch lines; saves stay synchronous here (a note says so)"))

    def __post_init__(self) -> None:
        from megatron_spiral.checkpointing import CheckpointError

        if self.ckpt_format != "torch_dist":
            raise CheckpointError(
                f"--ckpt-format {self.ckpt_format}: only torch_dist is supported (the legacy 'torch' format "
                "cannot reshard across TP sizes and has no per-file checksums; torch_dcp/fsdp_dtensor are "
                "for FSDP, which this project does not use). Drop the flag or pass --ckpt-format torch_dist.")
        if self.override_opt_param_scheduler and self.use_checkpoint_opt_param_scheduler:
            raise CheckpointError("--override-opt-param-scheduler and --use-checkpoint-opt-param-scheduler "
                                  "exclude each other: pick the new schedule or the checkpoint's")
        if (self.finetune or self.use_checkpoint_args or self.exit_on_missing_checkpoint) and not self.load:
            flag = "--finetune" if self.finetune else (
                "--use-checkpoint-args" if self.use_checkpoint_args else "--exit-on-missing-checkpoint")
            raise CheckpointError(f"{flag} needs --load DIR (the checkpoint to start from)")


@dataclass
class LogConfig:
    tensorboard_dir: Optional[str] = field(default=None, metadata=_h(
        "write TensorBoard events here (Megatron's keys plus per-loop diagnostics)"))
    log_loop_diagnostics: bool = field(default=True, metadata=_h(
        "log per-iteration update norms and MeSH router entropies at each --log-interval"))


@dataclass
class RunConfig:
    model: SpiralConfig
    preset: Optional[str]
    parallel: ParallelConfig
    train: TrainConfig
    optim: OptimConfig
    checkpoint: CheckpointConfig
    log: LogConfig
    data: object
    tokenizer: object


def build_parser() -> argparse.ArgumentParser:
    from megatron_spiral.data.config import DataConfig
    from megatron_spiral.tokenizer import TokenizerConfig

    parser = argparse.ArgumentParser(
        prog="pretrain_spiral.py",
        description="Pretrain SpiralFormer / LoopedFormer / Pythia baselines on megatron-core. "
                    "Run with torchrun (one process per GPU) or plain python (one process).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--preset", choices=list(PRESETS), metavar="NAME", default=None,
                        help="start from a named model (" + ", ".join(PRESETS) + "); model flags "
                             "given explicitly override it")
    # The model's vocabulary comes from the tokenizer (--vocab-size belongs to NullTokenizer).
    add_dataclass_arguments(parser, SpiralConfig, "model", "architecture (SpiralConfig)",
                            skip=("vocab_size",), defaults_to_none=True)
    add_dataclass_arguments(parser, ParallelConfig, "parallelism and precision")
    add_dataclass_arguments(parser, TrainConfig, "training")
    add_dataclass_arguments(parser, OptimConfig, "optimizer and learning-rate schedule")
    add_dataclass_arguments(parser, CheckpointConfig, "checkpointing")
    add_dataclass_arguments(parser, LogConfig, "logging")
    # --seq-length is the model's flag (above); the data is cut to the same length.
    add_dataclass_arguments(parser, DataConfig, "data", skip=("seq_length",))
    add_dataclass_arguments(parser, TokenizerConfig, "tokenizer")
    return parser


def parse_args(argv: Optional[List[str]] = None) -> RunConfig:
    from megatron_spiral.data.config import DataConfig
    from megatron_spiral.tokenizer import TokenizerConfig

    parser = build_parser()
    args = parser.parse_args(argv)
    overrides = explicit_overrides(args, SpiralConfig)
    overrides.pop("vocab_size", None)
    try:
        model = get_preset(args.preset or "tiny", **overrides)
    except SpiralConfigError as err:
        parser.error(str(err))
    run = RunConfig(
        model=model,
        preset=args.preset,
        parallel=dataclass_from_args(ParallelConfig, args),
        train=dataclass_from_args(TrainConfig, args),
        optim=dataclass_from_args(OptimConfig, args),
        checkpoint=dataclass_from_args(CheckpointConfig, args),
        log=dataclass_from_args(LogConfig, args),
        data=dataclass_from_args(DataConfig, args, seq_length=model.seq_length),
        tokenizer=dataclass_from_args(TokenizerConfig, args),
    )
    problem = validate(run)
    if problem:
        parser.error(problem)
    return run


def validate(run: RunConfig) -> Optional[str]:
    """Cross-flag checks that need no process group; returns an error message or None."""
    p, t = run.parallel, run.train
    if p.sequence_parallel and p.tensor_model_parallel_size == 1:
        return "--sequence-parallel needs --tensor-model-parallel-size > 1"
    if p.tensor_model_parallel_size > 1 and run.model.num_attention_heads % p.tensor_model_parallel_size:
        return (f"--num-attention-heads {run.model.num_attention_heads} is not divisible by "
                f"--tensor-model-parallel-size {p.tensor_model_parallel_size}")
    if t.micro_batch_size < 1 or t.train_iters < 1:
        return "--micro-batch-size and --train-iters must be >= 1"
    if run.checkpoint.save_interval and not run.checkpoint.save:
        return "--save-interval needs --save DIR"
    try:
        run.data.validate()
    except ValueError as err:
        return str(err)
    return None
