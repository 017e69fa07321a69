"""Chunk maps of multi-resolution recursion (paper §2.3.1, eq. 12-15). Pure functions.

Positions i = 0..L-1 are grouped into chunks of size g with offset omega:

    pi(i)  = floor((i + omega) / g)          chunk index          (eq. 12)
    rho(i) = (i + omega) - g * pi(i)          in-chunk index       (eq. 12)

Chunk 0 is partial under a non-zero offset (its first ``omega`` slots hold no token). The
incomplete last chunk is dropped (eq. 13-15). We keep every chunk whose last slot lies inside the
sequence, L_t = floor((L + omega) / g). For omega = 0 this is eq. 13's floor(L / g) exactly, and
for L divisible by g (every Table 1 setting) the two agree for any offset. Where they differ,
eq. 13 read literally would also drop a *complete* chunk at the end, which makes the update at a
position depend on how many tokens follow it, so decoding (Algorithm 2, which triggers at every
rho = g - 1) could never match the full forward pass. Keeping complete chunks is what Algorithm 2
computes.

The tensor layout used by the resampling operators is the "padded" sequence: ``omega`` empty slots
followed by the tokens, cut to L_t * g slots and viewed as [L_t, g]. Slot (j, rho) holds position
j * g + rho - omega.
"""

from __future__ import annotations

import torch


def chunk_index(i, chunk_size: int, offset: int):
    """pi_t(i) = floor((i + omega_t) / g_t)  (eq. 12). Works on ints and integer tensors."""
    return (i + offset) // chunk_size


def in_chunk_index(i, chunk_size: int, offset: int):
    """rho_t(i) = (i + omega_t) - g_t * pi_t(i)  (eq. 12)."""
    return (i + offset) - chunk_size * chunk_index(i, chunk_size, offset)


def num_chunks(length: int, chunk_size: int, offset: int) -> int:
    """L_t: number of kept (complete) chunks at sequence length L (eq. 13, see module docstring)."""
    return (length + offset) // chunk_size


def valid_positions(length: int, chunk_size: int, offset: int) -> torch.Tensor:
    """Boolean mask of V_t = {i : pi_t(i) <= L_t - 1} (eq. 14)."""
    positions = torch.arange(length)
    return chunk_index(positions, chunk_size, offset) <= num_chunks(length, chunk_size, offset) - 1


def chunk_members(length: int, chunk_size: int, offset: int, j: int) -> list:
    """I_{t,j} = {i in V_t : pi_t(i) = j}  (eq. 15), as a list of positions."""
    if not 0 <= j < num_chunks(length, chunk_size, offset):
        return []
    first = max(0, j * chunk_size - offset)
    last = (j + 1) * chunk_size - offset  # exclusive
    return list(range(first, min(last, length)))


def trigger_positions(length: int, chunk_size: int, offset: int) -> list:
    """Positions whose arrival closes a chunk (rho = g - 1, Algorithm 2 line 33; eq. 31)."""
    positions = torch.arange(length)
    closes = in_chunk_index(positions, chunk_size, offset) == chunk_size - 1
    return positions[closes].tolist()


def real_slot_mask(length: int, chunk_size: int, offset: int, device=None) -> torch.Tensor:
    """[L_t, g] mask of padded-layout slots that hold a real token (only chunk 0 has holes)."""
    count = num_chunks(length, chunk_size, offset)
    slots = torch.arange(count * chunk_size, device=device).view(count, chunk_size)
    return slots >= offset


def to_chunks(hidden: torch.Tensor, chunk_size: int, offset: int) -> torch.Tensor:
    """[L, ...] -> [L_t, g, ...]: prepend ``offset`` zero slots and drop the incomplete tail."""
    length = hidden.shape[0]
    count = num_chunks(length, chunk_size, offset)
    if offset:
        pad = hidden.new_zeros((offset,) + tuple(hidden.shape[1:]))
        hidden = torch.cat([pad, hidden], dim=0)
    hidden = hidden[: count * chunk_size]
    return hidden.reshape((count, chunk_size) + tuple(hidden.shape[1:]))


def from_chunks(chunked: torch.Tensor, length: int, offset: int) -> torch.Tensor:
    """Inverse of :func:`to_chunks`: [L_t, g, ...] -> [L, ...]; dropped positions are zero."""
    count, chunk_size = chunked.shape[:2]
    flat = chunked.reshape((count * chunk_size,) + tuple(chunked.shape[2:]))[offset:]
    missing = length - flat.shape[0]
    if missing > 0:
        flat = torch.cat([flat, flat.new_zeros((missing,) + tuple(flat.shape[1:]))], dim=0)
    return flat
