"""Argument checks of the Python front end. Each error names the argument and
what is allowed; the core checks again for callers of the C++ API."""

from __future__ import annotations

import dataclasses

import math

import torch

from . import _C
from ._tensors import LAYOUTS, SUPPORTED_DTYPES, sequence_shape

FEATURE_MAPS = ("softmax", "elu", "relu", "hedgehog")
LEARNABLE_FEATURE_MAPS = ("hedgehog",)  # maps with weights: feature_weight_q / feature_weight_k
LINEAR_SCOPES = ("marginal", "all")
MAX_HEAD_DIM = 256
HEAD_DIM_MULTIPLE = 8
MAX_BLOCK_SIZE = 1024


def check_choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(repr(a) for a in allowed)}, got {value!r}")


def check_flag(name: str, value) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")


def check_fractions(topk, negligible) -> None:
    if isinstance(topk, bool) or not isinstance(topk, (int, float)) or not 0.0 < topk <= 1.0:
        raise ValueError(f"topk must be a number in (0, 1], got {topk!r}")
    if isinstance(negligible, bool) or not isinstance(negligible, (int, float)) or not 0.0 <= negligible < 1.0:
        raise ValueError(f"negligible must be a number in [0, 1), got {negligible!r}")
    if topk + negligible > 1.0:
        raise ValueError(f"topk + negligible must be <= 1, got {topk} + {negligible}")


def check_block_sizes(block_q, block_k, names=("block_q", "block_k")) -> None:
    for name, value in zip(names, (block_q, block_k)):
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_BLOCK_SIZE:
            raise ValueError(f"{name} must be an integer in [1, {MAX_BLOCK_SIZE}] (64 or 128 on CUDA), got {value!r}")


def check_tensor(name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 4:
        raise ValueError(f"{name} must be 4-D (B, H, L, D) for layout 'HND' or (B, L, H, D) for 'NHD', "
                         f"got {t.dim()}-D with shape {tuple(t.shape)}")
    if t.dtype not in SUPPORTED_DTYPES:
        names = ", ".join(str(d).replace("torch.", "") for d in SUPPORTED_DTYPES)
        raise ValueError(f"{name} dtype must be one of {names}, got {str(t.dtype).replace('torch.', '')}")


def check_device(t: torch.Tensor, name: str) -> None:
    if t.device.type == "cuda" and not _C.built_with_cuda():
        raise NotImplementedError(
            f"slattn: {name} is a CUDA tensor, but this build of slattn has no CUDA kernels "
            "(it was built without nvcc); move the tensors to the CPU or rebuild with the CUDA toolkit")
    if t.device.type not in ("cpu", "cuda", "meta"):
        raise ValueError(f"{name} must be on the CPU or a CUDA GPU, got device {t.device}")


def check_known_keys(what: str, options, fields_of) -> None:
    """Refuses keys of `options` that are not fields of the dataclass `fields_of`, naming them and the known ones."""
    known = [f.name for f in dataclasses.fields(fields_of)]
    unknown = [key for key in options if key not in known]
    if unknown:
        raise ValueError(f"{what}: unknown key(s) {', '.join(map(repr, unknown))}; known keys: {', '.join(known)}")


def check_head_dim(head_dim) -> None:
    """An integer multiple of HEAD_DIM_MULTIPLE, at most MAX_HEAD_DIM (what the core serves)."""
    if isinstance(head_dim, bool) or not isinstance(head_dim, int):
        raise ValueError(f"head_dim must be an integer, got {head_dim!r}")
    if head_dim % HEAD_DIM_MULTIPLE or not HEAD_DIM_MULTIPLE <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"head_dim must be a multiple of {HEAD_DIM_MULTIPLE} in "
                         f"[{HEAD_DIM_MULTIPLE}, {MAX_HEAD_DIM}], got {head_dim}")


def check_query_key(q, k, layout: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Checks q and k; returns their (B, H, L, D) shapes."""
    check_choice("layout", layout, LAYOUTS)
    check_tensor("q", q)
    check_tensor("k", k)
    if k.dtype != q.dtype:
        raise ValueError(f"q and k must have the same dtype, got {q.dtype} and {k.dtype}")
    if k.device != q.device:
        raise ValueError(f"q and k must be on the same device, got {q.device} and {k.device}")
    check_device(q, "q")
    qs, ks = sequence_shape(q, layout), sequence_shape(k, layout)
    if qs[0] != ks[0]:
        raise ValueError(f"batch sizes of q ({qs[0]}) and k ({ks[0]}) differ")
    if qs[2] < 1 or ks[2] < 1:
        raise ValueError(f"sequences must hold at least one token, got q length {qs[2]} and k length {ks[2]}")
    if qs[1] < 1 or ks[1] < 1 or qs[0] < 1:
        raise ValueError(f"q and k need at least one batch and one head, got q {tuple(q.shape)}, k {tuple(k.shape)}")
    if qs[3] != ks[3]:
        raise ValueError(f"head dims of q ({qs[3]}) and k ({ks[3]}) differ")
    check_head_dim(qs[3])
    if qs[1] % ks[1]:
        raise ValueError(f"q heads ({qs[1]}) must be a multiple of k/v heads ({ks[1]}) for grouped-query attention")
    return qs, ks


def check_attention_inputs(q, k, v, layout: str):
    qs, ks = check_query_key(q, k, layout)
    check_tensor("v", v)
    if v.dtype != q.dtype or v.device != q.device:
        raise ValueError(f"v must match q in dtype and device, got {v.dtype} on {v.device}")
    vs = sequence_shape(v, layout)
    if vs != ks:
        raise ValueError(f"v must have the shape of k {tuple(k.shape)}, got {tuple(v.shape)}"
                         + (f" (head dims {vs[3]} and {ks[3]} differ)" if vs[3] != ks[3] else ""))
    return qs, ks


def check_projection(proj_weight, proj_bias, head_dim: int, dtype: torch.dtype, device) -> None:
    allowed = (torch.float32, torch.float64) if dtype == torch.float64 else (torch.float32,)
    if proj_weight is None:
        if proj_bias is not None:
            raise ValueError("proj_bias needs proj_weight (a missing proj_weight counts as zero)")
        return
    for name, t, shape in (("proj_weight", proj_weight, (head_dim, head_dim)), ("proj_bias", proj_bias, (head_dim,))):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")
        if t.dtype not in allowed:
            raise ValueError(f"{name} must be float32 (fp32 master weights; float64 with float64 inputs), "
                             f"got {t.dtype}")
        if t.device != device:
            raise ValueError(f"{name} must be on {device}, got {t.device}")
    # The core reads the bias in the weight's dtype.
    if proj_bias is not None and proj_bias.dtype != proj_weight.dtype:
        raise ValueError(f"proj_bias must have the dtype of proj_weight ({proj_weight.dtype}), got {proj_bias.dtype}")


def _check_weight_matrix(name: str, t, head_dim: int, allowed, device) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if tuple(t.shape) != (head_dim, head_dim):
        raise ValueError(f"{name} must have shape {(head_dim, head_dim)}, got {tuple(t.shape)}")
    if t.dtype not in allowed:
        raise ValueError(f"{name} must be float32 (fp32 master weights; float64 with float64 inputs), got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name} must be on {device}, got {t.device}")


def check_feature_weights(feature_map: str, feature_weight_q, feature_weight_k, head_dim: int, dtype: torch.dtype,
                          device) -> None:
    """Hedgehog takes W_q (and W_k, or None to tie it to W_q); the fixed maps take neither."""
    if feature_map not in LEARNABLE_FEATURE_MAPS:
        for name, t in (("feature_weight_q", feature_weight_q), ("feature_weight_k", feature_weight_k)):
            if t is not None:
                raise ValueError(f"{name} is given, but feature_map {feature_map!r} has no weights "
                                 f"(only {', '.join(repr(m) for m in LEARNABLE_FEATURE_MAPS)} has)")
        return
    if feature_weight_q is None:
        raise ValueError(f"feature_map {feature_map!r} needs feature_weight_q, its (head_dim, head_dim) W "
                         "(and feature_weight_k, or None to tie it to feature_weight_q)")
    allowed = (torch.float32, torch.float64) if dtype == torch.float64 else (torch.float32,)
    _check_weight_matrix("feature_weight_q", feature_weight_q, head_dim, allowed, device)
    if feature_weight_k is not None:
        _check_weight_matrix("feature_weight_k", feature_weight_k, head_dim, allowed, device)
        # The core reads both in one dtype.
        if feature_weight_k.dtype != feature_weight_q.dtype:
            raise ValueError(f"feature_weight_k must have the dtype of feature_weight_q ({feature_weight_q.dtype}), "
                             f"got {feature_weight_k.dtype}")


def default_scale(scale, head_dim: int) -> float:
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale == 0:
        raise ValueError(f"scale must be a finite non-zero number, got {scale!r}")
    return float(scale)
