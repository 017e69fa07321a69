"""Megatron-LM flags that pretrain_spiral.py does not honour: each is refused with the reason and
what to use instead, never "unrecognized arguments" and never a silent no-op.

The full flag list is megatron_lm_flags.py (generated from Megatron-LM's own parser). A flag the
parser already defines is honoured and left alone (so a colleague adding a flag needs no change
here); every other Megatron-LM flag gets a rejecting action. Reasons are looked up most specific
first: the flag itself, then a name prefix, then its Megatron-LM argparse group.
"""

from __future__ import annotations

import argparse
from typing import Dict, Iterator, List, Optional, Tuple

from megatron_spiral.training.megatron_lm_flags import MEGATRON_LM_FLAGS, MEGATRON_LM_VERSION
from megatron_spiral.model_args import REJECTED_FLAGS as REJECTED_MODEL_FLAGS

DROP = "drop the flag"
PP = "pipeline parallelism is not supported for looped models (the shared core runs on every stage); use TP/DP"
TE = "needs Transformer Engine kernels this build does not use"

FLAG_REASONS: Dict[str, str] = {
    # Deprecated in Megatron-LM itself (its validate_args refuses them the same way).
    "--checkpoint-activations": "no longer valid in Megatron-LM; use --recompute-activations",
    "--batch-size": "no longer valid in Megatron-LM; use --micro-batch-size",
    "--warmup": "no longer valid in Megatron-LM; use --lr-warmup-fraction or --lr-warmup-iters",
    "--use-legacy-models": "Megatron-LM's legacy models are not built here; this project builds megatron-core "
                           f"models ({DROP})",
    "--use-mcore-models": f"megatron-core models are the only kind built here ({DROP})",
    # Batch and schedule.
    "--rampup-batch-size": "batch-size ramp-up is not implemented; use a constant --global-batch-size",
    "--decrease-batch-size-if-needed": "the global batch is fixed; pick --global-batch-size divisible by "
                                       "--micro-batch-size x data-parallel size",
    "--iterations-to-skip": "not implemented; resume from a checkpoint before the bad iterations instead",
    "--phase-transition-iterations": "multi-phase training is not implemented; run the phases as separate "
                                     "launches with --load",
    "--skip-train": "evaluation-only runs are not implemented; use tools/ (HF export + lm-eval) to evaluate",
    "--decoupled-lr": "a separate LR for embeddings is not implemented; use --lr",
    "--decoupled-min-lr": "a separate LR for embeddings is not implemented; use --min-lr",
    "--optimizer-cpu-offload": "CPU optimizer offload is not implemented; use --use-distributed-optimizer",
    "--use-precision-aware-optimizer": "needs Transformer Engine's FusedAdam; use --bf16 with FP32 main weights",
    "--full-validation": "validation runs --eval-iters batches; raise --eval-iters instead",
    "--multiple-validation-sets": "one validation set; give it with --valid-data-path",
    "--data-args-path": "give the blend with --data-path",
    "--per-split-data-args-path": "give the blends with --train-data-path/--valid-data-path/--test-data-path",
    "--per-dataset-sequences-path": "not supported; megatron-core builds the indices from the .idx files",
    "--reset-position-ids": "positions follow the SpiralFormer schedule and are not reset per document",
    "--reset-attention-mask": "attention is causal over the whole sample; documents are not masked apart",
    "--no-create-attention-mask-in-dataloader": "the mask is never built in the data loader here (causal "
                                                f"attention builds its own); {DROP}",
    "--encoder-seq-length": "use --seq-length", "--decoder-seq-length": "use --seq-length",
    "--encoder-num-layers": "use --num-layers", "--decoder-num-layers": "use --num-layers",
    "--vocab-size": "the vocabulary comes from the tokenizer (--tokenizer-type NullTokenizer takes --vocab-size "
                    "in tools/preprocess_data.py)",
    "--padded-vocab-size": "use --make-vocab-size-divisible-by",
    "--context-parallel-size": "context parallelism is not implemented for the multi-resolution schedule; "
                               "use TP/DP",
    "--pipeline-model-parallel-layout": PP, "--num-layers-per-virtual-pipeline-stage": PP,
    "--num-virtual-stages-per-pipeline-rank": PP, "--decoder-first-pipeline-num-layers": PP,
    "--decoder-last-pipeline-num-layers": PP, "--account-for-embedding-in-pipeline-split": PP,
    "--account-for-loss-in-pipeline-split": PP, "--pipeline-model-parallel-comm-backend": PP,
    "--model-parallel-size": "no longer valid in Megatron-LM; use --tensor-model-parallel-size",
    "--use-torch-fsdp2": "FSDP is not supported; use --use-distributed-optimizer (ZeRO-1)",
    "--use-megatron-fsdp": "FSDP is not supported; use --use-distributed-optimizer (ZeRO-1)",
    "--fp32-residual-connection": "not implemented; use --bf16 (FP32 main weights)",
    "--apply-residual-connection-post-layernorm": "pre-norm only (as GPT-NeoX/Pythia)",
    "--apply-layernorm-1p": "not implemented; use --normalization",
    "--qk-layernorm": "not implemented in the SpiralFormer attention", "--qk-l2-norm": "not implemented",
    "--add-qkv-bias": "QKV biases follow --disable-bias-linear",
    "--multi-latent-attention": "multi-latent attention is not implemented; use standard or grouped-query "
                                "attention (--group-query-attention)",
    "--calculate-per-token-loss": "the loss is already the mean over the global batch's tokens",
    "--no-position-embedding": "SpiralFormer uses RoPE (--position-embedding-type rope)",
    "--openai-gelu": "the MLP uses GeLU (or --swiglu)", "--squared-relu": "use GeLU or --swiglu",
    "--quick-geglu": "use GeLU or --swiglu",
    "--window-size": "sliding-window attention is not implemented",
    "--window-attn-skip-freq": "sliding-window attention is not implemented",
    "--use-rope-scaling": "RoPE scaling is not implemented; use --rotary-base",
    "--rope-scaling-factor": "RoPE scaling is not implemented; use --rotary-base",
    "--rotary-seq-len-interpolation-factor": "RoPE interpolation is not implemented",
    "--rotary-interleaved": "RoPE uses the rotate-half layout (GPT-NeoX), not interleaved",
    "--no-rope-freq": "RoPE is on every layer", "--rope-type": "RoPE uses the rotate-half layout",
    "--init-method-xavier-uniform": "init is normal(0, --init-method-std) with the scaled output init",
    "--embedding-init-method-std": "embeddings use --init-method-std",
    "--data-parallel-random-init": "every DP replica starts from the same weights",
    "--no-check-for-nan-in-loss-and-grad": "NaN/Inf steps are handled by --nan-policy (skip or stop)",
    "--check-for-large-grads": "not implemented; NaN/Inf is handled by --nan-policy",
    "--check-for-spiky-loss": "not implemented; NaN/Inf is handled by --nan-policy",
    "--no-save-optim": "checkpoints always hold the optimizer (needed for exact resume)",
    "--no-save-rng": "checkpoints always hold the RNG state (needed for exact resume)",
    "--profile": "use torch.profiler around pretrain_spiral.py or bench/", "--use-pytorch-profiler":
        "use torch.profiler around pretrain_spiral.py or bench/",
    "--log-progress": "not implemented; progress is in the log and run_summary.json",
    "--log-memory-to-tensorboard": "not implemented", "--log-num-zeros-in-grad": "not implemented",
    "--log-max-attention-logit": "not implemented", "--log-energy": "not implemented",
    "--log-device-memory-used": "not implemented", "--log-memory-interval": "not implemented",
    "--timing-log-option": "timers are this rank's (no cross-rank min/max)",
    "--logging-level": "use the standard logging module's environment (PYTHONWARNINGS etc.)",
    "--wandb-entity": "set WANDB_ENTITY in the environment (wandb reads it)",
    "--yaml-cfg": "give flags on the command line", "--spec": "the layer spec is chosen by --transformer-impl",
    "--exit-signal-handler-for-dataloader": "loader workers never act on the exit signal; the training "
                                            "processes do (--exit-signal-handler)",
    "--dataloader-fast-cache-load": "not implemented", "--dataloader-defer-npy-index-mmap": "not implemented",
    "--object-storage-cache-path": "object storage is not supported; use a local --data-path",
    "--disable-msc": "the multi-storage client is not used", "--enable-experimental": DROP,
    "--deterministic-mode": "CPU runs are deterministic; on GPU set CUBLAS_WORKSPACE_CONFIG and "
                            "torch.use_deterministic_algorithms yourself",
    "--use-cpu-initialization": "weights are initialised on the device by megatron-core",
    "--no-initialization": "weights are always initialised", "--init-model-with-meta-device": "not implemented",
    "--local-rank": "torchrun's LOCAL_RANK environment variable is read instead",
    "--lazy-mpu-init": "not supported", "--fake-process-group": "not supported",
    "--distributed-timeout-seconds-after-init": "use --distributed-timeout-minutes",
    "--mock-data-path": "use --mock-data",
    "--trust-remote-code": "tokenizers are local files only (nothing is downloaded or executed)",
    "--legacy-tokenizer": "megatron-core's tokenizers are used",
    "--tokenizer-hf-use-fast": "tokenizer.json is always read by the fast tokenizers library",
    "--tokenizer-metadata": "not supported", "--tokenizer-special-tokens": "use --eod-token/--pad-token",
    "--vocab-extra-ids": "T5 sentinels are not used by GPT models",
    "--sft": "supervised fine-tuning is not implemented here; export to Hugging Face (tools/convert_checkpoint.py)",
    "--adlr-autoresume": "use --exit-signal-handler with SLURM --requeue (examples/slurm)",
    "--ckpt-step": "use --load DIR/iter_NNNNNNN",
    "--relative-attention-num-buckets": "T5 relative positions are not used; SpiralFormer uses RoPE",
    "--relative-attention-max-distance": "T5 relative positions are not used; SpiralFormer uses RoPE",
    "--onnx-safe": "ONNX export is not supported; export to Hugging Face (tools/convert_checkpoint.py)",
    "--bert-no-binary-head": "BERT models are not built here",
    "--sample-rate": "BERT/T5 data flag", "--mask-prob": "BERT/T5 data flag", "--short-seq-prob": "BERT/T5 data flag",
    "--apply-wd-to-qk-layernorm": "weight decay skips biases and norms (megatron-core's rule)",
    "--no-weight-decay-cond-type": "weight decay skips biases and norms (megatron-core's rule)",
    "--empty-unused-memory-level": "not implemented", "--train-sync-interval": "not implemented",
    "--check-weight-hash-across-dp-replicas-interval": "not implemented; exact-resume tests cover DP agreement",
    "--result-rejected-tracker-filename": "the rerun state machine is not used",
    "--grad-reduce-in-bf16": "gradients are always accumulated and reduced in FP32",
    "--accumulate-allreduce-grads-in-fp32": f"always on here: gradients are accumulated and reduced in FP32 ({DROP})",
    "--attention-softmax-in-fp32": "not configurable: the attention kernel (SDPA / TE) chooses its softmax precision",
    "--fp16-lm-cross-entropy": "the LM loss is computed in FP32",
    "--disable-jit-fuser": "the JIT fusions are megatron-core's choice", "--te-rng-tracker": TE,
    "--batch-invariant-mode": "not supported", "--use-te-activation-func": TE,
    "--num-dataset-builder-threads": "megatron-core's dataset builder runs with one thread here",
    "--test-mode": "not supported", "--no-barrier-with-level-1-timing": "per-phase timers are not implemented",
    "--apply-query-key-layer-scaling": "attention scores use the standard 1/sqrt(d_head) scaling",
    "--disable-bf16-reduced-precision-matmul": "not configurable",
    "--mid-level-dataset-surplus": "megatron-core's default blending surplus is used",
    "--allow-ambiguous-pad-tokens": "the tokenizer's pad id always differs from EOD (--pad-token)",
    "--tokenizer-sentencepiece-legacy": "megatron-core's SentencePiece tokenizer is used",
    "--tokenizer-hf-include-special-tokens": "tokenization follows tokenizer.json",
    "--config-logger-dir": "not supported", "--overlap-param-gather-with-optimizer-step": "needs "
    "interleaved pipeline parallelism, which looped models do not support; use --overlap-param-gather",
    "--num-distributed-optimizer-instances": "one distributed-optimizer instance (ZeRO-1 over all DP ranks)",
    "--save-retain-interval": "every saved iteration is kept; delete old iter_* directories yourself",
    "--disable-gloo-process-groups": "megatron-core's default process groups are used",
}

PREFIX_REASONS: List[Tuple[str, str]] = [
    ("--hybrid-context-parallel", "context parallelism is not implemented; use TP/DP"),
    ("--moe-", "mixture-of-experts is not implemented: SpiralFormer's core is dense"),
    ("--num-experts", "mixture-of-experts is not implemented: SpiralFormer's core is dense"),
    ("--expert-", "mixture-of-experts is not implemented: SpiralFormer's core is dense"),
    ("--overlap-moe-", "mixture-of-experts is not implemented"),
    ("--mtp-", "multi-token prediction is not implemented"),
    ("--fp8", "FP8 " + TE + "; use --bf16"), ("--fp4", "FP4 " + TE + "; use --bf16"),
    ("--no-fp8", "FP8 " + TE), ("--keep-fp8", "FP8 " + TE), ("--first-last-layers-bf16", "FP8 " + TE),
    ("--num-layers-at-", "FP8 " + TE), ("--reuse-grad-buf-for-mxfp8", "FP8 " + TE),
    ("--tp-comm-", "TP communication overlap " + TE), ("--no-tp-comm-", "TP communication overlap " + TE),
    ("--disable-tp-comm-", "TP communication overlap " + TE),
    ("--cuda-graph", "CUDA graphs are not supported by the looped block"),
    ("--enable-cuda-graph", "CUDA graphs are not supported by the looped block"),
    ("--external-cuda-graph", "CUDA graphs are not supported by the looped block"),
    ("--mamba-", "hybrid Mamba models are not built here"), ("--hybrid-", "hybrid Mamba models are not built here"),
    ("--is-hybrid-model", "hybrid Mamba models are not built here"),
    ("--disable-mamba", "hybrid Mamba models are not built here"),
    ("--dsa-", "sparse attention variants are not implemented"),
    ("--linear-", "linear attention variants are not implemented"),
    ("--experimental-attention-variant", "attention variants are not implemented"),
    ("--qk-clip", "QK clipping is not implemented"), ("--softmax-type", "standard softmax attention only"),
    ("--attention-output-gate", "not implemented"), ("--glu-linear-offset", "not implemented"),
    ("--activation-func-clamp-value", "not implemented"),
    ("--use-kitchen", "NVIDIA Kitchen quantization is not supported"),
    ("--kitchen-", "NVIDIA Kitchen quantization is not supported"),
    ("--muon-", "the Muon optimizer is not supported; use --optimizer adam or sgd"),
    ("--mrope", "multimodal RoPE is not supported"),
    ("--inference-", "inference engine flags do not apply to pretraining; use tools/generate.py"),
    ("--no-inference-", "inference engine flags do not apply to pretraining"),
    ("--flash-decode", "inference engine flags do not apply to pretraining"),
    ("--fim-", "fill-in-the-middle data is not implemented"), ("--fim", "fill-in-the-middle data is not implemented"),
    ("--non-persistent-", "non-persistent checkpoints are not implemented; use --save-interval"),
    ("--ckpt-convert", "use tools/convert_checkpoint.py"),
    ("--dist-ckpt-", "checkpoints are always megatron dist_checkpointing (torch_dist)"),
    ("--use-dist-ckpt", "checkpoints are always megatron dist_checkpointing (torch_dist)"),
    ("--ddp-", "DDP buckets are megatron-core's defaults; use --overlap-grad-reduce"),
    ("--no-align-", "megatron-core DDP defaults are used"),
    ("--fsdp", "FSDP is not supported; use --use-distributed-optimizer (ZeRO-1)"),
    ("--torch-fsdp2", "FSDP is not supported; use --use-distributed-optimizer (ZeRO-1)"),
    ("--no-bias-", "megatron-core's fusions are chosen automatically (TE when installed)"),
    ("--no-gradient-accumulation-fusion", "gradient-accumulation fusion needs apex/TE, never used here"),
    ("--cross-entropy-", "the loss is megatron-core's vocab-parallel cross entropy"),
    ("--no-pin-cpu-", "CPU offload is not implemented"), ("--cpu-offloading", "CPU offload is not implemented"),
    ("--offload-", "activation offload is not implemented; use recompute"),
    ("--fine-grained-activation-offloading", "activation offload is not implemented; use recompute"),
    ("--min-offloaded-tensor-size", "activation offload is not implemented"),
    ("--save-wgrads-", "gradient dumps are not implemented"), ("--save-dgrads-", "gradient dumps are not implemented"),
    ("--replication", "checkpoint replication is not implemented"),
    ("--tiktoken-", "TikTokenizer is not supported; use --tokenizer-type HuggingFaceTokenizer"),
    ("--use-nccl-ub", "NCCL tuning flags are not exposed"), ("--use-sharp", "NCCL tuning flags are not exposed"),
    ("--sharp-", "NCCL tuning flags are not exposed"), ("--nccl-", "NCCL tuning flags are not exposed"),
    ("--disable-symmetric-registration", "NCCL tuning flags are not exposed"),
    ("--create-all-gather-group", "NCCL tuning flags are not exposed"),
    ("--data-parallel-sharding-strategy", "FSDP is not supported; use --use-distributed-optimizer"),
    ("--outer-dp-sharding-strategy", "FSDP is not supported"), ("--enable-full-sharding-in-hsdp", "FSDP is not supported"),
    ("--suggested-communication-unit-size", "FSDP is not supported"),
    ("--no-gradient-reduce-div-fusion", "megatron-core's DDP defaults are used"),
    ("--use-tp-pp-dp-mapping", "megatron-core's default rank order is used"),
    ("--no-scatter-gather-tensors-in-pipeline", PP), ("--no-overlap-p2p-communication", PP),
    ("--overlap-p2p-communication", PP), ("--use-ring-exchange-p2p", PP),
    ("--microbatch-group-size-per-virtual-pipeline-stage", PP),
    ("--delay-wgrad-compute", TE), ("--defer-embedding-wgrad-compute", PP), ("--wgrad-deferral-limit", PP),
    ("--ep-overlap-", "mixture-of-experts is not implemented"),
    ("--no-async-tensor-model-parallel-allreduce", "megatron-core's TP linears are used as they are"),
    ("--disable-async-tensor-model-parallel-allreduce", "megatron-core's TP linears are used as they are"),
    ("--no-clone-scatter-output", "not configurable"), ("--disable-clone-scatter-output", "not configurable"),
    ("--symmetric-ar-type", "NCCL tuning flags are not exposed"), ("--mlp-chunks-for-prefill", "inference flag"),
    ("--use-fused-weighted-squared-relu", "the MLP uses GeLU (or --swiglu)"),
    ("--optimizer-offload-fraction", "CPU optimizer offload is not implemented"),
    ("--use-torch-optimizer-for-cpu-offload", "CPU optimizer offload is not implemented"),
    ("--overlap-cpu-optimizer", "CPU optimizer offload is not implemented"),
    ("--dump-param-to-param-group-map", "not supported"), ("--high-priority-stream-groups", "not supported"),
    ("--no-one-logger", "NVIDIA one-logger is not used"), ("--one-logger-", "NVIDIA one-logger is not used"),
    ("--app-tag-", "NVIDIA one-logger is not used"),
    ("--hierarchical-context-parallel", "context parallelism is not implemented; use TP/DP"),
    ("--hybrid-context-parallel", "context parallelism is not implemented; use TP/DP"),
    ("--cp-comm-type", "context parallelism is not implemented; use TP/DP"),
    ("--max-seqlen-per-dp-cp-rank", "context parallelism is not implemented; use TP/DP"),
]

GROUP_REASONS: Dict[str, str] = {
    "rl": "reinforcement-learning training is not part of this project",
    "biencoder": "retrieval/biencoder models are not part of this project",
    "vision": "vision models are not part of this project",
    "moe": "mixture-of-experts is not implemented: SpiralFormer's core is dense",
    "mla": "multi-latent attention is not implemented",
    "experimental_attention_variant": "attention variants are not implemented",
    "heterogeneous architecture": "heterogeneous layer configs are not supported; use --spiral-layout",
    "straggler": "straggler detection is not implemented", "workload inspector": "not supported",
    "inference": "inference engine flags do not apply to pretraining; use tools/generate.py",
    "Transformer-Engine": TE,
    "experimental": "experimental Megatron-LM features are not supported",
    "one logger": "NVIDIA one-logger is not used", "In-process restart": "in-process restart is not supported; "
    "use --exit-signal-handler with SLURM --requeue", "ft_package": "NVIDIA fault tolerance is not used; use "
    "--exit-signal-handler with SLURM --requeue", "rerun engine": "the rerun state machine is not used; NaN/Inf "
    "steps follow --nan-policy", "msc": "the multi-storage client is not used", "sft": "SFT is not implemented",
    "profiling": "use torch.profiler around pretrain_spiral.py or bench/",
    "autoresume": "use --exit-signal-handler with SLURM --requeue (examples/slurm)",
}
FALLBACK = "not supported by pretrain_spiral.py (drop the flag)"


def megatron_lm_flags() -> Iterator[Tuple[str, Tuple[str, ...], bool]]:
    """(group, aliases, takes a value) for every Megatron-LM flag."""
    for group, packed in MEGATRON_LM_FLAGS.items():
        for token in packed.split():
            takes_value = token.endswith("=")
            yield group, tuple(token.rstrip("=").split("|")), takes_value


def rejection_reason(flag: str, group: str) -> str:
    """Why ``flag`` (of Megatron-LM argparse group ``group``) is refused, and what to do instead."""
    if flag in REJECTED_MODEL_FLAGS:
        return REJECTED_MODEL_FLAGS[flag][1]
    if flag in FLAG_REASONS:
        return FLAG_REASONS[flag]
    for prefix, reason in PREFIX_REASONS:
        if flag.startswith(prefix):
            return reason
    return GROUP_REASONS.get(group, FALLBACK)


class _RejectFlag(argparse.Action):
    """Records a refused flag (with its value) so that every refused flag is named in one error."""

    def __call__(self, parser, namespace, values, option_string=None):
        refused = list(getattr(namespace, self.dest) or [])
        refused.append((option_string, self.help_reason))
        setattr(namespace, self.dest, refused)


REFUSED_DEST = "_refused_megatron_flags"


def add_refused_megatron_flags(parser: argparse.ArgumentParser) -> int:
    """Give every Megatron-LM flag that ``parser`` does not define a refusing action (hidden from
    --help; docs/megatron_flags.md lists them). Returns how many option strings were added."""
    defined = set(parser._option_string_actions)
    added = 0
    for group, aliases, takes_value in megatron_lm_flags():
        missing = [name for name in aliases if name not in defined]
        if not missing:
            continue
        action = parser.add_argument(*missing, dest=REFUSED_DEST, action=_RejectFlag,
                                     nargs="*" if takes_value else 0, default=None, help=argparse.SUPPRESS)
        action.help_reason = rejection_reason(aliases[0], group)
        added += len(missing)
    for flag, (takes_value, reason) in REJECTED_MODEL_FLAGS.items():  # not in Megatron-LM's list
        if flag not in parser._option_string_actions:
            action = parser.add_argument(flag, dest=REFUSED_DEST, action=_RejectFlag,
                                         nargs="*" if takes_value else 0, default=None, help=argparse.SUPPRESS)
            action.help_reason = reason
            added += 1
    return added


def refused_flags_message(args: argparse.Namespace) -> Optional[str]:
    """One message naming every refused Megatron-LM flag given, or None."""
    refused = getattr(args, REFUSED_DEST, None)
    if not refused:
        return None
    lines = [f"{flag}: {reason}" for flag, reason in dict(refused).items()]
    return (f"Megatron-LM ({MEGATRON_LM_VERSION}) flag{'s' if len(lines) > 1 else ''} not supported by "
            "pretrain_spiral.py (see docs/megatron_flags.md):\n  " + "\n  ".join(lines))


def flag_table(parser: argparse.ArgumentParser) -> List[Tuple[str, str, str]]:
    """(Megatron-LM group, flag, 'honoured' | 'refused', our default or the reason) for every
    Megatron-LM flag, in Megatron-LM's order: the source of docs/megatron_flags.md."""
    rows = []
    for group, aliases, _ in megatron_lm_flags():
        action = parser._option_string_actions.get(aliases[0])
        name = " / ".join(aliases)
        if action is None or action.dest == REFUSED_DEST:
            rows.append((group, name, "refused", getattr(action, "help_reason", None)
                         or rejection_reason(aliases[0], group)))
        else:
            rows.append((group, name, "honoured", repr(action.default) if action.nargs != 0
                         else "off" if not action.default else "on"))
    return rows
