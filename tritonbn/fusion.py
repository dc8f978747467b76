"""tritonbn.convert: swap a model's BatchNorms for tritonbn's and fuse the activations after them.

Three steps, each semantics-preserving:

1. every ``torch.nn.BatchNorm1d/2d/3d`` (and ``SyncBatchNorm``) in the module tree is
   replaced, in place, by tritonbn's module of the same kind, sharing its Parameters
   and buffers;
2. inside ``nn.Sequential`` containers, a BatchNorm directly followed by an activation
   module takes that activation (fused in its kernel), and the activation's slot
   becomes ``nn.Identity()``;
3. the model is traced with ``torch.fx``, and ``act(bn(x))``, ``act(bn(x) + other)`` and
   ``act(other + bn(x))`` are rewritten to one call of a fused BatchNorm
   (``bn(x, other)`` with the activation set), in a ``torch.fx.GraphModule``.

In steps 2 and 3 modules that return their input unchanged, in training and eval
(``nn.Identity``, a dropout with p = 0, stochastic depth at 0), may sit between the
BatchNorm, the add and the activation (timm's ``bn2 -> drop_block -> act2``).
"""
from __future__ import annotations

import inspect
import operator
import warnings
from collections import Counter
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn

from .distributed import SyncBatchNorm
from .modules import (BatchNorm1d, BatchNorm2d, BatchNorm3d, FrozenBatchNorm2d, _act_kwargs,
                      _BatchNormAct, _copy_hooks, _new_batchnorm)

__all__ = ["convert", "ConvertRow", "format_report"]

# torch class -> the tritonbn class that replaces it (a callable of the module, for a
# class that might depend on the instance). Looked up along the module's MRO; classes
# not listed are left alone (the Lazy* modules before they materialize, other norms).
_REPLACEMENTS = {
    nn.BatchNorm1d: lambda m: BatchNorm1d,
    nn.BatchNorm2d: lambda m: BatchNorm2d,
    nn.BatchNorm3d: lambda m: BatchNorm3d,
    nn.SyncBatchNorm: lambda m: SyncBatchNorm,
}


def convert(module: nn.Module, *, fuse_activation: bool = True, report: bool = False):
    """Run a model's BatchNorms on tritonbn, fusing the activation (and residual add)
    that follows each one into its kernels.

    Example::

        model = torchvision.models.resnet50()
        model = tritonbn.convert(model)     # use the returned module
        out = model(images)                 # the same function, fused BN + add + ReLU

    What it does:

    * **Replaces** every :class:`torch.nn.BatchNorm1d`/``2d``/``3d`` and
      :class:`torch.nn.SyncBatchNorm` (or a subclass that keeps torch's ``forward``) by
      :class:`tritonbn.BatchNorm1d`/``2d``/``3d`` / :class:`tritonbn.SyncBatchNorm`
      (with the same process group), **in place** in the module tree, as :meth:`torch.nn.SyncBatchNorm.convert_sync_batchnorm`
      does. The new modules share the very Parameter and buffer objects of the old ones
      (``weight``, ``bias``, ``running_mean``, ``running_var``, ``num_batches_tracked``),
      so an optimizer built before ``convert`` keeps training the converted model, and
      device and dtype are unchanged. ``training`` is copied. If ``module`` itself is a
      BatchNorm, the new module is returned. The ``Lazy`` modules are left as they are.
      torchvision's and timm's ``FrozenBatchNorm2d`` become
      :class:`tritonbn.FrozenBatchNorm2d` (the same buffers); timm's ``BatchNormAct2d``,
      ``SyncBatchNormAct`` and ``FrozenBatchNormAct2d`` become tritonbn's
      ``BatchNorm2d``, ``SyncBatchNorm`` (the same process group) and
      ``FrozenBatchNorm2d`` with their activation, where their ``drop`` computes
      nothing and their ``act`` is fused (recognized by class and module name; neither
      package is imported).
    * With ``fuse_activation`` (the default), fuses the activation after a BatchNorm:
      ``nn.ReLU``, ``nn.LeakyReLU``, ``nn.SiLU``, ``nn.GELU()`` and
      ``nn.GELU(approximate="tanh")``, ``nn.ReLU6`` (and ``nn.Hardtanh(0, 6)``),
      ``nn.Hardswish``, ``nn.Hardsigmoid``, ``nn.Mish``, ``nn.ELU`` (with its alpha),
      timm's ``GELU`` and ``GELUTanh`` (by class name), their functional forms (``F.relu``, ``torch.relu``, ``x.relu()``,
      ``F.leaky_relu``, ``F.silu``, ``F.gelu``, ``F.relu6``, ``F.hardtanh(x, 0, 6)``,
      ``F.hardswish``, ``F.hardsigmoid``, ``F.mish``, ``F.elu``; in-place variants
      too), and a residual added between them (``act(bn(x) + other)``,
      ``out += identity`` as in torchvision's ResNet blocks):

      - inside an ``nn.Sequential``, ``(..., bn, act, ...)`` becomes
        ``(..., bn with the activation, nn.Identity(), ...)``, in place;
      - elsewhere, the model is traced with :mod:`torch.fx` (tritonbn's BatchNorms are
        leaves) and the pattern is rewritten to one call of a new fused BatchNorm, which
        shares the Parameters and buffers of the one it replaces. When at least one such
        fusion happened, a :class:`torch.fx.GraphModule` is returned; the argument
        itself then keeps unfused (but converted) BatchNorms and stays usable.
        Otherwise the argument (converted in place) is returned, with its own class.

      A pattern is fused only where that cannot change the result: the BatchNorm's
      output and the sum each have one user, the BatchNorm module is called once in
      the graph and has no hooks, and nothing in between works in place. Where the
      model cannot be traced (data-dependent control flow, a ``forward`` that depends
      on ``self.training``, hooks on a module that tracing would drop), its children
      are traced one by one and replaced by their fused GraphModules, and one
      ``UserWarning`` names the modules left unfused.

    **state_dict:** the keys, and their order, are those of the original model: BatchNorm
    keys are unchanged (``"layer1.0.bn2.weight"``, ``"...running_var"``,
    ``"...num_batches_tracked"``), and activations have no state. Checkpoints load both
    ways between the original and the converted model.

    ``convert`` of a converted model changes nothing more (fused BatchNorms are not
    fused again).

    **What was fused:** with ``report=True`` it returns ``(module, rows)``: one
    :class:`ConvertRow` per BatchNorm of the original, by qualified name, saying what
    it became, the activation and residual add fused into it, or why not.
    ``print(tritonbn.fusion.format_report(rows))`` shows them as a table.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"convert() expects an nn.Module, got {type(module).__name__}")
    originals = [(name, type(m)) for name, m in module.named_modules()
                 if isinstance(m, (nn.modules.batchnorm._BatchNorm, FrozenBatchNorm2d))
                 or _foreign_frozen(m) or _foreign(m, "FrozenBatchNormAct2d", "timm.")]
    module = _replace_batchnorms(module, {})
    failures: list[tuple[str, str]] = []
    if fuse_activation:
        _fuse_sequentials(module)
        module = _fuse_traced(module, "", failures)[0]
    if failures:
        warnings.warn(
            "tritonbn.convert: could not trace "
            + ", ".join(f"{name or '<root>'!r} ({why})" for name, why in failures)
            + ": " + ("its" if len(failures) == 1 else "their")
            + " BatchNorms were replaced but not fused with the activations after them",
            UserWarning, stacklevel=2)
    if report:
        return module, _report(module, originals, failures, fuse_activation)
    return module


@dataclass(frozen=True)
class ConvertRow:
    """What :func:`convert` made of one BatchNorm of the original model."""
    name: str                   # qualified name in the model ("" for the root)
    was: str                    # its class
    became: str                 # the class in the converted model
    activation: str | None      # fused into its kernel
    residual: bool              # a residual add fused into its kernel
    note: str                   # why it was left alone or not fused, else ""


def _report(module, originals, failures, fuse_activation) -> list[ConvertRow]:
    now = dict(module.named_modules())
    with_residual = set()                    # fused calls bn(x, other), in every graph
    for prefix, gm in now.items():
        if isinstance(gm, fx.GraphModule):
            for n in gm.graph.nodes:
                if n.op == "call_module" and len(n.args) == 2:
                    with_residual.add(f"{prefix}.{n.target}" if prefix else n.target)
    rows = []
    for name, cls in originals:
        m = now.get(name)
        act = getattr(m, "activation", None) if isinstance(m, _BatchNormAct) else None
        note = ""
        if not isinstance(m, _BatchNormAct):
            note = (f"left alone: {cls.__name__} computes something else (its own forward "
                    "or state), or its activation is not one tritonbn fuses")
        elif act is None and name not in with_residual:
            untraced = [f for f, _ in failures if not f or name == f or name.startswith(f + ".")]
            note = ("not fused: fusion was turned off" if not fuse_activation else
                    f"not fused: could not trace {untraced[-1] or '<root>'!r} "
                    f"({dict(failures)[untraced[-1]]})" if untraced else
                    "not fused: no activation tritonbn fuses comes after it")
        rows.append(ConvertRow(name, cls.__name__, type(m).__module__.split(".")[0] + "."
                               + type(m).__name__ if m is not None else "-", act,
                               name in with_residual, note))
    return rows


def format_report(rows: list[ConvertRow]) -> str:
    """rows of convert(..., report=True) as a text table, and a one-line summary."""
    lines = [f"{'name':32} {'was':18} {'became':22} {'activation':11} residual  note"]
    for r in rows:
        lines.append(f"{r.name or '<root>':32} {r.was:18} {r.became:22} "
                     f"{r.activation or '-':11} {'yes' if r.residual else '-':9} {r.note}")
    fused = sum(1 for r in rows if r.activation or r.residual)
    replaced = sum(1 for r in rows if r.became.startswith("tritonbn."))
    lines.append(f"{len(rows)} BatchNorms: {replaced} on tritonbn, {fused} with an activation "
                 f"or residual add fused")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------
# 1. replacement


def _replacement_class(m: nn.Module):
    if isinstance(m, _BatchNormAct):
        return None
    for cls in type(m).__mro__:
        if cls in _REPLACEMENTS:
            # a subclass with its own forward computes something else: leave it alone
            if type(m).forward is not cls.forward:
                return None
            return _REPLACEMENTS[cls](m)
    return None


def _foreign(m: nn.Module, name: str, *packages: str) -> bool:
    """m is an instance of the class `name` from one of `packages` (torchvision's or
    timm's, recognized without importing them)."""
    t = type(m)
    return t.__name__ == name and (t.__module__ or "").startswith(packages)


# timm's norm-act classes that subclass a torch BatchNorm (by class name) -> (that torch
# class, the tritonbn class that replaces it)
_TIMM_NORM_ACT = {"BatchNormAct2d": (nn.BatchNorm2d, BatchNorm2d),
                  "SyncBatchNormAct": (nn.SyncBatchNorm, SyncBatchNorm)}


def _timm_norm_act(m: nn.Module):
    """(tritonbn class, activation, slope) for timm's BatchNormAct2d (a BatchNorm2d
    subclass whose forward is bn -> self.drop -> self.act) and SyncBatchNormAct (an
    nn.SyncBatchNorm subclass with the same tail, what timm's convert_sync_batchnorm
    makes of a BatchNormAct2d), recognized by class and module name, timm is not
    imported, where drop computes nothing and act is nn.Identity or an activation
    tritonbn fuses; else None."""
    kind = _TIMM_NORM_ACT.get(type(m).__name__)
    if not (kind is not None and _foreign(m, type(m).__name__, "timm.")
            and isinstance(m, kind[0]) and set(m._modules) == {"drop", "act"}):
        return None
    tail = _drop_act(m)
    return None if tail is None else (kind[1], *tail)


def _drop_act(m: nn.Module):
    """(activation, slope) of a timm norm-act module's tail, self.act(self.drop(y)),
    where the module has no hooks, drop computes nothing and act is nn.Identity
    ((None, None)) or an activation tritonbn fuses; else None."""
    if _has_hooks(m) or not _noop_module(m.drop):
        return None
    if type(m.act) is nn.Identity and not _has_hooks(m.act):
        return None, None
    return _module_activation(m.act)


def _foreign_frozen(m: nn.Module) -> bool:
    """torchvision.ops.misc.FrozenBatchNorm2d or timm's FrozenBatchNorm2d (by class and
    module name; neither is imported): fixed weight, bias and running stats, buffers."""
    return (_foreign(m, "FrozenBatchNorm2d", "torchvision.", "timm.")
            and set(m._buffers) == {"weight", "bias", "running_mean", "running_var"}
            and not m._parameters and not m._modules
            and isinstance(getattr(m, "eps", None), float))


def _timm_frozen_act(m: nn.Module):
    """(activation, slope) for timm's FrozenBatchNormAct2d (fixed statistics and affine
    buffers, then self.drop, then self.act; recognized by class and module name) where
    drop computes nothing and act is nn.Identity or an activation tritonbn fuses; else
    None."""
    if not (_foreign(m, "FrozenBatchNormAct2d", "timm.")
            and set(m._buffers) == {"weight", "bias", "running_mean", "running_var"}
            and not m._parameters and set(m._modules) == {"drop", "act"}
            and isinstance(getattr(m, "eps", None), float)):
        return None
    return _drop_act(m)


def _new_frozen(old, activation=None, slope=None) -> FrozenBatchNorm2d:
    """A tritonbn FrozenBatchNorm2d holding old's very buffers."""
    new = FrozenBatchNorm2d(old.weight.shape[0], old.eps, device="meta",
                            **_act_kwargs(old, activation, slope))
    for name in list(new._buffers):
        new._buffers[name] = old._buffers[name]
    new.training = old.training
    _copy_hooks(new, old, activation is None)
    return new


def _replace_batchnorms(module: nn.Module, memo: dict) -> nn.Module:
    if id(module) in memo:                   # a module registered at several places
        return memo[id(module)]
    if _foreign_frozen(module):
        memo[id(module)] = new = _new_frozen(module)
        return new
    frozen_act = _timm_frozen_act(module)
    if frozen_act is not None:               # its drop and act go into the kernel
        memo[id(module)] = new = _new_frozen(module, *frozen_act)
        return new
    norm_act = _timm_norm_act(module)
    if norm_act is not None:                 # its drop and act go into the kernel
        cls, activation, slope = norm_act
        memo[id(module)] = new = _new_batchnorm(cls, module, activation, slope,
                                                keep_hooks=False)
        return new
    cls = _replacement_class(module)
    new = module
    if cls is not None:
        new = _new_batchnorm(cls, module)
        # a subclass with more state than torch's module keeps its class
        if (set(new._parameters) != set(module._parameters)
                or set(new._buffers) != set(module._buffers)):
            new = module
    memo[id(module)] = new
    for name, child in list(module._modules.items()):
        if child is not None:
            converted = _replace_batchnorms(child, memo)
            if converted is not child:
                new._modules[name] = converted
    return new


# --------------------------------------------------------------------------------------
# activations

def _has_hooks(m: nn.Module) -> bool:
    return any(getattr(m, attr, None) for attr in (
        "_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks"))


# activation modules without parameters -> tritonbn's name (their inplace flag
# changes nothing once fused)
_MODULES = {nn.ReLU: "relu", nn.SiLU: "silu", nn.Hardswish: "hardswish",
            nn.Hardsigmoid: "hardsigmoid", nn.Mish: "mish"}
_GELUS = {"none": "gelu", "tanh": "gelu_tanh"}  # by GELU's approximate


def _relu6_bounds(min_val, max_val) -> bool:
    """hardtanh(min_val, max_val) is relu6."""
    return _number(min_val) and _number(max_val) and min_val == 0 and max_val == 6


def _module_activation(m):
    """(activation, slope) of an activation module tritonbn can fuse, else None; slope is
    the scalar it carries (leaky_relu's negative_slope, elu's alpha), else None."""
    if _has_hooks(m):
        return None
    t = type(m)
    if t in _MODULES:
        return _MODULES[t], None
    if t is nn.LeakyReLU:
        return "leaky_relu", float(m.negative_slope)
    if t is nn.ELU:
        return "elu", float(m.alpha)
    if t is nn.GELU and m.approximate in _GELUS:
        return _GELUS[m.approximate], None
    if t in (nn.ReLU6, nn.Hardtanh) and _relu6_bounds(m.min_val, m.max_val):
        return "relu6", None
    activation = _TIMM_ACTIVATIONS.get(t.__name__)
    if (activation is not None and _foreign(m, t.__name__, "timm.") and not m._modules
            and not m._parameters):
        return activation, None
    return None


# timm's own activation modules with torch's formula (what timm.layers.get_act_layer
# gives for "gelu" and "gelu_tanh"; its other names give torch's modules), by class name
_TIMM_ACTIVATIONS = {"GELU": "gelu", "GELUTanh": "gelu_tanh"}


_DROPOUTS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)


def _noop_module(m) -> bool:
    """A module that returns its input, in training and in eval: nn.Identity, a dropout
    with p = 0, or stochastic depth at probability 0 (torchvision's StochasticDepth,
    timm's DropPath; recognized by class and module name, neither is imported)."""
    if m is None or _has_hooks(m):
        return False
    t = type(m)
    if t is nn.Identity:
        return True
    if t in _DROPOUTS:
        return m.p == 0
    if _foreign(m, "StochasticDepth", "torchvision."):
        return getattr(m, "p", None) == 0
    if _foreign(m, "DropPath", "timm."):
        return getattr(m, "drop_prob", None) == 0
    return False


def _through_noops(node, modules, skipped: list):
    """The first node after node's chain of no-op module calls (_noop_module), each
    the only user of the one before; the calls passed are appended to skipped."""
    while len(node.users) == 1:
        (user,) = node.users
        if not (user.op == "call_module" and user.args == (node,) and not user.kwargs
                and _noop_module(modules.get(user.target))):
            break
        skipped.append(user)
        node = user
    return node


def _bind(node, names, defaults):
    """node's args+kwargs bound to parameter names, or None when they do not fit."""
    if len(node.args) > len(names):
        return None
    bound = dict(zip(names, node.args))
    for k, v in node.kwargs.items():
        if k not in names or k in bound:
            return None
        bound[k] = v
    for k, v in defaults.items():
        bound.setdefault(k, v)
    return bound if names[0] in bound else None


def _number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)


# call_function targets: (parameter names, their defaults, activation)
_FUNCTIONS = {
    torch.relu: (("input",), {}, "relu"),
    torch.relu_: (("input",), {}, "relu"),
    F.relu: (("input", "inplace"), {"inplace": False}, "relu"),
    F.relu_: (("input",), {}, "relu"),
    F.leaky_relu: (("input", "negative_slope", "inplace"),
                   {"negative_slope": 0.01, "inplace": False}, "leaky_relu"),
    F.silu: (("input", "inplace"), {"inplace": False}, "silu"),
    F.gelu: (("input", "approximate"), {"approximate": "none"}, "gelu"),
    F.relu6: (("input", "inplace"), {"inplace": False}, "relu6"),
    F.hardtanh: (("input", "min_val", "max_val", "inplace"),
                 {"min_val": -1.0, "max_val": 1.0, "inplace": False}, "hardtanh"),
    F.hardtanh_: (("input", "min_val", "max_val"), {"min_val": -1.0, "max_val": 1.0},
                  "hardtanh"),
    F.hardswish: (("input", "inplace"), {"inplace": False}, "hardswish"),
    F.hardsigmoid: (("input", "inplace"), {"inplace": False}, "hardsigmoid"),
    F.mish: (("input", "inplace"), {"inplace": False}, "mish"),
    F.elu: (("input", "alpha", "inplace"), {"alpha": 1.0, "inplace": False}, "elu"),
    F.elu_: (("input", "alpha"), {"alpha": 1.0}, "elu"),
}
_METHODS = {"relu": "relu", "relu_": "relu"}


def _node_activation(node, modules):
    """(input node, activation, slope) when node applies a fusable activation."""
    if node.op == "call_module":
        if len(node.args) != 1 or node.kwargs:
            return None
        spec = _module_activation(modules.get(node.target))
        return (node.args[0], *spec) if spec else None
    if node.op == "call_method":
        if node.target in _METHODS and len(node.args) == 1 and not node.kwargs:
            return node.args[0], _METHODS[node.target], None
        return None
    if node.op == "call_function":
        try:
            entry = _FUNCTIONS.get(node.target)
        except TypeError:                    # an unhashable target
            return None
        if entry is None:
            return None
        names, defaults, act = entry
        b = _bind(node, names, defaults)
        if b is None or not isinstance(b.get("inplace", False), bool):
            return None
        slope = None
        if act in ("leaky_relu", "elu"):
            slope = b["negative_slope" if act == "leaky_relu" else "alpha"]
            if not _number(slope):
                return None
            slope = float(slope)
        if act == "gelu":
            act = _GELUS.get(b["approximate"]) if isinstance(b["approximate"], str) else None
        if act == "hardtanh":
            act = "relu6" if _relu6_bounds(b["min_val"], b["max_val"]) else None
        return (b["input"], act, slope) if act is not None else None
    return None


# --------------------------------------------------------------------------------------
# 2. nn.Sequential


def _fuse_sequentials(root: nn.Module) -> None:
    slots = Counter()                        # how many module slots hold each module
    for m in root.modules():
        for child in m._modules.values():
            if child is not None:
                slots[id(child)] += 1
    for seq in list(root.modules()):
        if not isinstance(seq, nn.Sequential) or type(seq).forward is not nn.Sequential.forward:
            continue                         # a subclass may call its modules otherwise
        names = list(seq._modules)
        for i, first in enumerate(names):
            bn = seq._modules[first]
            if not (type(bn) in _TRITONBN
                    and bn.activation is None and slots[id(bn)] == 1 and not _has_hooks(bn)):
                continue
            j = i + 1                        # past no-op modules (nn.Identity, dropout p=0)
            while j < len(names) and _noop_module(seq._modules[names[j]]):
                j += 1
            if j == len(names):
                continue
            second = names[j]
            act = seq._modules[second]
            spec = _module_activation(act)
            if spec is None:
                continue
            bn._set_activation(**_act_kwargs(bn, *spec))
            seq._modules[second] = nn.Identity()


# --------------------------------------------------------------------------------------
# 3. torch.fx


class _Tracer(fx.Tracer):
    """torch.fx's tracer, with BatchNorms as leaves (called, not traced into).
    Buffers are proxied: a forward that updates one in place (timm's BatchNormAct2d
    counts num_batches_tracked) records the update in the graph rather than running it
    on the model while tracing (fx's default: the model's counters moved once per trace,
    and the converted graph never moved them again)."""
    proxy_buffer_attributes = True

    def is_leaf_module(self, m, module_qualified_name):
        # any BatchNorm convert left alone (timm's BatchNormAct2d with an activation
        # tritonbn lacks, say) is called as it is: its forward may read self.training
        return (isinstance(m, (_BatchNormAct, nn.modules.batchnorm._BatchNorm))
                or super().is_leaf_module(m, module_qualified_name))


class _Untraceable(Exception):
    pass


def _unfused_bns(module: nn.Module) -> bool:
    return any(isinstance(m, _BatchNormAct) and m.activation is None for m in module.modules())


def _trace(module: nn.Module) -> tuple[fx.Graph, _Tracer]:
    tracer = _Tracer()
    # Tracing drops the hooks of every module it traces through.
    for name, m in module.named_modules():
        if (_has_hooks(m) and not tracer.is_leaf_module(m, name)):
            raise _Untraceable(f"{name or 'the module'} has hooks, which tracing would drop")
    # A forward that reads self.training would be frozen in the current mode: trace in
    # both modes, and refuse when the graphs differ.
    flags = [(m, m.training) for m in module.modules()]
    codes = []
    try:
        for mode in (True, False):
            for m, _ in flags:
                m.training = mode
            codes.append(_Tracer().trace(module).python_code("self").src)
    finally:
        for m, flag in flags:
            m.training = flag
    tracer = _Tracer()
    graph = tracer.trace(module)             # in the module's own modes
    if not codes[0] == codes[1] == graph.python_code("self").src:
        raise _Untraceable("its forward depends on self.training")
    return graph, tracer


def _short(e: Exception) -> str:
    if isinstance(e, _Untraceable):
        return str(e)
    text = str(e).strip().splitlines()
    text = text[0] if text else ""
    if len(text) > 120:
        text = text[:117] + "..."
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _fuse_traced(module: nn.Module, qualname: str, failures: list):
    """(the module to use in module's place, whether its output comes unfused from a BN)."""
    if isinstance(module, _BatchNormAct):
        return module, module.activation is None
    if not _unfused_bns(module):
        return module, False
    try:
        graph, tracer = _trace(module)
    except Exception as e:                   # noqa: BLE001 - any tracing failure
        return _fuse_children(module, qualname, failures, e)
    fused, tail = _fuse_graph(module, graph, tracer)
    return fused, tail


def _fuse_children(module, qualname, failures, error):
    tails = False
    for name, child in list(module._modules.items()):
        if child is None:
            continue
        path = f"{qualname}.{name}" if qualname else name
        new, tail = _fuse_traced(child, path, failures)
        if new is not child:
            module._modules[name] = new
        tails |= tail
    if type(module).forward is nn.Module.forward:
        # a ModuleList / ModuleDict: the module calling its elements is the one to name
        return module, tails
    if tails:
        failures.append((qualname, _short(error)))
    return module, False


# ops that never write into a tensor, for the nodes a fusion moves a BatchNorm across
_INPLACE_FUNCTIONS = {operator.iadd, operator.isub, operator.imul, operator.itruediv,
                      operator.ifloordiv, operator.imod, operator.ipow, operator.iand,
                      operator.ior, operator.ixor, operator.ilshift, operator.irshift,
                      operator.imatmul, operator.setitem}


def _writes(node, modules) -> bool:
    """Whether node may write into a tensor in place (conservative)."""
    if node.kwargs.get("inplace") is True or node.kwargs.get("out") is not None:
        return True
    if node.op == "call_function" and callable(node.target):
        try:                                 # F.relu(x, True), F.dropout(x, 0.5, True, True)
            bound = inspect.signature(node.target).bind(*node.args, **node.kwargs)
            if bound.arguments.get("inplace") is True:
                return True
        except (TypeError, ValueError):
            pass
    if node.op == "call_method":
        return isinstance(node.target, str) and node.target.endswith("_") and not (
            node.target.startswith("__") and node.target.endswith("__"))
    if node.op == "call_function":
        if node.target in _INPLACE_FUNCTIONS:
            return True
        name = getattr(node.target, "__name__", "")
        return name.endswith("_") and not name.endswith("__")
    if node.op == "call_module":
        m = modules.get(node.target)
        return bool(getattr(m, "inplace", False)) and not isinstance(m, _BatchNormAct)
    return False


_NON_TENSOR_METHODS = {"size", "dim", "numel", "nelement", "item", "tolist", "stride",
                       "element_size", "__len__", "ndimension", "get_device"}


def _maybe_tensor(node) -> bool:
    """False where node is known not to be a tensor (x.shape[0], x.size(1), a float input)."""
    if not isinstance(node, fx.Node):
        return False
    if node.op == "placeholder":            # annotated int / float / bool: not a tensor
        return not (isinstance(node.type, type) and issubclass(node.type, (int, float, bool)))
    if node.op == "call_method":
        return node.target not in _NON_TENSOR_METHODS
    if node.op == "call_function":
        if node.target in (getattr, len):
            return False
        if getattr(node.target, "__module__", None) == "_operator":
            inputs = [a for a in node.args if isinstance(a, fx.Node)]
            return any(_maybe_tensor(a) for a in inputs)
    return True


def _add_operands(node):
    """(a, b, in place) when node is a + b with alpha 1, else None."""
    if node.op == "call_function" and node.target in (operator.add, operator.iadd, torch.add):
        kwargs = dict(node.kwargs)
        if node.target is torch.add:
            args = list(node.args)
            if len(args) == 3:
                kwargs.setdefault("alpha", args.pop())
            if len(args) != 2 or set(kwargs) - {"alpha"} or kwargs.get("alpha", 1) != 1:
                return None
            return args[0], args[1], False
        if len(node.args) != 2 or kwargs:
            return None
        return node.args[0], node.args[1], node.target is operator.iadd
    if node.op == "call_method" and node.target in ("add", "add_"):
        kwargs = dict(node.kwargs)
        args = list(node.args)
        if len(args) == 3:
            kwargs.setdefault("alpha", args.pop())
        if len(args) != 2 or set(kwargs) - {"alpha"} or kwargs.get("alpha", 1) != 1:
            return None
        return args[0], args[1], node.target == "add_"
    return None


_TRITONBN = (BatchNorm1d, BatchNorm2d, BatchNorm3d, SyncBatchNorm, FrozenBatchNorm2d)


def _plan(graph: fx.Graph, modules: dict):
    """The fusions to make: (bn node, act node, add node or None, other, act, slope,
    the no-op module calls between bn and the add or act, and between add and act)."""
    calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
    order = {n: i for i, n in enumerate(graph.nodes)}
    candidates = []
    for bn in graph.nodes:
        if bn.op != "call_module":
            continue
        m = modules.get(bn.target)
        if not (type(m) in _TRITONBN and m.activation is None and not _has_hooks(m)):
            continue
        if calls[bn.target] != 1 or len(bn.args) != 1 or bn.kwargs or len(bn.users) != 1:
            continue
        candidates.append(bn)
    plans, claimed = [], set()
    # bn(x) + other before other + bn(x): when both operands are BatchNorms, the first
    # one takes the sum (as torchvision's `out = bn2(out); out += identity`). No-op
    # modules (nn.Identity, dropout at p = 0, ...) between them are seen through.
    for second in (False, True):
        for bn in candidates:
            if bn in claimed:
                continue
            skipped = []
            out = _through_noops(bn, modules, skipped)
            if len(out.users) != 1:
                continue
            (user,) = out.users
            found = _node_activation(user, modules)
            if found is not None:
                if found[0] is out and not second:
                    plans.append((bn, user, None, None, found[1], found[2], skipped, []))
                    claimed.update((bn, user))
                continue
            ops = _add_operands(user)
            if ops is None or len(user.users) != 1 or user in claimed:
                continue
            a, b, inplace = ops
            if a is out and b is not out and not second:
                other = b
            elif b is out and a is not out and second and not inplace:  # other += bn(x)
                other = a                                              # writes into other
            else:
                continue
            if not _maybe_tensor(other) or other in skipped:
                continue
            after = []
            summed = _through_noops(user, modules, after)
            if len(summed.users) != 1:
                continue
            (act_node,) = summed.users
            found = _node_activation(act_node, modules)
            if found is None or found[0] is not summed:
                continue
            # the fused call runs where the add was: nothing in between may write in
            # place (into x, say) or read the BatchNorm's state
            between = [n for n in graph.nodes if order[bn] < order[n] < order[user]
                       and n not in skipped]
            if any(_writes(n, modules) for n in between):
                continue
            if any(n.op == "get_attr" and str(n.target).startswith(bn.target + ".")
                   for n in between):
                continue
            plans.append((bn, act_node, user, other, found[1], found[2], skipped, after))
            claimed.update((bn, user, act_node))
            if other in candidates:
                claimed.add(other)           # its output is now read by the fused call
    return plans


class _Container(nn.Module):
    """A container in a GraphModule made by :func:`convert`: it holds the submodules of an
    original one under their names (``model.layer1[0].bn2`` still works), but it has no
    forward of its own: the GraphModule's code calls its leaves, fused."""

    def __init__(self, original: nn.Module):
        super().__init__()
        self._original_name = original._get_name()
        self.training = original.training

    def _get_name(self):
        return self._original_name

    def __getitem__(self, idx):
        if isinstance(idx, str):
            return self._modules[idx]
        return list(self._modules.values())[idx]

    def __len__(self):
        return len(self._modules)

    def __iter__(self):
        return iter(self._modules.values())

    def forward(self, *args, **kwargs):
        raise RuntimeError(
            f"this {self._original_name} is part of a torch.fx.GraphModule made by "
            "tritonbn.convert, in which its layers were fused with the code around them: "
            "call the whole model")


def _mirror(dst: nn.Module, src: nn.Module, called: set) -> None:
    """Give dst src's parameters, buffers and submodules, in src's order: modules that the
    graph calls (and childless ones) by reference, the others as fresh containers, so
    that swapping a module in dst never touches src."""
    for name, p in src._parameters.items():
        dst._parameters[name] = p
    for name, b in src._buffers.items():
        dst._buffers[name] = b
    dst._non_persistent_buffers_set = set(src._non_persistent_buffers_set)
    for name, child in src._modules.items():
        if child is None or id(child) in called or not child._modules:
            dst._modules[name] = child
        else:
            box = _Container(child)
            _mirror(box, child, called)
            dst._modules[name] = box


def _resolve(root, target):
    obj = root
    for item in target.split("."):
        obj = getattr(obj, item)
    return obj


def _tail_bn(graph: fx.Graph, modules: dict) -> bool:
    """Whether the graph returns a BatchNorm's output that has no activation."""
    output = next(n for n in graph.nodes if n.op == "output")
    tail = output.args[0]
    return (isinstance(tail, fx.Node) and tail.op == "call_module"
            and isinstance(modules.get(tail.target), _BatchNormAct)
            and modules[tail.target].activation is None)


def _fuse_graph(module: nn.Module, graph: fx.Graph, tracer: _Tracer):
    modules = dict(module.named_modules())
    plans = _plan(graph, modules)
    if not plans:
        return module, _tail_bn(graph, modules)
    gm = fx.GraphModule(module, graph, class_name=type(module).__name__)
    called = {id(modules[n.target]) for n in graph.nodes if n.op == "call_module"}
    # GraphModule copied only what the graph names, in graph order, into fresh
    # containers; lay its hierarchy out as module's instead, so that the state_dict has
    # module's keys in module's order (unused modules included).
    gm._modules.clear()
    gm._parameters.clear()
    gm._buffers.clear()
    _mirror(gm, module, called)
    gm.training = module.training
    for n in gm.graph.nodes:                 # tensors the tracer found as plain attributes
        if n.op == "get_attr":
            try:
                _resolve(gm, n.target)
            except AttributeError:
                *path, field = n.target.split(".")
                owner = _resolve(gm, ".".join(path)) if path else gm
                object.__setattr__(owner, field, _resolve(module, n.target))
    graph = gm.graph
    replaced = {}                            # erased activation node -> the fused call
    for bn, act_node, add, other, activation, slope, before, after in plans:
        *path, field = bn.target.split(".")
        parent = _resolve(gm, ".".join(path)) if path else gm
        original_parent = _resolve(module, ".".join(path)) if path else module
        if parent is original_parent:        # would modify the original model: skip
            continue
        old = parent._modules[field]
        parent._modules[field] = (_new_frozen(old, activation, slope)
                                  if isinstance(old, FrozenBatchNorm2d) else
                                  _new_batchnorm(type(old), old, activation, slope))
        # the BatchNorm's node becomes the fused call: bn(x) or bn(x, other), run where
        # the add was
        if add is not None:
            while other in replaced:
                other = replaced[other]
            add.prepend(bn)
            bn.args = (bn.args[0], other)
        act_node.replace_all_uses_with(bn)
        replaced[act_node] = bn
        graph.erase_node(act_node)
        for n in reversed(after):            # each chain from its end: no users left
            graph.erase_node(n)
        if add is not None:
            graph.erase_node(add)
        for n in reversed(before):
            graph.erase_node(n)
    graph.lint()
    gm.recompile()
    return gm, _tail_bn(graph, dict(gm.named_modules()))
