"""Feature maps φ of the linear branch in PyTorch (SPEC section 3), and the
learnable hedgehog map as a module that owns its weight.

The SLA ops apply φ inside the core; this torch form serves the soft-mask
composite of SLA2 stage 1 (`soft_attention.py`) and callers who want φ(x)
itself, as the public reference's `feature_map_q(q)` gives it."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def feature_map(x: torch.Tensor, name: str, weight: torch.Tensor | None = None) -> torch.Tensor:
    """φ over the last dim; `weight` is hedgehog's W (D, D) as (out, in)."""
    if name == "softmax":
        return torch.softmax(x, dim=-1)
    if name == "elu":
        return F.elu(x) + 1
    if name == "relu":
        return torch.relu(x)
    if name == "hedgehog":
        pre = x @ weight.to(x.dtype).t()
        return torch.softmax(torch.cat([pre, -pre], dim=-1), dim=-1)
    raise ValueError(f"unknown feature map {name!r}")


class HedgehogFeatureMap(nn.Module):
    """φ(x) = softmax([x Wᵀ, −x Wᵀ]) over 2·head_dim features (arXiv 2402.04347).

    W is ``layer.weight``, an fp32 ``nn.Linear(head_dim, head_dim, bias=False)``
    weight initialised to the identity, so that an untrained map is
    softmax([x, −x]). Calling the module applies φ in the input's dtype."""

    def __init__(self, head_dim: int):
        super().__init__()
        self.layer = nn.Linear(head_dim, head_dim, bias=False, dtype=torch.float32)
        nn.init.eye_(self.layer.weight)

    @property
    def weight(self) -> torch.Tensor:
        return self.layer.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return feature_map(x, "hedgehog", self.weight)


def attach_feature_maps(module: nn.Module, feature_map_name: str, head_dim: int, tie: bool) -> None:
    """Gives an SLA module `feature_map_q` and `feature_map_k`, the public
    reference's attribute names: HedgehogFeatureMap modules for "hedgehog"
    (one shared when `tie`), None for the fixed maps.

    A tied `feature_map_k` is the same module kept out of the registered
    children, so the state dict holds the one W once
    (``feature_map_q.layer.weight``); untied adds ``feature_map_k.layer.weight``.
    Strict loading then tells a tied checkpoint from an untied one."""
    if feature_map_name != "hedgehog":
        module.feature_map_q = None
        module.feature_map_k = None
        return
    module.feature_map_q = HedgehogFeatureMap(head_dim)
    if tie:
        object.__setattr__(module, "feature_map_k", module.feature_map_q)
    else:
        module.feature_map_k = HedgehogFeatureMap(head_dim)


def feature_weights(module: nn.Module) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(W_q, W_k) for the SLA ops; W_k is None when tied (or for the fixed maps)."""
    if module.feature_map_q is None:
        return None, None
    tied = module.feature_map_k is module.feature_map_q
    return module.feature_map_q.weight, None if tied else module.feature_map_k.weight
