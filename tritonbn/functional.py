"""tritonbn.functional.batch_norm: torch.nn.functional.batch_norm, then the activation."""
from __future__ import annotations

import torch

from . import autograd, library, ops, reference
from .layout import kernel_view


def check_activation(activation):
    if not (activation is None or isinstance(activation, str)) or activation not in ops.ACTIVATIONS:
        choices = ", ".join(repr(a) for a in ops.ACTIVATIONS)
        raise ValueError(f"activation must be one of {choices}; got {activation!r}")
    return activation


# the dtypes the kernels take, of the input and of the per-channel tensors
_DTYPES = frozenset((torch.float16, torch.bfloat16, torch.float32, torch.float64))


def _check(input, running_mean, running_var, weight, bias, training, eps, synced=False):
    """torch's checks and messages, in torch's order where it matters (the batch size,
    then eps, then the rest); synced (SyncBatchNorm across processes) allows one
    value per channel here, since the statistics are over every process's batch."""
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"batch_norm(): input must be a Tensor, not {type(input).__name__}")
    shape = input.shape
    if len(shape) < 2:
        raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")
    C = shape[1]
    if training and not synced and input.numel() <= C:  # else N * H * W > 1 already
        size_prods = shape[0]
        for n in shape[2:]:
            size_prods *= n
        if size_prods == 1:
            raise ValueError("Expected more than 1 value per channel when training, "
                             f"got input size {input.size()}")
    if eps <= 0:
        _torch_eps_check(training, eps)
    if input.dtype not in _DTYPES:
        _torch_dtype_check(input.dtype)
    device = input.device
    for t in (running_mean, running_var, weight, bias):  # the common case, cheaply
        if t is not None and not (t.numel() == C and t.dtype in _DTYPES and t.device == device):
            _check_per_channel(input, running_mean, running_var, weight, bias, training)
    if (running_mean is None) != (running_var is None) or (not training and running_mean is None):
        _check_per_channel(input, running_mean, running_var, weight, bias, training)


def _check_per_channel(input, running_mean, running_var, weight, bias, training):
    """The per-channel tensors' errors, the first one found, with torch's messages in
    torch's order: each one's size (and in eval, the running stats' presence), in
    argument order; then dtypes and devices; then the running stats, both or neither."""
    C = input.shape[1]
    named = (("running_mean", running_mean), ("running_var", running_var), ("weight", weight),
             ("bias", bias))
    for name, t in named:
        if t is None:
            if not training and name.startswith("running"):
                raise RuntimeError(f"{name} must be defined in evaluation mode")
        elif t.numel() != C:
            raise RuntimeError(f"{name} should contain {C} elements not {t.numel()}")
    for name, t in named:
        if t is None:
            continue
        if t.dtype not in _DTYPES:
            raise NotImplementedError(f"{name} must be float16, bfloat16, float32 or float64, "
                                      f"got {t.dtype}")
        if t.device != input.device:
            raise RuntimeError(f"Expected all tensors to be on the same device, but {name} is on "
                               f"{t.device} and input is on {input.device}")
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must either both be None or neither be "
                         "None")


def _raise_as_torch(errors, input, *args, **kwargs):
    """Raise torch's own error for a call of its batch_norm on input (a tiny CPU tensor)
    with these arguments, its type and message, where it raises one of errors."""
    try:
        torch.nn.functional.batch_norm(input, *args, **kwargs)
    except errors as e:
        raise type(e)(str(e)) from None


def _torch_dtype_check(dtype):
    """torch's own error for an input of a dtype the kernels do not take (integers,
    bool, complex, float8), its type and message ('"batch_norm" not implemented for
    \'Long\''); ours in its words where this torch would take that dtype."""
    _raise_as_torch((NotImplementedError, RuntimeError, TypeError),
                    torch.zeros(2, 1, dtype=dtype), None, None, training=True)
    raise NotImplementedError(f'"batch_norm" not implemented for {dtype}')


def _torch_eps_check(training, eps):
    """torch's own answer to an eps <= 0, its error and message (they differ between
    torch versions: 2.13 allows eps = 0 in eval, 2.11 does not)."""
    _raise_as_torch(ValueError, torch.ones(2, 1), torch.zeros(1), torch.ones(1),
                    training=training, eps=eps)


def _check_number(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    return float(value)


def check_negative_slope(negative_slope):
    return _check_number("negative_slope", negative_slope)


def check_alpha(alpha):
    return _check_number("alpha", alpha)


def activation_slope(activation, negative_slope, alpha) -> float:
    """The kernels' one scalar of an activation (ops' `slope`, `_batch_norm`'s
    negative_slope): elu's alpha, else negative_slope (read by leaky_relu alone)."""
    return alpha if activation == "elu" else negative_slope


def batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False,
               momentum=0.1, eps=1e-5, *, activation=None, residual=None, negative_slope=0.01,
               alpha=1.0):
    """Batch normalization over (N, C, *) input, plus ``residual``, then ``activation``:
    ``act(F.batch_norm(input, ...) + residual)``, in one pass over memory.

    Same arguments and semantics as :func:`torch.nn.functional.batch_norm`:
    ``training=True`` normalizes with the batch statistics (biased variance) and
    updates ``running_mean``/``running_var`` in place when given (unbiased
    variance, factor ``momentum``); ``training=False`` uses the running stats.

    ``activation``: None, "relu", "leaky_relu" (with ``negative_slope``), "silu",
    "gelu" (the exact erf form, as ``nn.GELU()``), "gelu_tanh" (``nn.GELU("tanh")``),
    "relu6", "hardswish", "hardsigmoid", "mish" or "elu" (with ``alpha``), each as
    torch's function of that name, grads included. ``residual``: None or a tensor
    added before the activation; its grad comes from the same backward passes. It
    is fused when it is a tensor of the input's shape, dtype and device (any memory
    format); otherwise (a Python number too) the sum is taken unfused, with torch's
    broadcasting and type promotion.

    CUDA tensors (and CPU tensors under ``TRITON_INTERPRET=1``) run the Triton
    kernels; other CPU tensors run torch's own ops.
    """
    activation = check_activation(activation)
    slope = activation_slope(activation, check_negative_slope(negative_slope), check_alpha(alpha))
    return _batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps,
                       activation, residual=residual, negative_slope=slope)


def _fusable(input, residual) -> bool:
    return (residual.shape == input.shape and residual.dtype == input.dtype
            and residual.device == input.device)


def _batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps,
                activation, num_batches_tracked=None, residual=None, negative_slope=0.01,
                comm=None, count=False):
    """batch_norm with momentum=None allowed: the cumulative average over num_batches_tracked.
    comm: SyncBatchNorm's collectives (distributed.py), for batch statistics over
    every process's batch; None for this process's own. Eager calls run them from
    Python (comm.gather, comm.reduce); torch.compile traces the functional
    collectives over comm.group_name instead (library.py). negative_slope: the
    activation's scalar (activation_slope: elu's alpha too). count: the module's
    num_batches_tracked += 1 for this batch, before anything reads it: in the eager
    kernels' launches (ops.forward), else here; and, as torch's module counts before
    F.batch_norm checks its input, also when the input is refused."""
    try:
        _check(input, running_mean, running_var, weight, bias, training, eps, comm is not None)
    except Exception:
        if count:
            num_batches_tracked.add_(1)
        raise
    if momentum is None and training and running_mean is not None and num_batches_tracked is None:
        raise TypeError("batch_norm(): momentum must be a float (momentum=None needs the "
                        "module's num_batches_tracked)")
    if residual is not None:
        if not isinstance(residual, torch.Tensor) or not _fusable(input, residual):
            y = _batch_norm(input, running_mean, running_var, weight, bias, training, momentum,
                            eps, None, num_batches_tracked, comm=comm, count=count)
            return reference.activate(y + residual, activation, negative_slope)
    if _eager(input):
        # one autograd.Function around the host ops: SyncBatchNorm's collectives run from
        # Python between them, and eager calls skip the custom ops' dispatch (host time)
        return autograd.batch_norm(input, weight, bias, residual,
                                   (running_mean, running_var, num_batches_tracked,
                                    bool(training), momentum, eps, activation, negative_slope,
                                    comm, count))
    if count:  # the other paths count on the host, first: momentum=None reads the count
        num_batches_tracked.add_(1)
    if momentum is not None:
        num_batches_tracked = None
    if not ops.uses_triton(input):
        if comm is not None:  # as torch's SyncBatchNorm: collectives need the device kernels
            raise ValueError("SyncBatchNorm expected input tensor to be on GPU (tritonbn: a CUDA "
                             "tensor, or a CPU tensor with TRITON_INTERPRET=1 set)")
        return reference.batch_norm(input, running_mean, running_var, weight, bias, training,
                                    momentum, eps, activation, num_batches_tracked, residual,
                                    negative_slope)
    # torch.compile: the custom ops (library.py), one per stage, with their mutations
    # declared. Strides the kernels can tile, copied here once (differentiably) if need
    # be, so that neither op nor the backward copies x again
    input = kernel_view(input)[0]
    momentum = None if momentum is None else float(momentum)
    count = group = None
    if training and comm is not None:  # SyncBatchNorm: functional collectives over the group
        group = comm.group_name
        mean, s, count = library.sync_batch_stats(input.detach(), running_mean, running_var,
                                                  num_batches_tracked, momentum, float(eps),
                                                  group)
    elif training:  # statistics are not differentiated: batch_norm's backward covers them
        mean, s = library.batch_stats(input.detach(), running_mean, running_var,
                                      num_batches_tracked, momentum, float(eps))
    else:
        mean, s = running_mean, running_var
    return library.batch_norm(input, mean, s, weight, bias, residual, bool(training), float(eps),
                              activation, float(negative_slope), count, group)[0]


def _eager(input) -> bool:
    """Whether this call runs the kernels eagerly on a plain tensor, so the host ops can
    be called directly (same kernels, same saved tensors, same results bit for bit:
    tests/test_host.py): ops.uses_triton(input), inlined (host time, issue 14), outside
    torch.compile and export. Fake or subclassed tensors take the ops."""
    return (type(input) is torch.Tensor and (input.is_cuda or ops.interpreting())
            and not torch.compiler.is_compiling())
