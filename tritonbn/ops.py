"""Host side: views, allocation, launch parameters and kernel launches.

No autograd here (see autograd.py) and no math beyond shapes: every number a
user sees is computed by the Triton kernels in kernels/.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import os
import struct

import torch
import triton.language as tl

from . import heuristics
from . import kernels as K
from . import tuning
from .heuristics import (KERNELS, REDUCE_KERNELS, TILE_KERNELS, CombineConfig,
                         Config, plan, plan_combine)
from .layout import View, kernel_view, like

# activation name -> the kernels' ACT constexpr (kernels/common.py)
ACTIVATIONS = {None: 0, "relu": 1, "leaky_relu": 2, "silu": 3, "gelu": 4, "relu6": 5,
               "hardswish": 6, "hardsigmoid": 7, "mish": 8, "elu": 9, "gelu_tanh": 10}
# what backward keeps of a residual z added before the activation (the kernels' RES)
RES_NONE, RES_RELOAD, RES_MASK = 0, 1, 2


def residual_mode(activation, has_residual: bool) -> int:
    """How backward gets act'(pre) when pre includes a residual z:
    RES_MASK   relu, leaky_relu, relu6: act' is 1 or a constant, so 1 bit per element
               (E/8 bytes, written by the forward) is all backward needs;
    RES_RELOAD the others: act' needs pre itself, so backward reads z again (saving
               the caller's z costs no memory while anything else holds it, and at
               most E*s, the size of the pre-activation it replaces);
    RES_NONE   no residual, or no activation (dz = dy): nothing to keep."""
    if not has_residual or activation is None:
        return RES_NONE
    return RES_MASK if activation in ("relu", "leaky_relu", "relu6") else RES_RELOAD

# Test and tuning hooks: a config per kernel instead of the selected one (tuned or
# heuristic), and 64-bit offsets on tensors too small to need them.
# and which path (None: by the shape; "split": stats, combine, normalize; "fused": the
# single-program kernels where the tile fits). A forced config of a split kernel
# means the split path, unless path says otherwise.
# and, on the split path, where the combines run (None: by default "last", in the last
# program of each reduce launch; "kernel": a combine launch of their own). A forced
# config of a combine kernel means "kernel" for its pass, unless combine says otherwise.
# "epoch" changes whenever a launch_overrides block starts or ends: what a training
# forward planned for its backward (_FwdPlan.backward) holds while it is the same.
_overrides: dict = dict.fromkeys(KERNELS) | {"int64": False, "path": None, "forced": False,
                                             "combine": None, "flat": True, "epoch": 0}
_epochs = itertools.count(1)
PATHS = ("split", "fused")
COMBINES = ("last", "kernel")
# groups of kernels launch_overrides accepts under one name
GROUPS = {"reduce": REDUCE_KERNELS,
          "elementwise": tuple(k for k in TILE_KERNELS if k not in REDUCE_KERNELS)}


def _kernels_interpreted() -> bool:
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(K.stats_partial_kernel, InterpretedFunction)


# @triton.jit makes interpreted kernels when TRITON_INTERPRET is set at triton's import,
# and only then: fixed for the process, so read once (it runs before every launch)
_INTERPRETED = _kernels_interpreted()
_InterpretedFunction = type(K.stats_partial_kernel) if _INTERPRETED else None


@torch.compiler.assume_constant_result  # torch.compile: read once while tracing, not traced
def interpreting() -> bool:
    """True when Triton runs tritonbn's kernels through its CPU interpreter
    (TRITON_INTERPRET=1 set before triton was imported)."""
    return _INTERPRETED


def uses_triton(x: torch.Tensor) -> bool:
    """CUDA tensors always run the Triton kernels; CPU tensors do under the interpreter."""
    return x.is_cuda or interpreting()


@contextlib.contextmanager
def launch_overrides(int64: bool | None = None, path: str | None = None,
                     combine: str | None = None, flat: bool | None = None,
                     **configs: Config | CombineConfig | None):
    """Force launch configs inside the block, by kernel name (see heuristics.KERNELS)
    or group ("reduce": stats + bwd_reduce, "elementwise": normalize + dx); None
    keeps the usual choice. int64=True forces 64-bit offsets. path="split" or
    "fused" forces that path (fused where its tile fits, heuristics.fused_tile); a
    forced config alone implies the split path. combine="last" or "kernel" forces
    where the split path's combines run (see _last_combine). flat=False keeps the
    elementwise kernels on 2-D tiles where they would take flat ones (flat_tiles)."""
    if path is not None and path not in PATHS:
        raise TypeError(f"launch_overrides: path must be one of {PATHS}, got {path!r}")
    if combine is not None and combine not in COMBINES:
        raise TypeError(f"launch_overrides: combine must be one of {COMBINES}, got {combine!r}")
    for name in configs:  # every name checked before anything changes
        if name not in KERNELS and name not in GROUPS:
            raise TypeError(f"launch_overrides: unknown kernel {name!r}; "
                            f"choose from {', '.join(KERNELS + tuple(GROUPS))}")
    saved = dict(_overrides)
    _overrides["epoch"] = next(_epochs)
    for name, cfg in configs.items():
        for k in GROUPS.get(name, (name,)):
            _overrides[k] = cfg
    if int64 is not None:
        _overrides["int64"] = int64
    if path is not None:
        _overrides["path"] = path
    if combine is not None:
        _overrides["combine"] = combine
    if flat is not None:
        _overrides["flat"] = flat
    _overrides["forced"] = any(_overrides[k] is not None for k in KERNELS)
    try:
        yield
    finally:
        _overrides.update(saved)
        _overrides["epoch"] = next(_epochs)


def _fused_tile(x: torch.Tensor, v: View):
    """The single-program tile a call over x takes (heuristics.fused_tile), or None
    for the split path."""
    path = _overrides["path"]
    if path == "split" or (path is None and _overrides["forced"]):
        return None
    tile = heuristics.fused_tile(v, x.element_size(), interpreting())
    if tile is None or (path is None and v.count > heuristics.FUSED_MAX_EXTENT):
        return None
    return tile


def path_of(x: torch.Tensor) -> str:
    """Which path a training step over x takes: "fused" (single-program) or "split"."""
    xk, v = kernel_view(x)
    return "split" if _fused_tile(xk, v) is None else "fused"


def combine_of(x: torch.Tensor) -> str:
    """Where a training forward's combine over x runs on the split path: "last" (in
    the stats launch's last programs; not under CUDA graph capture, see _counter) or
    "kernel" (a launch of its own)."""
    xk, v = kernel_view(x)
    cfg = _select("stats", xk, v)
    return "last" if _last_combine("stats_combine", heuristics.split_of(v, cfg),
                                   cfg.BLOCK_C) else "kernel"


def _acc(dtype: torch.dtype):
    return (torch.float64, tl.float64) if dtype == torch.float64 else (torch.float32, tl.float32)


# Each kernel's arguments after its pointers, in signature order (read at import,
# before any tool wraps the kernels). Launches pass everything positionally: a
# launch with keyword arguments costs several µs more on the host (issue 14).
def _scalar_names(fn) -> tuple:
    names = list(fn.arg_names)
    first = next(i for i, n in enumerate(names) if not n.endswith("_ptr"))
    assert not any(n.endswith("_ptr") for n in names[first:]), f"{fn}: pointers first"
    return tuple(names[first:])


_SCALARS = {name: _scalar_names(getattr(K, name)) for name in K.__all__}
# (grid, scalar arguments, options) of every launch signature seen, built once per
# signature: cleared when it grows past _MAX_PLANS (a model of ever-new shapes),
# never consulted stale (the key holds everything the entry is made of).
_plans: dict = {}
_MAX_PLANS = 4096


def _template(shape, dtype, device) -> torch.Tensor:
    """A plan's tensor of what a call allocates, for torch.empty_like: contiguous, never
    written (its own storage, so that nothing a launch writes aliases it)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _remember(key, value):
    if len(_plans) >= _MAX_PLANS:
        _plans.clear()
    _plans[key] = value
    return value


# Launching an already-compiled kernel (issue 14). Triton's JIT launch (binder,
# specialization key, cache lookup) cost ~70 µs a launch on the first GPU lease's
# host. A planned launch keeps the CompiledKernel its first JIT launch returned and
# then calls that kernel's launcher itself, with the arguments the JIT would pass
# (every one, in signature order), while the specialization still holds: each
# pointer's dtype and 16-byte alignment, the device, Triton's debug flag, no
# pre-run or launch hooks. Anything else, and the interpreter, goes through
# fn[grid](...). TRITONBN_FAST_LAUNCH=0, read at import, turns it off.
_FAST_LAUNCH = os.environ.get("TRITONBN_FAST_LAUNCH", "1") != "0" and not _INTERPRETED


@functools.lru_cache(maxsize=None)
def _triton_runtime():
    """(triton's driver, triton.knobs), imported once: the fast path's only use of them."""
    from triton import knobs
    from triton.runtime.driver import driver
    return driver, knobs


def _device_stream():
    """(device, stream) as Triton's JIT launch takes them: the current ones."""
    driver = _triton_runtime()[0]
    device = driver.active.get_current_device()
    return device, driver.active.get_current_stream(device)


def _no_hooks(fn) -> bool:
    """fn is Triton's JITFunction (not a tool's wrapper) and no pre-run or launch
    hook is set: the JIT launch would do nothing the fast path leaves out."""
    if getattr(fn, "pre_run_hooks", None) != []:
        return False
    runtime = _triton_runtime()[1].runtime
    enter, exit_ = runtime.launch_enter_hook, runtime.launch_exit_hook
    return ((enter is None or not getattr(enter, "calls", True))
            and (exit_ is None or not getattr(exit_, "calls", True)))


def _spec(ptrs, device) -> tuple:
    """What a compiled kernel was specialized on beyond its plan: the pointers'
    dtypes and 16-byte alignment, the device and Triton's debug flag."""
    return (device, _triton_runtime()[1].runtime.debug,
            *[(t.dtype, not t.data_ptr() & 15) for t in ptrs])


def _go(fn, launch, compiled: dict, name: str, *ptrs):
    """Launch fn with launch = (grid, scalar arguments, options) and the pointer
    arguments ptrs: through the compiled kernel kept in compiled[name] when its
    specialization holds (see _FAST_LAUNCH), else through fn[grid], keeping what
    that returns for the next call."""
    grid, args, opts = launch
    if _FAST_LAUNCH and _no_hooks(fn):
        device, stream = _device_stream()
        spec = _spec(ptrs, device)
        hit = compiled.get(name)
        if hit is not None and hit[0] == spec:
            k = hit[1]
            k.run(grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1,
                  stream, k.function, k.packed_metadata, None, None, None, *ptrs, *args)
            return
        k = fn[grid](*ptrs, *args, **opts)
        if hasattr(k, "packed_metadata") and hasattr(k, "function"):
            compiled[name] = (spec, k)
        return
    if type(fn) is _InterpretedFunction:  # the interpreter's launcher itself, as k.run above
        fn.run(*ptrs, *args, grid=grid, warmup=False, **opts)
    else:  # fn[grid] is a proxy for fn.run; a tool's wrapper (tests' spies) may have only it
        fn[grid](*ptrs, *args, **opts)


# The last-program combine (kernels/common.py, last_to_arrive): the split path's
# reduce launches end with the combine, run by the last program of each channel
# block to finish, so each pass is 2 launches, not 3. TRITONBN_LAST_COMBINE=0, read
# at import, turns it off (a combine launch of its own, as before).
_LAST_COMBINE = os.environ.get("TRITONBN_LAST_COMBINE", "1") != "0"


def _last_combine(combine_kernel: str, split: int, block_c: int) -> bool:
    """Whether this pass's combine runs in its reduce launch's last program: forced
    either way, else by default where that program's sweep is short
    (heuristics.last_combine_fits for the reduce launch's split and BLOCK_C), unless
    the combine kernel's config is forced."""
    mode = _overrides["combine"]
    if mode is not None:
        return mode == "last"
    return (_LAST_COMBINE and _overrides[combine_kernel] is None
            and heuristics.last_combine_fits(split, block_c))


# Arrival counters of the last-program combine, one int32 per channel block, per
# (device, stream): two launches at once on different streams never share one. Every
# launch leaves them at 0. Not under CUDA graph capture: a graph would keep the
# counters' address, and its replay (on any stream) could then meet an eager launch
# on the capture's stream at the same counters; a capture takes the combine launches
# (the same count of graph nodes as a counter of its own, whose zeroing is a node).
_counters: dict = {}
_MAX_COUNTERS = 64


def _counter(x: torch.Tensor, blocks: int) -> torch.Tensor | None:
    """At least `blocks` zeroed arrival counters for launches over x on the current
    stream, or None while a CUDA graph is being captured."""
    dev = x.device
    if _capturing(dev):
        return None
    if dev.type == "cuda":
        key = (dev.index, torch._C._cuda_getCurrentRawStream(dev.index))
    else:
        key = (dev, 0)
    c = _counters.get(key)
    if c is None or c.numel() < blocks:
        if len(_counters) >= _MAX_COUNTERS:
            _counters.clear()  # freed memory is reused in stream order: no launch loses its own
        c = _counters[key] = torch.zeros(max(blocks, 256), dtype=torch.int32, device=dev)
    return c


def _capturing(dev: torch.device) -> bool:
    """A CUDA graph is being captured on the current stream of dev."""
    return dev.type == "cuda" and torch.cuda.is_current_stream_capturing()


# the stats kernel's arguments beyond the view: its last-program combine's, and those of
# a launch without it
_STATS_PARTIAL = ("momentum_hi", "momentum_lo", "eps", "COMBINE", "BLOCK_S", "UPDATE_RUNNING",
                  "MOMENTUM_FROM_NBT", "COUNT_BATCH")
_NO_COMBINE_STATS = (0.0, 0.0, 0.0, False, 1, False, False, False)
# bwd_reduce's, after its _ACT and RES
_REDUCE_COMBINE = ("COMBINE", "BLOCK_S", "HAS_DW", "HAS_DB")
_NO_COMBINE_GRADS = (False, 1, False, False)


def _select(kernel, x, v, split=None, src=None):
    """The config kernel launches with: forced, else tuned for x's bucket, else heuristic
    (src: tuning.source of x, when the caller has it)."""
    return _overrides[kernel] or tuning.select(kernel, x, v, interpreting(), split=split,
                                               src=src)


def _int64(v: View) -> bool:
    """64-bit offsets: forced, or needed (2**31 elements or more)."""
    return _overrides["int64"] or v.outer * v.C * v.inner >= 2**31


def flat_tiles(v: View, cfg: Config, elem_size: int) -> bool:
    """Whether normalize and dx without a bit mask walk v in FLAT tiles
    (kernels/common.py, flat_tile): contiguous channel-first planes (each channel's
    right after the last) of at most heuristics.SHORT_ROWS positions, that one tile
    row holds whole, and whose rows are not 16-byte aligned, so that 2-D tiles load
    them narrowly (the 7x7 layers: rows of 49, an element at a time), where a run of
    BLOCK_C planes is aligned as C is. Not where a bit mask is written or read: its
    layout is 2-D (mask_view). Longer rows (14x14 fp16: 64-bit loads in 2-D) stay 2-D:
    flat tiles of 16 elements a thread took more registers there in the sm_90 compile
    (normalize 64 -> 80, dx 122 -> 128; the parameters are per element)."""
    return (_overrides["flat"] and not v.channel_last and v.s_inner == 1 and v.s_c == v.inner
            and v.inner <= min(cfg.BLOCK_M, heuristics.SHORT_ROWS)
            and (v.inner * elem_size) % 16 != 0)


def _launch(kernel: str, fn: str, x: torch.Tensor, v: View, mask=None, extra: tuple = (),
            names: tuple = ()):
    """(grid, scalar arguments of fn in order, launch options) of a tile kernel over x:
    the forced config, else the tuned one for x's shape bucket, else the heuristic;
    extra gives the values of the kernel arguments named in names. With a bit mask,
    the tile holds a multiple of 8 reduced-axis positions (whole bytes of the mask).
    Cached per (kernel, view, config, mask, offsets, dtype, extra): a change in any
    of them, a newly tuned config too, is a new entry."""
    cfg = _select(kernel, x, v)
    int64 = _int64(v)
    key = (kernel, v, cfg, mask is not None, int64, x.dtype, extra, _overrides["flat"])
    hit = _plans.get(key)
    if hit is None:
        if mask is not None and cfg.BLOCK_M % 8:
            cfg = dataclasses.replace(cfg, BLOCK_M=8, BLOCK_C=max(1, cfg.BLOCK_C * cfg.BLOCK_M // 8))
        grid, tile_args, meta = plan(v, cfg)
        named = _view_args(x, v, mask, int64, BLOCK_M=meta["BLOCK_M"],
                           BLOCK_C=meta["BLOCK_C"], **tile_args, **dict(zip(names, extra)),
                           FLAT=mask is None and flat_tiles(v, cfg, x.element_size()))
        hit = _remember(key, (grid, tuple(named[n] for n in _SCALARS[fn]),
                              dict(num_warps=meta["num_warps"], num_stages=meta["num_stages"])))
    return hit


def _view_args(x, v: View, mask, int64: bool, **more) -> dict:
    """The kernel arguments every tile kernel takes from the view (and the mask's)."""
    m = mask_view(v) if mask is not None else View(1, 1, 1, 1, 1, 1, v.channel_last)
    return dict(C=v.C, OUTER=v.outer, INNER=v.inner, s_outer=v.s_outer, s_c=v.s_c,
                s_inner=v.s_inner, CHANNEL_LAST=v.channel_last, INT64=int64,
                ACC=_acc(x.dtype)[1], M_OUTER=m.outer, M_INNER=m.inner, ms_outer=m.s_outer,
                ms_c=m.s_c, ms_inner=m.s_inner, count=v.count, **more)


def _launch_fused(fn: str, x: torch.Tensor, v: View, tile: tuple, mask=None, extra: tuple = (),
                  names: tuple = ()):
    """(grid, scalar arguments of fn in order, launch options) of a single-program
    kernel over x on tile (heuristics.fused_tile); cached as _launch's are."""
    int64 = _int64(v)
    key = (fn, v, tile, mask is not None, int64, x.dtype, extra)
    hit = _plans.get(key)
    if hit is None:
        block_m, block_i, block_c, num_warps = tile
        named = _view_args(x, v, mask, int64, BLOCK_M=block_m, BLOCK_I=block_i,
                           BLOCK_C=block_c, **dict(zip(names, extra)))
        hit = _remember(key, ((heuristics.cdiv(v.C, block_c),),
                              tuple(named[n] for n in _SCALARS[fn]),
                              dict(num_warps=num_warps, num_stages=1)))
    return hit


def _launch_combine(kernel: str, fn: str, x: torch.Tensor, v: View, split: int,
                    extra: tuple = (), names: tuple = ()):
    """(grid, scalar arguments of fn in order, launch options) of a combine kernel
    over `split` partials; cached as _launch's are."""
    cfg = _select(kernel, x, v, split)
    key = (kernel, v.C, cfg, x.dtype, split, extra)
    hit = _plans.get(key)
    if hit is None:
        grid, meta = plan_combine(v.C, cfg)
        named = dict(C=v.C, SPLIT=split, ACC=_acc(x.dtype)[1], BLOCK_S=meta["BLOCK_S"],
                     BLOCK_C=meta["BLOCK_C"], **dict(zip(names, extra)))
        hit = _remember(key, (grid, tuple(named[n] for n in _SCALARS[fn]),
                              dict(num_warps=meta["num_warps"])))
    return hit


@functools.lru_cache(maxsize=256)
def _fp32_pair(value: float) -> tuple[float, float]:
    """value as hi + lo, both exact float32s, for float64 scalars in kernels."""
    hi = struct.unpack("f", struct.pack("f", value))[0]
    return hi, float(value) - hi


def batch_stats(x, v, running_mean, running_var, num_batches_tracked, momentum, eps):
    """Batch mean and invstd (fp32, fp64 for fp64 x); running stats updated in place.

    momentum=None takes the factor 1/num_batches_tracked on the device.
    """
    mean, invstd, _ = combine_stats(x, v, stats_partials(x, v), running_mean, running_var,
                                    num_batches_tracked, momentum, eps)
    return mean, invstd


def stats_partials(x, v) -> torch.Tensor:
    """The stats kernel alone: per-split (mean, M2, count) of x, [3, split, C]."""
    grid, args, opts = _launch("stats", "stats_partial_kernel", x, v, None, _NO_COMBINE_STATS,
                               _STATS_PARTIAL)
    partials = torch.empty((3, grid[1], v.C), dtype=_acc(x.dtype)[0], device=x.device)
    K.stats_partial_kernel[grid](x, partials, *(partials,) * 6, *args, **opts)
    return partials


def local_stats(x, v) -> torch.Tensor:
    """This process's per-channel (mean, M2, count) as one partial, [3, 1, C] in the
    accumulation dtype (count 0 for an empty x): what SyncBatchNorm exchanges."""
    acc = _acc(x.dtype)[0]
    if x.numel() == 0:
        return torch.zeros((3, 1, v.C), dtype=acc, device=x.device)
    stats = torch.empty((3, 1, v.C), dtype=acc, device=x.device)
    combine_stats(x, v, stats_partials(x, v), None, None, None, 0.0, 0.0, partial_out=stats)
    return stats


def global_stats(x, v, running_mean, running_var, num_batches_tracked, momentum, eps, comm):
    """batch_stats over the batches of every process in comm (SyncBatchNorm): this
    process's local_stats go out through comm.gather, the partials of all come back
    and are combined here. Returns mean, invstd and the count per channel."""
    partials = comm.gather(local_stats(x, v))
    return combine_stats(x, v, partials, running_mean, running_var, num_batches_tracked,
                         momentum, eps, count_out=True)


def _running_flags(running_mean, running_var, num_batches_tracked, momentum) -> tuple:
    """(update the running stats?, momentum=None's 1/num_batches_tracked?)"""
    update = running_mean is not None and running_var is not None
    from_nbt = update and momentum is None
    if from_nbt and num_batches_tracked is None:
        raise TypeError("momentum=None needs num_batches_tracked for its cumulative average")
    return update, from_nbt


def combine_stats(x, v, partials, running_mean, running_var, num_batches_tracked, momentum,
                  eps, *, partial_out=None, count_out=False):
    """The stats_combine kernel alone, over partials [3, split, C]: (mean, invstd, count or None),
    running stats updated when given; with partial_out, only the combined partial."""
    update, from_nbt = _running_flags(running_mean, running_var, num_batches_tracked, momentum)
    split = partials.shape[1]
    mean = invstd = count = None
    if partial_out is None:
        mean = torch.empty(v.C, dtype=partials.dtype, device=x.device)
        invstd = torch.empty_like(mean)
        count = torch.empty_like(mean) if count_out else None
    any_ = partials  # a valid pointer for the arguments a launch does not use
    grid, args, opts = _launch_combine(
        "stats_combine", "stats_combine_kernel", x, v, split,
        (*_fp32_pair(momentum or 0.0), float(eps), update, from_nbt, partial_out is not None,
         count is not None, False), _COMBINE_STATS)
    K.stats_combine_kernel[grid](
        partials, mean if mean is not None else any_, invstd if invstd is not None else any_,
        running_mean if update else any_, running_var if update else any_,
        num_batches_tracked if from_nbt else any_,
        partial_out if partial_out is not None else any_, count if count is not None else any_,
        *args, **opts)
    return mean, invstd, count


_COMBINE_STATS = ("momentum_hi", "momentum_lo", "eps", "UPDATE_RUNNING", "MOMENTUM_FROM_NBT",
                  "WRITE_PARTIAL", "STORE_COUNT", "COUNT_BATCH")


# the per-channel parameter flags normalize and the backward kernels share (_act_args)
_ACT = ("eps", "slope", "FROM_VAR", "HAS_W", "HAS_B", "ACT")


def _act_args(weight, bias, batch, eps, activation, slope) -> tuple:
    return (float(eps), float(slope), not batch, weight is not None, bias is not None,
            ACTIVATIONS[activation])


def mask_view(v: View) -> View:
    """Shape and strides of the bit mask of a tensor seen as v: its reduced axis
    packed 8 positions to a byte (kernels/common.py, mask_tile)."""
    if v.channel_last:
        return View(-(-v.outer // 8), v.C, 1, v.C, 1, 1, True)
    ib = -(-v.inner // 8)
    return View(v.outer, v.C, ib, v.C * ib, ib, 1, False)


def new_mask(x: torch.Tensor, v: View) -> torch.Tensor:
    """An uninitialized bit mask for x (numel / 8 bytes, rounded up per row)."""
    m = mask_view(v)
    return torch.empty(m.outer * m.C * m.inner, dtype=torch.uint8, device=x.device)


def normalize(x, v, mean, s, weight, bias, batch: bool, eps, activation, *, slope=0.01,
              z=None, mask=None):
    """y = act((x - mean) * invstd * weight + bias [+ z]), in x's strides (z too).
    With `mask` (new_mask), also writes the bit of act'(pre) that RES_MASK reads."""
    y = torch.empty_like(x)
    grid, args, opts = _launch(
        "normalize", "normalize_kernel", x, v, mask,
        (*_act_args(weight, bias, batch, eps, activation, slope), z is not None,
         mask is not None), _ACT + ("HAS_RES", "WRITE_MASK"))
    K.normalize_kernel[grid](
        x, y, z if z is not None else x, mask if mask is not None else x,
        mean, s, weight if weight is not None else s, bias if bias is not None else s,
        *args, **opts)
    return y


def statistics(x, v, batch: bool, running_mean, running_var, num_batches_tracked, momentum,
               eps, comm=None, first_use=None):
    """(mean, s, count) for normalize and backward: the batch statistics (running stats
    updated in place; with comm, over every process's batch, and count is their
    count per channel, else None), or in eval the running stats themselves."""
    if not batch:
        return running_mean, running_var, None
    if comm is not None:
        return global_stats(x, v, running_mean, running_var, num_batches_tracked, momentum,
                            eps, comm)
    tile = _fused_tile(x, v)
    if tile is not None:  # the single-program kernel, statistics only
        update, from_nbt = _running_flags(running_mean, running_var, num_batches_tracked,
                                          momentum)
        mean = torch.empty(v.C, dtype=_acc(x.dtype)[0], device=x.device)
        s = torch.empty_like(mean)
        g, a, o = _launch_fused("fused_forward_kernel", x, v, tile, None,
                                _fused_forward_extra(None, None, eps, None, 0.0, False, False,
                                                     momentum, update, from_nbt, False, False),
                                _FUSED_FORWARD)
        K.fused_forward_kernel[g](x, x, x, x, mean, mean, mean, s,
                                  running_mean if update else mean,
                                  running_var if update else mean,
                                  num_batches_tracked if from_nbt else mean, *a, **o)
        return mean, s, None
    if first_use is not None:
        first_use(("stats", "stats_combine"), x, v, interpreting(), eps=eps)
    return (*batch_stats(x, v, running_mean, running_var, num_batches_tracked, momentum, eps),
            None)


# the single-program forward's arguments beyond the view (_fused_forward_extra)
_FUSED_FORWARD = ("eps", "slope", "HAS_W", "HAS_B", "ACT", "HAS_RES", "WRITE_MASK",
                  "momentum_hi", "momentum_lo", "UPDATE_RUNNING", "MOMENTUM_FROM_NBT",
                  "COUNT_BATCH", "WRITE_Y")


def _fused_forward_extra(weight, bias, eps, activation, slope, has_z, write_mask, momentum,
                         update, from_nbt, count, write_y) -> tuple:
    return (float(eps), float(slope), weight is not None, bias is not None,
            ACTIVATIONS[activation], has_z, write_mask, *_fp32_pair(momentum or 0.0), update,
            from_nbt, count, write_y)


def apply(x, v, mean, s, weight, bias, batch: bool, eps, activation, residual=None,
          slope=0.01, first_use=None):
    """(y, mask): y = act((x - mean) * s' * weight + bias [+ residual]) in x's strides,
    and the bit mask backward reads under RES_MASK (else None)."""
    if first_use is not None:
        first_use(("normalize",), x, v, interpreting(), weight=weight, bias=bias, eps=eps,
                  activation=activation)
    z = like(residual, x) if residual is not None else None
    mask = new_mask(x, v) if residual_mode(activation, z is not None) == RES_MASK else None
    y = normalize(x, v, mean, s, weight, bias, batch, eps, activation, slope=slope, z=z, mask=mask)
    return y, mask


def forward(x, weight, bias, running_mean, running_var, num_batches_tracked,
            batch: bool, momentum, eps, activation, slope=0.01, comm=None, count=False,
            first_use=None, residual=None):
    """y = act(batchnorm(x) [+ residual]): statistics, then apply. Returns y, the x the
    kernels read, its View, the per-channel (mean, s) that backward needs (s is invstd
    for batch statistics, running_var with FROM_VAR for eval), the bit mask backward
    reads under RES_MASK (else None), and the count per channel over every process
    when comm (SyncBatchNorm's collectives, distributed.py) joins the batch statistics
    of several processes (else None), and the forward's plan, for backward (None off
    the planned launches). residual has x's shape, in any strides.

    count (training): the call counts its batch, num_batches_tracked += 1, as torch's
    module does before F.batch_norm. The planned launches do it in the statistics
    kernel (issue 14: no add launch of its own, ~3-7 µs of host time a call); the
    other paths, and momentum=None (whose kernels read the count), add here first.

    first_use: tuning.tuner.on_first_use, or None: run before the split kernels launch
    one by one, it tunes their untuned buckets under TRITONBN_AUTOTUNE=1 (the tuner
    runs these ops itself, so they take it rather than import it)."""
    sig = None
    if comm is None and (momentum is not None or not count):
        # A call seen before on the single-program path: its plan in one lookup, keyed by
        # what the plan is made of, read off the call (issue 14: kernel_view, _fused_tile
        # and _forward_plan's key cost ~5 µs a call in sequence). Nothing else goes in:
        # the tile is a pure function of the view and the element size, the
        # launch_overrides in force are the epoch's, and no tuned config is consulted
        # (the split path, which consults them, and a copied x are not kept so).
        sig = ("signature", x.shape, x.stride(), x.dtype, x.device, batch, count, momentum, eps,
               activation, slope, weight is None, bias is None, running_mean is None,
               running_var is None, num_batches_tracked is None, residual is None,
               _overrides["epoch"])
        p = _plans.get(sig)
        if p is not None:
            z = like(residual, x) if residual is not None else None
            y, mean, s, mask = _fused_forward(p, x, z, weight, bias, running_mean, running_var,
                                              num_batches_tracked)
            return y, x, p.view, mean, s, mask, None, p
    xk, v = kernel_view(x)
    if xk is not x:
        x, sig = xk, None  # a copy: the next call's x needs one too
    if count and (momentum is None or x.numel() == 0):
        num_batches_tracked.add_(1)
        count = False
    if x.numel() == 0:
        mean = s = count = None
        if batch and comm is not None:  # no data here, but the others wait for these stats
            mean, s, count = global_stats(x, v, running_mean, running_var,
                                          num_batches_tracked, momentum, eps, comm)
        return torch.empty_like(x), x, v, mean, s, None, count, None
    # SyncBatchNorm's collectives, and tuning on first use (TRITONBN_AUTOTUNE=1) of the
    # split kernels, go kernel by kernel; everything else from a cached plan
    tile = _fused_tile(x, v)
    if comm is not None or (tile is None and tuning.mode() == 1):
        if count:
            num_batches_tracked.add_(1)
        mean, s, count = statistics(x, v, batch, running_mean, running_var,
                                    num_batches_tracked, momentum, eps, comm, first_use)
        y, mask = apply(x, v, mean, s, weight, bias, batch, eps, activation, residual, slope,
                        first_use)
        return y, x, v, mean, s, mask, count, None
    z = like(residual, x) if residual is not None else None
    y, mean, s, mask, p = _forward_planned(x, v, weight, bias, running_mean, running_var,
                                           num_batches_tracked, batch, momentum, eps, activation,
                                           slope, z, tile if batch else None, count and batch)
    if sig is not None and p.fused is not None:
        _remember(sig, p)
    return y, x, v, mean, s, mask, None, p


def _forward_planned(x, v, weight, bias, running_mean, running_var, num_batches_tracked, batch,
                     momentum, eps, activation, slope, z, tile, count):
    """forward's launches from a cached plan (issue 14: host time): the same kernels,
    configs and arguments batch_stats and apply would launch, without rebuilding
    them per call; tile is _fused_tile's (None in eval); count: the statistics
    kernel adds 1 to num_batches_tracked. Returns y, mean, s, the bit mask (or None)
    and the plan."""
    p = _forward_plan(x, v, weight, bias, running_mean, running_var, num_batches_tracked, batch,
                      momentum, eps, activation, slope, z is not None, tile, count)
    if p.fused is not None:
        return (*_fused_forward(p, x, z, weight, bias, running_mean, running_var,
                                num_batches_tracked), p)
    mask = torch.empty_like(p.mask) if p.mask is not None else None
    if batch:
        partials = torch.empty_like(p.partials)
        mean = torch.empty_like(p.stat)
        s = torch.empty_like(p.stat)
        rm = running_mean if p.update else partials
        rv = running_var if p.update else partials
        nbt = num_batches_tracked if p.nbt else partials
        counter = _counter(x, p.stats[0][0]) if p.stats_last is not None else None
        if counter is not None:  # one launch: the partials, and the combine in the last
            _go(K.stats_partial_kernel, p.stats_last, p.compiled, "stats_last",
                x, partials, mean, s, rm, rv, nbt, counter)
        else:
            _go(K.stats_partial_kernel, p.stats, p.compiled, "stats", x, partials,
                *(partials,) * 6)
            _go(K.stats_combine_kernel, p.combine, p.compiled, "combine",
                partials, mean, s, rm, rv, nbt, partials, partials)
    else:
        mean, s = running_mean, running_var
    y = torch.empty_like(x)
    _go(K.normalize_kernel, p.normalize, p.compiled, "normalize",
        x, y, z if z is not None else x, mask if mask is not None else x,
        mean, s, weight if weight is not None else s, bias if bias is not None else s)
    return y, mean, s, mask, p


def _fused_forward(p, x, z, weight, bias, running_mean, running_var, num_batches_tracked):
    """The single-program forward of plan p, one launch: statistics, running stats, y
    and the bit mask. Returns y, mean, s and the mask (or None)."""
    mask = torch.empty_like(p.mask) if p.mask is not None else None
    mean = torch.empty_like(p.stat)
    s = torch.empty_like(p.stat)
    y = torch.empty_like(x)
    _go(K.fused_forward_kernel, p.fused, p.compiled, "fused",
        x, y, z if z is not None else x, mask if mask is not None else x,
        weight if weight is not None else mean, bias if bias is not None else mean, mean, s,
        running_mean if p.update else mean, running_var if p.update else mean,
        num_batches_tracked if p.nbt else mean)
    return y, mean, s, mask


class _FwdPlan:
    """The launches of one forward signature, built once: (grid, scalar arguments,
    options) of each kernel, the shapes to allocate, and the running-stat flags; and,
    for the single-program path, the backward plans (backward) its calls' backward
    found, by the grads needed, with the launch_overrides epoch they were found in,
    and the view it was made for (view: forward's signature lookup returns it)."""
    __slots__ = ("acc", "partials", "stat", "stats", "stats_last", "combine", "normalize",
                 "mask", "update", "nbt", "fused", "compiled", "backward", "view")


def _forward_plan(x, v, weight, bias, running_mean, running_var, num_batches_tracked, batch,
                  momentum, eps, activation, slope, has_z, tile, count) -> _FwdPlan:
    """The cached plan of this forward signature. Its key holds every input of the
    plan: the view, dtype, device, flags, scalars and each kernel's selected config
    (or the single-program tile), so a newly tuned config, a forced one or other
    strides make a new plan."""
    update, from_nbt = (_running_flags(running_mean, running_var, num_batches_tracked, momentum)
                        if batch else (False, False))
    if tile is not None:
        cfgs = tile
    elif batch:
        src = tuning.source(x, interpreting())
        cfg_s = _select("stats", x, v, src=src)
        split = heuristics.split_of(v, cfg_s)
        cfgs = (cfg_s, _select("stats_combine", x, v, split, src),
                _select("normalize", x, v, src=src),
                _last_combine("stats_combine", split, cfg_s.BLOCK_C))
    else:
        cfgs = (_select("normalize", x, v),)
    key = ("forward", v, x.dtype, x.device, batch, update, from_nbt, count, momentum, eps,
           activation, slope, weight is not None, bias is not None, has_z, _overrides["int64"],
           _overrides["flat"], cfgs)
    p = _plans.get(key)
    if p is not None:
        return p
    p = _FwdPlan()
    p.acc, p.update, p.nbt, p.fused, p.view = _acc(x.dtype)[0], update, from_nbt or count, None, v
    p.compiled = {}  # launch name -> (specialization, CompiledKernel): _go
    p.backward = {}  # needs -> (launch_overrides epoch, _BwdPlan): backward
    mask = residual_mode(activation, has_z) == RES_MASK
    # what a call allocates, as tensors to take empty_like of (half the host time of
    # torch.empty with a dtype and a device: ~1.5 against ~3 µs)
    p.stat = _template(v.C, p.acc, x.device)
    m = mask_view(v)
    p.mask = _template(m.outer * m.C * m.inner, torch.uint8, x.device) if mask else None
    p.partials = None
    if tile is not None:
        p.fused = _launch_fused("fused_forward_kernel", x, v, tile, x if mask else None,
                                _fused_forward_extra(weight, bias, eps, activation, slope, has_z,
                                                     mask, momentum, update, from_nbt, count,
                                                     True),
                                _FUSED_FORWARD)
        return _remember(key, p)
    if batch:
        p.stats = _launch("stats", "stats_partial_kernel", x, v, None, _NO_COMBINE_STATS,
                          _STATS_PARTIAL)
        split = p.stats[0][1]
        p.partials = _template((3, split, v.C), p.acc, x.device)
        p.combine = _launch_combine(
            "stats_combine", "stats_combine_kernel", x, v, split,
            (*_fp32_pair(momentum or 0.0), float(eps), update, from_nbt, False, False, count),
            _COMBINE_STATS)
        p.stats_last = None
        if cfgs[-1]:
            p.stats_last = _launch(
                "stats", "stats_partial_kernel", x, v, None,
                (*_fp32_pair(momentum or 0.0), float(eps), True,
                 heuristics.last_combine_block_s(split, cfgs[0].BLOCK_C), update, from_nbt,
                 count), _STATS_PARTIAL)
    p.normalize = _launch(
        "normalize", "normalize_kernel", x, v, x if mask else None,
        (*_act_args(weight, bias, batch, eps, activation, slope), has_z, mask),
        _ACT + ("HAS_RES", "WRITE_MASK"))
    return _remember(key, p)


def _res(x, z, mask) -> tuple:
    """Backward's view of the residual: (z pointer, mask pointer, RES): the bit mask if
    there is one, else z, else nothing."""
    res = RES_MASK if mask is not None else RES_RELOAD if z is not None else RES_NONE
    return z if res == RES_RELOAD else x, mask if res == RES_MASK else x, res


def grad_sums(dy, x, v, mean, s, weight, bias, batch: bool, eps, activation, need_dw, need_db,
              *, slope=0.01, z=None, mask=None):
    """(sums, dweight, dbias): sums[0] = sum dy', sums[1] = sum dy' * xhat per channel;
    dweight/dbias written only when asked for (else None). dy' takes act'(pre) from
    the bit mask if given, else from pre recomputed with z (in x's strides) if given."""
    partials = grad_partials(dy, x, v, mean, s, weight, bias, batch, eps, activation,
                             slope=slope, z=z, mask=mask)
    return combine_grads(x, v, partials, weight, bias, need_dw, need_db)


def grad_partials(dy, x, v, mean, s, weight, bias, batch: bool, eps, activation, *, slope=0.01,
                  z=None, mask=None) -> torch.Tensor:
    """The bwd_reduce kernel alone: per-split (sum dy', sum dy' * xhat), [2, split, C]."""
    z_ptr, mask_ptr, res = _res(x, z, mask)
    grid, args, opts = _launch("bwd_reduce", "bwd_reduce_kernel", x, v, mask,
                               (*_act_args(weight, bias, batch, eps, activation, slope), res,
                                *_NO_COMBINE_GRADS), _ACT + ("RES",) + _REDUCE_COMBINE)
    partials = torch.empty((2, grid[1], v.C), dtype=_acc(x.dtype)[0], device=x.device)
    K.bwd_reduce_kernel[grid](x, dy, z_ptr, mask_ptr, mean, s,
                              weight if weight is not None else s,
                              bias if bias is not None else s, partials, *(partials,) * 4,
                              *args, **opts)
    return partials


def combine_grads(x, v, partials, weight, bias, need_dw, need_db):
    """The bwd_combine kernel alone: (sums [2, C], dweight, dbias) from grad_partials."""
    split = partials.shape[1]
    sums = torch.empty((2, v.C), dtype=partials.dtype, device=x.device)
    dw = torch.empty_like(weight) if need_dw else None
    db = torch.empty_like(bias) if need_db else None
    grid, args, opts = _launch_combine("bwd_combine", "bwd_combine_kernel", x, v, split,
                                       (need_dw, need_db), ("HAS_DW", "HAS_DB"))
    K.bwd_combine_kernel[grid](partials, sums, dw if need_dw else sums, db if need_db else sums,
                               *args, **opts)
    return sums, dw, db


def grad_input(dy, x, v, mean, s, weight, bias, sums, batch: bool, eps, activation, *,
               slope=0.01, z=None, mask=None, need_dx=True, dz=None, count=None):
    """dx (None unless need_dx); training (batch statistics) needs the grad_sums of
    the same dy (SyncBatchNorm: summed over every process, with their count per
    channel). Also writes dz = dy', the residual's grad, into dz when given."""
    dx = torch.empty_like(x) if need_dx else None
    z_ptr, mask_ptr, res = _res(x, z, mask)
    grid, args, opts = _launch(
        "dx", "bwd_dx_kernel", x, v, mask,
        (*_act_args(weight, bias, batch, eps, activation, slope), res, count is not None,
         batch and need_dx, need_dx, dz is not None),
        _ACT + ("RES", "COUNT_FROM_PTR", "TRAINING", "WRITE_DX", "WRITE_DZ"))
    K.bwd_dx_kernel[grid](
        x, dy, z_ptr, mask_ptr, dx if need_dx else x, dz if dz is not None else x,
        mean, s, weight if weight is not None else s, bias if bias is not None else s,
        sums if sums is not None else s, count if count is not None else s, *args, **opts)
    return dx


def backward(dy, x, v, mean, s, weight, bias, batch: bool, eps, activation, needs,
             slope=0.01, residual=None, mask=None, comm=None, count=None, plan=None,
             first_use=None):
    """(dx, dweight, dbias, dresidual), each None unless asked for in
    needs = (dx?, dw?, db?, dresidual?). A forward with a residual passes what
    residual_mode kept: the bit mask (RES_MASK) or the residual itself (RES_RELOAD);
    dresidual = dy' needs one of them unless there is no activation (then it is dy).
    With comm (SyncBatchNorm, training) dx takes sum dy' and sum dy' * xhat over
    every process (comm.reduce sums them in place) and their `count` per channel;
    dweight and dbias stay this process's own, as torch's SyncBatchNorm has them.
    plan: what the same call's forward returned as its plan (or None); a
    single-program plan keeps the backward plan found for these needs, which holds
    while no launch_overrides block has started or ended since (issue 14: host time)."""
    need_dx, need_dw, need_db, need_dz = needs
    need_dw = need_dw and weight is not None
    need_db = need_db and bias is not None
    sync = comm is not None and batch and need_dx
    if x.numel() == 0:
        if sync:  # take part in the sum the others make
            comm.reduce(torch.zeros((2, v.C), dtype=_acc(x.dtype)[0], device=x.device))
        return (torch.empty_like(x) if need_dx else None,
                torch.zeros_like(weight) if need_dw else None,
                torch.zeros_like(bias) if need_db else None,
                torch.empty_like(x) if need_dz else None)
    dy = like(dy, x)
    z = like(residual, x) if residual is not None and mask is None else None
    dz = None
    if need_dz and activation is None:
        dz, need_dz = dy, False  # y = bn(x) + z: dz = dy
    kept = plan.backward.get(needs) if plan is not None and plan.fused is not None else None
    if kept is not None and kept[0] == _overrides["epoch"] and comm is None:
        dx, dw, db, dz2 = _run_backward(kept[1], dy, x, mean, s, weight, bias, z, mask, need_dx,
                                        need_dw, need_db, need_dz)
        return dx, dw, db, dz2 if need_dz else dz
    reduce = need_dw or need_db or (need_dx and batch)
    elementwise = need_dx or need_dz
    tile = _fused_tile(x, v) if comm is None else None
    if comm is None and (tile is not None or tuning.mode() != 1):
        p = _backward_plan(x, v, weight, bias, batch, eps, activation, slope, z, mask, need_dx,
                           need_dw, need_db, need_dz, reduce, tile if reduce else None)
        if plan is not None and plan.fused is not None:
            plan.backward[needs] = (_overrides["epoch"], p)
        dx, dw, db, dz2 = _run_backward(p, dy, x, mean, s, weight, bias, z, mask, need_dx,
                                        need_dw, need_db, need_dz)
        return dx, dw, db, dz2 if need_dz else dz
    kernels = (("bwd_reduce", "bwd_combine") if reduce else ()) + (("dx",) if elementwise else ())
    if first_use is not None:
        first_use(kernels, x, v, interpreting(), weight=weight, bias=bias, eps=eps,
                  activation=activation, dy=dy)
    sums = dw = db = None
    if reduce:
        sums, dw, db = grad_sums(dy, x, v, mean, s, weight, bias, batch, eps, activation,
                                 need_dw, need_db, slope=slope, z=z, mask=mask)
        if sync:
            comm.reduce(sums)
    dx = None
    if elementwise:
        if need_dz:
            dz = torch.empty_like(x)
        dx = grad_input(dy, x, v, mean, s, weight, bias, sums, batch, eps, activation,
                        slope=slope, z=z, mask=mask, need_dx=need_dx,
                        dz=dz if need_dz else None, count=count if sync else None)
    return dx, dw, db, dz


class _BwdPlan:
    """The launches of one backward signature, built once (as _FwdPlan)."""
    __slots__ = ("acc", "partials", "sums", "reduce", "reduce_last", "combine", "dx", "fused",
                 "compiled")


def _backward_plan(x, v, weight, bias, batch, eps, activation, slope, z, mask, need_dx, need_dw,
                   need_db, need_dz, reduce, tile) -> _BwdPlan:
    """The cached plan of backward's launches (issue 14: host time): the same kernels,
    configs and arguments grad_sums and grad_input would launch, without rebuilding
    them per call; tile is _fused_tile's (None without a reduction). Its key, like
    _forward_plan's, holds everything the plan is made of."""
    elementwise = need_dx or need_dz
    res = _res(x, z, mask)[2]
    cfgs = tile if tile is not None else ()
    src = tuning.source(x, interpreting()) if tile is None else None
    if reduce and tile is None:
        cfg_r = _select("bwd_reduce", x, v, src=src)
        split = heuristics.split_of(v, cfg_r)
        cfgs = (cfg_r, _select("bwd_combine", x, v, split, src),
                _last_combine("bwd_combine", split, cfg_r.BLOCK_C))
    if elementwise and tile is None:
        cfgs += (_select("dx", x, v, src=src),)
    key = ("backward", v, x.dtype, x.device, batch, eps, activation, slope, weight is not None,
           bias is not None, z is not None, mask is not None, need_dx, need_dw, need_db, need_dz,
           reduce, _overrides["int64"], _overrides["flat"], cfgs)
    p = _plans.get(key)
    if p is None:
        p = _BwdPlan()
        p.acc, p.fused, p.reduce, p.dx = _acc(x.dtype)[0], None, None, None
        p.compiled = {}  # launch name -> (specialization, CompiledKernel): _go
        act = _act_args(weight, bias, batch, eps, activation, slope)
        if tile is not None:
            p.fused = _launch_fused(
                "fused_backward_kernel", x, v, tile, mask,
                (*act, res, batch and need_dx, need_dx, need_dz, need_dw, need_db),
                _ACT + ("RES", "TRAINING", "WRITE_DX", "WRITE_DZ", "HAS_DW", "HAS_DB"))
        elif reduce:
            names = _ACT + ("RES",) + _REDUCE_COMBINE
            p.reduce = _launch("bwd_reduce", "bwd_reduce_kernel", x, v, mask,
                               (*act, res, *_NO_COMBINE_GRADS), names)
            split = p.reduce[0][1]
            p.partials = _template((2, split, v.C), p.acc, x.device)
            p.sums = _template((2, v.C), p.acc, x.device)
            p.combine = _launch_combine("bwd_combine", "bwd_combine_kernel", x, v, split,
                                        (need_dw, need_db), ("HAS_DW", "HAS_DB"))
            p.reduce_last = None
            if cfgs[2]:
                block_s = heuristics.last_combine_block_s(split, cfgs[0].BLOCK_C)
                p.reduce_last = _launch("bwd_reduce", "bwd_reduce_kernel", x, v, mask,
                                        (*act, res, True, block_s, need_dw, need_db), names)
        if elementwise and tile is None:
            p.dx = _launch("dx", "bwd_dx_kernel", x, v, mask,
                           (*act, res, False, batch and need_dx, need_dx, need_dz),
                           _ACT + ("RES", "COUNT_FROM_PTR", "TRAINING", "WRITE_DX", "WRITE_DZ"))
        _remember(key, p)
    return p


def _run_backward(p: _BwdPlan, dy, x, mean, s, weight, bias, z, mask, need_dx, need_dw, need_db,
                  need_dz):
    """backward's launches of plan p: (dx, dweight, dbias, dz), each None unless needed."""
    z_ptr, mask_ptr, _ = _res(x, z, mask)
    w = weight if weight is not None else s
    b = bias if bias is not None else s
    sums = dx = dw = db = dz = None
    if p.fused is not None:  # one launch: the sums, dweight, dbias, dx and dz
        dw = torch.empty_like(weight) if need_dw else None
        db = torch.empty_like(bias) if need_db else None
        dx = torch.empty_like(x) if need_dx else None
        dz = torch.empty_like(x) if need_dz else None
        _go(K.fused_backward_kernel, p.fused, p.compiled, "fused", x, dy, z_ptr, mask_ptr,
            dx if need_dx else x, dz if need_dz else x, mean, s, w, b,
            dw if need_dw else s, db if need_db else s)
        return dx, dw, db, dz
    if p.reduce is not None:
        partials = torch.empty_like(p.partials)
        sums = torch.empty_like(p.sums)
        dw = torch.empty_like(weight) if need_dw else None
        db = torch.empty_like(bias) if need_db else None
        dw_ptr = dw if need_dw else sums
        db_ptr = db if need_db else sums
        counter = _counter(x, p.reduce[0][0]) if p.reduce_last is not None else None
        if counter is not None:  # one launch: the partials, and the combine in the last
            _go(K.bwd_reduce_kernel, p.reduce_last, p.compiled, "reduce_last", x, dy, z_ptr,
                mask_ptr, mean, s, w, b, partials, sums, dw_ptr, db_ptr, counter)
        else:
            _go(K.bwd_reduce_kernel, p.reduce, p.compiled, "reduce", x, dy, z_ptr, mask_ptr,
                mean, s, w, b, partials, *(partials,) * 4)
            _go(K.bwd_combine_kernel, p.combine, p.compiled, "combine", partials, sums, dw_ptr,
                db_ptr)
    if p.dx is not None:
        dx = torch.empty_like(x) if need_dx else None
        dz = torch.empty_like(x) if need_dz else None
        _go(K.bwd_dx_kernel, p.dx, p.compiled, "dx", x, dy, z_ptr, mask_ptr,
            dx if need_dx else x, dz if need_dz else x, mean, s, w, b,
            sums if sums is not None else s, s)
    return dx, dw, db, dz
