"""Shared fixtures: seeded generators, input factories, and the `gpu` marker."""

from __future__ import annotations

import os
import zlib
from typing import NamedTuple

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` are skipped, with the reason, on machines without CUDA."""
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU: torch.cuda.is_available() is False")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


class Inputs(NamedTuple):
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    proj_weight: torch.Tensor | None
    proj_bias: torch.Tensor | None

    def leaves(self) -> list[torch.Tensor]:
        return [t for t in self if t is not None]


@pytest.fixture
def rng(request) -> torch.Generator:
    """A generator seeded from the test's file and name: every test (and parametrization) reproducible on
    its own, wherever pytest runs from. SLATTN_TEST_SEED=n draws other data for every test."""
    name = f"{request.node.path.name}::{request.node.name}"
    return torch.Generator().manual_seed(zlib.crc32(name.encode()) + int(os.environ.get("SLATTN_TEST_SEED", "0")))


@pytest.fixture
def make_inputs(rng):
    """make_inputs(batch, q_heads, kv_heads, q_len, k_len, dim, ...) -> Inputs.

    Tensors are drawn in float64 and then cast, so a dtype changes only the
    rounding. layout "NHD" returns (B, L, H, D) tensors. The projection is
    (dim, dim) and (dim,) in proj_dtype (default float32, the master weights;
    None for no projection)."""

    def make(batch=1, q_heads=2, kv_heads=None, q_len=21, k_len=19, dim=8, *, dtype=torch.float64, layout="HND",
             proj_dtype=torch.float32, bias=True, requires_grad=False, proj_scale=0.5) -> Inputs:
        kv_heads = q_heads if kv_heads is None else kv_heads

        def draw(heads, length):
            shape = (batch, heads, length, dim) if layout == "HND" else (batch, length, heads, dim)
            return torch.randn(shape, dtype=torch.float64, generator=rng).to(dtype).requires_grad_(requires_grad)

        q, k, v = draw(q_heads, q_len), draw(kv_heads, k_len), draw(kv_heads, k_len)
        weight = b = None
        if proj_dtype is not None:
            weight = (proj_scale * torch.randn(dim, dim, dtype=torch.float64, generator=rng)).to(proj_dtype)
            weight.requires_grad_(requires_grad)
            if bias:
                b = (proj_scale * torch.randn(dim, dtype=torch.float64, generator=rng)).to(proj_dtype)
                b.requires_grad_(requires_grad)
        return Inputs(q, k, v, weight, b)

    return make
