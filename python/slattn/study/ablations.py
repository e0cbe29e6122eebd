"""The attention kernels of the SLA paper's ablation (arXiv 2509.24006, Table 2),
as modules the reference DiT takes in place of full attention (q, k, v in the
NHD layout (B, L, H, D); forward(q, k, v, return_sparsity=False)).

- `SparseOnlyAttention`: SLA without its linear branch, i.e. block-sparse
  softmax attention over the critical blocks alone. slattn's op leaves the
  linear branch out entirely when no projection is given (it is not computed,
  so this is also what its cost is), which is exactly Os.
- `LinearOnlyAttention`: linear attention over all keys, φ(Q)(φ(K)ᵀV) /
  (φ(Q)·Σφ(K) + ε) with SLA's default softmax feature map; a composite of torch
  ops (no routing, no sparse branch).
- `LinearPlusSparseAttention` ("L+S"): the sparse branch plus a linear branch
  over all keys, summed with no learned projection. The paper's L+S adds a
  separate linear attention to sparse attention; it differs from SLA in the two
  ways SLA is built to fix: its linear part also covers the critical blocks
  (so their mass is counted twice) and nothing learns how to fit the linear
  output to the residual. slattn's op computes this with linear_scope="all"
  (every non-negligible block, critical ones included) and return_branches
  (Os and Ol, unprojected), so O = Os + Ol on the same kernels as SLA.

Each keeps `last_density`, the fraction of key blocks computed exactly."""

from __future__ import annotations

import torch
from torch import nn

from .. import _checks
from ..attention import sparse_linear_attention
from ..plan import route
from ..soft_attention import LINEAR_EPSILON, feature_map

LAYOUT = "NHD"


def kernel_dtype(q: torch.Tensor) -> torch.dtype:
    """The dtype slattn's kernels run in: bf16 for fp32 CUDA inputs (the CUDA path takes bf16/fp16)."""
    return torch.bfloat16 if q.is_cuda and q.dtype == torch.float32 else q.dtype


class _RoutedAttention(nn.Module):
    """Shared set-up of the two ablations that route like SLA (pooled router, hard top-k)."""

    def __init__(self, head_dim: int, topk: float, block_q: int, block_k: int):
        super().__init__()
        _checks.check_fractions(topk, 0.0)
        _checks.check_block_sizes(block_q, block_k)
        self.head_dim, self.topk, self.block_q, self.block_k = head_dim, topk, block_q, block_k
        self.last_density: float | None = None

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, topk={self.topk}, block_q={self.block_q}, block_k={self.block_k}"

    def _inputs(self, q, k, v):
        dtype = kernel_dtype(q)
        q, k, v = (t.to(dtype) for t in (q, k, v))
        plan = route(q, k, topk=self.topk, block_q=self.block_q, block_k=self.block_k, layout=LAYOUT)
        self.last_density = plan.density
        return q, k, v, plan


class SparseOnlyAttention(_RoutedAttention):
    def forward(self, q, k, v, return_sparsity: bool = False):
        input_dtype = q.dtype
        q, k, v, plan = self._inputs(q, k, v)
        out = sparse_linear_attention(q, k, v, plan=plan, layout=LAYOUT).to(input_dtype)
        return (out, self.last_density) if return_sparsity else out


class LinearPlusSparseAttention(_RoutedAttention):
    def forward(self, q, k, v, return_sparsity: bool = False):
        input_dtype = q.dtype
        q, k, v, plan = self._inputs(q, k, v)
        out_sparse, out_linear, _ = sparse_linear_attention(q, k, v, plan=plan, linear_scope="all", layout=LAYOUT,
                                                            return_branches=True)
        wide = torch.promote_types(out_sparse.dtype, torch.float32)  # bf16 branches are summed in fp32
        out = (out_sparse.to(wide) + out_linear.to(wide)).to(input_dtype)
        return (out, self.last_density) if return_sparsity else out


class LinearOnlyAttention(nn.Module):
    """Linear attention over all keys, computed in fp32 (fp64 for fp64 inputs)."""

    def __init__(self, head_dim: int, feature_map_name: str = "softmax"):
        super().__init__()
        _checks.check_choice("feature_map", feature_map_name, _checks.FEATURE_MAPS)
        self.head_dim, self.feature_map_name = head_dim, feature_map_name
        self.last_density: float | None = None

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, feature_map={self.feature_map_name!r}"

    def forward(self, q, k, v, return_sparsity: bool = False):
        input_dtype = q.dtype
        compute = torch.promote_types(q.dtype, torch.float32)
        # Autocast would run the products in bf16; the sums over every key are what needs fp32.
        with torch.autocast(q.device.type, enabled=False):
            phi_q, phi_k = (feature_map(t.to(compute), self.feature_map_name) for t in (q, k))  # (B, L, H, F)
            state = torch.einsum("blhf,blhd->bhfd", phi_k, v.to(compute))
            normaliser = phi_k.sum(dim=1)                                                       # (B, H, F)
            numerator = torch.einsum("blhf,bhfd->blhd", phi_q, state)
            denominator = torch.einsum("blhf,bhf->blh", phi_q, normaliser).unsqueeze(-1) + LINEAR_EPSILON
        out = (numerator / denominator).to(input_dtype)
        self.last_density = 0.0  # no key block is computed exactly
        return (out, 0.0) if return_sparsity else out
