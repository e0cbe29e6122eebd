"""The learnable hedgehog feature map (SPEC section 3): φ(x) = softmax([x Wᵀ, −x Wᵀ]).

The op against the float64 composite of reference.py with tied and untied W,
an identity W giving softmax([x, −x]), gradients through W, and the W the
modules own (parameters, state dicts, SLA2's hard and soft paths)."""

from __future__ import annotations

import collections

import pytest
import torch

import reference as ref
import slattn
from slattn.feature_maps import HedgehogFeatureMap
from slattn.router import classify
from slattn.soft_attention import soft_branches

DIM = 16
SCOPES = ("marginal", "all")
TIES = [pytest.param(True, id="tied"), pytest.param(False, id="untied")]


def feature_weights(rng, tied, dim=DIM, dtype=torch.float64, requires_grad=False):
    """(W_q, W_k): the identity moved by noise, so a transposed or swapped W shows; W_k None when tied."""
    def draw():
        w = torch.eye(dim, dtype=torch.float64) + 0.3 * torch.randn(dim, dim, dtype=torch.float64, generator=rng)
        return w.to(dtype).requires_grad_(requires_grad)
    return draw(), None if tied else draw()


def hedgehog(x, w_q, w_k, **options):
    """slattn's SLA with hedgehog on an Inputs tuple."""
    return slattn.sparse_linear_attention(*x, feature_map="hedgehog", feature_weight_q=w_q, feature_weight_k=w_k,
                                          **options)


def composite(x, w_q, w_k, **options):
    return ref.sla(*x, feature_map="hedgehog", feature_weight_q=w_q, feature_weight_k=w_k, **options)


# ---------------------------------------------------------------- the op

@pytest.mark.parametrize("linear_scope", SCOPES)
@pytest.mark.parametrize("tied", TIES)
def test_float64_matches_composite(make_inputs, rng, tied, linear_scope):
    x = make_inputs(2, 4, 2, 45, 37, DIM, proj_dtype=torch.float64)  # GQA, ragged last blocks
    w_q, w_k = feature_weights(rng, tied)
    options = dict(topk=0.3, negligible=0.2, block_q=8, block_k=4, linear_scope=linear_scope)
    _, ol, _ = hedgehog(x, w_q, w_k, return_branches=True, **options)
    out = hedgehog(x, w_q, w_k, **options)
    expected = composite(x, w_q, w_k, **options)
    torch.testing.assert_close(out, expected.out, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ol, expected.linear, rtol=1e-10, atol=1e-10)
    assert float(ol.abs().max()) > 0.1  # the linear branch is really exercised


def test_untied_weights_are_not_interchangeable(make_inputs, rng):
    """W_q applies to q and W_k to k: swapping them changes Ol."""
    x = make_inputs(1, 2, 2, 30, 30, DIM, proj_dtype=None)
    w_q, w_k = feature_weights(rng, tied=False)
    options = dict(topk=0.3, block_q=8, block_k=8, return_branches=True)
    _, ol, _ = hedgehog(x, w_q, w_k, **options)
    _, swapped, _ = hedgehog(x, w_k, w_q, **options)
    assert ref.max_error(ol, swapped) > 1e-3


@pytest.mark.parametrize("linear_scope", SCOPES)
@pytest.mark.parametrize("tied", TIES)
def test_float64_gradients_match_composite(make_inputs, rng, tied, linear_scope):
    x = make_inputs(1, 4, 2, 29, 27, DIM, proj_dtype=torch.float64, requires_grad=True)
    w_q, w_k = feature_weights(rng, tied, requires_grad=True)
    options = dict(topk=0.3, negligible=0.2, block_q=8, block_k=4, linear_scope=linear_scope)
    leaves = [*x.leaves(), *(w for w in (w_q, w_k) if w is not None)]
    upstream = torch.randn(x.q.shape, dtype=torch.float64, generator=rng)
    actual = torch.autograd.grad(hedgehog(x, w_q, w_k, **options), leaves, upstream)
    expected = torch.autograd.grad(composite(x, w_q, w_k, **options).out, leaves, upstream)
    names = ("dq", "dk", "dv", "d_proj_weight", "d_proj_bias", "d_feature_weight_q", "d_feature_weight_k")
    for name, a, e in zip(names, actual, expected, strict=False):
        torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-9, msg=name)
    assert float(actual[5].abs().max()) > 1e-3  # W_q's gradient is not trivially zero


def test_tied_gradient_is_the_sum_of_both_uses(make_inputs, rng):
    x = make_inputs(1, 2, 1, 25, 21, DIM, proj_dtype=torch.float64)
    w, _ = feature_weights(rng, tied=True, requires_grad=True)
    w_k = w.detach().clone().requires_grad_()
    options = dict(topk=0.3, block_q=8, block_k=4)
    upstream = torch.randn(x.q.shape, dtype=torch.float64, generator=rng)
    (tied_grad,) = torch.autograd.grad(hedgehog(x, w, None, **options), [w], upstream)
    grad_q, grad_k = torch.autograd.grad(hedgehog(x, w, w_k, **options), [w, w_k], upstream)
    torch.testing.assert_close(tied_grad, grad_q + grad_k, rtol=1e-12, atol=1e-12)
    assert ref.max_error(grad_q, grad_k) > 1e-3  # the two uses differ, so the sum is a real test


def test_same_tensor_twice_is_tied(make_inputs, rng):
    x = make_inputs(1, 2, 1, 25, 21, DIM, proj_dtype=torch.float64)
    w, _ = feature_weights(rng, tied=True, requires_grad=True)
    options = dict(topk=0.3, block_q=8, block_k=4)
    upstream = torch.randn(x.q.shape, dtype=torch.float64, generator=rng)
    out_none = hedgehog(x, w, None, **options)
    out_twice = hedgehog(x, w, w, **options)
    assert torch.equal(out_none, out_twice)
    (grad_none,) = torch.autograd.grad(out_none, [w], upstream)
    (grad_twice,) = torch.autograd.grad(out_twice, [w], upstream)
    torch.testing.assert_close(grad_twice, grad_none, rtol=1e-12, atol=1e-12)


def test_separate_tensors_sharing_memory_stay_untied(make_inputs, rng):
    """Two arguments are two weights with two gradients, even over one storage."""
    x = make_inputs(1, 2, 1, 25, 21, DIM, proj_dtype=torch.float64)
    w, _ = feature_weights(rng, tied=True)
    w_q, w_k = w.view(DIM, DIM).requires_grad_(), w.view(DIM, DIM).requires_grad_()
    assert w_q.data_ptr() == w_k.data_ptr()
    options = dict(topk=0.3, block_q=8, block_k=4)
    upstream = torch.randn(x.q.shape, dtype=torch.float64, generator=rng)
    grad_q, grad_k = torch.autograd.grad(hedgehog(x, w_q, w_k, **options), [w_q, w_k], upstream)
    expected_q, expected_k = torch.autograd.grad(composite(x, w_q, w_k, **options).out, [w_q, w_k], upstream)
    torch.testing.assert_close(grad_q, expected_q, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(grad_k, expected_k, rtol=1e-9, atol=1e-9)


def test_identity_weight_is_softmax_of_x_and_minus_x(make_inputs):
    """W = I gives φ(x) = softmax([x, −x]): the linear branch equals the softmax map's on [q, −q] and [k, −k]."""
    x = make_inputs(1, 2, 2, 33, 30, DIM, proj_dtype=None)
    plan = slattn.route(x.q, x.k, topk=0.3, negligible=0.2, block_q=8, block_k=8)
    _, ol, _ = hedgehog(x, torch.eye(DIM, dtype=torch.float64), None, plan=plan, return_branches=True)
    doubled_q, doubled_k = (torch.cat([t, -t], dim=-1) for t in (x.q, x.k))
    expected = ref.sla(doubled_q, doubled_k, x.v, block_map=plan.block_map, block_q=8, block_k=8,
                       feature_map="softmax").linear
    torch.testing.assert_close(ol, expected, rtol=1e-10, atol=1e-10)
    rows = torch.randn(5, DIM, dtype=torch.float32)
    torch.testing.assert_close(HedgehogFeatureMap(DIM)(rows), torch.softmax(torch.cat([rows, -rows], -1), -1))


@pytest.mark.parametrize("tied", TIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["f32", "bf16", "f16"])
def test_low_precision_within_flash_rule(make_inputs, rng, dtype, tied):
    """fp32 master weights with low-precision inputs, against the composite in float64 and in the input dtype."""
    x = make_inputs(1, 4, 2, 64, 48, DIM, dtype=dtype, proj_dtype=torch.float32)
    w_q, w_k = feature_weights(rng, tied, dtype=torch.float32)
    options = dict(topk=0.3, negligible=0.2, block_q=16, block_k=16, linear_scope="all")
    _, ol, _ = hedgehog(x, w_q, w_k, return_branches=True, **options)
    wide = tuple(t.double() if t is not None else None for t in (*x, w_q, w_k))
    exact = composite(wide[:5], *wide[5:], **options)
    baseline = composite(x, w_q, w_k, block_map=exact.block_map, **{**options, "topk": None})
    ref.assert_within_baseline(ol, exact.linear, baseline.linear, name="Ol")
    ref.assert_within_baseline(hedgehog(x, w_q, w_k, **options), exact.out, baseline.out, name="out")


# ---------------------------------------------------------------- SparseLinearAttention

def make_module(tied, **options):
    return slattn.SparseLinearAttention(DIM, 0.3, "hedgehog", 16, 16, tie_feature_map_qk=tied, **options)


def randomize(module, rng):
    """Moves every weight off its initial value."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=rng))


def test_module_owns_identity_initialised_weights():
    tied, untied = make_module(True), make_module(False)
    assert tied.feature_map_k is tied.feature_map_q
    assert untied.feature_map_k is not untied.feature_map_q
    for module in (tied, untied):
        for fm in (module.feature_map_q, module.feature_map_k):
            assert fm.weight.dtype == torch.float32 and torch.equal(fm.weight, torch.eye(DIM))
    assert set(tied.state_dict()) == {"proj_l.weight", "proj_l.bias", "feature_map_q.layer.weight"}
    assert set(untied.state_dict()) == {"proj_l.weight", "proj_l.bias", "feature_map_q.layer.weight",
                                        "feature_map_k.layer.weight"}
    assert [n for n, _ in tied.named_parameters()] == ["proj_l.weight", "proj_l.bias", "feature_map_q.layer.weight"]
    softmax = slattn.SparseLinearAttention(DIM, 0.3, "softmax")
    assert softmax.feature_map_q is None and softmax.feature_map_k is None
    assert set(softmax.state_dict()) == {"proj_l.weight", "proj_l.bias"}


@pytest.mark.parametrize("tied", TIES)
def test_module_state_dict_round_trip(make_inputs, rng, tied):
    x = make_inputs(1, 4, 2, 70, 54, DIM, dtype=torch.float32, proj_dtype=None)
    source = make_module(tied)
    randomize(source, rng)
    state = collections.OrderedDict((k, v.clone()) for k, v in source.state_dict().items())
    fresh = make_module(tied)
    before = fresh(x.q, x.k, x.v)
    fresh.load_state_dict(state, strict=True)
    out = fresh(x.q, x.k, x.v)
    assert torch.equal(out, source(x.q, x.k, x.v))
    assert ref.max_error(out, before) > 1e-3  # the loaded weights matter
    for name, tensor in fresh.state_dict().items():
        assert torch.equal(tensor, state[name]), name


def test_tied_and_untied_checkpoints_do_not_mix():
    untied_state = make_module(False).state_dict()
    with pytest.raises(RuntimeError, match="feature_map_k.layer.weight"):
        make_module(True).load_state_dict(untied_state, strict=True)
    with pytest.raises(RuntimeError, match="feature_map_k.layer.weight"):
        make_module(False).load_state_dict(make_module(True).state_dict(), strict=True)


@pytest.mark.parametrize("tied", TIES)
def test_module_matches_the_op_with_bf16_casts_and_trains_w(make_inputs, rng, tied):
    x = make_inputs(1, 4, 2, 70, 54, DIM, dtype=torch.float32, proj_dtype=None, requires_grad=True)
    module = make_module(tied, linear_scope="all")
    randomize(module, rng)
    out = module(x.q, x.k, x.v)
    w_q, w_k = module.feature_map_q.weight, None if tied else module.feature_map_k.weight
    low = [t.detach().to(torch.bfloat16) for t in (x.q, x.k, x.v)]
    direct = slattn.sparse_linear_attention(*low, module.proj_l.weight, module.proj_l.bias, topk=0.3, block_q=16,
                                            block_k=16, feature_map="hedgehog", feature_weight_q=w_q,
                                            feature_weight_k=w_k, linear_scope="all")
    assert torch.equal(out, direct.float())
    out.square().sum().backward()
    for fm in {id(m): m for m in (module.feature_map_q, module.feature_map_k)}.values():
        assert fm.weight.grad is not None and float(fm.weight.grad.abs().sum()) > 0


# ---------------------------------------------------------------- SparseLinearAttention2

BLOCKS = dict(block_q=8, block_k=8)


def make_layer2(rng, tied, dtype=torch.float64):
    layer = slattn.SparseLinearAttention2(DIM, 0.3, feature_map="hedgehog", tie_feature_map_qk=tied, num_heads=4,
                                          **BLOCKS)
    randomize(layer, rng)
    return layer.to(dtype)


@pytest.mark.parametrize("tied", TIES)
def test_sla2_hard_path_matches_composite(make_inputs, rng, tied):
    x = make_inputs(2, 4, 2, 45, 37, DIM, proj_dtype=None)
    layer = make_layer2(rng, tied)
    assert ("feature_map_k.layer.weight" in layer.state_dict()) != tied
    out = layer(x.q, x.k, x.v)
    w_q = layer.feature_map_q.weight.detach()
    w_k = layer.feature_map_k.weight.detach()
    block_map = classify(layer.router.block_scores(x.q, x.k, **BLOCKS), layer.topk)
    sparse = ref.sla(x.q, x.k, x.v, block_map=block_map, **BLOCKS).sparse
    linear = composite((x.q, x.k - x.k.mean(dim=2, keepdim=True), x.v), w_q, w_k, block_map=block_map,
                       **BLOCKS).linear  # W_k on K~ (smooth_k_features)
    alpha = torch.sigmoid(layer.alpha_logit.detach())[None, :, None, None]
    torch.testing.assert_close(out, alpha * sparse + (1 - alpha) * linear, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("tied", TIES)
def test_soft_path_at_hard_mask_matches_kernels(make_inputs, rng, tied):
    x = make_inputs(2, 4, 2, 45, 37, DIM, proj_dtype=None)
    w_q, w_k = feature_weights(rng, tied)
    plan = slattn.route(x.q, x.k, topk=0.3, **BLOCKS)
    mask_logits = torch.where(plan.block_map == 1, torch.inf, -torch.inf).double()
    _, ol = soft_branches(x.q, x.k, x.v, mask_logits, scale=DIM ** -0.5, feature_map_name="hedgehog",
                          feature_weight_q=w_q, feature_weight_k=w_k, **BLOCKS)
    _, kernel_ol, _ = hedgehog(x, w_q, w_k, plan=plan, return_branches=True)
    torch.testing.assert_close(ol, kernel_ol, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("routing", ["hard", "soft"])
def test_sla2_trains_w_in_both_routings(make_inputs, rng, routing):
    x = make_inputs(1, 4, 2, 45, 37, DIM, dtype=torch.float32, proj_dtype=None)
    layer = make_layer2(rng, tied=False, dtype=torch.float32)
    layer.set_routing(routing)
    layer(x.q, x.k, x.v).square().sum().backward()
    for fm in (layer.feature_map_q, layer.feature_map_k):
        assert fm.weight.grad is not None and float(fm.weight.grad.abs().sum()) > 0
