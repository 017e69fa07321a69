"""Loop-state topologies U (paper eq. 4-6 and App. B).

Both expose the same two calls used by Algorithm 1:

    h0, carrier = topology.initial_state(x, v)        # INITTOPO(x, v), v = f_pre(x)
    h, carrier  = topology.update(u_tilde, h, carrier, t)

Everything here is token-wise, so it runs unchanged on sequence-parallel shards; the MeSH
routers' weights are marked ``sequence_parallel`` so megatron all-reduces their gradients over
the tensor-parallel group (each rank only saw its own tokens).
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional, Tuple

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
    return memory + value.unsqueeze(-1) * write_weights.to(value.dtype).unsqueeze(-2)


def mesh_read(memory: torch.Tensor, read_weights: torch.Tensor) -> torch.Tensor:
    """Read, eq. 27 / 30: h = sum_b m_b * w_read,b."""
    return torch.einsum("lbdk,lbk->lbd", memory, read_weights.to(memory.dtype))


def router_weights(router: torch.nn.Linear, inputs: torch.Tensor) -> torch.Tensor:
    """Softmax over the B slots of a write/read router (eq. 25 / 28), kept in fp32: the factored
    read mixes the weights in fp32; the literal write/read cast them to the tensors' dtype."""
    return torch.softmax(router(inputs).float(), dim=-1)


class MeshMemory(NamedTuple):
    """The MeSH buffer, kept factored instead of as B materialised slots.

    Every slot is a per-token linear combination of the tensors written so far:
    m_b = x [b = 0] + sum_j w_{j,b} value_j (eq. 24, 26, 29), with value_0 = v = f_pre(x) and
    value_{t+1} = u~^(t). A read (eq. 27, 30) is therefore
    h = r_0 x + sum_j <w_j, r> value_j, which touches (t + 3) [L, b, d] tensors instead of
    writing and reading B of them per update, and autograd saves only the per-token
    coefficients (the values are activations anyway). Same numbers as :func:`mesh_write` /
    :func:`mesh_read`; :meth:`MeshTopology.materialize` rebuilds the slots.
    """

    embeddings: torch.Tensor              # x, the initial content of slot 0
    values: Tuple[torch.Tensor, ...]      # v, u~^(0), u~^(1), ...       [L, b, d]
    writes: Tuple[torch.Tensor, ...]      # their write weights (fp32)   [L, b, B]


def mesh_read_factored(memory: MeshMemory, read_weights: torch.Tensor) -> torch.Tensor:
    """Eq. 27 / 30 on a factored buffer: h = r_0 x + sum_j <w_j, r> value_j."""
    read = read_weights.float()
    x = memory.embeddings
    state = x * read[..., :1].to(x.dtype)
    for value, write in zip(memory.values, memory.writes):
        coefficient = (write * read).sum(dim=-1, keepdim=True).to(value.dtype)
        state = torch.addcmul(state, value, coefficient)
    return state


RESIDUAL_ROUTER_BIAS = 4.0  # softmax weight e^4 / (e^4 + B - 1) = 0.93 at B = 5: routed, not saturated


def residual_router_bias(num_slots: int, bias: float = RESIDUAL_ROUTER_BIAS) -> torch.Tensor:
    """Router bias that favours slot 1: every write and read then starts on one slot, so the
    transitional read returns ~v (Anchor's h^(0)) and each step adds u~ to it (a residual loop)."""
    out = torch.zeros(num_slots)
    out[1] = bias
    return out


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
        router_init: str = "uniform",
    ) -> None:
        super().__init__()
        self.num_slots = num_slots
        if router_init not in ("uniform", "residual"):
            raise ValueError(f"router_init={router_init!r}: choose 'uniform' or 'residual'")
        if router_init == "residual" and num_slots < 2:
            raise ValueError("router_init='residual' needs at least 2 MeSH slots")

        def make_router() -> torch.nn.Linear:
            router = torch.nn.Linear(hidden_size, num_slots, bias=True, dtype=params_dtype)
            if init_method is not None:
                init_method(router.weight)
            torch.nn.init.zeros_(router.bias)
            if router_init == "residual":
                with torch.no_grad():
                    router.bias.copy_(residual_router_bias(num_slots))
            for param in router.parameters():
                param.sequence_parallel = sequence_parallel
            return router

        self.write_routers = torch.nn.ModuleList(make_router() for _ in range(num_iterations + 1))
        self.read_routers = torch.nn.ModuleList(make_router() for _ in range(num_iterations + 1))

    def initial_memory(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Eq. 24: m_0 = x, m_{b>0} = 0 (materialised [L, b, d, B])."""
        return F.pad(embeddings.unsqueeze(-1), (0, self.num_slots - 1))

    def initial_state(self, embeddings: torch.Tensor, pre_output: torch.Tensor):
        """Transitional write-read (eq. 24-27), routed by the embeddings x."""
        write = router_weights(self.write_routers[0], embeddings)
        read = router_weights(self.read_routers[0], embeddings)
        memory = MeshMemory(embeddings, (pre_output,), (write,))
        return mesh_read_factored(memory, read), memory

    def update(
        self, update: torch.Tensor, state: torch.Tensor, memory: MeshMemory, t: int
    ) -> Tuple[torch.Tensor, MeshMemory]:
        """Main-loop write-read (eq. 28-30), routed by the current state h^(t)."""
        write = router_weights(self.write_routers[t + 1], state)
        read = router_weights(self.read_routers[t + 1], state)
        memory = MeshMemory(memory.embeddings, memory.values + (update,), memory.writes + (write,))
        return mesh_read_factored(memory, read), memory

    def materialize(self, memory: MeshMemory) -> torch.Tensor:
        """The B slots [L, b, d, B] of a factored buffer (eq. 24, 26, 29 applied literally)."""
        slots = self.initial_memory(memory.embeddings)
        for value, write in zip(memory.values, memory.writes):
            slots = mesh_write(slots, value, write)
        return slots


def build_topology(
    name: str,
    hidden_size: int,
    num_slots: int,
    num_iterations: int,
    init_method=None,
    sequence_parallel: bool = False,
    params_dtype: torch.dtype = torch.float32,
    router_init: str = "uniform",
) -> torch.nn.Module:
    if name == "anchor":
        return AnchorTopology()
    if name == "mesh":
        return MeshTopology(hidden_size, num_slots, num_iterations, init_method,
                            sequence_parallel, params_dtype, router_init)
    raise ValueError(f"unknown topology {name!r}; choose 'anchor' or 'mesh'")
