"""How an (N, C, *spatial) tensor is seen by the kernels: a strided (outer, C, inner) view."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class View:
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


def kernel_view(x: torch.Tensor) -> tuple[torch.Tensor, View]:
    """x itself when it is dense and maps onto one of the two tilings, else a copy.

    Kernels write outputs with torch.empty_like(x), so outputs share x's strides
    (and memory format) exactly, and one View serves x, y, dy and dx.
    """
    if _dense(x):
        v = _view(x)
        if v is not None:
            return x, v
    x = x.contiguous()
    return x, _view(x)


def like(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """t with exactly x's strides (a copy only when they differ), e.g. dy for x."""
    if t.stride() == x.stride():
        return t
    return torch.empty_like(x).copy_(t)
