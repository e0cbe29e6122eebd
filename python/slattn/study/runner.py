"""`run_study`: pretrain (or reuse) a full-attention video DiT, fine-tune a copy
per variant on the same batches, evaluate each the same way, and write the
report (results.json, report.md, loss_curves.png, samples.png)."""

from __future__ import annotations

import copy
import json
import os
import time

import torch
from tqdm import tqdm

from ..bench import environment
from ..checkpoint import atomic_write
from ..demo import pick_device
from ..models import DiT
from ..training import RouterDistiller, prepare_stage2
from . import cache, report
from .data import MovingShapes
from .diffusion import TIME_SCALE, autocast, noisy, sample, validation_losses
from .presets import StudyPreset, get_preset
from .quality import QualityMetric
from .training import train
from .variants import VARIANTS, Variant, attention_flops, check_variant_names, install_kernels, measured_density, \
    target_topk

# Seed offsets of the study's random streams (all derived from the preset's seed).
FINETUNE_STREAM, VALIDATION_STREAM, SAMPLE_STREAM, DISTILL_STREAM = 1, 100, 200, 300
DISTILL_LR = 1e-3


def _resolve_preset(preset, overrides: dict) -> StudyPreset:
    if isinstance(preset, str):
        preset = get_preset(preset)
    elif not isinstance(preset, StudyPreset):
        raise ValueError(f"preset must be a preset name or a StudyPreset, got {type(preset).__name__}")
    return preset.replace(**overrides) if overrides else preset


def nominal_sparsity(variant: Variant, preset: StudyPreset) -> float:
    """1 - topk for the routed variants; 0 for full attention, 1 for linear attention (nothing exact)."""
    topk = target_topk(variant, preset)
    if topk is None:
        return 0.0 if variant.name == "full" else 1.0
    return 1.0 - topk


class _Study:
    def __init__(self, preset: StudyPreset, device: torch.device, progress: bool, print_fn):
        self.preset, self.device, self.progress, self.print = preset, device, progress, print_fn
        data = MovingShapes(preset.frames, preset.height, preset.width, seed=preset.seed)
        self.train_clips = data.clips("train", preset.train_clips, device=device, progress=progress)
        self.val_clips = data.clips("val", preset.val_clips, device=device, progress=progress)
        self.quality = QualityMetric(self.val_clips)
        self.real_floor = self.quality(data.clips("holdout", preset.sample_count, device=device))
        self.eval_batch = 2 * preset.batch_size  # no activations kept: twice the training batch fits

    def evaluate(self, model) -> dict:
        """Validation losses, measured density, samples and their rFVD."""
        p = self.preset
        losses = validation_losses(model, self.val_clips, p.eval_timesteps, batch_size=self.eval_batch,
                                   seed=p.seed + VALIDATION_STREAM, progress=self.progress)
        density = measured_density(model)  # on the last validation batch
        samples = sample(model, p.sample_count, self.train_clips.shape[1:], steps=p.sample_steps,
                         batch_size=self.eval_batch, seed=p.seed + SAMPLE_STREAM, device=self.device,
                         progress=self.progress)
        return {"val_loss": losses, "val_loss_mean": sum(losses.values()) / len(losses), "density": density,
                "rfvd": self.quality(samples), "samples": samples[:report.SAMPLES_SHOWN].cpu()}

    # ------------------------------------------------------------ pretraining
    def pretrained(self, cache_dir) -> tuple[DiT, dict]:
        p = self.preset
        torch.manual_seed(p.seed)  # the DiT's initial weights
        model = DiT(p.dit_options()).to(self.device)
        expected = cache.recipe(p, self.device)
        path = cache.checkpoint_path(cache_dir, p, self.device)
        payload = cache.load(path, expected)
        reused = payload is not None
        if not reused:
            log = train(model, self.train_clips, steps=p.pretrain_steps, batch_size=p.batch_size, lr=p.pretrain_lr,
                        seed=p.seed, desc="pretraining (full attention)", progress=self.progress)
            cache.save(path, model.state_dict(), log.losses, log.step_seconds, expected)
            payload = {"losses": log.losses, "step_seconds": log.step_seconds}
            self.print(f"pretrained for {p.pretrain_steps} steps; checkpoint written to {path}")
        else:
            model.load_state_dict(payload["state"])
            self.print(f"reusing the pretrained checkpoint {path} (no pretraining)")
        info = {"checkpoint": path, "reused": reused, "losses": payload["losses"],
                "step_seconds": payload["step_seconds"]}
        return model, info

    # ------------------------------------------------------------ variants
    def run_variant(self, base: DiT, variant: Variant) -> dict:
        p = self.preset
        started = time.perf_counter()
        result = {"description": variant.description, "target_topk": target_topk(variant, p),
                  "target_sparsity": nominal_sparsity(variant, p)}
        model = copy.deepcopy(base)
        try:
            install_kernels(model, variant, p)
        except NotImplementedError as error:
            return {**result, "status": "not run", "reason": str(error)}
        before = validation_losses(model, self.val_clips, p.eval_timesteps, batch_size=self.eval_batch,
                                   seed=p.seed + VALIDATION_STREAM, progress=self.progress)
        params = None
        if variant.sla2:
            result["stage1"] = self.distill(model)
            params = prepare_stage2(model)
        log = train(model, self.train_clips, steps=p.finetune_steps, batch_size=p.batch_size, lr=p.finetune_lr,
                    seed=p.seed + FINETUNE_STREAM, params=params, desc=f"fine-tuning {variant.name}",
                    progress=self.progress)
        evaluation = self.evaluate(model)
        density = evaluation["density"]
        result.update(status="ran", val_loss_before=before, val_loss_before_mean=sum(before.values()) / len(before),
                      train_losses=log.losses, step_seconds=log.step_seconds,
                      attention_flops=attention_flops(variant, p, density),
                      sparsity=None if density is None else 1.0 - density, **evaluation)
        result["seconds"] = time.perf_counter() - started
        return result

    def distill(self, model) -> dict:
        """SLA2 stage 1: capture every layer's full-attention inputs and outputs on
        training clips at timesteps spread over (0, 1), then distil the routers."""
        p = self.preset
        gen = torch.Generator().manual_seed(p.seed + DISTILL_STREAM)
        batches = []
        for i in range(p.distill_batches):
            index = torch.randint(len(self.train_clips), (p.distill_batch_size,), generator=gen)
            x0 = self.train_clips[index.to(self.device)]
            noise = torch.randn(x0.shape, generator=gen).to(self.device)
            t = torch.full((len(x0),), (i + 0.5) / p.distill_batches, device=self.device)
            batches.append((noisy(x0, noise, t), TIME_SCALE * t))
        distiller = RouterDistiller(model)
        with autocast(self.device):  # the layers see what they see in training
            distiller.capture(batches, progress=self.progress)
        reports = distiller.distill(p.sla2_topk, steps=p.distill_steps, lr=DISTILL_LR,
                                    eval_every=max(1, p.distill_steps // 4), progress=self.progress)
        return {name: vars(r) for name, r in reports.items()}


def run_study(preset="smoke", *, device: str = "auto", out_dir="slattn-results/finetune", cache_dir=None,
              variants=None, progress: bool = True, print_fn=print, **overrides) -> dict:
    """Runs the fine-tuning study and writes its report to `out_dir`; returns the results.

    preset: "smoke" or "gpu" (slattn.study.PRESETS) or a StudyPreset; keyword
    `overrides` change its fields (e.g. finetune_steps=1000). variants: names
    from slattn.study.VARIANTS (default: all). cache_dir holds the pretrained
    checkpoint (default: out_dir/cache), reused whenever the recipe matches."""
    started = time.perf_counter()
    preset = _resolve_preset(preset, overrides)
    names = check_variant_names(list(VARIANTS) if variants is None else variants)
    dev = pick_device(device)
    out_dir = os.fspath(out_dir)
    cache_dir = os.path.join(out_dir, "cache") if cache_dir is None else os.fspath(cache_dir)
    print_fn(f"slattn finetune: preset {preset.name!r}, {preset.tokens} tokens per clip "
             f"({preset.frames} frames of {preset.height}x{preset.width}), variants {', '.join(names)}, on {dev}")

    study = _Study(preset, dev, progress, print_fn)
    base, pretrain = study.pretrained(cache_dir)
    base_eval = study.evaluate(base)
    sample_rows = {"real (held-out)": study.val_clips[:report.SAMPLES_SHOWN].cpu(),
                   "pretrained": base_eval.pop("samples")}
    results = {"preset": preset.to_dict(), "tokens": preset.tokens, "device": str(dev),
               "environment": environment(dev), "pretrain": {**pretrain, **base_eval},
               "quality": {"metric": "rFVD: Fréchet distance of random spatio-temporal conv features "
                                     "(slattn.study.quality), generated vs held-out real clips",
                           "reference_clips": preset.val_clips, "generated_clips": preset.sample_count,
                           "real_floor": study.real_floor},
               "variants": {}}
    for name in tqdm(names, desc="variants", disable=not progress):
        result = study.run_variant(base, VARIANTS[name])
        if "samples" in result:
            sample_rows[name] = result.pop("samples")
        results["variants"][name] = result
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    results["wall_seconds"] = time.perf_counter() - started
    _write(results, sample_rows, out_dir, print_fn)
    return results


def _write(results: dict, sample_rows: dict, out_dir: str, print_fn) -> None:
    os.makedirs(out_dir, exist_ok=True)
    text = report.tables(results)
    print_fn(text)
    payload = json.dumps(results, indent=2).encode()
    atomic_write(os.path.join(out_dir, "results.json"), lambda f: f.write(payload))
    atomic_write(os.path.join(out_dir, "report.md"), lambda f: f.write((text + "\n").encode()))
    plotted = report.plot_losses(results, os.path.join(out_dir, "loss_curves.png")) \
        and report.plot_samples(sample_rows, os.path.join(out_dir, "samples.png"))
    written = "results.json, report.md" + (", loss_curves.png, samples.png" if plotted else
                                           " (install matplotlib, or slattn[bench], for the plots)")
    print_fn(f"wrote {written} to {out_dir} in {results['wall_seconds']:.0f} s")
