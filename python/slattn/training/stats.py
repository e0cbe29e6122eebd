"""What the SLA2 layers of a model are doing: density and α per layer."""

from __future__ import annotations

from typing import Callable

from torch import nn

from .layers import require_sla2_layers


def get_sla2_statistics(model: nn.Module) -> dict[str, dict]:
    """Per SLA2 layer (by module path): `density` measured on its last call
    (fraction of key blocks computed exactly; None before the first call),
    `sparsity` = 1 - density, the `topk` it routes with, its `routing` mode,
    and `alpha_mean`, `alpha_min`, `alpha_max` (None while α is unsized)."""
    stats = {}
    for name, layer in require_sla2_layers(model).items():
        sized = not layer.has_uninitialized_params()
        alpha = layer.alpha if sized else None
        density = layer.last_density
        stats[name] = {
            "density": density,
            "sparsity": None if density is None else 1.0 - density,
            "topk": layer.topk,
            "routing": layer.routing,
            "alpha_mean": float(alpha.mean()) if sized else None,
            "alpha_min": float(alpha.min()) if sized else None,
            "alpha_max": float(alpha.max()) if sized else None,
        }
    return stats


def log_sla2_config(model: nn.Module, print_fn: Callable[[str], object] = print) -> None:
    """One line per SLA2 layer with its settings, then a count."""
    layers = require_sla2_layers(model)
    for name, layer in layers.items():
        print_fn(f"{name or '<model>'}: {layer.extra_repr()}, "
                 f"router {tuple(layer.router.proj_q.weight.shape)} x 2, qat={layer.qat}")
    print_fn(f"SLA2 layers: {len(layers)}")
