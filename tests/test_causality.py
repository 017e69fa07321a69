"""Strict causality (the contract): changing tokens >= j never changes logits < j.

Every combination of topology x down-scale x up-scale x shift x offset, on schedules with
non-power-of-two chunk sizes and sequence lengths not divisible by them.
"""

import itertools

import pytest
import torch

from megatron_spiral import build_model

KNOBS = list(itertools.product(("anchor", "mesh"), ("self_aggregation", "mean"), ("router", "uniform"),
                               ("overlap", "parallel"), ("half", "zero")))
SCHEDULE = "1+1x{1/3,1/6,1/4,1}+1"  # chunk sizes 3, 6, 4, 1
LENGTH = 29  # divisible by none of them


def _assert_causal(model, length, cut_points, seed=0):
    gen = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    base = torch.randint(0, vocab, (2, length), generator=gen)
    with torch.no_grad():
        reference = model(base)
        for j in cut_points:
            changed = base.clone()
            changed[:, j:] = torch.randint(0, vocab, (2, length - j), generator=gen)
            logits = model(changed)
            torch.testing.assert_close(logits[:, :j], reference[:, :j], rtol=0, atol=1e-5,
                                       msg=lambda m: f"position < {j} saw the future: {m}")
            assert not torch.allclose(logits[:, j:], reference[:, j:]), "perturbation had no effect"


def _tiny(**knobs):
    # A large init std makes any leak visible far above float noise.
    return build_model("tiny", layout=SCHEDULE, hidden_size=32, num_attention_heads=2,
                       vocab_size=64, seq_length=64, init_method_std=0.3, **knobs).eval()


@pytest.mark.parametrize("topology,downscale,upscale,shift,offset", KNOBS)
def test_every_knob_combination_is_strictly_causal(topology, downscale, upscale, shift, offset):
    model = _tiny(topology=topology, downscale=downscale, upscale=upscale, shift=shift, chunk_offset=offset)
    _assert_causal(model, LENGTH, cut_points=(1, 5, 6, 11, 17, 24, 28))


@pytest.mark.parametrize("layout", ["2+1x{1/8,1/4,1/2,1}+1", "1+2x{1,1/2,1/4,1/8}+1", "0+1x{1/5,1/7}+0"])
@pytest.mark.parametrize("length", [23, 64])
def test_schedules_orders_and_lengths(layout, length):
    model = build_model("tiny", layout=layout, hidden_size=32, num_attention_heads=2, vocab_size=64,
                        seq_length=64, init_method_std=0.3).eval()
    _assert_causal(model, length, cut_points=(1, 3, 7, 8, 15, length - 1))


def test_integer_shift_at_threshold_is_causal():
    model = _tiny(shift="5")  # max g - 1 = 5
    _assert_causal(model, LENGTH, cut_points=(2, 9, 20))


def test_detector_catches_a_shift_below_proposition1():
    """Negative control: with s_t = g_t - 2 the same check must fail (else the test proves nothing)."""
    model = _tiny(shift="overlap", chunk_offset="zero")
    for resampler in model.gpt.decoder.resamplers:
        if resampler.chunk_size > 2:
            resampler.shift = resampler.chunk_size - 2
    with pytest.raises(AssertionError, match="saw the future"):
        _assert_causal(model, LENGTH, cut_points=tuple(range(1, LENGTH)))
