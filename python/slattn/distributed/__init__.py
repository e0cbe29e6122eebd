"""Multi-GPU sequence parallelism for slattn's attention (Ulysses: all-to-all over heads).

`UlyssesAttention(process_group, attention)` runs SLA, SLA2 or the functional
op on (B, L/P, H, D) sequence shards; `balance_heads` evens out per-head
costs; `shard_sequence` / `gather_sequence` split and join sequences.
Framework hooks: `slattn.distributed.yunchang` (xDiT/yunchang's attention
signature) and `slattn.distributed.diffusers` (diffusers' context parallelism).
"""

from .balance import balance_heads, head_densities, rank_loads
from .sharding import gather_sequence, shard_sequence
from .ulysses import UlyssesAttention, ulysses_attention

__all__ = [
    "UlyssesAttention",
    "balance_heads",
    "gather_sequence",
    "head_densities",
    "rank_loads",
    "shard_sequence",
    "ulysses_attention",
]
