"""Sizes of the fine-tuning study: `smoke` (the whole pipeline on a CPU in CI)
and `gpu` (the claim, on one H100). Every field is checked on construction."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .._checks import check_fractions


@dataclass(frozen=True)
class StudyPreset:
    name: str
    # Data: clips of (3, frames, height, width) pixels in [-1, 1].
    frames: int
    height: int
    width: int
    train_clips: int
    val_clips: int
    # Model: the reference DiT on pixels, JiT-style.
    patch_size: int
    temporal_patch_size: int
    hidden_size: int
    depth: int
    num_heads: int
    block_q: int
    block_k: int
    # Training: AdamW, the same batches and noise for every variant.
    batch_size: int
    pretrain_steps: int
    pretrain_lr: float
    finetune_steps: int
    finetune_lr: float
    # SLA2 stage 1: captured batches (clips each, at spread timesteps) and router steps per layer.
    distill_batches: int
    distill_batch_size: int
    distill_steps: int
    # Evaluation.
    eval_timesteps: tuple[float, ...]
    sample_count: int
    sample_steps: int
    sla_topk: float = 0.05
    sla2_topk: float = 0.03
    sla2_compression_ratio: int = 4
    seed: int = 0
    # Estimated seconds per stage on the preset's target machine (a plan, not a measurement).
    budget_seconds: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        integers = ("frames", "height", "width", "train_clips", "val_clips", "patch_size", "temporal_patch_size",
                    "hidden_size", "depth", "num_heads", "block_q", "block_k", "batch_size", "pretrain_steps",
                    "finetune_steps", "distill_batches", "distill_batch_size", "distill_steps", "sample_count",
                    "sample_steps", "sla2_compression_ratio")
        for name in integers:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"study preset: {name} must be a positive integer, got {value!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"study preset: seed must be a non-negative integer, got {self.seed!r}")
        for name in ("pretrain_lr", "finetune_lr"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"study preset: {name} must be a positive number, got {value!r}")
        for name in ("sla_topk", "sla2_topk"):
            try:
                check_fractions(getattr(self, name), 0.0)
            except ValueError:
                raise ValueError(f"study preset: {name} must be a number in (0, 1], got {getattr(self, name)!r}"
                                 ) from None
        times = tuple(self.eval_timesteps)
        if not times or any(isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 < t < 1 for t in times):
            raise ValueError(f"study preset: eval_timesteps must be numbers in (0, 1), got {self.eval_timesteps!r}")
        object.__setattr__(self, "eval_timesteps", times)
        if self.sample_count < 2 or self.val_clips < 2:
            raise ValueError("study preset: sample_count and val_clips must be at least 2 (the quality metric "
                             "compares feature covariances)")

    @property
    def tokens(self) -> int:
        return (self.frames // self.temporal_patch_size) * (self.height // self.patch_size) \
            * (self.width // self.patch_size)

    def dit_options(self) -> dict:
        """The slattn.models.DiT options of the study's model (full attention; variants swap the kernels)."""
        return {"input_size": (self.frames, self.height, self.width), "in_channels": 3,
                "patch_size": self.patch_size, "temporal_patch_size": self.temporal_patch_size,
                "hidden_size": self.hidden_size, "depth": self.depth, "num_heads": self.num_heads,
                "attention": "full", "block_q": self.block_q, "block_k": self.block_k}

    def replace(self, **changes) -> "StudyPreset":
        """A copy with fields changed (checked again); unknown names raise ValueError."""
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise ValueError(f"study preset: unknown field(s) {', '.join(unknown)}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


PRESETS = {
    # Everything, tiny: 256 tokens (4 x 8 x 8), blocks of 16, so every variant routes, trains and samples
    # on two CPU cores within CI's three minutes. It checks the pipeline; its numbers claim nothing.
    "smoke": StudyPreset(
        name="smoke", frames=4, height=16, width=16, train_clips=32, val_clips=8,
        patch_size=2, temporal_patch_size=1, hidden_size=64, depth=2, num_heads=2, block_q=16, block_k=16,
        batch_size=4, pretrain_steps=30, pretrain_lr=1e-3, finetune_steps=6, finetune_lr=3e-4,
        distill_batches=2, distill_batch_size=2, distill_steps=6, eval_timesteps=(0.25, 0.5, 0.75),
        sample_count=4, sample_steps=4, sla2_compression_ratio=2,
        budget_seconds={"pretrain": 10, "per variant": 10}),
    # The claim: 16 frames of 64 x 64 pixels in (2, 2, 2) patches, 8 x 32 x 32 = 8192 tokens, so that with
    # 64 x 64 blocks each query block picks from 128 key blocks: topk 0.05 keeps 6 (95.3% sparse), 0.03
    # keeps 3 (97.7%). Head dim 64, bf16 on one H100. The budget is the wall time measured on one H100
    # 80GB HBM3 on 2026-11-24 (docs/quality.md), rounded to 10 s, each variant with its evaluation; all
    # SLA kernels, forward and backward, run on tensor cores.
    "gpu": StudyPreset(
        name="gpu", frames=16, height=64, width=64, train_clips=1024, val_clips=128,
        patch_size=2, temporal_patch_size=2, hidden_size=384, depth=8, num_heads=6, block_q=64, block_k=64,
        batch_size=8, pretrain_steps=2000, pretrain_lr=3e-4, finetune_steps=400, finetune_lr=1e-4,
        distill_batches=8, distill_batch_size=2, distill_steps=100, eval_timesteps=(0.1, 0.3, 0.5, 0.7, 0.9),
        sample_count=128, sample_steps=25,
        budget_seconds={"pretrain (once, cached)": 210, "full": 60, "sla": 50, "sparse only": 50,
                        "linear only": 50, "L+S": 50, "sla2 (stage 1 + 2)": 120, "sla2 + QAT": 130}),
}


def get_preset(name) -> StudyPreset:
    if name not in PRESETS:
        raise ValueError(f"preset must be one of {', '.join(map(repr, PRESETS))}, got {name!r}")
    return PRESETS[name]
