"""slattn: Sparse-Linear Attention for diffusion transformers.

A framework-free C++ core (an exact CPU reference path and CUDA kernels)
behind PyTorch ops with fake implementations and autograd; a drop-in module,
and an SDPA patch for unmodified models.
"""

from . import _C
from .attention import sparse_linear_attention
from .integrations.config import SLAConfig
from .integrations.sdpa import SLAController, patch_sdpa
from .module import SparseLinearAttention
from .plan import RoutingPlan, plan_from_block_map, route
from .sla2 import SparseLinearAttention2

__version__ = "0.1.0"

set_num_threads = _C.set_num_threads
num_threads = _C.num_threads

__all__ = [
    "RoutingPlan",
    "SLAConfig",
    "SLAController",
    "SparseLinearAttention",
    "SparseLinearAttention2",
    "num_threads",
    "patch_sdpa",
    "plan_from_block_map",
    "route",
    "set_num_threads",
    "sparse_linear_attention",
]
