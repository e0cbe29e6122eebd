"""Where the low-bit sparse branch (quantized=True, SPEC section 6) runs: on
the CPU (fake quantization) and on Hopper GPUs (INT8/FP8 kernels, sm_90a).
On other GPUs the sparse branch runs in the input dtype instead, with a
warning shown once per process, as the issue of record allows for sm80/sm89."""

from __future__ import annotations

import warnings

import torch

_warned = False


def runs_low_bit(device: torch.device) -> bool:
    """True where quantized=True computes the low-bit branch."""
    return device.type != "cuda" or torch.cuda.get_device_capability(device)[0] == 9


def resolve_quantized(quantized: bool, device: torch.device) -> bool:
    """`quantized`, or False (with the one-time warning) on a GPU without low-bit kernels."""
    global _warned
    if not quantized or runs_low_bit(device):
        return quantized
    if not _warned:
        major, minor = torch.cuda.get_device_capability(device)
        warnings.warn(f"quantized=True: slattn's low-bit kernels need a Hopper GPU (compute capability 9.0); this "
                      f"one is {major}.{minor}, so the sparse branch runs unquantized in the input dtype (shown "
                      f"once)", RuntimeWarning, stacklevel=3)
        _warned = True
    return False
