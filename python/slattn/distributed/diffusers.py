"""SLA with diffusers' Ulysses context parallelism, forward and backward.

diffusers (>= 0.35) parallelises attention by sequence with
`model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=P))`:
hooks shard the model's inputs by sequence (its `_cp_plan`), and each
processor's `dispatch_attention_fn(..., parallel_config=...)` reaches a
backend registered with `supports_context_parallel=True`, which runs
`TemplatedUlyssesAttention`. That is no clean hook for SLA:
- backends are keyed by the closed enum `AttentionBackendName`, so a new
  backend ("slattn") cannot be registered without patching diffusers;
- the templated path is an `autograd.Function` over a backend's
  `forward_op` / `backward_op` pair whose backward returns gradients for q, k,
  v only. Served by SLA through the SDPA patch (plain `apply_sla` after
  `enable_parallelism`), the forward would be SLA over whole sequences, but the
  backward recomputes SDPA outside the patch (dense attention's gradients)
  and SLA's weights would get none. With `apply_sla` *before* it, attention
  would stay on each rank's shard. A plain SLA processor therefore refuses to
  run under diffusers' context parallelism, either way round.

`apply_sla_ulysses(model, config)` is the closest working integration: the
SLA processors switch diffusers' own Ulysses off for their attention call and
put slattn's (`ulysses_attention`, autograd through functional collectives)
around the SDPA that SLA serves, over the same ulysses mesh group. diffusers'
input sharding and output gathering stay as they are.

Gradients: diffusers gathers the output on every rank, so each rank's loss is
the whole loss, and each rank's gradient of a replicated weight (SLA's
included) holds only its own tokens' and heads' share: reduce them with SUM
(DDP averages; scale the loss by P or register a summing comm hook).
"""

from __future__ import annotations

import contextlib
import functools
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

from ..integrations.diffusers import SLAProcessor, apply_sla
from ..integrations.sdpa import SLAController
from .ulysses import ulysses_attention


class UlyssesSLAProcessor(SLAProcessor):
    """An SLAProcessor whose attention runs over whole sequences with slattn's Ulysses over `group`."""

    def __init__(self, original, controller: SLAController, head_dim: int, *, group: dist.ProcessGroup):
        super().__init__(original, controller, head_dim)
        self._group = group

    @contextlib.contextmanager
    def _attention_scope(self):
        # Off for this call: diffusers' Ulysses would cut SLA's weights out of the backward (module docstring).
        had_config = hasattr(self.original, "_parallel_config")
        config = getattr(self.original, "_parallel_config", None)
        if had_config:
            self.original._parallel_config = None
        sla_sdpa = torch.nn.functional.scaled_dot_product_attention  # the controller's, pinned to this layer

        def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
            if attn_mask is not None:
                # The mask was made for this rank's tokens; after the all-to-all the queries are all tokens.
                raise ValueError("attn_mask: slattn's Ulysses path takes no attention mask")
            attention = functools.partial(sla_sdpa, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                                          enable_gqa=enable_gqa)
            return ulysses_attention(query, key, value, attention, self._group, layout="HND",
                                     attention_layout="HND")

        torch.nn.functional.scaled_dot_product_attention = sdpa
        try:
            yield
        finally:
            torch.nn.functional.scaled_dot_product_attention = sla_sdpa
            if had_config:
                self.original._parallel_config = config


def ulysses_group(model: nn.Module) -> dist.ProcessGroup:
    """The process group of the ulysses dimension of `model`'s diffusers context-parallel config."""
    parallel = getattr(model, "_parallel_config", None)
    cp = getattr(parallel, "context_parallel_config", None)
    if cp is None:
        raise ValueError(f"model: {type(model).__name__} has no context parallelism; call "
                         "model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=P)) first")
    if cp.ring_degree > 1:
        raise ValueError(f"model: ring_degree={cp.ring_degree}; ring attention splits each head's keys across ranks, "
                         "and SLA routes over all key blocks of a head, so only Ulysses (ring_degree=1) serves it")
    if getattr(cp, "ulysses_anything", False):
        raise ValueError("model: ulysses_anything shards sequences unevenly; slattn's Ulysses needs equal shards")
    # diffusers keeps the mesh in a private field; its public `mesh` is only set when the user passed one.
    return cp._ulysses_mesh.get_group()


def apply_sla_ulysses(model: nn.Module, config=None, *, select: Callable[[str, nn.Module], bool] | None = None
                      ) -> SLAController:
    """`apply_sla` for a model with diffusers' Ulysses context parallelism enabled
    (call `model.enable_parallelism` first); returns the controller."""
    group = ulysses_group(model)
    return apply_sla(model, config, select=select,
                     make_processor=functools.partial(UlyssesSLAProcessor, group=group))
