"""The functional SLA op: route (or take a plan), then sparse + linear attention."""

from __future__ import annotations

import torch

from . import _checks, _low_bit
from ._ops import sla_forward
from .plan import RoutingPlan, route


def sparse_linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, proj_weight: torch.Tensor | None = None,
                            proj_bias: torch.Tensor | None = None, *, topk: float | None = None,
                            negligible: float | None = None, block_q: int | None = None, block_k: int | None = None,
                            feature_map: str = "softmax", feature_weight_q: torch.Tensor | None = None,
                            feature_weight_k: torch.Tensor | None = None, linear_scope: str = "marginal",
                            scale: float | None = None, layout: str = "HND", plan: RoutingPlan | None = None,
                            return_lse: bool = False, return_branches: bool = False, quantized: bool = False):
    """Sparse-Linear Attention (SLA): ``Os + Ol @ proj_weight.T + proj_bias``.

    Os is exact softmax attention over the critical key blocks of each query
    block; Ol is linear attention with feature map `feature_map` over the
    blocks of `linear_scope` ("marginal": the M = 0 blocks; "all": every
    non-negligible block). A missing proj_weight counts as zero, and the
    linear branch is then not computed at all.

    feature_map "hedgehog" is learnable: φ(x) = softmax([x Wᵀ, −x Wᵀ]) over
    2·D features, with W_q = feature_weight_q for q and W_k =
    feature_weight_k for k, each (D, D) as (out, in) (nn.Linear's layout),
    float32 master weights (float64 with float64 inputs). feature_weight_k
    None, or the very tensor given as feature_weight_q, ties them: one W,
    whose gradient sums both uses. Both get gradients like proj_weight.

    q is (B, Hq, Lq, D) for layout "HND" or (B, Lq, Hq, D) for "NHD"; k and v
    likewise with Hkv heads (Hq a multiple of Hkv: grouped-query attention).
    Either `topk` (routing runs here, with `negligible` (default 0) and
    blocks `block_q` x `block_k` (default 64 x 64)) or a `plan` from
    slattn.route() or slattn.plan_from_block_map() (reused as is; routing
    options given with it must agree with it) must be given.

    quantized computes the sparse branch in low bits (SPEC section 6: INT8 Q
    and K − mean(K) per block, FP8 e4m3 P and V) for inference or
    quantization-aware training; its gradients are the unquantized ones at
    the quantized forward's LSE (straight-through). The CPU path computes it
    as fake quantization, Hopper GPUs on INT8/FP8 tensor cores (P rounded
    against the running row maximum); other GPUs compute the branch
    unquantized, with a one-time RuntimeWarning.

    Returns out; (out, lse) with return_lse; (Os, Ol, lse) with
    return_branches. lse is (B, Hq, Lq), fp32 (fp64 for fp64 inputs).
    """
    _checks.check_flag("quantized", quantized)
    _checks.check_choice("feature_map", feature_map, _checks.FEATURE_MAPS)
    _checks.check_choice("linear_scope", linear_scope, _checks.LINEAR_SCOPES)
    qs, ks = _checks.check_attention_inputs(q, k, v, layout)
    _checks.check_projection(proj_weight, proj_bias, qs[3], q.dtype, q.device)
    _checks.check_feature_weights(feature_map, feature_weight_q, feature_weight_k, qs[3], q.dtype, q.device)
    if feature_weight_k is feature_weight_q:
        feature_weight_k = None  # tied: the op's one-weight form, so the gradient is the sum once
    scale = _checks.default_scale(scale, qs[3])
    if plan is None:
        if topk is None:
            raise ValueError("give topk (the fraction of key blocks computed exactly) or a plan")
        plan = route(q, k, topk=topk, negligible=0.0 if negligible is None else negligible,
                     block_q=64 if block_q is None else block_q, block_k=64 if block_k is None else block_k,
                     layout=layout)
    elif topk is not None or negligible is not None:
        raise ValueError("give either topk/negligible or a plan, not both: a plan fixes the routing")
    elif not isinstance(plan, RoutingPlan):
        raise TypeError(f"plan must be a slattn.RoutingPlan, got {type(plan).__name__}")
    else:
        for name, given, planned in (("block_q", block_q, plan.block_q), ("block_k", block_k, plan.block_k)):
            if given is not None and given != planned:
                raise ValueError(f"{name}={given} disagrees with the plan's blocks of {planned}")
        plan.check_matches(qs, ks)
        if plan.block_map.device != q.device:
            raise ValueError(f"plan is on {plan.block_map.device} but q is on {q.device}; use plan.to(device)")
    quantized = _low_bit.resolve_quantized(quantized, q.device)
    out, out_sparse, out_linear, lse = sla_forward(
        q, k, v, proj_weight, proj_bias, *plan.tensors, plan.block_q, plan.block_k, scale, feature_map, linear_scope,
        layout, return_branches, feature_weight_q, feature_weight_k, quantized)
    if return_branches:
        return (out_sparse if proj_weight is not None else out), out_linear, lse
    return (out, lse) if return_lse else out
