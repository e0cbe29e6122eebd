"""Host time of the SLA calls: at a shape small enough that the GPU finishes
each kernel before the host issues the next, the time per call of calls issued
back to back is the host's (Python, dispatch, launches). Prints that for
routing, the forward and forward+backward, then where a forward+backward step
spends it (the PyTorch profiler's host events, CUDA runtime calls among them;
cProfile by own time, where the core's calls count in their Python callers).
At a large shape it shows what keeps the GPU waiting between kernels (a
synchronising allocation, say).
Usage: python scripts/host_overhead.py [B,H,L,D] [block size] [rows of the profile]"""

import cProfile
import pstats
import sys

import torch

import slattn
from profile_sla import wall_ms  # this script's folder is on the path when it runs


def per_call_us(fn) -> float:
    """Back to back for about a second (at least 5 calls), after warm-up calls."""
    for _ in range(3):
        fn()
    calls = max(5, min(200, int(1e3 / wall_ms(fn, 1))))
    return 1e3 * wall_ms(fn, calls)


def main() -> None:
    shape = tuple(int(x) for x in (sys.argv[1] if len(sys.argv) > 1 else "1,2,1024,128").split(","))
    block = int(sys.argv[2]) if len(sys.argv) > 2 else 128
    rows = int(sys.argv[3]) if len(sys.argv) > 3 else 30
    q, k, v = (torch.randn(shape, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    w = (0.02 * torch.randn(shape[-1], shape[-1], device="cuda")).requires_grad_()
    b = torch.zeros(shape[-1], device="cuda", requires_grad=True)
    grad = torch.randn(shape, device="cuda", dtype=torch.bfloat16)

    def route():
        return slattn.route(q, k, topk=0.05, block_q=block, block_k=block)

    def forward():
        with torch.no_grad():
            return slattn.sparse_linear_attention(q, k, v, w, b, topk=0.05, block_q=block, block_k=block)

    def step():
        out = slattn.sparse_linear_attention(q, k, v, w, b, topk=0.05, block_q=block, block_k=block)
        torch.autograd.grad(out, (q, k, v, w, b), grad)

    print(f"shape {shape}, blocks {block}: host time per call, back to back")
    for name, fn in (("routing", route), ("forward", forward), ("fwd+bwd", step)):
        print(f"{name:>8}: {per_call_us(fn):7.1f} us")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as trace:
        for _ in range(5):
            step()
        torch.cuda.synchronize()
    print("forward+backward, 5 calls, host events by own time (CUDA runtime calls included):")
    print(trace.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(20):
        step()
    torch.cuda.synchronize()
    profiler.disable()
    print("forward+backward, 20 calls, by own time:")
    pstats.Stats(profiler).sort_stats("tottime").print_stats(rows)
    stats = torch.cuda.memory_stats()
    print(f"caching allocator: peak {stats['allocated_bytes.all.peak'] / 2**30:.1f} GiB allocated, "
          f"{stats['num_device_alloc']} device allocations, {stats['num_device_free']} frees, "
          f"{stats['num_alloc_retries']} retries (a retry frees cached blocks and synchronises)")


if __name__ == "__main__":
    main()
