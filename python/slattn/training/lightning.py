"""PyTorch Lightning callbacks for SLA2 training (`pip install slattn[lightning]`).

    trainer = lightning.Trainer(callbacks=[SLA2QATCallback(), RouterParameterScheduler(5000, 0.25, 0.10)])
"""

from __future__ import annotations

try:
    from lightning.pytorch import Callback
except ImportError:
    try:
        from pytorch_lightning import Callback
    except ImportError:
        raise ImportError("slattn.training.lightning needs PyTorch Lightning: pip install slattn[lightning] "
                          "(or lightning / pytorch_lightning)") from None

from . import schedule
from .stats import get_sla2_statistics, log_sla2_config


def sla2_metrics(model, *, sparsity: bool = True, alpha: bool = True) -> dict[str, float]:
    """Flat metric names ("sla2/<layer>/density", ...) for a logger; layers not yet run are left out."""
    keys = (("density", "sparsity") if sparsity else ()) + (("alpha_mean", "alpha_min", "alpha_max") if alpha else ())
    metrics = {}
    for name, stats in get_sla2_statistics(model).items():
        for key in keys:
            if stats[key] is not None:
                metrics[f"sla2/{name or 'model'}/{key}"] = float(stats[key])
    return metrics


class SLA2QATCallback(Callback):
    """Logs the SLA2 configuration at the start of training and, every
    `log_every_n_steps` steps, each layer's density/sparsity and α statistics
    through the LightningModule's `log_dict`. QAT itself is switched per model
    with `slattn.training.enable_sla2_qat` (or SparseLinearAttention2(qat=True))."""

    def __init__(self, log_sparsity: bool = True, log_alpha_stats: bool = True, log_every_n_steps: int = 100):
        super().__init__()
        if isinstance(log_every_n_steps, bool) or not isinstance(log_every_n_steps, int) or log_every_n_steps < 1:
            raise ValueError(f"log_every_n_steps must be a positive integer, got {log_every_n_steps!r}")
        self.log_sparsity = log_sparsity
        self.log_alpha_stats = log_alpha_stats
        self.log_every_n_steps = log_every_n_steps

    def on_train_start(self, trainer, pl_module) -> None:
        log_sla2_config(pl_module, print_fn=lambda line: trainer.print(f"slattn: {line}"))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step % self.log_every_n_steps:
            return
        metrics = sla2_metrics(pl_module, sparsity=self.log_sparsity, alpha=self.log_alpha_stats)
        if metrics:
            pl_module.log_dict(metrics, on_step=True, on_epoch=False)


class RouterParameterScheduler(schedule.RouterParameterScheduler, Callback):
    """slattn.training.RouterParameterScheduler applied at the start of every
    training batch, at the trainer's global step."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.apply(pl_module, trainer.global_step)
