"""The learned router of SLA2 (SPEC section 1): block scores from projected,
mean-pooled Q and smoothed K, and their hard classification into a block map."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from . import _C
from ._tensors import logical
from .plan import CRITICAL, MARGINAL


def check_compression(head_dim: int, compression_ratio, name: str = "compression_ratio") -> int:
    """The routing dim d / compression_ratio; ValueError naming `name` unless it divides d."""
    if isinstance(compression_ratio, bool) or not isinstance(compression_ratio, int) or compression_ratio < 1:
        raise ValueError(f"{name} must be a positive integer, got {compression_ratio!r}")
    if head_dim % compression_ratio:
        raise ValueError(f"{name}={compression_ratio} must divide the head dim {head_dim} "
                         f"(the router projects to head_dim / {name} features)")
    return head_dim // compression_ratio


def block_means(x: torch.Tensor, block: int) -> torch.Tensor:
    """(B, H, L, D) -> (B, H, ceil(L / block), D); a partial last block averages its real rows only."""
    length = x.shape[2]
    blocks = -(-length // block)
    padded = F.pad(x, (0, 0, 0, blocks * block - length))
    sums = padded.unflatten(2, (blocks, block)).sum(dim=3)
    counts = torch.full((blocks,), float(block), dtype=x.dtype, device=x.device)
    counts[-1] = length - (blocks - 1) * block
    return sums / counts[:, None]


class LearnedRouter(nn.Module):
    """S[m, n] = (Pq q̄_m) · (Pk k̄_n) / sqrt(d_r), with Pq = proj_q.weight and
    Pk = proj_k.weight of shape (d_r, d), d_r = head_dim / compression_ratio.

    Both start as the first d_r rows of the identity: with compression 1 the
    scores are the pooled router's divided by sqrt(d), which ranks the blocks
    the same way, so an untrained router routes exactly as SLA does."""

    def __init__(self, head_dim: int, compression_ratio: int = 1):
        super().__init__()
        self.routing_dim = check_compression(head_dim, compression_ratio)
        self.head_dim = head_dim
        self.proj_q = nn.Linear(head_dim, self.routing_dim, bias=False, dtype=torch.float32)
        self.proj_k = nn.Linear(head_dim, self.routing_dim, bias=False, dtype=torch.float32)
        with torch.no_grad():
            for proj in (self.proj_q, self.proj_k):
                proj.weight.copy_(torch.eye(self.routing_dim, head_dim))

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, routing_dim={self.routing_dim}"

    def block_scores(self, q: torch.Tensor, k: torch.Tensor, block_q: int, block_k: int,
                     layout: str = "HND") -> torch.Tensor:
        """(B, Hq, Mq, Nk) float64 scores. Differentiable in q, k and the
        projections; the caller detaches what must pass no gradient."""
        q64 = logical(q, layout).to(torch.float64)
        k64 = logical(k, layout).to(torch.float64)
        k64 = k64 - k64.mean(dim=2, keepdim=True)  # K~: smoothing (SPEC section 1, step 1)
        q_bar = block_means(q64, block_q) @ self.proj_q.weight.to(torch.float64).t()
        k_bar = block_means(k64, block_k) @ self.proj_k.weight.to(torch.float64).t()
        # GQA: key/value head g serves the query heads g * group ... (g + 1) * group - 1.
        k_bar = k_bar.repeat_interleave(q64.shape[1] // k64.shape[1], dim=1)
        return (q_bar @ k_bar.transpose(-1, -2)) / math.sqrt(self.routing_dim)


def critical_count(topk: float, k_blocks: int) -> int:
    """n_crit = clamp(floor(topk · Nk), 1, Nk), from the core so both routers agree on rounding."""
    return int(_C.critical_blocks_per_row(float(topk), k_blocks))


def classify(scores: torch.Tensor, topk: float) -> torch.Tensor:
    """The block map (..., Mq, Nk) int8 of SPEC section 1: per row the n_crit
    highest scores critical, the rest marginal (SLA2 has no negligible class).
    Ties go to the lower block index (a stable descending sort keeps index
    order among equals); NaN ranks last, as in the core's router."""
    n_crit = critical_count(topk, scores.shape[-1])
    keys = scores.detach()
    keys = keys.masked_fill(keys.isnan(), -math.inf)
    order = torch.sort(keys, dim=-1, descending=True, stable=True).indices
    block_map = torch.full(scores.shape, MARGINAL, dtype=torch.int8, device=scores.device)
    block_map.scatter_(-1, order[..., :n_crit], CRITICAL)
    return block_map
