"""The pretrained full-attention checkpoint, cached: trained once per recipe and
reused by every later run (pretraining is most of the study's time).

The file name carries a hash of everything that determines the weights (data,
model, pretraining settings, seed, device type); the file repeats the recipe and
is checked against it on load. Written atomically (a crash leaves no half
file), read with torch.load(weights_only=True) (no pickled code runs)."""

from __future__ import annotations

import hashlib
import json
import os
import pickle

import torch

from ..checkpoint import atomic_write
from .presets import StudyPreset

FORMAT = 1
# The preset fields that determine the pretrained weights.
RECIPE_FIELDS = ("frames", "height", "width", "train_clips", "patch_size", "temporal_patch_size", "hidden_size",
                 "depth", "num_heads", "batch_size", "pretrain_steps", "pretrain_lr", "seed")


def recipe(preset: StudyPreset, device: torch.device) -> dict:
    return {"format": FORMAT, "device_type": device.type, **{name: getattr(preset, name) for name in RECIPE_FIELDS}}


def checkpoint_path(cache_dir, preset: StudyPreset, device: torch.device) -> str:
    digest = hashlib.sha256(json.dumps(recipe(preset, device), sort_keys=True).encode()).hexdigest()[:16]
    return os.path.join(os.fspath(cache_dir), f"pretrain-{preset.name}-{digest}.pt")


def load(path: str, expected_recipe: dict) -> dict | None:
    """The cached payload ({"state", "losses", "step_seconds", "recipe"}), or None when there is no file.
    ValueError for a file that cannot be read safely or was made by another recipe."""
    if not os.path.isfile(path):
        return None
    try:
        payload = torch.load(path, weights_only=True, map_location="cpu")
    except (pickle.UnpicklingError, RuntimeError, EOFError) as error:
        raise ValueError(f"pretrain checkpoint {path} is corrupt or not a plain tensor file (not loaded: {error}); "
                         f"delete it to pretrain again") from None
    if not isinstance(payload, dict) or payload.get("recipe") != expected_recipe:
        raise ValueError(f"pretrain checkpoint {path} was not made by this recipe; delete it to pretrain again")
    return payload


def save(path: str, state: dict, losses: list[float], step_seconds: float, recipe_: dict) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    payload = {"recipe": recipe_, "state": {k: v.detach().cpu() for k, v in state.items()}, "losses": losses,
               "step_seconds": step_seconds}
    atomic_write(path, lambda f: torch.save(payload, f))
