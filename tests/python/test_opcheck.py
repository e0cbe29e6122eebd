"""The custom ops under torch.library.opcheck (schema, fake tensors, autograd
registration, AOT dispatch), and torch.compile(fullgraph=True) against eager."""

from __future__ import annotations

import pytest
import torch
from torch.library import opcheck

import slattn

BLOCK = 4


def plan_for(x, **routing):
    return slattn.route(x.q, x.k, topk=0.3, negligible=0.2, block_q=BLOCK, block_k=BLOCK, **routing)


@pytest.mark.parametrize("layout", ["HND", "NHD"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_opcheck_route(make_inputs, layout, dtype):
    x = make_inputs(2, 4, 2, 21, 19, 8, dtype=dtype, layout=layout)
    opcheck(torch.ops.slattn.route.default, (x.q, x.k, 0.3, 0.2, BLOCK, BLOCK, layout))
    block_map, *_ = torch.ops.slattn.route(x.q, x.k, 0.3, 0.2, BLOCK, BLOCK, layout)
    assert block_map.shape == (2, 4, 6, 5) and block_map.dtype == torch.int8


def test_opcheck_block_lists(rng):
    block_map = torch.randint(-1, 2, (2, 3, 5, 7), generator=rng).to(torch.int8)
    opcheck(torch.ops.slattn.block_lists.default, (block_map,))
    row_count, row_index, col_count, col_index = torch.ops.slattn.block_lists(block_map)
    assert torch.equal(row_count, (block_map == 1).sum(-1).to(torch.int32))
    assert torch.equal(col_count, (block_map == 1).sum(-2).to(torch.int32))
    assert row_index.shape == (2, 3, 5, 7) and col_index.shape == (2, 3, 7, 5)


def forward_args(x, plan, layout="HND", feature_map="softmax", linear_scope="marginal", return_linear=False):
    return (x.q, x.k, x.v, x.proj_weight, x.proj_bias, *plan.tensors, plan.block_q, plan.block_k, 0.35, feature_map,
            linear_scope, layout, return_linear)


@pytest.mark.parametrize("return_linear", [False, True], ids=["out", "out+linear"])
@pytest.mark.parametrize("projection", ["none", "weight", "weight+bias"])
def test_opcheck_sla_forward(make_inputs, projection, return_linear):
    x = make_inputs(1, 4, 2, 21, 19, 8, dtype=torch.float32, proj_dtype=None if projection == "none" else
                    torch.float32, bias=projection == "weight+bias", requires_grad=True)
    plan = plan_for(x)
    args = forward_args(x, plan, feature_map="elu", linear_scope="all", return_linear=return_linear)
    opcheck(torch.ops.slattn.sla_forward.default, args)
    out, out_sparse, out_linear, lse = torch.ops.slattn.sla_forward(*args)
    assert out.shape == x.q.shape and lse.shape == (1, 4, 21)
    assert out_sparse.numel() == (0 if projection == "none" else out.numel())
    assert out_linear.numel() == (out.numel() if return_linear else 0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=["f64", "bf16"])
def test_opcheck_sla_forward_nhd(make_inputs, dtype):
    x = make_inputs(2, 2, 1, 17, 22, 16, dtype=dtype, layout="NHD", requires_grad=dtype == torch.float64,
                    proj_dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    plan = plan_for(x, layout="NHD")
    opcheck(torch.ops.slattn.sla_forward.default, forward_args(x, plan, layout="NHD", return_linear=True))


@pytest.mark.parametrize("branch_grads", [False, True], ids=["dout", "dout+branches"])
@pytest.mark.parametrize("with_proj", [False, True], ids=["no-proj", "proj"])
def test_opcheck_sla_backward(make_inputs, rng, with_proj, branch_grads):
    x = make_inputs(1, 4, 2, 21, 19, 8, proj_dtype=torch.float64 if with_proj else None)
    plan = plan_for(x)
    options = (plan.block_q, plan.block_k, 0.35, "softmax", "marginal", "HND")
    out, out_sparse, _, lse = torch.ops.slattn.sla_forward(*forward_args(x, plan))
    saved_sparse = out_sparse if with_proj else out

    def gradient():
        return torch.randn(x.q.shape, dtype=torch.float64, generator=rng)

    dout = gradient()
    dout_sparse, dout_linear = (gradient(), gradient()) if branch_grads else (None, None)
    args = (x.q, x.k, x.v, saved_sparse, lse, x.proj_weight, x.proj_bias, dout, dout_sparse, dout_linear,
            *plan.tensors, *options)
    opcheck(torch.ops.slattn.sla_backward.default, args)
    dq, dk, dv, d_weight, d_bias, d_feature_q, d_feature_k = torch.ops.slattn.sla_backward(*args)
    assert dq.shape == x.q.shape and dk.shape == dv.shape == x.k.shape
    assert d_weight.shape == ((8, 8) if with_proj else (0,)) and d_bias.shape == ((8,) if with_proj else (0,))
    assert d_feature_q.shape == d_feature_k.shape == (0,)  # softmax has no feature weights
    assert all(bool(torch.isfinite(g).all()) for g in (dq, dk, dv))


def test_backward_op_matches_autograd(make_inputs, rng):
    """The backward op called by hand gives what autograd gives through the forward op."""
    x = make_inputs(1, 4, 2, 21, 19, 8, proj_dtype=torch.float64, requires_grad=True)
    plan = plan_for(x)
    out, out_sparse, _, lse = torch.ops.slattn.sla_forward(*forward_args(x, plan))
    dout = torch.randn(out.shape, dtype=torch.float64, generator=rng)
    expected = torch.autograd.grad(out, x.leaves(), dout)
    detached = [t.detach() for t in x]
    actual = torch.ops.slattn.sla_backward(*detached[:3], out_sparse.detach(), lse, *detached[3:], dout, None, None,
                                           *plan.tensors, plan.block_q, plan.block_k, 0.35, "softmax", "marginal",
                                           "HND")
    assert len(expected) == 5 and all(t.numel() == 0 for t in actual[5:])  # no feature weights
    for a, e in zip(actual[:5], expected):
        assert torch.equal(a, e)


def feature_weights(rng, dim, tied, dtype=torch.float64):
    """Hedgehog's W_q and W_k (None when tied): the identity moved by noise."""
    def draw():
        w = torch.eye(dim, dtype=torch.float64) + 0.3 * torch.randn(dim, dim, dtype=torch.float64, generator=rng)
        return w.to(dtype).requires_grad_()
    return draw(), None if tied else draw()


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_opcheck_hedgehog(make_inputs, rng, tied):
    x = make_inputs(1, 4, 2, 21, 19, 8, dtype=torch.float64, proj_dtype=torch.float64, requires_grad=True)
    weight_q, weight_k = feature_weights(rng, 8, tied)
    plan = plan_for(x)
    args = forward_args(x, plan, feature_map="hedgehog", linear_scope="all", return_linear=True) + (weight_q, weight_k)
    opcheck(torch.ops.slattn.sla_forward.default, args)
    out, out_sparse, _, lse = torch.ops.slattn.sla_forward(*args)
    dout = torch.randn(out.shape, dtype=torch.float64, generator=rng)
    # The backward op has no autograd of its own: its inputs carry no gradient.
    q, k, v, proj_weight, proj_bias = (t.detach() for t in x)
    weights = tuple(w.detach() if w is not None else None for w in (weight_q, weight_k))
    backward_args = (q, k, v, out_sparse.detach(), lse, proj_weight, proj_bias, dout, None, None, *plan.tensors,
                     plan.block_q, plan.block_k, 0.35, "hedgehog", "all", "HND", *weights)
    opcheck(torch.ops.slattn.sla_backward.default, backward_args)
    *_, d_feature_q, d_feature_k = torch.ops.slattn.sla_backward(*backward_args)
    assert d_feature_q.shape == (8, 8) and bool(d_feature_q.abs().sum() > 0)
    assert d_feature_k.shape == ((0,) if tied else (8, 8))


def test_hedgehog_backward_op_matches_autograd(make_inputs, rng):
    """By hand, untied, the op's W gradients are what autograd gives through the forward op."""
    x = make_inputs(1, 4, 2, 21, 19, 8, proj_dtype=torch.float64, requires_grad=True)
    weight_q, weight_k = feature_weights(rng, 8, tied=False)
    plan = plan_for(x)
    out, out_sparse, _, lse = torch.ops.slattn.sla_forward(*forward_args(x, plan, feature_map="hedgehog"), weight_q,
                                                           weight_k)
    dout = torch.randn(out.shape, dtype=torch.float64, generator=rng)
    expected = torch.autograd.grad(out, [*x.leaves(), weight_q, weight_k], dout)
    detached = [t.detach() for t in x]
    actual = torch.ops.slattn.sla_backward(*detached[:3], out_sparse.detach(), lse, *detached[3:], dout, None, None,
                                           *plan.tensors, plan.block_q, plan.block_k, 0.35, "hedgehog", "marginal",
                                           "HND", weight_q.detach(), weight_k.detach())
    for a, e in zip(actual, expected, strict=True):
        assert torch.equal(a, e)


def test_compile_fullgraph_matches_eager(make_inputs, rng):
    torch._dynamo.reset()
    x = make_inputs(1, 4, 2, 24, 20, 8, dtype=torch.float32, requires_grad=True)

    def layer(q, k, v, weight, bias):
        out = slattn.sparse_linear_attention(q, k, v, weight, bias, topk=0.4, negligible=0.2, block_q=BLOCK,
                                             block_k=BLOCK, feature_map="elu", linear_scope="all")
        return torch.tanh(out) * 2  # something around the op for the compiler to fuse

    compiled = torch.compile(layer, fullgraph=True)
    upstream = torch.randn(x.q.shape, dtype=torch.float32, generator=rng)
    out_compiled = compiled(*x)
    grads_compiled = torch.autograd.grad(out_compiled, x.leaves(), upstream)
    out_eager = layer(*x)
    grads_eager = torch.autograd.grad(out_eager, x.leaves(), upstream)
    torch.testing.assert_close(out_compiled, out_eager, rtol=1e-6, atol=1e-6)
    for compiled_grad, eager_grad in zip(grads_compiled, grads_eager):
        torch.testing.assert_close(compiled_grad, eager_grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("return_branches", [False, True], ids=["out", "branches"])
def test_eager_autograd_matches_the_ops_registered_autograd(make_inputs, rng, return_branches):
    """The public function's eager autograd (slattn._ops._EagerSla) and the op's registered autograd (what
    torch.compile and direct op calls use) give the same outputs and the same gradients, bit for bit."""
    x = make_inputs(1, 4, 2, 21, 19, 8, proj_dtype=torch.float64, bias=True, requires_grad=True)
    plan = plan_for(x)
    eager = slattn.sparse_linear_attention(*x, plan=plan, scale=0.35, feature_map="elu", linear_scope="all",
                                           return_branches=return_branches)
    out, out_sparse, out_linear, _ = torch.ops.slattn.sla_forward(
        *forward_args(x, plan, feature_map="elu", linear_scope="all", return_linear=return_branches))
    registered = (out_sparse, out_linear) if return_branches else (out,)
    eager = eager[:2] if return_branches else (eager,)
    upstream = [torch.randn(t.shape, dtype=t.dtype, generator=rng) for t in registered]
    for a, e in zip(eager, registered, strict=True):
        assert torch.equal(a, e)
    grads_eager = torch.autograd.grad(eager, x.leaves(), upstream)
    grads_registered = torch.autograd.grad(registered, x.leaves(), upstream)
    for a, e in zip(grads_eager, grads_registered, strict=True):
        assert torch.equal(a, e)
