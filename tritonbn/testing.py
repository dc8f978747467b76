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
        return torch.empty(*args, **kwargs).fill_(float("nan"))

    @staticmethod
    def empty_like(*args, **kwargs):
        return torch.empty_like(*args, **kwargs).fill_(float("nan"))


@contextlib.contextmanager
def poisoned_allocations():
    """Inside the block every output, partial and stats buffer tritonbn allocates
    starts as NaN, so an element no kernel wrote shows up as NaN."""
    saved = ops.torch
    ops.torch = _Poisoned()
    try:
        yield
    finally:
        ops.torch = saved
