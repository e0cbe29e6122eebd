"""Host time of the SLA calls: at a shape small enough that the GPU finishes
each kernel before the host issues the next, the time per call of calls issued
back to back is the host's (Python, dispatch, launches). Prints that for
routing, the forward and forward+backward, then where a forward+backward step
spends it (the PyTorch profiler's host events, CUDA runtime calls among them;
cProfile by own time, where the core's calls count in their Python callers).
At a large shape it shows what keeps the GPU waiting between kernels (a
synchronising allocation, say). Then each entry point at three depths (the
public function, the torch.ops op, the core's call alone with its outputs and
workspace made beforehand) with its kernels per call, which splits a call's
host time between Python, PyTorch's dispatch and the core's launches.
Usage: python scripts/host_overhead.py [B,H,L,D] [block size] [rows of the profile]"""

import cProfile
import pstats
import sys

import torch
from torch.profiler import ProfilerActivity, profile

import slattn
from slattn import _C
from slattn._tensors import Launch, view
from slattn.plan import _empty_plan_tensors, _plan_view
from profile_sla import busy_us, kernel_intervals, wall_ms  # this script's folder is on the path when it runs


def per_call_us(fn) -> float:
    """Back to back for about a second (at least 5 calls), after warm-up calls."""
    for _ in range(3):
        fn()
    calls = max(5, min(200, int(1e3 / wall_ms(fn, 1))))
    return 1e3 * wall_ms(fn, calls)


def device_operations(fn) -> str:
    """The kernels, copies and memsets one call puts on the GPU, and their busy time: a call whose host time
    is not above its busy time is bound by the GPU, not the host."""
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as trace:
        fn()
        torch.cuda.synchronize()
    intervals = kernel_intervals(trace)
    return f"{len(intervals):2d} GPU operations, busy {busy_us(intervals):6.1f} us"


@torch.library.custom_op("host_overhead::twice", mutates_args=())
def twice(x: torch.Tensor) -> torch.Tensor:
    return x * 2


twice.register_fake(lambda x: torch.empty_like(x))
twice.register_autograd(lambda ctx, grad: grad * 2)


def with_autograd(q, k, v, w, b, block) -> dict:
    """What autograd adds: PyTorch's own for a one-kernel custom op, and the SLA op's, forward and backward
    (plan given)."""
    x = torch.randn(1024, device="cuda", requires_grad=True)
    routed = slattn.route(q, k, topk=0.05, block_q=block, block_k=block)
    grad = torch.randn_like(q)

    def sla():
        return slattn.sparse_linear_attention(q, k, v, w, b, plan=routed)

    out = sla()
    return {
        "one-kernel custom op: forward": lambda: twice(x),
        "one-kernel custom op: fwd+bwd": lambda: torch.autograd.grad(twice(x), x, x),
        "SLA forward, plan given": sla,
        "SLA backward alone (autograd.grad)": lambda: torch.autograd.grad(out, (q, k, v, w, b), grad,
                                                                          retain_graph=True),
        "SLA fwd+bwd, plan given": lambda: torch.autograd.grad(sla(), (q, k, v, w, b), grad),
    }


def depths(q, k, v, w, b, block) -> dict:
    """The calls of each entry point at three depths; the core's calls get their workspace from a tensor made
    here, so that they time the core alone."""
    B, H, L, D = q.shape
    blocks = -(-L // block)
    workspace = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    stream = Launch(q.device).stream
    shape = (B, H, L, L, block, block)
    route_tensors = _empty_plan_tensors(B, H, blocks, blocks, q.device)
    routed = slattn.route(q, k, topk=0.05, block_q=block, block_k=block)
    plan = _plan_view(shape, routed.tensors)
    out, out_sparse, lse = torch.empty_like(q), torch.empty_like(q), torch.empty((B, H, L), device="cuda")
    qv, kv, vv = (view(t.detach(), "HND") for t in (q, k, v))
    dout = torch.randn_like(q)
    dq, dk, dv, dw, db = (torch.empty_like(t).detach() for t in (q, k, v, w, b))

    def core_route():  # the view is made here, as the op makes it: the tensors stay alive with this function
        return _C.route(qv, kv, 0.05, 0.0, _plan_view(shape, route_tensors), stream, lambda nbytes: workspace)

    def core_forward(projection: bool, quantized: bool = False):
        return lambda: _C.sla_forward(
            qv, kv, vv, w.data_ptr() if projection else 0, b.data_ptr() if projection else 0, 0, view(out, "HND"),
            view(out_sparse, "HND") if projection else _C.TensorView(), _C.TensorView(), lse.data_ptr(),
            D ** -0.5, "softmax", 0, 0, 0, "marginal", quantized, plan, stream, lambda nbytes: workspace)

    def op_forward(projection: bool):
        return lambda: torch.ops.slattn.sla_forward(
            q, k, v, w if projection else None, b if projection else None, *routed.tensors, block, block, D ** -0.5,
            "softmax", "marginal", "HND", False)

    def public_forward(projection: bool):
        return lambda: slattn.sparse_linear_attention(q, k, v, w if projection else None, b if projection else None,
                                                      plan=routed)

    saved_sparse, saved_lse = op_forward(True)()[1::2]
    return {
        "one PyTorch kernel (zero_ of 1 KB)": lambda: workspace[:1024].zero_(),
        "route: slattn.route": lambda: slattn.route(q, k, topk=0.05, block_q=block, block_k=block),
        "route: torch.ops.slattn.route": lambda: torch.ops.slattn.route(q, k, 0.05, 0.0, block, block, "HND"),
        "route: core": core_route,
        "sparse forward, plan given: public": public_forward(False),
        "sparse forward: torch.ops": op_forward(False),
        "sparse forward: core": core_forward(False),
        "SLA forward, plan given: public": public_forward(True),
        "SLA forward: torch.ops": op_forward(True),
        "SLA forward: core": core_forward(True),
        "SLA forward, low bits: core": core_forward(True, quantized=True),
        "SLA backward: torch.ops": lambda: torch.ops.slattn.sla_backward(
            q, k, v, saved_sparse, saved_lse, w, b, dout, None, None, *routed.tensors, block, block, D ** -0.5,
            "softmax", "marginal", "HND"),
        "SLA backward: core": lambda: _C.sla_backward(
            qv, kv, vv, view(saved_sparse, "HND"), saved_lse.data_ptr(), w.data_ptr(), True, 0, view(dout, "HND"),
            _C.TensorView(), _C.TensorView(), view(dq, "HND"), view(dk, "HND"), view(dv, "HND"), dw.data_ptr(),
            db.data_ptr(), D ** -0.5, "softmax", 0, 0, 0, 0, 0, "marginal", plan, stream, lambda nbytes: workspace),
    }


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
    print("host time per call, back to back, by depth (core: outputs and workspace made beforehand):")
    with torch.no_grad():
        for name, fn in depths(q, k, v, w, b, block).items():
            try:
                print(f"{name:>36}: {per_call_us(fn):7.1f} us, {device_operations(fn)}")
            except (RuntimeError, ValueError) as error:  # the low-bit forward off Hopper
                print(f"{name:>36}: not run ({error})")
    print("with autograd, back to back:")
    for name, fn in with_autograd(q, k, v, w, b, block).items():
        print(f"{name:>36}: {per_call_us(fn):7.1f} us, {device_operations(fn)}")


if __name__ == "__main__":
    main()
