"""Workaround for megatron-core 0.16's DistributedOptimizer over plain ``torch.optim.Adam``.

On every machine without apex/Transformer Engine (fused Adam), loading a ``fully_reshardable``
optimizer checkpoint gives Adam a ``step`` state that the checkpoint's per-parameter tensors do
not carry, and ``_set_main_param_and_optimizer_states`` then fails with ``KeyError: 'step'``.
The patched method copies the tensors the checkpoint has and leaves ``step`` to megatron's own
step handling (which megatron_spiral.training.checkpoint then unties per parameter).
"""

from __future__ import annotations

_APPLIED = False


def enable_torch_adam_fixes() -> None:
    global _APPLIED
    if _APPLIED:
        return
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    original = DistributedOptimizer._set_main_param_and_optimizer_states

    def set_main_param_and_optimizer_states(self, model_param, tensors):
        if self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
            return original(self, model_param, tensors)
        group_index, group_order = self.model_param_group_index_map[model_param]
        main_param = self.optimizer.param_groups[group_index]["params"][group_order]
        destinations = {"param": main_param, **self.optimizer.state[main_param]}
        for key, source in tensors.items():
            destinations[key].copy_(source)

    DistributedOptimizer._set_main_param_and_optimizer_states = set_main_param_and_optimizer_states
    _APPLIED = True
