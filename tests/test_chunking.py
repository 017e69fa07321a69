"""Chunk maps (eq. 12-15) against the paper's definitions and App. D's worked examples."""

import pytest

from megatron_spiral.model import chunking


def test_offset_maps_match_eq12_by_hand():
    # g = 4, omega = 2: positions 0,1 form the partial first chunk, then 2..5, 6..9, ...
    g, omega = 4, 2
    assert [chunking.chunk_index(i, g, omega) for i in range(10)] == [0, 0, 1, 1, 1, 1, 2, 2, 2, 2]
    assert [chunking.in_chunk_index(i, g, omega) for i in range(10)] == [2, 3, 0, 1, 2, 3, 0, 1, 2, 3]


def test_partial_first_chunk_and_dropped_tail():
    # L = 13, g = 4, omega = 2: chunks {0,1}, {2..5}, {6..9}; {10,11,12} is incomplete -> dropped
    assert chunking.num_chunks(13, 4, 2) == 3
    assert chunking.chunk_members(13, 4, 2, 0) == [0, 1]
    assert chunking.chunk_members(13, 4, 2, 2) == [6, 7, 8, 9]
    assert chunking.chunk_members(13, 4, 2, 3) == []
    assert chunking.valid_positions(13, 4, 2).tolist() == [True] * 10 + [False] * 3


@pytest.mark.parametrize("length,g", [(16, 4), (17, 4), (31, 8), (9, 3)])
def test_zero_offset_keeps_eq13_count(length, g):
    assert chunking.num_chunks(length, g, 0) == length // g


def test_complete_last_chunk_is_kept_under_offset():
    # L = 20, g = 8, omega = 4: chunk 2 covers 12..19 and is complete, so it is kept
    assert chunking.num_chunks(20, 8, 4) == 3
    assert chunking.chunk_members(20, 8, 4, 2) == list(range(12, 20))


def test_appendix_d_zero_offset_trigger_residues():
    # App. D: with omega = 0, g=2 triggers at i = 1 mod 2, g=4 at 3 mod 4, g=8 at 7 mod 8
    for g in (2, 4, 8):
        assert chunking.trigger_positions(64, g, 0) == [i for i in range(64) if i % g == g - 1]
    # i = 7 triggers all three coarse resolutions at once; i = 0 none of them
    assert all(7 in chunking.trigger_positions(64, g, 0) for g in (2, 4, 8))
    assert not any(0 in chunking.trigger_positions(64, g, 0) for g in (2, 4, 8))


@pytest.mark.parametrize("g", [2, 3, 4, 6, 8, 16])
def test_eq31_trigger_residue_under_half_offset(g):
    omega = g // 2
    expected = [i for i in range(96) if i % g == (g - 1 - omega) % g]
    assert chunking.trigger_positions(96, g, omega) == expected


def test_half_offset_interleaves_triggers():
    # App. D: under the half offset no token triggers two coarse resolutions of {8, 4, 2}
    per_token = [0] * 256
    for g in (2, 4, 8):
        for i in chunking.trigger_positions(256, g, g // 2):
            per_token[i] += 1
    assert max(per_token) == 1
    zero = [0] * 256
    for g in (2, 4, 8):
        for i in chunking.trigger_positions(256, g, 0):
            zero[i] += 1
    assert max(zero) == 3


def test_to_chunks_round_trip():
    import torch

    h = torch.arange(13.0).view(13, 1)
    chunked = chunking.to_chunks(h, 4, 2)
    assert chunked.shape == (3, 4, 1)
    assert chunked[0, :, 0].tolist() == [0, 0, 0, 1]  # two empty slots, then positions 0, 1
    back = chunking.from_chunks(chunked, 13, 2)
    assert back[:10, 0].tolist() == list(range(10)) and back[10:].abs().sum() == 0
    assert chunking.real_slot_mask(13, 4, 2)[0].tolist() == [False, False, True, True]


def test_resolution_whose_chunk_size_is_not_an_integer_is_refused():
    """Issue 10: '2+4x{3/8}+2' used to run as 1/2 (g = floor(8/3) = 2) without a word."""
    import pytest
    from megatron_spiral.config import SpiralConfigError, parse_layout

    with pytest.raises(SpiralConfigError, match=r"1/r = 8/3 is not an integer; use r = 1/g, e.g. 1/3 or 1/2"):
        parse_layout("2+4x{3/8}+2")
    assert [str(r) for r in parse_layout("1+1x{1/3,0.125,1}+1").resolutions] == ["1/3", "1/8", "1"]
