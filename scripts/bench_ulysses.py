"""Scaling of SLA under Ulysses sequence parallelism, one run per GPU count.

    torchrun --nproc_per_node=1 scripts/bench_ulysses.py   # the one-GPU baseline
    torchrun --nproc_per_node=2 scripts/bench_ulysses.py
    torchrun --nproc_per_node=4 scripts/bench_ulysses.py

Default shape: Wan2.1-14B at 720p, B1 H40 L75600 D128, bf16, topk 0.05, blocks
64x64 (both 40 and 75600 divide by 1, 2, 4 and 8). Each run times, on the
same sequence-sharded tensors: the forward and forward+backward of
`UlyssesAttention` around `SparseLinearAttention` (routing and a non-zero
projection included), the forward's four all-to-alls alone, and SLA alone on
this rank's heads over the whole sequence. A sample is the slowest rank's
time (a step waits for it); the record holds the median. Rank 0 writes
`<out>/ulysses-P<world_size>.json`; speed-up is the P=1 time over the P time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol

import slattn
from slattn.distributed import UlyssesAttention
from slattn.distributed._all_to_all import heads_to_sequence, sequence_to_heads

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="1,40,75600,128",
                        help="B,H,L,D of the whole layer (default: Wan2.1-14B at 720p)")
    parser.add_argument("--topk", type=float, default=0.05)
    parser.add_argument("--block", type=int, default=64, choices=(64, 128), help="query and key block size")
    parser.add_argument("--dtype", default="bf16", choices=tuple(DTYPES))
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="cpu: gloo, for a smoke test")
    parser.add_argument("--out", default="slattn-results", help="folder for the JSON record")
    args = parser.parse_args(argv)
    try:
        args.shape = [int(x) for x in args.shape.split(",")]
    except ValueError:
        parser.error(f"--shape must be four integers B,H,L,D, got {args.shape!r}")
    if len(args.shape) != 4 or min(args.shape) < 1:
        parser.error(f"--shape must be four positive integers B,H,L,D, got {args.shape}")
    if args.warmup < 0 or args.iters < 1:
        parser.error("--warmup must be >= 0 and --iters >= 1")
    return args


def _slowest_rank_ms(fn, group, device, warmup: int, iters: int) -> float:
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(iters):
        dist.barrier(group)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64, device=device)
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX, group=group)
        samples.append(float(elapsed) * 1e3)
    return statistics.median(samples)


def measure(args: argparse.Namespace, group, device: torch.device) -> dict:
    """The record of one run on `group` (every rank calls it; every rank gets it)."""
    world_size, rank = dist.get_world_size(group), dist.get_rank(group)
    batch, heads, length, dim = args.shape
    if heads % world_size or length % world_size:
        raise ValueError(f"--shape: H={heads} and L={length} must both divide by the {world_size} ranks")
    dtype = DTYPES[args.dtype]
    gen = torch.Generator().manual_seed(rank)
    q, k, v = (torch.randn(batch, length // world_size, heads, dim, generator=gen).to(device, dtype)
               for _ in range(3))
    for t in (q, k, v):
        t.requires_grad_()
    layer = slattn.SparseLinearAttention(dim, args.topk, BLKQ=args.block, BLKK=args.block,
                                         use_bf16=dtype != torch.float16).to(device)
    with torch.no_grad():
        layer.proj_l.weight.normal_(std=0.02)  # non-zero: the linear branch runs
    attention = UlyssesAttention(group, layer)

    def forward():
        with torch.no_grad():
            attention(q, k, v)

    def forward_backward():
        attention(q, k, v).sum().backward()

    def all_to_alls():
        with torch.no_grad():
            moved = [sequence_to_heads(t, group, world_size, layer.layout) for t in (q, k, v)]
            moved.append(heads_to_sequence(local_out, group, world_size, layer.layout))
            for t in moved:  # unused results would otherwise never wait for their collective
                funcol.wait_tensor(t)

    with torch.no_grad():
        local = [sequence_to_heads(t, group, world_size, layer.layout) for t in (q, k, v)]
        local_out = layer(*local)

    def local_attention():
        with torch.no_grad():
            layer(*local)

    timing = dict(group=group, device=device, warmup=args.warmup, iters=args.iters)
    record = {
        "world_size": world_size,
        "shape": list(args.shape),
        "dtype": args.dtype,
        "topk": args.topk,
        "block": args.block,
        "forward_ms": _slowest_rank_ms(forward, **timing),
        "forward_backward_ms": _slowest_rank_ms(forward_backward, **timing),
        "all_to_all_ms": _slowest_rank_ms(all_to_alls, **timing),
        "local_attention_ms": _slowest_rank_ms(local_attention, **timing),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
    }
    return record


def main(argv=None) -> None:
    args = parse_args(argv)
    if "RANK" not in os.environ:
        raise SystemExit("run under torchrun, e.g. torchrun --nproc_per_node=2 scripts/bench_ulysses.py")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        record = measure(args, dist.group.WORLD, device)
        if dist.get_rank() == 0:
            out = Path(args.out)
            out.mkdir(parents=True, exist_ok=True)
            path = out / f"ulysses-P{record['world_size']}.json"
            path.write_text(json.dumps(record, indent=2) + "\n")
            print(f"P={record['world_size']}: forward {record['forward_ms']:.1f} ms, forward+backward "
                  f"{record['forward_backward_ms']:.1f} ms, all-to-all {record['all_to_all_ms']:.1f} ms, "
                  f"SLA on local heads {record['local_attention_ms']:.1f} ms -> {path}")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
