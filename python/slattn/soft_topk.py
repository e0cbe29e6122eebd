"""SoftTop-k of SLA2 stage 1 (SPEC section 1): Ms[m, n] = sigmoid(S[m, n] / τ + λ_m)
with λ_m chosen so that each row sums to n_crit.

λ_m is found by bisection without autograd; its gradient comes from the
implicit function theorem instead of differentiating through the bisection:
Σ_n σ(S_n/τ + λ) = n_crit gives dλ/dS_j = -σ'_j / (τ Σ_n σ'_n)."""

from __future__ import annotations

import math

import torch

from .router import critical_count

# Halvings of λ's bracket. The bracket is at most (max S - min S) / τ wide, so
# 64 halvings take a 1e4-wide bracket below 1e-15, the resolution of float64.
BISECTION_STEPS = 64


def check_tau(tau, name: str = "softtopk_tau") -> float:
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not (tau > 0 and math.isfinite(tau)):
        raise ValueError(f"{name} must be a positive finite number, got {tau!r}")
    return float(tau)


def soft_topk_logits(scores: torch.Tensor, topk: float, tau: float) -> torch.Tensor:
    """x = S / τ + λ, shape of scores (float64 advised); Ms = sigmoid(x), and
    the sparse branch adds logsigmoid(x) = log Ms to its logits.

    Rows keep every block (x = +inf) when n_crit = Nk: the constraint then
    has no finite solution, and Ms = 1 is its limit."""
    check_tau(tau)
    k_blocks = scores.shape[-1]
    n_crit = critical_count(topk, k_blocks)
    z = scores / tau
    if n_crit == k_blocks:
        return torch.full_like(z, math.inf)
    with torch.no_grad():
        lam = _bisect(z.detach(), n_crit)
    # Value λ, gradient of λ by the implicit function theorem: the residual is
    # zero in value (up to the bisection's rounding, which is dropped), and its
    # gradient -σ'_j divided by Σ_n σ'_n (a constant) is dλ/dz_j.
    probs = torch.sigmoid(z + lam)
    residual = n_crit - probs.sum(dim=-1, keepdim=True)
    slope = (probs * (1 - probs)).sum(dim=-1, keepdim=True).detach()
    # A saturated row (τ far below the score gaps) has a slope that underflows;
    # its σ'_j underflow too, so the floor only keeps 0/0 out.
    slope = slope.clamp_min(torch.finfo(slope.dtype).tiny)
    lam = lam + (residual - residual.detach()) / slope
    return z + lam


def _bisect(z: torch.Tensor, n_crit: int) -> torch.Tensor:
    """λ (..., 1) with Σ_n σ(z_n + λ) = n_crit, for 1 <= n_crit < Nk.

    The sum is increasing in λ and lies between Nk σ(min z + λ) and
    Nk σ(max z + λ), so λ lies between logit(n_crit / Nk) - max z and
    logit(n_crit / Nk) - min z."""
    k_blocks = z.shape[-1]
    target_logit = math.log(n_crit / (k_blocks - n_crit))
    low = target_logit - z.amax(dim=-1, keepdim=True)
    high = target_logit - z.amin(dim=-1, keepdim=True)
    for _ in range(BISECTION_STEPS):
        middle = 0.5 * (low + high)
        below = torch.sigmoid(z + middle).sum(dim=-1, keepdim=True) < n_crit
        low = torch.where(below, middle, low)
        high = torch.where(below, high, middle)
    return 0.5 * (low + high)
