"""The plain-PyTorch path: CPU tensors when Triton's interpreter is off.

Triton compiles for GPUs only, so a CPU tensor outside TRITON_INTERPRET=1 is
served by torch's own batch_norm with the same semantics (and the same
validation, done by the caller). It is never used for CUDA tensors, nor under
the interpreter, where the tests exercise the Triton kernels.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def activate(y, activation, negative_slope=0.01):
    """torch's own activation by tritonbn's name for it (gelu: the exact erf form)."""
    if activation is None:
        return y
    if activation == "relu":
        return torch.relu(y)
    if activation == "leaky_relu":
        return F.leaky_relu(y, negative_slope)
    if activation == "silu":
        return F.silu(y)
    if activation == "gelu":
        return F.gelu(y)
    raise ValueError(f"unknown activation {activation!r}")


def batch_norm(x, running_mean, running_var, weight, bias, batch, momentum, eps, activation,
               num_batches_tracked=None, residual=None, negative_slope=0.01):
    if momentum is None:  # cumulative average; a CPU scalar, so no device sync
        momentum = 1.0 / float(num_batches_tracked) if num_batches_tracked is not None else 0.0
    y = F.batch_norm(x, running_mean, running_var, weight, bias, batch, momentum, eps)
    if residual is not None:
        y = y + residual
    return activate(y, activation, negative_slope)
