"""slattn.training: stage-1 distillation, the stage-2 set-up, the topk
scheduler, the QAT switches, statistics, and the Lightning callbacks."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import slattn
from slattn.models import DiT
from slattn.training import (RouterDistiller, RouterParameterScheduler, disable_sla2_qat, enable_sla2_qat,
                             get_sla2_statistics, log_sla2_config, prepare_stage2)
from slattn.workload import Workload, make_qkv


class SyntheticLayer(torch.nn.Module):
    """One SLA2 layer called on given (q, k, v): the smallest model the distiller can hook."""

    def __init__(self, **options):
        super().__init__()
        self.attn = slattn.SparseLinearAttention2(32, **options)

    def forward(self, q, k, v):
        return self.attn(q, k, v)


def tiny_dit(**overrides) -> DiT:
    options = dict(input_size=(16, 16), in_channels=4, patch_size=2, hidden_size=64, depth=3, num_heads=2,
                   attention="sla2", sla2_topk_ratio=0.25, sla2_compression_ratio=2, block_q=16, block_k=16,
                   sla2_start_layer=1, num_classes=10)
    return DiT({**options, **overrides})


def dit_batches(count=3, seed=0):
    """(x_t, t, y) per sample and diffusion timestep."""
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(2, 4, 16, 16, generator=gen), torch.full((2,), float(t)), torch.tensor([1, 7]))
            for t in torch.linspace(50, 950, count).tolist()]


def test_distillation_lowers_the_mse_to_full_attention():
    """On local (video-like) attention, 150 steps at topk 0.125 at least halve the hard-routing MSE (measured:
    2.4x) and the soft objective (3.7x); the layer ends routing hard at that topk."""
    batches = [make_qkv(Workload(grid=(4, 8, 8), heads=2, head_dim=32, seed=s), dtype=torch.float32)
               for s in range(4)]
    model = SyntheticLayer(topk=0.3, block_q=16, block_k=16, compression_ratio=4)
    distiller = RouterDistiller(model)
    assert distiller.capture(batches, progress=False) == 4
    router_before = model.attn.router.proj_q.weight.detach().clone()
    report = distiller.distill(0.125, steps=150, lr=1e-2, progress=False)["attn"]
    assert report.mse_after <= report.mse_before / 2, report
    assert report.soft_mse_after <= report.soft_mse_before / 2, report
    assert model.attn.routing == "hard" and model.attn.topk == 0.125
    assert not torch.equal(model.attn.router.proj_q.weight, router_before)
    assert distiller.mse("attn") == pytest.approx(report.mse_after)


def test_capture_through_dit_hooks_across_timesteps():
    model = tiny_dit()
    distiller = RouterDistiller(model, storage_device="cpu")
    assert set(distiller.layers) == {"blocks.1.attn.kernel", "blocks.2.attn.kernel"}
    assert distiller.capture(dit_batches(3), progress=False) == 3
    sample = distiller.samples["blocks.2.attn.kernel"][0]
    assert sample.q.shape == sample.k.shape == sample.target.shape == (2, 64, 2, 32)  # NHD
    layer = distiller.layers["blocks.2.attn.kernel"]
    assert layer.routing == "hard"  # restored after the dense capture
    layer.set_routing("dense")
    torch.testing.assert_close(layer(sample.q, sample.k, sample.v), sample.target)
    # Timesteps change what the layers see.
    assert not torch.equal(sample.q, distiller.samples["blocks.2.attn.kernel"][2].q)
    report = distiller.distill(0.25, steps=4, eval_every=2, progress=False)
    assert set(report) == set(distiller.layers)
    assert all(r.mse_after <= r.mse_before for r in report.values())


def test_distiller_errors():
    with pytest.raises(ValueError, match="SparseLinearAttention2"):
        RouterDistiller(DiT(dict(input_size=(8, 8), hidden_size=32, depth=1, num_heads=2)))
    distiller = RouterDistiller(tiny_dit())
    with pytest.raises(ValueError, match="capture"):
        distiller.distill(0.1)
    with pytest.raises(ValueError, match="no call"):
        distiller.capture([], progress=False)
    distiller.capture(dit_batches(1), progress=False)
    for options, name in ((dict(topk=0.0), "topk"), (dict(topk=0.1, steps=0), "steps"),
                          (dict(topk=0.1, lr=-1.0), "lr"), (dict(topk=0.1, eval_every=0), "eval_every")):
        with pytest.raises(ValueError, match=name):
            distiller.distill(**options)


def test_stage2_freezes_routers_and_trains_the_rest():
    model = tiny_dit()
    for layer in slattn.training.sla2_layers(model).values():
        layer.set_routing("soft")
    params = prepare_stage2(model, topk=0.5)
    layers = slattn.training.sla2_layers(model).values()
    assert all(layer.routing == "hard" and layer.topk == 0.5 for layer in layers)
    router_ids = {id(p) for layer in layers for p in layer.router.parameters()}
    assert router_ids and not router_ids & {id(p) for p in params}
    routers = [p.detach().clone() for layer in layers for p in layer.router.parameters()]
    alphas = [layer.alpha_logit.detach().clone() for layer in layers]
    with torch.no_grad():  # gates away from zero, so attention reaches the loss
        for block in model.blocks:
            block.modulation[-1].bias.fill_(0.5)
        model.final.weight.normal_(std=0.1)
    optimizer = torch.optim.SGD(params, lr=0.1)
    x, t, y = dit_batches(1)[0]
    model(x, t, y).square().mean().backward()
    optimizer.step()
    assert all(torch.equal(p, q) for p, q in zip(routers, (p for layer in layers for p in layer.router.parameters())))
    assert all(not torch.equal(a, layer.alpha_logit) for a, layer in zip(alphas, layers))
    prepare_stage2(model, train_alpha=False)
    assert all(not layer.alpha_logit.requires_grad for layer in layers)


def test_scheduler_values():
    scheduler = RouterParameterScheduler()
    defaults = (scheduler.router_warmup_steps, scheduler.initial_topk_ratio, scheduler.final_topk_ratio)
    assert defaults == (5000, 0.25, 0.10)
    assert scheduler.topk_at(0) == 0.25
    assert scheduler.topk_at(2500) == pytest.approx(0.175)
    assert scheduler.topk_at(5000) == scheduler.topk_at(10 ** 6) == 0.10
    assert RouterParameterScheduler(0, 0.5, 0.2).topk_at(0) == 0.2
    model = tiny_dit()
    assert scheduler.apply(model, 1000) == pytest.approx(0.22)
    assert all(layer.topk == pytest.approx(0.22) for layer in slattn.training.sla2_layers(model).values())


@pytest.mark.parametrize("options, name", [
    (dict(router_warmup_steps=-1), "router_warmup_steps"),
    (dict(initial_topk_ratio=0.0), "initial_topk_ratio"),
    (dict(final_topk_ratio=2.0), "final_topk_ratio"),
])
def test_scheduler_rejects_bad_arguments(options, name):
    with pytest.raises(ValueError, match=name):
        RouterParameterScheduler(**options)


def test_qat_switches():
    """enable/disable_sla2_qat switch every SLA2 layer and count them; DiT(sla2_enable_qat=True) builds its
    layers with QAT on; a model without SLA2 layers is refused."""
    model = tiny_dit()
    layers = [m for m in model.modules() if isinstance(m, slattn.SparseLinearAttention2)]
    assert len(layers) == 2 and not any(layer.qat for layer in layers)
    assert enable_sla2_qat(model) == 2 and all(layer.qat for layer in layers)
    assert disable_sla2_qat(model) == 2 and not any(layer.qat for layer in layers)
    assert all(m.qat for m in tiny_dit(sla2_enable_qat=True).modules()
               if isinstance(m, slattn.SparseLinearAttention2))
    with pytest.raises(ValueError, match="SparseLinearAttention2"):
        enable_sla2_qat(torch.nn.Linear(2, 2))


def test_statistics_and_config_log():
    model = tiny_dit()
    stats = get_sla2_statistics(model)
    assert set(stats) == {"blocks.1.attn.kernel", "blocks.2.attn.kernel"}
    assert stats["blocks.1.attn.kernel"]["density"] is None  # not run yet
    layer = model.blocks[2].attn.kernel
    with torch.no_grad():
        layer.alpha_logit.copy_(torch.tensor([0.0, 2.0]))
    model(*dit_batches(1)[0])
    stats = get_sla2_statistics(model)["blocks.2.attn.kernel"]
    assert stats["density"] == 0.25 and stats["sparsity"] == 0.75  # one of 4 key blocks per query block
    assert stats["alpha_min"] == pytest.approx(0.5)
    assert stats["alpha_max"] == pytest.approx(torch.sigmoid(torch.tensor(2.0)).item())
    assert stats["alpha_mean"] == pytest.approx((0.5 + stats["alpha_max"]) / 2)
    lines = []
    log_sla2_config(model, lines.append)
    assert len(lines) == 3 and "compression_ratio=2" in lines[0] and lines[-1] == "SLA2 layers: 2"


def test_training_package_does_not_import_lightning():
    code = ("import sys, slattn.training\n"
            "assert not any(m.split('.')[0] in ('lightning', 'pytorch_lightning') for m in sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_lightning_callbacks(tmp_path):
    lightning = pytest.importorskip("lightning")
    from slattn.training.lightning import RouterParameterScheduler as SchedulerCallback
    from slattn.training.lightning import SLA2QATCallback

    assert slattn.training.SLA2QATCallback is SLA2QATCallback

    class Module(lightning.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = tiny_dit()

        def training_step(self, batch, batch_idx):
            x, t, y = batch
            return self.model(x, t, y).square().mean() + sum(p.square().sum() for p in self.parameters()) * 1e-6

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=1e-3)

    batches = dit_batches(4)
    module = Module()
    trainer = lightning.Trainer(max_steps=4, accelerator="cpu", logger=False, enable_checkpointing=False,
                                enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                                callbacks=[SLA2QATCallback(log_every_n_steps=1), SchedulerCallback(4, 0.5, 0.25)])
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))
    layer = module.model.blocks[1].attn.kernel
    assert layer.topk == pytest.approx(0.5 + (0.25 - 0.5) * 3 / 4)  # set at the start of the last (4th) step
    assert "sla2/model.blocks.1.attn.kernel/density" in trainer.callback_metrics
    assert "sla2/model.blocks.2.attn.kernel/alpha_mean" in trainer.callback_metrics
