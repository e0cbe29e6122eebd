"""slattn.study's moving-shapes video dataset: deterministic, and with motion."""

from __future__ import annotations

import pytest
import torch

from slattn.study import MovingShapes


def _frame_correlation(clips: torch.Tensor, a: int, b: int) -> float:
    """Mean over clips of the Pearson correlation between frames a and b."""
    x, y = clips[:, :, a].flatten(1), clips[:, :, b].flatten(1)
    x, y = x - x.mean(1, keepdim=True), y - y.mean(1, keepdim=True)
    return float(((x * y).sum(1) / (x.norm(dim=1) * y.norm(dim=1))).mean())


def test_clips_are_deterministic_and_independent_of_what_else_is_drawn():
    data = MovingShapes(frames=6, height=24, width=24, seed=3)
    clips = data.clips("train", 5)
    assert clips.shape == (5, 3, 6, 24, 24) and clips.dtype == torch.float32
    assert clips.min() >= -1 and clips.max() <= 1
    torch.testing.assert_close(MovingShapes(frames=6, height=24, width=24, seed=3).clips("train", 5), clips,
                               rtol=0, atol=0)
    # Clip i is clip i however many are drawn, and from wherever the draw starts.
    torch.testing.assert_close(data.clips("train", 2, start=3), clips[3:5], rtol=0, atol=0)
    assert not torch.equal(MovingShapes(frames=6, height=24, width=24, seed=4).clips("train", 1), clips[:1])
    # The splits are disjoint draws, and the clips of a split differ from one another.
    assert not torch.equal(data.clips("val", 1), clips[:1])
    assert not torch.equal(data.clips("holdout", 1), data.clips("val", 1))
    assert not torch.equal(clips[0], clips[1])


def test_clips_move_and_nearby_frames_correlate_more_than_distant_ones():
    frames = 12
    clips = MovingShapes(frames=frames, height=32, width=32).clips("train", 16)
    steps = (clips[:, :, 1:] - clips[:, :, :-1]).abs().mean(dim=(1, 3, 4))  # (clips, frames - 1)
    assert bool((steps > 1e-3).all()), "every clip changes between every pair of consecutive frames"
    correlations = [_frame_correlation(clips, 0, lag) for lag in (1, 3, frames - 1)]
    # Continuous motion: frame 0 resembles frame 1 more than frame 3, and frame 3 more than the last frame.
    assert correlations[0] > correlations[1] > correlations[2], correlations
    assert correlations[0] > 0.6 and correlations[2] < correlations[0] - 0.2, correlations


def test_clips_have_spatial_structure_not_noise():
    clips = MovingShapes(frames=2, height=32, width=32).clips("val", 8)
    order = torch.randperm(32 * 32, generator=torch.Generator().manual_seed(0))
    shuffled = clips.flatten(3)[..., order].view_as(clips)  # the same pixel values, no spatial structure

    def neighbour_difference(x):
        return float((x[..., 1:] - x[..., :-1]).abs().mean())

    # Neighbouring pixels are close (smooth shapes and backgrounds), unlike those of the shuffled frames.
    assert neighbour_difference(clips) < 0.5 * neighbour_difference(shuffled)


@pytest.mark.parametrize("kwargs, name", [({"frames": 0}, "frames"), ({"height": 2.5}, "height"),
                                          ({"max_shapes": 1}, "max_shapes"), ({"seed": -1}, "seed")])
def test_bad_dataset_arguments_are_named(kwargs, name):
    with pytest.raises(ValueError, match=name):
        MovingShapes(**{"frames": 4, "height": 8, "width": 8, **kwargs})


def test_bad_draws_are_named():
    data = MovingShapes(frames=2, height=8, width=8)
    with pytest.raises(ValueError, match="split"):
        data.clips("test", 1)
    with pytest.raises(ValueError, match="count"):
        data.clips("train", 0)
    with pytest.raises(ValueError, match="start"):
        data.clips("train", 1, start=-1)
