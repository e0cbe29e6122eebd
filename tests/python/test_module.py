"""slattn.SparseLinearAttention: the public SLA reference's module, its bf16
(or fp16) cast semantics, zero-initialised fp32 projection and state keys."""

from __future__ import annotations

import collections

import pytest
import torch

import reference as ref
import slattn

DIM = 32
BLOCK = 16


def make_module(topk=0.3, feature_map="softmax", **options) -> slattn.SparseLinearAttention:
    return slattn.SparseLinearAttention(DIM, topk, feature_map, BLOCK, BLOCK, **options)


def random_state(rng, dtype=torch.float32) -> collections.OrderedDict:
    """A state dict as the public reference saves it."""
    return collections.OrderedDict([
        ("proj_l.weight", (0.3 * torch.randn(DIM, DIM, generator=rng)).to(dtype)),
        ("proj_l.bias", (0.3 * torch.randn(DIM, generator=rng)).to(dtype)),
    ])


def qkv(make_inputs, dtype=torch.float32, layout="HND", requires_grad=False):
    x = make_inputs(2, 4, 2, 70, 54, DIM, dtype=dtype, layout=layout, proj_dtype=None, requires_grad=requires_grad)
    return x.q, x.k, x.v


def test_state_dict_keys_and_zero_init():
    module = make_module()
    state = module.state_dict()
    assert set(state) == {"proj_l.weight", "proj_l.bias"}
    assert state["proj_l.weight"].shape == (DIM, DIM) and state["proj_l.bias"].shape == (DIM,)
    assert all(t.dtype == torch.float32 for t in state.values())
    assert all(torch.equal(t, torch.zeros_like(t)) for t in state.values())
    assert [name for name, _ in module.named_parameters()] == ["proj_l.weight", "proj_l.bias"]


def test_zero_projection_is_sparse_attention(make_inputs):
    q, k, v = qkv(make_inputs)
    module = make_module(topk=0.25, linear_scope="all")
    out = module(q, k, v)
    q16, k16, v16 = (t.to(torch.bfloat16) for t in (q, k, v))
    sparse_only = slattn.sparse_linear_attention(q16, k16, v16, topk=0.25, block_q=BLOCK, block_k=BLOCK)
    assert out.dtype == torch.float32
    assert torch.equal(out, sparse_only.float())
    exact = ref.sla(q16.double(), k16.double(), v16.double(), topk=0.25, block_q=BLOCK, block_k=BLOCK)
    baseline = ref.sla(q16, k16, v16, block_map=exact.block_map, block_q=BLOCK, block_k=BLOCK)
    ref.assert_within_baseline(out.to(torch.bfloat16), exact.sparse, baseline.sparse, name="out")


@pytest.mark.parametrize("linear_scope", ["marginal", "all"])
@pytest.mark.parametrize("feature_map", ["softmax", "elu", "relu"])
def test_matches_composite_with_bf16_casts(make_inputs, rng, feature_map, linear_scope):
    q, k, v = qkv(make_inputs)
    module = make_module(topk=0.3, feature_map=feature_map, negligible=0.2, linear_scope=linear_scope)
    state = random_state(rng)
    module.load_state_dict(state)
    out = module(q, k, v)
    assert out.dtype == torch.float32
    assert torch.equal(out.to(torch.bfloat16).float(), out)  # computed in bf16, cast back
    options = dict(topk=0.3, negligible=0.2, block_q=BLOCK, block_k=BLOCK, feature_map=feature_map,
                   linear_scope=linear_scope)
    q16, k16, v16 = (t.to(torch.bfloat16) for t in (q, k, v))
    weight, bias = state["proj_l.weight"], state["proj_l.bias"]
    exact = ref.sla(q16.double(), k16.double(), v16.double(), weight.double(), bias.double(), **options)
    del options["topk"]
    baseline = ref.sla(q16, k16, v16, weight, bias, block_map=exact.block_map, **options)
    ref.assert_within_baseline(out.to(torch.bfloat16), exact.out, baseline.out, name="out")
    assert ref.max_error(exact.out, exact.sparse) > 0.05  # the loaded projection matters


def test_load_reference_state_dict(make_inputs, rng):
    q, k, v = qkv(make_inputs)
    module = make_module(topk=0.4)
    before = module(q, k, v)
    state = random_state(rng, dtype=torch.bfloat16)  # a bf16 checkpoint still loads into fp32 masters
    result = module.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert module.proj_l.weight.dtype == module.proj_l.bias.dtype == torch.float32
    assert torch.equal(module.proj_l.weight, state["proj_l.weight"].float())
    after = module(q, k, v)
    q16, k16, v16 = (t.to(torch.bfloat16) for t in (q, k, v))
    direct = slattn.sparse_linear_attention(q16, k16, v16, state["proj_l.weight"].float(), state["proj_l.bias"].float(),
                                            topk=0.4, block_q=BLOCK, block_k=BLOCK)
    assert torch.equal(after, direct.float())
    assert not torch.equal(after, before)
    with pytest.raises(RuntimeError, match="proj_l"):
        module.load_state_dict({"proj_l.weight": torch.zeros(DIM, DIM)}, strict=True)


@pytest.mark.parametrize("topk,negligible", [(0.3, 0.0), (0.3, 0.4), (0.01, 0.0), (1.0, 0.0)])
def test_return_sparsity_reports_density(make_inputs, topk, negligible):
    q, k, v = qkv(make_inputs)  # 54 keys in blocks of 16: Nk = 4
    module = make_module(topk=topk, negligible=negligible)
    assert module.last_density is None and module.last_sparsity is None
    out, density = module(q, k, v, return_sparsity=True)
    n_crit = ref.critical_count(topk, 4)
    assert density == pytest.approx(n_crit / 4, abs=1e-12)
    assert module.last_density == density
    assert module.last_sparsity == pytest.approx(1.0 - density, abs=1e-12)
    assert torch.equal(out, module(q, k, v))


def test_gradients_reach_projection(make_inputs, rng):
    q, k, v = qkv(make_inputs, requires_grad=True)
    module = make_module(topk=0.25, negligible=0.25, linear_scope="marginal")
    out = module(q, k, v)
    upstream = torch.randn(out.shape, generator=rng)
    out.backward(upstream)
    weight_grad, bias_grad = module.proj_l.weight.grad, module.proj_l.bias.grad
    assert weight_grad.dtype == bias_grad.dtype == torch.float32
    assert weight_grad.abs().max() > 0 and bias_grad.abs().max() > 0
    assert all(t.grad.dtype == torch.float32 and bool(torch.isfinite(t.grad).all()) for t in (q, k, v))

    # The same gradients from the composite: exact (float64) and in bf16 (the baseline).
    options = dict(negligible=0.25, block_q=BLOCK, block_k=BLOCK)
    q16, k16, v16 = (t.detach().to(torch.bfloat16) for t in (q, k, v))
    upstream16 = upstream.to(torch.bfloat16)
    zeros = [torch.zeros(DIM, DIM, requires_grad=True), torch.zeros(DIM, requires_grad=True)]
    wide = [t.double().requires_grad_() for t in zeros]
    exact = ref.sla(q16.double(), k16.double(), v16.double(), *wide, topk=0.25, **options)
    exact_grads = torch.autograd.grad(exact.out, wide, upstream16.double())
    baseline = ref.sla(q16, k16, v16, *zeros, block_map=exact.block_map, **options)
    baseline_grads = torch.autograd.grad(baseline.out, zeros, upstream16)
    for name, actual, e, b in zip(("weight", "bias"), (weight_grad, bias_grad), exact_grads, baseline_grads):
        ref.assert_within_baseline(actual, e, b, name=f"d proj_l.{name}")
    torch.testing.assert_close(bias_grad, upstream.to(torch.bfloat16).float().sum(dim=(0, 1, 2)), rtol=1e-5,
                               atol=1e-4)


def test_nhd_layout_option(make_inputs, rng):
    q, k, v = qkv(make_inputs, layout="NHD")  # (B, L, H, D)
    state = random_state(rng)
    module_nhd = make_module(layout="NHD", linear_scope="all")
    module_hnd = make_module(linear_scope="all")
    module_nhd.load_state_dict(state)
    module_hnd.load_state_dict(state)
    out_nhd, density_nhd = module_nhd(q, k, v, return_sparsity=True)
    out_hnd, density_hnd = module_hnd(*(t.transpose(1, 2) for t in (q, k, v)), return_sparsity=True)
    assert out_nhd.shape == q.shape
    assert torch.equal(out_nhd.transpose(1, 2), out_hnd)
    assert density_nhd == density_hnd


@pytest.mark.parametrize("use_bf16,dtype", [(True, torch.bfloat16), (False, torch.float16)], ids=["bf16", "fp16"])
def test_compute_dtype(make_inputs, rng, use_bf16, dtype):
    q, k, v = qkv(make_inputs)
    module = make_module(use_bf16=use_bf16)
    assert module.dtype == dtype
    state = random_state(rng)
    module.load_state_dict(state)
    out = module(q, k, v)
    low = [t.to(dtype) for t in (q, k, v)]
    direct = slattn.sparse_linear_attention(*low, state["proj_l.weight"], state["proj_l.bias"], topk=0.3,
                                            block_q=BLOCK, block_k=BLOCK)
    assert out.dtype == torch.float32
    assert torch.equal(out, direct.float())
    assert torch.equal(out, out.to(dtype).float())
    other = torch.float16 if dtype == torch.bfloat16 else torch.bfloat16
    in_other = slattn.sparse_linear_attention(*(t.to(other) for t in (q, k, v)), state["proj_l.weight"],
                                              state["proj_l.bias"], topk=0.3, block_q=BLOCK, block_k=BLOCK)
    assert not torch.equal(out, in_other.float())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64], ids=["bf16", "fp16", "f64"])
def test_output_dtype_is_input_dtype(make_inputs, dtype):
    q, k, v = qkv(make_inputs, dtype=dtype)
    out = make_module()(q, k, v)
    assert out.dtype == dtype and out.shape == q.shape


def test_reference_signature_and_repr():
    module = slattn.SparseLinearAttention(64, 0.2, "elu", 128, 64, False, False)
    assert (module.BLKQ, module.BLKK, module.feature_map, module.topk) == (128, 64, "elu", 0.2)
    assert module.tie_feature_map_qk is False and module.dtype == torch.float16
    assert module.scale == pytest.approx(64 ** -0.5)
    assert "feature_map='elu'" in repr(module) and "BLKQ=128" in repr(module)


def test_a_block_using_the_module_compiles_with_fullgraph():
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = torch.nn.Linear(128, 384)
            self.attn = slattn.SparseLinearAttention(64, 0.25, use_bf16=False)
            self.out = torch.nn.Linear(128, 128)

        def forward(self, x):
            b, length, dim = x.shape
            q, k, v = self.qkv(x).view(b, length, 3, 2, 64).permute(2, 0, 3, 1, 4)
            return self.out(self.attn(q, k, v).transpose(1, 2).reshape(b, length, dim))

    torch.manual_seed(0)
    block, x = Block(), torch.randn(1, 200, 128)
    eager = block(x)
    compiled = torch.compile(block, fullgraph=True)
    torch.testing.assert_close(compiled(x), eager)
    compiled(x).sum().backward()
    assert block.attn.proj_l.weight.grad.abs().sum() > 0
