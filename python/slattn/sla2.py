"""`SparseLinearAttention2`: SLA2 (arXiv 2602.12675), SPEC sections 1, 3, 4, 5.

A learned router scores the key blocks; hard top-k of those scores makes a
routing plan for SLA's own kernels (inference and stage 2), SoftTop-k makes a
soft mask for the composite of `soft_attention` (stage 1). The branches mix
as O = α Os + (1 - α) Ol with a learned α and no projection."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.lazy import LazyModuleMixin

from . import _checks
from ._tensors import logical
from .attention import sparse_linear_attention
from .feature_maps import attach_feature_maps, feature_weights
from .plan import RoutingPlan, plan_from_block_map
from .router import LearnedRouter, classify
from .soft_attention import soft_branches
from .soft_topk import check_tau, soft_topk_logits

ALPHA_MODES = ("head", "block")
ROUTING_MODES = ("hard", "soft", "dense")


class SparseLinearAttention2(LazyModuleMixin, nn.Module):
    """SLA2 over q, k, v of shape (B, H, L, D) (or (B, L, H, D) with layout="NHD").

    routing (attribute, set by the training tools):
      "hard"  top-k of the learned scores, SLA's kernels (inference, stage 2);
      "soft"  SoftTop-k with temperature `softtopk_tau`, gradients to the
              router and α (stage 1);
      "dense" exact full attention (the teacher of stage 1).
    alpha: "head" (one α per head) or "block" (one per head and query block,
    for a fixed sequence length). α is sized by the first call unless
    `num_heads` (and, for "block", `q_len`) are given.
    compute_dtype: None computes in the inputs' dtype, except fp32 on CUDA,
    which runs in bf16 (what the kernels take); the output has the inputs' dtype.
    quantized (attribute too): the hard-routing path's sparse branch in low
    bits (quantized=True of slattn.sparse_linear_attention: INT8 Q Kᵀ, FP8
    P V, straight-through gradients), for inference; the soft and dense paths
    are unchanged. qat (attribute too; slattn.training.enable_sla2_qat
    switches every layer): quantization-aware training, the same low-bit
    branch in training and after it; either flag turns it on.
    feature_map "hedgehog" is learnable, with ``feature_map_q`` /
    ``feature_map_k`` as in SparseLinearAttention (tied unless
    ``tie_feature_map_qk=False``); W_k applies to K~ under smooth_k_features.
    """

    def __init__(self, head_dim: int, topk: float = 0.05, *, compression_ratio: int = 1, alpha: str = "head",
                 qat: bool = False, quantized: bool = False, softtopk_tau: float = 0.1, block_q: int = 128,
                 block_k: int = 64, feature_map: str = "softmax", smooth_k_features: bool = True,
                 alpha_init: float = 0.9, num_heads: int | None = None, q_len: int | None = None,
                 layout: str = "HND", scale: float | None = None, compute_dtype: torch.dtype | None = None,
                 tie_feature_map_qk: bool = True):
        super().__init__()
        _checks.check_head_dim(head_dim)
        _checks.check_fractions(topk, 0.0)
        _checks.check_block_sizes(block_q, block_k)
        _checks.check_choice("alpha", alpha, ALPHA_MODES)
        _checks.check_choice("feature_map", feature_map, _checks.FEATURE_MAPS)
        _checks.check_choice("layout", layout, ("HND", "NHD"))
        if not isinstance(alpha_init, (int, float)) or isinstance(alpha_init, bool) or not 0.0 < alpha_init < 1.0:
            raise ValueError(f"alpha_init must be a number in (0, 1), got {alpha_init!r}")
        if compute_dtype not in (None, torch.bfloat16, torch.float16, torch.float32, torch.float64):
            raise ValueError(f"compute_dtype must be None or a floating dtype slattn takes, got {compute_dtype!r}")
        for name, value in (("num_heads", num_heads), ("q_len", q_len)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
        if not isinstance(tie_feature_map_qk, bool):
            raise ValueError(f"tie_feature_map_qk must be a bool, got {tie_feature_map_qk!r}")
        _checks.check_flag("qat", qat)
        _checks.check_flag("quantized", quantized)
        self.router = LearnedRouter(head_dim, compression_ratio)
        self.head_dim = head_dim
        self.compression_ratio = compression_ratio
        self._topk = float(topk)
        self.alpha_mode = alpha
        self.qat = qat
        self.quantized = quantized
        self.softtopk_tau = check_tau(softtopk_tau)
        self.block_q = block_q
        self.block_k = block_k
        self.feature_map = feature_map
        self.tie_feature_map_qk = tie_feature_map_qk
        attach_feature_maps(self, feature_map, head_dim, tie_feature_map_qk)
        self.smooth_k_features = smooth_k_features
        self.alpha_init = float(alpha_init)
        self.layout = layout
        self.scale = _checks.default_scale(scale, head_dim)
        self.compute_dtype = compute_dtype
        self.routing = "hard"
        self.last_density: float | None = None
        self.alpha_logit = nn.UninitializedParameter(dtype=torch.float32)
        if num_heads is not None and (alpha == "head" or q_len is not None):
            self._materialize_alpha(num_heads, -(-q_len // block_q) if alpha == "block" else None,
                                    torch.device("cpu"))

    @property
    def topk(self) -> float:
        """Fraction of key blocks per query block that are critical; schedulers change it between steps."""
        return self._topk

    @topk.setter
    def topk(self, value: float) -> None:
        _checks.check_fractions(value, 0.0)
        self._topk = float(value)

    # ------------------------------------------------------------ α
    def _materialize_alpha(self, heads: int, q_blocks: int | None, device) -> None:
        shape = (heads,) if self.alpha_mode == "head" else (heads, q_blocks)
        self.alpha_logit.materialize(shape, device=device)
        with torch.no_grad():
            self.alpha_logit.fill_(math.log(self.alpha_init / (1.0 - self.alpha_init)))  # sigmoid(a) = alpha_init

    def initialize_parameters(self, q, k=None, v=None, *args, **kwargs) -> None:  # LazyModuleMixin's hook
        if self.has_uninitialized_params():
            if kwargs.get("head_index") is not None:
                raise ValueError("head_index selects heads of α, which the first call sizes from q's heads; "
                                 "give num_heads (and q_len for alpha='block') at construction")
            _, heads, q_len, _ = _checks.check_query_key(q, k, self.layout)[0]
            self._materialize_alpha(heads, -(-q_len // self.block_q), q.device)

    @property
    def alpha(self) -> torch.Tensor:
        """Current α = sigmoid(a), (H,) or (H, Mq), detached."""
        if self.has_uninitialized_params():
            raise RuntimeError("α is sized by the first call; give num_heads (and q_len) to size it at construction")
        return torch.sigmoid(self.alpha_logit.detach())

    def _alpha_for(self, heads: int, q_len: int, layout: str, dtype: torch.dtype,
                   head_index: torch.Tensor | None = None) -> torch.Tensor:
        """α broadcastable against an output in `layout`: (1, H, 1|Lq, 1) for HND;
        at the layer heads `head_index` when q holds only those."""
        a = self.alpha_logit
        if head_index is not None:
            a = a[self._check_head_index(head_index, heads)]
        if a.shape[0] != heads:
            raise ValueError(f"this layer's α has {a.shape[0]} heads, but q has {heads}")
        q_blocks = -(-q_len // self.block_q)
        if self.alpha_mode == "head":
            alpha = torch.sigmoid(a.to(dtype))[:, None]
        elif a.shape[1] != q_blocks:
            raise ValueError(f"alpha='block' was sized for {a.shape[1]} query blocks, but q has {q_blocks} "
                             f"(sequence length {q_len}); per-block α needs a fixed sequence length")
        else:
            token_block = torch.arange(q_len, device=a.device) // self.block_q
            alpha = torch.sigmoid(a.to(dtype))[:, token_block]
        alpha = alpha[None, :, :, None]
        return alpha if layout == "HND" else alpha.transpose(1, 2)

    def _check_head_index(self, head_index, heads: int) -> torch.Tensor:
        # Shape and dtype only: a range check would read the values (a device sync, a graph break under
        # torch.compile); indexing α with an out-of-range head fails on its own.
        if (not isinstance(head_index, torch.Tensor) or head_index.dim() != 1 or head_index.dtype != torch.int64
                or head_index.numel() != heads):
            raise ValueError(f"head_index must be a 1-D int64 tensor with one entry per head of q ({heads}), got "
                             f"{head_index!r}")
        return head_index.to(self.alpha_logit.device)

    # ------------------------------------------------------------ routing
    def set_routing(self, mode: str) -> None:
        _checks.check_choice("routing", mode, ROUTING_MODES)
        self.routing = mode

    def _smoothed(self, k: torch.Tensor) -> torch.Tensor:
        """K~ = K - mean over rows. Both branches take it: the linear one for φ(K~),
        and softmax is unchanged by it (it shifts each row's logits by q·mean)."""
        if not self.smooth_k_features:
            return k
        wide = k.to(torch.promote_types(k.dtype, torch.float32))
        return (wide - wide.mean(dim=2 if self.layout == "HND" else 1, keepdim=True)).to(k.dtype)

    def route(self, q: torch.Tensor, k: torch.Tensor) -> RoutingPlan:
        """The hard routing plan of the learned router (no gradient)."""
        qs, ks = _checks.check_query_key(q, k, self.layout)
        with torch.no_grad():
            scores = self.router.block_scores(q, k, self.block_q, self.block_k, self.layout)
        return plan_from_block_map(classify(scores, self.topk), self.block_q, self.block_k, q_len=qs[2], k_len=ks[2])

    # ------------------------------------------------------------ forward
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, return_sparsity: bool = False, *,
                scale: float | None = None, head_index: torch.Tensor | None = None):
        """`scale` overrides the layer's softmax scale for this call. With
        return_sparsity, returns (out, density): the fraction of key blocks
        computed exactly (the soft path's Σ Ms over the block count).
        head_index: the layer heads that q holds, in order, when it holds a
        subset (sequence parallelism gives each rank H/P heads); α is taken at
        these. None: q holds every head of the layer."""
        qs, _ = _checks.check_attention_inputs(q, k, v, self.layout)
        if qs[3] != self.head_dim:
            raise ValueError(f"q has head dim {qs[3]}, but this layer was built with head_dim={self.head_dim}")
        scale = self.scale if scale is None else _checks.default_scale(scale, self.head_dim)
        input_dtype = q.dtype
        dtype = self.compute_dtype or (torch.bfloat16 if q.is_cuda and q.dtype == torch.float32 else q.dtype)
        q, k, v = (t.to(dtype) for t in (q, k, v))
        if self.routing == "dense":
            out, density = self._dense(q, k, v, scale), 1.0
        else:
            out, density = self._sparse_linear(q, k, v, scale, head_index)
        self.last_density = density
        out = out.to(input_dtype)
        return (out, density) if return_sparsity else out

    def _sparse_linear(self, q, k, v, scale, head_index) -> tuple[torch.Tensor, float]:
        _, heads, q_len, _ = logical(q, self.layout).shape
        mix = torch.promote_types(q.dtype, torch.float32)
        alpha = self._alpha_for(heads, q_len, self.layout, mix, head_index)
        k_branch = self._smoothed(k)
        weight_q, weight_k = feature_weights(self)
        if self.routing == "soft":
            scores = self.router.block_scores(q, k, self.block_q, self.block_k, self.layout)
            mask_logits = soft_topk_logits(scores, self.topk, self.softtopk_tau)
            os_, ol = soft_branches(q, k_branch, v, mask_logits, block_q=self.block_q, block_k=self.block_k,
                                    scale=scale, feature_map_name=self.feature_map, feature_weight_q=weight_q,
                                    feature_weight_k=weight_k, layout=self.layout)
            density = float(torch.sigmoid(mask_logits.detach()).mean())
        else:
            plan = self.route(q, k)
            os_, ol, _ = sparse_linear_attention(q, k_branch, v, plan=plan, feature_map=self.feature_map,
                                                 feature_weight_q=weight_q, feature_weight_k=weight_k,
                                                 linear_scope="marginal", scale=scale, layout=self.layout,
                                                 return_branches=True, quantized=self.qat or self.quantized)
            density = plan.density
        out = alpha * os_.to(mix) + (1 - alpha) * ol.to(mix)
        return out.to(q.dtype), density

    def _dense(self, q, k, v, scale) -> torch.Tensor:
        q_l, k_l, v_l = (logical(t, self.layout) for t in (q, k, v))
        group = q_l.shape[1] // k_l.shape[1]
        k_l, v_l = k_l.repeat_interleave(group, dim=1), v_l.repeat_interleave(group, dim=1)
        out = F.scaled_dot_product_attention(q_l, k_l, v_l, scale=scale)
        return out if self.layout == "HND" else out.transpose(1, 2)

    def extra_repr(self) -> str:
        return (f"head_dim={self.head_dim}, topk={self.topk}, compression_ratio={self.compression_ratio}, "
                f"alpha={self.alpha_mode!r}, routing={self.routing!r}, qat={self.qat}, "
                f"quantized={self.quantized}, "
                f"softtopk_tau={self.softtopk_tau}, "
                f"block_q={self.block_q}, block_k={self.block_k}, feature_map={self.feature_map!r}, "
                f"tie_feature_map_qk={self.tie_feature_map_qk}, "
                f"smooth_k_features={self.smooth_k_features}, layout={self.layout!r}")
