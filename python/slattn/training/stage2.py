"""Stage 2 of SLA2 training: end-to-end fine-tuning with hard top-k routing
and the routers frozen (the routers learned in stage 1 stay as they are)."""

from __future__ import annotations

from torch import nn

from .layers import require_sla2_layers


def prepare_stage2(model: nn.Module, *, topk: float | None = None, train_alpha: bool = True) -> list[nn.Parameter]:
    """Sets every SLA2 layer to hard routing (at `topk` if given), freezes its
    router (and α unless train_alpha), and returns the parameters of `model`
    that still require gradients, for the optimizer."""
    for layer in require_sla2_layers(model).values():
        layer.set_routing("hard")
        if topk is not None:
            layer.topk = topk
        layer.router.requires_grad_(False)
        if not layer.has_uninitialized_params():
            layer.alpha_logit.requires_grad_(train_alpha)
        elif not train_alpha:
            raise ValueError("train_alpha=False needs α sized: run the model once or give the layers num_heads")
    return [p for p in model.parameters() if p.requires_grad]
