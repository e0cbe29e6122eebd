"""slattn.patch_sdpa on plain PyTorch modules: SLA where it serves, the
original SDPA (counted, logged once) elsewhere, per-layer states and their
checkpoints."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import slattn

CONFIG = {"topk": 0.25, "blkq": 64, "blkk": 64, "use_bf16": False}


class Block(nn.Module):
    """A transformer-style self-attention block that calls F.scaled_dot_product_attention by attribute,
    as diffusers' processors do."""

    def __init__(self, dim=128, heads=2):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x):
        b, length, dim = x.shape
        q, k, v = self.qkv(x).view(b, length, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v)
        return self.out(attended.transpose(1, 2).reshape(b, length, dim))


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([Block(), Block()])

    def forward(self, x):
        for block in self.blocks:
            x = x + block(x)
        return x


def tokens(seed=0, length=200, dim=128):
    return torch.randn(1, length, dim, generator=torch.Generator().manual_seed(seed))


def qkv(seed=0, shape=(1, 2, 200, 64), dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen).to(dtype) for _ in range(3)]


def test_patched_sdpa_runs_sla_and_unpatch_restores_the_original():
    original = F.scaled_dot_product_attention
    q, k, v = qkv()
    with slattn.patch_sdpa(CONFIG) as controller:
        assert F.scaled_dot_product_attention is not original
        patched = F.scaled_dot_product_attention(q, k, v)
    assert F.scaled_dot_product_attention is original
    # An untrained layer (zero projection) is sparse attention, computed in fp16 (use_bf16=False).
    expected = slattn.sparse_linear_attention(*(t.half() for t in (q, k, v)), topk=0.25).float()
    assert torch.equal(patched, expected)
    assert not torch.allclose(patched, original(q, k, v), atol=1e-3)  # really sparse, not dense
    assert controller.statistics() == {"calls": 1, "sla_calls": 1, "fallbacks": 0, "fallback_reasons": {},
                                       "layers": 1}


def test_attached_model_owns_one_state_per_attention_layer():
    model = Model()
    with slattn.patch_sdpa(CONFIG) as controller:
        controller.attach(model)
        model(tokens()).sum().backward()
    assert set(controller.states()) == {"blocks.0.sla_attention", "blocks.1.sla_attention"}
    assert isinstance(model.blocks[0].sla_attention, slattn.SparseLinearAttention)
    keys = set(model.state_dict())
    assert {"blocks.0.sla_attention.proj_l.weight", "blocks.1.sla_attention.proj_l.bias"} <= keys
    params = controller.parameters()
    assert len(params) == 4 and all(p.dtype == torch.float32 for p in params)
    # The zero-initialised projection still receives a gradient: the linear branch runs.
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)


def test_hedgehog_states_own_their_feature_weights():
    model = Model()
    with slattn.patch_sdpa(CONFIG | {"feature_map": "hedgehog", "tie_feature_map_qk": False}) as controller:
        controller.attach(model)
        model(tokens()).sum().backward()
    keys = set(model.state_dict())
    assert {f"blocks.{i}.sla_attention.feature_map_{x}.layer.weight" for i in (0, 1) for x in "qk"} <= keys
    params = controller.parameters()
    assert len(params) == 8 and all(p.grad is not None for p in params)
    weights = [model.blocks[i].sla_attention.feature_map_q.weight for i in (0, 1)]
    assert all(torch.equal(w, torch.eye(64)) for w in weights)  # identity-initialised
    # With the projection still zero nothing reaches W: Ol does not move the output yet.
    assert all(float(w.grad.abs().sum()) == 0 for w in weights)


def test_call_order_layers_without_a_model_and_new_step():
    q, k, v = qkv()
    with slattn.patch_sdpa(CONFIG) as controller:
        F.scaled_dot_product_attention(q, k, v)
        F.scaled_dot_product_attention(q, k, v)
        first = dict(controller.states())
        controller.new_step()
        F.scaled_dot_product_attention(q, k, v)
    assert list(first) == ["call0", "call1"]
    assert controller.states()["call0"] is first["call0"] and len(controller.states()) == 2


def test_shared_states_per_head_dim_and_dtype():
    with slattn.patch_sdpa(dict(CONFIG, share="head_dim")) as controller:
        for shape in ((1, 2, 200, 64), (1, 4, 130, 64), (1, 2, 200, 128)):
            F.scaled_dot_product_attention(*qkv(shape=shape))
        F.scaled_dot_product_attention(*qkv(dtype=torch.bfloat16))
    assert set(controller.states()) == {"64:fp32", "128:fp32", "64:bf16"}


FALLBACKS = [
    ("mask", dict(attn_mask=torch.ones(200, 200, dtype=torch.bool)), "an attention mask"),
    ("dropout", dict(dropout_p=0.1), "dropout_p > 0"),
    ("causal", dict(is_causal=True), "causal attention"),
    ("3-D", dict(shape=(2, 200, 64)), "not 4-D"),
    ("float64", dict(dtype=torch.float64), "dtype torch.float64"),
    ("short", dict(shape=(1, 2, 40, 64)), "fewer tokens than one block"),
    ("cross-short", dict(k_len=128), "cross-attention with a short key sequence"),
    ("gqa-unpaired", dict(kv_heads=1), "head counts"),
]


@pytest.mark.parametrize("case,options,reason", FALLBACKS, ids=[c[0] for c in FALLBACKS])
def test_each_fallback_uses_the_original_sdpa_and_is_counted_and_logged_once(case, options, reason, caplog):
    options = dict(options)
    shape = options.pop("shape", (1, 2, 200, 64))
    dtype = options.pop("dtype", torch.float32)
    k_len = options.pop("k_len", shape[-2])
    kv_heads = options.pop("kv_heads", shape[1] if len(shape) == 4 else None)
    q = qkv(shape=shape, dtype=dtype)[0]
    kv_shape = (*shape[:-2], k_len, shape[-1]) if len(shape) == 3 else (shape[0], kv_heads, k_len, shape[-1])
    k, v = qkv(seed=1, shape=kv_shape, dtype=dtype)[:2]
    original = F.scaled_dot_product_attention
    torch.manual_seed(0)
    try:
        expected = original(q, k, v, **options)
    except RuntimeError as error:  # SDPA refuses it too (unpaired heads): the patch must raise the same
        expected = error
    with caplog.at_level(logging.WARNING, logger="slattn"), slattn.patch_sdpa(CONFIG) as controller:
        for _ in range(2):
            torch.manual_seed(0)
            if isinstance(expected, RuntimeError):
                with pytest.raises(RuntimeError):
                    F.scaled_dot_product_attention(q, k, v, **options)
            else:
                assert torch.equal(F.scaled_dot_product_attention(q, k, v, **options), expected)
    stats = controller.statistics()
    assert stats["sla_calls"] == 0 and stats["fallbacks"] == 2
    (counted,) = stats["fallback_reasons"]
    assert reason in counted
    assert sum(reason in record.getMessage() for record in caplog.records) == 1


def test_grouped_query_attention_is_served_when_sdpa_would_pair_the_heads():
    q = qkv(shape=(1, 4, 200, 64))[0]
    k, v = qkv(seed=1, shape=(1, 2, 200, 64))[:2]
    with slattn.patch_sdpa(CONFIG) as controller:
        out = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    assert controller.statistics()["sla_calls"] == 1 and out.shape == q.shape


def test_checkpoint_round_trip_restores_every_layer(tmp_path):
    model = Model()
    with slattn.patch_sdpa(CONFIG) as controller:
        controller.attach(model)
        model(tokens())
        with torch.no_grad():
            for i, p in enumerate(controller.parameters()):
                p.copy_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(i)))
        expected = model(tokens(1))
        controller.save_state(tmp_path)
    assert (tmp_path / "sla_attention.pt").exists() and (tmp_path / "sla_attention.safetensors").exists()

    fresh = Model()
    fresh.load_state_dict({k: v for k, v in model.state_dict().items() if "sla_attention" not in k})
    with slattn.patch_sdpa(CONFIG, checkpoint=tmp_path) as controller:
        controller.attach(fresh)
        restored = fresh(tokens(1))
    assert torch.equal(restored, expected)


def test_checkpoint_with_other_settings_warns_naming_the_keys(tmp_path):
    with slattn.patch_sdpa(CONFIG) as controller:
        F.scaled_dot_product_attention(*qkv())
        controller.save_state(tmp_path)
    with pytest.warns(UserWarning, match="topk"):
        slattn.patch_sdpa(dict(CONFIG, topk=0.5), checkpoint=tmp_path).unpatch()


def test_quantized_runs_the_low_bit_branch_and_loads_bf16_checkpoints_quietly(tmp_path, recwarn):
    """`quantized` in --sla_config gives every state the low-bit sparse branch (SPEC section 6); a checkpoint
    trained without it loads with no settings warning, and the outputs are close to the unquantized ones."""
    model = Model()
    with slattn.patch_sdpa(CONFIG) as controller:
        controller.attach(model)
        expected = model(tokens())
        controller.save_state(tmp_path)
    fresh = Model()
    fresh.load_state_dict({k: v for k, v in model.state_dict().items() if "sla_attention" not in k})
    with slattn.patch_sdpa(dict(CONFIG, quantized=True), checkpoint=tmp_path) as controller:
        controller.attach(fresh)
        low = fresh(tokens())
        assert controller.states() and all(state.quantized for state in controller.states().values())
    assert not [w for w in recwarn if "settings" in str(w.message)]
    assert not torch.equal(low, expected)
    assert torch.nn.functional.cosine_similarity(low.flatten(), expected.flatten(), dim=0) > 0.99


def test_missing_checkpoint_warns_and_starts_fresh(tmp_path):
    with pytest.warns(UserWarning, match="fresh"):
        controller = slattn.patch_sdpa(CONFIG, checkpoint=tmp_path / "nothing-here")
    controller.unpatch()


def test_config_strings_are_accepted_and_bad_configs_refused_at_patch_time():
    controller = slattn.patch_sdpa("{'topk': 0.1, 'tie_feature_map_qk': true, 'blkq': 128}")
    controller.unpatch()
    assert (controller.config.topk, controller.config.blkq) == (0.1, 128)
    original = F.scaled_dot_product_attention
    with pytest.raises(ValueError, match="topk"):
        slattn.patch_sdpa({"topk": 2.0})
    with pytest.raises(ValueError, match="bogus"):
        slattn.patch_sdpa({"bogus": 1})
    assert F.scaled_dot_product_attention is original  # a refused config patches nothing


def test_patched_model_compiles_with_fullgraph_after_a_warm_up():
    model = Block()
    x = tokens()
    with slattn.patch_sdpa(CONFIG) as controller:
        controller.attach(model)
        eager = model(x)  # creates the layer's SLA state; compiled code then finds it in place
        compiled = torch.compile(model, fullgraph=True)
        torch.testing.assert_close(compiled(x), eager)
        compiled(x).sum().backward()
    assert model.sla_attention.proj_l.weight.grad.abs().sum() > 0


@pytest.fixture
def process_group(tmp_path):
    """A one-process gloo group for the wrappers that need one (DDP, FSDP)."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_ddp_and_autocast_keep_fp32_master_weights_with_gradients(process_group):
    model = Block()
    with slattn.patch_sdpa({"topk": 0.25}) as controller:
        controller.attach(model)
        model(tokens())  # the SLA state exists before DDP collects the parameters
        ddp = nn.parallel.DistributedDataParallel(model)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = ddp(tokens(1))
        out.float().sum().backward()
    weight = model.sla_attention.proj_l.weight
    assert out.dtype == torch.bfloat16
    assert weight.dtype == weight.grad.dtype == torch.float32 and weight.grad.abs().sum() > 0
    assert any(p is weight for p in ddp.parameters())


def test_fsdp_shards_the_sla_weights_and_keeps_the_outputs(process_group):
    import copy

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = Block()
    with slattn.patch_sdpa({"topk": 0.25}) as controller:
        controller.attach(model)
        model(tokens())
        with torch.no_grad():
            model.sla_attention.proj_l.weight.normal_(std=0.05)
        expected = copy.deepcopy(model)(tokens(1))
        fully_shard(model, mesh=init_device_mesh("cpu", (1,)))  # on a GPU machine too
        out = model(tokens(1))
        out.sum().backward()
    weight = model.sla_attention.proj_l.weight
    assert isinstance(weight, torch.distributed.tensor.DTensor)  # FSDP manages it like any parameter
    assert weight.grad is not None and weight.grad.full_tensor().abs().sum() > 0
    torch.testing.assert_close(out, expected)


def test_patches_unwind_in_order_and_an_out_of_order_unpatch_is_refused():
    original = F.scaled_dot_product_attention
    outer = slattn.patch_sdpa(CONFIG)
    inner = slattn.patch_sdpa(CONFIG)
    with pytest.raises(RuntimeError, match="patched again"):
        outer.unpatch()
    inner.unpatch()
    outer.unpatch()
    assert F.scaled_dot_product_attention is original


def test_the_sdpa_scale_argument_is_honoured():
    q, k, v = qkv()
    with slattn.patch_sdpa(CONFIG):
        patched = F.scaled_dot_product_attention(q, k, v, scale=0.05)
    expected = slattn.sparse_linear_attention(*(t.half() for t in (q, k, v)), topk=0.25, scale=0.05).float()
    assert torch.equal(patched, expected)
