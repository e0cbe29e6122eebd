"""A plain PyTorch composite of SPEC.md sections 1-4, the oracle of the Python tests.

Written from the spec alone and sharing no code with slattn (STYLE.md rule 6):
routing from pooled Q and smoothed K in float64, the block map expanded to a
dense token mask by its own indexing, the sparse branch as a masked softmax,
and the linear branch with H_m / Z_m summed directly over the keys of the
linear set. Everything is differentiable, so autograd gives the reference
gradients. Inputs are (B, H, L, D) ("HND"); the math runs in the dtype of the
inputs, which is how the same-precision baseline of the tolerance rule
(STYLE.md rule 7) is made.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

CRITICAL, MARGINAL, NEGLIGIBLE = 1, 0, -1
LINEAR_EPSILON = 1e-5  # the ε of SPEC section 3


class Result(NamedTuple):
    out: torch.Tensor     # Os + Ol Wᵀ + b
    sparse: torch.Tensor  # Os
    linear: torch.Tensor  # Ol, before the projection
    lse: torch.Tensor     # (B, H, Lq), -inf for rows with no critical key
    block_map: torch.Tensor


# ---------------------------------------------------------------- routing (SPEC 1)

def critical_count(topk: float, k_blocks: int) -> int:
    return min(max(math.floor(topk * k_blocks), 1), k_blocks)


def negligible_count(topk: float, negligible: float, k_blocks: int) -> int:
    return min(math.floor(negligible * k_blocks), k_blocks - critical_count(topk, k_blocks))


def repeat_kv(x: torch.Tensor, q_heads: int) -> torch.Tensor:
    """GQA: key/value head g serves query heads g * group ... (g + 1) * group - 1."""
    return x.repeat_interleave(q_heads // x.shape[1], dim=1)


def block_means(x: torch.Tensor, block: int) -> torch.Tensor:
    """(B, H, L, D) -> (B, H, ceil(L / block), D); a partial last block averages its real rows."""
    return torch.stack([x[:, :, start:start + block].mean(dim=2) for start in range(0, x.shape[2], block)], dim=2)


def block_scores(q: torch.Tensor, k: torch.Tensor, block_q: int, block_k: int) -> torch.Tensor:
    """S[m, n] = mean(Q block m) · mean(K~ block n), in float64."""
    q64 = q.detach().to(torch.float64)
    k64 = repeat_kv(k.detach().to(torch.float64), q.shape[1])
    smoothed = k64 - k64.mean(dim=2, keepdim=True)
    return block_means(q64, block_q) @ block_means(smoothed, block_k).transpose(-1, -2)


def route(q: torch.Tensor, k: torch.Tensor, topk: float, negligible: float = 0.0, block_q: int = 64,
          block_k: int = 64) -> torch.Tensor:
    """The block map (B, H, Mq, Nk) int8 of the pooled router."""
    scores = block_scores(q, k, block_q, block_k)
    k_blocks = scores.shape[-1]
    n_crit = critical_count(topk, k_blocks)
    n_negl = negligible_count(topk, negligible, k_blocks)
    # A stable ascending sort of -S: highest score first, ties to the lower block index.
    order = torch.argsort(-scores, dim=-1, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(k_blocks).expand_as(order).contiguous())
    block_map = torch.full(scores.shape, MARGINAL, dtype=torch.int8)
    block_map[rank < n_crit] = CRITICAL
    block_map[rank >= k_blocks - n_negl] = NEGLIGIBLE
    return block_map


def dense_classes(block_map: torch.Tensor, block_q: int, block_k: int, q_len: int, k_len: int) -> torch.Tensor:
    """(B, H, Lq, Lk): the class of the block holding each (query, key) token pair."""
    rows = torch.arange(q_len) // block_q
    cols = torch.arange(k_len) // block_k
    return block_map[:, :, rows][:, :, :, cols]


# ---------------------------------------------------------------- branches (SPEC 2, 3)

def feature_map(x: torch.Tensor, name: str, weight: torch.Tensor | None = None) -> torch.Tensor:
    """φ of SPEC section 3; `weight` is hedgehog's W (d, d) as (out, in)."""
    if name == "softmax":
        return torch.softmax(x, dim=-1)
    if name == "hedgehog":
        # s = [x Wᵀ, −x Wᵀ] over 2d entries, φ = exp(s − logsumexp(s));
        # W in the compute dtype, like the projection.
        projected = torch.einsum("...i,oi->...o", x, weight.to(x.dtype))
        scores = torch.cat([projected, -projected], dim=-1)
        return torch.exp(scores - torch.logsumexp(scores, dim=-1, keepdim=True))
    if name == "elu":
        return F.elu(x) + 1
    if name == "relu":
        return torch.relu(x)
    raise ValueError(f"unknown feature map {name!r}")


def sparse_branch(q, k, v, critical: torch.Tensor, scale: float):
    """Exact softmax over the critical (query, key) pairs; Os = 0 and LSE = -inf for a row with none."""
    logits = scale * (q @ k.transpose(-1, -2))
    has_any = critical.any(dim=-1, keepdim=True)
    # Rows with no critical key get finite dummy logits so autograd stays free of NaN.
    masked = logits.masked_fill(~critical, -math.inf).masked_fill(~has_any, 0.0)
    lse = torch.logsumexp(masked, dim=-1, keepdim=True)
    probs = torch.exp(masked - lse).masked_fill(~critical, 0.0)
    return probs @ v, lse.squeeze(-1).masked_fill(~has_any.squeeze(-1), -math.inf)


def _int8_blocks(x: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x (B, H, L, D) as integers in [-127, 127] times a step per block of rows
    (max |x| / 127, ties to even); returns (integers, step per row)."""
    integers, steps = torch.zeros_like(x), torch.zeros(x.shape[:3], dtype=x.dtype)
    for start in range(0, x.shape[2], block):
        chunk = x[:, :, start:start + block]
        step = chunk.abs().amax(dim=(2, 3)) / 127
        safe = torch.where(step > 0, step, torch.ones_like(step))[:, :, None, None]
        integers[:, :, start:start + block] = torch.round(chunk / safe).clamp(-127, 127) * (step > 0)[:, :, None, None]
        steps[:, :, start:start + block] = step[:, :, None]
    return integers, steps


def _e4m3(x: torch.Tensor) -> torch.Tensor:
    """x rounded to FP8 e4m3 (PyTorch's float8_e4m3fn conversion), saturating at ±448."""
    return x.clamp(-448, 448).to(torch.float8_e4m3fn).to(x.dtype)


def _quantized_operands(q, k, v, scale: float, block_q: int, block_k: int):
    """The logits of INT8 Q and K − mean(K) (per block), and V as e4m3 values with their channel scales."""
    q_int, q_step = _int8_blocks(q, block_q)
    k_int, k_step = _int8_blocks(k - k.mean(dim=2, keepdim=True), block_k)
    logits = (q_int @ k_int.transpose(-1, -2)) * scale * q_step[..., :, None] * k_step[..., None, :]
    v_scale = v.abs().amax(dim=2, keepdim=True) / 448
    v_e4m3 = torch.where(v_scale > 0, _e4m3(v / torch.where(v_scale > 0, v_scale, torch.ones_like(v_scale))), 0.0)
    return logits, v_e4m3, v_scale


def sparse_branch_quantized(q, k, v, critical: torch.Tensor, scale: float, block_q: int, block_k: int):
    """The sparse branch of SPEC section 6 as fake quantization: INT8 Q and
    K − mean(K) per block, P = exp(x − row max) to e4m3 at scale 448, V to e4m3
    with a scale per channel; the row sum and LSE from P unrounded."""
    logits, v_e4m3, v_scale = _quantized_operands(q, k, v, scale, block_q, block_k)
    has_any = critical.any(dim=-1, keepdim=True)
    masked = logits.masked_fill(~critical, -math.inf).masked_fill(~has_any, 0.0)
    peak = masked.amax(dim=-1, keepdim=True)
    probs = torch.exp(masked - peak).masked_fill(~critical, 0.0)
    return _normalized((_e4m3(probs * 448) / 448) @ v_e4m3, probs.sum(dim=-1, keepdim=True), peak, v_scale,
                       critical)


def _normalized(acc, total, peak, v_scale, critical):
    """Os = acc · (V's channel scales) / Σ P and LSE = peak + log Σ P; zero and -inf for a row with no
    critical key."""
    has_any = critical.any(dim=-1, keepdim=True)
    out = acc * v_scale / torch.where(has_any, total, torch.ones_like(total))
    lse = (peak + torch.log(total)).squeeze(-1).masked_fill(~has_any.squeeze(-1), -math.inf)
    return out.masked_fill(~has_any, 0.0), lse


def sparse_branch_quantized_online(q, k, v, critical: torch.Tensor, scale: float, block_q: int, block_k: int):
    """sparse_branch_quantized with P rounded as a kernel's online softmax
    rounds it: key blocks in ascending order, P = exp(x − the running row
    maximum) to e4m3, the sums so far rescaled whenever the maximum moves."""
    logits, v_e4m3, v_scale = _quantized_operands(q, k, v, scale, block_q, block_k)
    peak = torch.full(logits.shape[:-1] + (1,), -math.inf, dtype=logits.dtype)
    total = torch.zeros_like(peak)
    acc = torch.zeros(q.shape[:-1] + (v.shape[-1],), dtype=logits.dtype)
    for start in range(0, k.shape[2], block_k):
        keys = slice(start, start + block_k)
        in_block = critical[..., keys]
        x = logits[..., keys].masked_fill(~in_block, -math.inf)
        new_peak = torch.maximum(peak, x.amax(dim=-1, keepdim=True))
        anchor = torch.where(torch.isfinite(new_peak), new_peak, torch.zeros_like(new_peak))
        correction = torch.where(torch.isfinite(peak), torch.exp(peak - anchor), torch.zeros_like(peak))
        probs = torch.exp(x - anchor).masked_fill(~in_block, 0.0)
        total = total * correction + probs.sum(dim=-1, keepdim=True)
        acc = acc * correction + (_e4m3(probs * 448) / 448) @ v_e4m3[..., keys, :]
        peak = new_peak
    return _normalized(acc, total, peak, v_scale, critical)


def linear_branch(q, k, v, in_set: torch.Tensor, block_q: int, name: str, weight_q=None,
                  weight_k=None) -> torch.Tensor:
    """Ol_i = φ(q_i) H_m / (φ(q_i) · Z_m + ε) with H_m, Z_m summed over the keys in U_m.

    in_set: (B, H, Mq, Lk) bool, whether key j lies in a block of U_m. One
    query block at a time, so memory stays O(L · d) per block. weight_q and
    weight_k are hedgehog's W_q and W_k."""
    phi_q, phi_k = feature_map(q, name, weight_q), feature_map(k, name, weight_k)
    outputs = []
    for m, start in enumerate(range(0, q.shape[2], block_q)):
        selected = phi_k * in_set[:, :, m].unsqueeze(-1).to(phi_k.dtype)  # φ(k_j), zero outside U_m
        h = selected.transpose(-1, -2) @ v                                # H_m = Σ_j φ(k_j)ᵀ v_j   (B, H, F, D)
        z = selected.sum(dim=2)                                           # Z_m = Σ_j φ(k_j)        (B, H, F)
        phi = phi_q[:, :, start:start + block_q]
        block_out = (phi @ h) / ((phi * z.unsqueeze(2)).sum(dim=-1, keepdim=True) + LINEAR_EPSILON)
        empty = ~in_set[:, :, m].any(dim=-1)                              # U_m empty: Ol = 0
        outputs.append(block_out.masked_fill(empty[:, :, None, None], 0.0))
    return torch.cat(outputs, dim=2)


# ---------------------------------------------------------------- the whole layer (SPEC 4)

def sla(q, k, v, proj_weight=None, proj_bias=None, *, topk=None, negligible=0.0, block_q=64, block_k=64,
        feature_map="softmax", linear_scope="marginal", scale=None, block_map=None, feature_weight_q=None,
        feature_weight_k=None, quantized=False) -> Result:
    """SLA on (B, H, L, D) inputs, in their dtype; pass topk (routing here) or a block_map.

    Hedgehog takes feature_weight_q, and feature_weight_k or None for one W
    tied across q and k. quantized: True for SPEC section 6 (P rounded
    against the final row maximum), "online" for P rounded against the
    running maximum over key blocks, as the CUDA kernel rounds it."""
    if block_map is None:
        block_map = route(q, k, topk, negligible, block_q, block_k)
    q_len, k_len, dim = q.shape[2], k.shape[2], q.shape[3]
    scale = 1.0 / math.sqrt(dim) if scale is None else scale
    k, v = repeat_kv(k, q.shape[1]), repeat_kv(v, q.shape[1])

    classes = dense_classes(block_map, block_q, block_k, q_len, k_len)
    if quantized == "online":
        os, lse = sparse_branch_quantized_online(q, k, v, classes == CRITICAL, scale, block_q, block_k)
    elif quantized:
        os, lse = sparse_branch_quantized(q, k, v, classes == CRITICAL, scale, block_q, block_k)
    else:
        os, lse = sparse_branch(q, k, v, classes == CRITICAL, scale)

    key_classes = block_map[:, :, :, torch.arange(k_len) // block_k]  # (B, H, Mq, Lk)
    in_set = key_classes == MARGINAL if linear_scope == "marginal" else key_classes != NEGLIGIBLE
    weight_k = feature_weight_q if feature_weight_k is None else feature_weight_k
    ol = linear_branch(q, k, v, in_set, block_q, feature_map, feature_weight_q, weight_k)

    out = os
    if proj_weight is not None:
        # The projection runs in the compute dtype; the master weights may be wider.
        out = out + ol @ proj_weight.to(q.dtype).t()
        if proj_bias is not None:
            out = out + proj_bias.to(q.dtype)
    return Result(out, os, ol, lse, block_map)


# ---------------------------------------------------------------- tolerance rule (STYLE.md rule 7)

def max_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.detach().to(torch.float64) - expected.detach().to(torch.float64)).abs().max())


def assert_within_baseline(actual, exact, baseline, *, factor: float = 2.0, name: str = "output") -> None:
    """FlashAttention's rule: |actual - exact| <= factor * |baseline - exact| + noise.

    exact is the float64 composite, baseline the same composite run in the
    dtype of `actual`; noise is twice the error of rounding `exact` to that
    dtype, the least any result stored in it can have."""
    assert actual.shape == exact.shape == baseline.shape, (actual.shape, exact.shape, baseline.shape)
    error = max_error(actual, exact)
    baseline_error = max_error(baseline, exact)
    noise = 2 * max_error(exact.to(actual.dtype), exact)
    assert math.isfinite(error), f"{name}: non-finite values"
    assert error <= factor * baseline_error + noise, (
        f"{name}: max error {error:.3g} exceeds {factor} x baseline {baseline_error:.3g} + noise {noise:.3g}")
