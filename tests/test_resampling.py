"""Down/up-scaling and shift (eq. 16-22) against direct per-position evaluations of the equations."""

import math

import pytest
import torch

from megatron_spiral.model import chunking, resampling

CASES = [(13, 4, 2), (13, 4, 0), (20, 8, 4), (17, 3, 1), (9, 6, 3), (5, 8, 4)]


def _members(length, g, omega):
    return [chunking.chunk_members(length, g, omega, j) for j in range(chunking.num_chunks(length, g, omega))]


@pytest.mark.parametrize("length,g,omega", CASES)
def test_mean_downscale_eq16(length, g, omega):
    h = torch.randn(length, 2, 5, dtype=torch.float64)
    z = resampling.mean_downscale(h, g, omega)
    members = _members(length, g, omega)
    assert z.shape[0] == len(members)
    for j, idx in enumerate(members):
        torch.testing.assert_close(z[j], h[idx].sum(0) / g)


@pytest.mark.parametrize("length,g,omega", CASES)
def test_self_aggregation_eq17_18_softmax_over_real_members(length, g, omega):
    h = torch.randn(length, 2, 5, dtype=torch.float64)
    scores = torch.randn(length, 2, dtype=torch.float64)
    z = resampling.self_aggregation_downscale(h, scores, g, omega)
    for j, idx in enumerate(_members(length, g, omega)):
        alpha = torch.softmax(scores[idx], dim=0)  # [members, b]
        torch.testing.assert_close(z[j], (alpha.unsqueeze(-1) * h[idx]).sum(0))


@pytest.mark.parametrize("length,g,omega", CASES)
def test_router_upscale_eq19_21(length, g, omega):
    count = chunking.num_chunks(length, g, omega)
    zhat = torch.randn(count, 2, 5, dtype=torch.float64)
    logits = torch.randn(count, 2, g, dtype=torch.float64)
    u = resampling.router_upscale(zhat, logits, length, omega)
    beta = torch.softmax(logits, dim=-1)
    for i in range(length):
        j, rho = chunking.chunk_index(i, g, omega), chunking.in_chunk_index(i, g, omega)
        expected = math.sqrt(g) * beta[j, :, rho].unsqueeze(-1) * zhat[j] if j < count else torch.zeros(2, 5, dtype=torch.float64)
        torch.testing.assert_close(u[i], expected)


@pytest.mark.parametrize("length,g,omega", CASES)
def test_uniform_upscale_eq20(length, g, omega):
    count = chunking.num_chunks(length, g, omega)
    zhat = torch.randn(count, 2, 5, dtype=torch.float64)
    u = resampling.uniform_upscale(zhat, g, length, omega)
    for i in range(length):
        j = chunking.chunk_index(i, g, omega)
        expected = math.sqrt(g) / g * zhat[j] if j < count else torch.zeros(2, 5, dtype=torch.float64)
        torch.testing.assert_close(u[i], expected)


@pytest.mark.parametrize("shift", [0, 1, 3, 7, 12])
def test_causal_shift_eq22(shift):
    u = torch.randn(10, 1, 3)
    shifted = resampling.causal_shift(u, shift)
    for i in range(10):
        expected = torch.zeros(1, 3) if i < shift else u[i - shift]
        torch.testing.assert_close(shifted[i], expected)


def test_full_resolution_resampler_is_identity_and_parameter_free():
    r = resampling.Resampler(8, chunk_size=1, offset=0, shift=0, downscale="self_aggregation", upscale="router")
    h = torch.randn(6, 2, 8)
    assert torch.equal(r.downscale(h), h) and torch.equal(r.upscale(h, 6), h)
    assert sum(p.numel() for p in r.parameters()) == 0


def test_gain_is_sqrt_g():
    assert resampling.upscale_gain(8) == pytest.approx(math.sqrt(8))
