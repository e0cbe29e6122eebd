"""Crossing into the core: torch tensors as raw-pointer views, layouts by strides."""

from __future__ import annotations

import torch

from . import _C

LAYOUTS = ("HND", "NHD")

# Codes of slattn::DType.
_DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.bfloat16: 2, torch.float16: 3}
SUPPORTED_DTYPES = tuple(_DTYPE_CODES)


def dtype_code(dtype: torch.dtype) -> int:
    return _DTYPE_CODES[dtype]


def logical(t: torch.Tensor, layout: str) -> torch.Tensor:
    """The (B, H, L, D) view of a tensor stored in `layout` (no copy)."""
    return t if layout == "HND" else t.permute(0, 2, 1, 3)


def view(t: torch.Tensor | None, layout: str) -> _C.TensorView:
    """A core TensorView of `t` in logical (B, H, L, D) order; empty for None."""
    if t is None or t.numel() == 0:
        return _C.TensorView()
    lt = logical(t, layout)
    return _C.TensorView(lt.data_ptr(), dtype_code(lt.dtype), tuple(lt.shape), tuple(lt.stride()))


class Launch:
    """Where the core runs for tensors on `device`: the current CUDA stream and
    scratch memory from PyTorch's caching allocator (nothing for the CPU)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
        self.allocate = self._allocate if device.type == "cuda" else None

    def _allocate(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, device=self.device)

    def __enter__(self):
        self._guard = torch.cuda.device(self.device) if self.device.type == "cuda" else None
        if self._guard is not None:
            self._guard.__enter__()
        return self

    def __exit__(self, *exc):
        if self._guard is not None:
            self._guard.__exit__(*exc)


def pointer(t: torch.Tensor | None) -> int:
    return 0 if t is None or t.numel() == 0 else t.data_ptr()


def lse_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 LSE, or fp64 for fp64 inputs (so gradient checks stay in fp64)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def sequence_shape(t: torch.Tensor, layout: str) -> tuple[int, int, int, int]:
    """(B, H, L, D) of a tensor stored in `layout`."""
    b, x, y, d = t.shape
    return (b, x, y, d) if layout == "HND" else (b, y, x, d)
