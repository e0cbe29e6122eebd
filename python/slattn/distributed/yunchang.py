"""xDiT / yunchang's Ulysses attention signature, served by slattn.

yunchang's `UlyssesAttention(sequence_process_group, scatter_idx=2,
gather_idx=1)` is called as `forward(query, key, value, dropout_p=0.0,
softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
alibi_slopes=None, deterministic=False, return_attn_probs=False, *args)` on
(B, L/P, H, D) tensors; code written against it (xDiT's attention layers)
can hold an `SLAUlyssesAttention` instead. Options SLA has no meaning for
raise ValueError rather than being ignored.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn

from .ulysses import UlyssesAttention


class SLAUlyssesAttention(nn.Module):
    """`attention` (an SLA / SLA2 module or a callable, as for UlyssesAttention)
    behind yunchang's UlyssesAttention constructor and forward."""

    def __init__(self, attention: Callable, sequence_process_group: dist.ProcessGroup | None = None,
                 scatter_idx: int = 2, gather_idx: int = 1, *, head_permutation=None):
        super().__init__()
        # yunchang's indices say which dims of (B, L/P, H, D) the all-to-all splits and joins;
        # only the standard pair (split heads, join the sequence) is an attention over whole sequences.
        if (scatter_idx, gather_idx) != (2, 1):
            raise ValueError(f"scatter_idx, gather_idx must be 2, 1 (split heads, gather the sequence of "
                             f"(B, L/P, H, D)), got {scatter_idx}, {gather_idx}")
        self.ulysses = UlyssesAttention(sequence_process_group, attention, head_permutation=head_permutation)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, dropout_p: float = 0.0,
                softmax_scale: float | None = None, causal: bool = False, window_size=(-1, -1),
                softcap: float = 0.0, alibi_slopes=None, deterministic: bool = False,
                return_attn_probs: bool = False, *args: Any) -> torch.Tensor:
        """(B, L/P, H, D) in, (B, L/P, H, D) out. slattn's kernels use no atomics,
        so results are deterministic whatever `deterministic` says."""
        unsupported = {"dropout_p": dropout_p != 0.0, "causal": bool(causal),
                       "window_size": tuple(window_size) != (-1, -1), "softcap": softcap != 0.0,
                       "alibi_slopes": alibi_slopes is not None, "return_attn_probs": bool(return_attn_probs),
                       "args": len(args) > 0}
        for name, given in unsupported.items():
            if given:
                raise ValueError(f"{name}: SLA attention has no such option (non-causal, no dropout, window, "
                                 f"softcap or ALiBi; it returns no attention probabilities)")
        kwargs = {} if softmax_scale is None else {"scale": softmax_scale}
        return self.ulysses(query, key, value, **kwargs)
