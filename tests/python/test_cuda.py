"""The CUDA path against the float64 composite of SPEC.md, with FlashAttention's
tolerance rule (error <= 2x that of the same math run in the input dtype,
plus rounding noise); routing bit-identical to the CPU router. GPU only."""

from __future__ import annotations

import itertools

import pytest
import torch

import reference
import slattn

pytestmark = pytest.mark.gpu

FEATURE_MAPS = ("softmax", "elu", "relu")  # hedgehog, with its weights, below
SCOPES = ("marginal", "all")


def draw(rng, shape, dtype):
    return torch.randn(shape, dtype=torch.float64, generator=rng).to(dtype)


def layer(rng, *, batch=1, heads=2, kv_heads=None, q_len=300, k_len=300, dim=64, dtype=torch.bfloat16):
    kv_heads = heads if kv_heads is None else kv_heads
    q = draw(rng, (batch, heads, q_len, dim), dtype)
    k = draw(rng, (batch, kv_heads, k_len, dim), dtype)
    v = draw(rng, (batch, kv_heads, k_len, dim), dtype)
    weight = 0.3 * draw(rng, (dim, dim), torch.float32)
    bias = 0.3 * draw(rng, (dim,), torch.float32)
    return q, k, v, weight, bias


def assert_within_baseline(actual, exact, baseline, name="output"):
    """The tolerance rule of reference.py, with a floor at fp32 rounding: where
    the exact value is 0 in every element (a gradient through a one-key
    softmax), both the baseline error and the rounding noise are 0 too. The
    floor grows with the head dim (the last dimension): the GPU reaches such a
    zero as a difference of fp32 dot products of that length (dO·V - dO·Os)."""
    eps = torch.finfo(torch.float32).eps
    floor = 4 * eps * exact.shape[-1] * max(1.0, float(exact.detach().abs().max()))
    if reference.max_error(actual, exact) <= floor:
        return
    reference.assert_within_baseline(actual, exact, baseline, name=name)


def cuda_leaf(t):
    return t.cuda().requires_grad_()


def check_against_composite(q, k, v, weight, bias, *, topk, negligible=0.0, block_q=64, block_k=64,
                            feature_map="softmax", linear_scope="marginal", grads=True, feature_weight_q=None,
                            feature_weight_k=None):
    """Runs slattn on the GPU and the composite (float64 and input dtype) on the
    CPU with the same block map; asserts the tolerance rule on every output
    and gradient (hedgehog's W_q and W_k included; W_k None: tied)."""
    cq, ck, cv = (cuda_leaf(t) for t in (q, k, v))
    cw, cb, cw_q, cw_k = (cuda_leaf(t) if t is not None else None
                          for t in (weight, bias, feature_weight_q, feature_weight_k))
    plan = slattn.route(cq, ck, topk=topk, negligible=negligible, block_q=block_q, block_k=block_k)
    out, lse = slattn.sparse_linear_attention(cq, ck, cv, cw, cb, feature_map=feature_map, linear_scope=linear_scope,
                                              feature_weight_q=cw_q, feature_weight_k=cw_k, plan=plan,
                                              return_lse=True)
    block_map = plan.block_map.cpu()
    options = dict(block_q=block_q, block_k=block_k, feature_map=feature_map, linear_scope=linear_scope,
                   block_map=block_map)
    params = (weight, bias, feature_weight_q, feature_weight_k)
    leaves64 = [t.double().requires_grad_() for t in (q, k, v)]
    params64 = [t.double().requires_grad_() if t is not None else None for t in params]
    exact = reference.sla(*leaves64, *params64[:2], feature_weight_q=params64[2], feature_weight_k=params64[3],
                          **options)
    leaves_low = [t.clone().requires_grad_() for t in (q, k, v)]
    params_low = [t.clone().requires_grad_() if t is not None else None for t in params]
    baseline = reference.sla(*leaves_low, *params_low[:2], feature_weight_q=params_low[2],
                             feature_weight_k=params_low[3], **options)

    assert_within_baseline(out.cpu(), exact.out, baseline.out, name="out")
    finite = torch.isfinite(exact.lse)
    assert torch.equal(torch.isfinite(lse.cpu()), finite)
    assert reference.max_error(lse.cpu()[finite], exact.lse[finite]) < 2e-2
    if not grads:
        return
    grad = torch.randn(out.shape, dtype=torch.float64).to(q.dtype)
    out.backward(grad.cuda())
    exact.out.backward(grad.double())
    baseline.out.backward(grad)
    names = ("dq", "dk", "dv")
    for name, actual, ref, low in zip(names, (cq, ck, cv), leaves64, leaves_low):
        assert_within_baseline(actual.grad.cpu(), ref.grad, low.grad, name=name)
    names = ("d_proj_weight", "d_proj_bias", "d_feature_weight_q", "d_feature_weight_k")
    for name, actual, ref, low in zip(names, (cw, cb, cw_q, cw_k), params64, params_low):
        if actual is not None:
            assert_within_baseline(actual.grad.cpu(), ref.grad, low.grad, name=name)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [dict(q_len=300, k_len=300), dict(q_len=1, k_len=1), dict(q_len=130, k_len=515),
                                   dict(heads=4, kv_heads=2, q_len=200, k_len=190), dict(heads=4, kv_heads=1)])
def test_routing_matches_the_cpu_router_bit_for_bit(rng, dtype, shape):
    q, k, _, _, _ = layer(rng, dtype=dtype, **shape)
    for topk, negligible, block in ((0.25, 0.0, 64), (0.1, 0.3, 64), (0.5, 0.2, 128), (1.0, 0.0, 64)):
        gpu = slattn.route(q.cuda(), k.cuda(), topk=topk, negligible=negligible, block_q=block, block_k=block)
        cpu = slattn.route(q, k, topk=topk, negligible=negligible, block_q=block, block_k=block)
        for name, g, c in zip(("block_map", "row_count", "row_index", "col_count", "col_index"), gpu.tensors,
                              cpu.tensors):
            assert torch.equal(g.cpu(), c), f"{name} differs (topk={topk}, negligible={negligible}, block={block})"


@pytest.mark.parametrize("feature_map,linear_scope", list(itertools.product(FEATURE_MAPS, SCOPES)))
def test_forward_and_backward_every_feature_map_and_scope(rng, feature_map, linear_scope):
    q, k, v, w, b = layer(rng, heads=2, q_len=200, k_len=260, dim=64)
    check_against_composite(q, k, v, w, b, topk=0.3, negligible=0.2, feature_map=feature_map,
                            linear_scope=linear_scope)


def hedgehog_weight(rng, dim):
    """A trained-looking hedgehog W: the identity moved by noise that keeps x Wᵀ of order one."""
    return torch.eye(dim) + (0.3 / dim ** 0.5) * draw(rng, (dim, dim), torch.float32)


@pytest.mark.parametrize("linear_scope", SCOPES)
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("dim", [64, 128])
def test_hedgehog_forward_and_backward(rng, dim, tied, linear_scope):
    """F = 2D = 128 and 256: φ, its backward through W to dq/dk, and dW_q/dW_k (summed when tied)."""
    q, k, v, w, b = layer(rng, heads=4, kv_heads=2, q_len=200, k_len=260, dim=dim)
    w_q = hedgehog_weight(rng, dim)
    w_k = None if tied else hedgehog_weight(rng, dim)
    check_against_composite(q, k, v, w, b, topk=0.3, negligible=0.2, feature_map="hedgehog",
                            linear_scope=linear_scope, feature_weight_q=w_q, feature_weight_k=w_k)


@pytest.mark.parametrize("shape", [dict(q_len=1, k_len=1), dict(q_len=65, k_len=4100, heads=2, kv_heads=1)])
def test_hedgehog_edge_shapes(rng, shape):
    """One token; and more key rows than one dW partial holds (2048), with a remainder."""
    q, k, v, w, b = layer(rng, **shape)
    check_against_composite(q, k, v, w, b, topk=0.5, feature_map="hedgehog", linear_scope="all",
                            feature_weight_q=hedgehog_weight(rng, 64), feature_weight_k=hedgehog_weight(rng, 64))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dim", [64, 128])
@pytest.mark.parametrize("blocks", [(64, 64), (128, 128), (64, 128), (128, 64)])
def test_head_dims_block_sizes_and_dtypes(rng, dtype, dim, blocks):
    q, k, v, w, b = layer(rng, heads=2, q_len=333, k_len=290, dim=dim, dtype=dtype)
    check_against_composite(q, k, v, w, b, topk=0.4, block_q=blocks[0], block_k=blocks[1])


@pytest.mark.parametrize("shape", [dict(q_len=1, k_len=1), dict(q_len=1, k_len=200), dict(q_len=65, k_len=63),
                                   dict(heads=4, kv_heads=2), dict(heads=6, kv_heads=1, q_len=150, k_len=100),
                                   dict(batch=2, heads=2, q_len=64, k_len=64)])
def test_edge_shapes(rng, shape):
    q, k, v, w, b = layer(rng, **shape)
    check_against_composite(q, k, v, w, b, topk=0.5)


def test_wide_gqa_group(rng):
    """33 query heads per kv head: the key side sums dH_m over the group's heads as well as its query blocks."""
    q, k, v, w, b = layer(rng, heads=33, kv_heads=1, q_len=130, k_len=140)
    check_against_composite(q, k, v, w, b, topk=0.5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_empty_linear_sets(rng, dtype):
    """Every key block critical or negligible: U_m is empty for every query block, so Ol is 0 and no gradient
    flows through the linear branch (its φ / den would be φ / ε, past fp16's range, were it formed)."""
    q, k, v, w, b = layer(rng, q_len=300, k_len=300, dtype=dtype)
    check_against_composite(q, k, v, w, b, topk=0.4, negligible=0.6)


def test_no_projection_and_sparse_only(rng):
    q, k, v, _, _ = layer(rng, q_len=250, k_len=250)
    check_against_composite(q, k, v, None, None, topk=0.3)


def test_topk_one_is_dense_attention(rng):
    q, k, v, _, _ = layer(rng, heads=2, q_len=333, k_len=200, dim=128)
    cq, ck, cv = q.cuda(), k.cuda(), v.cuda()
    os_, ol, _ = slattn.sparse_linear_attention(cq, ck, cv, topk=1.0, return_branches=True)
    dense64 = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double())
    dense_low = torch.nn.functional.scaled_dot_product_attention(cq, ck, cv).cpu()
    assert_within_baseline(os_.cpu(), dense64, dense_low, name="topk=1 output")
    assert torch.count_nonzero(ol) == 0  # every block is critical: the marginal set is empty


def test_long_sequence_many_tiles(rng):
    q, k, v, w, b = layer(rng, heads=1, q_len=8192, k_len=8192, dim=64)
    check_against_composite(q, k, v, w, b, topk=0.05)


@pytest.mark.parametrize("dim", [64, 128])
def test_more_query_blocks_than_thread_blocks(rng, dim):
    """384 query blocks: the persistent kernels (the projection's gradients among them, one partial per thread
    block) each take several."""
    q, k, v, w, b = layer(rng, heads=6, q_len=4096, k_len=256, dim=dim)
    check_against_composite(q, k, v, w, b, topk=0.5)


def test_nhd_layout_and_non_contiguous_inputs(rng):
    q, k, v, w, b = (t.cuda() for t in layer(rng, heads=2, q_len=200, k_len=170, dim=64))
    plan = slattn.route(q, k, topk=0.3)
    hnd = slattn.sparse_linear_attention(q, k, v, w, b, plan=plan)
    nhd = slattn.sparse_linear_attention(*(t.transpose(1, 2) for t in (q, k, v)), w, b, plan=plan, layout="NHD")
    assert torch.equal(nhd.transpose(1, 2), hnd)


def test_plan_from_block_map_on_the_gpu(rng):
    q, k, v, w, b = layer(rng, heads=2, q_len=256, k_len=256)
    block_map = torch.randint(-1, 2, (1, 2, 4, 4), generator=rng, dtype=torch.int8)
    block_map[..., 0] = 1  # every row keeps one critical block
    plan_gpu = slattn.plan_from_block_map(block_map.cuda())
    plan_cpu = slattn.plan_from_block_map(block_map)
    for g, c in zip(plan_gpu.tensors, plan_cpu.tensors):
        assert torch.equal(g.cpu(), c)
    out_gpu = slattn.sparse_linear_attention(q.cuda(), k.cuda(), v.cuda(), w.cuda(), b.cuda(), plan=plan_gpu)
    exact = reference.sla(q.double(), k.double(), v.double(), w.double(), b.double(), block_map=block_map)
    baseline = reference.sla(q, k, v, w, b, block_map=block_map)
    assert_within_baseline(out_gpu.cpu(), exact.out, baseline.out)


@pytest.mark.parametrize("feature_map", FEATURE_MAPS)
@pytest.mark.parametrize("dim,block", [(64, 64), (128, 128), (128, 64)])
def test_key_blocks_no_query_block_chose(rng, feature_map, dim, block):
    """Key blocks in no row list: the dK/dV kernel has no listed block for them, yet their linear terms (dV =
    φ(K) dh_n, dK through φ) are whole; with 128-row blocks the kernel adds those terms itself, at (128, 64) the
    linear branch's own key kernel does."""
    q, k, v, w, b = layer(rng, heads=2, q_len=4 * block, k_len=5 * block - 7, dim=dim)
    block_map = torch.zeros((1, 2, 4, 5), dtype=torch.int8)
    block_map[..., 0] = 1
    block_map[:, 0, :, 2] = 1
    block_map[:, 1, 1, 3] = -1  # columns 1, 3 and 4 (ragged) in no row list of either head
    plan = slattn.plan_from_block_map(block_map.cuda(), block_q=block, block_k=block, k_len=k.shape[2])
    leaves = [cuda_leaf(t) for t in (q, k, v, w, b)]
    out = slattn.sparse_linear_attention(*leaves, feature_map=feature_map, plan=plan)
    options = dict(block_q=block, block_k=block, feature_map=feature_map, block_map=block_map)
    exact_leaves = [t.double().requires_grad_() for t in (q, k, v, w, b)]
    low_leaves = [t.clone().requires_grad_() for t in (q, k, v, w, b)]
    exact = reference.sla(*exact_leaves, **options)
    baseline = reference.sla(*low_leaves, **options)
    grad = torch.randn(out.shape, dtype=torch.float64, generator=rng).to(q.dtype)
    out.backward(grad.cuda())
    exact.out.backward(grad.double())
    baseline.out.backward(grad)
    assert_within_baseline(out.detach().cpu(), exact.out, baseline.out, name="out")
    for name, actual, ref, low in zip(("dq", "dk", "dv", "dw", "db"), leaves, exact_leaves, low_leaves):
        assert_within_baseline(actual.grad.cpu(), ref.grad, low.grad, name=name)


@pytest.mark.parametrize("dim,block", [(64, 64), (128, 128), (128, 64)])
def test_query_blocks_without_critical_blocks_and_both_branches(rng, dim, block):
    """Query blocks whose row lists are empty: Os is 0 there and the LSE -inf, yet Ol is whole. With block_k = D
    the Hopper forward adds the linear branch in its epilogue (φ(Q) formed from the query tile it copies even for
    such a block), at (128, 64) the linear branch's own kernel does; both return Os and Ol as asked."""
    q, k, v, w, b = layer(rng, heads=2, q_len=4 * block - 5, k_len=3 * block + 9, dim=dim)
    block_map = torch.zeros((1, 2, 4, 4), dtype=torch.int8)
    block_map[:, :, 0, 1] = 1
    block_map[:, 0, 2, :2] = 1
    block_map[:, 1, 3, 3] = 1
    block_map[:, 1, 1, 0] = -1  # head 0: query blocks 1 and 3 without a critical block; head 1: blocks 1 and 2
    plan = slattn.plan_from_block_map(block_map.cuda(), block_q=block, block_k=block, q_len=q.shape[2],
                                      k_len=k.shape[2])
    leaves = [cuda_leaf(t) for t in (q, k, v, w, b)]
    out, lse = slattn.sparse_linear_attention(*leaves, plan=plan, return_lse=True)
    os_, ol, _ = slattn.sparse_linear_attention(*(t.detach() for t in leaves), plan=plan, return_branches=True)
    options = dict(block_q=block, block_k=block, block_map=block_map)
    exact_leaves = [t.double().requires_grad_() for t in (q, k, v, w, b)]
    low_leaves = [t.clone().requires_grad_() for t in (q, k, v, w, b)]
    exact = reference.sla(*exact_leaves, **options)
    baseline = reference.sla(*low_leaves, **options)
    assert_within_baseline(out.detach().cpu(), exact.out, baseline.out, name="out")
    assert_within_baseline(os_.cpu(), exact.sparse, baseline.sparse, name="Os")
    assert_within_baseline(ol.cpu(), exact.linear, baseline.linear, name="Ol")
    assert torch.equal(torch.isfinite(lse.detach().cpu()), torch.isfinite(exact.lse))
    assert not torch.isfinite(exact.lse).all()  # the case holds rows without a critical key
    grad = torch.randn(out.shape, dtype=torch.float64, generator=rng).to(q.dtype)
    out.backward(grad.cuda())
    exact.out.backward(grad.double())
    baseline.out.backward(grad)
    for name, actual, ref, low in zip(("dq", "dk", "dv", "dw", "db"), leaves, exact_leaves, low_leaves):
        assert_within_baseline(actual.grad.cpu(), ref.grad, low.grad, name=name)


def test_cuda_graph_capture_of_forward_and_backward(rng):
    q, k, v, w, b = (cuda_leaf(t) for t in layer(rng, heads=2, q_len=256, k_len=256))
    plan = slattn.route(q, k, topk=0.25)
    grad = torch.randn_like(q)

    def step():
        for t in (q, k, v, w, b):
            t.grad = None
        out = slattn.sparse_linear_attention(q, k, v, w, b, plan=plan)
        out.backward(grad)
        return out

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        eager = step().detach().clone()
        eager_dq = q.grad.clone()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, eager)
    assert torch.equal(q.grad, eager_dq)


def test_unsupported_cuda_inputs_are_refused_clearly(rng):
    q, k, v, _, _ = layer(rng, dim=64, dtype=torch.float32)
    with pytest.raises(ValueError, match="bfloat16 and float16"):
        slattn.sparse_linear_attention(q.cuda(), k.cuda(), v.cuda(), topk=0.5)
    q, k, v, _, _ = layer(rng, dim=96)
    with pytest.raises(ValueError, match="head_dim 64 and 128"):
        slattn.sparse_linear_attention(q.cuda(), k.cuda(), v.cuda(), topk=0.5)
    q, k, v, _, _ = layer(rng, dim=64)
    with pytest.raises(ValueError, match="block_q 64 and 128"):
        slattn.sparse_linear_attention(q.cuda(), k.cuda(), v.cuda(), topk=0.5, block_q=32)
    bad = torch.full((1, 2, 5, 5), 3, dtype=torch.int8, device="cuda")
    with pytest.raises(ValueError, match="-1"):
        slattn.plan_from_block_map(bad)
