"""Rectified-flow denoising for the study: the training loss, the validation loss
at fixed timesteps, and an Euler sampler.

x_t = (1 - t) x_0 + t ε with t in [0, 1]; the model predicts the velocity
ε - x_0 (the objective of Wan2.1 and other current video DiTs). The DiT's
sinusoidal timestep embedding was made for timesteps in the hundreds, so it is
given 1000 t."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

TIME_SCALE = 1000.0


def autocast(device: torch.device):
    """bf16 autocast on CUDA (what the kernels take and what the claim is about); fp32 on the CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def noisy(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    tt = t.view(-1, *([1] * (x0.dim() - 1)))
    return (1 - tt) * x0 + tt * noise


def velocity_loss(model: nn.Module, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Mean squared error of the predicted velocity at timesteps t (B,)."""
    with autocast(x0.device):
        prediction = model(noisy(x0, noise, t), TIME_SCALE * t)
    return F.mse_loss(prediction.float(), noise - x0)


def _seeded_noise(shape, seed: int, device) -> torch.Tensor:
    # Drawn on the CPU so that every device and every variant gets the same noise.
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(device)


@torch.no_grad()
def validation_losses(model: nn.Module, clips: torch.Tensor, timesteps, *, batch_size: int, seed: int,
                      progress: bool = True) -> dict[str, float]:
    """Velocity MSE on `clips` at each fixed timestep, with fixed noise: the same
    numbers for the same weights, comparable across variants. Keys are "t=0.5"."""
    was_training = model.training
    model.eval()
    losses = {}
    try:
        for i, t in enumerate(tqdm(timesteps, desc="validation loss", disable=not progress, leave=False)):
            noise = _seeded_noise(clips.shape, seed + i, clips.device)
            total = 0.0
            for start in range(0, len(clips), batch_size):
                x0, eps = clips[start:start + batch_size], noise[start:start + batch_size]
                time = torch.full((len(x0),), float(t), device=clips.device)
                total += float(velocity_loss(model, x0, eps, time)) * len(x0)
            losses[f"t={t:g}"] = total / len(clips)
    finally:
        model.train(was_training)
    return losses


@torch.no_grad()
def sample(model: nn.Module, count: int, shape, *, steps: int, batch_size: int, seed: int, device,
           progress: bool = True) -> torch.Tensor:
    """`count` clips by Euler integration of the velocity from t = 1 (noise,
    fixed by `seed`) to t = 0, clamped to the data range [-1, 1]."""
    was_training = model.training
    model.eval()
    noise = _seeded_noise((count, *shape), seed, device)
    times = torch.linspace(1.0, 0.0, steps + 1).tolist()
    out = []
    try:
        with tqdm(total=steps * -(-count // batch_size), desc="sampling", disable=not progress, leave=False) as bar:
            for start in range(0, count, batch_size):
                x = noise[start:start + batch_size]
                for t, t_next in zip(times[:-1], times[1:]):
                    with autocast(x.device):
                        v = model(x, torch.full((len(x),), TIME_SCALE * t, device=x.device)).float()
                    x = x + (t_next - t) * v
                    bar.update()
                out.append(x.clamp(-1, 1))
    finally:
        model.train(was_training)
    return torch.cat(out)
