"""`slattn finetune --preset smoke`: the whole study on the CPU, every variant,
and the pretrained checkpoint reused by a second run (the test CI runs in
about a minute or two; the smoke preset is sized for it)."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

from slattn.router import critical_count
from slattn.study import VARIANTS, get_preset, run_study


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("study")
    results = run_study("smoke", device="cpu", out_dir=out, progress=False, print_fn=lambda *_: None)
    return out, results


def test_smoke_study_writes_every_variant(first_run):
    out, results = first_run
    preset = get_preset("smoke")
    saved = json.loads((out / "results.json").read_text())
    assert saved == json.loads(json.dumps(results))
    assert list(saved["variants"]) == list(VARIANTS)
    assert saved["pretrain"]["reused"] is False and len(saved["pretrain"]["losses"]) == preset.pretrain_steps
    key_blocks = preset.tokens // preset.block_k
    expected_density = {"full": 1.0, "linear-only": 0.0,
                        "sla": critical_count(preset.sla_topk, key_blocks) / key_blocks,
                        "sparse-only": critical_count(preset.sla_topk, key_blocks) / key_blocks,
                        "l+s": critical_count(preset.sla_topk, key_blocks) / key_blocks,
                        "sla2": critical_count(preset.sla2_topk, key_blocks) / key_blocks}
    expected_density["sla2-qat"] = expected_density["sla2"]
    for name, r in saved["variants"].items():
        assert r["status"] == "ran", name
        assert list(r["val_loss"]) == [f"t={t:g}" for t in preset.eval_timesteps], name
        assert all(math.isfinite(x) and x > 0 for x in [*r["val_loss"].values(), r["rfvd"], r["step_seconds"]]), name
        assert len(r["train_losses"]) == preset.finetune_steps, name
        assert 1 - r["sparsity"] == pytest.approx(expected_density[name]), name
        assert 0 < r["attention_flops"]["fraction_of_full"] <= 1, name
    # Fewer exact blocks, fewer FLOPs: the sparse variants cost a fraction of full attention.
    flops = {name: r["attention_flops"]["total"] for name, r in saved["variants"].items() if r["status"] == "ran"}
    assert flops["sparse-only"] < flops["l+s"] < flops["sla"] < flops["full"]
    stage1 = saved["variants"]["sla2"]["stage1"]
    assert len(stage1) == preset.depth and all(s["mse_after"] <= s["mse_before"] for s in stage1.values())


def test_sla2_qat_trains_with_the_low_bit_branch(first_run):
    """sla2-qat repeats sla2 (same router distillation, batches and noise) with the low-bit sparse branch:
    the same routing, other losses."""
    out, results = first_run
    qat, sla2 = results["variants"]["sla2-qat"], results["variants"]["sla2"]
    assert qat["sparsity"] == sla2["sparsity"]
    assert qat["train_losses"] != sla2["train_losses"]
    report = (out / "report.md").read_text()
    for name in VARIANTS:
        assert f"| {name} |" in report


def test_low_bit_variant_is_not_run_on_gpus_without_low_bit_kernels(monkeypatch):
    """On a GPU without the low-bit kernels (faked) sla2-qat would train unquantized: the study refuses it,
    and the runner reports the reason instead of a result."""
    from slattn.models import DiT
    from slattn.study import variants

    preset = get_preset("smoke")
    monkeypatch.setattr(variants, "runs_low_bit", lambda device: False)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 6))
    with pytest.raises(NotImplementedError, match="Hopper.*8.6"):
        variants.install_kernels(DiT(preset.dit_options()), VARIANTS["sla2-qat"], preset)


def test_smoke_study_writes_plots(first_run):
    out, _ = first_run
    for name in ("loss_curves.png", "samples.png"):
        assert (out / name).stat().st_size > 10_000, name


def test_second_run_reuses_the_pretrained_checkpoint(first_run):
    out, first = first_run
    checkpoint = first["pretrain"]["checkpoint"]
    assert os.path.dirname(checkpoint) == str(out / "cache")
    written = os.stat(checkpoint).st_mtime_ns
    # Fine-tuning settings are not part of the pretraining recipe: the checkpoint still serves.
    again = run_study("smoke", device="cpu", out_dir=out / "again", cache_dir=out / "cache", variants=["full"],
                      finetune_steps=2, progress=False, print_fn=lambda *_: None)
    assert again["pretrain"]["reused"] is True and again["pretrain"]["checkpoint"] == checkpoint
    assert os.stat(checkpoint).st_mtime_ns == written
    assert again["pretrain"]["losses"] == first["pretrain"]["losses"]
    # The same weights: the same validation loss, to the last bit (fixed noise, same clips).
    assert again["pretrain"]["val_loss"] == first["pretrain"]["val_loss"]
    assert list(again["variants"]) == ["full"]
    payload = torch.load(checkpoint, weights_only=True)  # a plain tensor file: loads without pickled code
    assert payload["recipe"]["pretrain_steps"] == get_preset("smoke").pretrain_steps
