"""SpiralBlock: pre block -> shared core over the resolution schedule -> post block (Algorithm 1).

It replaces GPTModel's decoder. Per loop iteration t (eq. 8-11, 22):

    z      = S_down(h)            causal down-scaling to L_t chunk latents
    zhat   = f_loop(z)            shared core, causal attention at length L_t
    u      = S_up(zhat)           up-scaling back to L tokens
    u~     = shift(u, s_t)        causal right shift
    h, H   = U(u~, h, H; t)       topology update (anchor or MeSH)

RoPE on the compressed sequence: latent j sits at position j (its chunk index), i.e. the core
sees an ordinary sequence of length L_t. Training, decoding and the HF export all use this.

Tensor/sequence parallelism: hidden states are [L/tp, b, d] shards under SP. Down/up-scaling
mixes neighbouring tokens and chunks straddle shard boundaries, so each iteration gathers the full
sequence, resamples it identically on every TP rank (gradients split back to shards), and
re-shards the compressed sequence (zero-padded at the end to a multiple of tp, which causal
attention ignores) for the core.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import List, Optional

import torch
from megatron.core import tensor_parallel
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_block import TransformerBlock, TransformerBlockSubmodules
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.utils import make_viewless_tensor

from megatron_spiral.config import SpiralConfig
from megatron_spiral.model.recompute import checkpointed, stack_recompute_overrides
from megatron_spiral.model.resampling import Resampler, causal_shift, pad_to_multiple
from megatron_spiral.model.topology import build_topology


def _stack(config: TransformerConfig, layer_spec: ModuleSpec, num_layers: int, pg_collection,
           inside_loop_checkpoint: bool = False):
    if num_layers == 0:
        return None
    # Each stack is its own megatron block: its checkpoint layer axis has num_layers entries.
    # (The scaled output-projection init already fixed in ``config`` keeps using the model depth.)
    recompute = stack_recompute_overrides(config, num_layers, inside_loop_checkpoint)
    return TransformerBlock(
        config=dataclasses.replace(config, num_layers=num_layers, **recompute),
        spec=TransformerBlockSubmodules(layer_specs=[layer_spec] * num_layers, layer_norm=None),
        post_layer_norm=False,
        pre_process=True,
        post_process=False,
        pg_collection=pg_collection,
    )


class UntiedCore(MegatronModule):
    """One core stack per loop iteration (``untie_core``): pass t runs ``passes[t]``.

    Checkpoint keys are ``core.passes.{t}.layers.{i}...``; each pass is its own megatron block,
    so TP-sharded weights keep their sharding in dist_checkpointing."""

    def __init__(self, config: TransformerConfig, stacks) -> None:
        super().__init__(config=config)
        self.passes = torch.nn.ModuleList(stacks)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None):
        # A plain ModuleList child would be saved as replicated tensors; delegate per pass.
        out = {}
        for t, stack in enumerate(self.passes):
            out.update(stack.sharded_state_dict(f"{prefix}passes.{t}.", sharded_offsets, metadata))
        return out


def scale_embeddings(embeddings: torch.Tensor, multiplier: float) -> torch.Tensor:
    """x <- x * sqrt(d) before the first layer (MeSH paper App. B); identity at multiplier 1."""
    return embeddings if multiplier == 1.0 else embeddings * multiplier


class SpiralBlock(MegatronModule):
    """The decoder of SpiralGPTModel. A non-looped layout is just the pre stack."""

    def __init__(
        self,
        config: TransformerConfig,
        spiral: SpiralConfig,
        layer_spec: ModuleSpec,
        norm_module,
        pg_collection=None,
        recompute_loop: bool = False,
    ) -> None:
        super().__init__(config=config)
        self.spiral = spiral
        # --spiral-recompute-loop: each loop iteration is checkpointed whole (model/recompute.py)
        self.recompute_loop = recompute_loop
        layout = spiral.parsed_layout
        self.input_tensor = None  # pipeline-schedule interface of TransformerBlock
        self.tp_size = config.tensor_model_parallel_size
        self.sequence_parallel = config.sequence_parallel

        self.pre = _stack(config, layer_spec, layout.num_pre, pg_collection)
        core_stack = functools.partial(_stack, config, layer_spec, layout.num_loop, pg_collection,
                                       inside_loop_checkpoint=recompute_loop)
        if spiral.num_core_copies > 1:
            self.core = UntiedCore(config, [core_stack() for _ in range(spiral.num_core_copies)])
        else:
            self.core = core_stack()
        self.embedding_multiplier = spiral.embedding_multiplier
        self.post = _stack(config, layer_spec, layout.num_post, pg_collection)
        self.final_layernorm = build_module(
            norm_module, config=config, hidden_size=config.hidden_size, eps=config.layernorm_epsilon)

        self.resamplers = torch.nn.ModuleList(
            Resampler(config.hidden_size, g, omega, s, spiral.downscale, spiral.upscale,
                      init_method=config.init_method, params_dtype=config.params_dtype)
            for g, omega, s in zip(spiral.chunk_sizes, spiral.chunk_offsets, spiral.shifts)
        )
        self.topology = None
        if layout.is_looped:
            self.topology = build_topology(
                spiral.topology, config.hidden_size, spiral.num_mesh_slots, layout.num_iterations,
                init_method=config.init_method, sequence_parallel=config.sequence_parallel,
                params_dtype=config.params_dtype, router_init=spiral.mesh_router_init)
        # Optional observer called as hook(t, update) with the shifted update u~ of iteration t
        # (full sequence); used for per-loop diagnostics. None in normal runs.
        self.update_hook = None

    def set_input_tensor(self, input_tensor: torch.Tensor) -> None:
        self.input_tensor = input_tensor

    # ---------------------------------------------------------------- sequence-parallel helpers
    def _full_sequence(self, hidden: torch.Tensor) -> torch.Tensor:
        """All-gather SP shards; downstream work is replicated, so the backward just splits."""
        if not self.sequence_parallel:
            return hidden
        return tensor_parallel.gather_from_sequence_parallel_region(
            hidden, tensor_parallel_output_grad=False)

    def _local_shard(self, hidden: torch.Tensor) -> torch.Tensor:
        if not self.sequence_parallel:
            return hidden
        shard = tensor_parallel.scatter_to_sequence_parallel_region(hidden)
        # megatron's split returns a view: whoever saves the shard would keep all TP shards alive
        return shard.clone() if shard.untyped_storage().nbytes() > shard.nbytes else shard

    # ---------------------------------------------------------------- Algorithm 1
    def loop_iteration(self, t: int, state: torch.Tensor, rotary_pos_emb) -> torch.Tensor:
        """One multi-resolution step: returns the shifted update u~^(t) on the local shard."""
        length = state.shape[0] * (self.tp_size if self.sequence_parallel else 1)
        if (self.recompute_loop and self.training and torch.is_grad_enabled()
                and self.resamplers[t].num_chunks(length) > 0):  # else there is nothing to redo
            # keep only the input state; the backward re-runs down -> core -> up -> shift
            shifted = checkpointed(functools.partial(self._iteration_update, t), state, rotary_pos_emb)
        else:
            shifted = self._iteration_update(t, state, rotary_pos_emb)
        if self.update_hook is not None:  # outside the checkpoint: called once per forward
            with torch.no_grad():
                self.update_hook(t, self._full_sequence(shifted))
        return shifted

    def _iteration_update(self, t: int, state: torch.Tensor, rotary_pos_emb) -> torch.Tensor:
        """Eq. 8-10 and 22 of iteration t: u~^(t) = shift(S_up(f(S_down(h)))), on the local shard."""
        resampler = self.resamplers[t]
        if resampler.chunk_size == 1 and resampler.shift == 0:
            # identity resampling: the core runs on the local shard as it is (no gather/scatter,
            # no full-length copy of the state for autograd to keep), and under loop recompute
            # the checkpoint returns the core output itself: a view of it would keep megatron's
            # bias-dropout-add graph (its masks, recorded under enable_grad) alive
            return self.core_stack(t)(hidden_states=state, attention_mask=None,
                                      rotary_pos_emb=rotary_pos_emb)  # eq. 9
        full_state = self._full_sequence(state)
        length = full_state.shape[0]
        num_latents = resampler.num_chunks(length)
        if num_latents == 0:  # sequence shorter than one chunk: nothing is causal-safe to add
            return torch.zeros_like(state)
        latents = resampler.downscale(full_state)  # eq. 8
        multiple = self.tp_size if self.sequence_parallel else 1
        core_input = self._local_shard(pad_to_multiple(latents, multiple))
        core_rope = None if rotary_pos_emb is None else rotary_pos_emb[: core_input.shape[0] * multiple]
        core_output = self.core_stack(t)(hidden_states=core_input, attention_mask=None,
                                         rotary_pos_emb=core_rope)  # eq. 9
        core_output = self._full_sequence(core_output)[:num_latents]
        update = resampler.upscale(core_output, length)  # eq. 10
        return self._local_shard(causal_shift(update, resampler.shift))  # eq. 22

    def core_stack(self, t: int) -> TransformerBlock:
        """The core weights of iteration t: the shared stack, or pass t's own when untied."""
        return self.core.passes[t] if isinstance(self.core, UntiedCore) else self.core

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        rotary_pos_emb: Optional[torch.Tensor] = None,
        inference_context=None,
        **unused,
    ) -> torch.Tensor:
        if inference_context is not None:
            raise NotImplementedError(
                "megatron's inference contexts are not used by SpiralFormer; decode with "
                "megatron_spiral.inference (chunk-triggered caches, Algorithm 2)")
        if self.input_tensor is not None:  # pipeline stage input, mirrors TransformerBlock
            hidden_states = self.input_tensor
        else:  # x is the scaled embedding everywhere it is used (first layer, MeSH slot 0)
            hidden_states = scale_embeddings(hidden_states, self.embedding_multiplier)
        embeddings = hidden_states
        pre_output = self._run(self.pre, embeddings, rotary_pos_emb)  # v = f_pre(x)
        state = pre_output
        if self.topology is not None:
            state, carrier = self.topology.initial_state(embeddings, pre_output)
            for t in range(len(self.resamplers)):
                update = self.loop_iteration(t, state, rotary_pos_emb)
                state, carrier = self.topology.update(update, state, carrier, t)  # eq. 11
        output = self.final_layernorm(self._run(self.post, state, rotary_pos_emb))
        return make_viewless_tensor(inp=output, requires_grad=True, keep_graph=True)

    @staticmethod
    def _run(stack: Optional[TransformerBlock], hidden: torch.Tensor, rotary_pos_emb):
        if stack is None:
            return hidden
        return stack(hidden_states=hidden, attention_mask=None, rotary_pos_emb=rotary_pos_emb)

    @property
    def layers(self) -> List[torch.nn.Module]:
        """Every unique layer (pre, core, post); megatron's schedules iterate ``decoder.layers``."""
        stacks = [self.pre, *(self.core_stack(t) for t in range(self.spiral.num_core_copies)), self.post]
        return [layer for stack in stacks if stack is not None for layer in stack.layers]
