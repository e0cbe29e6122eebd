"""Reference models with full, SLA or SLA2 attention."""

from .config import SLA2_PRESETS, DiTConfig
from .dit import DiT

__all__ = ["DiT", "DiTConfig", "SLA2_PRESETS"]
