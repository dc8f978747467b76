"""Drop-in BatchNorm1d/2d/3d: torch.nn's modules, with a fused activation.

They subclass torch.nn.BatchNorm1d/2d/3d, so isinstance checks against
nn.modules.batchnorm._BatchNorm hold, state_dict keys are identical and
load_state_dict works both ways with torch's modules.
"""
from __future__ import annotations

import torch
from torch import nn

from .functional import _batch_norm, check_activation, check_alpha, check_negative_slope


class _BatchNormAct:
    """forward() of torch's _BatchNorm, verbatim in its semantics, on tritonbn's kernels."""

    alpha = 1.0  # elu's; modules pickled before elu have no attribute of their own

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, device=None, dtype=None, *, activation=None,
                 negative_slope=0.01, alpha=1.0):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        self._set_activation(activation, negative_slope, alpha)

    def _set_activation(self, activation, negative_slope, alpha=1.0):
        self.activation = check_activation(activation)
        self.negative_slope = check_negative_slope(negative_slope)
        self.alpha = check_alpha(alpha)

    def _slope(self) -> float:
        """The kernels' scalar of the activation: elu's alpha, else negative_slope
        (functional.activation_slope, inlined: a call's host time, issue 14)."""
        return self.alpha if self.activation == "elu" else self.negative_slope

    def _bn_args(self, input) -> tuple:
        """torch's _BatchNorm.forward up to its F.batch_norm call: (running_mean,
        running_var, weight, bias, training, momentum, num_batches_tracked, count):
        the running stats to use, whether to normalize with batch statistics, the
        momentum (None for the cumulative average over num_batches_tracked, read on
        the device), and whether the call counts its batch (num_batches_tracked += 1,
        which torch's module does here and tritonbn's statistics kernel does where it
        can: functional._batch_norm). The state is read from the module's own dicts
        where it is registered there (Module.__getattr__ costs ~0.8 µs a name, five
        names a call: issue 14), else as attributes (a parametrization, or a name
        re-set as a plain attribute)."""
        self._check_input_dim(input)
        p, b = self._parameters, self._buffers
        try:
            weight, bias, running_mean, running_var, nbt = (
                p["weight"], p["bias"], b["running_mean"], b["running_var"],
                b["num_batches_tracked"])
        except KeyError:
            weight, bias, running_mean, running_var, nbt = (
                self.weight, self.bias, self.running_mean, self.running_var,
                self.num_batches_tracked)
        momentum = self.momentum
        if self.training and self.track_running_stats:
            if nbt is not None:  # counts its batch; momentum=None: 1/num_batches_tracked
                return running_mean, running_var, weight, bias, True, momentum, nbt, True
            return (running_mean, running_var, weight, bias, True,
                    0.0 if momentum is None else momentum, None, False)
        momentum = 0.0 if momentum is None else momentum
        if self.training:
            return None, None, weight, bias, True, momentum, None, False
        return (running_mean, running_var, weight, bias,
                running_mean is None and running_var is None, momentum, None, False)

    def forward(self, input, residual=None):
        """act(BatchNorm(input) + residual); residual is optional (see functional.batch_norm)."""
        rm, rv, weight, bias, training, momentum, nbt, count = self._bn_args(input)
        return _batch_norm(input, rm, rv, weight, bias, training, momentum, self.eps,
                           self.activation, nbt, residual, self._slope(), None, count)

    def _act_repr(self):
        out = f"activation={self.activation!r}"
        if self.activation == "leaky_relu":
            out += f", negative_slope={self.negative_slope}"
        elif self.activation == "elu":
            out += f", alpha={self.alpha}"
        return out

    def extra_repr(self):
        return f"{super().extra_repr()}, {self._act_repr()}"


# A tritonbn module made of another BatchNorm module (fusion.convert,
# SyncBatchNorm.convert_sync_batchnorm): its very Parameters, buffers and hooks.
_CALL_HOOKS = ("_backward_pre_hooks", "_backward_hooks", "_is_full_backward_hook",
               "_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
               "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs")
_STATE_HOOKS = ("_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
                "_load_state_dict_post_hooks")


def _act_kwargs(old, activation, slope) -> dict:
    """activation, negative_slope and alpha of a module replacing old: old's scalars (a
    tritonbn module's, else the defaults), with slope, the scalar of the activation
    found after it (leaky_relu's negative_slope, elu's alpha), where there is one."""
    kw = dict(activation=activation, negative_slope=getattr(old, "negative_slope", 0.01),
              alpha=getattr(old, "alpha", 1.0))
    if slope is not None:
        kw["alpha" if activation == "elu" else "negative_slope"] = slope
    return kw


def _new_batchnorm(cls, old: nn.modules.batchnorm._BatchNorm, activation=None, slope=None,
                   keep_hooks=None) -> nn.Module:
    """A tritonbn module of class cls holding old's very Parameters and buffers (and its
    process group, for a SyncBatchNorm). Its forward/backward hooks too, unless it gets
    an activation old did not have (keep_hooks=None) or keep_hooks is False."""
    new = cls(old.num_features, old.eps, old.momentum, old.affine, old.track_running_stats,
              device="meta", **_act_kwargs(old, activation, slope))
    for name in list(new._parameters):
        new._parameters[name] = old._parameters.get(name)
    for name in list(new._buffers):
        new._buffers[name] = old._buffers.get(name)
    new._non_persistent_buffers_set = set(old._non_persistent_buffers_set)
    new.training = old.training
    if hasattr(new, "process_group") and hasattr(old, "process_group"):
        new.process_group = old.process_group
    if hasattr(old, "qconfig"):
        new.qconfig = old.qconfig
    _copy_hooks(new, old, activation is None if keep_hooks is None else keep_hooks)
    return new


def _copy_hooks(new: nn.Module, old: nn.Module, calls: bool) -> None:
    """old's state_dict hooks, and (calls) its forward/backward hooks, on new: the same
    dicts, so that their handles still remove them. A fused module, which returns
    act(bn(x) + other), is only made for a module without forward/backward hooks, and
    gets none of the original's later ones."""
    for attr in _STATE_HOOKS + (_CALL_HOOKS if calls else ()):
        if attr in old.__dict__:
            new.__dict__[attr] = old.__dict__[attr]



class BatchNorm1d(_BatchNormAct, nn.BatchNorm1d):
    r"""torch.nn.BatchNorm1d over (N, C) or (N, C, L), with an optional fused activation.

    Args:
        num_features, eps, momentum, affine, track_running_stats, device, dtype:
            as for :class:`torch.nn.BatchNorm1d`.
        activation: ``None``, ``"relu"``, ``"leaky_relu"``, ``"silu"``, ``"gelu"``
            (exact erf form), ``"gelu_tanh"`` (``approximate="tanh"``), ``"relu6"``,
            ``"hardswish"``, ``"hardsigmoid"``, ``"mish"`` or ``"elu"``, as torch's
            functions of those names, applied in the same kernel, after the residual.
        negative_slope: the slope of ``"leaky_relu"`` below 0 (default 0.01).
        alpha: the ``alpha`` of ``"elu"``, ``alpha * (exp(x) - 1)`` below 0 (default 1.0).

    Shape:
        Input (N, C) or (N, C, L); output the same shape and memory format.
        ``forward(input, residual=None)``: a residual of the input's shape is added
        before the activation (``act(bn(input) + residual)``), with its grad.

    Examples::

        >>> m = tritonbn.BatchNorm1d(100, activation="relu")
        >>> y = m(torch.randn(20, 100))
    """


class BatchNorm2d(_BatchNormAct, nn.BatchNorm2d):
    r"""torch.nn.BatchNorm2d over (N, C, H, W), with an optional fused activation.

    Args:
        num_features, eps, momentum, affine, track_running_stats, device, dtype:
            as for :class:`torch.nn.BatchNorm2d`.
        activation: ``None``, ``"relu"``, ``"leaky_relu"``, ``"silu"``, ``"gelu"``
            (exact erf form), ``"gelu_tanh"`` (``approximate="tanh"``), ``"relu6"``,
            ``"hardswish"``, ``"hardsigmoid"``, ``"mish"`` or ``"elu"``, as torch's
            functions of those names, applied in the same kernel, after the residual.
        negative_slope: the slope of ``"leaky_relu"`` below 0 (default 0.01).
        alpha: the ``alpha`` of ``"elu"``, ``alpha * (exp(x) - 1)`` below 0 (default 1.0).

    Shape:
        Input (N, C, H, W), contiguous or channels_last; output the same shape and
        memory format. ``forward(input, residual=None)``: a residual of the input's
        shape, in any memory format, is added before the activation.

    Examples::

        >>> m = tritonbn.BatchNorm2d(64, activation="relu")   # = nn.BatchNorm2d(64) + nn.ReLU()
        >>> y = m(torch.randn(8, 64, 32, 32))
        >>> x, identity = torch.randn(8, 64, 32, 32), torch.randn(8, 64, 32, 32)
        >>> y = m(x, identity)                                 # = relu(bn(x) + identity)
    """


class BatchNorm3d(_BatchNormAct, nn.BatchNorm3d):
    r"""torch.nn.BatchNorm3d over (N, C, D, H, W), with an optional fused activation.

    Args:
        num_features, eps, momentum, affine, track_running_stats, device, dtype:
            as for :class:`torch.nn.BatchNorm3d`.
        activation: ``None``, ``"relu"``, ``"leaky_relu"``, ``"silu"``, ``"gelu"``
            (exact erf form), ``"gelu_tanh"`` (``approximate="tanh"``), ``"relu6"``,
            ``"hardswish"``, ``"hardsigmoid"``, ``"mish"`` or ``"elu"``, as torch's
            functions of those names, applied in the same kernel, after the residual.
        negative_slope: the slope of ``"leaky_relu"`` below 0 (default 0.01).
        alpha: the ``alpha`` of ``"elu"``, ``alpha * (exp(x) - 1)`` below 0 (default 1.0).

    Shape:
        Input (N, C, D, H, W), contiguous or channels_last_3d; output the same shape
        and memory format. ``forward(input, residual=None)``: a residual of the
        input's shape is added before the activation.

    Examples::

        >>> m = tritonbn.BatchNorm3d(16, activation="relu")
        >>> y = m(torch.randn(2, 16, 4, 8, 8))
    """


class FrozenBatchNorm2d(_BatchNormAct, nn.Module):
    r"""A BatchNorm2d with fixed statistics and affine parameters, as detection and
    fine-tuning models use (torchvision.ops.misc.FrozenBatchNorm2d, timm's
    FrozenBatchNorm2d): ``act((x - running_mean) / sqrt(running_var + eps) * weight
    + bias [+ residual])`` in one read and one write, on the eval-mode kernels.

    ``weight``, ``bias``, ``running_mean`` and ``running_var`` are buffers, as in
    torchvision's, so backward gives the input's grad (and the residual's) only; the
    state_dict has those four keys, and a ``num_batches_tracked`` in a loaded one is
    dropped, as torchvision's does.
    """

    def __init__(self, num_features, eps=1e-5, device=None, dtype=None, *, activation=None,
                 negative_slope=0.01, alpha=1.0):
        nn.Module.__init__(self)
        kw = dict(device=device, dtype=dtype)
        self.num_features, self.eps = num_features, eps
        self.register_buffer("weight", torch.ones(num_features, **kw))
        self.register_buffer("bias", torch.zeros(num_features, **kw))
        self.register_buffer("running_mean", torch.zeros(num_features, **kw))
        self.register_buffer("running_var", torch.ones(num_features, **kw))
        self._set_activation(activation, negative_slope, alpha)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def forward(self, input, residual=None):
        if input.dim() != 4:
            raise ValueError(f"expected 4D input (got {input.dim()}D input)")
        return _batch_norm(input, self.running_mean, self.running_var, self.weight, self.bias,
                           False, 0.0, self.eps, self.activation, None, residual=residual,
                           negative_slope=self._slope())

    def extra_repr(self):
        return f"{self.num_features}, eps={self.eps}, {self._act_repr()}"
