"""Switches of SLA2 quantization-aware training. QAT needs the low-bit sparse
kernels of SPEC section 6, which slattn does not have yet: enabling it raises,
so no run believes it trains with quantization when it does not."""

from __future__ import annotations

import logging

from torch import nn

from ..sla2 import QAT_UNAVAILABLE
from .layers import require_sla2_layers

logger = logging.getLogger("slattn")


def enable_sla2_qat(model: nn.Module) -> None:
    """Raises NotImplementedError (after checking that `model` has SLA2 layers)."""
    require_sla2_layers(model)
    raise NotImplementedError(f"enable_sla2_qat: {QAT_UNAVAILABLE}")


def disable_sla2_qat(model: nn.Module) -> int:
    """Marks every SLA2 layer as not quantized (they never are yet); returns how many."""
    layers = require_sla2_layers(model)
    for layer in layers.values():
        layer.qat = False
    logger.info("slattn: SLA2 QAT is off in %d layers (%s)", len(layers), QAT_UNAVAILABLE)
    return len(layers)
