"""SLA2 training tools (arXiv 2602.12675's two-stage recipe).

Stage 1: `RouterDistiller` captures (Q, K, V) from the model's SLA2 layers
across diffusion timesteps and trains routers and α against full attention
with SoftTop-k. Stage 2: `prepare_stage2` switches to hard top-k with the
routers frozen for end-to-end fine-tuning. `RouterParameterScheduler` moves
topk during training; `get_sla2_statistics` and `log_sla2_config` report.
PyTorch Lightning callbacks live in `slattn.training.lightning` (Lightning is
an optional extra, imported only there)."""

from .distill import LayerReport, RouterDistiller
from .layers import sla2_layers
from .qat import disable_sla2_qat, enable_sla2_qat
from .schedule import RouterParameterScheduler
from .stage2 import prepare_stage2
from .stats import get_sla2_statistics, log_sla2_config

__all__ = [
    "LayerReport",
    "RouterDistiller",
    "RouterParameterScheduler",
    "SLA2QATCallback",
    "disable_sla2_qat",
    "enable_sla2_qat",
    "get_sla2_statistics",
    "log_sla2_config",
    "prepare_stage2",
    "sla2_layers",
]


def __getattr__(name: str):
    # The Lightning callback by its usual import path, without importing Lightning with this package.
    if name == "SLA2QATCallback":
        from .lightning import SLA2QATCallback

        return SLA2QATCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
