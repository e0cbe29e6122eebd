"""slattn.models.DiT: configs (code, JSON, YAML, presets), attention kinds,
the SLA2 start layer, patch round trips, and errors that name the option."""

from __future__ import annotations

import json

import pytest
import torch

import slattn
from slattn.training import sla2_layers
from slattn.models import SLA2_PRESETS, DiT, DiTConfig

SMALL = dict(input_size=(16, 16), hidden_size=64, depth=3, num_heads=2, block_q=16, block_k=16)


def kernels(model: DiT) -> list:
    return [type(block.attn.kernel).__name__ if block.attn.kernel is not None else None for block in model.blocks]


@pytest.mark.parametrize("preset, topk, compression", [("max-speed", 0.05, 16), ("balanced", 0.15, 8),
                                                       ("quality", 0.25, 4)])
def test_presets_load(preset, topk, compression):
    model = DiT(preset, **{**SMALL, "hidden_size": 128})  # head dim 64: compression 16 leaves 4 routing features
    assert (model.config.sla2_topk_ratio, model.config.sla2_compression_ratio) == (topk, compression)
    assert SLA2_PRESETS[preset] == {"sla2_topk_ratio": topk, "sla2_compression_ratio": compression}
    layer = model.blocks[0].attn.kernel
    assert isinstance(layer, slattn.SparseLinearAttention2)
    assert layer.topk == topk and layer.router.routing_dim == 64 // compression


def test_json_and_yaml_configs(tmp_path):
    options = {**SMALL, "preset": "balanced", "sla2_topk_ratio": 0.3, "attention": "sla2", "sla2_start_layer": 1}
    (tmp_path / "dit.json").write_text(json.dumps(options))
    from_json = DiT.from_config(tmp_path / "dit.json")
    assert from_json.config.sla2_topk_ratio == 0.3 and from_json.config.sla2_compression_ratio == 8  # override wins
    assert kernels(from_json) == [None, "SparseLinearAttention2", "SparseLinearAttention2"]
    yaml = pytest.importorskip("yaml")
    (tmp_path / "dit.yaml").write_text(yaml.safe_dump(options))
    assert DiTConfig.from_file(tmp_path / "dit.yaml") == from_json.config


@pytest.mark.parametrize("options, kinds", [
    (dict(attention="full"), [None, None, None]),
    (dict(use_sla2=True), ["SparseLinearAttention2"] * 3),
    (dict(attention="sla", sla2_start_layer=2), [None, None, "SparseLinearAttention"]),
])
def test_attention_kinds(options, kinds):
    model = DiT({**SMALL, **options})
    assert kernels(model) == kinds
    x = torch.randn(2, 4, 16, 16)
    assert model(x, torch.tensor([10.0, 500.0])).shape == x.shape


def test_video_patches_round_trip():
    model = DiT({**SMALL, "input_size": (4, 8, 8), "temporal_patch_size": 2, "attention": "sla2"})
    x = torch.randn(1, 4, 4, 8, 8)
    assert model.config.tokens == 2 * 4 * 4
    assert torch.equal(model.unpatchify(model.patchify(x)), x)
    assert model(x, torch.tensor([3.0])).shape == x.shape


def test_sla2_matches_full_attention_at_topk_one():
    """All blocks critical and α = 1: SLA2 is full attention, so the models agree."""
    full = DiT({**SMALL, "attention": "full"})
    sla2 = DiT({**SMALL, "attention": "sla2", "sla2_topk_ratio": 1.0})
    sla2.load_state_dict(full.state_dict(), strict=False)
    with torch.no_grad():
        for block in [*full.blocks, *sla2.blocks]:
            block.modulation[-1].bias.fill_(0.3)
        sla2.final.weight.copy_(full.final.weight.normal_(std=0.1))
        for layer in sla2_layers(sla2).values():
            layer.alpha_logit.fill_(50.0)  # sigmoid = 1 in float32
    x, t = torch.randn(2, 4, 16, 16), torch.tensor([10.0, 500.0])
    torch.testing.assert_close(sla2(x, t), full(x, t), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("options, name", [
    (dict(sla2_compression_ratio=3), "sla2_compression_ratio"),
    (dict(sla2_alpha="row"), "sla2_alpha"),
    (dict(sla2_start_layer=3), "sla2_start_layer"),
    (dict(attention="sparse"), "attention"),
    (dict(preset="fastest"), "preset"),
    (dict(input_size=(15, 16)), "input_size"),
    (dict(sla2_topk_ratio=0.0), "sla2_topk_ratio"),
    (dict(num_heads=3), "num_heads"),
    (dict(depth=0), "depth"),
    (dict(heads=2), "heads"),
])
def test_bad_configs_name_the_option(options, name):
    with pytest.raises(ValueError, match=name):
        DiT({**SMALL, "attention": "sla2", **options})


def test_bad_config_sources(tmp_path):
    (tmp_path / "dit.toml").write_text("")
    with pytest.raises(ValueError, match=".json, .yaml or .yml"):
        DiT.from_config(tmp_path / "dit.toml")
    with pytest.raises(ValueError, match="DiT config"):
        DiT(42)
    with pytest.raises(ValueError, match="x must be"):
        DiT(SMALL)(torch.randn(1, 3, 16, 16), torch.zeros(1))
