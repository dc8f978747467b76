"""The plain-PyTorch path: CPU tensors when Triton's interpreter is off.

Triton compiles for GPUs only, so a CPU tensor outside TRITON_INTERPRET=1 is
served by torch's own batch_norm with the same semantics (and the same
validation, done by the caller). It is never used for CUDA tensors, nor under
the interpreter, where the tests exercise the Triton kernels.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def batch_norm(x, running_mean, running_var, weight, bias, batch, momentum, eps, activation,
               num_batches_tracked=None):
    if momentum is None:  # cumulative average; a CPU scalar, so no device sync
        momentum = 1.0 / float(num_batches_tracked) if num_batches_tracked is not None else 0.0
    y = F.batch_norm(x, running_mean, running_var, weight, bias, batch, momentum, eps)
    if activation == "relu":
        y = torch.relu(y)
    return y
