"""Where the low-bit sparse branch (quantized=True, SPEC section 6) runs: on
the CPU (fake quantization) and on Hopper GPUs (INT8/FP8 kernels, sm_90a).
On other GPUs the sparse branch runs in the input dtype instead, with a
warning shown once per process, as the issue of record allows for sm80/sm89."""

from __future__ import annotations

import warnings

import torch

_warned = False


def is_hopper(device) -> bool:
    """True for a CUDA device of compute capability 9.x, where slattn's sm_90a kernels run."""
    device = torch.device(device)
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] == 9


def runs_low_bit(device: torch.device) -> bool:
    """True where quantized=True computes the low-bit branch."""
    return device.type != "cuda" or is_hopper(device)


def missing_kernels(device: torch.device) -> str:
    """Why a GPU has no low-bit kernels, naming its compute capability."""
    major, minor = torch.cuda.get_device_capability(device)
    return f"slattn's low-bit kernels need a Hopper GPU (compute capability 9.0); this one is {major}.{minor}"


def resolve_quantized(quantized: bool, device: torch.device) -> bool:
    """`quantized`, or False (with the one-time warning) on a GPU without low-bit kernels."""
    global _warned
    if not quantized or runs_low_bit(device):
        return quantized
    if not _warned:
        warnings.warn(f"quantized=True: {missing_kernels(device)}, so the sparse branch runs unquantized in the "
                      f"input dtype (shown once)", RuntimeWarning, stacklevel=3)
        _warned = True
    return False
