"""The study's sample-quality metric (rFVD) and its attention FLOP counts."""

from __future__ import annotations

import pytest
import torch

from slattn.study import MovingShapes, QualityMetric, RandomVideoFeatures, frechet_distance, get_preset
from slattn.study.variants import VARIANTS, attention_flops


def test_frechet_distance_of_gaussians():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(4000, 3, generator=gen, dtype=torch.float64)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)
    # N(μ, I) against N(0, 4I): |μ|² + 3 (1 + 4 - 2·2) = |μ|² + 3.
    b = 2 * torch.randn(4000, 3, generator=gen, dtype=torch.float64) + torch.tensor([1.0, 0.0, 0.0])
    assert frechet_distance(a, b) == pytest.approx(1.0 + 3.0, rel=0.1)
    with pytest.raises(ValueError, match="feature sets"):
        frechet_distance(a[:, :2], b)


def test_rfvd_ranks_real_clips_above_damaged_ones():
    """Held-out real clips sit closest to the reference; losing the motion (a frozen frame, shuffled frames)
    or the detail (noise, blur) moves the distance up: what the metric must see in generated video."""
    data = MovingShapes(frames=8, height=32, width=32)
    metric = QualityMetric(data.clips("val", 48))
    real = data.clips("holdout", 48)
    score = metric(real)
    damaged = {
        "frozen": real[:, :, :1].expand_as(real).contiguous(),
        "shuffled frames": real[:, :, torch.randperm(8, generator=torch.Generator().manual_seed(0))],
        "noisy": (real + 0.2 * torch.randn(real.shape, generator=torch.Generator().manual_seed(1))).clamp(-1, 1),
        "blurred": torch.nn.functional.avg_pool3d(real, (1, 5, 5), stride=1, padding=(0, 2, 2)),
    }
    for name, clips in damaged.items():
        assert metric(clips) > 2 * score, name


def test_features_are_fixed_and_checked():
    clips = MovingShapes(frames=3, height=8, width=8).clips("val", 2)
    torch.testing.assert_close(RandomVideoFeatures()(clips), RandomVideoFeatures()(clips), rtol=0, atol=0)
    with pytest.raises(ValueError, match="clips must be"):
        RandomVideoFeatures()(clips[:, :, :1])


def test_attention_flops_follow_the_density_and_the_linear_branch():
    p = get_preset("gpu")
    tokens, heads, dim, depth = 8192, 6, 64, 8
    dense = 4 * heads * tokens ** 2 * dim * depth
    assert attention_flops(VARIANTS["full"], p, 1.0)["total"] == dense
    density = 6 / 128
    sparse = attention_flops(VARIANTS["sparse-only"], p, density)
    assert sparse["total"] == pytest.approx(density * dense) and sparse["linear"] == 0
    sla = attention_flops(VARIANTS["sla"], p, density)  # + key states, query products and the projection
    assert sla["linear"] == pytest.approx(6 * heads * tokens * dim ** 2 * depth)
    assert sla["fraction_of_full"] == pytest.approx(density + 6 * dim / (4 * tokens))
    assert attention_flops(VARIANTS["linear-only"], p, 0.0)["exact"] == 0
