"""tritonbn.SyncBatchNorm: BatchNorm statistics over every process of a torch.distributed
group, with tritonbn's kernels doing each process's work.

Training forward: this process's (mean, M2, count) per channel from the Triton
stats kernels; one all_gather of them (3·C numbers per process); the Chan
combine of every process's in the same combine kernel, which also updates the
running stats with the global count. Backward: the local Σdy', Σdy'·x̂, one
all_reduce of them (2·C numbers), then the local dx kernel. weight and bias
grads stay this process's own, as torch's SyncBatchNorm leaves them (DDP
averages them). Eval, world size 1, or no process group: no collectives.

Eager, the two exchanges are _Collectives' calls, made from Python between the
kernels. Under torch.compile the same kernels run as custom ops, and the exchanges
are torch.distributed's functional collectives over the group's name
(library.py), which dynamo traces: one graph per process, with the process group,
its size and its name resolved while tracing (constants, guarded), never in the
graph.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from .functional import _batch_norm
from .modules import _BatchNormAct, _new_batchnorm


class _Collectives:
    """The two exchanges of a SyncBatchNorm step over one process group."""

    def __init__(self, group, world_size: int):
        self.group, self.world_size = group, world_size

    @property
    def group_name(self) -> str:
        """The group's name, as torch.compile's functional collectives take it."""
        return self.group.group_name

    def gather(self, local: torch.Tensor) -> torch.Tensor:
        """[3, 1, C] (mean, M2, count) of this process -> [3, world, C] of all of them."""
        parts = [torch.empty_like(local) for _ in range(self.world_size)]
        dist.all_gather(parts, local.contiguous(), group=self.group)
        return torch.cat(parts, dim=1)

    def reduce(self, sums: torch.Tensor) -> None:
        """Σdy' and Σdy'·x̂ [2, C], summed over every process, in place."""
        dist.all_reduce(sums, group=self.group)


# The smallest group whose statistics go through collectives; a test hook (the GPU
# check's CUDA-graph test sets 1: it has one GPU, and a group of one otherwise skips them)
_MIN_WORLD = 2


class SyncBatchNorm(_BatchNormAct, nn.SyncBatchNorm):
    r"""torch.nn.SyncBatchNorm on tritonbn's kernels, with a fused residual add and activation.

    Statistics are over the batches of every process in ``process_group`` (all of
    them by default) when training with an initialized process group of more than
    one process; otherwise it is a plain tritonbn BatchNorm. Batch sizes may differ
    between processes, down to one sample (or none). ``torch.compile(fullgraph=True)``
    traces it into one graph per process, its exchanges as functional collectives.

    Args:
        num_features, eps, momentum, affine, track_running_stats, process_group,
            device, dtype: as for :class:`torch.nn.SyncBatchNorm`.
        activation: ``None``, ``"relu"``, ``"leaky_relu"``, ``"silu"``, ``"gelu"``
            (exact erf form), ``"gelu_tanh"`` (``approximate="tanh"``), ``"relu6"``,
            ``"hardswish"``, ``"hardsigmoid"``, ``"mish"`` or ``"elu"``, as torch's
            functions of those names, applied in the same kernel, after the residual.
        negative_slope: the slope of ``"leaky_relu"`` below 0 (default 0.01).
        alpha: the ``alpha`` of ``"elu"``, ``alpha * (exp(x) - 1)`` below 0 (default 1.0).

    Shape:
        Input (N, C, *), in any memory format; output the same shape and format.
        ``forward(input, residual=None)``: a residual of the input's shape is added
        before the activation.

    Examples::

        >>> # torchrun --nproc-per-node 8 train.py; in train.py:
        >>> torch.distributed.init_process_group("nccl")
        >>> model = tritonbn.SyncBatchNorm.convert_sync_batchnorm(model)
        >>> model = torch.nn.parallel.DistributedDataParallel(model.cuda(), [local_rank])
    """

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, process_group=None, device=None, dtype=None, *,
                 activation=None, negative_slope=0.01, alpha=1.0):
        nn.SyncBatchNorm.__init__(self, num_features, eps, momentum, affine,
                                  track_running_stats, process_group, device, dtype)
        self._set_activation(activation, negative_slope, alpha)

    def forward(self, input, residual=None):
        self._check_input_dim(input)
        self._check_non_zero_input_channels(input)
        rm, rv, weight, bias, training, momentum, nbt, count = self._bn_args(input)
        comm = None
        if training and self.training and dist.is_available() and dist.is_initialized():
            group = self.process_group or dist.group.WORLD
            world_size = dist.get_world_size(group)
            if world_size >= _MIN_WORLD:
                comm = _Collectives(group, world_size)
        return _batch_norm(input, rm, rv, weight, bias, training, momentum, self.eps,
                           self.activation, nbt, residual, self._slope(), comm, count)

    @classmethod
    def convert_sync_batchnorm(cls, module: nn.Module, process_group=None) -> nn.Module:
        """Every BatchNorm*d in module (torch's, tritonbn's, or a torch SyncBatchNorm) as a
        tritonbn.SyncBatchNorm, in place as torch's convert_sync_batchnorm does: the
        new modules share the old ones' Parameters and buffers (so optimizers stay
        valid) and keep training, hooks and a tritonbn module's activation."""
        out = module
        if (isinstance(module, nn.modules.batchnorm._BatchNorm)
                and not isinstance(module, (cls, nn.modules.lazy.LazyModuleMixin))):
            out = _new_batchnorm(cls, module, getattr(module, "activation", None),
                                 keep_hooks=True)
            out.process_group = process_group
        for name, child in module.named_children():
            new = cls.convert_sync_batchnorm(child, process_group)
            if new is not child:
                out._modules[name] = new
        return out
