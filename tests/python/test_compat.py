"""sparse_linear_attention: the compatibility package that satisfies imports written for the public SLA
reference (`from sparse_linear_attention import SparseLinearAttention`, as SimpleTuner does) with slattn.

Run from tests/python (as scripts/test.sh does) so the installed wheel is tested, not the source tree."""

from __future__ import annotations

import importlib.metadata
import inspect
import io
import math
import pathlib
import site
import sys

import pytest
import torch
import torch.nn.functional as F

import slattn
import sparse_linear_attention
from sparse_linear_attention import SparseLinearAttention

SOURCE_ROOT = pathlib.Path(__file__).resolve().parents[2]
B, H, L, D = 1, 2, 130, 64
BLOCK = 64
NK = math.ceil(L / BLOCK)  # 3 key blocks: 130 tokens in blocks of 64

# The public reference's constructor and forward, in order, with their defaults.
REFERENCE_INIT = [("head_dim", inspect.Parameter.empty), ("topk", inspect.Parameter.empty),
                  ("feature_map", "softmax"), ("BLKQ", 64), ("BLKK", 64), ("use_bf16", True),
                  ("tie_feature_map_qk", True)]
REFERENCE_FORWARD = [("q", inspect.Parameter.empty), ("k", inspect.Parameter.empty),
                     ("v", inspect.Parameter.empty), ("return_sparsity", False)]


def qkv(rng, dtype=torch.float32):
    return tuple(torch.randn(B, H, L, D, generator=rng).to(dtype) for _ in range(3))


# ---------------------------------------------------------------------------------------------------------------
# The package itself: same class, same version, installed from the wheel.

def test_reexports_the_same_class_and_version():
    assert sparse_linear_attention.SparseLinearAttention is slattn.SparseLinearAttention
    assert SparseLinearAttention is slattn.SparseLinearAttention
    assert sparse_linear_attention.__all__ == ["SparseLinearAttention"]
    assert sparse_linear_attention.__version__ == slattn.__version__ == importlib.metadata.version("slattn")
    doc = sparse_linear_attention.__doc__
    assert doc and "slattn" in doc and "drop-in" in doc
    # Nothing but the re-exports: no copied code.
    public = {name for name in vars(sparse_linear_attention) if not name.startswith("_")}
    assert public == {"SparseLinearAttention"}


def test_is_the_installed_package_not_the_source_tree():
    path = pathlib.Path(sparse_linear_attention.__file__).resolve()
    assert SOURCE_ROOT not in path.parents, f"imported from the source tree: {path}"
    site_dirs = [pathlib.Path(p).resolve() for p in [*site.getsitepackages(), site.getusersitepackages()]]
    assert any(d in path.parents for d in site_dirs), f"{path} is not under any of {site_dirs}"
    assert str(SOURCE_ROOT / "python") not in [str(pathlib.Path(p).resolve()) for p in sys.path if p]
    # The file that was imported is the one the slattn wheel installed, and it matches the source.
    installed = pathlib.Path(importlib.metadata.distribution("slattn")
                             .locate_file("sparse_linear_attention/__init__.py")).resolve()
    assert installed == path
    source = SOURCE_ROOT / "python" / "sparse_linear_attention" / "__init__.py"
    if source.exists():
        assert installed.read_text() == source.read_text(), "the installed package is stale: reinstall slattn"


def test_wheel_record_lists_both_packages():
    files = {str(f).replace("\\", "/") for f in importlib.metadata.files("slattn") or ()}
    assert "sparse_linear_attention/__init__.py" in files
    assert "slattn/__init__.py" in files and "slattn/module.py" in files


# ---------------------------------------------------------------------------------------------------------------
# The reference's signature and behaviour through the compat import.

def test_signature_matches_the_reference():
    init = list(inspect.signature(SparseLinearAttention.__init__).parameters.values())[1:]
    assert [(p.name, p.default) for p in init[:len(REFERENCE_INIT)]] == REFERENCE_INIT
    assert all(p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD for p in init[:len(REFERENCE_INIT)])
    # Anything slattn adds is keyword-only, so the reference's positional calls mean the same.
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in init[len(REFERENCE_INIT):])
    forward = list(inspect.signature(SparseLinearAttention.forward).parameters.values())[1:]
    assert [(p.name, p.default) for p in forward[:len(REFERENCE_FORWARD)]] == REFERENCE_FORWARD
    assert all(p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD for p in forward[:len(REFERENCE_FORWARD)])
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in forward[len(REFERENCE_FORWARD):])


@pytest.mark.parametrize("use_bf16", [True, False])
@pytest.mark.parametrize("form", ["positional", "keyword"])
def test_reference_call_returns_input_dtype_and_shape(rng, form, use_bf16):
    args = (D, 0.5, "softmax", BLOCK, BLOCK, use_bf16, True)
    if form == "positional":
        attn = SparseLinearAttention(*args)
    else:
        attn = SparseLinearAttention(**{name: value for (name, _), value in zip(REFERENCE_INIT, args)})
    assert isinstance(attn, slattn.SparseLinearAttention) and isinstance(attn, torch.nn.Module)
    assert (attn.head_dim, attn.topk, attn.feature_map, attn.BLKQ, attn.BLKK) == (D, 0.5, "softmax", BLOCK, BLOCK)
    assert attn.dtype == (torch.bfloat16 if use_bf16 else torch.float16)
    q, k, v = qkv(rng)
    out = attn(q, k, v)
    assert out.dtype == torch.float32 and out.shape == (B, H, L, D)
    assert torch.isfinite(out).all()
    # The call is slattn's: the same composite, computed in the module's low-precision dtype.
    low = tuple(t.to(attn.dtype) for t in (q, k, v))
    expected = slattn.sparse_linear_attention(*low, topk=0.5, block_q=BLOCK, block_k=BLOCK).float()
    assert torch.equal(out, expected)


def test_full_topk_is_dense_attention(rng):
    """topk=1 keeps every block: with the zero-initialised projection that is dense softmax attention."""
    attn = SparseLinearAttention(D, 1.0, "softmax", BLOCK, BLOCK, True, True)
    q, k, v = qkv(rng)
    out, kept = attn(q, k, v, return_sparsity=True)
    assert kept == 1.0
    dense = F.scaled_dot_product_attention(*(t.to(torch.bfloat16).double() for t in (q, k, v)))
    torch.testing.assert_close(out.double(), dense, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("topk, kept_blocks", [
    (0.1, 1),   # floor(0.3) = 0, clamped to one block
    (0.5, 1),   # floor(1.5) = 1
    (0.7, 2),   # floor(2.1) = 2
    (1.0, 3),
])
def test_return_sparsity_reports_kept_fraction(rng, topk, kept_blocks):
    assert kept_blocks == min(max(math.floor(topk * NK), 1), NK)
    attn = SparseLinearAttention(D, topk, "softmax", BLOCK, BLOCK, True, True)
    q, k, v = qkv(rng)
    result = attn(q, k, v, return_sparsity=True)
    assert isinstance(result, tuple) and len(result) == 2
    out, kept = result
    assert out.dtype == torch.float32 and out.shape == (B, H, L, D)
    assert kept == pytest.approx(kept_blocks / NK, abs=1e-12)
    assert attn.last_density == kept and attn.last_sparsity == pytest.approx(1.0 - kept)
    assert torch.equal(out, attn(q, k, v))  # the flag changes only what is returned


def test_state_dict_round_trip_through_the_compat_import(rng):
    source = SparseLinearAttention(D, 0.5, "softmax", BLOCK, BLOCK, True, True)
    with torch.no_grad():
        source.proj_l.weight.copy_(0.3 * torch.randn(D, D, generator=rng))
        source.proj_l.bias.copy_(0.3 * torch.randn(D, generator=rng))
    state = source.state_dict()
    assert set(state) == {"proj_l.weight", "proj_l.bias"}
    assert state["proj_l.weight"].shape == (D, D) and state["proj_l.bias"].shape == (D,)

    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    loaded_state = torch.load(buffer, weights_only=True)

    fresh = sparse_linear_attention.SparseLinearAttention(D, 0.5, "softmax", BLOCK, BLOCK, True, True)
    assert torch.equal(fresh.proj_l.weight, torch.zeros(D, D))  # zero-initialised until loaded
    result = fresh.load_state_dict(loaded_state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert all(torch.equal(fresh.state_dict()[name], state[name]) for name in state)

    q, k, v = qkv(rng)
    out = fresh(q, k, v)
    assert torch.equal(out, source(q, k, v))
    # The loaded projection matters: a fresh, zero-projection layer gives another output.
    untrained = SparseLinearAttention(D, 0.5, "softmax", BLOCK, BLOCK, True, True)
    assert not torch.allclose(out, untrained(q, k, v))
