"""SLA inside diffusers models, through their attention processors.

`apply_sla(transformer, config)` wraps the processor of each selected
attention module (for `WanTransformer3DModel`, the self-attention `attn1` of
every block; cross-attention stays dense) in an `SLAProcessor`: an
`nn.Module` that holds that layer's SLA state, so the weights land in the
model's `state_dict()` as `<module>.processor.sla_attention.proj_l.*`, and
that runs the original processor with its SDPA calls served by SLA. Any
processor that reaches attention through diffusers' dispatch with the native
backend (or through `F.scaled_dot_product_attention`) works this way; a
processor whose backend bypasses PyTorch's SDPA is reported once.
`remove_sla` restores the original processors.

diffusers is an optional dependency (`pip install slattn[diffusers]`).
"""

from __future__ import annotations

import contextlib
import logging
from typing import Callable

from torch import nn

from ..module import SparseLinearAttention
from .sdpa import SLAController

logger = logging.getLogger("slattn")


class SLAProcessor(nn.Module):
    """An attention processor that runs `original` with SLA serving its SDPA calls."""

    # diffusers' enable_parallelism hands its context-parallel config to the processors that have
    # this attribute; having it lets a plain SLA processor see, and refuse, what it cannot serve.
    _parallel_config = None

    def __init__(self, original, controller: SLAController, head_dim: int):
        super().__init__()
        self.original = original
        self.sla_attention: SparseLinearAttention = controller.new_state(head_dim)
        self._controller = controller
        self._warned = False

    def forward(self, attn, hidden_states, *args, **kwargs):
        with self._controller.pinned(self.sla_attention) as served, self._attention_scope():
            result = self.original(attn, hidden_states, *args, **kwargs)
        if served[0] == 0 and not self._warned:
            self._warned = True
            logger.warning("slattn: an SLA-wrapped attention processor made no SLA call (its attention backend "
                           "bypasses torch SDPA, or every call fell back; see the controller's statistics())")
        return result

    def _attention_scope(self):
        """Context around the original processor's call, inside the pinned SDPA;
        sequence parallelism (slattn.distributed.diffusers) redistributes attention here.
        Under diffusers' context parallelism a plain SLA processor would attend within each
        rank's shard (enabled after apply_sla) or train with dense attention's gradients
        (enabled before): refused, never silently wrong."""
        if self._parallel_config is not None or getattr(self.original, "_parallel_config", None) is not None:
            raise RuntimeError("apply_sla does not serve diffusers' context parallelism (enable_parallelism): "
                               "use slattn.distributed.apply_sla_ulysses(model, config) after enable_parallelism")
        return contextlib.nullcontext()


def _self_attention_modules(model: nn.Module) -> Callable[[str, nn.Module], bool]:
    if type(model).__name__ == "WanTransformer3DModel":
        return lambda name, module: name.endswith("attn1")
    return lambda name, module: not getattr(module, "is_cross_attention", name.endswith("attn2"))


def _head_dim(module: nn.Module) -> int:
    heads = getattr(module, "heads", None)
    inner = getattr(module, "inner_dim", None)
    if not heads or not inner or inner % heads:
        raise ValueError(f"cannot tell the head dim of {type(module).__name__} (needs `heads` and `inner_dim`)")
    return inner // heads


def apply_sla(model: nn.Module, config=None, *, select: Callable[[str, nn.Module], bool] | None = None,
              make_processor: Callable[..., SLAProcessor] = SLAProcessor) -> SLAController:
    """Wraps the processors of the selected attention modules of `model`;
    returns the controller (statistics, settings). `select(name, module)`
    overrides the default choice of self-attention modules; `make_processor`
    (original, controller, head_dim) builds the wrapping SLAProcessor."""
    controller = SLAController(config, activate=False)
    select = select or _self_attention_modules(model)
    wrapped = 0
    for name, module in model.named_modules():
        if not hasattr(module, "set_processor") or not hasattr(module, "processor") or not select(name, module):
            continue
        if isinstance(module.processor, SLAProcessor):
            raise ValueError(f"{name} already runs SLA; call remove_sla first")
        processor = make_processor(module.processor, controller, _head_dim(module))
        module.set_processor(processor.to(next(module.parameters()).device))
        wrapped += 1
    if wrapped == 0:
        raise ValueError(f"apply_sla found no attention module to wrap in {type(model).__name__}")
    return controller


def remove_sla(model: nn.Module) -> int:
    """Restores the original processors; returns how many were restored."""
    restored = 0
    for module in model.modules():
        processor = getattr(module, "processor", None)
        if isinstance(processor, SLAProcessor) and hasattr(module, "set_processor"):
            module.set_processor(processor.original)
            restored += 1
    return restored
