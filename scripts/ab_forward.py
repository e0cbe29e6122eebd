"""The sparse forward kernel alone, each Hopper mainloop on the same tensors and plan, in one process:
the warp-specialised pipeline against the cp.async one (SLATTN_FORWARD_PIPELINE=0), plus their
largest difference. Usage: python scripts/ab_forward.py [B,H,L,D ...] (default: the Wan2.1 1.3B and 14B shapes)"""

import os
import sys

import torch
from torch.profiler import ProfilerActivity, profile

import slattn
from slattn.metrics import computed_flops


def kernel_ms(fn, repeats=5) -> float:
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(repeats):
            fn()
        torch.cuda.synchronize()
    times = [e.device_time for e in prof.events() if "sparse_forward" in e.name]
    return sorted(times)[len(times) // 2] / 1e3


def main() -> None:
    shapes = sys.argv[1:] or ["1,12,32760,128", "1,40,75600,128"]
    for text in shapes:
        shape = tuple(int(x) for x in text.split(","))
        gen = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(shape, generator=gen).to("cuda", torch.bfloat16) for _ in range(3))
        plan = slattn.route(q, k, topk=0.05, block_q=128, block_k=128)
        results = {}
        for name, value in (("pipelined", "1"), ("cp.async", "0")):
            os.environ["SLATTN_FORWARD_PIPELINE"] = value
            out = slattn.sparse_linear_attention(q, k, v, plan=plan)
            results[name] = (kernel_ms(lambda: slattn.sparse_linear_attention(q, k, v, plan=plan)), out)
        flops = computed_flops(plan, shape[-1])
        line = "  ".join(f"{n} {ms:.3f} ms ({flops / ms / 1e9:.0f} TFLOPS)" for n, (ms, _) in results.items())
        diff = (results["pipelined"][1].float() - results["cp.async"][1].float()).abs().max().item()
        print(f"{text}: {line}  max |diff| {diff:.3g}")


if __name__ == "__main__":
    main()
