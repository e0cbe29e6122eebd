"""Ulysses sequence parallelism around slattn's attention.

Each rank holds a slice of the sequence, (B, L/P, H, D). An all-to-all
trades it for whole sequences of H/P heads, (B, L, H/P, D); SLA (or SLA2, or
the functional op) runs unchanged on those heads, since it routes and attends
per head over the whole sequence; a second all-to-all brings the output back
to (B, L/P, H, D). Results equal the single-process ones: each head sees the
same tokens in the same order.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .._tensors import LAYOUTS
from ..sla2 import SparseLinearAttention2
from ._all_to_all import heads_to_sequence, sequence_to_heads


def _resolve_group(group) -> dist.ProcessGroup:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("Ulysses needs torch.distributed initialised (dist.init_process_group) on every rank")
    return dist.group.WORLD if group is None else group


def check_head_permutation(head_permutation) -> torch.Tensor | None:
    """The permutation as int64 on the CPU, or None; ValueError unless it is a permutation of range(len)."""
    if head_permutation is None:
        return None
    order = torch.as_tensor(head_permutation)
    if order.dim() != 1 or order.dtype == torch.bool or order.is_floating_point() or order.is_complex():
        raise ValueError(f"head_permutation must be a 1-D integer sequence, got {order.dtype} of shape "
                         f"{tuple(order.shape)}")
    order = order.to(device="cpu", dtype=torch.int64)
    if sorted(order.tolist()) != list(range(order.numel())):
        raise ValueError(f"head_permutation must be a permutation of range({order.numel()}), got {order.tolist()}")
    return order


def _kv_order(q_order: torch.Tensor, q_heads: int, kv_heads: int) -> torch.Tensor:
    """The k/v head order that keeps grouped-query pairs: q head h uses k/v head h // (Hq / Hkv)."""
    group = q_heads // kv_heads
    blocks = q_order.view(kv_heads, group)
    kv = blocks[:, 0] // group
    if not torch.equal(blocks, kv[:, None] * group + torch.arange(group, device=q_order.device)):
        raise ValueError(f"head_permutation must move the {group} q heads of each k/v head together and in order "
                         f"(grouped-query attention); balance_heads(costs, world_size, group_size={group}) makes one")
    return kv


def _check_sla2_sized(attention: SparseLinearAttention2) -> None:
    if attention.has_uninitialized_params():
        raise ValueError("attention: this SparseLinearAttention2 sizes α by its first call, which under Ulysses "
                         "sees only H/P heads; give num_heads (and q_len for alpha='block') at construction")


def rank_heads(head_order: torch.Tensor | None, num_heads: int, world_size: int, rank: int) -> torch.Tensor:
    """The layer heads rank `rank` holds, in order: its H/P slice of `head_order` (None: heads in order)."""
    order = torch.arange(num_heads) if head_order is None else head_order
    per_rank = num_heads // world_size
    return order[rank * per_rank:(rank + 1) * per_rank]


def _check_shapes(q, k, v, world_size: int, seq_len) -> tuple[int, int]:
    """Checks (B, L/P, H, D) views; returns (local length, global length)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a 4-D tensor, sequence-sharded (B, L/P, H, D) "
                             f"(or (B, H, L/P, D) with layout='HND'), got {getattr(t, 'shape', type(t).__name__)}")
    if tuple(k.shape) != tuple(v.shape):
        raise ValueError(f"v must have the shape of k, got {tuple(v.shape)} and {tuple(k.shape)}")
    if q.shape[0] != k.shape[0]:
        raise ValueError(f"batch sizes of q ({q.shape[0]}) and k ({k.shape[0]}) differ")
    for name, t in (("q", q), ("k", k)):
        heads = t.shape[2]
        if heads % world_size:
            raise ValueError(f"{name} has {heads} heads, which {world_size} ranks cannot share: Ulysses gives each "
                             f"rank whole heads, so the group size must divide the head count")
    local = q.shape[1]
    if seq_len is None:
        return local, local * world_size
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"seq_len must be a positive integer or None, got {seq_len!r}")
    if k.shape[1] != local:
        raise ValueError(f"seq_len (padded self-attention) needs q and k of one length, got {local} and {k.shape[1]}")
    if -(-seq_len // world_size) != local:
        raise ValueError(f"seq_len={seq_len} on {world_size} ranks shards to {-(-seq_len // world_size)} tokens per "
                         f"rank (the last ones padded), but q holds {local}")
    return local, seq_len


def attention_layout_of(attention, attention_layout: str | None) -> str:
    """The layout `attention` takes: a module's own `layout`, else `attention_layout` (default "HND")."""
    own = getattr(attention, "layout", None)
    if attention_layout is not None and attention_layout not in LAYOUTS:
        raise ValueError(f"attention_layout must be one of {LAYOUTS} or None, got {attention_layout!r}")
    if own in LAYOUTS:
        if attention_layout is not None and attention_layout != own:
            raise ValueError(f"attention_layout={attention_layout!r} disagrees with the module's layout {own!r}")
        return own
    return attention_layout or "HND"


def ulysses_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attention: Callable,
                      group: dist.ProcessGroup | None = None, *, layout: str = "NHD",
                      attention_layout: str | None = None, head_permutation=None, seq_len: int | None = None,
                      **attention_kwargs) -> torch.Tensor:
    """Runs `attention` on sequence-sharded q, k, v with Ulysses over `group`
    (None: the default group); returns the output sequence-sharded like q.

    q, k, v: (B, L/P, H, D) for layout "NHD" (the Ulysses convention), or
    (B, H, L/P, D) for "HND"; the same L/P on every rank. `attention(q, k, v,
    **attention_kwargs)` gets this rank's H/P heads over the whole sequence
    in its layout (`attention_layout_of`); a SparseLinearAttention2 also
    gets `head_index`, the layer heads it holds, so that α follows them.
    head_permutation: rank r gets heads `head_permutation[r*H/P:(r+1)*H/P]`
    (from `balance_heads`; identical on every rank); outputs return in the
    original head order. seq_len: the true sequence length when it was padded
    to a multiple of P (`shard_sequence(..., pad=True)`): attention sees only
    the first seq_len tokens, and the padded output rows are zero.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    group = _resolve_group(group)
    world_size = dist.get_world_size(group)
    target = attention_layout_of(attention, attention_layout)
    q, k, v = (t if layout == "NHD" or not isinstance(t, torch.Tensor) else t.transpose(1, 2) for t in (q, k, v))
    local_len, seq_len = _check_shapes(q, k, v, world_size, seq_len)
    q_heads, kv_heads = q.shape[2], k.shape[2]
    q_order = check_head_permutation(head_permutation)
    if q_order is not None:
        if q_order.numel() != q_heads:
            raise ValueError(f"head_permutation has {q_order.numel()} entries, but q has {q_heads} heads")
        kv_order = _kv_order(q_order, q_heads, kv_heads).to(k.device)
        q_order = q_order.to(q.device)
        q, k, v = q.index_select(2, q_order), k.index_select(2, kv_order), v.index_select(2, kv_order)
    if isinstance(attention, SparseLinearAttention2):
        _check_sla2_sized(attention)
        alpha_heads = attention.alpha_logit.shape[0]
        if alpha_heads != q_heads:
            raise ValueError(f"q has {q_heads} heads, but the SparseLinearAttention2 layer's α has {alpha_heads}")
        held = rank_heads(q_order, q_heads, world_size, dist.get_rank(group))
        attention_kwargs["head_index"] = held.to(attention.alpha_logit.device)

    q, k, v = (sequence_to_heads(t, group, world_size, target) for t in (q, k, v))
    padded = local_len * world_size
    seq_dim = 1 if target == "NHD" else 2
    if seq_len < padded:
        q, k, v = (t.narrow(seq_dim, 0, seq_len) for t in (q, k, v))
    out = attention(q, k, v, **attention_kwargs)
    if seq_len < padded:
        # Zero rows for the padding, so the return all-to-all sees whole shards.
        pad = [0, 0] * (3 - seq_dim) + [0, padded - seq_len]
        out = F.pad(out, pad)
    out = heads_to_sequence(out, group, world_size, target)
    if q_order is not None:
        out = out.index_select(2, torch.argsort(q_order))
    return out if layout == "NHD" else out.transpose(1, 2)


class UlyssesAttention(nn.Module):
    """Ulysses sequence parallelism around a slattn attention.

    `UlyssesAttention(process_group, attention)`: `attention` is a
    `SparseLinearAttention` or `SparseLinearAttention2` module (a submodule
    here, so its parameters are the model's: replicate them and reduce their
    gradients with DDP or FSDP like any other weight), or a callable such as
    `functools.partial(slattn.sparse_linear_attention, topk=0.05)` that takes
    q, k, v in `attention_layout` (default "HND"). `forward(q, k, v)` takes
    and returns (B, L/P, H, D); see `ulysses_attention` for `seq_len`.

    head_permutation: from `balance_heads`, to even out per-head costs; the
    same on every rank, which the constructor checks (one collective).
    A SparseLinearAttention2 needs its α sized for all H heads before the
    first call (`num_heads`, and `q_len` for alpha="block"): a rank sees H/P.
    """

    def __init__(self, process_group: dist.ProcessGroup | None, attention: Callable, *, head_permutation=None,
                 attention_layout: str | None = None):
        super().__init__()
        if not callable(attention):
            raise ValueError(f"attention must be a slattn attention module or a callable, "
                             f"got {type(attention).__name__}")
        if isinstance(attention, SparseLinearAttention2):
            _check_sla2_sized(attention)
        self.process_group = _resolve_group(process_group)
        self.attention = attention
        self.attention_layout = attention_layout_of(attention, attention_layout)
        order = check_head_permutation(head_permutation)
        if order is not None:
            self._check_same_on_every_rank(order)
        # Not a buffer: it is configuration (no state_dict entry, no DDP broadcast), identical by construction.
        self.head_permutation = order

    def _check_same_on_every_rank(self, order: torch.Tensor) -> None:
        gathered: list = [None] * dist.get_world_size(self.process_group)
        dist.all_gather_object(gathered, order.tolist(), group=self.process_group)
        if any(other != gathered[0] for other in gathered):
            raise ValueError(f"head_permutation differs between ranks ({gathered}); compute it from the same costs "
                             "on every rank")

    @property
    def world_size(self) -> int:
        return dist.get_world_size(self.process_group)

    def local_heads(self, num_heads: int) -> torch.Tensor:
        """The layer heads this rank attends over, in the order it holds them
        (to place per-rank measurements, e.g. `head_densities`, in the layer's order)."""
        return rank_heads(self.head_permutation, num_heads, self.world_size, dist.get_rank(self.process_group))

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, seq_len: int | None = None,
                **attention_kwargs) -> torch.Tensor:
        return ulysses_attention(q, k, v, self.attention, self.process_group, layout="NHD",
                                 attention_layout=self.attention_layout, head_permutation=self.head_permutation,
                                 seq_len=seq_len, **attention_kwargs)

    def extra_repr(self) -> str:
        balanced = "balanced heads" if self.head_permutation is not None else "heads in order"
        return f"world_size={self.world_size}, {balanced}"
