"""Balancing heads across Ulysses ranks when their costs differ.

Ulysses gives rank r the heads `permutation[r*Hl:(r+1)*Hl]`; a step waits for
the slowest rank, so heads whose sparse branch does more work (higher
density) are spread out. SLA's own top-k gives every head the same count of
critical blocks per query block, so its heads cost the same; costs differ
with plans built by `plan_from_block_map` (per-head patterns), per-head top-k
of your own, or measured per-head times.
"""

from __future__ import annotations

import math

import torch

from ..plan import CRITICAL, RoutingPlan


def head_densities(plan: RoutingPlan) -> torch.Tensor:
    """Per query head, the fraction of (query block, key block) pairs computed
    exactly, averaged over the batch: (H,) float64 on the CPU."""
    if not isinstance(plan, RoutingPlan):
        raise ValueError(f"plan must be a slattn.RoutingPlan, got {type(plan).__name__}")
    return (plan.block_map == CRITICAL).to(torch.float64).mean(dim=(0, 2, 3)).cpu()


def _check_costs(costs) -> list[float]:
    values = torch.as_tensor(costs, dtype=torch.float64)
    if values.dim() != 1 or values.numel() == 0:
        raise ValueError(f"costs must be a non-empty 1-D sequence (one cost per head), got shape {tuple(values.shape)}")
    if not torch.isfinite(values).all() or (values < 0).any():
        raise ValueError("costs must be finite and non-negative")
    return values.tolist()


def _check_world_size(world_size) -> None:
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive integer, got {world_size!r}")


def balance_heads(costs, world_size: int, *, group_size: int = 1) -> torch.Tensor:
    """A head permutation (int64, (H,)) that spreads `costs` (one per query head)
    over `world_size` ranks of H / world_size heads each.

    Greedy, largest first: each head (or, with grouped-query attention,
    each group of `group_size` q heads sharing a k/v head, kept together and
    in order) goes to the least-loaded rank that has room. Ties go to the lower
    index, so every rank computes the same permutation from the same costs;
    give every rank identical costs (measured on one rank and broadcast, or
    all-reduced)."""
    values = _check_costs(costs)
    _check_world_size(world_size)
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive integer, got {group_size!r}")
    heads = len(values)
    if heads % group_size:
        raise ValueError(f"group_size={group_size} does not divide the {heads} heads of costs")
    groups = heads // group_size
    if groups % world_size:
        raise ValueError(f"world_size={world_size} ranks cannot share {groups} head groups evenly")
    group_costs = [math.fsum(values[g * group_size:(g + 1) * group_size]) for g in range(groups)]
    room = groups // world_size
    loads = [0.0] * world_size
    members: list[list[int]] = [[] for _ in range(world_size)]
    for g in sorted(range(groups), key=lambda g: (-group_costs[g], g)):
        rank = min((r for r in range(world_size) if len(members[r]) < room), key=lambda r: (loads[r], r))
        members[rank].append(g)
        loads[rank] += group_costs[g]
    order = [h for rank in members for g in sorted(rank) for h in range(g * group_size, (g + 1) * group_size)]
    return torch.tensor(order, dtype=torch.int64)


def rank_loads(costs, permutation, world_size: int) -> torch.Tensor:
    """The summed cost of each rank's heads under `permutation` (None: heads in
    order), (world_size,) float64; its max over its mean is the slowdown
    imbalance causes."""
    values = torch.tensor(_check_costs(costs), dtype=torch.float64)
    _check_world_size(world_size)
    order = torch.arange(len(values)) if permutation is None else torch.as_tensor(permutation, dtype=torch.int64)
    if sorted(order.tolist()) != list(range(len(values))):
        raise ValueError(f"permutation must be a permutation of range({len(values)})")
    if len(values) % world_size:
        raise ValueError(f"world_size={world_size} does not divide the {len(values)} heads of costs")
    return values[order].view(world_size, -1).sum(dim=1)
