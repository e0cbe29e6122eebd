"""Wall-clock timing of device work: synchronise around the region, warm up
first, report the median of several runs (median_seconds: one call and its
synchronisation, what a single call waits), or the time per call of calls
issued back to back (back_to_back_seconds: what a model's layers see when
the host runs ahead of the device)."""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn: Callable[[], object], device, *, warmup: int = 1, repeats: int = 3) -> float:
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    _sync(device)
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def back_to_back_seconds(fn: Callable[[], object], device, *, calls: int, warmup: int = 1) -> float:
    """Time per call of `calls` calls issued one after another and synchronised once, after the last."""
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    _sync(device)
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    _sync(device)
    return (time.perf_counter() - start) / calls
