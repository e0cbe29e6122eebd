"""SLA2 on CUDA: the hard path against the CPU (FlashAttention's tolerance rule of
reference.py: error <= 2x that of the same math in the input dtype + rounding
noise): output and the gradients of q, k, v and α; the soft path of stage 1 against
the float64 CPU path, and within one GPU at the Wan2.1-1.3B shape. GPU only."""

from __future__ import annotations

import pytest
import torch

import reference as ref
import slattn

pytestmark = pytest.mark.gpu


def composite(layer, q, k, v, block_map):
    """α·Os + (1-α)·Ol on HND inputs in their dtype, by reference.py, differentiable in q, k, v and α."""
    options = dict(block_map=block_map, block_q=layer.block_q, block_k=layer.block_k)
    sparse = ref.sla(q, k, v, **options).sparse
    linear = ref.sla(q, k - k.mean(dim=2, keepdim=True), v, **options).linear
    alpha = torch.sigmoid(layer.alpha_logit.to(q.dtype))[None, :, None, None]
    return alpha * sparse + (1 - alpha) * linear


@pytest.mark.parametrize("dim, block_q", [(64, 128), (128, 64)])
def test_hard_path_cuda_matches_cpu(rng, dim, block_q):
    heads, length = 4, 700
    q, k, v = (torch.randn(1, heads, length, dim, dtype=torch.float64, generator=rng).to(torch.bfloat16)
               for _ in range(3))
    layer = slattn.SparseLinearAttention2(dim, 0.1, compression_ratio=4, num_heads=heads, block_q=block_q, block_k=64)
    with torch.no_grad():
        layer.alpha_logit.copy_(torch.randn(heads, generator=rng))
        for proj in (layer.router.proj_q, layer.router.proj_k):
            proj.weight.add_(0.3 * torch.randn(proj.weight.shape, generator=rng))
    gpu_layer = slattn.SparseLinearAttention2(dim, 0.1, compression_ratio=4, num_heads=heads, block_q=block_q,
                                              block_k=64).cuda()
    gpu_layer.load_state_dict(layer.state_dict())

    cq, ck, cv = (t.cuda().requires_grad_() for t in (q, k, v))
    gpu_plan = gpu_layer.route(cq, ck)
    cpu_plan = layer.route(q, k)
    assert torch.equal(gpu_plan.block_map.cpu(), cpu_plan.block_map)
    dout = torch.randn(q.shape, dtype=torch.float64, generator=rng)
    out = gpu_layer(cq, ck, cv)
    out.backward(dout.to(torch.bfloat16).cuda())
    actual = (out, cq.grad, ck.grad, cv.grad, gpu_layer.alpha_logit.grad)

    def run(dtype, layer_copy):
        leaves = [t.to(dtype).requires_grad_() for t in (q, k, v)]
        result = composite(layer_copy, *leaves, cpu_plan.block_map)
        result.backward(dout.to(dtype))
        return (result, *(t.grad for t in leaves), layer_copy.alpha_logit.grad)

    exact = run(torch.float64, layer.double())
    baseline_layer = slattn.SparseLinearAttention2(dim, 0.1, compression_ratio=4, num_heads=heads,
                                                   block_q=block_q, block_k=64)
    baseline_layer.load_state_dict(layer.state_dict())
    baseline = run(torch.bfloat16, baseline_layer.to(torch.bfloat16))
    for name, a, e, b in zip(("out", "dq", "dk", "dv", "dalpha"), actual, exact, baseline):
        ref.assert_within_baseline(a.cpu().to(b.dtype), e, b, name=name)


def test_soft_path_cuda_agrees_with_the_float64_cpu_path(rng):
    heads, length, dim = 2, 300, 64
    q, k, v = (torch.randn(1, heads, length, dim, dtype=torch.float64, generator=rng) for _ in range(3))
    layer = slattn.SparseLinearAttention2(dim, 0.25, num_heads=heads, block_q=64, block_k=64).double()
    layer.set_routing("soft")
    gpu_layer = slattn.SparseLinearAttention2(dim, 0.25, num_heads=heads, block_q=64, block_k=64).cuda()
    gpu_layer.load_state_dict(layer.state_dict())
    gpu_layer.set_routing("soft")
    expected = layer(q, k, v)
    actual = gpu_layer(*(t.cuda().to(torch.bfloat16) for t in (q, k, v)))
    actual.float().square().mean().backward()
    error = (actual.double().cpu() - expected.detach()).norm() / expected.detach().norm()
    assert error < 2e-2, f"relative L2 error {error:.2e} of the bf16 soft path"
    router_grads = [p.grad for p in gpu_layer.router.parameters()]
    assert all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in router_grads)


def test_soft_path_of_a_wan_1_3b_layer_fits_on_one_gpu():
    """The issue's bound: stage 1 on a (1, 12, 32760, 128) layer within one 80 GB GPU."""
    shape = (1, 12, 32760, 128)
    q, k, v = (torch.randn(shape, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    layer = slattn.SparseLinearAttention2(128, 0.05, num_heads=12).cuda()
    layer.set_routing("soft")
    torch.cuda.reset_peak_memory_stats()
    out = layer(q, k, v)
    out.float().square().mean().backward()
    torch.cuda.synchronize()
    peak_gib = torch.cuda.max_memory_allocated() / 2**30
    assert peak_gib < 80, f"peak {peak_gib:.1f} GiB"
    assert torch.isfinite(out).all() and torch.isfinite(q.grad).all()
