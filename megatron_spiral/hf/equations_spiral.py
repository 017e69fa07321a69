"""SpiralFormer's equations (paper §2, App. B) for the Hugging Face model, one function each.

Self-contained (torch only) and copied verbatim into every export beside ``modeling_spiral.py``.
Tensors are batch-first ``[batch, sequence, hidden]``; chunked tensors are
``[batch, chunks, g, hidden]``. The megatron-core training model implements the same equations
in ``megatron_spiral.model`` (sequence-first); the HF parity tests compare the two.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def chunk_index(i, g: int, omega: int):
    """pi_t(i) = floor((i + omega_t) / g_t)  (eq. 12). Ints or integer tensors."""
    return (i + omega) // g


def in_chunk_index(i, g: int, omega: int):
    """rho_t(i) = (i + omega_t) - g_t * pi_t(i)  (eq. 12)."""
    return (i + omega) - g * chunk_index(i, g, omega)


def num_chunks(length: int, g: int, omega: int) -> int:
    """L_t (eq. 13): chunks whose last slot lies in the sequence, floor((L + omega_t) / g_t)."""
    return (length + omega) // g


def to_chunks(x: torch.Tensor, g: int, omega: int) -> torch.Tensor:
    """Chunks I_{t,j} over the kept positions V_t (eq. 14-15): [b, L, ...] -> [b, L_t, g, ...].

    ``omega`` empty (zero) slots precede position 0; the incomplete last chunk is dropped."""
    count = num_chunks(x.shape[1], g, omega)
    if omega:
        x = torch.cat([x.new_zeros((x.shape[0], omega) + tuple(x.shape[2:])), x], dim=1)
    x = x[:, : count * g]
    return x.reshape((x.shape[0], count, g) + tuple(x.shape[2:]))


def from_chunks(x: torch.Tensor, length: int, omega: int) -> torch.Tensor:
    """Inverse of :func:`to_chunks`: [b, L_t, g, ...] -> [b, L, ...]; dropped positions get 0."""
    b, count, g = x.shape[:3]
    flat = x.reshape((b, count * g) + tuple(x.shape[3:]))[:, omega:]
    missing = length - flat.shape[1]
    if missing > 0:
        flat = torch.cat([flat, flat.new_zeros((b, missing) + tuple(flat.shape[2:]))], dim=1)
    return flat


def real_slots(length: int, g: int, omega: int, device=None) -> torch.Tensor:
    """[L_t, g] mask of chunk slots holding a real token (only chunk 0 is partial, eq. 15)."""
    count = num_chunks(length, g, omega)
    return torch.arange(count * g, device=device).view(count, g) >= omega


def mean_downscale(members: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """Mean pooling, eq. 16: z_j = (1/g_t) sum_{i in I_{t,j}} h_i (literal: a partial chunk is
    divided by g_t too). ``members`` [..., g, d], ``real`` [..., g]."""
    members = torch.where(real.unsqueeze(-1), members, torch.zeros_like(members))
    return members.sum(dim=-2) / members.shape[-2]


def self_aggregation_weights(scores: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """alpha_{j,i} = Softmax_{i in I_{t,j}} A^(t)(h_i)  (eq. 17), over the real members only."""
    return torch.softmax(scores.float().masked_fill(~real, float("-inf")), dim=-1)


def self_aggregation_downscale(members: torch.Tensor, scores: torch.Tensor,
                               real: torch.Tensor) -> torch.Tensor:
    """z_j = sum_{i in I_{t,j}} alpha_{j,i} h_i  (eq. 18)."""
    alpha = self_aggregation_weights(scores, real).to(members.dtype)
    members = torch.where(real.unsqueeze(-1), members, torch.zeros_like(members))
    return (alpha.unsqueeze(-1) * members).sum(dim=-2)


def upscale_gain(g: int) -> float:
    """lambda_t = sqrt(g_t)  (§2.3.3, gain scaling)."""
    return math.sqrt(g)


def allocation_weights(router_logits: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """beta_j = Softmax(B^(t)(zhat_j)) over the g_t slots  (eq. 21)."""
    return torch.softmax(router_logits.float(), dim=-1).to(dtype)


def router_upscale(zhat: torch.Tensor, beta: torch.Tensor, length: int, omega: int) -> torch.Tensor:
    """u_i = lambda_t beta_{pi(i), rho(i)} zhat_{pi(i)}  (eq. 19); zhat [b, L_t, d], beta [b, L_t, g]."""
    scaled = upscale_gain(beta.shape[-1]) * beta.unsqueeze(-1) * zhat.unsqueeze(-2)
    return from_chunks(scaled, length, omega)


def uniform_upscale(zhat: torch.Tensor, g: int, length: int, omega: int) -> torch.Tensor:
    """u_i = (lambda_t / g_t) zhat_{pi(i)}  (eq. 20)."""
    scaled = (upscale_gain(g) / g * zhat).unsqueeze(2).expand(-1, -1, g, -1)
    return from_chunks(scaled, length, omega)


def causal_shift(u: torch.Tensor, s: int) -> torch.Tensor:
    """u~[i] = 0 for i < s_t, u[i - s_t] otherwise  (eq. 22), along dim 1."""
    if s == 0:
        return u
    length = u.shape[1]
    pad = u.new_zeros((u.shape[0], min(s, length)) + tuple(u.shape[2:]))
    return torch.cat([pad, u[:, : max(length - s, 0)]], dim=1)


def anchor_update(u_tilde: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
    """U_anchor: h^(t+1) = u~^(t) + h^(0)  (eq. 5)."""
    return u_tilde + anchor


def slot_weights(router: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """MeSH write/read routing, Softmax_b(Linear(x))  (eq. 25 / 28)."""
    return torch.softmax(router(x).float(), dim=-1).to(x.dtype)


def mesh_initial_memory(x: torch.Tensor, num_slots: int) -> torch.Tensor:
    """m_0 = x, m_{b>0} = 0  (eq. 24); memory is [..., d, B]."""
    return F.pad(x.unsqueeze(-1), (0, num_slots - 1))


def mesh_write(memory: torch.Tensor, value: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """m_b <- m_b + value * w_write,b  (eq. 26 / 29)."""
    return memory + value.unsqueeze(-1) * weights.unsqueeze(-2)


def mesh_read(memory: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """h = sum_b m_b * w_read,b  (eq. 27 / 30)."""
    return torch.einsum("...dk,...k->...d", memory, weights)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = torch.chunk(x, 2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE, non-interleaved rotate-half on the first ``rot`` dims of each head (megatron's)."""
    rot = cos.shape[-1]
    if rot == x.shape[-1]:
        return x * cos.to(x.dtype) + rotate_half(x) * sin.to(x.dtype)
    t, rest = x[..., :rot], x[..., rot:]
    t = t * cos.to(t.dtype) + rotate_half(t) * sin.to(t.dtype)
    return torch.cat((t, rest), dim=-1)
