"""How an (N, C, *spatial) tensor is seen by the kernels: a strided (outer, C, inner) view."""
from __future__ import annotations

from typing import NamedTuple

import torch


class View(NamedTuple):
    """(outer, C, inner) sizes and strides; a tuple, so hashing it (a cache key in
    front of every launch) is one C call."""
    outer: int
    C: int
    inner: int
    s_outer: int
    s_c: int
    s_inner: int
    channel_last: bool  # tile over the contiguous C (True) or the contiguous inner axis

    @property
    def count(self) -> int:
        """Elements per channel: the M of the statistics."""
        return self.outer * self.inner


def _merged_stride(sizes, strides):
    """The single stride of dims that flatten row-major into one index, else None.

    Size-1 dims are skipped (their stride is arbitrary); no dims gives stride 1.
    """
    dims = [(n, s) for n, s in zip(sizes, strides) if n != 1]
    if not dims:
        return 1
    for (_, s_hi), (n_lo, s_lo) in zip(dims, dims[1:]):
        if s_hi != n_lo * s_lo:
            return None
    return dims[-1][1]


def _view(x: torch.Tensor) -> View | None:
    N, C, *spatial = x.shape
    inner = 1
    for n in spatial:
        inner *= n
    sizes, strides = x.shape, x.stride()
    s_c = strides[1]
    last = _merged_stride([N, *spatial], [strides[0], *strides[2:]])
    first_outer = _merged_stride([N], [strides[0]])
    first_inner = _merged_stride(sizes[2:], strides[2:])
    if last is not None and (inner == 1 or s_c == 1):
        return View(N * inner, C, 1, last, s_c, 1, True)
    if first_inner is not None:
        return View(N, C, inner, first_outer, s_c, first_inner, False)
    return None


def _dense(x: torch.Tensor) -> bool:
    """Non-overlapping and dense: some permutation of x's dims is contiguous."""
    dims = sorted((s, n) for n, s in zip(x.shape, x.stride()) if n != 1)
    expected = 1
    for s, n in dims:
        if s != expected:
            return False
        expected *= n
    return True


# View (or None: no tiling fits) of every (shape, strides) seen; a pure function of
# them, so cached (issue 14: host time per call), cleared past _MAX_VIEWS entries.
# Not while torch.compile traces: dynamo would guard on the cache's size, and any
# eager call that adds an entry would then recompile the graph.
_views: dict = {}
_MAX_VIEWS = 4096


def _cached_view(x: torch.Tensor) -> View | None:
    if torch.compiler.is_compiling():
        return _view(x) if _dense(x) else None
    key = (x.shape, x.stride())
    try:
        return _views[key]
    except KeyError:
        if len(_views) >= _MAX_VIEWS:
            _views.clear()
        v = _views[key] = _view(x) if _dense(x) else None
        return v
    except TypeError:  # symbolic sizes (torch.compile's fake tensors): not hashable
        return _view(x) if _dense(x) else None


def kernel_view(x: torch.Tensor) -> tuple[torch.Tensor, View]:
    """x itself when it is dense and maps onto one of the two tilings, else a copy.

    Kernels write outputs with torch.empty_like(x), so outputs share x's strides
    (and memory format) exactly, and one View serves x, y, dy and dx.
    """
    v = _cached_view(x)
    if v is not None:
        return x, v
    x = x.contiguous()
    return x, _cached_view(x)


def like(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """t with exactly x's strides (a copy only when they differ), e.g. dy for x."""
    if t.stride() == x.stride():
        return t
    return torch.empty_like(x).copy_(t)
