"""Chunk-triggered incremental decoding (Algorithm 2) is exact.

Logits from a batched prefill plus token-by-token decoding equal the full forward's at every
position (fp32), for every knob set, for prompts of every length modulo the largest chunk size
(including prompts shorter than the partial first chunk under the half offset); the coarse path
runs exactly when a chunk closes; deferring coarse work (no-overlap regime, App. E) changes
where it runs, not the result.
"""

import pytest
import torch

pytest.importorskip("transformers")

from hf_helpers import one_cpu_thread, KNOB_SETS, decode_logits, hf_model, knob_id, megatron_model  # noqa: E402, F401

LENGTH = 27
PROMPT_LENGTHS = range(1, 10)  # every residue modulo g = 8, and prompts inside chunk 0


@pytest.mark.parametrize("knobs", KNOB_SETS, ids=knob_id)
def test_prefill_plus_decode_matches_full_forward(knobs):
    model = hf_model(**knobs)
    ids = torch.randint(0, 61, (1, LENGTH), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
    assert full.std() > 0.1
    for prompt in PROMPT_LENGTHS:
        got, _ = decode_logits(model, ids, prompt)
        diff = (got - full).abs().max().item()
        assert diff <= 1e-4, f"prompt length {prompt}: max |diff| {diff}"


def test_decoding_matches_megatron_forward():
    """Close the loop on the training model: decode with megatron's weights, compare with the
    megatron forward itself (default knobs: MeSH, self-aggregation, router, overlap, half)."""
    from megatron_spiral.inference import to_hf

    mega = megatron_model()
    model = to_hf(mega)
    ids = torch.randint(0, 61, (2, 34), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = mega(ids)[..., :61]
    for prompt in (1, 3, 8, 13):
        got = torch.cat([decode_logits(model, ids[row:row + 1], prompt)[0] for row in range(2)])
        assert (got - want).abs().max().item() <= 1e-4


def _closings(g, omega, start, stop):
    """Positions in [start, stop) whose arrival closes a chunk: rho = g - 1 (eq. 31)."""
    return sum(1 for i in range(start, stop) if (i + omega) % g == g - 1)


@pytest.mark.parametrize("offset", ["half", "zero"])
def test_coarse_path_runs_only_when_a_chunk_closes(offset):
    model = hf_model(chunk_offset=offset)
    ids = torch.randint(0, 61, (1, 30), generator=torch.Generator().manual_seed(6))
    prompt = 5
    cache = model.new_cache()
    with torch.no_grad():
        model(ids[:, :prompt], past_key_values=cache, use_cache=True)
        after_prefill = list(cache.coarse_passes)
        for i in range(prompt, ids.shape[1]):
            before = list(cache.coarse_passes)
            model(ids[:, i:i + 1], past_key_values=cache, use_cache=True)
            for t, (g, omega) in enumerate(zip(model.config.chunk_sizes, model.config.chunk_offsets)):
                closes = (i + omega) % g == g - 1
                assert cache.coarse_passes[t] - before[t] == int(closes), (t, i)
    for t, (g, omega) in enumerate(zip(model.config.chunk_sizes, model.config.chunk_offsets)):
        assert after_prefill[t] == int(_closings(g, omega, 0, prompt) > 0)  # one batched pass
        assert cache.latents[t] is not None
    assert cache.lengths == [30] and cache.get_seq_length() == 30


@pytest.mark.parametrize("schedule", ["deferred", "background"])
@pytest.mark.parametrize("shift", ["parallel", "9"])
def test_deferred_coarse_work_is_exact(schedule, shift):
    model = hf_model(shift=shift)
    ids = torch.randint(0, 61, (1, LENGTH), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
    for prompt in (1, 6):
        got, cache = decode_logits(model, ids, prompt, schedule, run_deferred_every=3)
        assert (got - full).abs().max().item() <= 1e-4
        assert not cache.has_pending


def test_deferred_work_leaves_the_critical_path():
    """Under shift=parallel a chunk closing at position i is first read at i + 1: the decode
    step of i queues that coarse pass instead of running it; run_deferred() runs it later."""
    model = hf_model(shift="parallel")
    config = model.config
    ids = torch.randint(0, 61, (1, 20), generator=torch.Generator().manual_seed(8))
    cache = model.new_cache("deferred")
    queued = 0
    with torch.no_grad():
        model(ids[:, :2], past_key_values=cache, use_cache=True)
        for i in range(2, 20):
            before = list(cache.coarse_passes)
            model(ids[:, i:i + 1], past_key_values=cache, use_cache=True)
            for t, (g, omega) in enumerate(zip(config.chunk_sizes, config.chunk_offsets)):
                if (i + omega) % g == g - 1:  # closes: no coarse pass on the critical path
                    assert cache.coarse_passes[t] == before[t]
                    queued += 1
            assert cache.has_pending
            cache.run_deferred()
            assert not cache.has_pending
    assert queued >= 18  # the g = 1 iteration alone closes a chunk at every position


def test_inline_schedule_never_defers():
    model = hf_model(shift="parallel")
    ids = torch.randint(0, 61, (1, 12), generator=torch.Generator().manual_seed(9))
    cache = model.new_cache("inline")
    with torch.no_grad():
        for i in range(12):
            model(ids[:, i:i + 1], past_key_values=cache, use_cache=True)
            assert not cache.has_pending


def test_half_offset_partial_first_chunk_uses_real_members_only():
    """Under the half offset chunk 0 holds g - omega tokens; self-aggregation must not give the
    empty slots any weight, in decoding as in the full forward. A model whose scorer makes the
    empty (zero) slots attractive would expose a softmax over all g slots."""
    model = hf_model(downscale="self_aggregation")
    with torch.no_grad():
        for resampler in model.model.resamplers:
            if resampler.scorer is not None:
                resampler.scorer.weight.mul_(-50.0)  # zero vectors now beat real members
    ids = torch.randint(0, 61, (1, 12), generator=torch.Generator().manual_seed(10))
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
    for prompt in (1, 2, 3, 4, 5):
        got, _ = decode_logits(model, ids, prompt)
        assert (got - full).abs().max().item() <= 1e-4


def test_self_aggregation_equation_on_a_partial_chunk():
    from megatron_spiral.hf.modeling_spiral import mean_downscale, self_aggregation_downscale

    members = torch.tensor([[0.0, 0.0], [1.0, 2.0], [3.0, -1.0], [5.0, 5.0]])  # slot 0 is empty
    scores = torch.tensor([9.0, 0.0, 1.0, 2.0])  # the empty slot has the highest score
    real = torch.tensor([False, True, True, True])
    alpha = torch.softmax(scores[1:], dim=0)
    want = (alpha[:, None] * members[1:]).sum(0)
    torch.testing.assert_close(self_aggregation_downscale(members, scores, real), want)
    torch.testing.assert_close(mean_downscale(members, real), members[1:].sum(0) / 4)  # eq. 16: / g


@pytest.mark.parametrize("knobs", [KNOB_SETS[0], KNOB_SETS[5]], ids=knob_id)
def test_prefill_in_pieces_then_decode(knobs):
    """Extending a non-empty cache by several tokens at once (chunked prefill, or a second
    prompt appended to a conversation) is as exact as one prefill."""
    model = hf_model(**knobs)
    ids = torch.randint(0, 61, (2, LENGTH), generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        cache = model.new_cache()
        pieces = [model(ids[:, a:b], past_key_values=cache, use_cache=True).logits
                  for a, b in ((0, 3), (3, 10), (10, 11), (11, 20), (20, LENGTH))]
    assert (torch.cat(pieces, dim=1) - full).abs().max().item() <= 1e-4
