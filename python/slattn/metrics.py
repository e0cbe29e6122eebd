"""Error measures and FLOP counts used by the demo and the benchmark."""

from __future__ import annotations

import torch

from .plan import CRITICAL, RoutingPlan


def relative_l2(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    return float((out - ref).norm() / ref.norm())


def cosine_similarity(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(out.double().flatten(), ref.double().flatten(), dim=0))


def dense_flops(batch: int, heads: int, q_len: int, k_len: int, head_dim: int) -> float:
    """4·B·H·Lq·Lk·D: the two matmuls of attention (the public reference's convention)."""
    return 4.0 * batch * heads * q_len * k_len * head_dim


def computed_flops(plan: RoutingPlan, head_dim: int) -> float:
    """4·D per (query, key) token pair in a critical block: the work the sparse branch does."""
    q_sizes = torch.full((plan.block_map.shape[2],), plan.block_q, dtype=torch.float64)
    q_sizes[-1] = plan.q_len - plan.block_q * (plan.block_map.shape[2] - 1)
    k_sizes = torch.full((plan.block_map.shape[3],), plan.block_k, dtype=torch.float64)
    k_sizes[-1] = plan.k_len - plan.block_k * (plan.block_map.shape[3] - 1)
    critical = (plan.block_map == CRITICAL).to(torch.float64).cpu()
    pairs = torch.einsum("bhmn,m,n->", critical, q_sizes, k_sizes)
    return 4.0 * head_dim * float(pairs)
