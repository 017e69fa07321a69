"""torch.compile(model) on the export with the default config (issue 11, item 6).

A counting backend (torch.compile's public custom-backend hook) records every graph dynamo
hands over, so the test sees recompiles without paying for Inductor's code generation: the
default config traces one graph (was: a cached prefill full of data-dependent Python, and a guard
on SpiralRotary's per-device dict that recompiled on every identical call), an identical second
call compiles nothing, and the sequence dimension is dynamic, so new lengths reuse the graph.
"""

import pytest
import torch

from hf_helpers import hf_model, one_cpu_thread  # noqa: F401

LAYOUT = "1+1x{1/2,1}+1"  # small graph: one coarse iteration (g = 2) and one full-resolution one


def _counting():
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(len(gm.graph.nodes))
        return gm.forward

    return backend, graphs


def test_compile_default_config_no_recompile_and_dynamic_length():
    torch._dynamo.reset()
    model = hf_model(seed=1, layout=LAYOUT, hidden_size=16, num_attention_heads=2)
    assert model.config.use_cache  # the default config
    backend, graphs = _counting()
    compiled = torch.compile(model, backend=backend)
    ids = torch.randint(0, 59, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = compiled(ids).logits
        assert (got - model(ids, use_cache=False).logits).abs().max().item() <= 1e-5
        assert len(graphs) == 1 and graphs[0] > 50  # the whole model in one graph
        compiled(ids)
        assert len(graphs) == 1  # identical second call: nothing recompiled
        for length in (30, 40, 52):  # new lengths of the same parity reuse the dynamic graph
            x = torch.randint(0, 59, (2, length), generator=torch.Generator().manual_seed(length))
            assert (compiled(x).logits - model(x, use_cache=False).logits).abs().max().item() <= 1e-5
        assert len(graphs) == 1, graphs
    torch._dynamo.reset()
