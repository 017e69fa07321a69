"""Loop-state topologies U (paper eq. 4-6 and App. B).

Both expose the same two calls used by Algorithm 1:

    h0, carrier = topology.initial_state(x, v)        # INITTOPO(x, v), v = f_pre(x)
    h, carrier  = topology.update(u_tilde, h, carrier, t)

Everything here is token-wise, so it runs unchanged on sequence-parallel shards; the MeSH
routers' weights are marked ``sequence_parallel`` so megatron all-reduces their gradients over
the tensor-parallel group (each rank only saw its own tokens).
"""

from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F


class AnchorTopology(torch.nn.Module):
    """Anchor (eq. 5): every iteration is attached to the fixed anchor h^(0) = f_pre(x)."""

    def initial_state(self, embeddings: torch.Tensor, pre_output: torch.Tensor):
        return pre_output, pre_output

    def update(self, update: torch.Tensor, state: torch.Tensor, anchor: torch.Tensor, t: int):
        """U_anchor(u~, h, H; t) = (u~ + h^(0), h^(0))."""
        return update + anchor, anchor


def mesh_write(memory: torch.Tensor, value: torch.Tensor, write_weights: torch.Tensor) -> torch.Tensor:
    """Distributed write, eq. 26 / 29: m_b <- m_b + value * w_write,b.

    ``memory`` [L, b, d, B], ``value`` [L, b, d], ``write_weights`` [L, b, B].
    """
    return memory + value.unsqueeze(-1) * write_weights.unsqueeze(-2)


def mesh_read(memory: torch.Tensor, read_weights: torch.Tensor) -> torch.Tensor:
    """Read, eq. 27 / 30: h = sum_b m_b * w_read,b."""
    return torch.einsum("lbdk,lbk->lbd", memory, read_weights)


def router_weights(router: torch.nn.Linear, inputs: torch.Tensor) -> torch.Tensor:
    """Softmax over the B slots of a write/read router (eq. 25 / 28)."""
    return torch.softmax(router(inputs).float(), dim=-1).to(inputs.dtype)


class MeshTopology(torch.nn.Module):
    """MeSH (Yu et al. 2025; App. B): a B-slot memory written and read by per-iteration routers.

    Router pair 0 is the transitional pair (t = -1, input x); pair t + 1 serves iteration t
    (input h^(t)). Routers are Linear(d, B) with bias, softmax over slots.
    """

    def __init__(
        self,
        hidden_size: int,
        num_slots: int,
        num_iterations: int,
        init_method: Optional[Callable[[torch.Tensor], None]] = None,
        sequence_parallel: bool = False,
        params_dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        self.num_slots = num_slots

        def make_router() -> torch.nn.Linear:
            router = torch.nn.Linear(hidden_size, num_slots, bias=True, dtype=params_dtype)
            if init_method is not None:
                init_method(router.weight)
            torch.nn.init.zeros_(router.bias)
            for param in router.parameters():
                param.sequence_parallel = sequence_parallel
            return router

        self.write_routers = torch.nn.ModuleList(make_router() for _ in range(num_iterations + 1))
        self.read_routers = torch.nn.ModuleList(make_router() for _ in range(num_iterations + 1))

    def initial_memory(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Eq. 24: m_0 = x, m_{b>0} = 0."""
        return F.pad(embeddings.unsqueeze(-1), (0, self.num_slots - 1))

    def initial_state(self, embeddings: torch.Tensor, pre_output: torch.Tensor):
        """Transitional write-read (eq. 24-27), routed by the embeddings x."""
        write = router_weights(self.write_routers[0], embeddings)
        read = router_weights(self.read_routers[0], embeddings)
        memory = mesh_write(self.initial_memory(embeddings), pre_output, write)
        return mesh_read(memory, read), memory

    def update(
        self, update: torch.Tensor, state: torch.Tensor, memory: torch.Tensor, t: int
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Main-loop write-read (eq. 28-30), routed by the current state h^(t)."""
        write = router_weights(self.write_routers[t + 1], state)
        read = router_weights(self.read_routers[t + 1], state)
        memory = mesh_write(memory, update, write)
        return mesh_read(memory, read), memory


def build_topology(
    name: str,
    hidden_size: int,
    num_slots: int,
    num_iterations: int,
    init_method=None,
    sequence_parallel: bool = False,
    params_dtype: torch.dtype = torch.float32,
) -> torch.nn.Module:
    if name == "anchor":
        return AnchorTopology()
    if name == "mesh":
        return MeshTopology(hidden_size, num_slots, num_iterations, init_method,
                            sequence_parallel, params_dtype)
    raise ValueError(f"unknown topology {name!r}; choose 'anchor' or 'mesh'")
