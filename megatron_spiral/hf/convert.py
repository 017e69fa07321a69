"""Megatron <-> Hugging Face conversion of SpiralFormer weights and configs.

The megatron side is a TP=1 ``SpiralGPTModel`` built with the local layer spec (checkpoints saved
with any TP size or layer spec load into it: dist_checkpointing reshards and the local spec maps
its keys onto the Transformer Engine ones). The HF side is ``modeling_spiral.SpiralFormerForCausalLM``.

Weight layout facts this module relies on (megatron-core 0.16.1):

* ``linear_qkv.weight`` is [ng * (np/ng + 2) * hn, d], grouped per query group: for each group,
  its np/ng query heads, then one key head, then one value head (``SelfAttention.
  get_query_key_value_tensors``); with MHA (ng = np) that is [q_h, k_h, v_h] per head h.
* The vocabulary is padded to ``padded_vocab_size``; the export keeps the real rows only.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import tempfile
from typing import Callable, Dict, Optional, Tuple

import torch

from megatron_spiral.hf.configuration_spiral import SpiralFormerConfig

# SpiralConfig field -> HF config attribute (where the HF name differs)
_FIELD_TO_HF = {"ffn_hidden_size": "intermediate_size", "layernorm_epsilon": "layer_norm_eps",
                "init_method_std": "initializer_range"}
# SpiralConfig fields carried by a derived HF attribute instead (see hf_config_from_spiral).
_DERIVED_FIELDS = ("transformer_impl", "untie_embeddings_and_output_weights", "group_query_attention",
                   "num_query_groups", "kv_channels", "max_position_embeddings",
                   "position_embedding_type")


def hf_config_from_spiral(spiral, tokenizer_meta: dict = None) -> SpiralFormerConfig:
    """HF config of a megatron_spiral SpiralConfig (plus token ids from checkpoint metadata)."""
    fields = dataclasses.asdict(spiral)
    kwargs = {_FIELD_TO_HF.get(k, k): v for k, v in fields.items() if k not in _DERIVED_FIELDS}
    kwargs.update(intermediate_size=spiral.ffn_size, max_position_embeddings=spiral.max_positions,
                  tie_word_embeddings=spiral.tied_embeddings, num_key_value_heads=spiral.query_groups,
                  head_dim=spiral.head_dim)
    if tokenizer_meta:
        eod, pad = tokenizer_meta.get("eod"), tokenizer_meta.get("pad")
        if eod is not None and 0 <= eod < spiral.vocab_size:
            kwargs.update(eos_token_id=eod, bos_token_id=eod)
        if pad is not None and 0 <= pad < spiral.vocab_size:
            kwargs["pad_token_id"] = pad
    return SpiralFormerConfig(**kwargs)


def spiral_fields_from_hf(config: SpiralFormerConfig) -> dict:
    """SpiralConfig keyword arguments that rebuild the megatron model of an HF config."""
    from megatron_spiral.config import SpiralConfig

    fields = {}
    for field in dataclasses.fields(SpiralConfig):
        hf_name = _FIELD_TO_HF.get(field.name, field.name)
        if field.name not in _DERIVED_FIELDS and hasattr(config, hf_name):
            fields[field.name] = getattr(config, hf_name)
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    fields.update(
        untie_embeddings_and_output_weights=not config.tie_word_embeddings,
        group_query_attention=kv_heads != heads, num_query_groups=kv_heads if kv_heads != heads else 1,
        kv_channels=None if config.head_dim * heads == config.hidden_size else config.head_dim,
        max_position_embeddings=(None if config.max_position_embeddings == config.seq_length
                                 else config.max_position_embeddings))
    default_ffn = SpiralConfig(hidden_size=fields["hidden_size"], num_attention_heads=heads, kv_channels=config.head_dim,
                               swiglu=fields.get("swiglu", False)).ffn_size
    if fields.get("ffn_hidden_size") == default_ffn:
        fields["ffn_hidden_size"] = None  # SpiralConfig's default spelling
    fields["transformer_impl"] = "local"
    return fields


def _split_qkv(weight: torch.Tensor, heads: int, groups: int) -> Tuple[torch.Tensor, ...]:
    """megatron's grouped [ng, (np/ng + 2), hn, ...] layout -> (q, k, v) in head-major order."""
    per_group = heads // groups
    hn = weight.shape[0] // (groups * (per_group + 2))
    grouped = weight.reshape((groups, per_group + 2, hn) + tuple(weight.shape[1:]))
    q = grouped[:, :per_group].reshape((heads * hn,) + tuple(weight.shape[1:]))
    k = grouped[:, per_group].reshape((groups * hn,) + tuple(weight.shape[1:]))
    v = grouped[:, per_group + 1].reshape((groups * hn,) + tuple(weight.shape[1:]))
    return q, k, v


def _merge_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, groups: int) -> torch.Tensor:
    per_group = heads // groups
    hn = q.shape[0] // heads
    rest = tuple(q.shape[1:])
    grouped = torch.cat([q.reshape((groups, per_group, hn) + rest), k.reshape((groups, 1, hn) + rest),
                         v.reshape((groups, 1, hn) + rest)], dim=1)
    return grouped.reshape((-1,) + rest)


_LAYER_MAP = {  # megatron (local spec) suffix -> HF suffix
    "input_layernorm.weight": "input_norm.weight",
    "input_layernorm.bias": "input_norm.bias",
    "self_attention.linear_proj.weight": "attn.o_proj.weight",
    "self_attention.linear_proj.bias": "attn.o_proj.bias",
    "pre_mlp_layernorm.weight": "mlp_norm.weight",
    "pre_mlp_layernorm.bias": "mlp_norm.bias",
    "mlp.linear_fc1.weight": "mlp.fc1.weight",
    "mlp.linear_fc1.bias": "mlp.fc1.bias",
    "mlp.linear_fc2.weight": "mlp.fc2.weight",
    "mlp.linear_fc2.bias": "mlp.fc2.bias",
}
_STACKS = {"decoder.pre.": "model.pre_layers.", "decoder.core.": "model.core_layers.",
           "decoder.post.": "model.post_layers."}
_UNTIED_CORE = "decoder.core.passes."  # untie_core: decoder.core.passes.{t}.layers.{i}.*


def _layer_key(key: str) -> Tuple[str, str]:
    """megatron layer parameter key -> (HF layer prefix, megatron suffix within the layer)."""
    if key.startswith(_UNTIED_CORE):
        t, rest = key[len(_UNTIED_CORE):].split(".", 1)
        index, suffix = rest[len("layers."):].split(".", 1)
        return f"model.core_passes.{t}.{index}.", suffix
    stack = next(s for s in _STACKS if key.startswith(s))
    index, suffix = key[len(stack) + len("layers."):].split(".", 1)
    return f"{_STACKS[stack]}{index}.", suffix


def megatron_to_hf_state_dict(gpt_state: Dict[str, torch.Tensor], vocab_size: int, heads: int,
                              groups: int = None) -> Dict[str, torch.Tensor]:
    """Map a TP=1 SpiralGPTModel state dict (local spec) to SpiralFormerForCausalLM keys."""
    groups = groups or heads
    out = {}
    for key, value in gpt_state.items():
        if key.endswith("_extra_state") or value is None:
            continue
        value = value.detach().clone()
        if key == "embedding.word_embeddings.weight":
            out["model.embed_tokens.weight"] = value[:vocab_size]
        elif key == "output_layer.weight":
            out["lm_head.weight"] = value[:vocab_size]
        elif key.startswith("decoder.final_layernorm."):
            out["model.final_norm." + key.rsplit(".", 1)[1]] = value
        elif key.startswith(("decoder.resamplers.", "decoder.topology.")):
            name = key[len("decoder."):]
            out["model." + name.replace("topology.", "mesh.")] = value
        elif key.startswith(tuple(_STACKS)):
            prefix, suffix = _layer_key(key)
            if suffix.startswith("self_attention.linear_qkv."):
                kind = suffix.rsplit(".", 1)[1]
                out[f"{prefix}attn.qkv_proj.{kind}"] = torch.cat(_split_qkv(value, heads, groups), dim=0)
            elif suffix in _LAYER_MAP:
                out[prefix + _LAYER_MAP[suffix]] = value
            else:
                raise KeyError(f"unexpected megatron parameter {key}; the converter does not know it")
        else:
            raise KeyError(f"unexpected megatron parameter {key}; the converter does not know it")
    return out


def hf_to_megatron_state_dict(hf_state: Dict[str, torch.Tensor], gpt_state: Dict[str, torch.Tensor],
                              heads: int, groups: int = None) -> Dict[str, torch.Tensor]:
    """Inverse mapping onto the keys/shapes of ``gpt_state`` (a freshly built TP=1 model).

    Padded vocabulary rows keep the values in ``gpt_state`` (the fresh model's initialization)."""
    groups = groups or heads
    wanted = megatron_to_hf_state_dict(
        {k: v for k, v in gpt_state.items() if v is not None and not k.endswith("_extra_state")},
        vocab_size=hf_state["model.embed_tokens.weight"].shape[0], heads=heads, groups=groups)
    if "output_layer.weight" not in gpt_state:  # tied: an HF lm_head copy carries no new weights
        hf_state = {k: v for k, v in hf_state.items() if k != "lm_head.weight"}
    missing = sorted(set(wanted) - set(hf_state))
    unexpected = sorted(set(hf_state) - set(wanted))
    if missing or unexpected:
        raise KeyError(f"HF weights do not match the model described by config.json: missing "
                       f"{missing[:5]}{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}")
    out = {}
    for key, value in gpt_state.items():
        if key.endswith("_extra_state") or value is None:
            continue
        new = value.detach().clone()
        if key in ("embedding.word_embeddings.weight", "output_layer.weight"):
            source = hf_state["model.embed_tokens.weight" if key.startswith("embedding") else "lm_head.weight"]
            new[: source.shape[0]] = source
        elif key.startswith("decoder.final_layernorm."):
            new = hf_state["model.final_norm." + key.rsplit(".", 1)[1]]
        elif key.startswith(("decoder.resamplers.", "decoder.topology.")):
            new = hf_state["model." + key[len("decoder."):].replace("topology.", "mesh.")]
        else:
            prefix, suffix = _layer_key(key)
            if suffix.startswith("self_attention.linear_qkv."):
                kind = suffix.rsplit(".", 1)[1]
                fused = hf_state[f"{prefix}attn.qkv_proj.{kind}"]
                q_rows = fused.shape[0] * heads // (heads + 2 * groups)
                kv_rows = (fused.shape[0] - q_rows) // 2
                new = _merge_qkv(*torch.split(fused, [q_rows, kv_rows, kv_rows]), heads=heads, groups=groups)
            else:
                new = hf_state[prefix + _LAYER_MAP[suffix]]
        if tuple(new.shape) != tuple(value.shape):
            raise ValueError(f"{key}: HF tensor has shape {tuple(new.shape)}, megatron expects {tuple(value.shape)}")
        out[key] = new.to(value.dtype)
    return out


def hf_model_from_megatron(spiral_lm, tokenizer_meta: dict = None):
    """An in-memory SpiralFormerForCausalLM holding the weights of a TP=1 megatron SpiralLM."""
    from megatron_spiral.hf.modeling_spiral import SpiralFormerForCausalLM

    config = hf_config_from_spiral(spiral_lm.config, tokenizer_meta)
    model = SpiralFormerForCausalLM(config)
    state = megatron_to_hf_state_dict(spiral_lm.gpt.state_dict(), spiral_lm.config.vocab_size,
                                      spiral_lm.config.num_attention_heads, spiral_lm.config.query_groups)
    if config.tie_word_embeddings:  # megatron has no output_layer.weight: it reads the embedding
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state, strict=True)
    return model.to(next(spiral_lm.gpt.parameters()).device).eval()


# ============================================================================ whole-directory conversion
HF_CODE_FILES = (
    "configuration_spiral.py", "equations_spiral.py", "modeling_spiral.py", "cache_spiral.py")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ConversionError(RuntimeError):
    """A conversion cannot proceed; the message says what to fix."""


def _say(progress: Optional[Callable[[str], None]], message: str) -> None:
    if progress is not None:
        progress(message)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_hf_directory(model, directory: str, tokenizer_dir: Optional[str] = None) -> None:
    """save_pretrained + the self-contained code files (+ tokenizer files) into ``directory``."""
    model.config.auto_map = {"AutoConfig": "configuration_spiral.SpiralFormerConfig",
                             "AutoModel": "modeling_spiral.SpiralFormerModel",
                             "AutoModelForCausalLM": "modeling_spiral.SpiralFormerForCausalLM"}
    model.config.architectures = ["SpiralFormerForCausalLM"]
    model.save_pretrained(directory, safe_serialization=True)
    here = os.path.dirname(os.path.abspath(__file__))
    for name in HF_CODE_FILES:
        shutil.copy2(os.path.join(here, name), os.path.join(directory, name))
    if tokenizer_dir is not None:
        for name in os.listdir(tokenizer_dir):
            source = os.path.join(tokenizer_dir, name)
            if os.path.isfile(source):
                shutil.copy2(source, os.path.join(directory, name))
        from megatron_spiral.tokenizer import apply_hf_decoder_defaults

        apply_hf_decoder_defaults(directory)  # left padding + pad token, also for older checkpoints
    for name in os.listdir(directory):
        os.chmod(os.path.join(directory, name), 0o666 & ~_umask())


def load_megatron_model(path: str, device: str = "cpu"):
    """(SpiralLM at TP=1 with the checkpoint's weights, checkpoint metadata, iter_* directory)."""
    from megatron_spiral.api import build_model
    from megatron_spiral.checkpointing import load_model_weights, read_metadata, resolve_checkpoint

    ckpt_dir, _ = resolve_checkpoint(path)
    metadata = read_metadata(ckpt_dir)
    from megatron_spiral.config import LEGACY_RECIPE

    # metadata written before the recipe fields existed means the old recipe, not today's default
    fields = {**LEGACY_RECIPE, **metadata["model"], "transformer_impl": "local"}
    model = build_model(preset="tiny", device=device, **fields)
    load_model_weights(model.gpt, ckpt_dir)
    return model.eval(), metadata, ckpt_dir


def _prepare_output_dir(out_dir: str, force: bool) -> None:
    if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
        if not force:
            raise ConversionError(f"{out_dir} already exists and is not empty; choose another "
                                  "directory or pass --force to replace it")


def _publish_dir(staging: str, out_dir: str) -> None:
    """Move a finished export into place (replacing an old one only after it is complete)."""
    backup = None
    if os.path.exists(out_dir):
        backup = out_dir.rstrip("/") + ".old-" + os.path.basename(staging)
        os.replace(out_dir, backup)
    os.replace(staging, out_dir)
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)


def export_to_hf(load: str, out_dir: str, dtype: str = "float32", force: bool = False,
                 verify: bool = True, progress: Optional[Callable[[str], None]] = None) -> dict:
    """Megatron checkpoint -> Hugging Face directory (config.json with auto_map, the three code
    files, model.safetensors, generation_config.json, tokenizer files when known).

    Written to a temporary sibling directory and renamed into place when complete. Returns a
    summary dict (``max_abs_diff`` of the verification, when run)."""
    from megatron_spiral.hf.modeling_spiral import SpiralFormerForCausalLM

    if dtype not in _DTYPES:
        raise ConversionError(f"--dtype {dtype!r}: choose one of {', '.join(_DTYPES)}")
    out_dir = os.path.abspath(out_dir)
    _prepare_output_dir(out_dir, force)
    _say(progress, f"[1/4] loading megatron checkpoint {load} (built at TP=1)")
    spiral_lm, metadata, ckpt_dir = load_megatron_model(load)
    tokenizer_meta = metadata.get("tokenizer")
    _say(progress, "[2/4] converting weights (dropping padded vocabulary rows)")
    model = hf_model_from_megatron(spiral_lm, tokenizer_meta).to(_DTYPES[dtype])
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".tmp-" + os.path.basename(out_dir) + "-", dir=parent)
    os.chmod(staging, 0o777 & ~_umask())  # mkdtemp's 0700 would make the export private
    summary = {"checkpoint": ckpt_dir, "output": out_dir, "vocab_size": spiral_lm.config.vocab_size,
               "padded_vocab_size": spiral_lm.config.padded_vocab_size, "dtype": dtype}
    try:
        _say(progress, f"[3/4] writing {out_dir}")
        tok_dir = os.path.join(ckpt_dir, (tokenizer_meta or {}).get("directory") or "tokenizer")
        summary["tokenizer"] = os.path.isdir(tok_dir)
        write_hf_directory(model, staging, tok_dir if os.path.isdir(tok_dir) else None)
        if verify:
            _say(progress, "[4/4] verifying: reloading the export and comparing logits with megatron")
            reloaded = SpiralFormerForCausalLM.from_pretrained(staging, dtype=torch.float32).eval()
            length = min(spiral_lm.config.seq_length, 64)
            ids = torch.randint(0, spiral_lm.config.vocab_size, (2, length),
                                generator=torch.Generator().manual_seed(0))
            with torch.no_grad():
                want = spiral_lm(ids)[..., : spiral_lm.config.vocab_size].float()
                got = reloaded(ids, use_cache=False).logits.float()
                decoded = reloaded(ids, use_cache=True).logits.float()  # Algorithm-2 prefill path
            diff = max((want - got).abs().max().item(), (want - decoded).abs().max().item())
            summary["max_abs_diff"] = diff
            limit = 1e-4 if dtype == "float32" else 0.25
            if not diff <= limit:
                raise ConversionError(f"verification failed: HF logits differ from megatron's by {diff:.3g} "
                                      f"(limit {limit}); nothing was written")
        else:
            _say(progress, "[4/4] skipping verification")
        _publish_dir(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return summary


def _load_hf_state(hf_dir: str) -> Dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    single = os.path.join(hf_dir, "model.safetensors")
    index = os.path.join(hf_dir, "model.safetensors.index.json")
    if os.path.isfile(single):
        return load_file(single)
    if os.path.isfile(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
        state = {}
        for name in files:
            state.update(load_file(os.path.join(hf_dir, name)))
        return state
    raise ConversionError(f"{hf_dir} has no model.safetensors (or model.safetensors.index.json); "
                          "re-save the model with save_pretrained(..., safe_serialization=True)")


def _hf_tokenizer(hf_dir: str, config: SpiralFormerConfig, progress):
    """A megatron_spiral HuggingFaceTokenizer for ``hf_dir/tokenizer.json``, or None."""
    path = os.path.join(hf_dir, "tokenizer.json")
    if not os.path.isfile(path):
        return None
    try:
        from tokenizers import Tokenizer

        from megatron_spiral.tokenizer import HuggingFaceTokenizer

        backend = Tokenizer.from_file(path)
        name = lambda i: None if i is None else backend.id_to_token(int(i))  # noqa: E731
        return HuggingFaceTokenizer(backend, eod_token=name(config.eos_token_id),
                                    pad_token=name(getattr(config, "pad_token_id", None)))
    except Exception as err:  # the checkpoint is still useful without its tokenizer
        _say(progress, f"note: tokenizer.json not carried over ({err}); pass the tokenizer flags when training")
        return None


def import_from_hf(hf_dir: str, save_dir: str, force: bool = False,
                   progress: Optional[Callable[[str], None]] = None) -> str:
    """Hugging Face directory -> megatron checkpoint (iteration 0, model weights only) that
    ``pretrain_spiral.py --load`` continues from with fresh optimizer state."""
    from megatron_spiral.api import build_model
    from megatron_spiral.checkpointing import TRACKER_FILE, save_sharded_checkpoint

    config_path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(config_path):
        raise ConversionError(f"{hf_dir} has no config.json; --load-hf expects a directory written by "
                              "convert_checkpoint.py --save-hf (or save_pretrained)")
    with open(config_path) as f:
        model_type = json.load(f).get("model_type")
    if model_type != SpiralFormerConfig.model_type:
        raise ConversionError(f"{config_path} has model_type={model_type!r}, not 'spiralformer'")
    if os.path.isfile(os.path.join(save_dir, TRACKER_FILE)) and not force:
        raise ConversionError(f"{save_dir} already holds a checkpoint; choose another --save directory "
                              "or pass --force to overwrite iteration 0")
    _say(progress, f"[1/3] reading {hf_dir}")
    config = SpiralFormerConfig.from_pretrained(hf_dir)
    hf_state = {k: v.float() for k, v in _load_hf_state(hf_dir).items()}
    fields = spiral_fields_from_hf(config)
    _say(progress, "[2/3] building the megatron model at TP=1 and mapping weights")
    model = build_model(preset="tiny", device="cpu", **fields)
    full = model.gpt.state_dict()
    full.update(hf_to_megatron_state_dict(hf_state, full, config.num_attention_heads,
                                          config.num_key_value_heads))
    model.gpt.load_state_dict(full)
    _say(progress, f"[3/3] writing megatron checkpoint {save_dir}")
    tokenizer = _hf_tokenizer(hf_dir, config, progress)
    return save_sharded_checkpoint(save_dir, 0, {"model": model.gpt.sharded_state_dict()},
                                   model.config.to_dict(), tokenizer=tokenizer)


def progress_to_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
