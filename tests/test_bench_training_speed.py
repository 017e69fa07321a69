"""bench/bench_training_speed.py: its FLOPs and memory arithmetic, a tiny end-to-end run, and the
factored MeSH buffer whose cost the benchmark exposed (same numbers, O(values) saved memory)."""

import importlib.util
import os
import re
import sys

import pytest
import torch

from megatron_spiral.analysis.accounting import forward_flops, training_flops_per_sequence
from megatron_spiral.config import SpiralConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _bench():
    spec = importlib.util.spec_from_file_location(
        "bench_training_speed", os.path.join(ROOT, "bench", "bench_training_speed.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_causal_flops_discount_half_the_attention_of_every_layer_call():
    bench = _bench()
    d, length = 16, 64
    plain = SpiralConfig(layout="3", hidden_size=d, num_attention_heads=2, seq_length=length)
    assert bench.causal_training_flops(plain, length) == \
        training_flops_per_sequence(plain, length) - 3 * 3 * 2 * length ** 2 * d
    spiral = SpiralConfig(layout="1+2x{1/4,1/2,1}+1", hidden_size=d, num_attention_heads=2, seq_length=length)
    lengths = forward_flops(spiral, length).lengths
    assert lengths == [16, 32, 64]  # half offsets: floor((64 + omega) / g)
    attention_half = 2 * 2 * length ** 2 * d + 2 * sum(2 * l ** 2 * d for l in lengths)
    assert bench.causal_training_flops(spiral, length) == \
        training_flops_per_sequence(spiral, length) - 3 * attention_half


def test_saved_tensor_bytes_counts_activations_once_and_skips_weights():
    bench = _bench()

    class Toy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.full((10,), 2.0))

        def forward(self, ids, labels=None):
            x = ids.float()                 # 10 floats
            y = self.w * x                  # saves w (a weight: not counted) and x
            z = torch.exp(y)                # saves its result z (10 floats)
            return z * z                    # saves z again (same storage: counted once)

    ids = torch.arange(10).unsqueeze(0)
    assert bench.saved_tensor_bytes(Toy(), ids) == 2 * 10 * 4


def test_bench_end_to_end_prints_table_ratios_and_breakdown(capsys):
    bench = _bench()
    args = ["--hidden-size", "32", "--num-attention-heads", "2", "--seq-length", "64", "--vocab-size", "100",
            "--rounds", "2", "--warmup", "0", "--breakdown", "--threads", "1", "--device", "cpu",
            "--dtype", "float32"]
    assert bench.main(args) == 0
    out = capsys.readouterr().out
    for label, layout in (("Baseline (Pythia)", "12"), ("LoopedFormer", "2+4x{1,1}+2"),
                          ("SpiralFormer-B", "2+4x{1/8,1/4,1/2,1}+2"),
                          ("SpiralFormer-L", "4+4x{1/16,1/8,1/4,1/2}+4")):
        assert re.search(rf"\| {re.escape(label)} +\| {re.escape(layout)} +\| +\d+\.\d \|", out), label
    b = SpiralConfig(layout="2+4x{1/8,1/4,1/2,1}+2", hidden_size=32, num_attention_heads=2, vocab_size=100)
    looped = SpiralConfig(layout="2+4x{1,1}+2", hidden_size=32, num_attention_heads=2, vocab_size=100)
    flops_ratio = training_flops_per_sequence(b, 64) / training_flops_per_sequence(looped, 64)
    row = re.search(r"\| SpiralFormer-B / LoopedFormer +\| +([\d.]+) \| +([\d.]+) \| +([\d.]+) \|", out)
    assert row and float(row.group(3)) == pytest.approx(flops_ratio, abs=5e-4)
    assert "core t=0 (4 layers @ 8)" in out and "topology mesh (all t)" in out
    assert "max |time ratio - FLOPs ratio" in out


def test_mesh_buffer_is_factored_exactly_and_saves_little_for_backward():
    from megatron_spiral.model.topology import MeshTopology, mesh_read, mesh_write, router_weights

    torch.manual_seed(0)
    length, d, T = 48, 16, 4
    slots = T + 3
    mesh = MeshTopology(d, slots, T, init_method=lambda w: torch.nn.init.normal_(w, std=0.3))
    x, v = torch.randn(length, 2, d), torch.randn(length, 2, d)
    updates = [torch.randn(length, 2, d) for _ in range(T)]

    # the materialised buffer of eq. 24-30, step by step
    memory = mesh_write(mesh.initial_memory(x), v, router_weights(mesh.write_routers[0], x))
    h_ref = mesh_read(memory, router_weights(mesh.read_routers[0], x))
    h, carrier = mesh.initial_state(x, v)
    torch.testing.assert_close(h, h_ref)
    for t in range(T):
        memory = mesh_write(memory, updates[t], router_weights(mesh.write_routers[t + 1], h_ref))
        h_ref = mesh_read(memory, router_weights(mesh.read_routers[t + 1], h_ref))
        h, carrier = mesh.update(updates[t], h, carrier, t)
        torch.testing.assert_close(h, h_ref)
        torch.testing.assert_close(mesh.materialize(carrier), memory)

    # autograd keeps per-token coefficients, not B-slot copies of [L, b, d] per update
    inputs = [t.requires_grad_() for t in (x, v, *updates)]
    known = {t.untyped_storage().data_ptr() for t in inputs} | \
        {p.untyped_storage().data_ptr() for p in mesh.parameters()}

    def saved_bytes(forward):
        saved = {}

        def pack(tensor):
            ptr = tensor.untyped_storage().data_ptr()
            if ptr not in known:
                saved[ptr] = tensor.untyped_storage().nbytes()
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            out = forward()
        return sum(saved.values()), out

    def factored():
        h, carrier = mesh.initial_state(x, v)
        for t in range(T):
            h, carrier = mesh.update(updates[t], h, carrier, t)
        return h

    def materialised():
        memory = mesh_write(mesh.initial_memory(x), v, router_weights(mesh.write_routers[0], x))
        h = mesh_read(memory, router_weights(mesh.read_routers[0], x))
        for t in range(T):
            memory = mesh_write(memory, updates[t], router_weights(mesh.write_routers[t + 1], h))
            h = mesh_read(memory, router_weights(mesh.read_routers[t + 1], h))
        return h

    new_bytes, h = saved_bytes(factored)
    old_bytes, _ = saved_bytes(materialised)
    assert old_bytes >= (T + 1) * length * 2 * d * slots * 4  # one full buffer per read
    assert new_bytes < old_bytes / 3
    h.sum().backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in inputs)
