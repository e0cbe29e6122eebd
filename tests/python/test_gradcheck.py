"""torch.autograd.gradcheck of the SLA op in float64 (SPEC section 5) on small
shapes: GQA (2 query heads on 1 key/value head), ragged last blocks (21 and 19
tokens in blocks of 4) and negligible blocks unless said otherwise.

The routing is fixed by a plan made once: it is piecewise constant in q and k
(no gradient), so finite differences must not move it."""

from __future__ import annotations

import pytest
import torch
from torch.autograd import gradcheck

import slattn

FEATURE_MAPS = ("softmax", "elu", "relu")  # hedgehog, with its weights, below
SCOPES = ("marginal", "all")
BLOCKS = dict(block_q=4, block_k=4)


def leaves(x) -> tuple[torch.Tensor, ...]:
    return tuple(t for t in x if t is not None)


@pytest.mark.parametrize("linear_scope", SCOPES)
@pytest.mark.parametrize("feature_map", FEATURE_MAPS)
def test_gradcheck_all_inputs(make_inputs, feature_map, linear_scope):
    x = make_inputs(1, 2, 1, 21, 19, 8, proj_dtype=torch.float64, requires_grad=True)
    plan = slattn.route(x.q, x.k, topk=0.3, negligible=0.25, **BLOCKS)
    assert bool((plan.block_map == -1).any()) and bool((plan.block_map == 0).any())

    def sla(q, k, v, weight, bias):
        return slattn.sparse_linear_attention(q, k, v, weight, bias, plan=plan, feature_map=feature_map,
                                              linear_scope=linear_scope)

    assert gradcheck(sla, leaves(x))


@pytest.mark.parametrize("feature_map", FEATURE_MAPS)
def test_gradcheck_without_projection(make_inputs, feature_map):
    x = make_inputs(1, 2, 1, 21, 19, 8, proj_dtype=None, requires_grad=True)
    plan = slattn.route(x.q, x.k, topk=0.4, **BLOCKS)

    def sla(q, k, v):
        return slattn.sparse_linear_attention(q, k, v, plan=plan, feature_map=feature_map)

    assert gradcheck(sla, leaves(x))


def test_gradcheck_weight_without_bias(make_inputs):
    x = make_inputs(1, 2, 2, 13, 15, 8, proj_dtype=torch.float64, bias=False, requires_grad=True)
    plan = slattn.route(x.q, x.k, topk=0.25, negligible=0.0, **BLOCKS)

    def sla(q, k, v, weight):
        return slattn.sparse_linear_attention(q, k, v, weight, plan=plan, feature_map="elu")

    assert gradcheck(sla, leaves(x))


def test_gradcheck_routing_inside(make_inputs):
    """With topk the op routes on every call; away from score ties the routing
    does not move under the finite-difference steps."""
    x = make_inputs(1, 2, 1, 21, 19, 8, proj_dtype=torch.float64, requires_grad=True)

    def sla(q, k, v, weight, bias):
        return slattn.sparse_linear_attention(q, k, v, weight, bias, topk=0.3, negligible=0.2, **BLOCKS,
                                              linear_scope="all")

    assert gradcheck(sla, leaves(x))


@pytest.mark.parametrize("with_proj", [True, False], ids=["proj", "no-proj"])
@pytest.mark.parametrize("linear_scope", SCOPES)
def test_gradcheck_through_branches(make_inputs, linear_scope, with_proj):
    """Gradients through the returned Os and Ol (and not through out)."""
    x = make_inputs(1, 2, 1, 21, 19, 8, proj_dtype=torch.float64 if with_proj else None, requires_grad=True)
    plan = slattn.route(x.q, x.k, topk=0.3, negligible=0.25, **BLOCKS)
    projection = leaves(x)[3:]

    def branches(q, k, v):
        os, ol, _ = slattn.sparse_linear_attention(q, k, v, *projection, plan=plan, feature_map="softmax",
                                                   linear_scope=linear_scope, return_branches=True)
        return os, ol

    assert gradcheck(branches, leaves(x)[:3])


def test_gradcheck_custom_block_map(make_inputs, rng):
    """Rows with no critical block (LSE = -inf) and rows with an empty linear set."""
    x = make_inputs(1, 2, 1, 21, 19, 8, proj_dtype=torch.float64, requires_grad=True)
    block_map = torch.randint(-1, 2, (1, 2, 6, 5), generator=rng).to(torch.int8)
    block_map[0, 0, 0] = torch.tensor([0, -1, 0, 0, 0])
    block_map[0, 1, 1] = -1
    block_map[0, 1, 2] = 1
    plan = slattn.plan_from_block_map(block_map, 4, 4, q_len=21, k_len=19)

    def sla(q, k, v, weight, bias):
        return slattn.sparse_linear_attention(q, k, v, weight, bias, plan=plan, feature_map="relu")

    assert gradcheck(sla, leaves(x))


def test_gradcheck_nhd_layout(make_inputs):
    x = make_inputs(1, 2, 1, 21, 19, 8, layout="NHD", proj_dtype=torch.float64, requires_grad=True)
    plan = slattn.route(x.q, x.k, topk=0.3, negligible=0.25, layout="NHD", **BLOCKS)

    def sla(q, k, v, weight, bias):
        return slattn.sparse_linear_attention(q, k, v, weight, bias, plan=plan, layout="NHD", feature_map="elu",
                                              scale=0.6)

    assert gradcheck(sla, leaves(x))


def hedgehog_weights(rng, dim, tied):
    """W_q and W_k (None when tied) near the identity, in float64, requiring grad."""
    def draw():
        w = torch.eye(dim, dtype=torch.float64) + 0.3 * torch.randn(dim, dim, dtype=torch.float64, generator=rng)
        return w.requires_grad_()
    return draw(), None if tied else draw()


@pytest.mark.parametrize("linear_scope", SCOPES)
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_gradcheck_hedgehog(make_inputs, rng, tied, linear_scope):
    """Through q, k, v, the projection and hedgehog's W_q and W_k (one W when tied)."""
    x = make_inputs(1, 2, 1, 21, 19, 8, proj_dtype=torch.float64, requires_grad=True)
    weight_q, weight_k = hedgehog_weights(rng, 8, tied)
    plan = slattn.route(x.q, x.k, topk=0.3, negligible=0.25, **BLOCKS)

    def sla(q, k, v, weight, bias, w_q, w_k=None):
        return slattn.sparse_linear_attention(q, k, v, weight, bias, plan=plan, feature_map="hedgehog",
                                              feature_weight_q=w_q, feature_weight_k=w_k, linear_scope=linear_scope)

    assert gradcheck(sla, leaves(x) + leaves((weight_q, weight_k)))


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_gradcheck_hedgehog_branches(make_inputs, rng, tied):
    """Through the returned Ol alone (SLA2's use: no projection)."""
    x = make_inputs(1, 2, 2, 13, 15, 8, proj_dtype=None, requires_grad=True)
    weight_q, weight_k = hedgehog_weights(rng, 8, tied)
    plan = slattn.route(x.q, x.k, topk=0.25, **BLOCKS)

    def linear(q, k, v, w_q, w_k=None):
        return slattn.sparse_linear_attention(q, k, v, plan=plan, feature_map="hedgehog", feature_weight_q=w_q,
                                              feature_weight_k=w_k, return_branches=True)[1]

    assert gradcheck(linear, leaves(x) + leaves((weight_q, weight_k)))
