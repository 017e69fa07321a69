"""Flags of pretrain_spiral.py, generated from dataclasses (Megatron's names, grouped --help).

``parse_args`` returns a :class:`RunConfig` of plain dataclasses; nothing is global. Model flags
given explicitly override the ``--preset``'s values; others keep the preset's.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, field
from typing import List, Optional

import torch

from megatron_spiral.cli import add_dataclass_arguments, dataclass_from_args
from megatron_spiral.config import SpiralConfig
from megatron_spiral.model_args import add_model_arguments, model_config_from_args
from megatron_spiral.presets import PRESETS
from megatron_spiral.training.megatron_flags import add_refused_megatron_flags, refused_flags_message
from megatron_spiral.model.recompute import RecomputeConfig, RecomputeConfigError


def _h(text: str, **extra) -> dict:
    return {"help": text, **extra}


SIGNAL_NAMES = ["SIGTERM", "SIGINT", "SIGUSR1", "SIGUSR2", "SIGHUP", "SIGQUIT", "SIGALRM", "SIGCONT"]


@dataclass
class ParallelConfig:
    tensor_model_parallel_size: int = field(default=1, metadata=_h("tensor-parallel ranks (TP)"))
    pipeline_model_parallel_size: int = field(default=1, metadata=_h(
        "pipeline stages; only 1: pipeline parallelism is not supported for looped models (use TP/DP)"))
    sequence_parallel: bool = field(default=False, metadata=_h(
        "shard activations along the sequence over the TP ranks (needs TP > 1)"))
    use_distributed_optimizer: bool = field(default=False, metadata=_h(
        "shard optimizer state over data-parallel ranks (ZeRO-1)"))
    overlap_grad_reduce: bool = field(default=False, metadata=_h(
        "overlap the data-parallel gradient reduce with the backward pass"))
    overlap_param_gather: bool = field(default=False, metadata=_h(
        "overlap the distributed optimizer's parameter all-gather with the next forward pass "
        "(needs --use-distributed-optimizer and --overlap-grad-reduce, as in Megatron-LM)"))
    bf16: bool = field(default=False, metadata=_h(
        "BF16 parameters with FP32 main weights (GPU; on CPU the run uses BF16 parameters)"))
    fp16: bool = field(default=False, metadata=_h(
        "FP16 parameters with FP32 main weights and loss scaling (dynamic unless --loss-scale; GPU only)"))
    loss_scale: Optional[float] = field(default=None, metadata=_h(
        "static loss scale for --fp16 (a power of 2); unset: dynamic loss scaling"))
    initial_loss_scale: float = field(default=2.0 ** 32, metadata=_h("initial dynamic loss scale"))
    min_loss_scale: float = field(default=1.0, metadata=_h("minimum dynamic loss scale"))
    loss_scale_window: float = field(default=1000, metadata=_h(
        "steps without overflow before the dynamic loss scale is doubled"))
    hysteresis: int = field(default=2, metadata=_h("overflows tolerated before the dynamic scale is halved"))
    seed: int = field(default=1234, metadata=_h("random seed (weights, data order, dropout)"))
    distributed_backend: Optional[str] = field(default=None, metadata=_h(
        "torch.distributed backend (default: nccl; gloo when no GPU is present, as CPU runs need it)",
        choices=["nccl", "gloo"]))
    distributed_timeout_minutes: int = field(default=10, metadata=_h("collective timeout"))


@dataclass
class TrainConfig:
    micro_batch_size: int = field(default=4, metadata=_h(
        "sequences per micro-batch per DP rank (Megatron-LM requires the flag)"))
    global_batch_size: Optional[int] = field(default=None, metadata=_h(
        "sequences per optimizer step = micro batch x accumulation steps x DP (default: micro x DP)"))
    train_iters: Optional[int] = field(default=None, metadata=_h(
        "optimizer steps to train (or --train-samples; default without either: 100)"))
    train_samples: Optional[int] = field(default=None, metadata=_h(
        "samples to train; sets the iterations to train-samples // global batch and makes the LR "
        "schedule sample-based (--lr-decay-samples, --lr-warmup-samples)"))
    eval_interval: Optional[int] = field(default=None, metadata=_h(
        "evaluate on the validation set every N iterations (default: only at the end)"))
    eval_iters: int = field(default=100, metadata=_h(
        "batches per evaluation, for validation and test (0: no evaluation)"))
    log_interval: int = field(default=100, metadata=_h("print a log line every N iterations"))
    exit_interval: Optional[int] = field(default=None, metadata=_h(
        "exit (saving first when --save is set) when the iteration is a multiple of N"))
    exit_duration_in_mins: Optional[float] = field(default=None, metadata=_h(
        "exit (saving first when --save is set) after this many minutes of training"))
    exit_signal_handler: bool = field(default=False, metadata=_h(
        "on --exit-signal (SLURM preemption / time limit) all ranks agree, save and exit 0"))
    exit_signal: str = field(default="SIGTERM", metadata=_h(
        "the signal --exit-signal-handler acts on", choices=SIGNAL_NAMES))
    manual_gc: bool = field(default=False, metadata=_h(
        "disable Python's automatic garbage collector; collect at --manual-gc-interval and around evaluation"))
    manual_gc_interval: int = field(default=0, metadata=_h(
        "with --manual-gc: collect every N steps (0: only around evaluation)"))
    manual_gc_eval: bool = field(default=True, metadata=_h(
        "with --manual-gc: collect before and after each evaluation"))
    dataloader_type: Optional[str] = field(default=None, metadata=_h(
        "single: megatron's shuffled sample order, resumable (cyclic and external are refused) "
        "(default: single)", choices=["single", "cyclic", "external"]))
    nan_policy: str = field(default="skip", metadata=_h(
        "on NaN/Inf loss or gradients: 'skip' the step (counted in the log) or 'stop' the run",
        choices=["skip", "stop"]))
    max_skipped_iters: int = field(default=10, metadata=_h(
        "stop when more than this many consecutive steps were skipped for NaN/Inf"))


@dataclass
class OptimConfig:
    optimizer: str = field(default="adam", metadata=_h(
        "adam (AdamW: decoupled weight decay, as Megatron-LM) or sgd", choices=["adam", "sgd", "muon", "dist_muon"]))
    lr: float = field(default=3e-4, metadata=_h("peak learning rate (Megatron-LM requires the flag)"))
    min_lr: float = field(default=0.0, metadata=_h("learning rate at the end of the decay"))
    lr_decay_style: str = field(default="linear", metadata=_h(
        "learning-rate decay", choices=["constant", "linear", "cosine", "inverse-square-root", "WSD"]))
    lr_decay_iters: Optional[int] = field(default=None, metadata=_h(
        "iterations to decay over (default: --train-iters); the LR stays at --min-lr after it"))
    lr_decay_samples: Optional[int] = field(default=None, metadata=_h(
        "samples to decay over, with --train-samples (default: --train-samples)"))
    lr_wsd_decay_style: str = field(default="exponential", metadata=_h(
        "shape of WSD's final annealing phase", choices=["exponential", "linear", "cosine", "minus_sqrt"]))
    lr_wsd_decay_iters: Optional[int] = field(default=None, metadata=_h("iterations of WSD's annealing phase"))
    lr_wsd_decay_samples: Optional[int] = field(default=None, metadata=_h(
        "samples of WSD's annealing phase, with --train-samples"))
    lr_warmup_fraction: Optional[float] = field(default=None, metadata=_h(
        "fraction of the decay steps spent warming up linearly (excludes --lr-warmup-iters/-samples)"))
    lr_warmup_iters: int = field(default=0, metadata=_h("iterations of linear warmup"))
    lr_warmup_samples: int = field(default=0, metadata=_h("samples of linear warmup, with --train-samples"))
    lr_warmup_init: float = field(default=0.0, metadata=_h("learning rate the warmup starts from"))
    weight_decay: float = field(default=0.01, metadata=_h("weight decay (decoupled, AdamW)"))
    start_weight_decay: Optional[float] = field(default=None, metadata=_h(
        "weight decay at the start (default: --weight-decay)"))
    end_weight_decay: Optional[float] = field(default=None, metadata=_h(
        "weight decay at the end (default: --weight-decay)"))
    weight_decay_incr_style: str = field(default="constant", metadata=_h(
        "weight-decay schedule from start to end", choices=["constant", "linear", "cosine"]))
    adam_beta1: float = field(default=0.9, metadata=_h("Adam beta1"))
    adam_beta2: float = field(default=0.999, metadata=_h("Adam beta2"))
    adam_eps: float = field(default=1e-8, metadata=_h("Adam epsilon"))
    sgd_momentum: float = field(default=0.9, metadata=_h("SGD momentum"))
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
        "write TensorBoard events here (Megatron-LM's tags plus per-loop diagnostics)"))
    tensorboard_log_interval: int = field(default=1, metadata=_h("write TensorBoard/W&B scalars every N iterations"))
    tensorboard_queue_size: int = field(default=1000, metadata=_h("TensorBoard events queued before a flush"))
    log_timers_to_tensorboard: bool = field(default=False, metadata=_h(
        "write iteration-time (and throughput with --log-throughput) to TensorBoard/W&B"))
    log_loss_scale_to_tensorboard: bool = field(default=True, metadata=_h("write loss-scale to TensorBoard"))
    log_validation_ppl_to_tensorboard: bool = field(default=False, metadata=_h(
        "write validation perplexity to TensorBoard"))
    log_world_size_to_tensorboard: bool = field(default=False, metadata=_h("write world-size to TensorBoard"))
    log_params_norm: bool = field(default=False, metadata=_h(
        "compute the parameters' L2 norm and log it (costs one reduction per log line)"))
    log_throughput: bool = field(default=False, metadata=_h("log model TFLOP/s per GPU"))
    timing_log_level: int = field(default=0, metadata=_h(
        "0: iteration time only (1 and 2, Megatron-LM's per-phase timers, are not implemented)",
        choices=[0, 1, 2]))
    wandb_project: Optional[str] = field(default=None, metadata=_h(
        "log the TensorBoard scalars to this Weights & Biases project (last rank; WANDB_MODE=offline works)"))
    wandb_exp_name: Optional[str] = field(default=None, metadata=_h("W&B run name"))
    wandb_save_dir: Optional[str] = field(default=None, metadata=_h("W&B files directory (default: SAVE/wandb)"))
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
    recompute: RecomputeConfig = field(default_factory=RecomputeConfig)


def build_parser() -> argparse.ArgumentParser:
    from megatron_spiral.data.config import DataConfig
    from megatron_spiral.tokenizer import TokenizerConfig

    parser = argparse.ArgumentParser(
        prog="pretrain_spiral.py",
        description="Pretrain SpiralFormer / LoopedFormer / Pythia baselines on megatron-core. "
                    "Run with torchrun (one process per GPU) or plain python (one process).",
        # Megatron-LM disables prefix matching: --exit-signal must never be read as
        # --exit-signal-handler. Defaults are written into each help text once (cli.py).
        allow_abbrev=False)
    parser.add_argument("--preset", choices=list(PRESETS), metavar="NAME", default=None,
                        help="start from a named model (" + ", ".join(PRESETS) + "); model flags "
                             "given explicitly override it")
    # The model's vocabulary comes from the tokenizer (--vocab-size belongs to NullTokenizer).
    add_model_arguments(parser, skip=("vocab_size",))
    add_dataclass_arguments(parser, ParallelConfig, "parallelism and precision")
    add_dataclass_arguments(parser, TrainConfig, "training")
    add_dataclass_arguments(parser, OptimConfig, "optimizer and learning-rate schedule")
    add_dataclass_arguments(parser, CheckpointConfig, "checkpointing")
    add_dataclass_arguments(parser, LogConfig, "logging")
    add_dataclass_arguments(parser, RecomputeConfig, "activation recomputation",
                            "Megatron-LM's recompute flags plus --spiral-recompute-loop "
                            "(docs/memory.md)")
    # --seq-length is the model's flag (above); the data is cut to the same length.
    # --split is defined here: Megatron-LM's default depends on whether it was given.
    data = add_dataclass_arguments(parser, DataConfig, "data", skip=("seq_length", "split"))
    data.add_argument("--split", default=None, help=(
        "train,valid,test proportions of the documents of every --data-path dataset (default: "
        f"'{MEGATRON_DEFAULT_SPLIT}', Megatron-LM's legacy default, with a warning)"))
    add_dataclass_arguments(parser, TokenizerConfig, "tokenizer")
    add_refused_megatron_flags(parser)  # last: only flags nothing above defines
    return parser


def parse_args(argv: Optional[List[str]] = None) -> RunConfig:
    from megatron_spiral.data.config import DataConfig
    from megatron_spiral.tokenizer import TokenizerConfig

    parser = build_parser()
    args = parser.parse_args(argv)
    refused = refused_flags_message(args)
    if refused:
        parser.error(refused)
    args.split = resolve_split(args.split, args.data_path)
    model = model_config_from_args(args, parser.error)
    try:
        recompute = dataclass_from_args(RecomputeConfig, args)
    except RecomputeConfigError as err:
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
        recompute=recompute,
    )
    problem = validate(run)
    if problem:
        parser.error(problem)
    if run.train.train_iters is None and run.train.train_samples is None:
        run.train.train_iters = DEFAULT_TRAIN_ITERS
    return run


MEGATRON_DEFAULT_SPLIT = "969, 30, 1"
DEFAULT_TRAIN_ITERS = 100


def resolve_split(split: Optional[str], data_path) -> str:
    """Megatron-LM: --data-path without --split warns and uses the legacy '969, 30, 1'."""
    if split is not None:
        return split
    if data_path and os.environ.get("RANK", "0") == "0":  # Megatron-LM's warn_rank_0
        print(f"WARNING: Please specify --split when using --data-path. Using legacy default value of "
              f'"{MEGATRON_DEFAULT_SPLIT}"', file=sys.stderr)
    return MEGATRON_DEFAULT_SPLIT


def _check_parallel(p: ParallelConfig, heads: int) -> Optional[str]:
    if p.pipeline_model_parallel_size != 1:
        return (f"--pipeline-model-parallel-size {p.pipeline_model_parallel_size}: pipeline parallelism is not "
                "supported for looped models (every stage would need the shared core); use TP/DP")
    if p.sequence_parallel and p.tensor_model_parallel_size == 1:
        return "--sequence-parallel needs --tensor-model-parallel-size > 1"
    if p.tensor_model_parallel_size > 1 and heads % p.tensor_model_parallel_size:
        return (f"--num-attention-heads {heads} is not divisible by "
                f"--tensor-model-parallel-size {p.tensor_model_parallel_size}")
    if p.overlap_param_gather and not (p.use_distributed_optimizer and p.overlap_grad_reduce):
        return "--overlap-param-gather needs --use-distributed-optimizer and --overlap-grad-reduce (as Megatron-LM)"
    if p.fp16 and p.bf16:
        return "--fp16 and --bf16 exclude each other: pick one"
    if p.distributed_backend == "nccl" and not torch.cuda.is_available():
        return ("--distributed-backend nccl needs CUDA GPUs and none is visible; use --distributed-backend gloo "
                "on CPU (or omit the flag: gloo is then chosen)")
    return None


def _check_schedule(t: TrainConfig, o: OptimConfig) -> Optional[str]:
    """Megatron-LM's rule: a run is iteration-based or sample-based, and its LR flags say the same."""
    if t.train_iters is not None and t.train_samples is not None:
        return "--train-iters and --train-samples exclude each other: give one"
    if t.train_samples is not None:
        wrong = [f for f, v in (("--lr-decay-iters", o.lr_decay_iters), ("--lr-wsd-decay-iters", o.lr_wsd_decay_iters),
                                ("--lr-warmup-iters", o.lr_warmup_iters)) if v]
        if wrong:
            return f"{', '.join(wrong)}: sample-based training (--train-samples) takes the *-samples flags"
    else:
        wrong = [f for f, v in (("--lr-decay-samples", o.lr_decay_samples),
                                ("--lr-wsd-decay-samples", o.lr_wsd_decay_samples),
                                ("--lr-warmup-samples", o.lr_warmup_samples)) if v]
        if wrong:
            return f"{', '.join(wrong)}: iteration-based training (--train-iters) takes the *-iters flags"
    if o.lr_warmup_fraction is not None and (o.lr_warmup_iters or o.lr_warmup_samples):
        return "--lr-warmup-fraction excludes --lr-warmup-iters/--lr-warmup-samples: give one"
    if o.min_lr > o.lr:
        return f"--min-lr {o.min_lr} is above --lr {o.lr}"
    if o.optimizer not in ("adam", "sgd"):
        return f"--optimizer {o.optimizer}: Muon is not supported here; use adam or sgd"
    if t.micro_batch_size < 1 or (t.train_iters is not None and t.train_iters < 1) or (
            t.train_samples is not None and t.train_samples < 1):
        return "--micro-batch-size and --train-iters/--train-samples must be >= 1"
    if t.dataloader_type == "external":
        return "--dataloader-type external: only megatron indexed datasets are read here; use single"
    if t.dataloader_type == "cyclic":
        return ("--dataloader-type cyclic (reshuffle every epoch) is not implemented; use single (megatron's "
                "GPTDataset is already shuffled and repeats its epochs in a new order)")
    return None


def validate(run: RunConfig) -> Optional[str]:
    """Cross-flag checks that need no process group; returns an error message or None."""
    problem = (_check_parallel(run.parallel, run.model.num_attention_heads)
               or _check_schedule(run.train, run.optim))
    if problem:
        return problem
    if run.log.timing_log_level:
        return "--timing-log-level 1/2 (per-phase timers) is not implemented; use 0"
    if run.log.wandb_project and not (run.log.wandb_save_dir or run.checkpoint.save):
        return "--wandb-project needs --wandb-save-dir DIR or --save DIR (W&B files go to SAVE/wandb)"
    if run.checkpoint.save_interval and not run.checkpoint.save:
        return "--save-interval needs --save DIR"
    try:
        run.data.validate()
    except ValueError as err:
        return str(err)
    return None
