"""Loop-state statistics of a SpiralGPTModel on one batch (used to compare MeSH with Anchor).

    h0_over_v        ||h^(0)|| / ||v||  (mean token L2 norms): what INITTOPO hands the loop.
                     Anchor: 1 exactly (h^(0) = v). MeSH: the transitional read of slots
                     x and v; with near-uniform routers it is about (x + v) / B.
    update_norm/t    mean token L2 norm of the shifted update u~^(t) of iteration t
    state_norm/t     mean token L2 norm of h^(t+1) after the topology update of iteration t
    {write,read}_entropy/k   mean entropy (nats) of MeSH router pair k's slot distribution
                     (k = 0 transitional, k = t + 1 iteration t); uniform = log B

Everything is measured with forward hooks on a no-grad pass; the model is left unchanged.
"""

from __future__ import annotations

import contextlib
from typing import Dict

import torch


def mean_token_norm(hidden: torch.Tensor) -> float:
    """Mean over tokens of the L2 norm over the hidden dimension (last axis)."""
    return float(hidden.detach().float().norm(dim=-1).mean())


def mean_entropy(logits: torch.Tensor) -> float:
    """Mean entropy (nats) of softmax(logits) over the last axis."""
    logp = torch.log_softmax(logits.detach().float(), dim=-1)
    return float(-(logp.exp() * logp).sum(dim=-1).mean())


@contextlib.contextmanager
def _observe(block, out: Dict[str, float]):
    topology = block.topology
    original_init, original_update = topology.initial_state, topology.update
    handles = []

    def initial_state(embeddings, pre_output):
        state, carrier = original_init(embeddings, pre_output)
        out["h0_over_v"] = mean_token_norm(state) / max(mean_token_norm(pre_output), 1e-12)
        out["x_over_v"] = mean_token_norm(embeddings) / max(mean_token_norm(pre_output), 1e-12)
        return state, carrier

    def update(update_, state, carrier, t):
        new_state, carrier = original_update(update_, state, carrier, t)
        out[f"update_norm/{t}"] = mean_token_norm(update_)
        out[f"state_norm/{t}"] = mean_token_norm(new_state)
        return new_state, carrier

    topology.initial_state, topology.update = initial_state, update
    for kind in ("write", "read"):
        for k, router in enumerate(getattr(topology, f"{kind}_routers", ())):
            handles.append(router.register_forward_hook(
                lambda module, inputs, output, key=f"{kind}_entropy/{k}": out.__setitem__(key, mean_entropy(output))))
    try:
        yield out
    finally:
        del topology.initial_state, topology.update  # drop the instance overrides
        for handle in handles:
            handle.remove()


def loop_statistics(spiral_lm, input_ids: torch.Tensor) -> Dict[str, float]:
    """The statistics above for a megatron_spiral SpiralLM on ``input_ids`` [b, L]."""
    block = spiral_lm.gpt.decoder
    if block.topology is None:
        return {}
    out: Dict[str, float] = {}
    was_training = spiral_lm.training
    spiral_lm.eval()
    try:
        with torch.no_grad(), _observe(block, out):
            spiral_lm(input_ids)
    finally:
        spiral_lm.train(was_training)
    return out
