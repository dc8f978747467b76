"""Host side: views, allocation, launch parameters and kernel launches.

No autograd here (see autograd.py) and no math beyond shapes: every number a
user sees is computed by the Triton kernels in kernels/.
"""
from __future__ import annotations

import contextlib
import os
import struct

import torch
import triton
import triton.language as tl

from . import kernels as K
from .heuristics import Config, heuristic, plan
from .layout import View, kernel_view, like

ACTIVATIONS = {None: 0, "relu": 1}

# Test and tuning hooks: a Config per kernel kind instead of the heuristic, and
# 64-bit offsets on tensors too small to need them.
_overrides: dict = {"reduce": None, "elementwise": None, "int64": False}


def interpreting() -> bool:
    """True when Triton runs kernels through its CPU interpreter (TRITON_INTERPRET=1)."""
    try:
        from triton import knobs

        return bool(knobs.runtime.interpret)
    except (ImportError, AttributeError):  # older triton without knobs
        return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def uses_triton(x: torch.Tensor) -> bool:
    """CUDA tensors always run the Triton kernels; CPU tensors do under the interpreter."""
    return x.is_cuda or interpreting()


@contextlib.contextmanager
def launch_overrides(reduce: Config | None = None, elementwise: Config | None = None,
                     int64: bool = False):
    """Force launch configs (per kernel kind) and/or 64-bit offsets inside the block."""
    saved = dict(_overrides)
    _overrides.update(reduce=reduce, elementwise=elementwise, int64=int64)
    try:
        yield
    finally:
        _overrides.update(saved)


def _acc(dtype: torch.dtype):
    return (torch.float64, tl.float64) if dtype == torch.float64 else (torch.float32, tl.float32)


def _launch(kind: str, x: torch.Tensor, v: View):
    """(grid, keyword arguments) shared by every tile kernel over x."""
    cfg = _overrides[kind] or heuristic(kind, v, x.element_size(), x.device, interpreting())
    grid, tile_args, meta = plan(v, cfg)
    kw = dict(C=v.C, OUTER=v.outer, INNER=v.inner, s_outer=v.s_outer, s_c=v.s_c,
              s_inner=v.s_inner, CHANNEL_LAST=v.channel_last,
              INT64=_overrides["int64"] or x.numel() >= 2**31,
              ACC=_acc(x.dtype)[1], **tile_args, **meta)
    return grid, kw


def _combine_blocks(C: int, split: int):
    BLOCK_C = min(triton.next_power_of_2(C), 64)
    BLOCK_S = min(triton.next_power_of_2(split), 32)
    return (triton.cdiv(C, BLOCK_C),), BLOCK_C, BLOCK_S


def _fp32_pair(value: float) -> tuple[float, float]:
    """value as hi + lo, both exact float32s, for float64 scalars in kernels."""
    hi = struct.unpack("f", struct.pack("f", value))[0]
    return hi, float(value) - hi


def batch_stats(x, v, running_mean, running_var, num_batches_tracked, momentum, eps):
    """Batch mean and invstd (fp32, fp64 for fp64 x); running stats updated in place.

    momentum=None takes the factor 1/num_batches_tracked on the device.
    """
    acc = _acc(x.dtype)[0]
    grid, kw = _launch("reduce", x, v)
    partials = torch.empty((3, grid[1], v.C), dtype=acc, device=x.device)
    K.stats_partial_kernel[grid](x, partials, **kw)
    mean = torch.empty(v.C, dtype=acc, device=x.device)
    invstd = torch.empty_like(mean)
    update = running_mean is not None and running_var is not None
    from_nbt = update and momentum is None
    if from_nbt and num_batches_tracked is None:
        raise TypeError("momentum=None needs num_batches_tracked for its cumulative average")
    cgrid, BLOCK_C, BLOCK_S = _combine_blocks(v.C, grid[1])
    K.stats_combine_kernel[cgrid](
        partials, mean, invstd,
        running_mean if update else mean, running_var if update else mean,
        num_batches_tracked if from_nbt else mean,
        v.C, grid[1], v.count, *_fp32_pair(momentum or 0.0), float(eps),
        BLOCK_S=BLOCK_S, BLOCK_C=BLOCK_C, UPDATE_RUNNING=update,
        MOMENTUM_FROM_NBT=from_nbt, ACC=_acc(x.dtype)[1],
    )
    return mean, invstd


def forward(x, weight, bias, running_mean, running_var, num_batches_tracked,
            batch: bool, momentum, eps, activation):
    """y = act(batchnorm(x)). Returns y, the x the kernels read, its View, and the
    per-channel (mean, s) that backward needs: s is invstd for batch statistics,
    running_var (with FROM_VAR) for eval."""
    x, v = kernel_view(x)
    y = torch.empty_like(x)
    if x.numel() == 0:
        return y, x, v, None, None
    if batch:
        mean, s = batch_stats(x, v, running_mean, running_var, num_batches_tracked, momentum, eps)
    else:
        mean, s = running_mean, running_var
    grid, kw = _launch("elementwise", x, v)
    K.normalize_kernel[grid](
        x, y, mean, s, weight if weight is not None else s, bias if bias is not None else s,
        eps=float(eps), FROM_VAR=not batch, HAS_W=weight is not None,
        HAS_B=bias is not None, ACT=ACTIVATIONS[activation], **kw,
    )
    return y, x, v, mean, s


def backward(dy, x, v, mean, s, weight, bias, batch: bool, eps, activation, needs):
    """(dx, dweight, dbias), each None unless asked for in needs = (dx?, dw?, db?)."""
    need_dx, need_dw, need_db = needs
    need_dw = need_dw and weight is not None
    need_db = need_db and bias is not None
    if x.numel() == 0:
        return (torch.empty_like(x) if need_dx else None,
                torch.zeros_like(weight) if need_dw else None,
                torch.zeros_like(bias) if need_db else None)
    dy = like(dy, x)
    acc = _acc(x.dtype)[0]
    common = dict(eps=float(eps), FROM_VAR=not batch, HAS_W=weight is not None,
                  HAS_B=bias is not None, ACT=ACTIVATIONS[activation])
    w = weight if weight is not None else s
    b = bias if bias is not None else s
    dw = torch.empty_like(weight) if need_dw else None
    db = torch.empty_like(bias) if need_db else None
    sums = None
    if need_dw or need_db or (need_dx and batch):
        grid, kw = _launch("reduce", x, v)
        partials = torch.empty((2, grid[1], v.C), dtype=acc, device=x.device)
        K.bwd_reduce_kernel[grid](x, dy, mean, s, w, b, partials, **common, **kw)
        sums = torch.empty((2, v.C), dtype=acc, device=x.device)
        cgrid, BLOCK_C, BLOCK_S = _combine_blocks(v.C, grid[1])
        K.bwd_combine_kernel[cgrid](
            partials, sums, dw if need_dw else sums, db if need_db else sums, v.C, grid[1],
            BLOCK_S=BLOCK_S, BLOCK_C=BLOCK_C, HAS_DW=need_dw, HAS_DB=need_db, ACC=_acc(x.dtype)[1],
        )
    dx = None
    if need_dx:
        dx = torch.empty_like(x)
        grid, kw = _launch("elementwise", x, v)
        K.bwd_dx_kernel[grid](
            x, dy, dx, mean, s, w, b, sums if sums is not None else s,
            count=v.count, TRAINING=batch, **common, **kw,
        )
    return dx, dw, db
