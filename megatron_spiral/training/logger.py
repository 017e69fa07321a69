"""What the user sees: Megatron's log line, validation block, TensorBoard, MFU, loop diagnostics."""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from typing import Dict, Optional

import torch
import torch.distributed as dist

# Dense BF16 tensor-core peak (TFLOP/s) by GPU name fragment; first match wins.
GPU_BF16_PEAK_TFLOPS = (
    ("GB200", 2500.0), ("B200", 2250.0), ("GH200", 989.4), ("H200", 989.4), ("H100 PCIe", 756.0),
    ("H100", 989.4), ("H800", 989.4), ("A100", 312.0), ("A800", 312.0), ("L40S", 362.1),
    ("L40", 181.0), ("A6000", 154.8), ("A10", 125.0), ("L4", 121.0), ("V100", 125.0),
)


def gpu_peak_tflops() -> Optional[float]:
    """Dense BF16 peak of the detected GPU, or None (CPU / unknown GPU: no MFU)."""
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for fragment, peak in GPU_BF16_PEAK_TFLOPS:
        if fragment in name:
            return peak
    return None


def is_last_rank() -> bool:
    return not dist.is_initialized() or dist.get_rank() == dist.get_world_size() - 1


def print_rank_last(message: str) -> None:
    """Megatron prints training logs from the last rank (it holds the loss under PP)."""
    if is_last_rank():
        print(message, flush=True)


def print_rank_0(message: str) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(message, flush=True)


class TrainingLogger:
    """Accumulates per-interval figures and writes the Megatron-style log line and TensorBoard."""

    def __init__(self, train_iters: int, flops_per_sequence: int, seq_length: int,
                 tensorboard_dir: Optional[str] = None) -> None:
        self.train_iters = train_iters
        self.flops_per_sequence = flops_per_sequence
        self.seq_length = seq_length
        self.peak_tflops = gpu_peak_tflops()
        self.world_size = dist.get_world_size() if dist.is_initialized() else 1
        self.writer = None
        if tensorboard_dir and is_last_rank():
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=tensorboard_dir, max_queue=100)
        self._reset()

    def _reset(self) -> None:
        self.interval_start = time.time()
        self.interval_iters = 0
        self.loss_sum = 0.0
        self.loss_count = 0

    def record(self, loss: float, finite: bool) -> None:
        self.interval_iters += 1
        if finite:
            self.loss_sum += loss
            self.loss_count += 1

    def log(self, iteration: int, consumed: int, lr: float, global_batch: int,
            grad_norm: Optional[float], skipped: int, nans: int, diagnostics: Dict[str, float]) -> dict:
        elapsed = time.time() - self.interval_start
        iters = max(self.interval_iters, 1)
        ms_per_iter = 1000.0 * elapsed / iters
        sequences_per_sec = global_batch * iters / max(elapsed, 1e-9)
        tokens_per_sec = sequences_per_sec * self.seq_length
        tflops_per_gpu = sequences_per_sec * self.flops_per_sequence / self.world_size / 1e12
        loss = self.loss_sum / self.loss_count if self.loss_count else float("nan")
        parts = [
            f" iteration {iteration:8d}/{self.train_iters:8d}",
            f"consumed samples: {consumed:12d}",
            f"elapsed time per iteration (ms): {ms_per_iter:.1f}",
            f"throughput per GPU (TFLOP/s/GPU): {tflops_per_gpu:.3f}",
            f"tokens per second: {tokens_per_sec:.1f}",
        ]
        mfu = None
        if self.peak_tflops:
            mfu = 100.0 * tflops_per_gpu / self.peak_tflops
            parts.append(f"MFU: {mfu:.1f}%")
        parts += [
            f"learning rate: {lr:.6E}",
            f"global batch size: {global_batch:5d}",
            f"lm loss: {loss:.6E}",
            f"grad norm: {grad_norm:.3f}" if grad_norm is not None else "grad norm: n/a",
            f"number of skipped iterations: {skipped:3d}",
            f"number of nan iterations: {nans:3d}",
        ]
        print_rank_last(" | ".join(parts) + " |")
        scalars = {"lm loss": loss, "learning-rate": lr, "throughput": tflops_per_gpu,
                   "tokens-per-second": tokens_per_sec, "iteration-time": ms_per_iter / 1000.0,
                   "skipped-iterations": skipped, "nan-iterations": nans,
                   "batch-size": global_batch}
        if grad_norm is not None:
            scalars["grad-norm"] = grad_norm
        if mfu is not None:
            scalars["mfu"] = mfu
        scalars.update(diagnostics)
        self.write_scalars(scalars, iteration, consumed)
        self._reset()
        return scalars

    def log_validation(self, iteration: int, loss: float, consumed: int) -> float:
        ppl = math.exp(min(20.0, loss))
        line = (f" validation loss at iteration {iteration} | lm loss value: {loss:.6E} | "
                f"lm loss PPL: {ppl:.6E} | ")
        print_rank_last("-" * len(line) + "\n" + line + "\n" + "-" * len(line))
        self.write_scalars({"lm loss validation": loss, "lm loss validation ppl": ppl}, iteration, consumed)
        return ppl

    def write_scalars(self, scalars: Dict[str, float], iteration: int, consumed: int) -> None:
        if self.writer is None:
            return
        for key, value in scalars.items():
            if value is None or (isinstance(value, float) and math.isnan(value)):
                continue
            self.writer.add_scalar(key, value, iteration)
            if key in ("lm loss", "lm loss validation"):  # Megatron also logs against samples
                self.writer.add_scalar(f"{key} vs samples", value, consumed)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _entropy(logits: torch.Tensor) -> float:
    probs = torch.softmax(logits.detach().float(), dim=-1)
    return float(-(probs * torch.log(probs.clamp_min(1e-12))).sum(-1).mean())


@contextmanager
def loop_diagnostics(gpt_model, out: Dict[str, float]):
    """Within the block, record per-iteration update norms ||u~^(t)|| (RMS over tokens) and the
    mean entropy of MeSH's write/read router distributions into ``out``."""
    block = gpt_model.decoder
    handles = []

    def on_update(t, update):
        out[f"loop/update-norm/iter{t}"] = float(update.detach().float().norm(dim=-1).mean())

    block.update_hook = on_update
    topology = block.topology
    if topology is not None and hasattr(topology, "write_routers"):
        for kind, routers in (("write", topology.write_routers), ("read", topology.read_routers)):
            for index, router in enumerate(routers):
                name = "transitional" if index == 0 else f"iter{index - 1}"

                def hook(module, inputs, output, key=f"loop/mesh-{kind}-entropy/{name}"):
                    out[key] = _entropy(output)

                handles.append(router.register_forward_hook(hook))
    try:
        yield out
    finally:
        block.update_hook = None
        for handle in handles:
            handle.remove()
