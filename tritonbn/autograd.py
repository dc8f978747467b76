"""torch.autograd.Function over the host ops, for SyncBatchNorm across processes:
its collectives (an object with gather and reduce) cannot be an argument of a
torch.library op. Every other call goes through the custom ops of library.py,
which save the same tensors.

Saves x and the per-channel stats, and, after a residual add, what
ops.residual_mode picks: the 1-bit mask (relu, leaky_relu), the residual itself
(silu, gelu), or nothing (no activation). Never a full-size pre-activation.
"""
from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from . import ops


class BatchNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, residual, running_mean, running_var, num_batches_tracked,
                batch, momentum, eps, activation, slope, comm=None):
        """comm: None, or SyncBatchNorm's collectives (distributed.py) for statistics
        over every process's batch."""
        y, xk, v, mean, s, mask, count = ops.forward(
            x, weight, bias, running_mean, running_var, num_batches_tracked, batch, momentum,
            eps, activation, residual=residual, slope=slope, comm=comm)
        mode = ops.residual_mode(activation, residual is not None)
        ctx.save_for_backward(xk, weight, bias, mean, s,
                              mask if mode == ops.RES_MASK else None,
                              residual if mode == ops.RES_RELOAD else None, count)
        ctx.view, ctx.batch, ctx.eps, ctx.activation, ctx.slope = v, batch, eps, activation, slope
        ctx.comm = comm
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, weight, bias, mean, s, mask, residual, count = ctx.saved_tensors
        dx, dw, db, dz = ops.backward(dy, x, ctx.view, mean, s, weight, bias, ctx.batch, ctx.eps,
                                      ctx.activation, ctx.needs_input_grad[:4], slope=ctx.slope,
                                      residual=residual, mask=mask, comm=ctx.comm, count=count)
        return dx, dw, db, dz, None, None, None, None, None, None, None, None, None
