"""`slattn bench`: SLA against dense attention on the same tensors, in one
process. Prints a table, writes JSON and a PNG plot.

Each case times routing, the forward pass and forward+backward of the whole
SLA op (routing included, with a non-zero projection so the linear branch
runs), and dense attention through torch SDPA: the median of single calls,
each synchronised (a call's host time shows where the device would wait for
it); SLA's also back to back, synchronised once (the device's time per call
where the host keeps ahead, as over a model's layers). Effective TFLOPS divide the
dense count 4·B·H·L²·D by the time (the public reference's convention);
computed TFLOPS divide the FLOPs of the critical blocks only. On Hopper it
also times the low-bit forward (quantized=True), whole and for the sparse
branch alone, against bf16 in the same process.
"""

from __future__ import annotations

import json
import os
import platform
from dataclasses import asdict, dataclass

import torch
from tqdm import tqdm

from ._low_bit import is_hopper
from ._plots import pyplot, save
from ._timing import back_to_back_seconds, median_seconds
from .attention import sparse_linear_attention
from .metrics import computed_flops, dense_flops
from .plan import route
from .demo import pick_device

# (B, H, L, D) per device: on the CPU the "seconds on two cores" check; on a GPU
# Wan2.1-1.3B at 480p and Wan2.1-14B at 720p.
DEFAULT_SHAPES = {"cpu": [(1, 12, 4096, 128)], "cuda": [(1, 12, 32760, 128), (1, 40, 75600, 128)]}


# Backward FLOPs are 2.5x the forward's (FlashAttention's convention), so fwd+bwd is 3.5x.
FWD_BWD_FLOPS_FACTOR = 3.5


@dataclass
class CaseResult:
    shape: tuple[int, int, int, int]
    dtype: str
    topk: float
    block_q: int
    block_k: int
    density: float
    route_ms: float
    sla_fwd_ms: float
    sla_fwd_bwd_ms: float
    dense_fwd_ms: float  # the fastest dense backend that ran
    dense_fwd_bwd_ms: float
    sla_fwd_effective_tflops: float
    sla_fwd_computed_tflops: float
    sla_fwd_bwd_effective_tflops: float
    sla_fwd_bwd_computed_tflops: float
    dense_fwd_tflops: float
    dense_backends: dict  # backend -> {"fwd_ms", "fwd_bwd_ms"} or {"unavailable": reason}
    flex: dict  # FlexAttention on the same plan, sparse branch only: as above, or {"skipped": why}
    mma_mainloop_fwd_ms: float | None = None  # on Hopper: SLA fwd with the sparse forward on mma.sync, not wgmma
    low_bit: dict | None = None  # on Hopper: quantized=True timings (time_low_bit)
    # SLA's route_ms, sla_fwd_ms and sla_fwd_bwd_ms per call of calls issued back to back (one synchronisation)
    back_to_back: dict | None = None


def dense_backends(device: torch.device) -> dict:
    """SDPA backends to compare with: flash and cuDNN on a GPU, the default elsewhere."""
    if device.type != "cuda":
        return {"sdpa": None}
    from torch.nn.attention import SDPBackend
    return {"sdpa-flash": SDPBackend.FLASH_ATTENTION, "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION}


def gradients(out: torch.Tensor, grad: torch.Tensor, inputs) -> tuple:
    """The backward pass on its own: gradients returned, not added to each
    input's .grad (an accumulation of ~0.1 ms per 100 MB input that is no part
    of attention, and that a step's first backward does not pay)."""
    return torch.autograd.grad(out, inputs, grad)


def time_dense(q, k, v, grad, backend, device, repeats) -> dict:
    """Forward and forward+backward times of SDPA on one backend, or why it could not run."""
    import contextlib

    def context():
        if backend is None:
            return contextlib.nullcontext()
        from torch.nn.attention import sdpa_kernel
        return sdpa_kernel(backend)

    def forward():
        with context():
            return torch.nn.functional.scaled_dot_product_attention(q, k, v)

    def forward_backward():
        gradients(forward(), grad, (q, k, v))

    try:
        with torch.no_grad():
            t_fwd = median_seconds(forward, device, repeats=repeats)
        t_fwd_bwd = median_seconds(forward_backward, device, repeats=repeats)
    except RuntimeError as error:
        return {"unavailable": str(error).splitlines()[0]}
    return {"fwd_ms": 1e3 * t_fwd, "fwd_bwd_ms": 1e3 * t_fwd_bwd}


def _inputs(shape, dtype, device, requires_grad):
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(shape, generator=gen).to(device=device, dtype=dtype).requires_grad_(requires_grad)
            for _ in range(3)]


# FlexAttention's kernels tile 128 x 128 on current GPUs and refuse smaller
# BlockMask blocks, so it is compared at 128 x 128 blocks, routed at the same topk.
FLEX_BLOCK = 128


def time_flex(q, k, v, grad, plan, device, repeats) -> dict:
    """FlexAttention given a slattn block map (sparse branch only), compiled.
    Its backward is timed on a GPU; PyTorch has none on the CPU, where it is
    reported as such rather than attempted (a refused call inside the compiled
    function was seen to leave later compiled calls in the process wrong)."""
    from .flex import flex_sparse_attention

    def first_line(error: Exception) -> str:
        return str(error).splitlines()[0] if str(error) else type(error).__name__

    detached = [t.detach() for t in (q, k, v)]
    try:
        with torch.no_grad():
            result = {"fwd_ms": 1e3 * median_seconds(lambda: flex_sparse_attention(*detached, plan), device,
                                                     repeats=repeats)}
    except (RuntimeError, ImportError) as error:
        return {"unavailable": first_line(error)}
    if torch.device(device).type == "cpu":
        result["fwd_bwd_unavailable"] = "FlexAttention has no backward on the CPU"
        return result
    try:
        result["fwd_bwd_ms"] = 1e3 * median_seconds(lambda: gradients(flex_sparse_attention(q, k, v, plan), grad, (q, k, v)),
                                                    device, repeats=repeats)
    except RuntimeError as error:
        result["fwd_bwd_unavailable"] = first_line(error)
    return result


def run_case(shape, *, dtype, topk, block_q, block_k, device, repeats, flex=False) -> CaseResult:
    b, h, length, d = shape
    q, k, v = _inputs(shape, dtype, device, requires_grad=True)
    gen = torch.Generator().manual_seed(1)
    weight = (0.02 * torch.randn(d, d, generator=gen)).to(device).requires_grad_()
    bias = torch.zeros(d, device=device, requires_grad=True)
    grad = torch.randn_like(q)

    def sla():
        return sparse_linear_attention(q, k, v, weight, bias, topk=topk, block_q=block_q, block_k=block_k)

    def sla_fwd_bwd():
        gradients(sla(), grad, (q, k, v, weight, bias))

    def routing():
        return route(q, k, topk=topk, block_q=block_q, block_k=block_k)

    plan = routing()
    with torch.no_grad():
        t_route = median_seconds(routing, device, repeats=repeats)
        t_fwd = median_seconds(sla, device, repeats=repeats)
        hopper = is_hopper(device)
        t_fwd_mma = time_with_mma_mainloop(sla, device, repeats) if hopper else None
        low_bit = time_low_bit(q, k, v, weight, bias, plan, topk, t_fwd, device, repeats) if hopper else None
    t_fwd_bwd = median_seconds(sla_fwd_bwd, device, repeats=repeats)
    with torch.no_grad():
        back_to_back = {"route_ms": back_to_back_seconds(routing, device, calls=repeats),
                        "sla_fwd_ms": back_to_back_seconds(sla, device, calls=repeats)}
    back_to_back["sla_fwd_bwd_ms"] = back_to_back_seconds(sla_fwd_bwd, device, calls=repeats)
    back_to_back = {key: 1e3 * seconds for key, seconds in back_to_back.items()}
    dense = {name: time_dense(q, k, v, grad, backend, device, repeats)
             for name, backend in dense_backends(torch.device(device)).items()}
    if flex:
        flex_plan = route(q, k, topk=topk, block_q=FLEX_BLOCK, block_k=FLEX_BLOCK)
        flex_result = time_flex(q, k, v, grad, flex_plan, device, repeats) | {"block": FLEX_BLOCK}
    else:
        flex_result = {"skipped": "not asked for (--flex; on by default on a GPU)"}
    ran = [timing for timing in dense.values() if "fwd_ms" in timing]
    if not ran:
        raise RuntimeError(f"no dense attention backend ran: {dense}")
    t_dense = min(timing["fwd_ms"] for timing in ran) / 1e3
    t_dense_fwd_bwd = min(timing["fwd_bwd_ms"] for timing in ran) / 1e3
    full = dense_flops(b, h, length, length, d)
    sparse = computed_flops(plan, d)
    return CaseResult(shape=tuple(shape), dtype=str(dtype).replace("torch.", ""), topk=topk, block_q=block_q,
                      block_k=block_k, density=plan.density, route_ms=1e3 * t_route, sla_fwd_ms=1e3 * t_fwd,
                      sla_fwd_bwd_ms=1e3 * t_fwd_bwd, dense_fwd_ms=1e3 * t_dense,
                      dense_fwd_bwd_ms=1e3 * t_dense_fwd_bwd, sla_fwd_effective_tflops=full / t_fwd / 1e12,
                      sla_fwd_computed_tflops=sparse / t_fwd / 1e12,
                      sla_fwd_bwd_effective_tflops=FWD_BWD_FLOPS_FACTOR * full / t_fwd_bwd / 1e12,
                      sla_fwd_bwd_computed_tflops=FWD_BWD_FLOPS_FACTOR * sparse / t_fwd_bwd / 1e12,
                      dense_fwd_tflops=full / t_dense / 1e12, dense_backends=dense, flex=flex_result,
                      mma_mainloop_fwd_ms=None if t_fwd_mma is None else 1e3 * t_fwd_mma, low_bit=low_bit,
                      back_to_back=back_to_back)


def time_low_bit(q, k, v, weight, bias, plan, topk, t_fwd, device, repeats) -> dict:
    """The low-bit forward against bf16: the whole SLA forward (routing included, as t_fwd), and the sparse
    branch alone on a given plan (quantization of Q, K and V included), with TOPS on its computed blocks."""
    whole = median_seconds(lambda: sparse_linear_attention(q, k, v, weight, bias, topk=topk, block_q=plan.block_q,
                                                           block_k=plan.block_k, quantized=True), device, repeats=repeats)
    sparse = median_seconds(lambda: sparse_linear_attention(q, k, v, plan=plan), device, repeats=repeats)
    sparse_low = median_seconds(lambda: sparse_linear_attention(q, k, v, plan=plan, quantized=True), device,
                                repeats=repeats)
    computed = computed_flops(plan, q.shape[-1])
    return {"sla_fwd_ms": 1e3 * whole, "sla_fwd_speedup": t_fwd / whole, "sparse_fwd_ms": 1e3 * sparse,
            "sparse_fwd_low_bit_ms": 1e3 * sparse_low, "sparse_speedup": sparse / sparse_low,
            "sparse_low_bit_computed_tops": computed / sparse_low / 1e12,
            "sparse_computed_tflops": computed / sparse / 1e12}


def time_with_mma_mainloop(fn, device, repeats) -> float:
    """fn timed with the sparse forward on its sm_80 mainloop (SLATTN_CUDA_MAINLOOP=mma), for comparison."""
    previous = os.environ.get("SLATTN_CUDA_MAINLOOP")
    os.environ["SLATTN_CUDA_MAINLOOP"] = "mma"
    try:
        return median_seconds(fn, device, repeats=repeats)
    finally:
        if previous is None:
            del os.environ["SLATTN_CUDA_MAINLOOP"]
        else:
            os.environ["SLATTN_CUDA_MAINLOOP"] = previous


def environment(device: torch.device) -> dict:
    env = {"torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
           "processor": platform.processor() or platform.machine(), "cpu_threads": torch.get_num_threads()}
    if device.type == "cuda":
        env.update(gpu=torch.cuda.get_device_name(device), cuda=torch.version.cuda)
    return env


def plot(results: list[CaseResult], path: str) -> bool:
    plt = pyplot()
    if plt is None:
        return False
    labels = [f"B{r.shape[0]} H{r.shape[1]}\nL{r.shape[2]} D{r.shape[3]}\ntopk {r.topk}" for r in results]
    series = [("SLA fwd", "sla_fwd_ms"), ("dense fwd", "dense_fwd_ms"), ("SLA fwd+bwd", "sla_fwd_bwd_ms"),
              ("dense fwd+bwd", "dense_fwd_bwd_ms")]
    fig, ax = plt.subplots(figsize=(max(5, 2.5 * len(results) + 2), 4))
    width = 0.8 / len(series)
    for i, (name, key) in enumerate(series):
        xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(results))]
        ax.bar(xs, [getattr(r, key) for r in results], width, label=name)
    ax.set_xticks(range(len(results)), labels)
    ax.set_ylabel("time (ms, lower is better)")
    ax.set_title("slattn SLA vs dense attention (torch SDPA)")
    ax.legend()
    save(plt, fig, path, dpi=120)
    return True


def run_bench(*, device: str = "auto", shapes=None, topk: float = 0.05, block_q: int = 64, block_k: int = 64,
              dtype: str | None = None, repeats: int = 3, out_dir: str = "slattn-results", flex: bool | None = None,
              print_fn=print) -> dict:
    dev = pick_device(device)
    torch_dtype = getattr(torch, dtype) if dtype else (torch.bfloat16 if dev.type == "cuda" else torch.float32)
    shapes = shapes or DEFAULT_SHAPES[dev.type]
    flex = dev.type == "cuda" if flex is None else flex
    results = [run_case(s, dtype=torch_dtype, topk=topk, block_q=block_q, block_k=block_k, device=dev,
                        repeats=repeats, flex=flex) for s in tqdm(shapes, desc="bench cases", disable=len(shapes) < 2)]
    report = {"environment": environment(dev), "device": str(dev), "results": [asdict(r) for r in results]}

    header = (f"{'shape (B,H,L,D)':20s}{'density':>8s}{'route':>9s}{'SLA fwd':>10s}{'dense fwd':>11s}"
              f"{'SLA f+b':>10s}{'dense f+b':>11s}{'eff TF':>8s}{'comp TF':>9s}")
    print_fn(f"slattn bench on {dev} ({report['environment']['processor']}, torch {torch.__version__}, "
             f"{report['environment']['cpu_threads']} threads), {str(torch_dtype).replace('torch.', '')}, "
             f"blocks {block_q}x{block_k}; times in ms, median of {repeats}")
    print_fn(header)
    for r in results:
        print_fn(f"{str(r.shape):20s}{r.density:8.3f}{r.route_ms:9.2f}{r.sla_fwd_ms:10.2f}{r.dense_fwd_ms:11.1f}"
                 f"{r.sla_fwd_bwd_ms:10.2f}{r.dense_fwd_bwd_ms:11.1f}{r.sla_fwd_effective_tflops:8.1f}"
                 f"{r.sla_fwd_computed_tflops:9.2f}")
        for name, timing in r.dense_backends.items():
            detail = (f"fwd {timing['fwd_ms']:.2f} ms, fwd+bwd {timing['fwd_bwd_ms']:.2f} ms" if "fwd_ms" in timing
                      else f"unavailable: {timing['unavailable']}")
            print_fn(f"    dense {name}: {detail}")
        b2b = r.back_to_back
        print_fn(f"    SLA, {repeats} calls back to back (one synchronisation), per call: route {b2b['route_ms']:.2f}, "
                 f"fwd {b2b['sla_fwd_ms']:.2f}, fwd+bwd {b2b['sla_fwd_bwd_ms']:.2f} ms")
        if r.mma_mainloop_fwd_ms is not None:
            print_fn(f"    SLA fwd with the sparse forward on mma.sync instead of wgmma: {r.mma_mainloop_fwd_ms:.2f} ms")
        if r.low_bit is not None:
            lb = r.low_bit
            print_fn(f"    low bits (quantized=True): SLA fwd {lb['sla_fwd_ms']:.2f} ms ({lb['sla_fwd_speedup']:.2f}x); "
                     f"sparse branch alone on the plan {lb['sparse_fwd_ms']:.2f} -> {lb['sparse_fwd_low_bit_ms']:.2f} ms "
                     f"({lb['sparse_speedup']:.2f}x, quantization included; {lb['sparse_computed_tflops']:.0f} -> "
                     f"{lb['sparse_low_bit_computed_tops']:.0f} TOPS on computed blocks)")
        if "fwd_ms" in r.flex:
            backward = (f"fwd+bwd {r.flex['fwd_bwd_ms']:.2f} ms" if "fwd_bwd_ms" in r.flex
                        else f"fwd+bwd unavailable: {r.flex['fwd_bwd_unavailable']}")
            print_fn(f"    FlexAttention, sparse branch only, {FLEX_BLOCK}x{FLEX_BLOCK} blocks at the same topk: "
                     f"fwd {r.flex['fwd_ms']:.2f} ms, {backward}")
        elif "unavailable" in r.flex:
            print_fn(f"    FlexAttention: unavailable: {r.flex['unavailable']}")
    print_fn("dense columns: the fastest dense backend; eff TF = 4·B·H·L²·D / SLA fwd time; "
             "comp TF = FLOPs of the critical blocks / SLA fwd time (routing and linear branch included)")
    os.makedirs(out_dir, exist_ok=True)
    json_path = os.path.join(out_dir, "bench.json")
    with open(json_path, "w") as f:
        json.dump(report, f, indent=2)
    png_path = os.path.join(out_dir, "bench.png")
    if plot(results, png_path):
        print_fn(f"wrote {json_path} and {png_path}")
    else:
        print_fn(f"wrote {json_path} (install matplotlib, or slattn[bench], for the plot)")
    return report


def parse_shape(text: str) -> tuple[int, int, int, int]:
    parts = tuple(int(p) for p in text.split(","))
    if len(parts) != 4 or min(parts) < 1:
        raise ValueError(f"a shape is B,H,L,D with positive integers, got {text!r}")
    return parts


def main(args) -> int:
    shapes = [parse_shape(s) for s in args.shape] if args.shape else None
    run_bench(device=args.device, shapes=shapes, topk=args.topk, block_q=args.block_q, block_k=args.block_k,
              dtype=args.dtype, repeats=args.repeats, out_dir=args.out_dir, flex=args.flex)
    return 0
