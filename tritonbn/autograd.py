"""torch.autograd.Function over the host ops. Saves x and the per-channel stats only."""
from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from . import ops


class BatchNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, num_batches_tracked,
                batch, momentum, eps, activation):
        y, xk, v, mean, s = ops.forward(x, weight, bias, running_mean, running_var,
                                        num_batches_tracked, batch, momentum, eps, activation)
        ctx.save_for_backward(xk, weight, bias, mean, s)
        ctx.view, ctx.batch, ctx.eps, ctx.activation = v, batch, eps, activation
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, weight, bias, mean, s = ctx.saved_tensors
        dx, dw, db = ops.backward(dy, x, ctx.view, mean, s, weight, bias, ctx.batch, ctx.eps,
                                  ctx.activation, ctx.needs_input_grad[:3])
        return dx, dw, db, None, None, None, None, None, None, None
