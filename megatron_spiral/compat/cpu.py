"""Let real megatron-core 0.16 run on a CPU-only torch build with the gloo backend.

megatron-core assumes CUDA in a finite set of places (see DESIGN.md). When, and only when,
``torch.cuda.is_available()`` is False, :func:`enable_cpu_compat` redirects exactly those places to
the CPU:

* ``torch.cuda.current_device / synchronize / device(...)`` and ``Tensor.cuda()``;
* the CUDA RNG state used by the tensor-parallel RNG tracker is mapped onto the CPU generator, so
  ``get_cuda_rng_tracker().fork()`` really switches random streams on CPU;
* ``device="cuda"`` literals and ``torch.autocast("cuda")`` inside an explicit list of megatron
  modules (their module-level ``torch`` name is replaced by a proxy that rewrites the device);
* dist_checkpointing's async writer queue uses a fork context instead of spawn;
* megatron's optimizers read ``tensor.type()`` strings such as ``torch.cuda.FloatTensor`` while
  grouping parameters: their constructors see CUDA type names for CPU tensors.

On a CUDA machine it does nothing. It is idempotent.
"""

from __future__ import annotations

import contextlib
import importlib
import types
from typing import Any

import torch

_ENABLED = False

# megatron modules that create tensors with a literal device="cuda" or call torch.autocast("cuda").
_MODULES_WITH_CUDA_LITERALS = (
    "megatron.core.utils",
    "megatron.core.transformer.utils",
    "megatron.core.tensor_parallel.data",
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.optimizer.grad_scaler",
    "megatron.core.optimizer.distrib_optimizer",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.rerun_state_machine",
    "megatron.core.dist_checkpointing.exchange_utils",
    "megatron.core.dist_checkpointing.strategies.state_dict_saver",
)

_FACTORY_NAMES = (
    "tensor", "zeros", "ones", "empty", "full", "arange", "rand", "randn", "randint",
    "zeros_like", "ones_like", "empty_like", "full_like", "as_tensor", "linspace", "eye",
)


def _cpu_device(device: Any) -> Any:
    if isinstance(device, str) and device.startswith("cuda"):
        return "cpu"
    if isinstance(device, torch.device) and device.type == "cuda":
        return torch.device("cpu")
    if isinstance(device, int):
        return "cpu"
    return device


class _CpuTorchProxy(types.ModuleType):
    """Stands in for ``torch`` inside one megatron module: identical except that tensor factories
    and ``autocast`` map a CUDA device to the CPU."""

    def __init__(self) -> None:
        super().__init__("torch")

    def __getattr__(self, name: str) -> Any:
        attr = getattr(torch, name)
        if name in _FACTORY_NAMES:

            def factory(*args: Any, _fn=attr, **kwargs: Any) -> Any:
                if "device" in kwargs:
                    kwargs["device"] = _cpu_device(kwargs["device"])
                kwargs.pop("pin_memory", None)
                return _fn(*args, **kwargs)

            return factory
        if name == "autocast":

            def autocast(device_type: str = "cpu", *args: Any, **kwargs: Any) -> Any:
                return torch.autocast(_cpu_device(device_type), *args, **kwargs)

            return autocast
        return attr


class _NullDeviceContext(contextlib.ContextDecorator):
    def __init__(self, device: Any = None) -> None:
        self.device = device

    def __enter__(self) -> "_NullDeviceContext":
        return self

    def __exit__(self, *exc: Any) -> bool:
        return False


def _tensor_cuda(self: torch.Tensor, device: Any = None, non_blocking: bool = False, **kwargs: Any):
    return self


def _patch_torch_cuda() -> None:
    torch.cuda.current_device = lambda: "cpu"  # type: ignore[assignment]
    torch.cuda.synchronize = lambda device=None: None  # type: ignore[assignment]
    torch.cuda.device = _NullDeviceContext  # type: ignore[assignment,misc]
    torch.cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()  # type: ignore
    torch.cuda.set_rng_state = lambda state, device="cuda": torch.set_rng_state(state)  # type: ignore
    # torch.manual_seed itself calls torch.cuda.manual_seed_all, so seed the generator directly.
    torch.cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))  # type: ignore
    torch.Tensor.cuda = _tensor_cuda  # type: ignore[method-assign]


def _patch_rng_tracker() -> None:
    random = importlib.import_module("megatron.core.tensor_parallel.random")

    def get_state(device: Any = "cuda", clone: bool = False, graph_safe: bool = False):
        state = torch.get_rng_state()
        return state.clone() if clone else state

    def set_state(new_state: torch.Tensor, device: int = -1, graph_safe: bool = False) -> None:
        torch.set_rng_state(new_state)

    random._get_cuda_rng_state = get_state
    random._set_cuda_rng_state = set_state


def _patch_cuda_literals() -> None:
    proxy = _CpuTorchProxy()
    for name in _MODULES_WITH_CUDA_LITERALS:
        try:
            module = importlib.import_module(name)
        except ImportError:  # optional parts of megatron-core (e.g. missing extras)
            continue
        if getattr(module, "torch", None) is torch:
            module.torch = proxy


def _patch_async_checkpoint_queue() -> None:
    """The async writer's spawn-context Manager cannot start under pytest/torchrun on CPU."""
    try:
        saver = importlib.import_module("megatron.core.dist_checkpointing.strategies.filesystem_async")
    except ImportError:
        return
    import multiprocessing

    fork_ctx = multiprocessing.get_context("fork")
    mp_proxy = types.SimpleNamespace(**{k: getattr(multiprocessing, k) for k in dir(multiprocessing) if not k.startswith("__")})
    mp_proxy.get_context = lambda method=None: fork_ctx
    if hasattr(saver, "mp"):
        saver.mp = mp_proxy
    if hasattr(saver, "multiprocessing"):
        saver.multiprocessing = mp_proxy


_CUDA_TYPE_NAMES = {
    torch.float32: "torch.cuda.FloatTensor",
    torch.float16: "torch.cuda.HalfTensor",
    torch.bfloat16: "torch.cuda.BFloat16Tensor",
}


@contextlib.contextmanager
def _cuda_type_strings():
    """While active, ``tensor.type()`` (no arguments) names CPU floats as their CUDA types, which
    is what megatron's optimizers compare against when sorting parameters into groups."""
    original = torch.Tensor.type

    def type_(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is None and not kwargs and self.device.type == "cpu" and self.dtype in _CUDA_TYPE_NAMES:
            return _CUDA_TYPE_NAMES[self.dtype]
        if dtype is None:
            return original(self, **kwargs)
        return original(self, dtype, non_blocking, **kwargs)

    torch.Tensor.type = type_  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.Tensor.type = original  # type: ignore[method-assign]


def _patch_optimizer_type_checks() -> None:
    optimizer = importlib.import_module("megatron.core.optimizer.optimizer")
    distrib = importlib.import_module("megatron.core.optimizer.distrib_optimizer")
    for cls in (optimizer.Float16OptimizerWithFloat16Params, distrib.DistributedOptimizer):
        original_init = cls.__init__

        def init(self, *args, _original=original_init, **kwargs):
            with _cuda_type_strings():
                _original(self, *args, **kwargs)

        cls.__init__ = init

    clip_grads = importlib.import_module("megatron.core.optimizer.clip_grads")
    original_clip = clip_grads.clip_grad_by_total_norm_fp32

    def clip_grad_by_total_norm_fp32(*args, **kwargs):  # asserts grad.type() is a CUDA float
        with _cuda_type_strings():
            return original_clip(*args, **kwargs)

    clip_grads.clip_grad_by_total_norm_fp32 = clip_grad_by_total_norm_fp32
    for name in ("megatron.core.optimizer.optimizer", "megatron.core.optimizer.distrib_optimizer"):
        module = importlib.import_module(name)
        if hasattr(module, "clip_grad_by_total_norm_fp32"):
            module.clip_grad_by_total_norm_fp32 = clip_grad_by_total_norm_fp32


def enable_cpu_compat() -> bool:
    """Apply the CPU patches if CUDA is absent. Returns True when patches are active."""
    global _ENABLED
    if torch.cuda.is_available():
        return False
    if _ENABLED:
        return True
    _patch_torch_cuda()
    _patch_rng_tracker()
    _patch_cuda_literals()
    _patch_async_checkpoint_queue()
    _patch_optimizer_type_checks()
    _ENABLED = True
    return True


def cpu_compat_enabled() -> bool:
    return _ENABLED
