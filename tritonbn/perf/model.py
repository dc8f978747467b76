"""The byte model (DESIGN.md): the fewest bytes a BatchNorm pass must move.

E = numel, s = bytes per element. The two-pass model reads x twice forward (stats,
then normalize) and is what tritonbn's kernels do; the single-read model keeps x
on chip between the two phases (a persistent kernel, cuDNN's PERSISTENT mode).

| pass    | two-pass | single-read |
|---------|----------|-------------|
| fwd     | 3·E·s    | 2·E·s       |
| bwd     | 5·E·s    | 3·E·s       |
| fwd+bwd | 8·E·s    | 5·E·s       |

A residual add (``bn_add_relu``) reads z forward and writes dz backward: +E·s each.
An activation fused into the same kernels moves no extra bytes. Per-channel
vectors (C·4 bytes) are left out: they are under 0.1 % for every suite shape.
"""
from __future__ import annotations

MODELS = ("two_pass", "single_read")
PASSES = ("fwd", "bwd", "fwd+bwd")
OPS = ("bn", "bn_relu", "bn_add_relu")

_FACTOR = {"two_pass": {"fwd": 3, "bwd": 5}, "single_read": {"fwd": 2, "bwd": 3}}


def passes_of(pass_: str) -> tuple[str, ...]:
    if pass_ not in PASSES:
        raise ValueError(f"unknown pass {pass_!r}; choose from {PASSES}")
    return ("fwd", "bwd") if pass_ == "fwd+bwd" else (pass_,)


def elements_moved(op: str, pass_: str, model: str = "two_pass") -> int:
    """How many times E elements cross device memory for one ``pass_`` of ``op``."""
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}; choose from {OPS}")
    if model not in MODELS:
        raise ValueError(f"unknown byte model {model!r}; choose from {MODELS}")
    residual = 1 if op == "bn_add_relu" else 0
    return sum(_FACTOR[model][p] + residual for p in passes_of(pass_))


def model_bytes(op: str, pass_: str, numel: int, elem_size: int, model: str = "two_pass") -> int:
    return elements_moved(op, pass_, model) * numel * elem_size


def gbps(nbytes: float, ms: float) -> float:
    """Bytes moved in ms milliseconds, as GB/s (10^9 bytes per second)."""
    return nbytes / (ms * 1e-3) / 1e9
