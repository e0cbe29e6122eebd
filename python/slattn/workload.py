"""A deterministic synthetic attention layer with the locality of video.

Tokens sit on a (frames, height, width) grid flattened in raster order, as in a
video DiT. Each head sees positional random Fourier features whose kernel
decays with 3-D distance (a different length scale per head), so a query
attends mostly to nearby tokens in space and time: the structure that makes a
few key blocks critical. K carries a large shared offset, as real keys do,
which SLA's smoothing removes before routing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# Wan2.1-1.3B at 480p: 21 latent frames of 30 x 52 patches, 12 heads of 128.
WAN_1_3B_480P = (21, 30, 52)
# The same aspect, about 4K tokens, for CPU runs.
CPU_GRID = (11, 15, 26)


@dataclass(frozen=True)
class Workload:
    grid: tuple[int, int, int]
    heads: int = 12
    head_dim: int = 128
    batch: int = 1
    seed: int = 0

    @property
    def tokens(self) -> int:
        return self.grid[0] * self.grid[1] * self.grid[2]

    def describe(self) -> str:
        t, h, w = self.grid
        return (f"B={self.batch} H={self.heads} L={self.tokens} ({t}x{h}x{w} frames x height x width) "
                f"D={self.head_dim}")


def _positions(grid: tuple[int, int, int]) -> torch.Tensor:
    axes = [torch.arange(n, dtype=torch.float32) for n in grid]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, 3)  # (L, 3)


def make_qkv(workload: Workload, *, dtype=torch.bfloat16, device="cpu") -> tuple[torch.Tensor, ...]:
    """q, k, v of shape (B, H, L, D), deterministic for a given workload."""
    gen = torch.Generator().manual_seed(workload.seed)
    positions = _positions(workload.grid)
    b, heads, d, length = workload.batch, workload.heads, workload.head_dim, workload.tokens
    features = 2 * d
    q = torch.empty(b, heads, length, d)
    k = torch.empty(b, heads, length, d)
    v = torch.empty(b, heads, length, d)
    for h in range(heads):
        # Length scale from 1.5 to 6 tokens: some heads local, some wider.
        length_scale = 1.5 * 4 ** (h / max(heads - 1, 1))
        freqs = torch.randn(3, features, generator=gen) / length_scale
        phases = 2 * math.pi * torch.rand(features, generator=gen)
        embedding = math.sqrt(2.0 / features) * torch.cos(positions @ freqs + phases)  # (L, F): kernel ~ exp(-r²/2ℓ²)
        mix = torch.linalg.qr(torch.randn(features, d, generator=gen))[0]  # orthonormal columns
        base = embedding @ mix * math.sqrt(features)  # (L, D), rows of norm ~ sqrt(D)
        sharpness = 1.2  # logits of neighbours ~ sharpness² · sqrt(D) · kernel: top 5% of keys hold ~90% of the mass
        for i in range(b):
            noise = lambda: 0.5 * torch.randn(length, d, generator=gen)  # noqa: E731
            q[i, h] = sharpness * base + noise()
            k[i, h] = sharpness * base + noise() + 3.0 * torch.randn(1, d, generator=gen)
            v[i, h] = torch.tanh(base @ torch.randn(d, d, generator=gen) / math.sqrt(d)) + 0.1 * noise()
    return tuple(t.to(device=device, dtype=dtype) for t in (q, k, v))
