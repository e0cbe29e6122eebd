"""The two all-to-alls of Ulysses, as differentiable functional collectives.

`torch.distributed._functional_collectives` ops trace under torch.compile and
`all_to_all_single_autograd` has a backward (the reverse all-to-all), so the
gradients of q, k, v and of everything after them flow across ranks.

Shapes, with P ranks, H heads (Hl = H / P of them per rank) and L tokens
(Ls = L / P of them per rank):
  sequence-sharded  (B, Ls, H, D)   what each rank's model code holds
  head-sharded      (B, L, Hl, D)   what attention needs: whole sequences
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol


def _exchange(chunks: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """All-to-all over dim 0: chunk p goes to rank p; chunk p of the result came from rank p."""
    return funcol.all_to_all_single_autograd(chunks, None, None, group)


def sequence_to_heads(x: torch.Tensor, group: dist.ProcessGroup, world_size: int, layout: str) -> torch.Tensor:
    """(B, Ls, H, D) -> this rank's heads over the whole sequence, in `layout`
    ("NHD": (B, L, Hl, D); "HND": (B, Hl, L, D)). `x` may be any strided view."""
    b, ls, h, d = x.shape
    heads = h // world_size
    # (P, B, Ls, Hl, D): the heads bound for rank p, in one copy.
    send = x.unflatten(2, (world_size, heads)).permute(2, 0, 1, 3, 4).contiguous()
    received = _exchange(send, group)  # (P, B, Ls, Hl, D): sequence chunk p, from rank p
    order = (1, 0, 2, 3, 4) if layout == "NHD" else (1, 3, 0, 2, 4)
    out = received.permute(order)
    return out.reshape(b, world_size * ls, heads, d) if layout == "NHD" else out.reshape(b, heads, world_size * ls, d)


def heads_to_sequence(y: torch.Tensor, group: dist.ProcessGroup, world_size: int, layout: str) -> torch.Tensor:
    """The inverse of `sequence_to_heads`: this rank's heads over the whole
    sequence, in `layout`, -> (B, Ls, H, D) contiguous."""
    y = y if layout == "NHD" else y.transpose(1, 2)  # (B, L, Hl, D) view
    b, length, heads, d = y.shape
    # (P, B, Ls, Hl, D): sequence chunk p goes back to rank p, in one copy.
    send = y.unflatten(1, (world_size, length // world_size)).permute(1, 0, 2, 3, 4).contiguous()
    received = _exchange(send, group)  # (P, B, Ls, Hl, D): the heads of rank p
    return received.permute(1, 2, 0, 3, 4).reshape(b, length // world_size, world_size * heads, d)
