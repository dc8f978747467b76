"""Which launch config each kernel runs with (tuning on first use runs in tuner.py,
which sits above ops: ops takes it as an argument, first_use, and imports no tuner).

For a CUDA tensor, each kernel launch looks up its shape bucket (tuning/space.py)
in the user's tuning cache, then in the configs shipped for this GPU
(tritonbn/configs/), and else takes the heuristic (tritonbn/heuristics.py). The
interpreter, and CPU tensors, always take the heuristic.

TRITONBN_AUTOTUNE selects what happens for a bucket with no tuned config:
  0 (the default)  the heuristic. No call ever pauses to tune; configs come from
                   `tritonbn tune` (run once per machine) or the shipped files.
  1                tune it on first use, on scratch buffers, then save it to the
                   cache so later processes start tuned. Costs seconds per new
                   bucket (more on first compile); skipped while a CUDA graph is
                   being captured or torch.compile is tracing.
Why 0: tuning inside a training step stalls it unpredictably (and each rank of a
distributed job differently), cannot run inside graph capture, and gains little
over the heuristic plus shipped configs; users who want it run `tritonbn tune`.
"""
from __future__ import annotations

import contextlib
import functools
import os
import warnings
from dataclasses import dataclass

import torch

from .. import heuristics
from .cache import CacheWarning, Store, cache_dir, cache_path, shipped_path
from .space import bucket

MODES = ("0", "1")
__all__ = ["CacheWarning", "bucket", "cache_dir", "cache_path", "heuristics_only", "mode", "select",
           "source", "store"]


@functools.lru_cache(maxsize=None)
def _warn_bad_mode(value: str) -> None:
    warnings.warn(f"tritonbn: TRITONBN_AUTOTUNE={value!r} is not 0 or 1; using 0 (tuned or "
                  "shipped configs, else heuristics, never tuning on first use)", stacklevel=3)


def mode() -> int:
    """TRITONBN_AUTOTUNE: 0 (default) or 1; anything else warns once and means 0."""
    value = os.environ.get("TRITONBN_AUTOTUNE", "0").strip() or "0"
    if value not in MODES:
        _warn_bad_mode(value)
        return 0
    return int(value)


@dataclass
class _Simulated:
    gpu: str
    timer: object
    limit: int | None


_simulated: _Simulated | None = None
_limit: int | None = None  # test hook: candidates per round when tuning on first use
_heuristics_only = False


@contextlib.contextmanager
def heuristics_only():
    """Inside the block every launch takes the heuristic config: no cache, no shipped
    configs, no tuning (how `tritonbn bench` times tuned against heuristic configs)."""
    global _heuristics_only
    saved, _heuristics_only = _heuristics_only, True
    try:
        yield
    finally:
        _heuristics_only = saved


@contextlib.contextmanager
def simulate_gpu(timer, gpu: str = "interpreter-test-gpu", limit: int | None = None):
    """Test hook: inside the block, interpreted CPU tensors select and tune configs as
    if on a GPU named `gpu` (cache, shipped files, TRITONBN_AUTOTUNE), timing with
    timer(fn) -> ms and at most `limit` candidates per round."""
    global _simulated
    saved, _simulated = _simulated, _Simulated(gpu, timer, limit)
    try:
        yield
    finally:
        _simulated = saved


@functools.lru_cache(maxsize=None)
def _device_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


def gpu_name(x: torch.Tensor, interpret: bool) -> str | None:
    """The GPU whose configs x's launches use; None means the heuristics."""
    if _heuristics_only:
        return None
    if _simulated is not None and interpret:
        return _simulated.gpu
    if interpret or not x.is_cuda:
        return None
    return _device_name(x.device.index if x.device.index is not None else torch.cuda.current_device())


_stores: dict = {}


def store(gpu: str) -> Store:
    """The configs of gpu under the current cache directory (loaded on first lookup)."""
    env = os.environ
    key = (gpu, env.get("TRITONBN_CACHE_DIR"), env.get("XDG_CACHE_HOME"), env.get("HOME"))
    s = _stores.get(key)
    if s is None:
        s = _stores[key] = Store(gpu, cache_path(gpu), shipped_path(gpu))
    return s


def _default(kernel: str, x: torch.Tensor, v, interpret: bool, split: int | None):
    if kernel in heuristics.COMBINE_KERNELS:
        return heuristics.heuristic_combine(v.C, split)
    return heuristics.heuristic(kernel, v, x.element_size(), x.device, interpret)


def source(x: torch.Tensor, interpret: bool) -> Store | None:
    """Where the configs of x's launches come from: its GPU's store (under the
    current cache directory), or None for the heuristics. A forward or backward
    asks once and passes it to each select (store() reads three environment
    variables, ~3 µs: issue 14)."""
    gpu = gpu_name(x, interpret)
    return None if gpu is None else store(gpu)


def select(kernel: str, x: torch.Tensor, v, interpret: bool, split: int | None = None,
           src: Store | None = None):
    """The launch config of `kernel` over x (view v): tuned, shipped, else heuristic.
    Combine kernels pass the split of the partials they sum; src is source(x,
    interpret), asked here when not given (None: cheap to ask again, no store).

    Runs before every launch, so each answer is memoized in the GPU's store (a few
    dict lookups per launch; the store forgets them when configs are added).
    """
    s = src if src is not None else source(x, interpret)
    if s is None:
        return _default(kernel, x, v, interpret, split)
    key = (kernel, x.dtype, x.device, v, split)
    cfg = s.memo.get(key)
    if cfg is None:
        cfg = s.get(bucket(kernel, x.dtype, v)) or _default(kernel, x, v, interpret, split)
        s.memo[key] = cfg
    return cfg
