"""Routing plans (SPEC section 1): route once, reuse across layers, timesteps
and the backward pass, or build one from a block map of your own."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import _C, _checks
from ._tensors import Launch, sequence_shape, view

CRITICAL, MARGINAL, NEGLIGIBLE = 1, 0, -1


@dataclass(frozen=True)
class RoutingPlan:
    """Which key blocks each query block attends to exactly.

    block_map  (B, H, Mq, Nk) int8: 1 critical, 0 marginal, -1 negligible
    row_count  (B, H, Mq)     int32: critical key blocks per query block
    row_index  (B, H, Mq, Nk) int32: those blocks ascending, then -1
    col_count  (B, H, Nk)     int32: query blocks that chose each key block
    col_index  (B, H, Nk, Mq) int32: those query blocks ascending, then -1
    H counts query heads; q_len and k_len are the token counts it was made for.
    """

    block_map: torch.Tensor
    row_count: torch.Tensor
    row_index: torch.Tensor
    col_count: torch.Tensor
    col_index: torch.Tensor
    block_q: int
    block_k: int
    q_len: int
    k_len: int

    @property
    def tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.block_map, self.row_count, self.row_index, self.col_count, self.col_index)

    @property
    def density(self) -> float:
        """Fraction of (query block, key block) pairs computed exactly."""
        # An exact count over the total (an fp32 mean is off by ~1e-8 already on small maps).
        return int((self.block_map == CRITICAL).sum()) / self.block_map.numel()

    @property
    def sparsity(self) -> float:
        """1 - density: the fraction of blocks not computed exactly."""
        return 1.0 - self.density

    def to(self, device) -> "RoutingPlan":
        return RoutingPlan(*(t.to(device) for t in self.tensors), self.block_q, self.block_k, self.q_len, self.k_len)

    def check_matches(self, q_shape, k_shape) -> None:
        """Raises ValueError unless this plan was made for these (B, H, L, D) shapes."""
        b, h = q_shape[0], q_shape[1]
        mq = -(-q_shape[2] // self.block_q)
        nk = -(-k_shape[2] // self.block_k)
        expected = (b, h, mq, nk)
        if (self.q_len, self.k_len) != (q_shape[2], k_shape[2]) or tuple(self.block_map.shape) != expected:
            raise ValueError(
                f"plan was made for q_len={self.q_len}, k_len={self.k_len}, block_map "
                f"{tuple(self.block_map.shape)}; these inputs need q_len={q_shape[2]}, k_len={k_shape[2]}, "
                f"block_map {expected} (blocks {self.block_q}x{self.block_k})")


def _plan_view(shape, tensors) -> _C.RoutingPlanView:
    return _C.RoutingPlanView(tuple(shape), tuple(t.data_ptr() for t in tensors))


def _empty_plan_tensors(b: int, h: int, mq: int, nk: int, device) -> tuple[torch.Tensor, ...]:
    return (torch.empty((b, h, mq, nk), dtype=torch.int8, device=device),
            torch.empty((b, h, mq), dtype=torch.int32, device=device),
            torch.empty((b, h, mq, nk), dtype=torch.int32, device=device),
            torch.empty((b, h, nk), dtype=torch.int32, device=device),
            torch.empty((b, h, nk, mq), dtype=torch.int32, device=device))


@torch.library.custom_op("slattn::route", mutates_args=())
def _route_op(q: torch.Tensor, k: torch.Tensor, topk: float, negligible: float, block_q: int, block_k: int,
              layout: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    _checks.check_block_sizes(block_q, block_k)
    (b, h, lq, _), (_, _, lk, _) = sequence_shape(q, layout), sequence_shape(k, layout)
    tensors = _empty_plan_tensors(b, h, -(-lq // block_q), -(-lk // block_k), q.device)
    with Launch(q.device) as launch:
        _C.route(view(q, layout), view(k, layout), topk, negligible, _plan_view((b, h, lq, lk, block_q, block_k), tensors),
                 launch.stream, launch.allocate)
    return tensors


@_route_op.register_fake
def _(q, k, topk, negligible, block_q, block_k, layout):
    (b, h, lq, _), (_, _, lk, _) = sequence_shape(q, layout), sequence_shape(k, layout)
    return _empty_plan_tensors(b, h, -(-lq // block_q), -(-lk // block_k), q.device)


@torch.library.custom_op("slattn::block_lists", mutates_args=())
def _block_lists_op(block_map: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    b, h, mq, nk = block_map.shape
    tensors = (block_map.contiguous(),) + _empty_plan_tensors(b, h, mq, nk, block_map.device)[1:]
    # The lists depend on the map alone: describe it as blocks of one token.
    with Launch(block_map.device) as launch:
        _C.build_block_lists(_plan_view((b, h, mq, nk, 1, 1), tensors), launch.stream)
    return tensors[1:]


@_block_lists_op.register_fake
def _(block_map):
    b, h, mq, nk = block_map.shape
    return _empty_plan_tensors(b, h, mq, nk, block_map.device)[1:]


def route(q: torch.Tensor, k: torch.Tensor, *, topk: float, negligible: float = 0.0, block_q: int = 64,
          block_k: int = 64, layout: str = "HND") -> RoutingPlan:
    """Pooled routing of SLA: block scores from mean-pooled Q and smoothed K,
    computed in fp32 or wider whatever the input dtype, then the top `topk`
    fraction of key blocks per query block critical and the bottom
    `negligible` fraction skipped. Routing passes no gradient."""
    _checks.check_fractions(topk, negligible)
    _checks.check_block_sizes(block_q, block_k)
    qs, ks = _checks.check_query_key(q, k, layout)
    tensors = torch.ops.slattn.route(q.detach(), k.detach(), float(topk), float(negligible), block_q, block_k, layout)
    return RoutingPlan(*tensors, block_q, block_k, qs[2], ks[2])


def plan_from_block_map(block_map: torch.Tensor, block_q: int = 64, block_k: int = 64, *, q_len: int | None = None,
                        k_len: int | None = None) -> RoutingPlan:
    """A plan from a user block map (B, H, Mq, Nk) with values in {-1, 0, 1}.

    q_len and k_len default to Mq * block_q and Nk * block_k; give them when
    the last block is partial."""
    _checks.check_block_sizes(block_q, block_k)
    if not isinstance(block_map, torch.Tensor) or block_map.dim() != 4:
        raise ValueError("block_map must be a 4-D (B, H, Mq, Nk) tensor")
    if block_map.dtype.is_floating_point or block_map.dtype.is_complex or block_map.dtype == torch.bool:
        raise ValueError(f"block_map must hold integers -1, 0, 1, got dtype {block_map.dtype}")
    _checks.check_device(block_map, "block_map")
    if block_map.numel() == 0:
        raise ValueError(f"block_map must not be empty, got shape {tuple(block_map.shape)}")
    mq, nk = block_map.shape[2], block_map.shape[3]
    q_len = mq * block_q if q_len is None else q_len
    k_len = nk * block_k if k_len is None else k_len
    for name, length, blocks, size in (("q_len", q_len, mq, block_q), ("k_len", k_len, nk, block_k)):
        if not (blocks - 1) * size < length <= blocks * size:
            raise ValueError(f"{name}={length} does not give {blocks} blocks of {size}")
    if not bool(((block_map >= NEGLIGIBLE) & (block_map <= CRITICAL)).all()):
        raise ValueError("block_map values must be -1 (negligible), 0 (marginal) or 1 (critical)")
    block_map = block_map.to(torch.int8).contiguous()
    lists = torch.ops.slattn.block_lists(block_map)
    return RoutingPlan(block_map, *lists, block_q, block_k, q_len, k_len)
