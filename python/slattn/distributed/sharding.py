"""Splitting a sequence over the ranks of a group and joining it again.

Ulysses needs the same number of tokens on every rank. A sequence whose
length is not a multiple of the group size is either refused or, with
pad=True, padded with zeros at its end; attention then takes `seq_len` (the
true length) so the padding never enters softmax or the linear branch.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F

from .ulysses import _resolve_group

# Newer torch names the differentiable all-gather `all_gather_single_autograd` and deprecates the old name.
_all_gather = getattr(funcol, "all_gather_single_autograd", None) or funcol.all_gather_tensor_autograd


def _check_dim(x, dim) -> int:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if isinstance(dim, bool) or not isinstance(dim, int) or not -x.dim() <= dim < x.dim():
        raise ValueError(f"dim must be a dimension of x (a {x.dim()}-D tensor), got {dim!r}")
    return dim % x.dim()


def shard_sequence(x: torch.Tensor, group: dist.ProcessGroup | None = None, *, dim: int = 1,
                   pad: bool = False) -> torch.Tensor:
    """This rank's contiguous slice of `x` along `dim` (differentiable)."""
    dim = _check_dim(x, dim)
    group = _resolve_group(group)
    world_size, rank = dist.get_world_size(group), dist.get_rank(group)
    length = x.shape[dim]
    local = -(-length // world_size)
    if length % world_size:
        if not pad:
            raise ValueError(f"x has {length} tokens along dim {dim}, not a multiple of the group size {world_size}; "
                             f"pad=True pads it to {local * world_size} (then give attention seq_len={length} and "
                             f"gather_sequence seq_len={length})")
        x = F.pad(x, [0, 0] * (x.dim() - 1 - dim) + [0, local * world_size - length])
    return x.narrow(dim, rank * local, local)


def gather_sequence(x: torch.Tensor, group: dist.ProcessGroup | None = None, *, dim: int = 1,
                    seq_len: int | None = None) -> torch.Tensor:
    """The whole sequence from every rank's slice; seq_len drops the padding.
    Its backward sums every rank's gradient for a slice (a reduce-scatter):
    right when each rank's loss differs; a loss computed identically on
    every rank counts P times, so divide it by P."""
    dim = _check_dim(x, dim)
    group = _resolve_group(group)
    full_length = x.shape[dim] * dist.get_world_size(group)
    if seq_len is not None and (isinstance(seq_len, bool) or not isinstance(seq_len, int)
                                or not full_length - x.shape[dim] < seq_len <= full_length):
        raise ValueError(f"seq_len must be an integer in ({full_length - x.shape[dim]}, {full_length}] for slices of "
                         f"{x.shape[dim]} tokens, got {seq_len!r}")
    full = _all_gather(x.contiguous(), dim, group)
    return full if seq_len is None else full.narrow(dim, 0, seq_len)
