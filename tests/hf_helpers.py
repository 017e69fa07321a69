"""Shared helpers of the Hugging Face export / decoding tests (tiny models, fp32, CPU)."""

import contextlib
import os

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def one_cpu_thread():
    """Tiny models on a shared 2-core box: OpenMP threads contending with other processes made
    decode steps ~40x slower in our measurements; one thread per test process avoids that."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

# Covers anchor + MeSH, both down- and up-scaling operators, both shift modes plus an integer
# shift, both offsets; with a 4-iteration schedule g = 8, 4, 2, 1 (the partial first chunk under
# the half offset has 4, 2, 1 real tokens).
LAYOUT = "1+2x{1/8,1/4,1/2,1}+1"
KNOB_SETS = [
    dict(topology="mesh"),  # paper default: self-aggregation, router, overlap, half offset
    dict(topology="anchor"),
    dict(topology="mesh", downscale="mean", upscale="uniform"),
    dict(topology="anchor", downscale="self_aggregation", upscale="uniform", shift="parallel"),
    dict(topology="mesh", downscale="mean", upscale="router", chunk_offset="zero"),
    dict(topology="mesh", shift="parallel", chunk_offset="zero"),
    dict(topology="anchor", downscale="mean", shift="9"),
    dict(topology="mesh", shift="8", chunk_offset="zero", upscale="uniform"),
]


def knob_id(knobs):
    return "-".join(f"{k}={v}" for k, v in knobs.items())


def perturb_(module, scale=0.1, seed=0):
    """Add seeded noise to every parameter (biases and norms would otherwise be 0 / 1)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.add_(torch.randn(param.shape, generator=gen) * scale)
    return module


def hf_model(seed=0, scale=0.15, **config):
    """A randomly perturbed tiny SpiralFormerForCausalLM (no megatron involved)."""
    from megatron_spiral.hf.configuration_spiral import SpiralFormerConfig
    from megatron_spiral.hf.modeling_spiral import SpiralFormerForCausalLM

    kwargs = dict(layout=LAYOUT, hidden_size=32, num_attention_heads=4, vocab_size=61)
    kwargs.update(config)
    torch.manual_seed(seed)
    return perturb_(SpiralFormerForCausalLM(SpiralFormerConfig(**kwargs)), scale, seed).eval()


def megatron_model(seed=0, scale=0.1, **overrides):
    """A perturbed tiny megatron SpiralLM (TP=1, fp32)."""
    from megatron_spiral import build_model

    kwargs = dict(layout=LAYOUT, hidden_size=32, num_attention_heads=4, vocab_size=61, seq_length=48)
    kwargs.update(overrides)
    return perturb_(build_model("tiny", seed=seed, **kwargs).eval(), scale, seed)


def write_export(model, directory, tokenizer_dir=None):
    from megatron_spiral.hf.convert import write_hf_directory

    write_hf_directory(model, str(directory), tokenizer_dir)
    return str(directory)


@contextlib.contextmanager
def env(**values):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update({k: str(v) for k, v in values.items()})
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def decode_logits(model, ids, prompt_len, schedule="inline", run_deferred_every=0):
    """Logits [1, L, V] from a batched prefill of ``prompt_len`` tokens, then one token per step."""
    cache = model.new_cache(schedule)
    with torch.no_grad():
        out = [model(ids[:, :prompt_len], past_key_values=cache, use_cache=True).logits]
        for i in range(prompt_len, ids.shape[1]):
            out.append(model(ids[:, i:i + 1], past_key_values=cache, use_cache=True).logits)
            if run_deferred_every and i % run_deferred_every == 0:
                cache.run_deferred()
    cache.close()
    return torch.cat(out, dim=1), cache
