"""Bad inputs raise ValueError or TypeError naming the argument; a CUDA tensor
raises NotImplementedError in a build without the CUDA kernels."""

from __future__ import annotations

import pytest
import torch

import slattn
from conftest import HAS_CUDA

B, H, LQ, LK, D = 1, 2, 9, 7, 8


def tensor(*shape, dtype=torch.float32):
    return torch.ones(shape, dtype=dtype)


def good():
    g = torch.Generator().manual_seed(0)
    return (torch.randn(B, H, LQ, D, generator=g), torch.randn(B, H, LK, D, generator=g),
            torch.randn(B, H, LK, D, generator=g))


def call(q=None, k=None, v=None, proj_weight=None, proj_bias=None, **options):
    """sparse_linear_attention on good inputs, with what the case changes."""
    gq, gk, gv = good()
    options.setdefault("topk", 0.5)
    options.setdefault("block_q", 4)
    options.setdefault("block_k", 4)
    if options["topk"] is None:
        del options["topk"]
    return slattn.sparse_linear_attention(gq if q is None else q, gk if k is None else k, gv if v is None else v,
                                          proj_weight, proj_bias, **options)


def other_plan():
    q, k, _ = good()
    return slattn.route(q[:, :, :5], k, topk=0.5, block_q=4, block_k=4)


f64 = dict(dtype=torch.float64)

CASES = [  # id, thunk, exception, message pattern (names the argument)
    ("topk-0", lambda: call(topk=0), ValueError, r"topk must be a number in \(0, 1\]"),
    ("topk-negative", lambda: call(topk=-0.1), ValueError, r"topk must be"),
    ("topk-1.5", lambda: call(topk=1.5), ValueError, r"topk must be"),
    ("topk-bool", lambda: call(topk=True), ValueError, r"topk must be"),
    ("topk-plus-negligible", lambda: call(topk=0.7, negligible=0.5), ValueError, r"topk \+ negligible must be <= 1"),
    ("negligible-1", lambda: call(negligible=1.0), ValueError, r"negligible must be"),
    ("negligible-negative", lambda: call(negligible=-0.1), ValueError, r"negligible must be"),
    ("head-dim-q-k", lambda: call(k=tensor(B, H, LK, 16), v=tensor(B, H, LK, 16)), ValueError,
     r"head dims of q \(8\) and k \(16\) differ"),
    ("head-dim-k-v", lambda: call(v=tensor(B, H, LK, 16)), ValueError, r"v must have the shape of k.*head dims"),
    ("v-length", lambda: call(v=tensor(B, H, LK + 1, D)), ValueError, r"v must have the shape of k"),
    ("head-dim-12", lambda: call(*(tensor(B, H, n, 12) for n in (LQ, LK, LK))), ValueError, r"head_dim .* got 12"),
    ("head-dim-264", lambda: call(*(tensor(B, H, n, 264) for n in (LQ, LK, LK))), ValueError, r"head_dim .* got 264"),
    ("dtype-int32", lambda: call(*(tensor(B, H, n, D, dtype=torch.int32) for n in (LQ, LK, LK))), ValueError,
     r"q dtype must be one of .*got int32"),
    ("dtype-complex", lambda: call(*(tensor(B, H, n, D, dtype=torch.complex64) for n in (LQ, LK, LK))), ValueError,
     r"q dtype must be one of .*got complex64"),
    ("dtype-k-int32", lambda: call(k=tensor(B, H, LK, D, dtype=torch.int32)), ValueError, r"k dtype must be"),
    ("dtype-q-k-differ", lambda: call(k=tensor(B, H, LK, D, **f64)), ValueError, r"q and k must have the same dtype"),
    ("dtype-v-differs", lambda: call(v=tensor(B, H, LK, D, **f64)), ValueError, r"v must match q in dtype"),
    ("heads-not-multiple", lambda: call(q=tensor(B, 3, LQ, D)), ValueError,
     r"q heads \(3\) must be a multiple of k/v heads \(2\)"),
    ("batch-differs", lambda: call(q=tensor(2, H, LQ, D)), ValueError, r"batch sizes of q \(2\) and k \(1\)"),
    ("empty-q", lambda: call(q=tensor(B, H, 0, D)), ValueError, r"at least one token, got q length 0"),
    ("empty-k", lambda: call(k=tensor(B, H, 0, D), v=tensor(B, H, 0, D)), ValueError, r"k length 0"),
    ("no-heads", lambda: call(q=tensor(B, 0, LQ, D)), ValueError, r"at least one batch and one head"),
    ("q-3d", lambda: call(q=tensor(H, LQ, D)), ValueError, r"q must be 4-D .* got 3-D"),
    ("k-3d", lambda: call(k=tensor(H, LK, D)), ValueError, r"k must be 4-D"),
    ("v-3d", lambda: call(v=tensor(H, LK, D)), ValueError, r"v must be 4-D"),
    ("q-not-tensor", lambda: call(q=[[1.0]]), TypeError, r"q must be a torch.Tensor"),
    ("feature-map", lambda: call(feature_map="gelu"), ValueError, r"feature_map must be one of .*'gelu'"),
    ("hedgehog-without-weight", lambda: call(feature_map="hedgehog"), ValueError,
     r"feature_map 'hedgehog' needs feature_weight_q"),
    ("hedgehog-weight-shape", lambda: call(feature_map="hedgehog", feature_weight_q=torch.eye(D + 1)), ValueError,
     r"feature_weight_q must have shape \(8, 8\), got \(9, 9\)"),
    ("hedgehog-weight-bf16", lambda: call(feature_map="hedgehog", feature_weight_q=torch.eye(D, dtype=torch.bfloat16)),
     ValueError, r"feature_weight_q must be float32"),
    ("hedgehog-weight-k-not-tensor", lambda: call(feature_map="hedgehog", feature_weight_q=torch.eye(D),
                                                  feature_weight_k=[[1.0]]), TypeError,
     r"feature_weight_k must be a torch.Tensor"),
    ("hedgehog-weight-dtypes-differ", lambda: call(*(tensor(B, H, n, D, **f64) for n in (LQ, LK, LK)),
                                                   feature_map="hedgehog", feature_weight_q=torch.eye(D),
                                                   feature_weight_k=torch.eye(D, **f64)), ValueError,
     r"feature_weight_k must have the dtype of feature_weight_q"),
    ("weight-for-fixed-map", lambda: call(feature_map="elu", feature_weight_k=torch.eye(D)), ValueError,
     r"feature_weight_k is given, but feature_map 'elu' has no weights"),
    ("linear-scope", lambda: call(linear_scope="critical"), ValueError, r"linear_scope must be one of"),
    ("layout", lambda: call(layout="BHLD"), ValueError, r"layout must be one of .*'BHLD'"),
    ("plan-and-topk", lambda: call(plan=slattn.route(*good()[:2], topk=0.5, block_q=4, block_k=4)), ValueError,
     r"either topk/negligible or a plan"),
    ("plan-and-negligible", lambda: call(topk=None, negligible=0.1, plan=slattn.route(*good()[:2], topk=0.5,
                                                                                    block_q=4, block_k=4)),
     ValueError, r"either topk/negligible or a plan"),
    ("plan-and-other-block", lambda: call(topk=None, block_q=8, plan=slattn.route(*good()[:2], topk=0.5, block_q=4,
                                                                                block_k=4)),
     ValueError, r"block_q=8 disagrees with the plan's blocks of 4"),
    ("neither-plan-nor-topk", lambda: call(topk=None), ValueError, r"give topk .* or a plan"),
    ("plan-other-shapes", lambda: call(topk=None, plan=other_plan()), ValueError, r"plan was made for q_len=5"),
    ("plan-other-heads", lambda: call(topk=None, plan=slattn.route(*(t[:, :1] for t in good()[:2]), topk=0.5,
                                                                   block_q=4, block_k=4)),
     ValueError, r"plan was made for .*block_map \(1, 1, 3, 2\); .* need .*block_map \(1, 2, 3, 2\)"),
    ("plan-wrong-type", lambda: call(topk=None, plan=(1, 2)), TypeError, r"plan must be a slattn.RoutingPlan"),
    ("plan-on-meta", lambda: call(topk=None, plan=slattn.route(*good()[:2], topk=0.5, block_q=4, block_k=4).to("meta")),
     ValueError, r"plan is on meta"),
    ("proj-weight-shape", lambda: call(proj_weight=tensor(D, 2 * D)), ValueError,
     r"proj_weight must have shape \(8, 8\), got \(8, 16\)"),
    ("proj-weight-bf16", lambda: call(proj_weight=tensor(D, D, dtype=torch.bfloat16)), ValueError,
     r"proj_weight must be float32"),
    ("proj-weight-f64-with-f32", lambda: call(proj_weight=tensor(D, D, **f64)), ValueError,
     r"proj_weight must be float32"),
    ("proj-weight-not-tensor", lambda: call(proj_weight=[[0.0] * D] * D), TypeError,
     r"proj_weight must be a torch.Tensor"),
    ("proj-bias-shape", lambda: call(proj_weight=tensor(D, D), proj_bias=tensor(D + 1)), ValueError,
     r"proj_bias must have shape \(8,\)"),
    ("proj-bias-f16", lambda: call(proj_weight=tensor(D, D), proj_bias=tensor(D, dtype=torch.float16)), ValueError,
     r"proj_bias must be float32"),
    ("proj-bias-without-weight", lambda: call(proj_bias=tensor(D)), ValueError, r"proj_bias needs proj_weight"),
    ("proj-bias-dtype-not-weight", lambda: call(*(tensor(B, H, n, D, **f64) for n in (LQ, LK, LK)),
                                                proj_weight=tensor(D, D, **f64), proj_bias=tensor(D)), ValueError,
     r"proj_bias must have the dtype of proj_weight"),
    ("scale-0", lambda: call(scale=0.0), ValueError, r"scale must be a finite non-zero number"),
    ("scale-inf", lambda: call(scale=float("inf")), ValueError, r"scale must be"),
    ("scale-nan", lambda: call(scale=float("nan")), ValueError, r"scale must be"),
    ("scale-string", lambda: call(scale="0.1"), ValueError, r"scale must be"),
    ("block-q-0", lambda: call(block_q=0), ValueError, r"block_q must be an integer in \[1, 1024\]"),
    ("block-k-2000", lambda: call(block_k=2000), ValueError, r"block_k must be an integer in \[1, 1024\]"),
    ("block-q-float", lambda: call(block_q=4.0), ValueError, r"block_q must be an integer"),
    ("route-topk", lambda: slattn.route(*good()[:2], topk=1.5), ValueError, r"topk must be"),
    ("route-block-k", lambda: slattn.route(*good()[:2], topk=0.5, block_k=0), ValueError, r"block_k must be"),
    ("route-layout", lambda: slattn.route(*good()[:2], topk=0.5, layout="nhd"), ValueError, r"layout must be"),
    ("route-head-dim", lambda: slattn.route(tensor(B, H, LQ, 12), tensor(B, H, LK, 12), topk=0.5), ValueError,
     r"head_dim"),
]


@pytest.mark.parametrize("thunk,error,pattern", [pytest.param(*case[1:], id=case[0]) for case in CASES])
def test_bad_argument_is_named(thunk, error, pattern):
    with pytest.raises(error, match=pattern):
        thunk()


def op_forward(q, k, v, plan, block_q=4, block_k=4, scale=0.3, feature_map="softmax", linear_scope="marginal",
               feature_weight_q=None):
    return torch.ops.slattn.sla_forward(q, k, v, None, None, *plan.tensors, block_q, block_k, scale, feature_map,
                                        linear_scope, "HND", False, feature_weight_q)


@pytest.mark.parametrize("change,pattern", [
    pytest.param(dict(scale=0.0), r"scale must be finite and non-zero", id="scale"),
    pytest.param(dict(feature_map="gelu"), r"feature_map must be one of", id="feature-map"),
    pytest.param(dict(linear_scope="x"), r"linear_scope must be one of", id="linear-scope"),
    pytest.param(dict(feature_map="hedgehog"), r"feature_weight_q is required", id="hedgehog-without-weight"),
    pytest.param(dict(feature_weight_q=torch.eye(D)), r"feature_map 'softmax' has no weights", id="weight-for-softmax"),
    pytest.param(dict(block_q=8), r"plan tensor block_map must be .* blocks 8x4", id="plan-for-other-blocks"),
    pytest.param(dict(block_q=2), r"plan tensor block_map must be .* blocks 2x4", id="plan-too-small"),
])
def test_op_level_checks(change, pattern):
    """The ops check too, for callers that skip the Python front end."""
    q, k, v = good()
    plan = slattn.route(q, k, topk=0.5, block_q=4, block_k=4)
    with pytest.raises(ValueError, match=pattern):
        op_forward(q, k, v, plan, **change)


def test_op_rejects_plan_tensors_of_wrong_dtype():
    q, k, v = good()
    plan = slattn.route(q, k, topk=0.5, block_q=4, block_k=4)
    wrong = slattn.RoutingPlan(plan.block_map.long(), *plan.tensors[1:], 4, 4, LQ, LK)
    with pytest.raises(ValueError, match=r"plan tensor block_map must be torch.int8"):
        slattn.sparse_linear_attention(q, k, v, plan=wrong)


@pytest.mark.parametrize("kwargs,pattern", [
    pytest.param(dict(head_dim=12), r"head_dim", id="head-dim"),
    pytest.param(dict(head_dim=64.0), r"head_dim must be an integer", id="head-dim-float"),
    pytest.param(dict(topk=0.0), r"topk must be", id="topk"),
    pytest.param(dict(feature_map="gelu"), r"feature_map must be one of", id="feature-map"),
    pytest.param(dict(BLKQ=0), r"BLKQ must be", id="BLKQ"),
    pytest.param(dict(BLKK=4096), r"BLKK must be", id="BLKK"),
    pytest.param(dict(linear_scope="x"), r"linear_scope must be one of", id="linear-scope"),
    pytest.param(dict(layout="x"), r"layout must be one of", id="layout"),
    pytest.param(dict(scale=0.0), r"scale must be", id="scale"),
])
def test_module_constructor_checks(kwargs, pattern):
    arguments = dict(head_dim=64, topk=0.2) | kwargs
    with pytest.raises(ValueError, match=pattern):
        slattn.SparseLinearAttention(**arguments)


def test_module_forward_checks():
    module = slattn.SparseLinearAttention(D, 0.5, BLKQ=4, BLKK=4)
    q, k, v = good()
    with pytest.raises(ValueError, match=r"v must have the shape of k"):
        module(q, k, v[:, :, :3])
    with pytest.raises(ValueError, match=r"q has head dim 16, but this layer was built with head_dim=8"):
        module(*(tensor(B, H, LQ, 16) for _ in range(3)))


@pytest.mark.gpu
@pytest.mark.skipif(slattn._C.built_with_cuda(), reason="this build has CUDA kernels (test_cuda.py tests them)")
def test_cuda_tensor_without_cuda_build_is_not_implemented():
    q, k, v = (t.cuda() for t in good())
    with pytest.raises(NotImplementedError, match=r"CUDA.*CPU"):
        slattn.sparse_linear_attention(q, k, v, topk=0.5)
    with pytest.raises(NotImplementedError, match=r"CUDA"):
        slattn.route(q, k, topk=0.5)


def test_gpu_marker_skips_without_cuda(request):
    """The helper in conftest.py: the gpu test above is skipped, with its reason, only without CUDA."""
    item = next(i for i in request.session.items if i.name == "test_cuda_tensor_without_cuda_build_is_not_implemented")
    skips = [m for m in item.iter_markers("skip")]
    assert bool(skips) != HAS_CUDA
    assert all("CUDA" in m.kwargs["reason"] for m in skips)
