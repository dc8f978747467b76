"""torch.compile over tritonbn: the custom ops (tritonbn/library.py) pass
torch.library.opcheck, and fullgraph compiles (aot_eager here; Inductor and CUDA
graphs on a GPU) give exactly eager's outputs, grads and running stats, with no
graph break."""
import copy

import pytest
import torch
from torch import nn

import tritonbn
from conftest import DEVICE, make_input
from tritonbn import library  # noqa: F401  (registers torch.ops.tritonbn.*)

ACTS = [None, "relu", "leaky_relu", "silu", "gelu"]


def _args(shape, fmt, *, training=True, residual=False, act="relu", momentum=0.1,
          affine=True, dtype=torch.float32):
    """(batch_stats's args, batch_norm's args) of one case; stats from the op itself."""
    C = shape[1]
    x = make_input(shape, dtype, fmt, requires_grad=True)
    w = (torch.rand(C, device=DEVICE) + 0.5).requires_grad_() if affine else None
    b = torch.randn(C, device=DEVICE).requires_grad_() if affine else None
    z = make_input(shape, dtype, fmt, mean=-1.0, requires_grad=True) if residual else None
    rm, rv = torch.randn(C, device=DEVICE), torch.rand(C, device=DEVICE) + 0.5
    nbt = torch.tensor(3, device=DEVICE)
    stats_args = (x.detach(), rm, rv, nbt, momentum, 1e-5)
    if training:
        mean, s = torch.ops.tritonbn.batch_stats(*stats_args)
    else:
        mean, s = rm, rv
    return stats_args, (x, mean, s, w, b, z, training, 1e-5, act, 0.2)


CASES = {
    "train-relu-nchw": dict(shape=(3, 4, 5, 2), fmt=torch.contiguous_format),
    "train-res-relu-nhwc": dict(shape=(3, 4, 5, 2), fmt=torch.channels_last, residual=True),
    "train-res-silu": dict(shape=(3, 4, 6), fmt=torch.contiguous_format, residual=True,
                           act="silu"),
    "train-none-momentum-none": dict(shape=(6, 4), fmt=torch.contiguous_format, act=None,
                                     momentum=None, residual=True),
    "eval-gelu-no-affine": dict(shape=(3, 4, 5, 2), fmt=torch.channels_last, act="gelu",
                                training=False, affine=False),
    "eval-res-leaky": dict(shape=(2, 4, 3, 2, 2), fmt=torch.channels_last_3d,
                           act="leaky_relu", training=False, residual=True),
    # issue 16: relu6's mask, and elu's alpha (0.2) riding in the ops' negative_slope
    "train-res-relu6": dict(shape=(3, 4, 5, 2), fmt=torch.channels_last, residual=True,
                            act="relu6"),
    "eval-res-elu": dict(shape=(3, 4, 6), fmt=torch.contiguous_format, act="elu",
                         training=False, residual=True),
}


@pytest.mark.parametrize("case", [c for c in CASES if c.startswith("train")])
def test_opcheck_batch_stats(case):
    torch.library.opcheck(torch.ops.tritonbn.batch_stats.default, _args(**CASES[case])[0])


@pytest.mark.parametrize("case", list(CASES))
def test_opcheck_batch_norm(case):
    torch.library.opcheck(torch.ops.tritonbn.batch_norm.default, _args(**CASES[case])[1])


@pytest.mark.parametrize("case", list(CASES))
def test_opcheck_backward(case):
    x, mean, s, w, b, z, training, eps, act, slope = _args(**CASES[case])[1]
    with torch.no_grad():
        _, mask = torch.ops.tritonbn.batch_norm(x, mean, s, w, b, z, training, eps, act, slope)
    dy = make_input(tuple(x.shape), mean=0.3).detach()
    needs = [True, w is not None, b is not None, z is not None]  # no activation: dz = dy, cloned
    reload = act not in (None, "relu", "leaky_relu", "relu6") and z is not None
    detach = lambda t: t.detach() if t is not None else None  # noqa: E731 (no double backward)
    bargs = (dy, x.detach(), detach(w), detach(b), z.detach() if reload else None, mean, s, mask,
             training, eps, act, slope, needs)
    torch.library.opcheck(torch.ops.tritonbn.batch_norm_backward.default, bargs)


@pytest.mark.parametrize("case", ["train-relu-nchw", "train-res-relu-nhwc", "train-res-silu",
                                  "train-none-momentum-none", "empty"])
def test_opcheck_sync_ops(case):
    """SyncBatchNorm's ops under torch.compile (library.sync_batch_stats, and batch_norm's
    backward with a group): local stats, the combine of [3, world, C] gathered ones
    (this process's and another's), the grad sums and dx from summed ones (here
    this process's twice), with the count over both."""
    if case == "empty":  # a process with no sample: zeros to share, empty grads
        x = make_input((2, 4, 3, 2))[:0]
        w, b = torch.rand(4, device=DEVICE) + 0.5, torch.randn(4, device=DEVICE)
        rm, rv, nbt = torch.zeros(4, device=DEVICE), torch.ones(4, device=DEVICE), None
        z, act, slope, momentum, eps = None, "relu", 0.01, 0.1, 1e-5
    else:
        stats_args, (x, _, _, w, b, z, _, eps, act, slope) = _args(**CASES[case])
        _, rm, rv, nbt, momentum, eps = stats_args
    x, w, b = x.detach(), w.detach(), b.detach()
    local = torch.ops.tritonbn.local_stats(x)
    assert local.shape == (3, 1, 4) and (case != "empty" or not local.any())
    torch.library.opcheck(torch.ops.tritonbn.local_stats.default, (x,))
    other = x if x.numel() else make_input((2, 4, 3, 2))  # the other process's batch
    partials = torch.cat([local, torch.ops.tritonbn.local_stats(other)], dim=1)
    combine_args = (x, partials, rm, rv, nbt, momentum, eps)
    torch.library.opcheck(torch.ops.tritonbn.combine_stats.default, combine_args)
    mean, s, count = torch.ops.tritonbn.combine_stats(*combine_args)
    assert torch.equal(count, torch.full_like(count, (x.numel() + other.numel()) // 4))
    _, mask = torch.ops.tritonbn.batch_norm(x, mean, s, w, b, z if z is None else z.detach(),
                                            True, eps, act, slope)
    dy = make_input(tuple(x.shape), mean=0.3)
    reload = act not in (None, "relu", "leaky_relu", "relu6") and z is not None
    grad_args = (dy, x, w, b, z.detach() if reload else None, mean, s, mask)
    tail = (eps, act, slope)
    torch.library.opcheck(torch.ops.tritonbn.batch_norm_grad_sums.default,
                          (*grad_args, *tail, [True, True]))
    sums = torch.ops.tritonbn.batch_norm_grad_sums(*grad_args, *tail, [True, False])[0] * 2
    torch.library.opcheck(torch.ops.tritonbn.batch_norm_grad_input.default,
                          (*grad_args, sums, count, *tail, [True, z is not None]))


class Block(nn.Module):
    """Two BatchNorms: one fused with an activation, one with the residual add."""

    def __init__(self, act, momentum, fmt):
        super().__init__()
        self.fmt = fmt
        self.conv = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn1 = tritonbn.BatchNorm2d(4, activation=act, momentum=momentum, negative_slope=0.2)
        self.bn2 = tritonbn.BatchNorm2d(4, activation="relu", momentum=momentum)

    def forward(self, x):
        x = x.to(memory_format=self.fmt)
        return self.bn2(self.conv(self.bn1(x)), x)


def _loss(y):
    return (y * torch.linspace(-1, 1, y.numel(), device=y.device).view_as(y)).sum()


def _steps(model, xs, train_steps):
    outs = []
    for i, x in enumerate(xs):
        model.train(i < train_steps)
        x = x.clone().requires_grad_()
        y = model(x)
        _loss(y).backward()
        outs.append((y.detach(), x.grad))
    return outs


@pytest.mark.parametrize("act,momentum,fmt", [
    ("relu", 0.1, torch.channels_last),
    ("silu", None, torch.channels_last),
    ("gelu", 0.1, torch.contiguous_format),
    ("leaky_relu", None, torch.contiguous_format),
    (None, 0.1, torch.channels_last),
    ("hardswish", 0.1, torch.channels_last),
])
def test_fullgraph_aot_eager_equals_eager(act, momentum, fmt):
    torch._dynamo.reset()
    eager = Block(act, momentum, fmt).to(DEVICE)
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, fullgraph=True, backend="aot_eager")
    xs = [make_input((2, 4, 5, 3)) for _ in range(4)]
    ref = _steps(eager, xs, train_steps=3)
    got = _steps(compiled, xs, train_steps=3)
    for (y, dx), (y_ref, dx_ref) in zip(got, ref):
        torch.testing.assert_close(y, y_ref, atol=0, rtol=0)
        torch.testing.assert_close(dx, dx_ref, atol=0, rtol=0)
    for (name, a), b in zip(compiled_model.state_dict().items(), eager.state_dict().values()):
        torch.testing.assert_close(a, b, atol=0, rtol=0, msg=name)
    for (name, p), q in zip(compiled_model.named_parameters(), eager.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=0, rtol=0, msg=name)


def test_no_graph_breaks():
    torch._dynamo.reset()
    model = Block("silu", None, torch.channels_last).to(DEVICE)
    x = make_input((2, 4, 5, 3))
    explained = torch._dynamo.explain(model)(x)
    assert explained.graph_break_count == 0 and explained.graph_count == 1
    ops = [str(n.target) for g in explained.graphs for n in g.graph.nodes]
    assert sum("tritonbn.batch_norm" in t for t in ops) == 2, ops


# ----------------------------------------------------------------------------- GPU only


@pytest.mark.skipif(DEVICE != "cuda", reason="Inductor over Triton kernels needs a GPU")
@pytest.mark.parametrize("act,momentum", [pytest.param("relu", 0.1, marks=pytest.mark.gpu_smoke),
                                          ("gelu", None)])
def test_inductor_fullgraph_gpu(act, momentum):
    torch._dynamo.reset()
    eager = Block(act, momentum, torch.channels_last).to(DEVICE)
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, fullgraph=True)
    xs = [make_input((8, 4, 16, 16)) for _ in range(4)]
    for (y, dx), (y_ref, dx_ref) in zip(_steps(compiled, xs, 3), _steps(eager, xs, 3)):
        torch.testing.assert_close(y, y_ref, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(dx, dx_ref, atol=1e-4, rtol=1e-4)
    for (name, a), b in zip(compiled_model.state_dict().items(), eager.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=name)


@pytest.mark.gpu_smoke
@pytest.mark.skipif(DEVICE != "cuda", reason="CUDA graphs need a GPU")
def test_cuda_graph_training_step_gpu():
    """A whole training step (forward, backward, SGD) captured once and replayed on new
    data gives eager's losses, parameters and running stats."""
    torch.manual_seed(0)
    model = Block("relu", None, torch.channels_last).to(DEVICE)
    ref = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.05)
    static_x = make_input((8, 4, 16, 16))

    def step(m, o, x):
        o.zero_grad(set_to_none=False)
        loss = _loss(m(x))
        loss.backward()
        o.step()
        return loss

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up (and compile the kernels) outside the capture
        for _ in range(3):
            step(model, opt, static_x)
    torch.cuda.current_stream().wait_stream(side)
    for _ in range(3):
        step(ref, opt_ref, static_x)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = step(model, opt, static_x)
    for _ in range(3):
        x = make_input((8, 4, 16, 16))
        static_x.copy_(x)
        graph.replay()
        loss_ref = step(ref, opt_ref, x)
        torch.testing.assert_close(static_loss, loss_ref, atol=1e-4, rtol=1e-4)
    for (name, a), b in zip(model.state_dict().items(), ref.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=name)


@pytest.mark.skipif(DEVICE == "cuda", reason="the GPU runs it as gpu_check's compiled stage")
def test_compiled_step_script_smoke(tmp_path):
    """perf/compiled_step.py end to end on tiny shapes (interpreter, aot_eager): both
    models compile with fullgraph=True and their first losses agree."""
    import json
    import os
    import pathlib
    import subprocess
    import sys

    root = pathlib.Path(__file__).resolve().parent.parent
    out = tmp_path / "step.json"
    proc = subprocess.run(
        [sys.executable, str(root / "perf" / "compiled_step.py"), "--device", "cpu",
         "--backend", "aot_eager", "--batch", "4", "--size", "8", "--width", "4",
         "--dtype", "float32", "--out", str(out)],
        env=dict(os.environ, TRITON_INTERPRET="1"), capture_output=True, text=True,
        timeout=300, cwd=root)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    doc = json.loads(out.read_text())
    assert doc["losses_match"] and [r["impl"] for r in doc["records"]] == ["torch", "tritonbn"]
    assert doc["records"][0]["first_loss"] > 0
