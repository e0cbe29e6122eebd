"""Finding the SLA2 layers of a model."""

from __future__ import annotations

from torch import nn

from ..sla2 import SparseLinearAttention2


def sla2_layers(model: nn.Module) -> dict[str, SparseLinearAttention2]:
    """Every SparseLinearAttention2 in `model` by module path ("" for the model itself)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    return {name: module for name, module in model.named_modules() if isinstance(module, SparseLinearAttention2)}


def require_sla2_layers(model: nn.Module) -> dict[str, SparseLinearAttention2]:
    layers = sla2_layers(model)
    if not layers:
        raise ValueError(f"model ({type(model).__name__}) holds no slattn.SparseLinearAttention2 layer")
    return layers
