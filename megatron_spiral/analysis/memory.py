"""Per-GPU training memory of a SpiralFormer run, like Megatron-LM's theoretical memory report.

Pure arithmetic on a SpiralConfig and the run's flags (:class:`MemorySetup`). Four parts:

* weights, gradients and optimizer state (Adam; fp32 main weights under ``--bf16``; sharded over
  data-parallel ranks by ``--use-distributed-optimizer``): bytes per parameter as in Megatron-LM's
  ``theoretical_memory_usage.py`` (bf16: 2 weight + 4 fp32 grad + 12 optimizer, i.e. 18, or
  6 + 12/DP with the distributed optimizer; fp32: 4 + 4 + 8);
* activations kept for backward, resolution-aware: the pre/post stacks at L, the shared core once
  per loop iteration at its own L_t, the resampling and MeSH tensors at L, the logits and loss
  (:func:`activation_bytes`, itemised by :func:`activation_breakdown`). The terms are the tensors
  autograd saves in megatron-core 0.16.1's local-spec layer (SDPA attention; GELU or SwiGLU MLP;
  MHA or GQA; any --kv-channels; with or without biases and dropout; :func:`layer_internal_parts`)
  and in our resampling / topology code, each counted once even when several ops save it;
  ``tests/test_memory_report.py`` checks the total against the distinct storages autograd really
  saves (on CPU: ``MemorySetup.device``). On CUDA (the default) dropout masks are bool and SDPA is
  assumed to run its flash / memory-efficient kernels, which keep no l x l tensor even under
  attention dropout; that part is not measured here;
* a backward working set (:func:`backward_working_bytes`): the gradient of the logits and, under
  recomputation, the activations of the largest recomputed unit, which live during its backward.

Sizes are per rank: tensor-parallel splits of heads, MLP width and vocabulary; sequence
parallelism also splits the hidden-sized tensors over TP (Megatron's 34/t rule). The SP figures
follow that rule and are not validated by measurement.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Dict, Optional

from megatron_spiral.analysis.accounting import count_params, layer_params, layer_params_per_rank
from megatron_spiral.config import SpiralConfig
from megatron_spiral.model.chunking import num_chunks
from megatron_spiral.model.recompute import RecomputeConfig, stack_recompute_overrides

FP32 = 4
INT64 = 8
GIB = 2 ** 30


@dataclass
class MemorySetup:
    """The flags of a run that decide its memory (Megatron-LM names)."""

    micro_batch_size: int = 1
    seq_length: Optional[int] = None          # default: the model's seq_length
    tensor_model_parallel_size: int = 1
    sequence_parallel: bool = False
    data_parallel_size: int = 1
    use_distributed_optimizer: bool = False
    bf16: bool = False
    recompute: RecomputeConfig = field(default_factory=RecomputeConfig)
    # Not a Megatron-LM flag (it trains on CUDA only): where the step runs, which decides the
    # dropout-mask dtype and, under attention dropout, the SDPA kernel (:func:`sdpa_math_kernel`).
    # "cpu" is what the tests measure against.
    device: str = "cuda"

    def __post_init__(self) -> None:
        if self.device not in ("cuda", "cpu"):
            raise ValueError(f"MemorySetup.device must be 'cuda' or 'cpu', got {self.device!r}")

    @property
    def act(self) -> int:
        """Bytes of one activation element."""
        return 2 if self.bf16 else FP32

    @property
    def sp(self) -> int:
        """Divisor of hidden-sized tensors: TP under sequence parallelism, else 1."""
        return self.tensor_model_parallel_size if self.sequence_parallel else 1


# ------------------------------------------------------------------ one transformer layer
def rotary_dim(config: SpiralConfig) -> int:
    """Dimensions of each head that RoPE rotates: int(head_dim * rotary_percent) (megatron-core)."""
    return int(config.head_dim * config.rotary_percent)


def dropout_mask_bytes(setup: MemorySetup) -> int:
    """Bytes of one saved dropout-mask element: CUDA's fused ``native_dropout`` keeps a bool mask;
    the CPU path multiplies by a scaled mask in the activation dtype and keeps that."""
    return 1 if setup.device == "cuda" else setup.act


def sdpa_math_kernel(config: SpiralConfig, setup: MemorySetup) -> bool:
    """Whether torch SDPA runs its unfused math kernel: on CPU under attention dropout (the CPU
    flash kernel refuses dropout). On CUDA the report assumes the flash / memory-efficient kernels,
    which take dropout and keep only an RNG seed and offset (a few bytes, not counted)."""
    return setup.device == "cpu" and config.attention_dropout > 0


def assumptions(config: SpiralConfig, setup: MemorySetup) -> str:
    """What the report assumes about kernels it cannot see (printed by ``--memory``)."""
    if setup.device == "cuda":
        text = ("CUDA: torch SDPA runs its flash / memory-efficient kernels (no l x l tensor"
                + (", attention dropout keeps only an RNG seed" if config.attention_dropout > 0 else "")
                + ")")
        if config.hidden_dropout > 0:
            text += "; dropout masks are bool (1 byte per element)"
        return text
    text = "CPU: torch SDPA runs its flash kernel"
    if config.attention_dropout > 0:
        text = "CPU: torch SDPA runs its math kernel (attention dropout), keeping 3 x [b, heads, l, l]"
    if config.hidden_dropout > 0:
        text += "; dropout masks in the activation dtype"
    return text


def layer_internal_parts(config: SpiralConfig, length: int, setup: MemorySetup) -> Dict[str, int]:
    """Bytes one layer call at ``length`` tokens saves for backward, its input excluded, by term.

    With h = heads / tp, g = query_groups / tp, kv = head_dim (``--kv-channels``), f = ffn / tp:

    * norm outputs and the mid-layer residual: 3 x [l, b, d] (/ tp under SP);
    * attention, flash kernels: the fused QKV [l, b, (h + 2g) kv] (SDPA's v is a view of it),
      rotated q and k and the SDPA output (the projection's input): 6 x [l, b, h kv] under MHA.
      Under GQA (g < h) our SDPA module repeats k and v to every head before SDPA, which keeps
      the repeated copies instead: q, k, v, output = 4 x [l, b, h kv]. Plus SDPA's fp32
      log-sum-exp [b, h, l];
    * attention, math kernel (CPU with ``--attention-dropout``): the scaled q and k, v (the fused
      QKV; the repeated v under GQA), the softmax probabilities, the dropout mask and the dropped
      probabilities (3 x [b, h, l, l]) and the projection's copy of the output; no log-sum-exp.
      The CPU math kernel computes reduced-precision inputs in fp32 (q, k, v and the l x l
      tensors in fp32, v then a copy);
    * ``--recompute-modules core_attn``: the checkpoint keeps its inputs (fused QKV, rotated q,
      rotated k at g heads), the projection keeps the output, plus the int32 mask-type tensor;
      no log-sum-exp and no l x l tensors;
    * MLP: GELU keeps its input (fc1 output, bias added) and output, 2 x [l, b, f]; SwiGLU keeps
      the fc1 output [l, b, 2f] (the silu input is its first half), silu(gate), up + offset and
      their product (fc2's input), 5 x [l, b, f]. Biases (``--disable-bias-linear``,
      ``--add-qkv-bias``) change no saved size;
    * the RoPE cos/sin tables of q and k: 4 x [l, rotary_dim];
    * fp32 norm statistics: per norm [l, b] (RMSNorm) or 2 x [l, b] (LayerNorm);
    * ``--hidden-dropout``: the masks of the attention and MLP bias-dropout-add,
      2 x [l, b, d] at :func:`dropout_mask_bytes`.
    """
    b, d, tp, act = setup.micro_batch_size, config.hidden_size, \
        setup.tensor_model_parallel_size, setup.act
    tokens = length * b
    heads = config.num_attention_heads // tp
    groups = config.query_groups // tp
    kv = config.head_dim
    stats_per_norm = 1 if config.normalization == "RMSNorm" else 2
    selective = setup.recompute.recompute_granularity == "selective"
    modules = set(setup.recompute.recompute_modules or ["core_attn"]) if selective else set()

    fused_qkv = tokens * (heads + 2 * groups) * kv * act
    per_head = tokens * heads * kv  # elements of one [l, b, h kv] tensor
    repeated = groups < heads       # SDPACoreAttention repeat_interleaves k and v
    parts = {"norm outputs + residual": 3 * tokens * d // setup.sp * act}
    if "core_attn" in modules:
        parts["attention q, k, v, output"] = fused_qkv + 2 * per_head * act + tokens * groups * kv * act
        parts["attention core"] = 4  # the checkpointed attn_mask_type, an int32 tensor
    elif sdpa_math_kernel(config, setup):
        math = max(act, FP32)  # reduced precision runs in fp32 in the CPU math kernel
        value = per_head * math if (repeated or act != FP32) else fused_qkv
        parts["attention q, k, v, output"] = 2 * per_head * math + value + per_head * act
        parts["attention core"] = 3 * b * heads * length * length * math  # probs, mask, dropped
    else:
        value = per_head * act if repeated else fused_qkv
        parts["attention q, k, v, output"] = 3 * per_head * act + value
        parts["attention core"] = b * heads * length * FP32  # log-sum-exp
    parts["mlp"] = (5 if config.swiglu else 2) * tokens * config.ffn_size // tp * act
    parts["rope cos/sin"] = 4 * length * rotary_dim(config) * act
    parts["norm statistics"] = 2 * stats_per_norm * tokens // setup.sp * FP32
    if config.hidden_dropout > 0:
        parts["dropout masks"] = 2 * tokens * d // setup.sp * dropout_mask_bytes(setup)
    return parts


def layer_internal_bytes(config: SpiralConfig, length: int, setup: MemorySetup) -> int:
    """Bytes one layer call at ``length`` tokens saves for backward, its input excluded (the
    terms are :func:`layer_internal_parts`)."""
    return sum(layer_internal_parts(config, length, setup).values())


def hidden_bytes(config: SpiralConfig, length: int, setup: MemorySetup) -> int:
    """One [l, b, d] activation on this rank."""
    return length * setup.micro_batch_size * config.hidden_size // setup.sp * setup.act


def stack_bytes(config: SpiralConfig, num_layers: int, length: int, setup: MemorySetup,
                granularity: Optional[str]) -> int:
    """A stack of ``num_layers`` layers at ``length``, its input excluded (its owner counts it).

    No/selective recompute: every layer's internals plus the inputs of layers 2..n.
    Full, uniform N: only the inputs of the groups after the first.
    Full, block N: the first N layers keep their inputs only, the rest keep everything.
    """
    if num_layers == 0:
        return 0
    inner = hidden_bytes(config, length, setup)
    layer = layer_internal_bytes(config, length, setup)
    if granularity != "full":
        return num_layers * layer + (num_layers - 1) * inner
    per = min(setup.recompute.recompute_num_layers, num_layers)
    if setup.recompute.recompute_method == "uniform":
        return (math.ceil(num_layers / per) - 1) * inner
    return (num_layers - 1) * inner + (num_layers - per) * layer


# ------------------------------------------------------------------ loop iterations
def core_length(config: SpiralConfig, latents: int, setup: MemorySetup) -> int:
    """Core sequence length on this rank's view: L_t, padded to a multiple of TP under SP."""
    if setup.sequence_parallel:
        tp = setup.tensor_model_parallel_size
        return -(-latents // tp) * tp
    return latents


def iteration_bytes(config: SpiralConfig, t: int, length: int, setup: MemorySetup) -> Dict[str, int]:
    """Tensors iteration t saves apart from its input state and its output u~ (counted by the
    topology): down-scaling, the core's L_t stacks, up-scaling. Empty under loop recompute."""
    g, omega = config.chunk_sizes[t], config.chunk_offsets[t]
    latents = num_chunks(length, g, omega)
    if latents == 0 or setup.recompute.spiral_recompute_loop:
        return {}
    b, d, act = setup.micro_batch_size, config.hidden_size, setup.act
    granularity = setup.recompute.recompute_granularity
    parts: Dict[str, int] = {}
    core_l = core_length(config, latents, setup)
    if g > 1:
        if config.downscale == "self_aggregation":
            # padded copy of the state (offset slots prepended), fp32 chunk softmax (+ its cast
            # to bf16 for the weighted sum), the real-slot mask
            padded = (length + omega) * b * d * act if omega else 0
            weights = latents * g * b * (FP32 + (act if act != FP32 else 0))
            parts["downscale"] = padded + weights + latents * g
            if setup.sp > 1:  # the scorer keeps the all-gathered full-length state, not the shard
                parts["downscale"] += length * b * d * act
        parts["core input z"] = hidden_bytes(config, core_l, setup)
        if config.upscale == "router":
            # the core output zhat (router input), fp32 router softmax, gain-scaled weights
            parts["upscale"] = latents * b * d * act + latents * b * g * (FP32 + act)
    parts["core layers"] = stack_bytes(config, config.parsed_layout.num_loop, core_l, setup,
                                       granularity)
    return parts


def state_saved(config: SpiralConfig, t: int, length: int, setup: MemorySetup) -> bool:
    """Whether the input state h^(t) of iteration t is kept: by the loop checkpoint, the MeSH
    routers, the self-aggregation scorer, or (full resolution) the core's first layer."""
    g, omega = config.chunk_sizes[t], config.chunk_offsets[t]
    if num_chunks(length, g, omega) == 0:
        return config.topology == "mesh"
    return (setup.recompute.spiral_recompute_loop or config.topology == "mesh" or g == 1
            or (config.downscale == "self_aggregation" and setup.sp == 1))  # SP: iteration_bytes


def mesh_bytes(config: SpiralConfig, length: int, setup: MemorySetup) -> int:
    """MeSH's factored buffer: per write-read (T + 1 of them) the fp32 write and read softmaxes
    over B slots, the read weight of slot 0 (its bf16 cast), and one per-token coefficient per
    value read so far; the values themselves (v, u~) are counted as the states they are."""
    tokens = length * setup.micro_batch_size // setup.sp
    updates = config.num_iterations + 1
    per_update = 2 * tokens * config.num_mesh_slots * FP32
    if setup.act != FP32:
        per_update += tokens * setup.act
    coefficients = updates * (updates + 1) // 2 * tokens * setup.act
    return updates * per_update + coefficients


# ------------------------------------------------------------------ whole model
def activation_breakdown(config: SpiralConfig, setup: MemorySetup) -> Dict[str, int]:
    """Saved-for-backward bytes of one micro-batch on one rank, by part of the model."""
    layout = config.parsed_layout
    length = setup.seq_length or config.seq_length
    b, d, act, tp = setup.micro_batch_size, config.hidden_size, setup.act, \
        setup.tensor_model_parallel_size
    granularity = setup.recompute.recompute_granularity
    hidden = hidden_bytes(config, length, setup)
    mesh = layout.is_looped and config.topology == "mesh"
    parts: Dict[str, int] = {"embedding ids": b * length * INT64}
    if config.hidden_dropout > 0:  # megatron's embedding dropout (after the SP scatter)
        parts["embedding dropout mask"] = length * b * d // setup.sp * dropout_mask_bytes(setup)

    # x (embeddings), v = f_pre(x), the states h^(t), u~^(t) and the final state
    states = 0
    if layout.is_looped:
        first_kept = state_saved(config, 0, length, setup)
        states += hidden if (layout.num_pre or mesh or first_kept) else 0   # x
        if layout.num_pre:
            states += hidden if (mesh or first_kept) else 0                   # v
        for t in range(layout.num_iterations):
            if t > 0 or mesh:  # anchor: h^(0) is v itself
                states += hidden if state_saved(config, t, length, setup) else 0
            if mesh:
                states += hidden                                             # u~^(t), a MeSH value
        states += hidden                                                     # h^(T)
    else:
        states += 2 * hidden if layout.num_pre else hidden                   # x and f(x)
    parts["states (x, v, h, u~)"] = states

    parts[f"pre stack ({layout.num_pre} @ {length})"] = stack_bytes(
        config, layout.num_pre, length, setup, granularity)
    for t in range(layout.num_iterations):
        for name, value in iteration_bytes(config, t, length, setup).items():
            key = f"loop {name}"
            parts[key] = parts.get(key, 0) + value
    if mesh:
        parts["mesh routers/coefficients"] = mesh_bytes(config, length, setup)
    parts[f"post stack ({layout.num_post} @ {length})"] = stack_bytes(
        config, layout.num_post, length, setup, granularity)
    if layout.num_post and layout.is_looped:
        parts[f"post stack ({layout.num_post} @ {length})"] += hidden       # post output
    stats_per_norm = 1 if config.normalization == "RMSNorm" else 2
    parts["final norm"] = hidden + stats_per_norm * b * length // setup.sp * FP32
    # vocab-parallel cross entropy keeps the fp32 softmax [L, b, V/tp], the int64 masked
    # targets and the bool target mask
    parts["logits + loss"] = length * b * (config.padded_vocab_size // tp * FP32 + INT64 + 1)
    if _uses_rope_checkpoint(config, setup):
        parts["rope table (checkpoint input)"] = length * rotary_dim(config) * FP32
    return {k: v for k, v in parts.items() if v}


def _uses_rope_checkpoint(config: SpiralConfig, setup: MemorySetup) -> bool:
    if setup.recompute.spiral_recompute_loop and config.parsed_layout.is_looped:
        return True
    return setup.recompute.recompute_granularity == "full"


def activation_bytes(config: SpiralConfig, setup: MemorySetup) -> int:
    """Total saved-for-backward bytes of one micro-batch on one rank."""
    return sum(activation_breakdown(config, setup).values())


def backward_working_bytes(config: SpiralConfig, setup: MemorySetup) -> int:
    """Transient bytes during backward: the logits gradient in the activation dtype and, with
    recompute, what the largest recomputed unit re-materialises. Under ``full`` that is one group
    of ``--recompute-num-layers`` layers (uniform) or one layer (block: megatron checkpoints each
    of the first N layers on its own). Under ``loop`` it is one iteration: with ``uniform`` nested
    inside it, the core's group inputs plus one group being recomputed; otherwise (block drops the
    core's own checkpoints, model/recompute.py) the whole iteration, while pre/post layers are
    recomputed at other moments of the backward."""
    length = setup.seq_length or config.seq_length
    logits_grad = length * setup.micro_batch_size * config.padded_vocab_size \
        // setup.tensor_model_parallel_size * setup.act
    rc = setup.recompute
    plain = dataclasses.replace(setup, recompute=RecomputeConfig())
    layer_unit = 0
    if rc.recompute_granularity == "full":
        per = 1 if rc.recompute_method == "block" else min(
            rc.recompute_num_layers, max(config.parsed_layout.num_unique_layers, 1))
        layer_unit = per * (layer_internal_bytes(config, length, plain) + hidden_bytes(config, length, plain))
    if not (rc.spiral_recompute_loop and config.parsed_layout.is_looped):
        return logits_grad + layer_unit
    # the core's own recompute inside the iteration checkpoint, by the rule the model builds it with
    core = stack_recompute_overrides(rc, config.parsed_layout.num_loop, inside_loop_checkpoint=True)
    inner = dataclasses.replace(setup, recompute=dataclasses.replace(
        rc, spiral_recompute_loop=False, **core))
    nested = inner.recompute.recompute_granularity == "full"
    iteration = max(sum(iteration_bytes(config, t, length, inner).values())
                    for t in range(config.num_iterations))
    return logits_grad + (iteration + layer_unit if nested else max(iteration, layer_unit))


# ------------------------------------------------------------------ weights and optimizer
def params_per_rank(config: SpiralConfig, tp: int) -> int:
    """Parameters held by one tensor-parallel rank: every layer's split tensors (QKV / fc1 weights
    and biases, proj / fc2 weights; ``accounting.layer_param_tensors``) and the vocabulary (embedding and
    an untied output layer) are divided by TP; norms, proj / fc2 biases, resamplers and MeSH
    routers are replicated."""
    total = count_params(config)
    if tp == 1:
        return total.total
    layers = config.num_weight_layers
    vocab = total.breakdown["embedding"] + total.breakdown["output_layer"]
    rest = total.total - layers * layer_params(config) - vocab
    return layers * layer_params_per_rank(config, tp) + vocab // tp + rest


def bytes_per_parameter(setup: MemorySetup) -> Dict[str, float]:
    """Weights / gradients / optimizer bytes per parameter (Megatron-LM: 18 under bf16, or
    6 + 12/DP with the distributed optimizer). fp32 runs keep no separate main weights."""
    dp = setup.data_parallel_size if setup.use_distributed_optimizer else 1
    if setup.bf16:
        return {"weights": 2, "gradients": 4, "optimizer": 12 / dp}  # fp32 main + Adam m, v
    return {"weights": 4, "gradients": 4, "optimizer": 8 / dp}


@dataclass
class MemoryReport:
    weights: int
    gradients: int
    optimizer: int
    activations: int
    backward_working: int
    activation_parts: Dict[str, int]

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations + self.backward_working

    def as_dict(self) -> dict:
        return {"weights": self.weights, "gradients": self.gradients, "optimizer": self.optimizer,
                "activations": self.activations, "backward_working": self.backward_working,
                "total": self.total, "activation_parts": dict(self.activation_parts)}


def memory_report(config: SpiralConfig, setup: MemorySetup) -> MemoryReport:
    """Per-GPU bytes of one training step with one micro-batch in flight (no pipeline)."""
    params = params_per_rank(config, setup.tensor_model_parallel_size)
    per = bytes_per_parameter(setup)
    parts = activation_breakdown(config, setup)
    return MemoryReport(
        weights=int(params * per["weights"]), gradients=int(params * per["gradients"]),
        optimizer=int(params * per["optimizer"]), activations=sum(parts.values()),
        backward_working=backward_working_bytes(config, setup), activation_parts=parts)


def largest_micro_batch(config: SpiralConfig, setup: MemorySetup, capacity_bytes: int,
                        limit: int = 4096) -> int:
    """Largest --micro-batch-size whose :func:`memory_report` total fits ``capacity_bytes``
    (0 when not even one sequence fits). Memory grows with the batch: bisection."""
    def fits(batch: int) -> bool:
        trial = dataclasses.replace(setup, micro_batch_size=batch)
        return memory_report(config, trial).total <= capacity_bytes

    low, high = 0, limit + 1  # fits(low) holds (or low == 0), fits(high) does not
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low
