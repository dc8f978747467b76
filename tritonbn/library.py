"""tritonbn as PyTorch custom ops (torch.library), so that torch.compile
(fullgraph=True) and CUDA graphs see one op per BatchNorm stage, with its buffer
mutations declared, as aten's own BatchNorm is split:

    torch.ops.tritonbn.batch_stats(x, running_mean, running_var, num_batches_tracked,
                                   momentum, eps) -> (mean, invstd)
        training only; mutates running_mean and running_var (not differentiable: x is
        passed detached, and batch_norm's backward carries the statistics' grad)
    torch.ops.tritonbn.batch_norm(x, mean, s, weight, bias, residual, training, eps,
                                  activation, negative_slope, count=None, group=None)
                                  -> (y, mask)
        functional; s is invstd in training, running_var in eval; autograd registered.
        count and group: SyncBatchNorm's (below), for backward; the forward ignores them
    torch.ops.tritonbn.batch_norm_backward(dy, x, weight, bias, residual, mean, s, mask,
                                           training, eps, activation, negative_slope,
                                           needs) -> (dx, dweight, dbias, dresidual)

SyncBatchNorm across processes (distributed.py) is the same ops split where its
collectives go, glued with torch.distributed's functional collectives, which
torch.compile traces (the group is a name, resolved before the graph runs):

    sync_batch_stats: local_stats(x) -> [3, 1, C] (mean, M2, count) of this process;
        all_gather_single along dim 1 -> [3, world, C]; combine_stats(x, gathered,
        running stats, ...) -> (mean, invstd, count): one gather forward
    batch_norm(..., count, group): its backward is batch_norm_grad_sums (Σdy',
        Σdy'·x̂ [2, C], dweight, dbias) -> all_reduce over group -> batch_norm_grad_input
        (dx with the global count, dresidual): one reduce backward

They launch the kernels eager SyncBatchNorm launches (ops.global_stats,
ops.backward with comm), kernel by kernel, so both give the same numbers.

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
tensor's values.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import ops
from .layout import kernel_view, like
from .tuning.tuner import on_first_use


@torch.library.custom_op("tritonbn::batch_stats", mutates_args=("running_mean", "running_var"))
def batch_stats(x: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                num_batches_tracked: Optional[Tensor], momentum: Optional[float], eps: float
                ) -> tuple[Tensor, Tensor]:
    xk, v = kernel_view(x)
    if x.numel() == 0:
        empty = x.new_empty(0, dtype=ops._acc(x.dtype)[0])
        return empty, empty.clone()
    mean, s, _ = ops.statistics(xk, v, True, running_mean, running_var, num_batches_tracked,
                                momentum, eps, first_use=on_first_use)
    return mean, s


@batch_stats.register_fake
def _(x, running_mean, running_var, num_batches_tracked, momentum, eps):
    mean = x.new_empty(x.shape[1] if x.numel() else 0, dtype=ops._acc(x.dtype)[0])
    return mean, torch.empty_like(mean)


@torch.library.custom_op("tritonbn::local_stats", mutates_args=())
def local_stats(x: Tensor) -> Tensor:
    xk, v = kernel_view(x)
    return ops.local_stats(xk, v)


@local_stats.register_fake
def _(x):
    return x.new_empty((3, 1, x.shape[1]), dtype=ops._acc(x.dtype)[0])


@torch.library.custom_op("tritonbn::combine_stats", mutates_args=("running_mean", "running_var"))
def combine_stats(x: Tensor, partials: Tensor, running_mean: Optional[Tensor],
                  running_var: Optional[Tensor], num_batches_tracked: Optional[Tensor],
                  momentum: Optional[float], eps: float) -> tuple[Tensor, Tensor, Tensor]:
    xk, v = kernel_view(x)
    return ops.combine_stats(xk, v, partials.contiguous(), running_mean, running_var,
                             num_batches_tracked, momentum, eps, count_out=True)


@combine_stats.register_fake
def _(x, partials, running_mean, running_var, num_batches_tracked, momentum, eps):
    mean = partials.new_empty(x.shape[1])
    return mean, torch.empty_like(mean), torch.empty_like(mean)


def sync_batch_stats(x: Tensor, running_mean, running_var, num_batches_tracked, momentum, eps,
                     group: str) -> tuple[Tensor, Tensor, Tensor]:
    """(mean, invstd, count) over the batches of every process in `group` (a process
    group's name), running stats updated in place: this process's local_stats, one
    functional all_gather, the combine. x is detached (batch_norm's backward carries
    the statistics' grad)."""
    from torch.distributed import _functional_collectives as funcol

    gathered = funcol.all_gather_single(torch.ops.tritonbn.local_stats(x), 1, group)
    return torch.ops.tritonbn.combine_stats(x, gathered, running_mean, running_var,
                                            num_batches_tracked, momentum, eps)


@torch.library.custom_op("tritonbn::batch_norm", mutates_args=())
def batch_norm(x: Tensor, mean: Tensor, s: Tensor, weight: Optional[Tensor],
               bias: Optional[Tensor], residual: Optional[Tensor], training: bool, eps: float,
               activation: Optional[str], negative_slope: float, count: Optional[Tensor] = None,
               group: Optional[str] = None) -> tuple[Tensor, Tensor]:
    xk, v = kernel_view(x)
    if x.numel() == 0:
        return torch.empty_like(xk), x.new_empty(0, dtype=torch.uint8)
    y, mask = ops.apply(xk, v, mean, s, weight, bias, training, eps, activation, residual,
                        negative_slope, on_first_use)
    return y, mask if mask is not None else x.new_empty(0, dtype=torch.uint8)


@batch_norm.register_fake
def _(x, mean, s, weight, bias, residual, training, eps, activation, negative_slope, count=None,
      group=None):
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
                                  mask=mask if mask.numel() else None, first_use=on_first_use)
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


def _grad_args(dy, x, residual, mask):
    """(dy, x, its View, z, mask) as ops' backward passes take them: dy and the
    residual z (RES_RELOAD) in x's strides, the bit mask (RES_MASK) or None."""
    xk, v = kernel_view(x)
    mask = mask if mask.numel() else None
    z = like(residual, xk) if residual is not None and mask is None else None
    return like(dy, xk), xk, v, z, mask


@torch.library.custom_op("tritonbn::batch_norm_grad_sums", mutates_args=())
def batch_norm_grad_sums(dy: Tensor, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                         residual: Optional[Tensor], mean: Tensor, s: Tensor, mask: Tensor,
                         eps: float, activation: Optional[str], negative_slope: float,
                         needs: list[bool]) -> tuple[Tensor, Tensor, Tensor]:
    """Training backward's reduction alone: (Σdy', Σdy'·x̂) [2, C], and dweight, dbias
    as needs = [dw?, db?] asks (else empty); zeros for an empty batch."""
    dy, xk, v, z, mask = _grad_args(dy, x, residual, mask)
    need_dw, need_db = needs
    if xk.numel() == 0:
        sums = torch.zeros((2, v.C), dtype=ops._acc(x.dtype)[0], device=x.device)
        dw = torch.zeros_like(weight) if need_dw else None
        db = torch.zeros_like(bias) if need_db else None
    else:
        on_first_use(("bwd_reduce", "bwd_combine", "dx"), xk, v, ops.interpreting(),
                     weight=weight, bias=bias, eps=eps, activation=activation, dy=dy)
        sums, dw, db = ops.grad_sums(dy, xk, v, mean, s, weight, bias, True, eps, activation,
                                     need_dw, need_db, slope=negative_slope, z=z, mask=mask)
    return sums, *(t if t is not None else x.new_empty(0) for t in (dw, db))


@batch_norm_grad_sums.register_fake
def _(dy, x, weight, bias, residual, mean, s, mask, eps, activation, negative_slope, needs):
    sums = x.new_empty((2, x.shape[1]), dtype=ops._acc(x.dtype)[0])
    return (sums, torch.empty_like(weight) if needs[0] else x.new_empty(0),
            torch.empty_like(bias) if needs[1] else x.new_empty(0))


@torch.library.custom_op("tritonbn::batch_norm_grad_input", mutates_args=())
def batch_norm_grad_input(dy: Tensor, x: Tensor, weight: Optional[Tensor],
                          bias: Optional[Tensor], residual: Optional[Tensor], mean: Tensor,
                          s: Tensor, mask: Tensor, sums: Optional[Tensor], count: Optional[Tensor],
                          eps: float, activation: Optional[str], negative_slope: float,
                          needs: list[bool]) -> tuple[Tensor, Tensor]:
    """Training backward's elementwise pass alone: dx (from sums, the grad sums over
    every process, and count, theirs per channel) and dresidual = dy', as
    needs = [dx?, dresidual?] asks (else empty)."""
    dy, xk, v, z, mask = _grad_args(dy, x, residual, mask)
    need_dx, need_dz = needs
    dz = torch.empty_like(xk) if need_dz else None
    if xk.numel() == 0:
        dx = torch.empty_like(xk) if need_dx else None
    else:
        dx = ops.grad_input(dy, xk, v, mean, s, weight, bias, sums, True, eps, activation,
                            slope=negative_slope, z=z, mask=mask, need_dx=need_dx, dz=dz,
                            count=count)
    return tuple(t if t is not None else x.new_empty(0) for t in (dx, dz))


@batch_norm_grad_input.register_fake
def _(dy, x, weight, bias, residual, mean, s, mask, sums, count, eps, activation, negative_slope,
      needs):
    xk, _ = kernel_view(x)
    return tuple(torch.empty_like(xk) if need else x.new_empty(0) for need in needs)


def _setup_context(ctx, inputs, output):
    x, mean, s, weight, bias, residual, training, eps, activation, slope, count, group = inputs
    reload = ops.residual_mode(activation, residual is not None) == ops.RES_RELOAD
    ctx.save_for_backward(x, weight, bias, residual if reload else None, mean, s, output[1],
                          count)
    ctx.training, ctx.eps, ctx.activation, ctx.slope = training, eps, activation, slope
    ctx.has_residual, ctx.group = residual is not None, group


def _backward(ctx, dy, _):
    """dx in training includes the batch statistics' dependence on x (mean and s are
    x's own, passed in detached): the whole BatchNorm backward, as aten's. With a
    group (SyncBatchNorm), that dependence is on every process's batch: the sums
    go through a functional all_reduce between the two halves."""
    x, weight, bias, residual, mean, s, mask, count = ctx.saved_tensors
    need_dx, _, _, need_dw, need_db, need_dz = ctx.needs_input_grad[:6]
    need_dw, need_db = need_dw and weight is not None, need_db and bias is not None
    need_dz = need_dz and ctx.has_residual
    via_op = need_dz and ctx.activation is not None  # else dz is dy itself
    dx = dw = db = dz = None
    args = (x, weight, bias, residual, mean, s, mask)
    common = (ctx.eps, ctx.activation, ctx.slope)
    if ctx.group is not None and ctx.training:
        sums = None
        if need_dx or need_dw or need_db:
            sums, dw, db = torch.ops.tritonbn.batch_norm_grad_sums(dy, *args, *common,
                                                                   [need_dw, need_db])
            if need_dx:
                from torch.distributed import _functional_collectives as funcol

                sums = funcol.all_reduce(sums, "sum", ctx.group)
        if need_dx or via_op:
            dx, dz = torch.ops.tritonbn.batch_norm_grad_input(
                dy, *args, sums, count if need_dx else None, *common, [need_dx, via_op])
    elif need_dx or need_dw or need_db or via_op:
        dx, dw, db, dz = torch.ops.tritonbn.batch_norm_backward(
            dy, *args, ctx.training, *common, [need_dx, need_dw, need_db, via_op])
    if need_dz and not via_op:
        dz = dy
    return (dx if need_dx else None, None, None, dw if need_dw else None,
            db if need_db else None, dz if need_dz else None, None, None, None, None, None, None)


batch_norm.register_autograd(_backward, setup_context=_setup_context)
