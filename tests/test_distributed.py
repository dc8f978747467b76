"""tritonbn.SyncBatchNorm across processes: gloo on 127.0.0.1, every process running
the Triton kernels (under the interpreter without a GPU), spawned from pytest.

Each process draws the same global batch and takes its own slice; the result must
match one process's float64 torch BatchNorm over the whole batch: outputs, input
grads, the weight/bias grads summed over processes, running stats and
num_batches_tracked.
"""
import contextlib
import copy
import functools
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import tritonbn
import tritonbn.functional as TF
from conftest import DEVICE, assert_close, make_input
from tritonbn import ops, reference
from tritonbn.testing import poisoned_allocations

BACKEND = "gloo"


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world, port, fn, backend=BACKEND):
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    try:
        torch.manual_seed(0)
        fn(rank, world)
    finally:
        dist.destroy_process_group()


def spawn(world, fn, backend=BACKEND):
    """fn(rank, world) in `world` processes with a gloo (or `backend`) group; a failure in
    any fails here."""
    assert os.environ.get("TRITON_INTERPRET") == "1" or DEVICE == "cuda"
    mp.spawn(_entry, args=(world, _port(), fn, backend), nprocs=world, join=True)


# ----------------------------------------------------------------------------- one case

def _slices(sizes, rank):
    start = sum(sizes[:rank])
    return slice(start, start + sizes[rank])


class _Counted:
    """Counts SyncBatchNorm's collectives in this process."""

    def __init__(self, monkey):
        from tritonbn.distributed import _Collectives

        self.calls = []
        for name in ("gather", "reduce"):
            real = getattr(_Collectives, name)
            monkey.setattr(_Collectives, name,
                           lambda s, t, real=real, name=name: self.calls.append(name) or real(s, t))


class _Graphs:
    """aot_eager as a torch.compile backend that keeps the forward and backward graphs
    it compiles, to count the functional collectives in each."""

    def __init__(self):
        self.forward, self.backward = [], []

    def __call__(self, gm, inputs):
        from torch._dynamo.backends.debugging import aot_eager, boxed_nop

        def keep(into):
            return lambda g, example: into.append(g) or boxed_nop(g, example)

        return aot_eager(gm, inputs, fw_compiler=keep(self.forward),
                         bw_compiler=keep(self.backward))

    @staticmethod
    def collectives(gm) -> list:
        """The functional collectives a graph runs, by name, waits left out."""
        return [n.target._opname for n in gm.graph.nodes
                if n.op == "call_function" and getattr(n.target, "namespace", None)
                == "_c10d_functional" and n.target._opname != "wait_tensor"]


class _CompiledCounts:
    """The collectives a compiled SyncBatchNorm runs per step, read off the graphs
    each mode (training, eval) compiled on its first step: no mode compiles twice."""

    def __init__(self, graphs):
        self.graphs, self.seen, self.by_mode = graphs, (0, 0), {}

    def step(self, training) -> list:
        new = (self.graphs.forward[self.seen[0]:], self.graphs.backward[self.seen[1]:])
        self.seen = (len(self.graphs.forward), len(self.graphs.backward))
        if training in self.by_mode:
            assert new == ([], []), "recompiled"
        else:
            assert [len(n) for n in new] == [1, 1], new
            self.by_mode[training] = (new[0][0], new[1][0])
        fw, bw = self.by_mode[training]
        return _Graphs.collectives(fw) + _Graphs.collectives(bw)


def check_sync(rank, sizes, spatial=(4, 3), fmt=torch.contiguous_format, act=None,
               residual=False, momentum=0.1, group=None, ranks=None, steps=2, seed=1,
               compiled=False):
    """SyncBatchNorm over the processes `ranks` (all by default) of `group`, against
    float64 torch BatchNorm over the concatenated batch, several steps then eval.
    compiled: the module under torch.compile(fullgraph=True, backend aot_eager),
    also equal bit for bit to an eager copy of itself: outputs, grads, running
    stats and num_batches_tracked."""
    ranks = ranks or list(range(len(sizes)))
    me = ranks.index(rank)
    C = 5
    cls = {0: nn.BatchNorm1d, 1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[len(spatial)]
    ours = tritonbn.SyncBatchNorm(C, momentum=momentum, process_group=group, activation=act,
                                  negative_slope=0.2, alpha=0.2, device=DEVICE)
    ref = cls(C, momentum=momentum, dtype=torch.float64, device=DEVICE)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        ours.weight.copy_(torch.rand(C, generator=g) + 0.5)
        ours.bias.copy_(torch.randn(C, generator=g) * 0.5)
    ref.load_state_dict(ours.state_dict())
    sizes = [sizes[r] for r in ranks]
    mine = _slices(sizes, me)
    monkey = pytest.MonkeyPatch()
    counted = _Counted(monkey)
    run = ours
    if compiled:
        torch._dynamo.reset()
        twin = copy.deepcopy(ours, {id(group): group})  # the same group, not a copy
        graphs = _Graphs()
        compiled_counts = _CompiledCounts(graphs)
        run = torch.compile(ours, fullgraph=True, backend=graphs)
    for step in range(steps + 1):
        training = step < steps
        ours.train(training)
        ref.train(training)
        shape = (sum(sizes), C, *spatial)
        x_all = (torch.randn(shape, generator=g, dtype=torch.float64) * 2
                 + torch.arange(C, dtype=torch.float64).view(1, C, *[1] * len(spatial)) + 3)
        dy_all = torch.randn(shape, generator=g, dtype=torch.float64)
        z_all = torch.randn(shape, generator=g, dtype=torch.float64) - 0.5
        x = x_all[mine].float().to(DEVICE).to(memory_format=fmt).requires_grad_()
        z = z_all[mine].float().to(DEVICE).requires_grad_() if residual else None
        with poisoned_allocations():
            y = run(x, z)
            y.backward(dy_all[mine].float().to(DEVICE))
        if compiled:
            twin.train(training)
            _same_as_eager(twin, ours, x, z, dy_all[mine].float().to(DEVICE), y)
        x64 = x_all.to(DEVICE).requires_grad_()
        z64 = z_all.to(DEVICE).requires_grad_() if residual else None
        y64 = reference.activate(ref(x64) + z64 if residual else ref(x64), act, 0.2)
        y64.backward(dy_all.to(DEVICE))
        assert y.stride() == x.stride()
        assert_close(y, y64[mine], torch.float32, 8)
        assert_close(x.grad, x64.grad[mine], torch.float32, 8)
        if residual:
            assert_close(z.grad, z64.grad[mine], torch.float32, 8)
        grads = torch.stack([ours.weight.grad, ours.bias.grad])
        dist.all_reduce(grads, group=group)  # torch's SyncBatchNorm: per-process partials
        assert_close(grads[0], ref.weight.grad, torch.float32, 80)
        assert_close(grads[1], ref.bias.grad, torch.float32, 80)
        assert_close(ours.running_mean, ref.running_mean, torch.float32, 4)
        assert_close(ours.running_var, ref.running_var, torch.float32, 4)
        assert ours.num_batches_tracked.item() == ref.num_batches_tracked.item()
        # one all_gather forward and one all_reduce backward when training across
        # processes; none in eval or in a group of one
        synced = training and len(ranks) > 1
        if compiled:  # the twin's, eager
            assert counted.calls == (["gather", "reduce"] if synced else [])
            assert compiled_counts.step(training) == (
                ["all_gather_into_tensor", "all_reduce"] if synced else [])
        else:
            assert counted.calls == (["gather", "reduce"] if synced else [])
        counted.calls.clear()
        ours.zero_grad()
        ref.zero_grad()
        if compiled:
            twin.zero_grad()
    monkey.undo()


def _same_as_eager(twin, ours, x, z, dy, y):
    """twin (eager) on the same x, z and dy as ours (compiled) gave y: the same y,
    grads, running stats and num_batches_tracked, bit for bit."""
    x2 = x.detach().clone().requires_grad_()
    z2 = z.detach().clone().requires_grad_() if z is not None else None
    y2 = twin(x2, z2)
    y2.backward(dy)
    same = functools.partial(torch.testing.assert_close, atol=0, rtol=0)
    same(y, y2)
    same(x.grad, x2.grad)
    if z is not None:
        same(z.grad, z2.grad)
    for (name, a), b in zip(ours.named_parameters(), twin.parameters()):
        same(a.grad, b.grad, msg=name)
    for (name, a), b in zip(ours.state_dict().items(), twin.state_dict().values()):
        same(a, b, msg=name)


# ----------------------------------------------------------------------------- in processes

def _two(rank, world):
    check_sync(rank, [3, 1])                                         # unequal, one sample
    check_sync(rank, [0, 3], act="relu", steps=1)                    # no sample at all
    check_sync(rank, [2, 3], fmt=torch.channels_last, act="relu", residual=True)
    check_sync(rank, [1, 4], spatial=(), act="silu", momentum=None)  # (N, C): 1 value here
    check_sync(rank, [2, 2], spatial=(3, 2, 2), act="gelu", residual=True, steps=1)
    check_sync(rank, [2, 3], spatial=(3,), act="elu", residual=True, steps=1)  # alpha 0.2
    # a group of one process each: plain BatchNorm over this process's batch, no collective
    singles = [dist.new_group([r]) for r in range(world)]
    check_sync(rank, [3, 2], group=singles[rank], ranks=[rank], act="leaky_relu")


def _three(rank, world):
    check_sync(rank, [2, 1, 4], act="relu", residual=True)
    sub = dist.new_group([0, 2])                                     # every process creates it
    if rank != 1:
        check_sync(rank, [3, 1, 2], group=sub, ranks=[0, 2], act="silu")
    dist.barrier()


def test_two_processes():
    spawn(2, _two)


def test_three_processes_and_a_subgroup():
    spawn(3, _three)


# ----------------------------------------------------------------------------- torch.compile

def _two_compiled(rank, world):
    check_sync(rank, [3, 1], compiled=True)                                  # no activation
    check_sync(rank, [0, 3], act="relu", steps=1, compiled=True)             # an empty rank
    check_sync(rank, [2, 3], fmt=torch.channels_last, act="relu", residual=True, compiled=True)
    check_sync(rank, [1, 4], spatial=(), act="silu", momentum=None, compiled=True)
    check_sync(rank, [2, 2], spatial=(3, 2, 2), act="gelu", residual=True, steps=1,
               compiled=True)
    # the other activations, each with a residual (mask or reload), one step and eval
    for act in ("leaky_relu", "relu6", "hardswish", "hardsigmoid", "mish", "elu", "gelu_tanh"):
        check_sync(rank, [2, 1], spatial=(3,), act=act, residual=True, steps=1, compiled=True)
    singles = [dist.new_group([r]) for r in range(world)]                    # a group of one
    check_sync(rank, [3, 2], group=singles[rank], ranks=[rank], act="leaky_relu", compiled=True)


def _three_compiled(rank, world):
    check_sync(rank, [2, 1, 4], act="relu", residual=True, momentum=None, compiled=True)
    sub = dist.new_group([0, 2])
    if rank != 1:
        check_sync(rank, [3, 1, 2], group=sub, ranks=[0, 2], act="silu", compiled=True)
    dist.barrier()


def test_two_processes_compiled():
    """torch.compile(fullgraph=True) of SyncBatchNorm, aot_eager: equal to eager bit for
    bit and to float64 torch over the whole batch, one functional all_gather in the
    forward graph and one all_reduce in the backward when training, none in eval or
    in a group of one."""
    spawn(2, _two_compiled)


def test_three_processes_and_a_subgroup_compiled():
    spawn(3, _three_compiled)


class SyncNet(nn.Module):
    """The issue's model: conv, SyncBatchNorm(relu), conv, SyncBatchNorm(momentum=None)
    with the first conv's output as residual."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn1 = tritonbn.SyncBatchNorm(4, activation="relu")
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn2 = tritonbn.SyncBatchNorm(4, momentum=None, activation="silu")

    def forward(self, x):
        a = self.conv1(x)
        return self.bn2(self.conv2(self.bn1(a)), a)


def _model_compiled(rank, world):
    """SyncNet under torch.compile(fullgraph=True): no graph break, one graph, and two
    training steps then eval equal to eager bit for bit (outputs, input and parameter
    grads, running stats, num_batches_tracked), with 2 gathers forward and 2 reduces
    backward per training step."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = SyncNet().to(DEVICE)
    model = copy.deepcopy(eager)
    sizes = [2, 1, 3][:world]
    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(sum(sizes), 3, 4, 4, generator=g)[_slices(sizes, rank)].to(DEVICE)
          for _ in range(3)]
    explained = torch._dynamo.explain(copy.deepcopy(eager))(xs[0])  # runs a step too
    assert explained.graph_break_count == 0 and explained.graph_count == 1, \
        explained.break_reasons
    targets = [str(n.target) for gm in explained.graphs for n in gm.graph.nodes]
    assert sum("all_gather_into_tensor" in t for t in targets) == 2, targets
    assert sum("tritonbn.batch_norm" in t for t in targets) == 2, targets
    torch._dynamo.reset()
    graphs = _Graphs()
    compiled = torch.compile(model, fullgraph=True, backend=graphs)
    for step, x in enumerate(xs):
        training = step < 2
        eager.train(training)
        compiled.train(training)
        dy = torch.randn(sum(sizes), 4, 4, 4, generator=g)[_slices(sizes, rank)].to(DEVICE)
        x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
        with poisoned_allocations():
            y = compiled(x1)
            y.backward(dy)
        y_eager = eager(x2)
        y_eager.backward(dy)
        _same_model(model, eager, (y, x1.grad), (y_eager, x2.grad))
    assert len(graphs.forward) == len(graphs.backward) == 2  # training, eval
    assert [_Graphs.collectives(gm) for gm in graphs.forward] == [["all_gather_into_tensor"] * 2,
                                                                  []]
    assert [_Graphs.collectives(gm) for gm in graphs.backward] == [["all_reduce"] * 2, []]


class TorchNet(nn.Module):
    """SyncNet in torch.nn modules and functions, with the same state_dict keys."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(4, momentum=None)

    def forward(self, x):
        a = self.conv1(x)
        return nn.functional.silu(self.bn2(self.conv2(torch.relu(self.bn1(a)))) + a)


def _loss(y):
    return (y * torch.linspace(-1, 1, y.numel(), device=y.device).view_as(y)).sum()


def _graph_step(rank, world, compiled=False):
    """A whole training step (forward, backward, SGD) of SyncNet syncing over a group of
    one (distributed._MIN_WORLD = 1: collectives all the same), eager or compiled
    (fullgraph, aot_eager). On a GPU (NCCL) the step is captured once in a CUDA graph
    and replayed on new data; on the CPU (gloo) it just runs. Either way it equals
    torch.nn's TorchNet, run eagerly on the same batches: losses, parameters, running
    stats and num_batches_tracked; and it takes 2 gathers forward and 2 reduces
    backward (counted in the capture, or in the compiled graphs)."""
    from tritonbn import distributed as tbn_dist

    tbn_dist._MIN_WORLD = 1
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = SyncNet().to(DEVICE).to(memory_format=torch.channels_last)
    ref = TorchNet().to(DEVICE).to(memory_format=torch.channels_last)
    ref.load_state_dict(model.state_dict())
    graphs = _Graphs()
    run = torch.compile(model, fullgraph=True, backend=graphs) if compiled else model
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(4)
    new_x = lambda: torch.randn(4, 3, 8, 8, generator=g).to(DEVICE)  # noqa: E731
    static_x = new_x()

    def step(m, o, x):
        o.zero_grad(set_to_none=False)
        loss = _loss(m(x))
        loss.backward()
        o.step()
        return loss.detach()

    cuda = DEVICE == "cuda"
    side = torch.cuda.Stream() if cuda else None
    if cuda:
        side.wait_stream(torch.cuda.current_stream())
    # warm up outside any capture: kernels built, NCCL's communicator made, graphs traced
    with torch.cuda.stream(side) if cuda else contextlib.nullcontext():
        for _ in range(2):
            step(run, opt, static_x)
    if cuda:
        torch.cuda.current_stream().wait_stream(side)
    for _ in range(2):
        step(ref, opt_ref, static_x)
    monkey = pytest.MonkeyPatch()
    counted = _Counted(monkey)
    if cuda:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_loss = step(run, opt, static_x)
        replay = graph.replay
        assert counted.calls == ([] if compiled else ["gather", "gather", "reduce", "reduce"])
    else:
        static_loss = torch.zeros(())
        replay = lambda: static_loss.copy_(step(run, opt, static_x))  # noqa: E731
    for _ in range(3):
        x = new_x()
        static_x.copy_(x)
        replay()
        loss_ref = step(ref, opt_ref, x)
        torch.testing.assert_close(static_loss, loss_ref, atol=1e-4, rtol=1e-4)
    monkey.undo()
    for (name, a), b in zip(model.state_dict().items(), ref.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=name)
    if compiled:
        assert [_Graphs.collectives(gm) for gm in graphs.forward] == [
            ["all_gather_into_tensor"] * 2]
        assert [_Graphs.collectives(gm) for gm in graphs.backward] == [["all_reduce"] * 2]
    elif not cuda:
        assert counted.calls == ["gather", "gather", "reduce", "reduce"] * 3


@pytest.mark.skipif(DEVICE == "cuda", reason="the GPU runs test_cuda_graph_step_nccl_gpu")
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_step_in_a_group_of_one_syncing(compiled):
    """_graph_step's model and checks on the CPU (gloo, no capture): a group of one that
    syncs is BatchNorm over its own batch."""
    spawn(1, functools.partial(_graph_step, compiled=compiled))


@pytest.mark.gpu_smoke
@pytest.mark.skipif(DEVICE != "cuda", reason="CUDA graphs and NCCL need a GPU")
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_cuda_graph_step_nccl_gpu(compiled):
    """A SyncBatchNorm model's whole training step, with its NCCL collectives, captured
    in a CUDA graph and replayed equals eager torch.nn (world of one: the GPU check's
    one GPU)."""
    spawn(1, functools.partial(_graph_step, compiled=compiled), backend="nccl")


def _same_model(model, eager, got, expected):
    same = functools.partial(torch.testing.assert_close, atol=0, rtol=0)
    for a, b in zip(got, expected):
        same(a, b)
    for (name, p), q in zip(model.named_parameters(), eager.parameters()):
        same(p.grad, q.grad, msg=name)
        p.grad = q.grad = None
    for (name, a), b in zip(model.state_dict().items(), eager.state_dict().values()):
        same(a, b, msg=name)


def test_model_compiled_two_processes():
    spawn(2, _model_compiled)


def test_model_compiled_three_processes():
    spawn(3, _model_compiled)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.act = nn.ReLU()
        self.bn2 = tritonbn.BatchNorm2d(4, activation="silu")
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        y = self.bn2(self.act(self.bn1(self.conv(x))))
        return self.head(y.mean((2, 3)))


def _ddp(rank, world, compiled=False):
    """convert_sync_batchnorm + DistributedDataParallel: two SGD steps equal one process's
    steps on the whole batch (DDP averages the grads, so the loss is taken / world).
    compiled: the DDP model under torch.compile(fullgraph=True, backend aot_eager)."""
    torch.manual_seed(0)
    ref = Net().to(DEVICE)
    model = Net().to(DEVICE)
    model.load_state_dict(ref.state_dict())
    model = tritonbn.SyncBatchNorm.convert_sync_batchnorm(model)
    assert type(model.bn1) is tritonbn.SyncBatchNorm and model.bn1.activation is None
    assert type(model.bn2) is tritonbn.SyncBatchNorm and model.bn2.activation == "silu"
    if DEVICE == "cpu":
        # DDP refuses any nn.SyncBatchNorm in a CPU module (torch's own has no CPU
        # kernels); tritonbn's runs on the CPU under the interpreter, so lift that check
        # in this process only
        nn.parallel.DistributedDataParallel._passing_sync_batchnorm_handle = \
            lambda self, module: None
    graphs = _Graphs()
    torch._dynamo.reset()
    if compiled == "inner":
        model = torch.compile(model, fullgraph=True, backend=graphs)
    ddp = nn.parallel.DistributedDataParallel(model)
    if compiled == "outer":
        ddp = torch.compile(ddp, backend=graphs)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.1)
    sizes = [3, 2]
    g = torch.Generator().manual_seed(2)
    for _ in range(2):
        x_all = torch.randn(sum(sizes), 3, 4, 4, generator=g) + 1
        t_all = torch.randn(sum(sizes), 2, generator=g)
        mine = _slices(sizes, rank)
        loss = ((ddp(x_all[mine].to(DEVICE)) - t_all[mine].to(DEVICE)) ** 2).sum() / sum(sizes)
        opt.zero_grad()
        (loss * world).backward()
        opt.step()
        loss_ref = ((ref(x_all.to(DEVICE)) - t_all.to(DEVICE)) ** 2).sum() / sum(sizes)
        opt_ref.zero_grad()
        loss_ref.backward()
        opt_ref.step()
        total = loss.detach().clone()
        dist.all_reduce(total)
        torch.testing.assert_close(total, loss_ref.detach(), atol=1e-5, rtol=1e-5)
    for (name, p), q in zip(model.state_dict().items(), ref.state_dict().values()):
        torch.testing.assert_close(p.double(), q.double(), atol=1e-5, rtol=1e-4, msg=name)
    if compiled:  # one forward graph and one backward, compiled once for both steps
        assert [_Graphs.collectives(gm) for gm in graphs.forward] == [
            ["all_gather_into_tensor"] * 2]
        assert [_Graphs.collectives(gm) for gm in graphs.backward] == [["all_reduce"] * 2]


def test_convert_sync_batchnorm_and_ddp():
    spawn(2, _ddp)


@pytest.mark.parametrize("where", ["inner", "outer"])
def test_convert_sync_batchnorm_and_ddp_compiled(where):
    spawn(2, functools.partial(_ddp, compiled=where))


# ----------------------------------------------------------------------------- one process

class _Twice:
    """The collectives of two processes holding the same batch: the kernels' whole
    sync path in one process, poisoned buffers included."""

    @staticmethod
    def gather(local):
        return torch.cat([local, local], dim=1)

    @staticmethod
    def reduce(sums):
        sums.mul_(2)


@pytest.mark.parametrize("layout", ["NCHW", "NHWC", "NC"])
def test_sync_path_in_one_process(layout):
    shape = (3, 4) if layout == "NC" else (3, 4, 5, 2)
    fmt = torch.channels_last if layout == "NHWC" else torch.contiguous_format
    x = make_input(shape, memory_format=fmt, requires_grad=True)
    w = torch.rand(4, device=DEVICE) + 0.5
    b = torch.randn(4, device=DEVICE)
    rm, rv = torch.zeros(4, device=DEVICE), torch.ones(4, device=DEVICE)
    with poisoned_allocations():
        y = TF._batch_norm(x, rm, rv, w, b, True, 0.1, 1e-5, "relu", comm=_Twice)
        dy = make_input(shape, memory_format=fmt, mean=0.3)
        y.backward(dy)
    x2 = torch.cat([x.detach(), x.detach()]).double().requires_grad_()
    rm2, rv2 = torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64)
    y2 = torch.relu(torch.nn.functional.batch_norm(x2, rm2, rv2, w.double().cpu(),
                                                   b.double().cpu(), True, 0.1, 1e-5))
    y2.backward(torch.cat([dy, dy]).double())
    assert_close(y, y2[:3], torch.float32, 4)
    assert_close(x.grad, x2.grad[:3], torch.float32, 4)
    assert_close(rm, rm2, torch.float32)
    assert_close(rv, rv2, torch.float32, 4)   # unbiased with the count over both: 2·M - 1


def test_without_a_process_group_it_is_batchnorm():
    assert not dist.is_initialized()
    ours = tritonbn.SyncBatchNorm(3, activation="relu", device=DEVICE)
    ref = nn.BatchNorm2d(3, dtype=torch.float64, device=DEVICE)
    x = make_input((2, 3, 4, 4), requires_grad=True)
    assert_close(ours(x), torch.relu(ref(x.double())), torch.float32, 4)
    assert_close(ours.running_var, ref.running_var, torch.float32)
    assert isinstance(ours, nn.SyncBatchNorm) and "activation='relu'" in repr(ours)
    assert list(ours.state_dict()) == list(nn.SyncBatchNorm(3).state_dict())


def test_errors_as_torch():
    with pytest.raises(ValueError, match="expected at least 2D input"):
        tritonbn.SyncBatchNorm(3)(torch.randn(3, device=DEVICE))
    with pytest.raises(ValueError, match="number of input channels should be non-zero"):
        tritonbn.SyncBatchNorm(0)(torch.randn(2, 0, 3, device=DEVICE))


def test_cpu_without_interpreter_cannot_sync(monkeypatch):
    """Outside the interpreter a CPU tensor has no kernels to sync with: torch's error."""
    monkeypatch.setattr(ops, "interpreting", lambda: False)
    with pytest.raises(ValueError, match="SyncBatchNorm expected input tensor to be on GPU"):
        TF._batch_norm(torch.randn(2, 3, 4), None, None, None, None, True, 0.1, 1e-5, None,
                       comm=_Twice)


def test_convert_sync_batchnorm_keeps_state():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4),
                          tritonbn.BatchNorm2d(4, activation="leaky_relu", negative_slope=0.3),
                          nn.SyncBatchNorm(4), tritonbn.BatchNorm2d(4, activation="elu", alpha=0.4)
                          ).eval()
    old = list(model)
    keys = list(model.state_dict())
    pg = object()
    out = tritonbn.SyncBatchNorm.convert_sync_batchnorm(model, process_group=pg)
    assert out is model and list(out.state_dict()) == keys
    for i in (1, 2, 3, 4):
        assert type(out[i]) is tritonbn.SyncBatchNorm and out[i].process_group is pg
        assert out[i].weight is old[i].weight and out[i].running_var is old[i].running_var
        assert not out[i].training
    assert out[2].activation == "leaky_relu" and out[2].negative_slope == 0.3
    assert out[4].activation == "elu" and out[4].alpha == 0.4
    assert out[1].activation is None
    bn = tritonbn.SyncBatchNorm.convert_sync_batchnorm(nn.BatchNorm1d(2))
    assert type(bn) is tritonbn.SyncBatchNorm


def test_convert_then_convert_sync_batchnorm():
    """The docs' recipe (docs/compile-and-distributed.md): fused modules (a torch.fx GraphModule) made SyncBatchNorm,
    still the same function (no process group here: no collective)."""
    from tritonbn.demo import res_net

    ref = res_net(4).to(DEVICE)
    model = tritonbn.SyncBatchNorm.convert_sync_batchnorm(tritonbn.convert(res_net(4).to(DEVICE)))
    model.load_state_dict(ref.state_dict())
    syncs = [m for m in model.modules() if isinstance(m, tritonbn.SyncBatchNorm)]
    assert len(syncs) == 6 and sum(m.activation == "relu" for m in syncs) == 5
    x = make_input((2, 3, 8, 8), memory_format=torch.channels_last)
    assert_close(model(x), ref(x).double(), torch.float32, 4)

