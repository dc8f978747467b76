"""Test support shared by tests/ and perf/: poisoned allocations."""
from __future__ import annotations

import contextlib
import types

import torch

from . import ops


class _Poisoned(types.SimpleNamespace):
    """Stands in for `torch` inside tritonbn.ops: every buffer it allocates is NaN."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def empty(*args, **kwargs):
        return _poison(torch.empty(*args, **kwargs))

    @staticmethod
    def empty_like(*args, **kwargs):
        return _poison(torch.empty_like(*args, **kwargs))


def _poison(t: torch.Tensor) -> torch.Tensor:
    """NaN, or for integer buffers (the bit mask) the bit pattern 0b10100101."""
    return t.fill_(float("nan") if t.is_floating_point() else 0xA5)


@contextlib.contextmanager
def poisoned_allocations():
    """Inside the block every output, partial and stats buffer tritonbn allocates
    starts as NaN (the bit mask as 0b10100101), so an element no kernel wrote
    shows up as NaN, and a mask bit no kernel wrote as a wrong grad."""
    saved = ops.torch
    ops.torch = _Poisoned()
    try:
        yield
    finally:
        ops.torch = saved


def saved_for_backward(fn, *args, **kwargs):
    """(fn's output, [(data_ptr, nbytes)] of every distinct storage autograd saved
    for backward while fn ran), measured with torch.autograd.graph.saved_tensors_hooks."""
    seen = {}

    def pack(t):
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*args, **kwargs)
    return out, sorted(seen.items())
