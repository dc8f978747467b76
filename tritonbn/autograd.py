"""torch.autograd.Function over the host ops: every eager call (and SyncBatchNorm
across processes, whose collectives, an object with gather and reduce, run from
Python between the kernels). torch.compile goes through the custom ops of
library.py instead, which launch the same kernels and save the same tensors, so
both give the same results bit for bit (tests/test_host.py).

Saves x and the per-channel stats, and, after a residual add, what
ops.residual_mode picks: the 1-bit mask (relu, leaky_relu, relu6), the residual
itself (the other activations), or nothing (no activation). Never a full-size
pre-activation.
"""
from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from . import ops
from .tuning.tuner import on_first_use


# What a call knows besides its differentiable inputs (x, weight, bias, residual), as
# one argument of apply, since autograd looks at each one: a plain tuple of these
# fields, ops.forward's arguments after bias, in this order (a class's constructor,
# even a NamedTuple's made in C, costs ~1 µs of host time a call more: issue 14)
SPEC = ("running_mean", "running_var", "num_batches_tracked", "batch", "momentum", "eps",
        "activation", "slope", "comm", "count")
_ACTIVATION = SPEC.index("activation")


def _forward(x, weight, bias, residual, spec: tuple):
    """ops.forward of a call."""
    return ops.forward(x, weight, bias, *spec, on_first_use, residual)


class BatchNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, residual, spec: tuple):
        y, xk, v, mean, s, mask, count, plan = _forward(x, weight, bias, residual, spec)
        if residual is None and count is None:  # the common case: the fewest saved (host time)
            ctx.save_for_backward(xk, weight, bias, mean, s)
        else:
            mode = ops.residual_mode(spec[_ACTIVATION], True)
            ctx.save_for_backward(xk, weight, bias, mean, s, count,
                                  mask if mode == ops.RES_MASK else None,
                                  residual if mode == ops.RES_RELOAD else None)
        ctx.view, ctx.spec, ctx.plan = v, spec, plan
        return y

    @staticmethod
    def backward(ctx, dy):
        """The kernels' backward. Grad mode is off here (autograd's default in backward),
        so nothing records a graph; with create_graph=True it is on, and the same
        backward runs once_differentiable: no double backward, as torch says."""
        if torch.is_grad_enabled():
            return _backward_once(ctx, dy)
        x, weight, bias, mean, s, *kept = ctx.saved_tensors
        count, mask, residual = kept or (None, None, None)
        _, _, _, batch, _, eps, activation, slope, comm, _ = ctx.spec
        dx, dw, db, dz = ops.backward(dy, x, ctx.view, mean, s, weight, bias, batch, eps,
                                      activation, ctx.needs_input_grad[:4], slope, residual,
                                      mask, comm, count, ctx.plan, on_first_use)
        return dx, dw, db, dz, None


_backward_once = once_differentiable(BatchNormFunction.backward)


def _c_apply():
    """autograd's own apply of BatchNormFunction, without Function.apply's Python
    wrapper (argument binding for setup_context, functorch unwrapping: ~5 µs of a
    call's host time); None where this torch does not expose it so."""
    try:
        apply = super(torch.autograd.Function, BatchNormFunction).apply
    except AttributeError:
        return None
    return apply if callable(apply) else None


_C_APPLY = _c_apply()


def batch_norm(x, weight, bias, residual, spec: tuple):
    """BatchNormFunction.apply(x, weight, bias, residual, spec): y, differentiable in
    x, weight, bias and residual; running stats updated in place. Where nothing will
    be differentiated (no grad mode, or no input requiring grad: eval, inference) the
    kernels run without autograd's bookkeeping, to the same y."""
    if not (torch.is_grad_enabled() and (
            x.requires_grad or (weight is not None and weight.requires_grad)
            or (bias is not None and bias.requires_grad)
            or (residual is not None and residual.requires_grad))):
        return _forward(x, weight, bias, residual, spec)[0]
    if _C_APPLY is None or torch._C._are_functorch_transforms_active():
        return BatchNormFunction.apply(x, weight, bias, residual, spec)
    return _C_APPLY(x, weight, bias, residual, spec)
