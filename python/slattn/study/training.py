"""The training loop of the study, shared by pretraining and every variant's
fine-tuning, so that they differ in their attention only.

Step s draws its clips, timesteps and noise from a generator seeded with
(seed, s): every variant sees the same batches in the same order. AdamW with a
linear warm-up over the first 5% of steps, then a constant rate; gradients
clipped to norm 1."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch
from torch import nn
from tqdm import tqdm

from .diffusion import velocity_loss

WARMUP_FRACTION = 0.05
GRAD_CLIP = 1.0


@dataclass
class TrainLog:
    losses: list[float]       # per step
    step_seconds: float       # median wall time of a step (the first, which warms up, left out)


def batch_at(clips: torch.Tensor, step: int, batch_size: int, seed: int):
    """(x0, noise, t) of training step `step`: drawn on the CPU, so the same on every device."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
    index = torch.randint(len(clips), (batch_size,), generator=gen)
    noise = torch.randn((batch_size, *clips.shape[1:]), generator=gen)
    t = torch.rand(batch_size, generator=gen)
    return clips[index.to(clips.device)], noise.to(clips.device), t.to(clips.device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train(model: nn.Module, clips: torch.Tensor, *, steps: int, batch_size: int, lr: float, seed: int,
          params=None, desc: str = "training", progress: bool = True) -> TrainLog:
    """Trains `params` (default: every parameter that requires a gradient) for `steps` steps."""
    params = [p for p in model.parameters() if p.requires_grad] if params is None else list(params)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warmup = max(1, int(WARMUP_FRACTION * steps))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
    device = clips.device
    model.train()
    losses, seconds = [], []
    with tqdm(range(steps), desc=desc, disable=not progress) as bar:
        for step in bar:
            _sync(device)
            start = time.perf_counter()
            loss = velocity_loss(model, *batch_at(clips, step, batch_size, seed))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, GRAD_CLIP)
            optimizer.step()
            scheduler.step()
            losses.append(float(loss.detach()))  # synchronises, as the timing needs
            _sync(device)
            seconds.append(time.perf_counter() - start)
            bar.set_postfix(loss=f"{losses[-1]:.4f}", refresh=False)
    timed = seconds[1:] or seconds
    return TrainLog(losses, statistics.median(timed))
