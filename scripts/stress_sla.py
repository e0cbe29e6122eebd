"""Runs SLA forward+backward steps back to back at one shape, each followed by a
synchronisation, and stops the process (exit code 3) when one step takes more
than a timeout: a check for kernels that wait on each other forever.
Usage: python scripts/stress_sla.py [B,H,L,D] [block size] [steps] [timeout s] [hold s: the stalled
process waits this long before it exits, for a debugger to attach]"""

import os
import sys
import threading
import time

import torch

import slattn


def main() -> None:
    shape = tuple(int(x) for x in (sys.argv[1] if len(sys.argv) > 1 else "1,12,32760,128").split(","))
    block = int(sys.argv[2]) if len(sys.argv) > 2 else 128
    steps = int(sys.argv[3]) if len(sys.argv) > 3 else 100
    timeout = float(sys.argv[4]) if len(sys.argv) > 4 else 20.0
    hold = float(sys.argv[5]) if len(sys.argv) > 5 else 0.0
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(shape, generator=gen).to("cuda", torch.bfloat16).requires_grad_() for _ in range(3))
    w = (0.02 * torch.randn(shape[-1], shape[-1], generator=gen)).cuda().requires_grad_()
    b = torch.zeros(shape[-1], device="cuda", requires_grad=True)
    grad = torch.randn(shape, generator=gen).to("cuda", torch.bfloat16)
    progress = {"step": -1, "phase": "start", "since": time.monotonic()}

    def watchdog() -> None:
        while True:
            time.sleep(1.0)
            if time.monotonic() - progress["since"] > timeout:
                print(f"stalled: step {progress['step']}, {progress['phase']}, over {timeout:.0f} s "
                      f"(process {os.getpid()}, left {hold:.0f} s for a debugger)", flush=True)
                time.sleep(hold)
                os._exit(3)

    threading.Thread(target=watchdog, daemon=True).start()
    times = []
    for step in range(steps):
        progress.update(step=step, phase="forward", since=time.monotonic())
        start = time.perf_counter()
        out = slattn.sparse_linear_attention(q, k, v, w, b, topk=0.05, block_q=block, block_k=block)
        torch.cuda.synchronize()
        forward_ms = 1e3 * (time.perf_counter() - start)
        progress.update(phase="backward", since=time.monotonic())
        torch.autograd.grad(out, (q, k, v, w, b), grad)
        torch.cuda.synchronize()
        times.append(1e3 * (time.perf_counter() - start))
        if times[-1] > 1000:
            print(f"step {step}: forward {forward_ms:.0f} ms, forward+backward {times[-1]:.0f} ms", flush=True)
    times.sort()
    print(f"{steps} steps: median {times[len(times) // 2]:.2f} ms, slowest {times[-1]:.2f} ms")


if __name__ == "__main__":
    main()
