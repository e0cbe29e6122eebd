"""Per-kernel CUDA time of SLA forward+backward at one shape (torch.profiler).
Usage: python scripts/profile_sla.py [B,H,L,D] [topk] [block size] [quantized]
(quantized: the low-bit forward, as quantization-aware training runs it)"""

import sys

import torch
from torch.profiler import ProfilerActivity, profile

import slattn


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

    def step():
        out = slattn.sparse_linear_attention(q, k, v, w, b, topk=topk, block_q=block, block_k=block,
                                              quantized=quantized)
        torch.autograd.grad(out, (q, k, v, w, b), grad)  # returned, not added to .grad as in slattn bench

    step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=70))


if __name__ == "__main__":
    main()
