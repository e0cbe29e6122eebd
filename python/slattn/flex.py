"""A slattn routing plan as a FlexAttention BlockMask: the critical blocks as
full blocks, so FlexAttention computes exactly SLA's sparse branch. Used by
`slattn bench` for a side-by-side comparison and by the tests as an
independent implementation of the sparse branch."""

from __future__ import annotations

import torch

from .plan import RoutingPlan


def block_mask_from_plan(plan: RoutingPlan):
    """The BlockMask of `plan` (torch.nn.attention.flex_attention, PyTorch >= 2.5)."""
    from torch.nn.attention.flex_attention import BlockMask

    # No partial blocks: every critical block is attended in full, and FlexAttention masks the
    # ragged tails itself from the sequence lengths.
    no_partial = torch.zeros_like(plan.row_count)
    return BlockMask.from_kv_blocks(no_partial, torch.zeros_like(plan.row_index), plan.row_count,
                                    plan.row_index.clamp(min=0), BLOCK_SIZE=(plan.block_q, plan.block_k),
                                    mask_mod=None, seq_lengths=(plan.q_len, plan.k_len))


_compiled = None


def flex_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: RoutingPlan,
                          scale: float | None = None) -> torch.Tensor:
    """SLA's sparse branch (Os) through compiled FlexAttention; (B, H, L, D) inputs."""
    global _compiled
    from torch.nn.attention.flex_attention import flex_attention

    if _compiled is None:
        _compiled = torch.compile(flex_attention, dynamic=False)  # block sizes and lengths differ per call site
    return _compiled(q, k, v, block_mask=block_mask_from_plan(plan), scale=scale,
                     enable_gqa=q.shape[1] != k.shape[1])
