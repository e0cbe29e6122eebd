"""Small ragged SLA cases for compute-sanitizer (memcheck, racecheck): forward
and backward of every CUDA kernel, with and without the linear branch, on
every sparse mainloop the GPU has (wgmma and mma.sync on Hopper), and the
low-bit forward (quantized=True) on Hopper.
--without-cublas: no linear branch where it would run on Hopper (its sums are
cuBLAS products): racecheck cannot run cuBLAS's Hopper kernels (a hardware
exception inside the tool, torch.bmm alone included)."""

import os
import sys

import torch

import slattn


def main() -> None:
    hopper = torch.cuda.get_device_capability()[0] == 9
    hopper_linear = "--without-cublas" not in sys.argv[1:]
    for mainloop in ("wgmma", "mma") if hopper else ("mma",):
        os.environ["SLATTN_CUDA_MAINLOOP"] = mainloop
        run_cases(quantized=False, linear_branch=hopper_linear or mainloop == "mma")
    if hopper:
        run_cases(quantized=True, linear_branch=hopper_linear)
    torch.cuda.synchronize()
    print("sanitize cases ran")


def run_cases(quantized: bool, linear_branch: bool) -> None:
    """linear_branch: cases with a projection (the linear branch runs) as well as without."""
    gen = torch.Generator().manual_seed(0)
    # The last two have more query blocks than an H100 runs thread blocks at once: the Hopper forward
    # walks several per thread block.
    cases = ((130, 70, 2, 1, 64, 64, 64), (65, 200, 2, 2, 128, 128, 128), (200, 150, 2, 1, 128, 128, 64),
             (700, 300, 48, 8, 128, 128, 128), (700, 300, 48, 8, 64, 64, 64))
    for q_len, k_len, heads, kv_heads, dim, block_q, block_k in cases:
        q = torch.randn(1, heads, q_len, dim, generator=gen).to("cuda", torch.bfloat16).requires_grad_()
        k = torch.randn(1, kv_heads, k_len, dim, generator=gen).to("cuda", torch.bfloat16).requires_grad_()
        v = torch.randn(1, kv_heads, k_len, dim, generator=gen).to("cuda", torch.bfloat16).requires_grad_()
        w = torch.randn(dim, dim, generator=gen).cuda().requires_grad_()
        b = torch.randn(dim, generator=gen).cuda().requires_grad_()
        for projection in ((w, b), (None, None)) if linear_branch else ((None, None),):
            out = slattn.sparse_linear_attention(q, k, v, *projection, topk=0.3, negligible=0.2, block_q=block_q,
                                                 block_k=block_k, quantized=quantized)
            out.float().square().sum().backward()
        slattn.plan_from_block_map(slattn.route(q, k, topk=0.5).block_map)


if __name__ == "__main__":
    main()
