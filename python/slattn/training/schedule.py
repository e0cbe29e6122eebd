"""A topk schedule for SLA2 training, usable from any training loop."""

from __future__ import annotations

from torch import nn

from .._checks import check_fractions
from .layers import require_sla2_layers


class RouterParameterScheduler:
    """topk goes linearly from `initial_topk_ratio` at step 0 to
    `final_topk_ratio` at `router_warmup_steps`, and stays there: the router
    starts on an easier (denser) routing and ends on the target sparsity.

    `apply(model, step)` sets it on every SLA2 layer of the model, e.g. at the
    start of each optimisation step. For PyTorch Lightning use
    `slattn.training.lightning.RouterParameterScheduler`."""

    def __init__(self, router_warmup_steps: int = 5000, initial_topk_ratio: float = 0.25,
                 final_topk_ratio: float = 0.10):
        if isinstance(router_warmup_steps, bool) or not isinstance(router_warmup_steps, int) or router_warmup_steps < 0:
            raise ValueError(f"router_warmup_steps must be a non-negative integer, got {router_warmup_steps!r}")
        for name, value in (("initial_topk_ratio", initial_topk_ratio), ("final_topk_ratio", final_topk_ratio)):
            try:
                check_fractions(value, 0.0)
            except ValueError:
                raise ValueError(f"{name} must be a number in (0, 1], got {value!r}") from None
        self.router_warmup_steps = router_warmup_steps
        self.initial_topk_ratio = float(initial_topk_ratio)
        self.final_topk_ratio = float(final_topk_ratio)

    def topk_at(self, step: int) -> float:
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be a non-negative integer, got {step!r}")
        if step >= self.router_warmup_steps:
            return self.final_topk_ratio
        progress = step / self.router_warmup_steps
        return self.initial_topk_ratio + (self.final_topk_ratio - self.initial_topk_ratio) * progress

    def apply(self, model: nn.Module, step: int) -> float:
        """Sets topk_at(step) on every SLA2 layer of `model`; returns it."""
        topk = self.topk_at(step)
        for layer in require_sla2_layers(model).values():
            layer.topk = topk
        return topk
