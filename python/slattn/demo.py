"""`slattn demo`: SLA on a synthetic video attention layer, against dense attention."""

from __future__ import annotations

import json

import torch

from . import _C, _checks
from ._timing import median_seconds
from .attention import sparse_linear_attention
from .metrics import cosine_similarity, relative_l2
from .plan import route
from .workload import CPU_GRID, WAN_1_3B_480P, Workload, make_qkv


def pick_device(requested: str) -> torch.device:
    """auto: the GPU when torch sees one and slattn was built with its CUDA kernels."""
    _checks.check_choice("device", requested, ("auto", "cpu", "cuda"))
    gpu_ready = torch.cuda.is_available() and _C.built_with_cuda()
    if requested == "cuda" and not gpu_ready:
        raise ValueError("device 'cuda' was asked for, but " + (
            "torch sees no CUDA GPU" if not torch.cuda.is_available() else "this build of slattn has no CUDA kernels"))
    return torch.device("cuda" if requested == "cuda" or (requested == "auto" and gpu_ready) else "cpu")


def run_demo(*, device: str = "auto", topk: float = 0.05, block_q: int = 64, block_k: int = 64,
             full_size: bool = False, workload: Workload | None = None, print_fn=print) -> dict:
    """Routes, runs SLA at `topk` (and at 2x and 4x topk, to show the trade)
    and dense attention; reports density, error against dense and time.
    `workload` replaces the default layer (the Wan2.1-1.3B 480p grid, or its
    scaled-down version on the CPU)."""
    _checks.check_fractions(topk, 0.0)
    dev = pick_device(device)
    if workload is None:
        workload = Workload(WAN_1_3B_480P if full_size or dev.type == "cuda" else CPU_GRID)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    repeats = 5 if dev.type == "cuda" else 1
    q, k, v = make_qkv(workload, dtype=dtype, device=dev)
    print_fn(f"slattn demo: synthetic video attention layer, {workload.describe()}, "
             f"{str(dtype).replace('torch.', '')} on {dev}")

    t_dense = median_seconds(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v), dev, repeats=repeats)
    dense = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    rows = []
    for fraction in sorted({topk, min(2 * topk, 1.0), min(4 * topk, 1.0)}):
        plan = route(q, k, topk=fraction, block_q=block_q, block_k=block_k)
        t_route = median_seconds(lambda: route(q, k, topk=fraction, block_q=block_q, block_k=block_k), dev,
                                 repeats=repeats)
        t_sla = median_seconds(lambda: sparse_linear_attention(q, k, v, plan=plan), dev, repeats=repeats)
        out = sparse_linear_attention(q, k, v, plan=plan)
        rows.append({"topk": fraction, "critical_blocks_per_row": int(plan.row_count.max()),
                     "key_blocks": plan.block_map.shape[-1], "density": plan.density, "sparsity": plan.sparsity,
                     "route_ms": 1e3 * t_route, "sla_ms": 1e3 * t_sla, "rel_l2": relative_l2(out, dense),
                     "cosine": cosine_similarity(out, dense)})

    print_fn(f"blocks {block_q}x{block_k}; errors against dense attention (torch SDPA, {1e3 * t_dense:.1f} ms)")
    print_fn(f"{'topk':>6s}{'blocks/row':>12s}{'density':>9s}{'sparsity':>10s}{'route':>10s}{'SLA':>11s}"
             f"{'rel. L2':>9s}{'cosine':>9s}")
    for r in rows:
        print_fn(f"{r['topk']:6.2f}{r['critical_blocks_per_row']:>6d} of {r['key_blocks']:<3d}{100 * r['density']:8.1f}%"
                 f"{100 * r['sparsity']:9.1f}%{r['route_ms']:8.1f}ms{r['sla_ms']:9.1f}ms{r['rel_l2']:9.4f}"
                 f"{r['cosine']:9.5f}")
    print_fn("SLA here is untrained: its linear-branch projection starts at zero and is learned in a short "
             "fine-tune, which is what brings a 95%-sparse layer to full-attention quality.")
    if dev.type == "cpu":
        print_fn("On the CPU slattn runs its reference path, written to follow SPEC.md exactly rather than for "
                 "speed; run on a GPU for SLA's speed.")
    return {"workload": workload.describe(), "device": str(dev), "dtype": str(dtype).replace("torch.", ""),
            "block_q": block_q, "block_k": block_k, "dense_ms": 1e3 * t_dense, "runs": rows}


def main(args) -> int:
    result = run_demo(device=args.device, topk=args.topk, block_q=args.block_q, block_k=args.block_k,
                      full_size=args.full_size)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0
