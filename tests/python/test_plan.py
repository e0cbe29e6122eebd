"""Routing plans (SPEC section 1): slattn.route against the composite's router,
the row/column block lists, density, and plan_from_block_map."""

from __future__ import annotations

import pytest
import torch

import reference as ref
import slattn


def hnd(t: torch.Tensor, layout: str) -> torch.Tensor:
    return t if layout == "HND" else t.transpose(1, 2)


def assert_lists_match_map(plan: slattn.RoutingPlan) -> None:
    """Rows: the critical key blocks ascending, then -1; columns: the query blocks choosing each key block."""
    block_map = plan.block_map
    batch, heads, q_blocks, k_blocks = block_map.shape
    assert block_map.dtype == torch.int8
    assert all(t.dtype == torch.int32 for t in plan.tensors[1:])
    assert plan.row_count.shape == (batch, heads, q_blocks) and plan.row_index.shape == block_map.shape
    assert plan.col_count.shape == (batch, heads, k_blocks) and plan.col_index.shape == (batch, heads, k_blocks,
                                                                                          q_blocks)
    for b in range(batch):
        for h in range(heads):
            critical = block_map[b, h] == ref.CRITICAL
            for m in range(q_blocks):
                chosen = [n for n in range(k_blocks) if critical[m, n]]
                assert plan.row_count[b, h, m] == len(chosen)
                assert plan.row_index[b, h, m].tolist() == chosen + [-1] * (k_blocks - len(chosen))
            for n in range(k_blocks):
                choosers = [m for m in range(q_blocks) if critical[m, n]]
                assert plan.col_count[b, h, n] == len(choosers)
                assert plan.col_index[b, h, n].tolist() == choosers + [-1] * (q_blocks - len(choosers))


ROUTE_CASES = [  # (batch, q_heads, kv_heads, q_len, k_len, dim, block_q, block_k, topk, negligible, dtype, layout)
    pytest.param(2, 2, 2, 37, 29, 16, 8, 4, 0.3, 0.25, torch.float32, "HND", id="ragged-f32"),
    pytest.param(1, 4, 2, 64, 48, 8, 8, 8, 0.5, 0.0, torch.float64, "HND", id="gqa-4-2"),
    pytest.param(1, 4, 1, 33, 70, 8, 4, 8, 0.2, 0.3, torch.float64, "NHD", id="gqa-4-1-nhd"),
    pytest.param(2, 3, 3, 130, 200, 32, 64, 64, 0.5, 0.25, torch.bfloat16, "HND", id="bf16-default-blocks"),
    pytest.param(1, 2, 2, 50, 61, 16, 8, 8, 0.4, 0.4, torch.float16, "NHD", id="fp16-nhd"),
    pytest.param(1, 2, 2, 10, 12, 8, 16, 16, 0.5, 0.0, torch.float32, "HND", id="single-block"),
    pytest.param(1, 2, 2, 1, 1, 8, 4, 4, 0.5, 0.0, torch.float32, "HND", id="L=1"),
    pytest.param(1, 2, 2, 40, 40, 8, 4, 4, 0.01, 0.0, torch.float32, "HND", id="topk-clamped-to-one"),
    pytest.param(1, 2, 2, 40, 40, 8, 4, 4, 1.0, 0.0, torch.float32, "HND", id="topk-one"),
    pytest.param(1, 2, 2, 40, 40, 8, 4, 4, 0.5, 0.5, torch.float32, "HND", id="no-marginal"),
    pytest.param(1, 2, 2, 40, 40, 8, 4, 4, 0.05, 0.95, torch.float32, "HND", id="negligible-capped"),
]


@pytest.mark.parametrize("batch,q_heads,kv_heads,q_len,k_len,dim,block_q,block_k,topk,negligible,dtype,layout",
                         ROUTE_CASES)
def test_route_matches_composite(make_inputs, batch, q_heads, kv_heads, q_len, k_len, dim, block_q, block_k, topk,
                                 negligible, dtype, layout):
    x = make_inputs(batch, q_heads, kv_heads, q_len, k_len, dim, dtype=dtype, layout=layout, proj_dtype=None)
    plan = slattn.route(x.q, x.k, topk=topk, negligible=negligible, block_q=block_q, block_k=block_k, layout=layout)
    expected = ref.route(hnd(x.q, layout), hnd(x.k, layout), topk, negligible, block_q, block_k)
    q_blocks, k_blocks = -(-q_len // block_q), -(-k_len // block_k)
    assert plan.block_map.shape == (batch, q_heads, q_blocks, k_blocks)
    assert torch.equal(plan.block_map, expected)
    n_crit, n_negl = ref.critical_count(topk, k_blocks), ref.negligible_count(topk, negligible, k_blocks)
    assert bool(((plan.block_map == 1).sum(-1) == n_crit).all())
    assert bool(((plan.block_map == -1).sum(-1) == n_negl).all())
    assert (plan.block_q, plan.block_k, plan.q_len, plan.k_len) == (block_q, block_k, q_len, k_len)
    assert plan.density == pytest.approx(n_crit / k_blocks, abs=1e-12)
    assert plan.sparsity == pytest.approx(1 - n_crit / k_blocks, abs=1e-12)
    assert_lists_match_map(plan)


def test_route_layouts_agree(make_inputs):
    x = make_inputs(2, 4, 2, 45, 39, 16, layout="NHD", proj_dtype=None)
    plan_nhd = slattn.route(x.q, x.k, topk=0.3, negligible=0.2, block_q=8, block_k=8, layout="NHD")
    plan_hnd = slattn.route(x.q.transpose(1, 2).contiguous(), x.k.transpose(1, 2).contiguous(), topk=0.3,
                            negligible=0.2, block_q=8, block_k=8)
    assert all(torch.equal(a, b) for a, b in zip(plan_nhd.tensors, plan_hnd.tensors))


def test_ties_go_to_lower_block_index():
    """K blocks alternate between two constant blocks, so block scores tie exactly."""
    dim, block = 8, 4
    e0 = torch.zeros(dim)
    e0[0] = 1.0
    k = torch.cat([(-e0 if n % 2 == 0 else e0).expand(block, dim) for n in range(6)])[None, None]  # K~ = K
    q = torch.randn(1, 1, 8, dim, generator=torch.Generator().manual_seed(0))
    q[..., 0] = torch.tensor([1.0, 2.0, 1.5, 3.0, -1.0, -2.0, -1.5, -3.0])  # block means +1.875 and -1.875
    plan = slattn.route(q, k, topk=0.5, negligible=0.34, block_q=4, block_k=block)  # n_crit 3, n_negl 2
    # Query block 0 scores the odd key blocks +1.875 and the even ones -1.875: among each tied group the
    # lower indices rank first, so 1, 3, 5 are critical and the last two ranks, 2 and 4, negligible.
    assert plan.block_map[0, 0, 0].tolist() == [0, 1, -1, 1, -1, 1]
    assert plan.block_map[0, 0, 1].tolist() == [1, 0, 1, -1, 1, -1]
    assert torch.equal(plan.block_map, ref.route(q, k, 0.5, 0.34, 4, block))
    # All blocks alike: the first n_crit blocks are critical, the last n_negl negligible.
    same = torch.randn(1, 1, 4, dim, generator=torch.Generator().manual_seed(1)).repeat(1, 1, 5, 1)
    plan = slattn.route(q, same, topk=0.4, negligible=0.2, block_q=4, block_k=4)
    assert plan.block_map[0, 0].tolist() == [[1, 1, 0, 0, -1]] * 2


def test_route_passes_no_gradient_and_is_deterministic(make_inputs):
    x = make_inputs(1, 2, 2, 30, 30, 8, requires_grad=True, proj_dtype=None)
    first = slattn.route(x.q, x.k, topk=0.3, negligible=0.3, block_q=4, block_k=4)
    second = slattn.route(x.q, x.k, topk=0.3, negligible=0.3, block_q=4, block_k=4)
    assert not any(t.requires_grad for t in first.tensors)
    assert all(torch.equal(a, b) for a, b in zip(first.tensors, second.tensors))
    moved = first.to("cpu")
    assert isinstance(moved, slattn.RoutingPlan)
    assert all(torch.equal(a, b) for a, b in zip(first.tensors, moved.tensors))
    assert (moved.block_q, moved.block_k, moved.q_len, moved.k_len) == (4, 4, 30, 30)


@pytest.mark.parametrize("map_dtype", [torch.int8, torch.int32, torch.int64])
def test_plan_from_block_map_lists_and_density(rng, map_dtype):
    block_map = torch.randint(-1, 2, (2, 3, 5, 7), generator=rng).to(map_dtype)
    block_map[0, 0, 0] = 0  # a row with no critical block
    block_map[1, 2, :, 3] = 1  # a column every query block chose
    plan = slattn.plan_from_block_map(block_map, 8, 4, q_len=37, k_len=28)
    assert plan.block_map.dtype == torch.int8 and torch.equal(plan.block_map, block_map.to(torch.int8))
    assert (plan.block_q, plan.block_k, plan.q_len, plan.k_len) == (8, 4, 37, 28)
    assert_lists_match_map(plan)
    expected_density = float((block_map == 1).sum()) / block_map.numel()
    assert plan.density == pytest.approx(expected_density, abs=1e-12)
    assert plan.sparsity == pytest.approx(1 - expected_density, abs=1e-12)


def test_plan_from_block_map_defaults_and_strides(rng):
    block_map = torch.randint(-1, 2, (1, 2, 4, 3), generator=rng).to(torch.int8)
    plan = slattn.plan_from_block_map(block_map)
    assert (plan.block_q, plan.block_k, plan.q_len, plan.k_len) == (64, 64, 256, 192)
    transposed = block_map.transpose(2, 3).contiguous().transpose(2, 3)  # same values, other strides
    assert not transposed.is_contiguous()
    strided_plan = slattn.plan_from_block_map(transposed)
    assert all(torch.equal(a, b) for a, b in zip(plan.tensors, strided_plan.tensors))


def test_block_lists_op_rejects_bad_values():
    with pytest.raises(ValueError, match="block_map values"):
        torch.ops.slattn.block_lists(torch.tensor([[[[0, 1, 3]]]], dtype=torch.int8))


@pytest.mark.parametrize("block_map,kwargs,match", [
    pytest.param(torch.tensor([[[[0, 2]]]]), {}, "block_map values", id="value-2"),
    pytest.param(torch.tensor([[[[-2, 0]]]]), {}, "block_map values", id="value-minus-2"),
    pytest.param(torch.zeros(2, 3, 4, dtype=torch.int8), {}, "4-D", id="rank-3"),
    pytest.param(torch.zeros(1, 1, 2, 3, 1, dtype=torch.int8), {}, "4-D", id="rank-5"),
    pytest.param([[[[0, 1]]]], {}, "4-D", id="not-a-tensor"),
    pytest.param(torch.zeros(1, 1, 2, 2), {}, "integers", id="float"),
    pytest.param(torch.zeros(1, 1, 2, 2, dtype=torch.bool), {}, "integers", id="bool"),
    pytest.param(torch.zeros(1, 1, 0, 2, dtype=torch.int8), {}, "empty", id="empty"),
    pytest.param(torch.zeros(1, 1, 3, 2, dtype=torch.int8), dict(q_len=193), "q_len", id="q_len-too-long"),
    pytest.param(torch.zeros(1, 1, 3, 2, dtype=torch.int8), dict(q_len=128), "q_len", id="q_len-too-short"),
    pytest.param(torch.zeros(1, 1, 3, 2, dtype=torch.int8), dict(k_len=0), "k_len", id="k_len-zero"),
    pytest.param(torch.zeros(1, 1, 3, 2, dtype=torch.int8), dict(k_len=200), "k_len", id="k_len-too-long"),
    pytest.param(torch.zeros(1, 1, 3, 2, dtype=torch.int8), dict(block_q=0), "block_q", id="block_q-zero"),
    pytest.param(torch.zeros(1, 1, 3, 2, dtype=torch.int8), dict(block_k=2000), "block_k", id="block_k-2000"),
])
def test_plan_from_block_map_validation(block_map, kwargs, match):
    with pytest.raises(ValueError, match=match):
        slattn.plan_from_block_map(block_map, **kwargs)
