"""Moving shapes: a deterministic, procedurally generated video dataset with the
structure that makes attention in a video DiT sparse.

Each clip is a textured background that pans (a drifting colour grating, like a
camera move) under two to `max_shapes` textured shapes (discs, ellipses, rounded
squares) that move at constant velocity, bounce off the frame edges, rotate, and
occlude one another in a fixed depth order. Their stripe textures are fixed in the
shape's own frame, so texture moves with the shape: what a token at frame t needs
is mostly near it in space and in the frames around t, which is what SLA's routing
relies on. Values lie in [-1, 1]; a clip is (3, frames, height, width).

Clip `i` of a split is drawn from its own generator, seeded from (seed, split, i),
so it is the same whatever else is generated, on any device; the splits draw
from disjoint index ranges."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from tqdm import tqdm

CHANNELS = 3
# Disjoint index ranges per split: clip i of "val" is clip SPLITS["val"] + i of one sequence.
SPLITS = {"train": 0, "val": 1 << 24, "holdout": 2 << 24}
RENDER_CHUNK = 32  # clips rendered together: (chunk, shapes, T, H, W) floats at a time


def _check_positive(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


@dataclass(frozen=True)
class MovingShapes:
    frames: int
    height: int
    width: int
    max_shapes: int = 4
    seed: int = 0

    def __post_init__(self):
        for name in ("frames", "height", "width"):
            _check_positive(name, getattr(self, name))
        if isinstance(self.max_shapes, bool) or not isinstance(self.max_shapes, int) or self.max_shapes < 2:
            raise ValueError(f"max_shapes must be an integer >= 2, got {self.max_shapes!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {self.seed!r}")

    @property
    def clip_shape(self) -> tuple[int, int, int, int]:
        return (CHANNELS, self.frames, self.height, self.width)

    def clips(self, split: str, count: int, *, start: int = 0, device="cpu", progress: bool = False) -> torch.Tensor:
        """Clips start .. start + count - 1 of `split` ("train", "val", "holdout"): (count, 3, T, H, W) float32."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {', '.join(map(repr, SPLITS))}, got {split!r}")
        _check_positive("count", count)
        if isinstance(start, bool) or not isinstance(start, int) or start < 0:
            raise ValueError(f"start must be a non-negative integer, got {start!r}")
        first = SPLITS[split] + start
        parts = []
        for offset in tqdm(range(0, count, RENDER_CHUNK), desc=f"rendering {split} clips", disable=not progress):
            indices = range(first + offset, first + min(count, offset + RENDER_CHUNK))
            params = _stack([self._draw(i) for i in indices], torch.device(device))
            parts.append(self._render(params))
        return torch.cat(parts)

    # ------------------------------------------------------------ parameters
    def _draw(self, index: int) -> dict[str, torch.Tensor]:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        s = self.max_shapes

        def uniform(low, high, *shape):
            return low + (high - low) * torch.rand(*shape, generator=gen)

        present = torch.ones(s)
        present[2:] = (torch.rand(s - 2, generator=gen) < 0.6).float()  # two shapes always, more at random
        size = uniform(0.10, 0.24, s, 2)                                  # half-axes, fractions of the frame
        return {
            "bg_colors": uniform(-0.7, 0.7, 2, CHANNELS),
            "bg_wave": torch.cat([uniform(1.0, 3.0, 1), uniform(0, math.pi, 1), uniform(0, 2 * math.pi, 1),
                                  uniform(-0.06, 0.06, 1)]),               # cycles/frame, angle, phase, drift
            "present": present,
            "centre": uniform(0.25, 0.75, s, 2),
            "velocity": uniform(-0.05, 0.05, s, 2),                      # frame fractions per frame
            "size": size,
            "roundness": torch.where(torch.rand(s, generator=gen) < 0.5, 2.0, 6.0),  # ellipse or rounded square
            "angle": uniform(0, math.pi, s),
            "spin": uniform(-0.15, 0.15, s),                             # radians per frame
            "color": uniform(-1.0, 1.0, s, CHANNELS),
            "stripes": torch.stack([uniform(1.5, 4.0, s), uniform(0, 2 * math.pi, s), uniform(0.2, 0.5, s)], -1),
        }

    # ------------------------------------------------------------ rendering
    def _render(self, p: dict[str, torch.Tensor]) -> torch.Tensor:
        device = p["present"].device
        t = torch.arange(self.frames, dtype=torch.float32, device=device)[:, None, None]  # (T, 1, 1)
        y = ((torch.arange(self.height, device=device) + 0.5) / self.height)[None, :, None]
        x = ((torch.arange(self.width, device=device) + 0.5) / self.width)[None, None, :]

        # Background: a grating between two colours, drifting across the frame (a pan).
        freq, theta, phase, drift = (p["bg_wave"][:, i, None, None, None] for i in range(4))  # (N, 1, 1, 1)
        along = x * torch.cos(theta) + y * torch.sin(theta)
        mix = 0.5 + 0.5 * torch.sin(2 * math.pi * (freq * along - drift * t) + phase)       # (N, T, H, W)
        colors = p["bg_colors"][:, :, :, None, None, None]                                   # (N, 2, C, 1, 1, 1)
        video = colors[:, 0] + (colors[:, 1] - colors[:, 0]) * mix[:, None]                  # (N, C, T, H, W)

        # Shapes in depth order: each one paints over those before it.
        for s in range(self.max_shapes):
            def shape_param(name, i=None):
                v = p[name][:, s] if i is None else p[name][:, s, i]
                return v[:, None, None, None]                                                 # (N, 1, 1, 1)

            cy = _bounce(shape_param("centre", 0) + shape_param("velocity", 0) * t, shape_param("size", 0))
            cx = _bounce(shape_param("centre", 1) + shape_param("velocity", 1) * t, shape_param("size", 1))
            angle = shape_param("angle") + shape_param("spin") * t
            dy, dx = y - cy, x - cx                                                           # (N, T, H, W)
            u = dx * torch.cos(angle) + dy * torch.sin(angle)                                 # shape's own frame
            w = -dx * torch.sin(angle) + dy * torch.cos(angle)
            a, b, power = shape_param("size", 1), shape_param("size", 0), shape_param("roundness")
            radius = ((u / a).abs() ** power + (w / b).abs() ** power) ** (1 / power)        # < 1 inside
            # A one-pixel ramp at the edge: anti-aliased, so the motion between frames is smooth.
            alpha = ((1 - radius) * torch.minimum(a, b) * min(self.height, self.width) + 0.5).clamp(0, 1)
            alpha = alpha * shape_param("present")
            frequency, stripe_phase, contrast = (shape_param("stripes", i) for i in range(3))
            texture = contrast * torch.sin(2 * math.pi * frequency * u / a + stripe_phase)   # moves with the shape
            color = p["color"][:, s, :, None, None, None] + texture[:, None]                 # (N, C, T, H, W)
            video = video + alpha[:, None] * (color - video)
        return video.clamp(-1, 1)


def _bounce(position: torch.Tensor, half_size: torch.Tensor) -> torch.Tensor:
    """`position` folded into [half_size, 1 - half_size]: a shape that meets an edge comes back."""
    low, span = half_size, 1 - 2 * half_size
    phase = torch.remainder((position - low) / span, 2.0)
    return low + span * (1 - (1 - phase).abs())


def _stack(draws: list[dict[str, torch.Tensor]], device: torch.device) -> dict[str, torch.Tensor]:
    return {key: torch.stack([d[key] for d in draws]).to(device) for key in draws[0]}
