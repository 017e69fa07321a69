"""What the user sees: Megatron-LM's log line and validation block, TensorBoard and W&B scalars
(Megatron-LM's tags), MFU, loop diagnostics."""

from __future__ import annotations

import math
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
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


def megatron_timestamp() -> str:
    """Megatron-LM's log-line prefix clock (training_log: '%Y-%m-%d %H:%M:%S.%f')."""
    return datetime.now().strftime("%Y-%m-%d %H:%M:%S.%f")


class ScalarWriter:
    """TensorBoard and Weights & Biases, written on the last rank as Megatron-LM does: each TB tag
    optionally with its ``<tag> vs samples`` twin; W&B gets the plain tag at the iteration."""

    def __init__(self, tensorboard_dir: Optional[str] = None, queue_size: int = 1000,
                 wandb_run=None) -> None:
        self.tensorboard = None
        if tensorboard_dir and is_last_rank():
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(log_dir=tensorboard_dir, max_queue=queue_size)
        self.wandb = wandb_run if is_last_rank() else None

    @property
    def active(self) -> bool:
        return self.tensorboard is not None or self.wandb is not None

    def scalar(self, tag: str, value, iteration: int, samples: Optional[int] = None, wandb: bool = True) -> None:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return
        value = float(value)
        if self.tensorboard is not None:
            self.tensorboard.add_scalar(tag, value, iteration)
            if samples is not None:
                self.tensorboard.add_scalar(f"{tag} vs samples", value, samples)
        if self.wandb is not None and wandb:
            self.wandb.log({tag: value}, step=iteration)

    def flush(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.flush()

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


def init_wandb(project: Optional[str], exp_name: Optional[str], save_dir: Optional[str], config: dict):
    """Megatron-LM's _set_wandb_writer: a W&B run on the last rank only (None elsewhere / unset)."""
    if not project or not is_last_rank():
        return None
    try:
        import wandb
    except ImportError as err:
        raise RuntimeError("--wandb-project needs the wandb package: pip install 'wandb>=0.17'") from err
    os.makedirs(save_dir, exist_ok=True)
    return wandb.init(dir=save_dir, name=exp_name, project=project, config=config)


@dataclass
class LogOptions:
    """What the log line and the writers include (the logging flags)."""
    log_interval: int = 100
    tensorboard_log_interval: int = 1
    log_throughput: bool = False
    log_timers_to_tensorboard: bool = False
    log_loss_scale_to_tensorboard: bool = True
    log_validation_ppl_to_tensorboard: bool = False
    log_world_size_to_tensorboard: bool = False


@dataclass
class IterationStats:
    """One optimizer step as training_log sees it."""
    loss: float
    skipped: bool
    nan: bool
    learning_rate: float
    loss_scale: float
    grad_norm: Optional[float] = None
    params_norm: Optional[float] = None


class TrainingLogger:
    """Megatron-LM's training_log: per-step scalars every --tensorboard-log-interval, and every
    --log-interval the log line (its fields in its order, our tokens/s and MFU after them)."""

    def __init__(self, train_iters: int, flops_per_sequence: int, seq_length: int,
                 tensorboard_dir: Optional[str] = None, options: Optional[LogOptions] = None,
                 writer: Optional[ScalarWriter] = None) -> None:
        self.train_iters = train_iters
        self.flops_per_sequence = flops_per_sequence
        self.seq_length = seq_length
        self.options = options or LogOptions()
        self.peak_tflops = gpu_peak_tflops()
        self.world_size = dist.get_world_size() if dist.is_initialized() else 1
        self.writer = writer or ScalarWriter(tensorboard_dir)
        self._reset()

    def _reset(self) -> None:
        self.interval_start = time.time()
        self.advanced = self.skipped = self.nans = 0
        self.loss_sum = 0.0

    def record(self, loss: float, finite: bool, skipped: Optional[bool] = None) -> None:
        """Count one step into the interval (Megatron: advanced / skipped / nan iterations)."""
        skipped = (not finite) if skipped is None else skipped
        if skipped:
            self.skipped += 1
            self.nans += int(not finite)
        else:
            self.advanced += 1
            self.loss_sum += loss

    def write_step(self, iteration: int, consumed: int, global_batch: int, stats: IterationStats) -> None:
        """Per-iteration scalars (training_log's TensorBoard block), every --tensorboard-log-interval."""
        w, o = self.writer, self.options
        if not w.active or iteration % o.tensorboard_log_interval:
            return
        if w.wandb is not None:
            w.wandb.log({"samples vs steps": consumed}, step=iteration)
        w.scalar("learning-rate", stats.learning_rate, iteration, consumed)
        w.scalar("batch-size", global_batch, iteration, consumed)
        if not stats.skipped:
            w.scalar("lm loss", stats.loss, iteration, consumed)
        if o.log_loss_scale_to_tensorboard:
            w.scalar("loss-scale", stats.loss_scale, iteration, consumed)
        if o.log_world_size_to_tensorboard:
            w.scalar("world-size", self.world_size, iteration, consumed)
        w.scalar("grad-norm", stats.grad_norm, iteration, consumed)
        w.scalar("params-norm", stats.params_norm, iteration, consumed)

    def log(self, iteration: int, consumed: int, global_batch: int, stats: IterationStats,
            diagnostics: Dict[str, float]) -> dict:
        """The interval's log line (printed by the last rank); returns its figures."""
        elapsed = time.time() - self.interval_start
        iters = max(self.advanced + self.skipped, 1)
        seconds_per_iter = elapsed / iters
        sequences_per_sec = global_batch / max(seconds_per_iter, 1e-9)
        tokens_per_sec = sequences_per_sec * self.seq_length
        tflops_per_gpu = sequences_per_sec * self.flops_per_sequence / self.world_size / 1e12
        loss = self.loss_sum / self.advanced if self.advanced else float("nan")
        mfu = 100.0 * tflops_per_gpu / self.peak_tflops if self.peak_tflops else None
        line = megatron_log_line(
            timestamp=megatron_timestamp(), iteration=iteration, train_iters=self.train_iters, consumed=consumed,
            ms_per_iter=1000.0 * seconds_per_iter, throughput=tflops_per_gpu if self.options.log_throughput else None,
            stats=stats, global_batch=global_batch, loss=loss, skipped=self.skipped, nans=self.nans)
        line += f" tokens per second: {tokens_per_sec:.1f} |"
        if mfu is not None:
            line += f" MFU: {mfu:.1f}% |"
        print_rank_last(line)
        figures = {"lm loss": loss, "iteration-time": seconds_per_iter, "throughput": tflops_per_gpu,
                   "tokens-per-second": tokens_per_sec, "skipped-iterations": self.skipped,
                   "nan-iterations": self.nans}
        if mfu is not None:
            figures["mfu"] = mfu
        w = self.writer
        if self.options.log_timers_to_tensorboard:
            w.scalar("iteration-time", seconds_per_iter, iteration)
            if self.options.log_throughput:
                w.scalar("throughput", tflops_per_gpu, iteration)
        # Our extras (not Megatron-LM tags): tokens/s, MFU and the per-loop diagnostics.
        w.scalar("tokens-per-second", tokens_per_sec, iteration)
        if mfu is not None:
            w.scalar("mfu", mfu, iteration)
        for tag, value in diagnostics.items():
            w.scalar(tag, value, iteration)
        w.flush()
        self._reset()
        return figures

    def log_validation(self, prefix: str, iteration: int, loss: float, consumed: int) -> float:
        """evaluate_and_print_results: the dashed block; TB 'lm loss validation' (+ vs samples,
        + ppl with --log-validation-ppl-to-tensorboard); W&B 'lm loss validation'. As in
        Megatron-LM, the final test-set result is written under the same tags."""
        ppl = math.exp(min(20.0, loss))
        line = f" validation loss at {prefix} | lm loss value: {loss:.6E} | lm loss PPL: {ppl:.6E} | "
        rule = "-" * (len(line) + 1)
        print_rank_last(f"{rule}\n{line}\n{rule}")
        self.writer.scalar("lm loss validation", loss, iteration, consumed)
        if self.options.log_validation_ppl_to_tensorboard:
            self.writer.scalar("lm loss validation ppl", ppl, iteration, consumed, wandb=False)
        self.writer.flush()
        return ppl

    def close(self) -> None:
        self.writer.close()


def megatron_log_line(timestamp: str, iteration: int, train_iters: int, consumed: int, ms_per_iter: float,
                      throughput: Optional[float], stats: IterationStats, global_batch: int, loss: float,
                      skipped: int, nans: int) -> str:
    """Megatron-LM's training_log string, field for field (lm loss only when positive, grad/params
    norm only when known, as there)."""
    s = f" [{timestamp}]"
    s += " iteration {:8d}/{:8d} |".format(iteration, train_iters)
    s += " consumed samples: {:12d} |".format(consumed)
    s += " elapsed time per iteration (ms): {:.1f} |".format(ms_per_iter)
    if throughput is not None:
        s += f" throughput per GPU (TFLOP/s/GPU): {throughput:.1f} |"
    s += f" learning rate: {stats.learning_rate:.6E} |"
    s += f" global batch size: {global_batch:5d} |"
    if loss > 0.0:  # NaN (every step skipped) fails this too, as in Megatron-LM
        s += " lm loss: {:.6E} |".format(loss)
    s += f" loss scale: {stats.loss_scale:.1f} |"
    if stats.grad_norm is not None:
        s += f" grad norm: {stats.grad_norm:.3f} |"
    if stats.params_norm is not None:
        s += f" params norm: {stats.params_norm:.3f} |"
    s += " number of skipped iterations: {:3d} |".format(skipped)
    s += " number of nan iterations: {:3d} |".format(nans)
    return s


def params_l2_norm(model) -> float:
    """L2 norm of all parameters, each counted once over tensor-parallel shards (Megatron-LM's
    calc_params_l2_norm): TP-sharded squares are summed over the TP group, replicated ones not."""
    from megatron.core import parallel_state

    sharded = torch.zeros(1, dtype=torch.float64)
    replicated = torch.zeros(1, dtype=torch.float64)
    for param in model.parameters():
        square = param.detach().double().pow(2).sum().cpu()
        if getattr(param, "tensor_model_parallel", False):
            sharded += square
        else:
            replicated += square
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    sharded = sharded.to(device)
    if parallel_state.get_tensor_model_parallel_world_size() > 1:
        dist.all_reduce(sharded, group=parallel_state.get_tensor_model_parallel_group())
    return float((sharded.cpu() + replicated).sqrt())


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
