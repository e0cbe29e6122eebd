"""Per-kernel CUDA time of SLA forward+backward at one shape (torch.profiler),
then where the wall time of a forward and of a forward+backward goes: GPU busy
(kernels, copies and memsets, overlaps merged), the GPU's idle gaps between
its first and last kernel, and the time of one call with a synchronisation
against the time per call of ten calls issued back to back.
Usage: python scripts/profile_sla.py [B,H,L,D] [topk] [block size] [quantized]
(quantized: the low-bit forward, as quantization-aware training runs it)"""

import re
import sys
import time
from collections import defaultdict

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

import slattn


def kernel_intervals(prof) -> list[tuple[float, float, str]]:
    return sorted((e.time_range.start, e.time_range.end, e.name) for e in prof.events()
                  if e.device_type == DeviceType.CUDA)


def profiled_intervals(fn, grad_enabled: bool) -> list[tuple[float, float, str]]:
    """The GPU intervals of one call, in a profiling session of its own (a host
    pause inside a call cannot split it, nor merge two calls)."""
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        with torch.set_grad_enabled(grad_enabled):
            fn()
        torch.cuda.synchronize()
    return kernel_intervals(prof)


def busy_us(intervals) -> float:
    busy, end = 0.0, float("-inf")
    for start, stop, _ in intervals:
        busy += max(0.0, stop - max(start, end))
        end = max(end, stop)
    return busy


def short_name(name: str) -> str:
    name = re.sub(r"^void ", "", name)
    name = re.sub(r"\(anonymous namespace\)::|slattn::cuda::|at::native::", "", name)
    return name.split("<")[0].split("(")[0]


def kernel_table(intervals) -> str:
    totals, counts = defaultdict(float), defaultdict(int)
    for start, stop, name in intervals:
        totals[short_name(name)] += stop - start
        counts[short_name(name)] += 1
    rows = sorted(totals.items(), key=lambda item: -item[1])
    return "\n".join(f"{name:<45} {counts[name]:>3} {total / 1e3:8.3f} ms" for name, total in rows)


def wall_ms(fn, calls: int) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return 1e3 * (time.perf_counter() - start) / calls


def main() -> None:
    shape = tuple(int(x) for x in (sys.argv[1] if len(sys.argv) > 1 else "1,12,32760,128").split(","))
    topk = float(sys.argv[2]) if len(sys.argv) > 2 else 0.05
    block = int(sys.argv[3]) if len(sys.argv) > 3 else 64
    quantized = len(sys.argv) > 4 and sys.argv[4] == "quantized"
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(shape, generator=gen).to("cuda", torch.bfloat16).requires_grad_() for _ in range(3))
    w = (0.02 * torch.randn(shape[-1], shape[-1], generator=gen)).cuda().requires_grad_()
    b = torch.zeros(shape[-1], device="cuda", requires_grad=True)
    grad = torch.randn(shape, generator=gen).to("cuda", torch.bfloat16)

    def forward():
        return slattn.sparse_linear_attention(q, k, v, w, b, topk=topk, block_q=block, block_k=block,
                                              quantized=quantized)

    def step():
        torch.autograd.grad(forward(), (q, k, v, w, b), grad)  # returned, not added to .grad as in slattn bench

    def route():
        return slattn.route(q, k, topk=topk, block_q=block, block_k=block)

    calls = {"routing": route, "forward": forward, "fwd+bwd": step}
    with torch.no_grad():
        route(), forward()
    step()
    groups = [profiled_intervals(fn, name == "fwd+bwd") for name, fn in calls.items()]
    print("forward+backward, GPU time per kernel:")
    print(kernel_table(groups[-1]))
    for (name, fn), group in zip(calls.items(), groups):
        with torch.set_grad_enabled(name == "fwd+bwd"):
            single = sorted(wall_ms(fn, 1) for _ in range(5))[2]
            back_to_back = wall_ms(fn, 10)
        span = group[-1][1] - group[0][0]
        print(f"{name:>8}: GPU busy {busy_us(group) / 1e3:.3f} ms, first to last kernel {span / 1e3:.3f} ms; "
              f"one call + sync {single:.3f} ms, back to back {back_to_back:.3f} ms per call")


if __name__ == "__main__":
    main()
