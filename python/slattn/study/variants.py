"""The variants the study fine-tunes from one full-attention checkpoint: what
attention each runs, how it is built into the DiT, and its attention FLOPs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn

from .._low_bit import missing_kernels, runs_low_bit
from ..module import SparseLinearAttention
from ..sla2 import SparseLinearAttention2
from .ablations import LinearOnlyAttention, LinearPlusSparseAttention, SparseOnlyAttention
from .presets import StudyPreset


@dataclass(frozen=True)
class Variant:
    name: str
    description: str
    # One attention kernel per DiT layer; None keeps the DiT's full attention (PyTorch SDPA).
    make_kernel: Callable[[StudyPreset], nn.Module | None]
    # The preset field holding its topk (fraction of key blocks computed exactly); None: all (full) or none (linear).
    topk_field: str | None
    # Matmul FLOPs of the linear branch (4) and SLA's projection (2), in units of L·D² per head.
    linear_units: int
    sla2: bool = False         # trained in two stages (router distillation, then fine-tuning)
    low_bit: bool = False      # needs the low-bit sparse branch (the CPU, or a Hopper GPU)


class _ReportsDensity(nn.Module):
    """Calls SparseLinearAttention with return_sparsity=True, which is when it records
    its density, and hands the DiT the output alone."""

    def __init__(self, inner: SparseLinearAttention):
        super().__init__()
        self.inner = inner
        self.last_density: float | None = None

    def forward(self, q, k, v):
        out, self.last_density = self.inner(q, k, v, return_sparsity=True)
        return out


def _sla(p: StudyPreset) -> nn.Module:
    return _ReportsDensity(SparseLinearAttention(p.hidden_size // p.num_heads, p.sla_topk, "softmax", p.block_q,
                                                 p.block_k, layout="NHD"))


def _sla2(p: StudyPreset, qat: bool = False) -> nn.Module:
    return SparseLinearAttention2(p.hidden_size // p.num_heads, p.sla2_topk,
                                  compression_ratio=p.sla2_compression_ratio, alpha="head", qat=qat,
                                  block_q=p.block_q, block_k=p.block_k, num_heads=p.num_heads, layout="NHD")


VARIANTS = {v.name: v for v in (
    Variant("full", "full attention (control): the same fine-tuning, no sparsity", lambda p: None, None, 0),
    Variant("sla", "SLA at topk sla_topk: sparse branch on the critical blocks, linear branch on the marginal "
            "ones through the learned projection", _sla, "sla_topk", 6),
    Variant("sparse-only", "SLA without the linear branch: block-sparse softmax attention on the critical "
            "blocks", lambda p: SparseOnlyAttention(p.hidden_size // p.num_heads, p.sla_topk, p.block_q, p.block_k),
            "sla_topk", 0),
    Variant("linear-only", "linear attention (softmax feature map) over all keys, nothing exact",
            lambda p: LinearOnlyAttention(p.hidden_size // p.num_heads), None, 4),
    Variant("l+s", "sparse branch plus a linear branch over all keys, summed, no projection (the SLA "
            "paper's L+S)", lambda p: LinearPlusSparseAttention(p.hidden_size // p.num_heads, p.sla_topk,
                                                               p.block_q, p.block_k), "sla_topk", 4),
    Variant("sla2", "SLA2 at topk sla2_topk: learned router (stage 1: distilled with SoftTop-k against full "
            "attention), α-mixed branches, then fine-tuned with hard top-k and the router frozen (stage 2)",
            _sla2, "sla2_topk", 4, sla2=True),
    Variant("sla2-qat", "SLA2 as above with quantization-aware training of the low-bit sparse branch",
            lambda p: _sla2(p, qat=True), "sla2_topk", 4, sla2=True, low_bit=True),
)}


def check_variant_names(names) -> list[str]:
    """The variants asked for, in the study's order; ValueError naming `variants` for an unknown one."""
    if isinstance(names, str) or not hasattr(names, "__iter__"):
        raise ValueError(f"variants must be a list of names from {', '.join(VARIANTS)}, got {names!r}")
    names = list(names)
    if not names or not all(isinstance(n, str) for n in names):
        raise ValueError(f"variants must be a non-empty list of names from {', '.join(VARIANTS)}, got {names!r}")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise ValueError(f"variants: unknown name(s) {', '.join(map(repr, unknown))}; known: {', '.join(VARIANTS)}")
    return [n for n in VARIANTS if n in names]


def target_topk(variant: Variant, preset: StudyPreset) -> float | None:
    return None if variant.topk_field is None else getattr(preset, variant.topk_field)


def install_kernels(model: nn.Module, variant: Variant, preset: StudyPreset) -> None:
    """Gives every attention layer of the DiT its own kernel of `variant`. Raises
    NotImplementedError for a low-bit variant on a GPU without low-bit kernels
    (it would train unquantized, and the report would claim otherwise)."""
    device = next(model.parameters()).device
    if variant.low_bit and not runs_low_bit(device):
        raise NotImplementedError(f"{variant.name}: {missing_kernels(device)}")
    kernels = [variant.make_kernel(preset) for _ in model.blocks]
    for block, kernel in zip(model.blocks, kernels):
        block.attn.kernel = None if kernel is None else kernel.to(device)


def measured_density(model: nn.Module) -> float | None:
    """Mean over the layers of the density their kernels measured on the last call
    (1 for full attention, whose layers have no kernel); None before any call."""
    values = []
    for block in model.blocks:
        kernel = block.attn.kernel
        values.append(1.0 if kernel is None else kernel.last_density)
    return None if any(v is None for v in values) else sum(values) / len(values)


def attention_flops(variant: Variant, preset: StudyPreset, density: float | None) -> dict:
    """Attention matmul FLOPs of one clip's forward pass over all layers (a
    multiply-add counts 2; softmax, feature maps, routing and α mixing left out).
    Exact attention on a fraction `density` of the blocks costs density · 4·H·L²·D;
    the linear branch costs 2·L·D² per head for the key states φ(K)ᵀV and as much
    for φ(Q)H (feature dim = D for the softmax map), and SLA's projection another
    2·L·D² (`Variant.linear_units`)."""
    tokens, heads, dim = preset.tokens, preset.num_heads, preset.hidden_size // preset.num_heads
    dense = 4.0 * heads * tokens * tokens * dim * preset.depth
    exact = dense * (1.0 if variant.name == "full" else (density or 0.0))
    linear = variant.linear_units * heads * tokens * dim * dim * preset.depth
    return {"total": exact + linear, "exact": exact, "linear": linear, "fraction_of_full": (exact + linear) / dense}
