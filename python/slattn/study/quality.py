"""Sample quality without downloaded weights: a Fréchet distance between
generated and held-out real clips in a random spatio-temporal feature space
("random-feature FVD", rFVD).

Why it means something. FVD compares Gaussian fits (mean and covariance) of
clip features, so it sees both fidelity and diversity; what it needs from the
features is that they respond to the structure that matters. Here the features
are fixed random 3-D convolutions (3 frames x 3 x 3 pixels, Gaussian weights
drawn from a fixed seed, no training) followed by ReLU and a mean over the
clip, at two spatial scales, applied to the clip and to its frame-to-frame
difference. Random convolutional features are sensitive to local colour, edges
and texture (random filters span the space of local patterns); the ones on the
temporal difference see nothing in a static clip and respond to moving edges,
so wrong, frozen or flickering motion moves the distance as well as wrong
appearance. Features are standardised by the real clips' spread so that no
feature dominates by scale. Reported beside it: the same distance between two
disjoint sets of real clips of the generated set's size (the floor that the
finite sample size leaves), so a number can be read against it."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .data import CHANNELS

FEATURE_SEED = 20240917
FILTERS = 16  # per (input, scale): 4 x 16 = 64 features


class RandomVideoFeatures:
    """Fixed random features of clips (N, 3, T, H, W) -> (N, 4·FILTERS) float64."""

    def __init__(self, filters: int = FILTERS, seed: int = FEATURE_SEED):
        gen = torch.Generator().manual_seed(seed)
        self.weights = []
        for _ in range(2):  # one filter bank for clips, one for their temporal differences
            w = torch.randn(filters, CHANNELS, 3, 3, 3, generator=gen)
            w = w - w.mean(dim=(1, 2, 3, 4), keepdim=True)  # zero mean: responds to structure, not brightness
            self.weights.append(w / w.flatten(1).norm(dim=1).view(-1, 1, 1, 1, 1))
        self.biases = [0.1 * torch.randn(filters, generator=gen) for _ in range(2)]

    def __call__(self, clips: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
        if clips.dim() != 5 or clips.shape[1] != CHANNELS or clips.shape[2] < 2:
            raise ValueError(f"clips must be (N, {CHANNELS}, T >= 2, H, W), got {tuple(clips.shape)}")
        out = [self._features(clips[i:i + batch_size].float()) for i in range(0, len(clips), batch_size)]
        return torch.cat(out).double().cpu()

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        inputs = (x, x[:, :, 1:] - x[:, :, :-1])
        parts = []
        for source, w, b in zip(inputs, self.weights, self.biases):
            w, b = w.to(x.device), b.to(x.device)
            for scale in (1, 2):
                y = source if scale == 1 else F.avg_pool3d(source, (1, scale, scale), ceil_mode=True)
                parts.append(F.relu(F.conv3d(y, w, b, padding=1)).mean(dim=(2, 3, 4)))
        return torch.cat(parts, dim=1)


def _sqrtm_psd(m: torch.Tensor) -> torch.Tensor:
    values, vectors = torch.linalg.eigh(m)
    return vectors @ torch.diag(values.clamp(min=0).sqrt()) @ vectors.T


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """||μa - μb||² + tr(Σa + Σb - 2 (Σa^½ Σb Σa^½)^½) of two feature sets (N, F)."""
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
        raise ValueError(f"feature sets must be (N >= 2, F) with the same F, got {tuple(a.shape)} and "
                         f"{tuple(b.shape)}")
    a, b = a.double(), b.double()
    mean = (a.mean(0) - b.mean(0)).square().sum()
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    root = _sqrtm_psd(cov_a)
    cross = torch.linalg.eigvalsh(root @ cov_b @ root).clamp(min=0).sqrt().sum()
    return float(mean + cov_a.trace() + cov_b.trace() - 2 * cross)


class QualityMetric:
    """rFVD against a fixed set of real reference clips."""

    def __init__(self, reference: torch.Tensor):
        self.features = RandomVideoFeatures()
        real = self.features(reference)
        self.scale = real.std(dim=0).clamp(min=1e-6)
        self.reference = real / self.scale

    def __call__(self, clips: torch.Tensor) -> float:
        return frechet_distance(self.features(clips) / self.scale, self.reference)
