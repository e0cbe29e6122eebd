"""The two mainloops of the CUDA sparse branch (forward and backward), each held to the float64
composite with FlashAttention's tolerance rule: warpgroup products (wgmma,
compute capability 9.0, the default there) and mma.sync (sm_80+; on Hopper
when SLATTN_CUDA_MAINLOOP=mma). GPU only."""

from __future__ import annotations

import pytest
import torch

import reference
import slattn
from test_cuda import assert_within_baseline, check_against_composite, layer

pytestmark = pytest.mark.gpu

HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9
MAINLOOPS = ["mma", pytest.param("wgmma", marks=pytest.mark.skipif(not HOPPER, reason="wgmma needs a Hopper GPU"))]


@pytest.fixture(params=MAINLOOPS)
def mainloop(request, monkeypatch):
    monkeypatch.setenv("SLATTN_CUDA_MAINLOOP", request.param)
    return request.param


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dim", [64, 128])
@pytest.mark.parametrize("blocks", [(64, 64), (128, 128), (64, 128), (128, 64)])
def test_head_dims_block_sizes_and_dtypes(rng, mainloop, dtype, dim, blocks):
    q, k, v, w, b = layer(rng, heads=2, q_len=333, k_len=290, dim=dim, dtype=dtype)
    check_against_composite(q, k, v, w, b, topk=0.4, block_q=blocks[0], block_k=blocks[1])


@pytest.mark.parametrize("shape", [dict(q_len=1, k_len=1), dict(q_len=1, k_len=200), dict(q_len=65, k_len=63),
                                   dict(heads=6, kv_heads=1, q_len=150, k_len=100, dim=128),
                                   dict(batch=2, heads=2, q_len=64, k_len=64)])
@pytest.mark.parametrize("blocks", [(64, 64), (128, 128)])
def test_edge_shapes(rng, mainloop, shape, blocks):
    q, k, v, w, b = layer(rng, **shape)
    check_against_composite(q, k, v, w, b, topk=0.5, block_q=blocks[0], block_k=blocks[1])


def test_long_sequence_many_tiles(rng, mainloop):
    q, k, v, w, b = layer(rng, heads=2, q_len=8192, k_len=8192, dim=128)
    check_against_composite(q, k, v, w, b, topk=0.05, block_q=128, block_k=128, grads=False)


def test_dense_rows_equal_sdpa(rng, mainloop):
    q, k, v, _, _ = (t.cuda() if t is not None else None for t in layer(rng, heads=2, q_len=700, k_len=650, dim=128))
    out = slattn.sparse_linear_attention(q, k, v, topk=1.0, block_q=128, block_k=128)
    exact = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double())
    torch.testing.assert_close(out.double(), exact, atol=2e-2, rtol=0)


@pytest.mark.parametrize("scale", [0.2, -0.09])
def test_topk_one_is_dense_attention_at_any_scale(rng, mainloop, scale):
    """The online softmax scales each tile's row maxima of the unscaled scores (their minima when the
    scale is negative); every block critical, the sparse branch is dense attention at that scale."""
    q, k, v, _, _ = layer(rng, heads=2, q_len=333, k_len=200, dim=128)
    cq, ck, cv = q.cuda(), k.cuda(), v.cuda()
    os_, _, _ = slattn.sparse_linear_attention(cq, ck, cv, topk=1.0, scale=scale, return_branches=True)
    dense64 = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double(), scale=scale)
    # The input-precision baseline on the CPU: PyTorch's GPU kernels return NaN for a negative scale.
    dense_low = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale)
    assert_within_baseline(os_.cpu(), dense64, dense_low, name=f"topk=1 output at scale {scale}")


@pytest.mark.parametrize("quantized", [False, pytest.param(True, marks=pytest.mark.skipif(
    not HOPPER, reason="the low-bit forward needs a Hopper GPU"))])
@pytest.mark.parametrize("blocks", [64, 128])
def test_more_query_blocks_than_thread_blocks(rng, mainloop, blocks, quantized):
    """The Hopper forwards (sparse and linear) walk several query blocks per thread block (the
    producer running into the next while the consumers finish one): each head comes out bit for bit
    as it does alone, with fewer query blocks than thread blocks."""
    heads, length = 8, 8192
    assert heads * length // blocks > 2 * torch.cuda.get_device_properties(0).multi_processor_count
    q, k, v = (torch.randn(1, heads, length, 128, generator=rng).to("cuda", torch.bfloat16) for _ in range(3))
    w, b = (0.3 * torch.randn(shape, generator=rng).cuda() for shape in ((128, 128), (128,)))
    plan = slattn.route(q, k, topk=0.05, block_q=blocks, block_k=blocks)
    whole = slattn.sparse_linear_attention(q, k, v, w, b, plan=plan, quantized=quantized)
    for h in range(heads):
        one = slice(h, h + 1)
        alone_plan = slattn.route(q[:, one], k[:, one], topk=0.05, block_q=blocks, block_k=blocks)
        assert torch.equal(alone_plan.block_map, plan.block_map[:, one])
        alone = slattn.sparse_linear_attention(q[:, one], k[:, one], v[:, one], w, b, plan=alone_plan,
                                               quantized=quantized)
        assert torch.equal(alone, whole[:, one]), f"head {h}"


@pytest.mark.parametrize("feature_map", ["softmax", "elu", "relu"])
@pytest.mark.parametrize("linear_scope", ["marginal", "all"])
@pytest.mark.parametrize("topk, negligible", [(0.1, 0.0), (0.1, 0.3), (0.8, 0.0)])
def test_linear_sets_of_every_size(rng, mainloop, feature_map, linear_scope, topk, negligible):
    """U_m of 11 key blocks under both scopes: 1 critical (10 or 11 in U_m), 8 critical (3 or 11), or
    1 critical and 3 negligible (7 or 8); on Hopper the indicator's product sums them (padded to 16
    key blocks), on the sm_80 kernels the shorter list is summed or subtracted from the totals."""
    q, k, v, w, b = layer(rng, heads=2, q_len=700, k_len=1300, dim=128)
    check_against_composite(q, k, v, w, b, topk=topk, negligible=negligible, block_q=128, block_k=128,
                            feature_map=feature_map, linear_scope=linear_scope)


def linear_grads_case(rng, branches):
    """A layer routed at topk 0.1 over 11 key blocks, gradients for its output (broadcast along the
    sequence, as out.sum() gives) or for its returned branches Os and Ol, and the gradients of q, k,
    v, W and b by the float64 and the input-dtype composite."""
    q, k, v, w, b = layer(rng, heads=2, q_len=700, k_len=1300, dim=128)
    plan = slattn.route(q.cuda(), k.cuda(), topk=0.1, block_q=128, block_k=128)
    if branches:
        output_grads = [torch.randn(1, 2, 700, 128, generator=rng).to(q.dtype) for _ in range(2)]
    else:
        output_grads = [torch.randn(1, 2, 1, 128, generator=rng).to(q.dtype).expand(1, 2, 700, 128)]
    expected = []
    for dtype in (torch.float64, q.dtype):
        leaves = [t.detach().to(dtype, copy=True).requires_grad_() for t in (q, k, v, w, b)]
        result = reference.sla(*leaves, block_q=128, block_k=128, block_map=plan.block_map.cpu())
        outputs = (result.sparse, result.linear) if branches else (result.out,)
        torch.autograd.backward(outputs, [g.to(dtype) for g in output_grads])
        expected.append([t.grad for t in leaves])  # None for W and b under branches
    return (q, k, v, w, b), plan, output_grads, expected


def slattn_grads(inputs, plan, output_grads, branches):
    leaves = [t.cuda().requires_grad_() for t in inputs]
    result = slattn.sparse_linear_attention(*leaves, plan=plan, return_branches=branches)
    outputs = result[:2] if branches else (result,)
    # A copy to the GPU would make a broadcast gradient dense: broadcast it there.
    device_grads = [g[..., :1, :].cuda().expand(g.shape) if g.stride(-2) == 0 else g.cuda() for g in output_grads]
    assert [g.stride(-2) == 0 for g in device_grads] == [g.stride(-2) == 0 for g in output_grads]
    torch.autograd.backward(outputs, device_grads)
    return [t.grad.cpu() if t.grad is not None else None for t in leaves]


@pytest.mark.parametrize("mainloop_name", ["auto", "mma"])
@pytest.mark.parametrize("case", ["contiguous dout", "broadcast dout", "branches"])
def test_linear_backward_of_any_dout_and_of_returned_branches(rng, monkeypatch, mainloop_name, case):
    """The linear branch's backward takes dOl = dO W (+ the gradient of a returned Ol): the Hopper
    query kernel reads dO with the tile copy engine, and a broadcast dO (no such layout) takes the
    sm_80 one; returned branches give dO = 0 and dOl. dq, dk, dv, dW and db against the float64
    composite in each case (the branches do not reach W and b: no gradient, or zeros)."""
    monkeypatch.setenv("SLATTN_CUDA_MAINLOOP", mainloop_name)
    branches = case == "branches"
    inputs, plan, output_grads, (exact, low) = linear_grads_case(rng, branches)
    if case == "contiguous dout":
        output_grads = [g.contiguous() for g in output_grads]
    grads = slattn_grads(inputs, plan, output_grads, branches)
    for name, actual, e, l in zip(("dq", "dk", "dv", "d_proj_weight", "d_proj_bias"), grads, exact, low):
        if e is None:
            assert actual is None or not actual.any(), name
        else:
            assert_within_baseline(actual, e, l, name=name)


@pytest.mark.skipif(not HOPPER, reason="the Hopper linear backward")
def test_forced_hopper_linear_backward_refuses_a_broadcast_dout(rng, monkeypatch):
    inputs, plan, output_grads, _ = linear_grads_case(rng, branches=False)
    monkeypatch.setenv("SLATTN_CUDA_MAINLOOP", "wgmma")
    with pytest.raises(NotImplementedError, match="SLATTN_CUDA_MAINLOOP=wgmma: dout's rows do not suit"):
        slattn_grads(inputs, plan, output_grads, branches=False)


def strided_layer(rng):
    """q, k, v whose rows are not 16-byte vectors (every other element of a wider tensor), and the
    contiguous copies with the same values."""
    q, k, v, w, b = (t.cuda() for t in layer(rng, heads=2, q_len=200, k_len=170, dim=64))
    strided = [torch.stack((t, torch.zeros_like(t)), dim=-1).flatten(-2)[..., ::2] for t in (q, k, v)]
    assert strided[0].stride(-1) == 2
    return strided, (q, k, v), w, b


def test_strided_head_dim_matches_contiguous(rng, monkeypatch):
    """The default mainloop takes such rows, through mma.sync on Hopper too (the tile copy engine of
    the Hopper sparse forward reads whole rows): bit for bit what mma.sync gives the contiguous
    tensors. The Hopper key-block states read k and v with the tile copy engine as well: the linear
    branch takes the sm_80 kernels, bit for bit what they give the contiguous tensors."""
    strided, contiguous, w, b = strided_layer(rng)
    plan = slattn.route(contiguous[0], contiguous[1], topk=0.3, block_q=128, block_k=128)
    default = slattn.sparse_linear_attention(*strided, plan=plan)
    _, linear_strided, _ = slattn.sparse_linear_attention(*strided, plan=plan, return_branches=True)
    monkeypatch.setenv("SLATTN_CUDA_MAINLOOP", "mma")
    _, linear_contiguous, _ = slattn.sparse_linear_attention(*contiguous, plan=plan, return_branches=True)
    assert torch.equal(linear_strided, linear_contiguous)
    expected = slattn.sparse_linear_attention(*contiguous, plan=plan)
    assert torch.equal(default, expected)
    assert torch.equal(slattn.sparse_linear_attention(*strided, plan=plan), expected)


def test_strided_head_dim_backward_matches_contiguous(rng, monkeypatch):
    """The Hopper sparse backward copies whole rows with the tile copy engine as well: strided rows
    take mma.sync there, bit for bit the gradients mma.sync gives the contiguous tensors."""
    strided, contiguous, _, _ = strided_layer(rng)
    plan = slattn.route(contiguous[0], contiguous[1], topk=0.3, block_q=128, block_k=128)
    dout = torch.randn(contiguous[0].shape, generator=rng).to(contiguous[0])

    def gradients(q, k, v):
        q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
        return torch.autograd.grad(slattn.sparse_linear_attention(q, k, v, plan=plan), (q, k, v), dout)

    default = gradients(*strided)
    monkeypatch.setenv("SLATTN_CUDA_MAINLOOP", "mma")
    for got, expected in zip(default, gradients(*contiguous)):
        assert torch.equal(got, expected)


def test_strided_head_dim_backward_with_projection_matches_contiguous(rng, monkeypatch):
    """With a projection the linear branch's Hopper backward refuses strided k and v as well, and leaves
    dO's fp32 rows unwritten until then: the sm_80 kernels and the fp32 product of the projection's
    gradients get them, bit for bit what they give the contiguous tensors."""
    strided, contiguous, w, b = strided_layer(rng)
    plan = slattn.route(contiguous[0], contiguous[1], topk=0.3, block_q=128, block_k=128)
    dout = torch.randn(contiguous[0].shape, generator=rng).to(contiguous[0])

    def gradients(q, k, v):
        leaves = [t.detach().requires_grad_() for t in (q, k, v, w, b)]
        out = slattn.sparse_linear_attention(*leaves, plan=plan)
        return torch.autograd.grad(out, leaves, dout)

    default = gradients(*strided)
    monkeypatch.setenv("SLATTN_CUDA_MAINLOOP", "mma")
    for name, got, expected in zip(("dq", "dk", "dv", "dW", "db"), default, gradients(*contiguous)):
        assert torch.equal(got, expected), name


@pytest.mark.skipif(not HOPPER, reason="the Hopper forward")
def test_forced_hopper_forward_refuses_strided_head_dim(rng, monkeypatch):
    strided, contiguous, w, b = strided_layer(rng)
    plan = slattn.route(contiguous[0], contiguous[1], topk=0.3, block_q=128, block_k=128)
    monkeypatch.setenv("SLATTN_CUDA_MAINLOOP", "wgmma")
    with pytest.raises(NotImplementedError, match="SLATTN_CUDA_MAINLOOP=wgmma: .*contiguous head dim"):
        slattn.sparse_linear_attention(*strided, w, b, plan=plan)


def test_an_unknown_mainloop_is_refused(rng, monkeypatch):
    monkeypatch.setenv("SLATTN_CUDA_MAINLOOP", "fastest")
    q, k, v, _, _ = (t.cuda() if t is not None else None for t in layer(rng))
    with pytest.raises(ValueError, match="SLATTN_CUDA_MAINLOOP must be auto, mma or wgmma, got 'fastest'"):
        slattn.sparse_linear_attention(q, k, v, topk=0.5)


@pytest.mark.skipif(HOPPER, reason="the refusal is for GPUs without wgmma")
def test_wgmma_off_hopper_is_refused(rng, monkeypatch):
    monkeypatch.setenv("SLATTN_CUDA_MAINLOOP", "wgmma")
    q, k, v, _, _ = (t.cuda() if t is not None else None for t in layer(rng))
    with pytest.raises(NotImplementedError, match="compute capability 9.0"):
        slattn.sparse_linear_attention(q, k, v, topk=0.5)
