"""SLA in a tiny, randomly initialised diffusers WanTransformer3DModel (built
from a config, nothing downloaded): forward, backward, save, reload, remove."""

from __future__ import annotations

import pytest
import safetensors.torch
import torch

diffusers = pytest.importorskip("diffusers", reason="diffusers is an optional extra (pip install slattn[diffusers])")

from slattn.integrations.diffusers import SLAProcessor, apply_sla, remove_sla  # noqa: E402

CONFIG = {"topk": 0.5, "blkq": 64, "blkk": 64, "use_bf16": False}
LAYERS = 2


def tiny_wan(seed=0):
    torch.manual_seed(seed)
    return diffusers.WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=64,
                                           in_channels=4, out_channels=4, text_dim=32, freq_dim=32, ffn_dim=64,
                                           num_layers=LAYERS, rope_max_seq_len=32).eval()


def inputs(seed=1):
    gen = torch.Generator().manual_seed(seed)
    # 2 frames of 16x16 latents in patches of 2x2: 128 video tokens, 12 text tokens.
    return dict(hidden_states=torch.randn(1, 4, 2, 16, 16, generator=gen), timestep=torch.tensor([500]),
                encoder_hidden_states=torch.randn(1, 12, 32, generator=gen), return_dict=False)


def randomise_sla_weights(model, seed=2):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "sla_attention" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))


def test_self_attention_runs_sla_and_cross_attention_stays_dense():
    model = tiny_wan()
    dense = model(**inputs())[0]
    controller = apply_sla(model, CONFIG)
    wrapped = [name for name, m in model.named_modules() if isinstance(getattr(m, "processor", None), SLAProcessor)]
    assert wrapped == [f"blocks.{i}.attn1" for i in range(LAYERS)]
    out = model(**inputs())[0]
    assert out.shape == dense.shape and torch.isfinite(out).all()
    assert not torch.allclose(out, dense, atol=1e-4)  # half the key blocks are skipped: not dense attention
    assert controller.statistics()["sla_calls"] == LAYERS


def test_backward_reaches_the_sla_weights_in_the_state_dict():
    model = tiny_wan()
    apply_sla(model, CONFIG)
    keys = [k for k in model.state_dict() if "sla_attention" in k]
    assert sorted(keys) == sorted(f"blocks.{i}.attn1.processor.sla_attention.proj_l.{p}"
                                  for i in range(LAYERS) for p in ("weight", "bias"))
    model(**inputs())[0].square().mean().backward()
    sla_params = [p for n, p in model.named_parameters() if "sla_attention" in n]
    assert len(sla_params) == 2 * LAYERS
    assert all(p.dtype == torch.float32 and p.grad is not None and p.grad.abs().sum() > 0 for p in sla_params)


def test_save_and_reload_into_a_fresh_model_gives_identical_outputs(tmp_path):
    model = tiny_wan()
    apply_sla(model, CONFIG)
    randomise_sla_weights(model)
    expected = model(**inputs())[0]
    model.save_pretrained(tmp_path)  # diffusers' own format: the SLA weights are part of the model's state

    (weights,) = tmp_path.glob("*.safetensors")
    saved = safetensors.torch.load_file(weights)
    assert any("sla_attention" in key for key in saved)
    fresh = tiny_wan(seed=5)  # other base weights too: everything must come from the file
    apply_sla(fresh, CONFIG)
    fresh.load_state_dict(saved, strict=True)
    assert torch.equal(fresh(**inputs())[0], expected)


def test_remove_sla_restores_the_original_processors():
    model = tiny_wan()
    dense = model(**inputs())[0]
    apply_sla(model, CONFIG)
    assert remove_sla(model) == LAYERS
    assert not any(isinstance(getattr(m, "processor", None), SLAProcessor) for m in model.modules())
    assert torch.equal(model(**inputs())[0], dense)
    assert not any("sla_attention" in k for k in model.state_dict())


def test_applying_twice_or_to_a_model_without_attention_is_refused():
    model = tiny_wan()
    apply_sla(model, CONFIG)
    with pytest.raises(ValueError, match="already runs SLA"):
        apply_sla(model, CONFIG)
    with pytest.raises(ValueError, match="no attention module"):
        apply_sla(torch.nn.Linear(4, 4), CONFIG)


def test_the_generic_path_serves_the_joint_attention_of_a_flux_transformer():
    torch.manual_seed(0)
    model = diffusers.FluxTransformer2DModel(patch_size=1, in_channels=4, out_channels=4, num_layers=1,
                                             num_single_layers=1, attention_head_dim=64, num_attention_heads=2,
                                             joint_attention_dim=32, pooled_projection_dim=32,
                                             axes_dims_rope=(16, 24, 24))
    gen = torch.Generator().manual_seed(1)
    flux_inputs = dict(hidden_states=torch.randn(1, 128, 4, generator=gen),
                       encoder_hidden_states=torch.randn(1, 12, 32, generator=gen),
                       pooled_projections=torch.randn(1, 32, generator=gen), timestep=torch.tensor([0.5]),
                       img_ids=torch.zeros(128, 3), txt_ids=torch.zeros(12, 3), return_dict=False)
    controller = apply_sla(model, CONFIG)
    randomise_sla_weights(model)
    model(**flux_inputs)[0].square().mean().backward()
    assert controller.statistics()["sla_calls"] == 2  # the dual-stream block and the single-stream block
    assert controller.statistics()["fallbacks"] == 0
    grads = [p.grad for name, p in model.named_parameters() if "sla_attention" in name]
    assert len(grads) == 4 and all(g is not None and g.abs().sum() > 0 for g in grads)
