"""The byte model (DESIGN.md): the fewest bytes a BatchNorm pass must move.

E = numel, s = bytes per element. The two-pass model reads x twice forward (stats,
then normalize) and is what tritonbn's kernels do; the single-read model keeps x
on chip between the two phases (a persistent kernel, cuDNN's PERSISTENT mode).

| pass    | two-pass | single-read |
|---------|----------|-------------|
| fwd     | 3·E·s    | 2·E·s       |
| bwd     | 5·E·s    | 3·E·s       |
| fwd+bwd | 8·E·s    | 5·E·s       |

A residual add (``bn_add_relu``: relu(bn(x) + z)) reads z forward and writes dz
backward: +E·s each. An activation fused into the same kernels (``bn_relu``,
``bn_leaky_relu``, ``bn_silu``, ``bn_gelu``) moves no extra bytes. Per-channel
vectors (C·4 bytes) are left out: they are under 0.1 % for every suite shape.

The model is the floor, not what every kernel does: after a residual add,
tritonbn's relu writes a 1-bit-per-element mask forward and reads it backward
(E/8 bytes each way, not counted: +1/16 of E·s at 2 bytes per element); a
residual with silu or gelu (no suite op) re-reads z in both backward passes
(+2·E·s). Without a residual nothing is extra.

Per kernel (``kernel_bytes``, the per-kernel dataset's GB/s), with no activation
mask or residual; a = bytes per accumulator (4: fp32, 8 for fp64 input), split =
the partials the reduce launch really wrote (its grid's second axis):

| kernel        | reads                         | writes                              |
|---------------|-------------------------------|-------------------------------------|
| stats         | E·s                           | 3·split·C·a (mean, M2, count)       |
| stats_combine | 3·split·C·a + 2·C·a (running) | 2·C·a (mean, invstd) + 2·C·a (running) |
| normalize     | E·s                           | E·s                                 |
| bwd_reduce    | 2·E·s (x, dy)                 | 2·split·C·a                         |
| bwd_combine   | 2·split·C·a                   | 2·C·a (sums) + 2·C·4 (dw, db)       |
| dx            | 2·E·s (x, dy)                 | E·s                                 |

The per-channel mean, invstd, weight and bias that normalize, bwd_reduce and dx
read (16·C bytes) are left out: 8/(N·H·W·s) of normalize's bytes, at most 0.3 %
for the dataset's shapes.
"""
from __future__ import annotations

MODELS = ("two_pass", "single_read")
PASSES = ("fwd", "bwd", "fwd+bwd")
OPS = ("bn", "bn_relu", "bn_add_relu", "bn_leaky_relu", "bn_silu", "bn_gelu")
# each op's activation (tritonbn's name for it) and whether it adds a residual z
ACTIVATION = {"bn": None, "bn_relu": "relu", "bn_add_relu": "relu", "bn_leaky_relu": "leaky_relu",
              "bn_silu": "silu", "bn_gelu": "gelu"}
RESIDUAL_OPS = ("bn_add_relu",)
LEAKY_SLOPE = 0.01  # bn_leaky_relu's negative slope: nn.LeakyReLU's and tritonbn's default

_FACTOR = {"two_pass": {"fwd": 3, "bwd": 5}, "single_read": {"fwd": 2, "bwd": 3}}


def passes_of(pass_: str) -> tuple[str, ...]:
    if pass_ not in PASSES:
        raise ValueError(f"unknown pass {pass_!r}; choose from {PASSES}")
    return ("fwd", "bwd") if pass_ == "fwd+bwd" else (pass_,)


def _check_op(op: str) -> None:
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}; choose from {OPS}")


def activation_of(op: str) -> str | None:
    """The activation op applies after BatchNorm (and the residual add), or None."""
    _check_op(op)
    return ACTIVATION[op]


def has_residual(op: str) -> bool:
    """Whether op adds a residual z before its activation (and so has a dz)."""
    _check_op(op)
    return op in RESIDUAL_OPS


def elements_moved(op: str, pass_: str, model: str = "two_pass") -> int:
    """How many times E elements cross device memory for one ``pass_`` of ``op``."""
    _check_op(op)
    if model not in MODELS:
        raise ValueError(f"unknown byte model {model!r}; choose from {MODELS}")
    residual = 1 if op in RESIDUAL_OPS else 0
    return sum(_FACTOR[model][p] + residual for p in passes_of(pass_))


def model_bytes(op: str, pass_: str, numel: int, elem_size: int, model: str = "two_pass") -> int:
    return elements_moved(op, pass_, model) * numel * elem_size


def gbps(nbytes: float, ms: float) -> float:
    """Bytes moved in ms milliseconds, as GB/s (10^9 bytes per second)."""
    return nbytes / (ms * 1e-3) / 1e9


def kernel_bytes(kernel: str, numel: int, C: int, elem_size: int, split: int,
                 acc_size: int = 4) -> int:
    """Bytes one launch of ``kernel`` moves (the table above): E = numel elements of
    elem_size bytes, C channels, ``split`` partials per channel, acc_size-byte accumulators."""
    es, part, chan = numel * elem_size, split * C * acc_size, C * acc_size
    moved = {"stats": es + 3 * part,
             "stats_combine": 3 * part + 2 * chan + 4 * chan,
             "normalize": 2 * es,
             "bwd_reduce": 2 * es + 2 * part,
             "bwd_combine": 2 * part + 2 * chan + 2 * C * 4,
             "dx": 3 * es}
    if kernel not in moved:
        raise ValueError(f"unknown kernel {kernel!r}; choose from {', '.join(moved)}")
    return moved[kernel]
