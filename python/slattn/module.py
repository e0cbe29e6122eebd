"""`SparseLinearAttention`: the public SLA reference's module, signature and
state keys, so code and checkpoints written for it run unchanged."""

from __future__ import annotations

import torch
from torch import nn

from . import _checks
from .attention import sparse_linear_attention
from .feature_maps import attach_feature_maps, feature_weights
from .plan import route


class SparseLinearAttention(nn.Module):
    """SLA over q, k, v of shape (B, H, L, D) (or (B, L, H, D) with layout="NHD").

    Like the public reference, inputs are computed in bf16 (fp16 when
    ``use_bf16=False``) and the output is cast back to the input dtype. The
    projection ``proj_l`` is an fp32 ``nn.Linear(head_dim, head_dim)``,
    zero-initialised, so an untrained layer equals sparse attention.

    ``feature_map="hedgehog"`` makes φ learnable (SPEC section 3): the layer
    owns ``feature_map_q`` (W_q) and, unless ``tie_feature_map_qk``,
    ``feature_map_k`` (W_k), fp32 identity-initialised HedgehogFeatureMap
    modules (state keys ``feature_map_q.layer.weight``, and
    ``feature_map_k.layer.weight`` when untied). Tied, ``feature_map_k`` is
    ``feature_map_q``, as in the public reference. For the fixed maps both
    are None.

    ``quantized=True`` (or setting ``layer.quantized``) computes the sparse
    branch in low bits (SPEC section 6), see ``sparse_linear_attention``.

    ``forward(q, k, v, return_sparsity=True)`` returns ``(out, density)``
    where density is the fraction of key blocks computed exactly (the value
    the reference reports under the name "sparsity"); ``last_density`` and
    ``last_sparsity`` (= 1 - density) hold the latest values.
    """

    def __init__(self, head_dim: int, topk: float, feature_map: str = "softmax", BLKQ: int = 64, BLKK: int = 64,
                 use_bf16: bool = True, tie_feature_map_qk: bool = True, *, negligible: float = 0.0,
                 linear_scope: str = "marginal", layout: str = "HND", scale: float | None = None,
                 quantized: bool = False):
        super().__init__()
        _checks.check_flag("quantized", quantized)
        _checks.check_head_dim(head_dim)
        _checks.check_fractions(topk, negligible)
        _checks.check_block_sizes(BLKQ, BLKK, names=("BLKQ", "BLKK"))
        _checks.check_choice("feature_map", feature_map, _checks.FEATURE_MAPS)
        _checks.check_choice("linear_scope", linear_scope, _checks.LINEAR_SCOPES)
        _checks.check_choice("layout", layout, ("HND", "NHD"))
        self.head_dim = head_dim
        self.topk = topk
        self.negligible = negligible
        self.feature_map = feature_map
        self.BLKQ = BLKQ
        self.BLKK = BLKK
        self.linear_scope = linear_scope
        self.layout = layout
        self.scale = _checks.default_scale(scale, head_dim)
        # The sparse branch in low bits (SPEC section 6); an attribute, so inference can switch it on a trained layer.
        self.quantized = quantized
        # With the fixed feature maps there is nothing to tie; hedgehog ties W_k to W_q.
        self.tie_feature_map_qk = tie_feature_map_qk
        self.dtype = torch.bfloat16 if use_bf16 else torch.float16
        self.proj_l = nn.Linear(head_dim, head_dim, dtype=torch.float32)
        nn.init.zeros_(self.proj_l.weight)
        nn.init.zeros_(self.proj_l.bias)
        attach_feature_maps(self, feature_map, head_dim, tie_feature_map_qk)
        self.last_density: float | None = None
        self.last_sparsity: float | None = None

    def extra_repr(self) -> str:
        return (f"head_dim={self.head_dim}, topk={self.topk}, negligible={self.negligible}, "
                f"feature_map={self.feature_map!r}, tie_feature_map_qk={self.tie_feature_map_qk}, "
                f"linear_scope={self.linear_scope!r}, "
                f"BLKQ={self.BLKQ}, BLKK={self.BLKK}, dtype={self.dtype}, layout={self.layout!r}, "
                f"quantized={self.quantized}")

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, return_sparsity: bool = False, *,
                scale: float | None = None):
        """`scale` overrides the layer's softmax scale for this call (SDPA's
        per-call argument); None keeps the one given at construction."""
        for name, t in (("q", q), ("k", k), ("v", v)):
            if isinstance(t, torch.Tensor) and t.dim() == 4 and t.shape[-1] != self.head_dim:
                raise ValueError(f"{name} has head dim {t.shape[-1]}, but this layer was built with "
                                 f"head_dim={self.head_dim}")
        input_dtype = q.dtype
        q, k, v = (t.to(self.dtype) for t in (q, k, v))
        plan = route(q, k, topk=self.topk, negligible=self.negligible, block_q=self.BLKQ, block_k=self.BLKK,
                     layout=self.layout)
        weight_q, weight_k = feature_weights(self)
        out = sparse_linear_attention(q, k, v, self.proj_l.weight, self.proj_l.bias, feature_map=self.feature_map,
                                      feature_weight_q=weight_q, feature_weight_k=weight_k,
                                      linear_scope=self.linear_scope, scale=self.scale if scale is None else scale,
                                      layout=self.layout, plan=plan, quantized=self.quantized)
        out = out.to(input_dtype)
        if not return_sparsity:
            return out
        self.last_density = plan.density
        self.last_sparsity = 1.0 - self.last_density
        return out, self.last_density
