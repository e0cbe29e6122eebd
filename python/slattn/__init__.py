"""slattn: Sparse-Linear Attention for diffusion transformers.

A framework-free C++ core (CPU reference now, CUDA kernels next) behind
PyTorch ops with fake implementations and autograd.
"""

from . import _C
from .attention import sparse_linear_attention
from .module import SparseLinearAttention
from .plan import RoutingPlan, plan_from_block_map, route

__version__ = "0.1.0"

set_num_threads = _C.set_num_threads
num_threads = _C.num_threads

__all__ = [
    "RoutingPlan",
    "SparseLinearAttention",
    "num_threads",
    "plan_from_block_map",
    "route",
    "set_num_threads",
    "sparse_linear_attention",
]
