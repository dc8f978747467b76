"""Host side: views, allocation, launch parameters and kernel launches.

No autograd here (see autograd.py) and no math beyond shapes: every number a
user sees is computed by the Triton kernels in kernels/.
"""
from __future__ import annotations

import contextlib
import os
import struct

import torch
import triton.language as tl

from . import kernels as K
from . import tuning
from .heuristics import (KERNELS, PASS_KERNELS, REDUCE_KERNELS, TILE_KERNELS, CombineConfig,
                         Config, plan, plan_combine)
from .layout import View, kernel_view, like

ACTIVATIONS = {None: 0, "relu": 1}

# Test and tuning hooks: a config per kernel instead of the selected one (tuned or
# heuristic), and 64-bit offsets on tensors too small to need them.
_overrides: dict = dict.fromkeys(KERNELS) | {"int64": False}
# groups of kernels launch_overrides accepts under one name
GROUPS = {"reduce": REDUCE_KERNELS,
          "elementwise": tuple(k for k in TILE_KERNELS if k not in REDUCE_KERNELS)}


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
def launch_overrides(int64: bool | None = None, **configs: Config | CombineConfig | None):
    """Force launch configs inside the block, by kernel name (see heuristics.KERNELS)
    or group ("reduce": stats + bwd_reduce, "elementwise": normalize + dx); None
    keeps the usual choice. int64=True forces 64-bit offsets."""
    saved = dict(_overrides)
    for name, cfg in configs.items():
        if name not in KERNELS and name not in GROUPS:
            raise TypeError(f"launch_overrides: unknown kernel {name!r}; "
                            f"choose from {', '.join(KERNELS + tuple(GROUPS))}")
        for k in GROUPS.get(name, (name,)):
            _overrides[k] = cfg
    if int64 is not None:
        _overrides["int64"] = int64
    try:
        yield
    finally:
        _overrides.update(saved)


def _acc(dtype: torch.dtype):
    return (torch.float64, tl.float64) if dtype == torch.float64 else (torch.float32, tl.float32)


def _launch(kernel: str, x: torch.Tensor, v: View):
    """(grid, keyword arguments) of a tile kernel over x: the forced config, else
    the tuned one for x's shape bucket, else the heuristic."""
    cfg = _overrides[kernel] or tuning.select(kernel, x, v, interpreting())
    grid, tile_args, meta = plan(v, cfg)
    kw = dict(C=v.C, OUTER=v.outer, INNER=v.inner, s_outer=v.s_outer, s_c=v.s_c,
              s_inner=v.s_inner, CHANNEL_LAST=v.channel_last,
              INT64=_overrides["int64"] or x.numel() >= 2**31,
              ACC=_acc(x.dtype)[1], **tile_args, **meta)
    return grid, kw


def _launch_combine(kernel: str, x: torch.Tensor, v: View, split: int):
    """(grid, keyword arguments) of a combine kernel over `split` partials."""
    cfg = _overrides[kernel] or tuning.select(kernel, x, v, interpreting(), split=split)
    grid, meta = plan_combine(v.C, cfg)
    return grid, dict(ACC=_acc(x.dtype)[1], **meta)


def _fp32_pair(value: float) -> tuple[float, float]:
    """value as hi + lo, both exact float32s, for float64 scalars in kernels."""
    hi = struct.unpack("f", struct.pack("f", value))[0]
    return hi, float(value) - hi


def batch_stats(x, v, running_mean, running_var, num_batches_tracked, momentum, eps):
    """Batch mean and invstd (fp32, fp64 for fp64 x); running stats updated in place.

    momentum=None takes the factor 1/num_batches_tracked on the device.
    """
    acc = _acc(x.dtype)[0]
    update = running_mean is not None and running_var is not None
    from_nbt = update and momentum is None
    if from_nbt and num_batches_tracked is None:
        raise TypeError("momentum=None needs num_batches_tracked for its cumulative average")
    grid, kw = _launch("stats", x, v)
    partials = torch.empty((3, grid[1], v.C), dtype=acc, device=x.device)
    K.stats_partial_kernel[grid](x, partials, **kw)
    mean = torch.empty(v.C, dtype=acc, device=x.device)
    invstd = torch.empty_like(mean)
    cgrid, ckw = _launch_combine("stats_combine", x, v, grid[1])
    K.stats_combine_kernel[cgrid](
        partials, mean, invstd,
        running_mean if update else mean, running_var if update else mean,
        num_batches_tracked if from_nbt else mean,
        v.C, grid[1], v.count, *_fp32_pair(momentum or 0.0), float(eps),
        UPDATE_RUNNING=update, MOMENTUM_FROM_NBT=from_nbt, **ckw,
    )
    return mean, invstd


def _act_args(weight, bias, batch, eps, activation) -> dict:
    """Per-channel parameter flags shared by normalize and the backward kernels."""
    return dict(eps=float(eps), FROM_VAR=not batch, HAS_W=weight is not None,
                HAS_B=bias is not None, ACT=ACTIVATIONS[activation])


def normalize(x, v, mean, s, weight, bias, batch: bool, eps, activation):
    """y = act((x - mean) * invstd * weight + bias), in x's strides."""
    y = torch.empty_like(x)
    grid, kw = _launch("normalize", x, v)
    K.normalize_kernel[grid](
        x, y, mean, s, weight if weight is not None else s, bias if bias is not None else s,
        **_act_args(weight, bias, batch, eps, activation), **kw,
    )
    return y


def forward(x, weight, bias, running_mean, running_var, num_batches_tracked,
            batch: bool, momentum, eps, activation):
    """y = act(batchnorm(x)). Returns y, the x the kernels read, its View, and the
    per-channel (mean, s) that backward needs: s is invstd for batch statistics,
    running_var (with FROM_VAR) for eval."""
    x, v = kernel_view(x)
    if x.numel() == 0:
        return torch.empty_like(x), x, v, None, None
    tuning.on_first_use(PASS_KERNELS["fwd"] if batch else ("normalize",),
                        x, v, interpreting(), weight=weight, bias=bias, eps=eps,
                        activation=activation)
    if batch:
        mean, s = batch_stats(x, v, running_mean, running_var, num_batches_tracked, momentum, eps)
    else:
        mean, s = running_mean, running_var
    return normalize(x, v, mean, s, weight, bias, batch, eps, activation), x, v, mean, s


def grad_sums(dy, x, v, mean, s, weight, bias, batch: bool, eps, activation, need_dw, need_db):
    """(sums, dweight, dbias): sums[0] = sum dy', sums[1] = sum dy' * xhat per channel;
    dweight/dbias written only when asked for (else None)."""
    acc = _acc(x.dtype)[0]
    grid, kw = _launch("bwd_reduce", x, v)
    partials = torch.empty((2, grid[1], v.C), dtype=acc, device=x.device)
    K.bwd_reduce_kernel[grid](x, dy, mean, s, weight if weight is not None else s,
                              bias if bias is not None else s, partials,
                              **_act_args(weight, bias, batch, eps, activation), **kw)
    sums = torch.empty((2, v.C), dtype=acc, device=x.device)
    dw = torch.empty_like(weight) if need_dw else None
    db = torch.empty_like(bias) if need_db else None
    cgrid, ckw = _launch_combine("bwd_combine", x, v, grid[1])
    K.bwd_combine_kernel[cgrid](
        partials, sums, dw if need_dw else sums, db if need_db else sums, v.C, grid[1],
        HAS_DW=need_dw, HAS_DB=need_db, **ckw,
    )
    return sums, dw, db


def grad_input(dy, x, v, mean, s, weight, bias, sums, batch: bool, eps, activation):
    """dx; training (batch statistics) needs the grad_sums of the same dy."""
    dx = torch.empty_like(x)
    grid, kw = _launch("dx", x, v)
    K.bwd_dx_kernel[grid](
        x, dy, dx, mean, s, weight if weight is not None else s, bias if bias is not None else s,
        sums if sums is not None else s, count=v.count, TRAINING=batch,
        **_act_args(weight, bias, batch, eps, activation), **kw,
    )
    return dx


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
    reduce = need_dw or need_db or (need_dx and batch)
    kernels = (("bwd_reduce", "bwd_combine") if reduce else ()) + (("dx",) if need_dx else ())
    tuning.on_first_use(kernels, x, v, interpreting(), weight=weight, bias=bias, eps=eps,
                        activation=activation, dy=dy)
    sums = dw = db = None
    if reduce:
        sums, dw, db = grad_sums(dy, x, v, mean, s, weight, bias, batch, eps, activation,
                                 need_dw, need_db)
    dx = None
    if need_dx:
        dx = grad_input(dy, x, v, mean, s, weight, bias, sums, batch, eps, activation)
    return dx, dw, db
