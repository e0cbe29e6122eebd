"""slattn.SparseLinearAttention2 (SPEC sections 1, 3, 4, 5): the hard path
against the composite of reference.py given the same block map, the soft path
at a hard mask against SLA's kernels, gradients, α, and argument errors."""

from __future__ import annotations

import pytest
import torch
from torch.autograd import gradcheck
from torch.func import functional_call

import reference as ref
import slattn
from slattn.router import classify
from slattn.soft_attention import soft_branches

DIM = 16
BLOCKS = dict(block_q=8, block_k=8)


def make_layer(rng, topk=0.3, heads=4, q_len=45, alpha="head", dtype=torch.float32, **options):
    """A layer with a random (trained-looking) router and α, so neither is at its identity/initial value."""
    layer = slattn.SparseLinearAttention2(DIM, topk, alpha=alpha, num_heads=heads, q_len=q_len, **BLOCKS, **options)
    with torch.no_grad():
        for proj in (layer.router.proj_q, layer.router.proj_k):
            proj.weight.add_(0.5 * torch.randn(proj.weight.shape, generator=rng))
        layer.alpha_logit.copy_(torch.randn(layer.alpha_logit.shape, generator=rng))
    return layer.to(dtype)


def expected_output(layer, q, k, v, feature_map="softmax"):
    """α·Os + (1-α)·Ol from the composite (HND inputs), with the block map of the layer's router;
    Os with K as given (smoothing leaves softmax unchanged), Ol with φ(K~)."""
    scores = layer.router.block_scores(q.detach(), k.detach(), **BLOCKS)
    block_map = classify(scores, layer.topk)
    sparse = ref.sla(q, k, v, block_map=block_map, feature_map=feature_map, **BLOCKS).sparse
    linear = ref.sla(q, k - k.mean(dim=2, keepdim=True), v, block_map=block_map, feature_map=feature_map,
                     **BLOCKS).linear
    alpha = torch.sigmoid(layer.alpha_logit.detach().to(q.dtype))
    if alpha.dim() == 1:
        alpha = alpha[None, :, None, None]
    else:  # per query block of 8 rows
        alpha = alpha.repeat_interleave(8, dim=1)[None, :, :q.shape[2], None]
    return alpha * sparse + (1 - alpha) * linear


@pytest.mark.parametrize("alpha", ["head", "block"])
@pytest.mark.parametrize("feature_map", ["softmax", "elu", "relu"])
def test_hard_path_matches_composite_float64(make_inputs, rng, alpha, feature_map):
    x = make_inputs(2, 4, 2, 45, 37, DIM, proj_dtype=None)
    layer = make_layer(rng, alpha=alpha, feature_map=feature_map, dtype=torch.float64)
    out = layer(x.q, x.k, x.v)
    torch.testing.assert_close(out, expected_output(layer, x.q, x.k, x.v, feature_map), rtol=1e-10, atol=1e-10)


def test_qat_runs_the_low_bit_sparse_branch(make_inputs, rng):
    """qat=True: α·Os + (1-α)·Ol with Os from the low-bit sparse branch (SPEC section 6) on K~, and
    straight-through gradients to q, k, v and α; switching it off restores the bf16/fp32 branch."""
    x = make_inputs(1, 4, 2, 45, 37, DIM, proj_dtype=None, requires_grad=True)
    layer = make_layer(rng, dtype=torch.float64, qat=True)
    assert "qat=True" in repr(layer)
    out = layer(x.q, x.k, x.v)
    q, k, v = (t.detach() for t in (x.q, x.k, x.v))
    smoothed = k - k.mean(dim=2, keepdim=True)
    block_map = classify(layer.router.block_scores(q, k, **BLOCKS), layer.topk)
    sparse = ref.sla(q, smoothed, v, block_map=block_map, quantized=True, **BLOCKS).sparse
    linear = ref.sla(q, smoothed, v, block_map=block_map, **BLOCKS).linear
    alpha = torch.sigmoid(layer.alpha_logit.detach())[None, :, None, None]
    torch.testing.assert_close(out.detach(), alpha * sparse + (1 - alpha) * linear, rtol=1e-10, atol=1e-10)
    out.square().sum().backward()
    assert all(torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0 for t in (x.q, x.k, x.v, layer.alpha_logit))
    layer.qat = False
    assert not torch.allclose(layer(q, k, v), out.detach())
    layer.quantized = True  # the inference switch: the same low-bit branch
    assert "quantized=True" in repr(layer)
    torch.testing.assert_close(layer(q, k, v), out.detach(), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_hard_path_within_baseline(make_inputs, rng, dtype):
    x = make_inputs(1, 4, 4, 45, 45, DIM, dtype=dtype, proj_dtype=None)
    layer = make_layer(rng)
    out = layer(x.q, x.k, x.v)
    assert out.dtype == dtype
    exact = expected_output(layer, *(t.double() for t in (x.q, x.k, x.v)))
    baseline = expected_output(layer, x.q, x.k, x.v)
    ref.assert_within_baseline(out, exact, baseline, name="SLA2 out")


def test_nhd_layout_equals_hnd(make_inputs, rng):
    x = make_inputs(1, 4, 2, 45, 37, DIM, proj_dtype=None)
    layer = make_layer(rng)
    out = layer(x.q, x.k, x.v)
    layer.layout = "NHD"
    out_nhd = layer(*(t.transpose(1, 2) for t in (x.q, x.k, x.v)))
    torch.testing.assert_close(out_nhd.transpose(1, 2), out, rtol=1e-6, atol=1e-6)


def test_soft_path_at_hard_mask_matches_kernels(make_inputs, rng):
    """Mask logits of ±inf turn the composite's branches into the kernels' branches."""
    x = make_inputs(2, 4, 2, 45, 37, DIM, proj_dtype=None)
    k_smooth = x.k - x.k.mean(dim=2, keepdim=True)
    plan = slattn.route(x.q, x.k, topk=0.3, **BLOCKS)
    mask_logits = torch.where(plan.block_map == 1, torch.inf, -torch.inf).double()
    os_, ol = soft_branches(x.q, k_smooth, x.v, mask_logits, scale=DIM ** -0.5, **BLOCKS)
    kernel_os, kernel_ol, _ = slattn.sparse_linear_attention(x.q, k_smooth, x.v, plan=plan, return_branches=True)
    torch.testing.assert_close(os_, kernel_os, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ol, kernel_ol, rtol=1e-10, atol=1e-10)


def test_soft_path_chunks_agree(make_inputs, monkeypatch):
    """Chunking over heads and query blocks changes nothing but the memory held."""
    import slattn.soft_attention as soft

    x = make_inputs(1, 4, 2, 45, 37, DIM, proj_dtype=None)
    logits = torch.randn(1, 4, 6, 5, dtype=torch.float64)
    whole = soft.soft_branches(x.q, x.k, x.v, logits, scale=0.3, **BLOCKS)
    monkeypatch.setattr(soft, "CHUNK_ELEMENTS", 8 * 37 * 2)  # two query blocks of one head per chunk
    assert soft._chunks(1, 6, 8, 37) == (1, 2)
    chunked = soft.soft_branches(x.q, x.k, x.v, logits, scale=0.3, **BLOCKS)
    for a, b in zip(whole, chunked):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("alpha", ["head", "block"])
def test_gradcheck_soft_path(make_inputs, rng, alpha):
    """Gradients of stage 1 reach q, k, v, both router projections and α."""
    x = make_inputs(1, 2, 1, 13, 11, 8, proj_dtype=None, requires_grad=True)
    layer = slattn.SparseLinearAttention2(8, 0.5, compression_ratio=2, alpha=alpha, num_heads=2, q_len=13,
                                          block_q=4, block_k=4, softtopk_tau=0.5).double()
    layer.set_routing("soft")
    names = ("router.proj_q.weight", "router.proj_k.weight", "alpha_logit")
    params = tuple((p.detach() + 0.3 * torch.randn(p.shape, dtype=torch.float64, generator=rng)).requires_grad_()
                   for p in (layer.get_parameter(n) for n in names))

    def run(q, k, v, *values):
        return functional_call(layer, dict(zip(names, values)), (q, k, v))

    assert gradcheck(run, (x.q, x.k, x.v, *params))


def test_gradcheck_hard_path(make_inputs, rng):
    """Stage 2: gradients to q, k, v and α through the kernels' backward."""
    x = make_inputs(1, 2, 1, 21, 19, 8, proj_dtype=None, requires_grad=True)
    layer = slattn.SparseLinearAttention2(8, 0.3, num_heads=2, block_q=4, block_k=4).double()
    alpha = (torch.randn(2, dtype=torch.float64, generator=rng)).requires_grad_()

    def run(q, k, v, a):
        return functional_call(layer, {"alpha_logit": a}, (q, k, v))

    assert gradcheck(run, (x.q, x.k, x.v, alpha))


def test_router_gradient_only_when_soft(make_inputs, rng):
    x = make_inputs(1, 4, 2, 45, 37, DIM, proj_dtype=None)
    layer = make_layer(rng)
    layer(x.q, x.k, x.v).sum().backward()
    assert layer.router.proj_q.weight.grad is None and layer.alpha_logit.grad.abs().sum() > 0
    layer.set_routing("soft")
    layer(x.q, x.k, x.v).sum().backward()
    assert layer.router.proj_q.weight.grad.abs().sum() > 0 and layer.router.proj_k.weight.grad.abs().sum() > 0


def test_alpha_init_and_lazy_sizing(make_inputs):
    x = make_inputs(1, 3, 3, 45, 37, DIM, proj_dtype=None)
    layer = slattn.SparseLinearAttention2(DIM, **BLOCKS)
    with pytest.raises(RuntimeError, match="first call"):
        layer.alpha
    out, density = layer(x.q, x.k, x.v, return_sparsity=True)
    assert layer.alpha.shape == (3,)
    torch.testing.assert_close(layer.alpha, torch.full((3,), 0.9))
    assert density == layer.last_density == 5 * 6 / (5 * 6 * 5)  # one of five key blocks per query block
    per_block = slattn.SparseLinearAttention2(DIM, alpha="block", **BLOCKS)
    per_block(x.q, x.k, x.v)
    assert per_block.alpha.shape == (3, 6)
    with pytest.raises(ValueError, match="fixed sequence length"):
        per_block(x.q[:, :, :20], x.k, x.v)


def test_dense_routing_is_full_attention(make_inputs):
    x = make_inputs(1, 4, 2, 45, 37, DIM, proj_dtype=None)
    layer = slattn.SparseLinearAttention2(DIM, **BLOCKS)
    layer.set_routing("dense")
    full = ref.sla(x.q, x.k, x.v, topk=1.0, **BLOCKS).sparse
    torch.testing.assert_close(layer(x.q, x.k, x.v), full, rtol=1e-10, atol=1e-10)


def test_topk_one_is_full_attention(make_inputs, rng):
    """Every block critical: Ol = 0, so out = α · dense attention."""
    x = make_inputs(1, 2, 2, 45, 37, DIM, proj_dtype=None)
    layer = make_layer(rng, topk=1.0, heads=2).double()
    alpha = torch.sigmoid(layer.alpha_logit.detach())[None, :, None, None]
    full = ref.sla(x.q, x.k, x.v, topk=1.0, **BLOCKS).sparse
    for routing in ("hard", "soft"):
        layer.set_routing(routing)
        torch.testing.assert_close(layer(x.q, x.k, x.v), alpha * full, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("options, name", [
    (dict(compression_ratio=3), "compression_ratio"),
    (dict(compression_ratio=0), "compression_ratio"),
    (dict(alpha="row"), "alpha"),
    (dict(softtopk_tau=0.0), "softtopk_tau"),
    (dict(topk=1.5), "topk"),
    (dict(alpha_init=1.0), "alpha_init"),
    (dict(block_q=0), "block_q"),
    (dict(feature_map="gelu"), "feature_map"),
    (dict(tie_feature_map_qk="yes"), "tie_feature_map_qk"),
    (dict(num_heads=0), "num_heads"),
])
def test_bad_arguments_name_themselves(options, name):
    with pytest.raises(ValueError, match=name):
        slattn.SparseLinearAttention2(DIM, **options)


def test_bad_calls(make_inputs):
    layer = slattn.SparseLinearAttention2(DIM, **BLOCKS)
    with pytest.raises(ValueError, match="routing"):
        layer.set_routing("sparse")
    with pytest.raises(ValueError, match="topk"):
        layer.topk = 0.0
    x = make_inputs(1, 2, 2, 20, 20, 8, proj_dtype=None)
    with pytest.raises(ValueError, match="head_dim=16"):
        layer(x.q, x.k, x.v)
    with pytest.raises(TypeError, match="qat"):
        slattn.SparseLinearAttention2(DIM, qat="yes")
    with pytest.raises(TypeError, match="quantized"):
        slattn.SparseLinearAttention2(DIM, quantized=1)
