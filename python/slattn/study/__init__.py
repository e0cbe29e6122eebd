"""The fine-tuning study (`slattn finetune`): does a video DiT fine-tuned with
SLA at 95% sparsity, or SLA2 at 97%, keep the quality of full attention? With
the SLA paper's ablations (sparse only, linear only, L+S) and a full-attention
control, on an embedded procedural video dataset; see docs/quality.md.

    results = slattn.study.run_study("smoke", out_dir="study")   # or "gpu" on one H100
"""

from .data import MovingShapes
from .presets import PRESETS, StudyPreset, get_preset
from .quality import QualityMetric, RandomVideoFeatures, frechet_distance
from .runner import run_study
from .variants import VARIANTS

__all__ = ["MovingShapes", "PRESETS", "QualityMetric", "RandomVideoFeatures", "StudyPreset", "VARIANTS",
           "frechet_distance", "get_preset", "run_study"]
