"""SLA2 routing (SPEC section 1): the learned router's block scores and hard
classes, and SoftTop-k (row sums, the hard limit, its gradient)."""

from __future__ import annotations

import math

import pytest
import torch
from torch.autograd import gradcheck

import reference as ref
import slattn
from slattn.router import LearnedRouter, classify
from slattn.soft_topk import soft_topk_logits


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("layout", ["HND", "NHD"])
@pytest.mark.parametrize("shape", [(2, 4, 2, 70, 54), (1, 2, 2, 1, 1), (1, 3, 1, 128, 200)])
def test_identity_router_reproduces_pooled_routing(make_inputs, dtype, layout, shape):
    """An untrained router (compression 1) picks SLA's blocks: same block map as slattn.route."""
    batch, heads, kv_heads, q_len, k_len = shape
    x = make_inputs(batch, heads, kv_heads, q_len, k_len, 32, dtype=dtype, layout=layout, proj_dtype=None)
    for topk in (0.05, 0.3, 1.0):
        layer = slattn.SparseLinearAttention2(32, topk, block_q=16, block_k=16, layout=layout)
        plan = layer.route(x.q, x.k)
        pooled = slattn.route(x.q, x.k, topk=topk, block_q=16, block_k=16, layout=layout)
        assert isinstance(plan, slattn.RoutingPlan)
        assert torch.equal(plan.block_map, pooled.block_map)
        assert [torch.equal(a, b) for a, b in zip(plan.tensors, pooled.tensors)] == [True] * 5
        assert (plan.q_len, plan.k_len) == (pooled.q_len, pooled.k_len)


def test_scores_follow_the_spec_formula(make_inputs, rng):
    """S = (Pq q̄)·(Pk k̄)/sqrt(d_r) with a trained (random) router and compression 4, GQA, ragged blocks."""
    x = make_inputs(1, 4, 2, 45, 37, 16, proj_dtype=None)
    router = LearnedRouter(16, compression_ratio=4)
    with torch.no_grad():
        router.proj_q.weight.copy_(torch.randn(4, 16, generator=rng))
        router.proj_k.weight.copy_(torch.randn(4, 16, generator=rng))
    scores = router.block_scores(x.q, x.k, 8, 8)
    k = ref.repeat_kv(x.k, 4)
    q_bar = ref.block_means(x.q, 8) @ router.proj_q.weight.double().t()
    k_bar = ref.block_means(k - k.mean(dim=2, keepdim=True), 8) @ router.proj_k.weight.double().t()
    expected = q_bar @ k_bar.transpose(-1, -2) / 2.0
    assert scores.dtype == torch.float64 and scores.shape == (1, 4, 6, 5)
    torch.testing.assert_close(scores, expected, rtol=1e-12, atol=1e-12)


def test_identity_init_uses_first_rows():
    router = LearnedRouter(16, compression_ratio=4)
    assert router.routing_dim == 4
    for proj in (router.proj_q, router.proj_k):
        assert torch.equal(proj.weight, torch.eye(16)[:4])


def test_classify_counts_and_ties():
    scores = torch.tensor([[[[1.0, 3.0, 3.0, 2.0, 3.0, float("nan")]]]], dtype=torch.float64)
    block_map = classify(scores, 0.34)  # n_crit = floor(0.34 * 6) = 2: ties to the lower index
    assert block_map.tolist() == [[[[0, 1, 1, 0, 0, 0]]]]
    assert classify(scores, 1.0).tolist() == [[[[1] * 6]]]
    assert classify(scores, 0.01).tolist() == [[[[0, 1, 0, 0, 0, 0]]]]  # at least one block
    assert block_map.dtype == torch.int8


def random_scores(rng, rows=5, blocks=12):
    return torch.randn(2, 3, rows, blocks, dtype=torch.float64, generator=rng)


@pytest.mark.parametrize("topk", [0.05, 0.25, 0.5, 0.9])
@pytest.mark.parametrize("tau", [0.1, 1.0, 0.003])
def test_soft_topk_rows_sum_to_n_crit(rng, topk, tau):
    scores = 3 * random_scores(rng)
    n_crit = ref.critical_count(topk, scores.shape[-1])
    mask = torch.sigmoid(soft_topk_logits(scores, topk, tau))
    assert float((mask.sum(dim=-1) - n_crit).abs().max()) < 1e-4
    assert bool(((mask >= 0) & (mask <= 1)).all())


def test_soft_topk_approaches_the_hard_mask(rng):
    scores = random_scores(rng)
    topk = 0.25
    # The hard top-k by rank (ties cannot occur in random float64 scores).
    rank = torch.argsort(torch.argsort(-scores, dim=-1), dim=-1)
    hard = rank < ref.critical_count(topk, scores.shape[-1])
    errors = [float((torch.sigmoid(soft_topk_logits(scores, topk, tau)) - hard.double()).abs().max())
              for tau in (1.0, 0.1, 1e-2, 1e-3, 1e-5)]
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 1e-6, errors
    assert errors[0] > 0.1  # a warm mask really is soft


def test_soft_topk_all_blocks_critical(rng):
    mask_logits = soft_topk_logits(random_scores(rng), 1.0, 0.1)
    assert bool((torch.sigmoid(mask_logits) == 1).all())


def test_soft_topk_gradient(rng):
    """dλ/dS by the implicit function theorem matches finite differences of the whole map."""
    scores = random_scores(rng, rows=3, blocks=7).requires_grad_()
    assert gradcheck(lambda s: torch.sigmoid(soft_topk_logits(s, 0.3, 0.5)), (scores,))


@pytest.mark.parametrize("tau", [0.0, -1.0, math.inf, True])
def test_soft_topk_rejects_bad_tau(tau):
    with pytest.raises(ValueError, match="softtopk_tau"):
        soft_topk_logits(torch.zeros(1, 4, dtype=torch.float64), 0.5, tau)
