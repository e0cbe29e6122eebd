"""Both SLA branches under a soft block mask (SLA2 stage 1, SPEC sections 1-3),
as composite PyTorch ops so that gradients reach the router through the mask.

With mask logits x (B, H, Mq, Nk) and Ms = sigmoid(x):
  sparse: softmax over every key of scale · q·k + log Ms[m, n(j)], times V;
  linear: H_m = Σ_n (1 - Ms[m, n]) h_n, Z_m likewise, Ol_i = φ(q_i) H_m / (φ(q_i)·Z_m + ε).
x = ±inf gives a hard mask, and then exactly the kernels' formulas.

Memory. The sparse branch materialises attention logits, so it runs in chunks
of heads and query blocks of at most CHUNK_ELEMENTS logits each, and each
chunk is recomputed in the backward pass (activation checkpointing) instead of
kept. For a (1, 12, 32760, 128) bf16 layer with 128 x 64 blocks a chunk is
one head and 32 query blocks (4096 x 32760 logits, 512 MiB in fp32); the
forward holds about two such tensors and the backward about four, so the peak
is ~2-3 GiB on top of the layer's own tensors (q, k, v, outputs: ~0.5 GiB),
the key-block states h_n (12 x 512 x 128 x 128 fp32, 400 MiB) and the
per-query-block H_m (200 MiB). Dense attention kept for the backward pass
would need 12 x 32760² fp32 logits, 51 GiB per tensor, which does not fit.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ._tensors import logical
from .feature_maps import feature_map

CHUNK_ELEMENTS = 2 ** 27
LINEAR_EPSILON = 1e-5  # the ε of SPEC section 3


def _sparse_chunk(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask_logits: torch.Tensor,
                  key_block: torch.Tensor, scale: float) -> torch.Tensor:
    """q (B, h, m·bq, D), k/v (B, h, Lk, D), mask_logits (B, h, m, Nk) -> Os (B, h, m·bq, D)."""
    blocks = mask_logits.shape[2]
    logits = (q @ k.transpose(-1, -2)).mul_(scale).unflatten(2, (blocks, -1))  # (B, h, m, bq, Lk)
    log_mask = F.logsigmoid(mask_logits.to(q.dtype))[..., key_block]            # (B, h, m, Lk)
    probs = torch.softmax(logits + log_mask.unsqueeze(3), dim=-1)
    return (probs @ v.unsqueeze(2)).flatten(2, 3)


def _chunks(batch: int, q_blocks: int, block_q: int, k_len: int) -> tuple[int, int]:
    """(heads per chunk, query blocks per chunk) with at most CHUNK_ELEMENTS logits, at least one block."""
    blocks = max(1, CHUNK_ELEMENTS // (batch * block_q * k_len))
    if blocks < q_blocks:
        return 1, blocks
    return max(1, blocks // q_blocks), q_blocks


def soft_branches(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask_logits: torch.Tensor, *, block_q: int,
                  block_k: int, scale: float, feature_map_name: str = "softmax",
                  feature_weight_q: torch.Tensor | None = None, feature_weight_k: torch.Tensor | None = None,
                  layout: str = "HND") -> tuple[torch.Tensor, torch.Tensor]:
    """(Os, Ol) in the layout and dtype of q, computed in fp32 (fp64 for fp64 inputs).

    k is used as given by both branches (pass K~ for φ(K~)); k and v may have
    fewer heads than q (GQA). Hedgehog takes W_q and W_k (None: tied to W_q)."""
    if feature_weight_k is None:
        feature_weight_k = feature_weight_q
    q_l, k_l, v_l = (logical(t, layout) for t in (q, k, v))
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    batch, heads, q_len, _ = q_l.shape
    kv_heads, k_len = k_l.shape[1], k_l.shape[2]
    q_blocks, k_blocks = mask_logits.shape[2], mask_logits.shape[3]
    group = heads // kv_heads
    # Whole query blocks: the pad rows get outputs that are sliced off at the end.
    q_pad = F.pad(q_l.to(compute), (0, 0, 0, q_blocks * block_q - q_len))
    k_c, v_c = k_l.to(compute), v_l.to(compute)
    key_block = torch.arange(k_len, device=q.device) // block_k

    # Key-block states of the linear branch: φ(k) rows past the sequence are zero.
    phi_k = F.pad(feature_map(k_c, feature_map_name, feature_weight_k), (0, 0, 0, k_blocks * block_k - k_len))
    v_pad = F.pad(v_c, (0, 0, 0, k_blocks * block_k - k_len))
    phi_k_blocks = phi_k.unflatten(2, (k_blocks, block_k))
    h_states = phi_k_blocks.transpose(-1, -2) @ v_pad.unflatten(2, (k_blocks, block_k))  # (B, Hkv, Nk, F, D)
    z_states = phi_k_blocks.sum(dim=3)                                                   # (B, Hkv, Nk, F)
    phi_q = feature_map(q_pad, feature_map_name, feature_weight_q).unflatten(2, (q_blocks, block_q))  # (B,H,Mq,bq,F)

    heads_per_chunk, blocks_per_chunk = _chunks(batch, q_blocks, block_q, k_len)
    sparse_parts, linear_parts = [], []
    for h0 in range(0, heads, heads_per_chunk):
        head_index = torch.arange(h0, min(heads, h0 + heads_per_chunk), device=q.device)
        kv_index = head_index // group
        k_h, v_h = k_c.index_select(1, kv_index), v_c.index_select(1, kv_index)
        x_h = mask_logits.index_select(1, head_index)
        rows = []
        for m0 in range(0, q_blocks, blocks_per_chunk):
            m1 = min(q_blocks, m0 + blocks_per_chunk)
            args = (q_pad[:, head_index, m0 * block_q:m1 * block_q], k_h, v_h, x_h[:, :, m0:m1], key_block, scale)
            rows.append(checkpoint(_sparse_chunk, *args, use_reentrant=False) if torch.is_grad_enabled()
                        else _sparse_chunk(*args))
        sparse_parts.append(torch.cat(rows, dim=2))

        linear_weight = torch.sigmoid(-x_h).to(compute)                                   # 1 - Ms, exact near Ms = 1
        h_m = torch.einsum("bhmn,bhnfd->bhmfd", linear_weight, h_states.index_select(1, kv_index))
        z_m = torch.einsum("bhmn,bhnf->bhmf", linear_weight, z_states.index_select(1, kv_index))
        phi = phi_q.index_select(1, head_index)
        numerator = phi @ h_m
        denominator = (phi * z_m.unsqueeze(3)).sum(dim=-1, keepdim=True) + LINEAR_EPSILON
        linear_parts.append((numerator / denominator).flatten(2, 3))

    outputs = []
    for parts in (sparse_parts, linear_parts):
        out = torch.cat(parts, dim=1)[:, :, :q_len].to(q.dtype)
        outputs.append(out if layout == "HND" else out.transpose(1, 2))
    return outputs[0], outputs[1]
