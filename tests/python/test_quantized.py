"""The low-bit sparse branch (SPEC section 6) on the CPU: fake quantization
against an independent composite (PyTorch's own float8_e4m3fn rounding),
its accuracy against the unquantized layer on the synthetic video workload,
the straight-through backward, the module switch, clear refusals, and the
fallback on GPUs without low-bit kernels. The Hopper kernels: test_quantized_cuda.py."""

from __future__ import annotations

import pytest
import torch

import reference
import slattn
from slattn.workload import Workload, make_qkv


def draw(rng, shape, dtype=torch.float64):
    return torch.randn(shape, dtype=torch.float64, generator=rng).to(dtype)


def cosine(a, b):
    return float(torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0))


def relative_l2(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("shape", [dict(q_len=300, k_len=300, heads=2, kv_heads=2),
                                   dict(q_len=130, k_len=515, heads=4, kv_heads=2),
                                   dict(q_len=1, k_len=1, heads=1, kv_heads=1)])
@pytest.mark.parametrize("projection", [False, True])
def test_cpu_fake_quantization_matches_the_composite(rng, shape, projection):
    """float64: the same roundings, so the op and the composite agree to rounding noise."""
    q = draw(rng, (1, shape["heads"], shape["q_len"], 64))
    k = draw(rng, (1, shape["kv_heads"], shape["k_len"], 64))
    v = draw(rng, (1, shape["kv_heads"], shape["k_len"], 64))
    weight, bias = (draw(rng, (64, 64)), draw(rng, (64,))) if projection else (None, None)
    plan = slattn.route(q, k, topk=0.3, negligible=0.2, block_q=64, block_k=64)
    out, lse = slattn.sparse_linear_attention(q, k, v, weight, bias, plan=plan, quantized=True, return_lse=True)
    exact = reference.sla(q, k, v, weight, bias, block_map=plan.block_map, quantized=True)
    assert torch.allclose(out, exact.out, rtol=1e-10, atol=1e-10), float((out - exact.out).abs().max())
    finite = torch.isfinite(exact.lse)
    assert torch.equal(torch.isfinite(lse), finite)
    assert torch.allclose(lse[finite], exact.lse[finite], rtol=1e-12, atol=1e-12)
    unquantized = slattn.sparse_linear_attention(q, k, v, weight, bias, plan=plan)
    if shape["k_len"] > 1:  # the roundings change the output, but not much
        assert not torch.equal(out, unquantized)
        assert cosine(out, unquantized) > 0.99


def test_quantized_output_stays_close_on_the_video_workload():
    """The issue's bounds (cosine >= 0.999, relative L2 <= 3%) at a CPU-sized video shape, bf16 inputs."""
    q, k, v = make_qkv(Workload((4, 8, 16), heads=2, head_dim=128), dtype=torch.bfloat16)
    plan = slattn.route(q, k, topk=0.05, block_q=64, block_k=64)
    full = slattn.sparse_linear_attention(q, k, v, plan=plan).float()
    low = slattn.sparse_linear_attention(q, k, v, plan=plan, quantized=True).float()
    assert cosine(low, full) >= 0.999
    assert relative_l2(low, full) <= 0.03


def test_backward_is_straight_through(rng):
    """Gradients are those of SPEC section 5 on the unquantized inputs at the quantized forward's LSE:
    finite, and close to the unquantized layer's."""
    leaves = [draw(rng, (1, 2, 200, 64), torch.float32).requires_grad_() for _ in range(3)]
    weight = (0.3 * draw(rng, (64, 64), torch.float32)).requires_grad_()
    grad = draw(rng, (1, 2, 200, 64), torch.float32)
    grads = []
    for quantized in (True, False):
        for t in (*leaves, weight):
            t.grad = None
        out = slattn.sparse_linear_attention(*leaves, weight, topk=0.3, quantized=quantized)
        out.backward(grad)
        grads.append([t.grad.clone() for t in (*leaves, weight)])
    for low, full in zip(*grads):
        assert torch.isfinite(low).all()
        assert cosine(low, full) > 0.98


def test_module_switch(rng):
    layer = slattn.SparseLinearAttention(64, topk=0.3, quantized=True)
    assert "quantized=True" in repr(layer)
    q, k, v = (draw(rng, (1, 2, 128, 64), torch.float32) for _ in range(3))
    low = layer(q, k, v)
    layer.quantized = False
    assert not torch.equal(low, layer(q, k, v))


def test_quantized_must_be_a_bool(rng):
    q = draw(rng, (1, 1, 64, 64), torch.float32)
    with pytest.raises(TypeError, match="quantized"):
        slattn.sparse_linear_attention(q, q, q, topk=0.5, quantized="yes")
    with pytest.raises(TypeError, match="quantized"):
        slattn.SparseLinearAttention(64, topk=0.5, quantized=1)



def test_gpus_without_low_bit_kernels_fall_back_once(monkeypatch):
    """quantized=True stays on for the CPU and Hopper; another GPU (capability faked here) gets False and one
    RuntimeWarning per process. The Hopper kernels themselves are tested in test_quantized_cuda.py."""
    from slattn import _low_bit

    capability = {"value": (9, 0)}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability["value"])
    monkeypatch.setattr(_low_bit, "_warned", False)
    cuda = torch.device("cuda")
    assert _low_bit.resolve_quantized(True, torch.device("cpu")) is True
    assert _low_bit.resolve_quantized(True, cuda) is True
    assert _low_bit.resolve_quantized(False, cuda) is False
    capability["value"] = (8, 9)
    with pytest.warns(RuntimeWarning, match="8.9"):
        assert _low_bit.resolve_quantized(True, cuda) is False
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _low_bit.resolve_quantized(True, cuda) is False
