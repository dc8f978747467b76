"""The plain-PyTorch path: CPU tensors when Triton's interpreter is off.

Triton compiles for GPUs only, so a CPU tensor outside TRITON_INTERPRET=1 is
served by torch's own batch_norm with the same semantics (and the same
validation, done by the caller). It is never used for CUDA tensors, nor under
the interpreter, where the tests exercise the Triton kernels.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


# tritonbn's activation name -> torch's function of (y, slope): slope is the kernels'
# one scalar, leaky_relu's negative_slope or elu's alpha (None: torch's default)
_TORCH = {
    "relu": lambda y, slope: torch.relu(y),
    "leaky_relu": lambda y, slope: F.leaky_relu(y, 0.01 if slope is None else slope),
    "silu": lambda y, slope: F.silu(y),
    "gelu": lambda y, slope: F.gelu(y),
    "relu6": lambda y, slope: F.relu6(y),
    "hardswish": lambda y, slope: F.hardswish(y),
    "hardsigmoid": lambda y, slope: F.hardsigmoid(y),
    "mish": lambda y, slope: F.mish(y),
    "elu": lambda y, slope: F.elu(y, 1.0 if slope is None else slope),
    "gelu_tanh": lambda y, slope: F.gelu(y, approximate="tanh"),
}


def activate(y, activation, slope=None):
    """torch's own activation by tritonbn's name for it (gelu: the exact erf form,
    gelu_tanh: approximate="tanh"); slope is leaky_relu's negative_slope or elu's alpha
    (None: torch's default, 0.01 or 1.0)."""
    if activation is None:
        return y
    if activation not in _TORCH:
        raise ValueError(f"unknown activation {activation!r}")
    return _TORCH[activation](y, slope)


def batch_norm(x, running_mean, running_var, weight, bias, batch, momentum, eps, activation,
               num_batches_tracked=None, residual=None, slope=None):
    if momentum is None:  # cumulative average; a CPU scalar, so no device sync
        momentum = 1.0 / float(num_batches_tracked) if num_batches_tracked is not None else 0.0
    y = F.batch_norm(x, running_mean, running_var, weight, bias, batch, momentum, eps)
    if residual is not None:
        y = y + residual
    return activate(y, activation, slope)
