"""The ablation kernels of the study: sparse only, linear only, L+S."""

from __future__ import annotations

import pytest
import torch

import slattn
from slattn.study.ablations import LinearOnlyAttention, LinearPlusSparseAttention, SparseOnlyAttention
from slattn.workload import Workload, make_qkv


def _nhd(workload: Workload):
    return [t.transpose(1, 2) for t in make_qkv(workload, dtype=torch.float64)]  # (B, L, H, D), strided


def test_l_plus_s_is_the_sparse_branch_plus_linear_attention_over_all_keys():
    """Three implementations tie together: the kernel's sparse branch (sparse only), the kernel's linear
    branch over every block (in L+S) and the torch composite of linear attention (linear only)."""
    q, k, v = _nhd(Workload((2, 6, 8), heads=2, head_dim=16))
    sparse = SparseOnlyAttention(16, topk=0.25, block_q=16, block_k=16)
    both = LinearPlusSparseAttention(16, topk=0.25, block_q=16, block_k=16)
    linear = LinearOnlyAttention(16)
    torch.testing.assert_close(both(q, k, v) - sparse(q, k, v), linear(q, k, v), rtol=1e-9, atol=1e-9)
    assert sparse.last_density == both.last_density == pytest.approx(1 / 6)  # floor(0.25 * 6) of 6 key blocks
    assert linear(q, k, v, return_sparsity=True)[1] == 0.0


def test_sparse_only_is_block_sparse_softmax():
    q, k, v = _nhd(Workload((2, 4, 8), heads=1, head_dim=16, seed=1))
    out = SparseOnlyAttention(16, topk=0.5, block_q=16, block_k=16)(q, k, v)
    plan = slattn.route(q, k, topk=0.5, block_q=16, block_k=16, layout="NHD")
    # Softmax over the critical key blocks of each query block, by a dense mask.
    mask = plan.block_map[0, 0].repeat_interleave(16, 0).repeat_interleave(16, 1) == 1
    logits = (q[0, :, 0] @ k[0, :, 0].T) / 4.0
    expected = torch.softmax(logits.masked_fill(~mask, float("-inf")), dim=-1) @ v[0, :, 0]
    torch.testing.assert_close(out[0, :, 0], expected, rtol=1e-9, atol=1e-9)


def test_ablation_kernels_pass_gradients_and_keep_the_dtype():
    q, k, v = (t.float().requires_grad_() for t in _nhd(Workload((2, 4, 8), heads=2, head_dim=16, seed=2)))
    for kernel in (SparseOnlyAttention(16, 0.25, 16, 16), LinearPlusSparseAttention(16, 0.25, 16, 16),
                   LinearOnlyAttention(16)):
        out = kernel(q, k, v)
        assert out.dtype == torch.float32 and out.shape == q.shape
        grads = torch.autograd.grad(out.square().sum(), (q, k, v))
        assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads), type(kernel).__name__


def test_ablation_arguments_are_named():
    with pytest.raises(ValueError, match="topk"):
        SparseOnlyAttention(16, topk=0.0, block_q=16, block_k=16)
    with pytest.raises(ValueError, match="block_k"):
        LinearPlusSparseAttention(16, topk=0.1, block_q=16, block_k=0)
    with pytest.raises(ValueError, match="feature_map"):
        LinearOnlyAttention(16, "cosine")


def test_linear_only_sums_in_fp32_under_autocast():
    """Under bf16 autocast (how the study trains on a GPU; CPU autocast behaves alike) the products over every
    key still run in fp32: the output equals the one computed without autocast, up to its bf16 rounding."""
    q, k, v = (t.float().to(torch.bfloat16) for t in _nhd(Workload((2, 4, 8), heads=2, head_dim=16, seed=3)))
    kernel = LinearOnlyAttention(16)
    expected = kernel(q, k, v)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = kernel(q, k, v)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
