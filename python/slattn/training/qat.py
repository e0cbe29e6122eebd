"""Switches of SLA2 quantization-aware training: every SLA2 layer of a model
trains its hard-routing sparse branch in low bits (SPEC section 6: INT8 Q Kᵀ,
FP8 P V on Hopper GPUs and as fake quantization on the CPU; other GPUs fall
back to the unquantized branch with a warning) with straight-through gradients."""

from __future__ import annotations

import logging

from torch import nn

from .layers import require_sla2_layers

logger = logging.getLogger("slattn")


def enable_sla2_qat(model: nn.Module) -> int:
    """Turns QAT on in every SLA2 layer of `model`; returns how many (ValueError if none)."""
    return _switch(model, True)


def disable_sla2_qat(model: nn.Module) -> int:
    """Turns QAT off in every SLA2 layer of `model` (inference in bf16 again); returns how many."""
    return _switch(model, False)


def _switch(model: nn.Module, on: bool) -> int:
    layers = require_sla2_layers(model)
    for layer in layers.values():
        layer.qat = on
    logger.info("slattn: SLA2 QAT is %s in %d layers", "on" if on else "off", len(layers))
    return len(layers)
