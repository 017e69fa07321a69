"""Model flags with Megatron-LM's names and meaning (pretrain_spiral.py, tools/model_report.py).

``add_model_arguments`` adds one group generated from :class:`SpiralConfig` plus the Megatron-LM
flags that are not config fields (``--num-layers``, aliases, accepted no-ops of the fused kernels,
and, in ``REJECTED_FLAGS``, the reasons for model flags this model cannot honour). ``model_config_from_args`` turns
the parsed flags into a SpiralConfig:

* ``--preset NAME``: the preset, with explicit flags overriding it (presets spell out Pythia's
  untied embeddings and zero dropout).
* no preset: Megatron-LM's defaults for flags that are absent (tied embeddings, dropout 0.1);
  ``--num-layers N`` alone builds a non-looped GPT of N layers; with ``--spiral-layout`` it must
  equal the layout's unique layer count.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Callable, Optional

from megatron_spiral.cli import add_dataclass_arguments, explicit_overrides
from megatron_spiral.config import SpiralConfig, SpiralConfigError, parse_layout
from megatron_spiral.presets import get_preset

# Megatron-LM flags whose kernels this codebase never fuses: accepted, because the model already
# runs the unfused path they ask for (transformer_config() turns every fusion off).
UNFUSED_FLAGS = ("--no-masked-softmax-fusion", "--no-bias-gelu-fusion", "--no-bias-swiglu-fusion",
                 "--no-bias-dropout-fusion", "--no-rope-fusion", "--no-persist-layer-norm")

# Megatron-LM model flags that cannot be honoured, with the reason and what to use instead.
# value=True: the flag takes a value in Megatron-LM.
REJECTED_FLAGS = {
    "--squared-relu": (False, "the MLP activation is GELU (GPT-NeoX/Pythia) or, with --swiglu, "
                              "gated SiLU; squared ReLU is not implemented"),
    "--openai-gelu": (False, "the MLP uses exact-erf GELU (what Pythia trained with); the tanh "
                             "approximation is not implemented"),
    "--quick-geglu": (False, "not implemented; use --swiglu for a gated MLP"),
    "--onnx-safe": (True, "ONNX export workarounds do not apply; export with "
                          "tools/convert_checkpoint.py --save-hf"),
    "--apply-layernorm-1p": (False, "zero-centred norm weights are not implemented; use "
                                    "--normalization LayerNorm or RMSNorm"),
    "--qk-layernorm": (False, "query/key norms are not implemented in the layers or the HF export"),
    "--rotary-interleaved": (False, "RoPE is the non-interleaved rotate-half form in training, "
                                    "decoding and the HF export"),
    "--rotary-seq-len-interpolation-factor": (True, "RoPE position interpolation is not "
                                                    "implemented; the compressed sequences use "
                                                    "chunk-index positions"),
    "--use-rope-scaling": (False, "Llama-3 RoPE scaling is not implemented"),
    "--rope-scaling-factor": (True, "Llama-3 RoPE scaling is not implemented"),
    "--no-position-embedding": (False, "SpiralFormer uses RoPE; the flag is deprecated in Megatron-LM "
                                       "(use --position-embedding-type rope)"),
    "--apply-residual-connection-post-layernorm": (False, "layers are pre-norm (GPT-NeoX/Pythia)"),
    "--fp32-residual-connection": (False, "the residual stream stays in the parameter dtype"),
    "--apply-query-key-layer-scaling": (False, "torch SDPA computes the softmax stably in every "
                                               "dtype; no fp16 layer scaling is needed"),
    "--num-experts": (True, "mixture-of-experts layers are not implemented for the looped core"),
    "--multi-latent-attention": (False, "MLA is not implemented; use --group-query-attention"),
    "--window-size": (True, "sliding-window attention is not implemented"),
    "--init-method-xavier-uniform": (False, "initialisation is normal with --init-method-std"),
    "--encoder-num-layers": (True, "GPT is decoder-only: use --num-layers"),
    "--decoder-num-layers": (True, "use --num-layers (or --spiral-layout for a looped model)"),
    "--use-legacy-models": (False, "only megatron-core models exist here"),
    "--spec": (True, "SpiralFormer builds its own layer spec; choose it with --transformer-impl"),
    "--heterogeneous-layers-config-path": (True, "every layer has the same shape here"),
}

# Fields whose absence means Megatron-LM's default on a run without --preset.
MEGATRON_DEFAULTS = {f.name: f.metadata["megatron_default"] for f in dataclasses.fields(SpiralConfig)
                     if "megatron_default" in f.metadata}


def _drop_field_defaults(group: argparse._ArgumentGroup) -> None:
    """The generated help appends the config field's default (what old checkpoints mean); for
    fields whose command-line default is Megatron-LM's, the help text says that instead."""
    for action in group._group_actions:
        if action.dest in MEGATRON_DEFAULTS and action.help:
            action.help = action.help.rsplit(" (default:", 1)[0]


def add_model_arguments(parser: argparse.ArgumentParser, skip=("vocab_size",)) -> None:
    """Every model flag: SpiralConfig's fields plus the Megatron-LM extras described above."""
    group = add_dataclass_arguments(parser, SpiralConfig, "model", "architecture (SpiralConfig)",
                                    skip=skip, defaults_to_none=True)
    _drop_field_defaults(group)
    group.add_argument("--num-layers", type=int, default=None, help=(
        "transformer layers (Megatron-LM). Without --spiral-layout and --preset: a non-looped GPT "
        "of this many layers; with them it must equal the unique layer count N_pre+N_loop+N_post"))
    group.add_argument("--layernorm-epsilon", dest="layernorm_epsilon", type=float, default=None,
                       help="alias of --norm-epsilon")
    group.add_argument("--use-rotary-position-embeddings", action="store_true", help=(
        "legacy Megatron-LM spelling of --position-embedding-type rope (RoPE is always used)"))
    group.add_argument("--use-flash-attn", action="store_true", help=(
        "FlashAttention: the local layer spec runs torch scaled_dot_product_attention, which uses "
        "FlashAttention-2 kernels on GPU; with Transformer Engine (--transformer-impl "
        "transformer_engine) TE selects its flash backend. Accepted for Megatron-LM launch lines"))
    group.add_argument("--attention-backend", default="auto", help=(
        "Megatron-LM attention backend: 'auto' or 'flash' (torch SDPA / TE choose the kernel); "
        "fused/unfused/local are not selectable here"))
    group.add_argument("--use-mcore-models", action="store_true",
                       help="accepted: every model here is a megatron-core model")
    for flag in UNFUSED_FLAGS:
        # Megatron-LM's spellings: the fusion flags store_false into the fusion's name (default
        # on); --no-persist-layer-norm is a plain store_true.
        if flag == "--no-persist-layer-norm":
            kwargs = dict(action="store_true", dest="no_persist_layer_norm")
        else:
            kwargs = dict(action="store_false", dest=flag[len("--no-"):].replace("-", "_"))
        group.add_argument(flag, **kwargs,
                           help="accepted: this fusion is always off here")
    # REJECTED_FLAGS are refused by training.megatron_flags.add_refused_megatron_flags, which names
    # every refused flag of a command line in one error.



def model_config_from_args(args: argparse.Namespace, error: Callable[[str], None],
                           require_dims: bool = True, vocab_from_flags: bool = False) -> SpiralConfig:
    """SpiralConfig of the parsed flags (see the module docstring); ``error`` reports a bad flag
    combination (``parser.error``: prints, exits 2). In training the vocabulary comes from the
    tokenizer (``--vocab-size`` there is NullTokenizer's), so it is ignored unless
    ``vocab_from_flags``."""
    preset = getattr(args, "preset", None)
    overrides = explicit_overrides(args, SpiralConfig)
    if not vocab_from_flags:
        overrides.pop("vocab_size", None)
    if getattr(args, "use_rotary_position_embeddings", False):
        overrides["position_embedding_type"] = "rope"  # Megatron-LM: the legacy flag wins
    backend = getattr(args, "attention_backend", "auto")
    if backend not in ("auto", "flash"):
        error(f"--attention-backend {backend}: the attention kernel is chosen by torch SDPA (local "
              "spec) or Transformer Engine; use --attention-backend auto or flash")
    num_layers = getattr(args, "num_layers", None)
    try:
        if preset:
            config = get_preset(preset, **overrides)
        else:
            if num_layers is None and "layout" not in overrides:
                error("--num-layers is required (a non-looped GPT of N layers, as Megatron-LM), or "
                      "give --spiral-layout 'N_pre+N_loopx{r_0,...}+N_post' or --preset NAME")
            missing = [flag for flag, name in (("--hidden-size", "hidden_size"),
                                               ("--num-attention-heads", "num_attention_heads"),
                                               ("--seq-length", "seq_length"))
                       if require_dims and name not in overrides]
            if missing:
                error(f"{', '.join(missing)} required without --preset (as in Megatron-LM)")
            fields = dict(MEGATRON_DEFAULTS)
            if "layout" not in overrides:
                fields["layout"] = str(num_layers)
            fields.update(overrides)
            config = SpiralConfig(**fields)
    except SpiralConfigError as err:
        error(str(err))
    tp = getattr(args, "tensor_model_parallel_size", None) or 1
    if config.query_groups % tp:
        error(f"--num-query-groups {config.query_groups} is not divisible by "
              f"--tensor-model-parallel-size {tp}: each TP rank holds whole key/value groups")
    if num_layers is not None:
        unique = parse_layout(config.layout).num_unique_layers
        if unique != num_layers:
            error(f"--num-layers {num_layers} does not match the layout {config.layout}, which has "
                  f"{unique} unique layers (N_pre + N_loop + N_post); drop --num-layers or make "
                  "them agree")
    return config


def describe_architecture(config: SpiralConfig) -> str:
    """One line saying exactly what was built (the log's model line)."""
    layout = config.parsed_layout
    kind = (f"looped {config.topology}" if layout.is_looped else "non-looped GPT")
    heads = config.num_attention_heads
    attention = (f"GQA {heads} heads/{config.query_groups} kv groups" if config.query_groups != heads
                 else f"MHA {heads} heads")
    bias = ("biases" if config.linear_bias else
            "no linear biases" + (" (QKV bias kept)" if config.add_qkv_bias else ""))
    return (f"layout={config.layout} ({kind}, {layout.num_unique_layers} unique layers) "
            f"d={config.hidden_size} {attention} head_dim={config.head_dim} "
            f"ffn={config.ffn_size} {'SwiGLU' if config.swiglu else 'GELU'} "
            f"{config.normalization}(eps={config.layernorm_epsilon:g}) {bias} "
            f"embeddings={'tied' if config.tied_embeddings else 'untied'} "
            f"dropout(hidden={config.hidden_dropout:g}, attention={config.attention_dropout:g}) "
            f"RoPE(percent={config.rotary_percent:g}, base={config.rotary_base}) "
            f"seq={config.seq_length} max_positions={config.max_positions} "
            f"embedding_scale={config.embedding_scale} output_init_depth={config.output_init_depth}"
            + (" untied core passes" if config.untie_core else ""))
