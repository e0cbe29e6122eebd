"""The SLA forward and backward as torch.library custom ops, with fake (meta)
implementations and autograd, so opcheck passes and torch.compile traces them.

Both ops take the routing plan's tensors; the backward reuses the forward's
plan. Optional outputs that were not asked for are empty tensors.

Hedgehog's weights come last: feature_weight_q (W_q), and feature_weight_k
(W_k) or None to tie W_k to W_q; the fixed feature maps take neither."""

from __future__ import annotations

from typing import Optional

import torch

from . import _C, _checks
from ._tensors import Launch, dtype_code, lse_dtype, pointer, sequence_shape, view
from .plan import _plan_view

Tensor = torch.Tensor


_PLAN_NAMES = ("block_map", "row_count", "row_index", "col_count", "col_index")


def _plan(q: Tensor, k: Tensor, layout: str, block_q: int, block_k: int, plan_tensors) -> _C.RoutingPlanView:
    """A core view of contiguous plan tensors; the caller keeps them alive while the core runs.

    The core sees only their addresses, so their shapes and dtypes are checked
    here against the inputs and block sizes (a mismatch would read out of bounds)."""
    _checks.check_block_sizes(block_q, block_k)
    (b, h, lq, _), (_, _, lk, _) = sequence_shape(q, layout), sequence_shape(k, layout)
    mq, nk = -(-lq // block_q), -(-lk // block_k)
    shapes = ((b, h, mq, nk), (b, h, mq), (b, h, mq, nk), (b, h, nk), (b, h, nk, mq))
    dtypes = (torch.int8,) + (torch.int32,) * 4
    for name, t, shape, dtype in zip(_PLAN_NAMES, plan_tensors, shapes, dtypes):
        if tuple(t.shape) != shape or t.dtype != dtype:
            raise ValueError(f"plan tensor {name} must be {dtype} of shape {shape} for these inputs and blocks "
                             f"{block_q}x{block_k}, got {t.dtype} of shape {tuple(t.shape)}")
        if t.device != q.device:
            raise ValueError(f"plan tensor {name} is on {t.device} but q is on {q.device}")
    return _plan_view((b, h, lq, lk, block_q, block_k), plan_tensors)


def _feature_weights(feature_weight_q: Optional[Tensor], feature_weight_k: Optional[Tensor]):
    """(W_q, W_k, dtype code) as the core reads them: contiguous, the same tensor twice when tied."""
    if feature_weight_q is None:
        return None, None, 0
    weight_q = feature_weight_q.contiguous()
    if feature_weight_k is None:
        return weight_q, weight_q, dtype_code(weight_q.dtype)
    weight_k = feature_weight_k.contiguous()
    if weight_k.data_ptr() == weight_q.data_ptr():
        # Two arguments, two gradients: a copy keeps the core from reading one shared address as tied.
        weight_k = weight_k.clone()
    return weight_q, weight_k, dtype_code(weight_q.dtype)


def _forward_outputs(q: Tensor, layout: str, sparse: bool, linear: bool):
    b, h, lq, _ = sequence_shape(q, layout)
    out = torch.empty_like(q)
    out_sparse = torch.empty_like(q) if sparse else q.new_empty(0)
    out_linear = torch.empty_like(q) if linear else q.new_empty(0)
    lse = torch.empty((b, h, lq), dtype=lse_dtype(q.dtype), device=q.device)
    return out, out_sparse, out_linear, lse


@torch.library.custom_op("slattn::sla_forward", mutates_args=())
def sla_forward_op(q: Tensor, k: Tensor, v: Tensor, proj_weight: Optional[Tensor], proj_bias: Optional[Tensor],
                   block_map: Tensor, row_count: Tensor, row_index: Tensor, col_count: Tensor, col_index: Tensor,
                   block_q: int, block_k: int, scale: float, feature_map: str, linear_scope: str, layout: str,
                   return_linear: bool, feature_weight_q: Optional[Tensor] = None,
                   feature_weight_k: Optional[Tensor] = None,
                   quantized: bool = False) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Returns (out, out_sparse, out_linear, lse). out_sparse is empty when it
    equals out (no projection); out_linear is empty unless return_linear.
    quantized: the sparse branch in low bits (SPEC section 6); its backward is
    the unquantized one with the quantized forward's LSE (straight-through)."""
    # Contiguous copies held here: the view only has their addresses.
    plan_tensors = tuple(t.contiguous() for t in (block_map, row_count, row_index, col_count, col_index))
    plan = _plan(q, k, layout, block_q, block_k, plan_tensors)
    out, out_sparse, out_linear, lse = _forward_outputs(q, layout, proj_weight is not None, return_linear)
    proj_dtype = dtype_code(proj_weight.dtype) if proj_weight is not None else 0
    weight = proj_weight.contiguous() if proj_weight is not None else None
    bias = proj_bias.contiguous() if proj_bias is not None else None
    weight_q, weight_k, feature_dtype = _feature_weights(feature_weight_q, feature_weight_k)
    with Launch(q.device) as launch:
        _C.sla_forward(view(q, layout), view(k, layout), view(v, layout), pointer(weight), pointer(bias), proj_dtype,
                       view(out, layout), view(out_sparse, layout), view(out_linear, layout), lse.data_ptr(), scale,
                       feature_map, pointer(weight_q), pointer(weight_k), feature_dtype, linear_scope, quantized,
                       plan, launch.stream, launch.allocate)
    return out, out_sparse, out_linear, lse


@sla_forward_op.register_fake
def _(q, k, v, proj_weight, proj_bias, block_map, row_count, row_index, col_count, col_index, block_q, block_k,
      scale, feature_map, linear_scope, layout, return_linear, feature_weight_q=None, feature_weight_k=None,
      quantized=False):
    return _forward_outputs(q, layout, proj_weight is not None, return_linear)


def _backward_outputs(q: Tensor, k: Tensor, v: Tensor, *weights: Optional[Tensor]):
    """dq, dk, dv and one gradient per weight (empty for a missing one), each
    row-major whatever the weight's strides: the core writes them densely."""
    grads = tuple(torch.empty_like(w, memory_format=torch.contiguous_format) if w is not None else q.new_empty(0)
                  for w in weights)
    return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)) + grads


@torch.library.custom_op("slattn::sla_backward", mutates_args=())
def sla_backward_op(q: Tensor, k: Tensor, v: Tensor, out_sparse: Tensor, lse: Tensor, proj_weight: Optional[Tensor],
                    proj_bias: Optional[Tensor], dout: Tensor, dout_sparse: Optional[Tensor],
                    dout_linear: Optional[Tensor], block_map: Tensor, row_count: Tensor, row_index: Tensor,
                    col_count: Tensor, col_index: Tensor, block_q: int, block_k: int, scale: float, feature_map: str,
                    linear_scope: str, layout: str, feature_weight_q: Optional[Tensor] = None,
                    feature_weight_k: Optional[Tensor] = None
                    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns (dq, dk, dv, d_proj_weight, d_proj_bias, d_feature_weight_q,
    d_feature_weight_k); a gradient is empty when its weight is missing. With
    tied feature weights (feature_weight_k None) d_feature_weight_q is the
    gradient of the one W through both uses."""
    # Contiguous copies held here: the views only have their addresses.
    plan_tensors = tuple(t.contiguous() for t in (block_map, row_count, row_index, col_count, col_index))
    plan = _plan(q, k, layout, block_q, block_k, plan_tensors)
    lse = lse.contiguous()
    dq, dk, dv, d_weight, d_bias, d_feature_q, d_feature_k = _backward_outputs(
        q, k, v, proj_weight, proj_bias, feature_weight_q, feature_weight_k)
    proj_dtype = dtype_code(proj_weight.dtype) if proj_weight is not None else 0
    weight = proj_weight.contiguous() if proj_weight is not None else None
    weight_q, weight_k, feature_dtype = _feature_weights(feature_weight_q, feature_weight_k)
    # Tied: the core writes the one gradient once, to the one buffer it is given twice.
    d_feature_k_out = d_feature_q if feature_weight_k is None else d_feature_k
    with Launch(q.device) as launch:
        _C.sla_backward(view(q, layout), view(k, layout), view(v, layout), view(out_sparse, layout), lse.data_ptr(),
                        pointer(weight), proj_bias is not None, proj_dtype, view(dout, layout),
                        view(dout_sparse, layout), view(dout_linear, layout), view(dq, layout), view(dk, layout),
                        view(dv, layout), pointer(d_weight), pointer(d_bias), scale, feature_map, pointer(weight_q),
                        pointer(weight_k), feature_dtype, pointer(d_feature_q), pointer(d_feature_k_out),
                        linear_scope, plan, launch.stream, launch.allocate)
    return dq, dk, dv, d_weight, d_bias, d_feature_q, d_feature_k


@sla_backward_op.register_fake
def _(q, k, v, out_sparse, lse, proj_weight, proj_bias, dout, dout_sparse, dout_linear, block_map, row_count,
      row_index, col_count, col_index, block_q, block_k, scale, feature_map, linear_scope, layout,
      feature_weight_q=None, feature_weight_k=None):
    return _backward_outputs(q, k, v, proj_weight, proj_bias, feature_weight_q, feature_weight_k)


def _setup_context(ctx, inputs, output):
    (q, k, v, proj_weight, proj_bias, block_map, row_count, row_index, col_count, col_index, block_q, block_k,
     scale, feature_map, linear_scope, layout, return_linear, feature_weight_q, feature_weight_k, _quantized) = inputs
    out, out_sparse, out_linear, lse = output
    # Without a projection out is Os itself, and the op returned no copy of it.
    saved_sparse = out_sparse if proj_weight is not None else out
    ctx.save_for_backward(q, k, v, proj_weight, proj_bias, saved_sparse, lse, block_map, row_count, row_index,
                          col_count, col_index, feature_weight_q, feature_weight_k)
    ctx.options = (block_q, block_k, scale, feature_map, linear_scope, layout)
    ctx.has_sparse_output = proj_weight is not None
    ctx.has_linear_output = return_linear
    ctx.mark_non_differentiable(lse)
    # Outputs nobody differentiated reach the backward as None, not as zeros made for them (a full-size
    # tensor for out_sparse; its zero gradient would also take the backward off its dO-only path).
    ctx.set_materialize_grads(False)


def _used(grad: Optional[Tensor], produced: bool) -> Optional[Tensor]:
    """An incoming gradient worth passing on: None for outputs that were empty."""
    return grad if produced and grad is not None and grad.numel() > 0 else None


def _backward(ctx, dout, dout_sparse, dout_linear, _dlse):
    (q, k, v, proj_weight, proj_bias, out_sparse, lse, block_map, row_count, row_index, col_count,
     col_index, feature_weight_q, feature_weight_k) = ctx.saved_tensors
    block_q, block_k, scale, feature_map, linear_scope, layout = ctx.options
    if dout is None:
        dout = torch.zeros_like(out_sparse)
    dq, dk, dv, d_weight, d_bias, d_feature_q, d_feature_k = torch.ops.slattn.sla_backward(
        q, k, v, out_sparse, lse, proj_weight, proj_bias, dout, _used(dout_sparse, ctx.has_sparse_output),
        _used(dout_linear, ctx.has_linear_output), block_map, row_count, row_index, col_count, col_index, block_q,
        block_k, scale, feature_map, linear_scope, layout, feature_weight_q, feature_weight_k)

    def given(grad, weight):
        return grad if weight is not None else None

    # 12 non-tensor or non-differentiable inputs sit between the projection and the feature weights;
    # `quantized` comes last.
    return ((dq, dk, dv, given(d_weight, proj_weight), given(d_bias, proj_bias)) + (None,) * 12
            + (given(d_feature_q, feature_weight_q), given(d_feature_k, feature_weight_k), None))


sla_forward_op.register_autograd(_backward, setup_context=_setup_context)


class _EagerSla(torch.autograd.Function):
    """The op's own autograd (_setup_context, _backward) for eager calls. torch.library's autograd re-fills
    the op's 20 arguments from its schema on every call with gradients, at a cost quadratic in their number
    (about 0.1-0.2 ms a call, more than the core's launches); here the op runs with gradients off."""

    @staticmethod
    def forward(*inputs):
        return torch.ops.slattn.sla_forward(*inputs)

    setup_context = staticmethod(_setup_context)
    backward = staticmethod(_backward)


def sla_forward(*inputs) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """torch.ops.slattn.sla_forward with every argument given, with gradients: under torch.compile the
    op itself (its registered autograd is what the compiler reads), in eager mode the same autograd
    without torch.library's per-call overhead."""
    if torch.compiler.is_compiling() or not torch.is_grad_enabled():
        return torch.ops.slattn.sla_forward(*inputs)
    return _EagerSla.apply(*inputs)
