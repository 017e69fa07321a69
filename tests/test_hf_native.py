"""The export behaves like a native transformers model (issue 11), on a tiny export.

Each test pins one transformers 5.x convention through transformers' public API: the cache kwarg
and output field are named ``cache`` (``past_key_values`` still accepted), attention
implementations are declared on the class, gradient checkpointing, ``num_items_in_batch`` loss
normalisation, ``output_hidden_states`` / ``inputs_embeds`` / ``position_ids``, clear errors for
what SpiralCache cannot do, and a left-padding tokenizer loadable without model code.
"""

import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")

from hf_helpers import hf_model, one_cpu_thread, write_export  # noqa: E402, F401

# the output field holding the cache: ``cache`` from transformers 5.24, ``past_key_values`` before
CACHE_FIELD = "cache" if "cache" in __import__("transformers").modeling_outputs.CausalLMOutputWithPast.__dataclass_fields__ \
    else "past_key_values"
VOCAB = 59  # NullTokenizer(59): ids 0..58, <eod> = 59, <pad> = 60 (the model's vocabulary is 61)


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    from megatron_spiral.tokenizer import NullTokenizer

    root = tmp_path_factory.mktemp("native")
    NullTokenizer(VOCAB).save_hf(str(root / "tok"))
    model = hf_model(seed=3, scale=0.3, eos_token_id=VOCAB, pad_token_id=VOCAB + 1)
    return model, write_export(model, root / "export", str(root / "tok"))


def _ids(shape, seed=0):
    return torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------ 1. batched generation, padding
def test_batched_generate_with_exported_tokenizer_defaults(export):
    """Exported tokenizer pads on the left; generate(**batch) gives every prompt the tokens it gets alone."""
    from transformers import AutoTokenizer

    model, path = export
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=True)
    assert tokenizer.padding_side == "left" and tokenizer.pad_token == "<pad>"
    prompts = ["1 2 3 4 5 6 7 8 9 10 11", "4 5"]
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    assert "token_type_ids" not in batch
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=8, do_sample=False, eos_token_id=None)
    for row, prompt in enumerate(prompts):
        alone = tokenizer(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            want = model.generate(alone, max_new_tokens=8, do_sample=False, eos_token_id=None)
        assert out[row, batch.input_ids.shape[1]:].tolist() == want[0, alone.shape[1]:].tolist()


def test_padding_columns_get_the_logits_of_a_real_token():
    """A right-padding column repeats the logits of the last real token (not all-zero logits, whose
    argmax is id 0); so right-padded generate continues each prompt too."""
    model = hf_model(seed=1)
    ids = _ids((2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 5:] = 0
    with torch.no_grad():
        logits = model(ids, attention_mask=mask, use_cache=False).logits
        alone = model(ids[1:, :5], use_cache=False).logits
        right = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
        want = model.generate(ids[1:, :5], max_new_tokens=4, do_sample=False)
    assert torch.allclose(logits[1, :5], alone[0], atol=1e-5)
    for col in range(5, 9):
        assert torch.equal(logits[1, col], logits[1, 4])
    assert right[1, 9:].tolist() == want[0, 5:].tolist()


# ------------------------------------------------------------------ 2. cache API of transformers 5.x
def test_cache_kwarg_and_output_field():
    """model(x, cache=c) continues c (was: swallowed and treated as position 0); the output field is
    ``cache`` (``past_key_values`` before transformers 5.24); the old ``past_key_values`` kwarg gives
    the same logits."""
    model = hf_model(seed=2)
    ids = _ids((1, 20), seed=1)
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        first = model(ids[:, :12], use_cache=True)
        assert type(getattr(first, CACHE_FIELD)).__name__ == "SpiralCache"
        rest = model(ids[:, 12:], cache=getattr(first, CACHE_FIELD)).logits
        old_cache = model.new_cache()
        model(ids[:, :12], past_key_values=old_cache)
        old = model(ids[:, 12:], past_key_values=old_cache).logits
    assert (rest - full[:, 12:]).abs().max().item() <= 1e-4
    assert torch.equal(old, rest)
    with pytest.raises(ValueError, match="once"):
        model(ids, cache=model.new_cache(), past_key_values=model.new_cache())


@pytest.mark.parametrize("name", ["cache", "past_key_values"])
def test_generate_with_a_user_made_cache(name):
    """generate(cache=model.new_cache(coarse_schedule=...)) is used, not rejected as an unused kwarg."""
    model = hf_model(seed=4, shift="parallel")
    prompt = _ids((2, 7), seed=2)
    cache = model.new_cache(coarse_schedule="deferred")
    with torch.no_grad():
        got = model.generate(prompt, max_new_tokens=10, do_sample=False, **{name: cache})
        want = model.generate(prompt, max_new_tokens=10, do_sample=False, use_cache=False)
    assert got.tolist() == want.tolist()
    assert cache.get_seq_length() == 7 + 9 and sum(cache.coarse_passes) > 0  # the user's cache did the work


_PLAIN_SCRIPT = r"""
import logging, sys, warnings
warnings.simplefilter("always")
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
path = sys.argv[1]
model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)
tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=True)
batch = tokenizer(["1 2 3 4 5", "6 7"], return_tensors="pt", padding=True)
with torch.no_grad():
    out = model(**batch)
    print(type(out.cache if "cache" in out.__dataclass_fields__ else out.past_key_values).__name__)
    print(model.generate(**batch, max_new_tokens=5, do_sample=False).shape)
"""


def test_plain_load_forward_generate_prints_no_deprecation_warning(export, tmp_path):
    """The README flow (from_pretrained, forward, batched generate) prints no deprecation warning
    (was: `past_key_values`/`cache_params` are deprecated on every run)."""
    _, path = export
    env = dict(os.environ, HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1",
               OMP_NUM_THREADS="1", TRANSFORMERS_VERBOSITY="info")
    proc = subprocess.run([sys.executable, "-c", _PLAIN_SCRIPT, path], capture_output=True, text=True,
                          env=env, cwd=str(tmp_path), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.splitlines()[0] == "SpiralCache"
    text = (proc.stdout + proc.stderr).lower()
    assert "deprecat" not in text, proc.stderr[-3000:]


# ------------------------------------------------------------------ 3. attention implementations
def test_sdpa_and_eager_give_equal_logits(export):
    from transformers import AutoModelForCausalLM

    _, path = export
    ids = _ids((2, 26), seed=3)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    logits = {}
    for impl in ("sdpa", "eager"):
        model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, attn_implementation=impl)
        with torch.no_grad():
            full = model(ids, attention_mask=mask, use_cache=False).logits
            cache = model.new_cache()
            model(ids[:, :20], attention_mask=mask[:, :20], cache=cache)
            step = model(ids[:, 20:], attention_mask=mask, cache=cache).logits
        logits[impl] = (full, step)
    for a, b in zip(logits["sdpa"], logits["eager"]):
        assert (a - b).abs().max().item() <= 1e-4
    assert (logits["sdpa"][1] - logits["sdpa"][0][:, 20:]).abs().max().item() <= 1e-4


def test_flash_attention_gives_transformers_error(export):
    from transformers import AutoModelForCausalLM

    _, path = export
    with pytest.raises((ValueError, ImportError), match="(?i)flash"):
        AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, attn_implementation="flash_attention_2")


# ------------------------------------------------------------------ 4. gradient checkpointing
def _grads(model, ids):
    model.zero_grad()
    model(ids, labels=ids).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_gradient_checkpointing_gives_equal_gradients():
    """gradient_checkpointing_enable() works (was: supports_gradient_checkpointing = False) and
    recomputes the layers in backward, with the same gradients."""
    model = hf_model(seed=5).train()
    ids = _ids((2, 24), seed=4)
    want = _grads(model, ids)
    calls = []
    # the layer's first module: torch's non-reentrant recompute stops early, after the last saved tensor
    model.model.core_layers[0].input_norm.register_forward_hook(lambda *a: calls.append(1))
    _grads(model, ids)
    plain_calls = len(calls)
    # activation_checkpointing_enable is 5.24's name; gradient_checkpointing_enable the older (deprecated) one
    getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)()
    assert model.is_gradient_checkpointing
    calls.clear()
    got = _grads(model, ids)
    assert len(calls) == 2 * plain_calls  # every core-layer call ran again in backward
    assert want.keys() == got.keys() and len(want) == len(list(model.parameters()))
    for name in want:
        assert torch.allclose(want[name], got[name], atol=1e-6), name


# ------------------------------------------------------------------ 5. num_items_in_batch
def test_num_items_in_batch_normalises_the_loss():
    """With num_items_in_batch the loss is sum(token CE) / num_items_in_batch (transformers' ForCausalLM loss)."""
    model = hf_model(seed=6)
    ids = _ids((2, 16), seed=5)
    labels = ids.clone()
    labels[1, 10:] = -100
    with torch.no_grad():
        logits = model(ids, use_cache=False).logits
        mean = model(ids, labels=labels, use_cache=False).loss
        scaled = model(ids, labels=labels, num_items_in_batch=torch.tensor(100), use_cache=False).loss
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                           ignore_index=-100, reduction="sum")
    real = int((labels[:, 1:] != -100).sum())
    assert mean.item() == pytest.approx(ce.item() / real, rel=1e-5)
    assert scaled.item() == pytest.approx(ce.item() / 100, rel=1e-5)


def test_trainer_loss_with_gradient_accumulation_is_the_batch_mean(tmp_path):
    """Trainer, 4 accumulation steps of 2 rows of unequal length: the logged loss is the token mean
    over the 8 rows and the step's gradient that of the batch mean (was: 4x)."""
    from transformers import Trainer, TrainerCallback, TrainingArguments

    model = hf_model(seed=7).train()
    rows = []
    for i in range(8):
        length = 6 + 3 * i
        ids = _ids((1, 30), seed=10 + i)[0]
        labels = ids.clone()
        labels[length:] = -100
        rows.append({"input_ids": ids, "labels": labels, "attention_mask": torch.ones(30, dtype=torch.long)})
    batch = {k: torch.stack([r[k] for r in rows]) for k in rows[0]}
    with torch.no_grad():
        want = model(**batch, use_cache=False).loss.item()
    model.zero_grad()
    model(**batch, use_cache=False).loss.backward()
    want_grad = model.lm_head.weight.grad.clone()
    model.zero_grad()

    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=4,
                             max_steps=1, learning_rate=0.0, logging_steps=1, report_to=[], save_strategy="no",
                             use_cpu=True, max_grad_norm=0.0, disable_tqdm=True)
    grads = []

    class KeepGradient(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            grads.append(model.lm_head.weight.grad.clone())

    trainer = Trainer(model=model, args=args, train_dataset=rows, callbacks=[KeepGradient()])
    trainer.train()
    logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert logged and logged[0] == pytest.approx(want, rel=1e-3)
    assert len(grads) == 1 and torch.allclose(grads[0], want_grad, atol=1e-6)


# ------------------------------------------------------------------ 7. hidden states, embeds, positions
def test_output_hidden_states_one_entry_per_stage():
    """Embeddings, each f_pre layer, each loop iteration (full resolution), each f_post layer; the
    last is the final-norm output. Cached prefill returns the same states."""
    model = hf_model(seed=8)
    ids = _ids((2, 21), seed=6)
    with torch.no_grad():
        full = model(ids, use_cache=False, output_hidden_states=True)
        cached = model(ids, use_cache=True, output_hidden_states=True)
        base = model.model(ids, use_cache=False).last_hidden_state
        emb = model.get_input_embeddings()(ids)
    config = model.config
    assert len(full.hidden_states) == 1 + config.num_pre_layers + config.num_iterations + config.num_post_layers
    assert torch.equal(full.hidden_states[0], emb)
    assert torch.equal(full.hidden_states[-1], base)
    for a, b in zip(full.hidden_states, cached.hidden_states):
        assert (a - b).abs().max().item() <= 1e-4
    assert all((a - b).abs().max() > 1e-3 for a, b in zip(full.hidden_states, full.hidden_states[1:]))


def test_inputs_embeds_equal_input_ids_forward_and_generate():
    model = hf_model(seed=9)
    ids = _ids((2, 11), seed=7)
    with torch.no_grad():
        embeds = model.get_input_embeddings()(ids)
        assert torch.equal(model(inputs_embeds=embeds, use_cache=False).logits, model(ids, use_cache=False).logits)
        from_embeds = model.generate(inputs_embeds=embeds, max_new_tokens=6, do_sample=False)
        from_ids = model.generate(ids, max_new_tokens=6, do_sample=False)
    assert from_embeds.tolist() == from_ids[:, 11:].tolist()
    with pytest.raises(ValueError, match="exactly one"):
        model(ids, inputs_embeds=embeds)


def test_position_ids_checked_not_ignored():
    model = hf_model(seed=10)
    ids = _ids((2, 10), seed=8)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        want = model(ids, attention_mask=mask, use_cache=False).logits
        assert torch.equal(model(ids, attention_mask=mask, position_ids=positions, use_cache=False).logits, want)
        with pytest.raises(ValueError, match="position_ids"):
            model(ids, position_ids=torch.arange(5, 15)[None], use_cache=False)
        cache = model.new_cache()
        model(ids[:, :6], cache=cache)
        model(ids[:, 6:], cache=cache, position_ids=torch.arange(6, 10)[None])
        with pytest.raises(ValueError, match="position_ids"):
            model(ids[:, :1], cache=cache, position_ids=torch.tensor([[0]]))


def test_unsupported_arguments_raise():
    """Nothing is silently ignored: unknown kwargs, output_attentions, cache_implementation and
    assisted / prompt-lookup decoding (needs Cache.crop) raise clear errors."""
    model = hf_model(seed=11)
    ids = _ids((1, 8), seed=9)
    with pytest.raises(TypeError, match="unsupported arguments \\['head_mask'\\]"):
        model(ids, head_mask=torch.ones(1))
    with pytest.raises(ValueError, match="attention weights"):
        model(ids, output_attentions=True)
    with pytest.raises(ValueError, match="cache_implementation='static'"):
        model.generate(ids, max_new_tokens=3, cache_implementation="static")
    with pytest.raises(ValueError, match="crop"):
        model.generate(ids, max_new_tokens=3, prompt_lookup_num_tokens=2, do_sample=False)
    with pytest.raises(ValueError, match="crop"):
        model.generate(ids, max_new_tokens=3, assistant_model=hf_model(seed=12), do_sample=False)


# ------------------------------------------------------------------ 8. tokenizer without model code
def test_tokenizer_is_a_plain_fast_tokenizer(export):
    """The exported tokenizer needs no model code: transformers' own fast class loads it, left
    padding and pad token included."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    _, path = export
    for tokenizer in (PreTrainedTokenizerFast.from_pretrained(path),
                      AutoTokenizer.from_pretrained(path, trust_remote_code=False)):
        assert type(tokenizer).__module__.startswith("transformers.")
        assert tokenizer.padding_side == "left" and tokenizer.pad_token_id == VOCAB + 1
        assert tokenizer(["1 2 3", "4"], padding=True).input_ids == [[1, 2, 3], [VOCAB + 1, VOCAB + 1, 4]]


def test_tokenizer_without_pad_gets_eos_as_pad(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from megatron_spiral.tokenizer import HuggingFaceTokenizer, apply_hf_decoder_defaults

    tok = Tokenizer(models.WordLevel({"a": 0, "b": 1, "<|endoftext|>": 2}, unk_token="a"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    HuggingFaceTokenizer(tok).save_hf(str(tmp_path / "t"))
    loaded = PreTrainedTokenizerFast.from_pretrained(str(tmp_path / "t"))
    assert loaded.pad_token == "<|endoftext|>" and loaded.padding_side == "left"
    # tokenizer files of an older checkpoint (no padding side) get the defaults when exported
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "tokenizer_config.json").write_text('{"eos_token": "</s>", "padding_side": "right"}')
    apply_hf_decoder_defaults(str(tmp_path / "old"))
    import json

    config = json.loads((tmp_path / "old" / "tokenizer_config.json").read_text())
    assert config["pad_token"] == "</s>" and config["padding_side"] == "right"  # an explicit choice is kept
    assert config["model_input_names"] == ["input_ids", "attention_mask"]
