"""tritonbn as PyTorch custom ops (torch.library), so that torch.compile
(fullgraph=True) and CUDA graphs see one op per BatchNorm stage, with its buffer
mutations declared, as aten's own BatchNorm is split:

    torch.ops.tritonbn.batch_stats(x, running_mean, running_var, num_batches_tracked,
                                   momentum, eps) -> (mean, invstd)
        training only; mutates running_mean and running_var (not differentiable: x is
        passed detached, and batch_norm's backward carries the statistics' grad)
    torch.ops.tritonbn.batch_norm(x, mean, s, weight, bias, residual, training, eps,
                                  activation, negative_slope) -> (y, mask)
        functional; s is invstd in training, running_var in eval; autograd registered
    torch.ops.tritonbn.batch_norm_backward(dy, x, weight, bias, residual, mean, s, mask,
                                           training, eps, activation, negative_slope,
                                           needs) -> (dx, dweight, dbias, dresidual)

negative_slope is the activation's one scalar: leaky_relu's negative_slope, elu's
alpha (functional.activation_slope).

Outputs a call does not produce are empty tensors (custom ops return tensors, not
None): the mask unless ops.residual_mode is RES_MASK, the grads not asked for in
`needs`, everything of an empty batch but y.

`torch.library.custom_op`, not `triton_op`: the host code picks each launch's config
at run time (tuned cache, shipped configs, heuristics) and sizes its scratch
buffers by it; as an opaque op that choice stays a run-time one, and the op runs
the same code eager does. Fake implementations give every output's shape, dtype
and strides (y and the grads in the input's memory format). No host syncs:
momentum=None reads num_batches_tracked on the device, and nothing branches on a
tensor's values. SyncBatchNorm across processes (distributed.py) is not an op: its
collectives run from Python, a graph break under torch.compile.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import ops
from .layout import kernel_view


@torch.library.custom_op("tritonbn::batch_stats", mutates_args=("running_mean", "running_var"))
def batch_stats(x: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                num_batches_tracked: Optional[Tensor], momentum: Optional[float], eps: float
                ) -> tuple[Tensor, Tensor]:
    xk, v = kernel_view(x)
    if x.numel() == 0:
        empty = x.new_empty(0, dtype=ops._acc(x.dtype)[0])
        return empty, empty.clone()
    mean, s, _ = ops.statistics(xk, v, True, running_mean, running_var, num_batches_tracked,
                                momentum, eps)
    return mean, s


@batch_stats.register_fake
def _(x, running_mean, running_var, num_batches_tracked, momentum, eps):
    mean = x.new_empty(x.shape[1] if x.numel() else 0, dtype=ops._acc(x.dtype)[0])
    return mean, torch.empty_like(mean)


@torch.library.custom_op("tritonbn::batch_norm", mutates_args=())
def batch_norm(x: Tensor, mean: Tensor, s: Tensor, weight: Optional[Tensor],
               bias: Optional[Tensor], residual: Optional[Tensor], training: bool, eps: float,
               activation: Optional[str], negative_slope: float) -> tuple[Tensor, Tensor]:
    xk, v = kernel_view(x)
    if x.numel() == 0:
        return torch.empty_like(xk), x.new_empty(0, dtype=torch.uint8)
    y, mask = ops.apply(xk, v, mean, s, weight, bias, training, eps, activation, residual,
                        negative_slope)
    return y, mask if mask is not None else x.new_empty(0, dtype=torch.uint8)


@batch_norm.register_fake
def _(x, mean, s, weight, bias, residual, training, eps, activation, negative_slope):
    xk, v = kernel_view(x)
    mask_bytes = 0
    if x.numel() and ops.residual_mode(activation, residual is not None) == ops.RES_MASK:
        m = ops.mask_view(v)
        mask_bytes = m.outer * m.C * m.inner
    return torch.empty_like(xk), x.new_empty(mask_bytes, dtype=torch.uint8)


@torch.library.custom_op("tritonbn::batch_norm_backward", mutates_args=())
def batch_norm_backward(dy: Tensor, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                        residual: Optional[Tensor], mean: Tensor, s: Tensor, mask: Tensor,
                        training: bool, eps: float, activation: Optional[str],
                        negative_slope: float, needs: list[bool]
                        ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    xk, v = kernel_view(x)
    dx, dw, db, dz = ops.backward(dy, xk, v, mean, s, weight, bias, training, eps, activation,
                                  tuple(needs), slope=negative_slope, residual=residual,
                                  mask=mask if mask.numel() else None)
    if dz is dy:  # no activation: dz = dy, which an op's output must not alias
        dz = dy.clone()
    return tuple(t if t is not None else x.new_empty(0) for t in (dx, dw, db, dz))


@batch_norm_backward.register_fake
def _(dy, x, weight, bias, residual, mean, s, mask, training, eps, activation, negative_slope,
      needs):
    xk, _ = kernel_view(x)
    need_dx, need_dw, need_db, need_dz = needs
    return (torch.empty_like(xk) if need_dx else x.new_empty(0),
            torch.empty_like(weight) if need_dw and weight is not None else x.new_empty(0),
            torch.empty_like(bias) if need_db and bias is not None else x.new_empty(0),
            torch.empty_like(xk) if need_dz else x.new_empty(0))


def _setup_context(ctx, inputs, output):
    x, mean, s, weight, bias, residual, training, eps, activation, slope = inputs
    reload = ops.residual_mode(activation, residual is not None) == ops.RES_RELOAD
    ctx.save_for_backward(x, weight, bias, residual if reload else None, mean, s, output[1])
    ctx.training, ctx.eps, ctx.activation, ctx.slope = training, eps, activation, slope
    ctx.has_residual = residual is not None


def _backward(ctx, dy, _):
    """dx in training includes the batch statistics' dependence on x (mean and s are
    x's own, passed in detached): the whole BatchNorm backward, as aten's."""
    x, weight, bias, residual, mean, s, mask = ctx.saved_tensors
    need_dx, _, _, need_dw, need_db, need_dz = ctx.needs_input_grad[:6]
    need_dw, need_db = need_dw and weight is not None, need_db and bias is not None
    need_dz = need_dz and ctx.has_residual
    via_op = need_dz and ctx.activation is not None  # else dz is dy itself
    dx = dw = db = dz = None
    if need_dx or need_dw or need_db or via_op:
        dx, dw, db, dz = torch.ops.tritonbn.batch_norm_backward(
            dy, x, weight, bias, residual, mean, s, mask, ctx.training, ctx.eps,
            ctx.activation, ctx.slope, [need_dx, need_dw, need_db, via_op])
    if need_dz and not via_op:
        dz = dy
    return (dx if need_dx else None, None, None, dw if need_dw else None,
            db if need_db else None, dz if need_dz else None, None, None, None, None)


batch_norm.register_autograd(_backward, setup_context=_setup_context)
