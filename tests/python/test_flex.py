"""FlexAttention given slattn's block map computes slattn's sparse branch: an
independent implementation of SPEC section 2, and the comparison `slattn
bench` makes."""

from __future__ import annotations

import pytest
import torch

import slattn
from slattn.flex import flex_sparse_attention

pytest.importorskip("torch.nn.attention.flex_attention", reason="FlexAttention needs PyTorch >= 2.5")


def test_flex_attention_with_the_plan_equals_the_sparse_branch():
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, 300, 64, generator=gen)
    k, v = (torch.randn(1, 2, 270, 64, generator=gen) for _ in range(2))  # ragged blocks, GQA
    plan = slattn.route(q, k, topk=0.3, negligible=0.2)
    expected = slattn.sparse_linear_attention(q, k, v, plan=plan)
    torch.testing.assert_close(flex_sparse_attention(q, k, v, plan), expected, atol=2e-5, rtol=2e-5)
    dense_like = slattn.sparse_linear_attention(q, k, v, topk=1.0)
    assert (expected - dense_like).abs().max() > 1e-2  # the plan really is sparse
