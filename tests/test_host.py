"""The eager host path (issue 14): eager calls run the host ops inside one
autograd.Function with cached launch plans; torch.compile runs the custom ops.
Both must give the same numbers bit for bit, a plan must never be reused for a
call it was not made for, the errors are torch's, and the host-time benchmark
runs end to end."""
import contextlib
import json
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import tritonbn
from conftest import DEVICE, LAYOUTS, make_input
from tritonbn import functional, ops, tuning
from tritonbn.heuristics import Config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(model, steps, shape, fmt, dtype, residual):
    """Outputs, grads and state of `steps` training steps then one eval step."""
    torch.manual_seed(1)
    out = []
    for step in range(steps + 1):
        model.train(step < steps)
        x = make_input(shape, dtype, fmt, requires_grad=True)
        z = make_input(shape, dtype, fmt, mean=-0.5, requires_grad=True) if residual else None
        y = model(x, z)
        y.backward(make_input(shape, dtype, fmt, mean=0.3, std=1.0))
        out += [y, x.grad] + ([z.grad] if residual else [])
    out += [t.grad for t in model.parameters() if t.grad is not None]
    return out + list(model.buffers())


@pytest.mark.parametrize("act,residual,momentum", [("relu", False, 0.1), ("relu", True, None),
                                                   ("silu", True, 0.1), (None, True, None),
                                                   ("gelu", False, None)])
@pytest.mark.parametrize("layout", ["NC", "NCHW", "NHWC"])
def test_eager_path_equals_the_custom_ops_bit_for_bit(monkeypatch, layout, act, residual,
                                                      momentum):
    """Eager calls (autograd.Function, planned launches) and the torch.library ops
    that torch.compile traces: the same y, grads, running stats and
    num_batches_tracked, to the bit."""
    cls, shape, fmt = LAYOUTS[layout]
    dtype = torch.float16
    eager = getattr(tritonbn, cls)(shape[1], momentum=momentum, activation=act, device=DEVICE)
    with torch.no_grad():
        eager.weight.uniform_(0.5, 1.5)
        eager.bias.uniform_(-0.5, 0.5)
    via_ops = getattr(tritonbn, cls)(shape[1], momentum=momentum, activation=act, device=DEVICE)
    via_ops.load_state_dict(eager.state_dict())
    calls = []
    real = functional._eager
    monkeypatch.setattr(functional, "_eager", lambda x: calls.append(real(x)) or real(x))
    got = _run(eager, 2, shape, fmt, dtype, residual)
    assert calls and all(calls)  # the eager path ran
    monkeypatch.setattr(functional, "_eager", lambda x: False)
    want = _run(via_ops, 2, shape, fmt, dtype, residual)
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert a.dtype == b.dtype and a.stride() == b.stride()
        assert torch.equal(a, b)


def test_no_grad_forward_skips_autograd_and_agrees():
    """Eval and no-grad calls run without an autograd node: same y, no grad_fn."""
    bn = tritonbn.BatchNorm2d(5, activation="relu", device=DEVICE)
    x = make_input((3, 5, 4, 4), requires_grad=True)
    bn.eval()
    y_grad = bn(x)
    with torch.no_grad():
        y_none = bn(x)
    assert y_grad.grad_fn is not None and y_none.grad_fn is None and not y_none.requires_grad
    assert torch.equal(y_grad, y_none)


def test_double_backward_is_refused():
    """The kernels' backward is not itself differentiable: asking for it says so, as
    torch's once_differentiable functions do, instead of a silently wrong grad."""
    bn = tritonbn.BatchNorm2d(3, activation="silu", device=DEVICE)
    x = make_input((2, 3, 4, 4), requires_grad=True)
    dy = make_input((2, 3, 4, 4), requires_grad=True)  # a grad that is itself differentiated
    (gx,) = torch.autograd.grad(bn(x), x, dy, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        gx.sum().backward()


class _Launches:
    """Stands in for one kernel in ops.K: records each launch's grid, scalar
    arguments and options, then launches the real kernel."""

    def __init__(self, kernel):
        self.kernel, self.seen = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **opts):
            scalars = tuple(a for a in args if not isinstance(a, torch.Tensor))
            self.seen.append((tuple(grid), scalars, tuple(sorted(opts.items()))))
            return self.kernel[grid](*args, **opts)
        return launch


def _step(bn, shape, fmt=torch.contiguous_format, dtype=torch.float32, residual=False):
    x = make_input(shape, dtype, fmt, requires_grad=True)
    z = make_input(shape, dtype, fmt, requires_grad=True) if residual else None
    bn(x, z).backward(make_input(shape, dtype, fmt))


def _n_plans():
    """Distinct plans (a single-program forward's is also kept under its call's signature)."""
    return len({id(p) for p in ops._plans.values() if isinstance(p, (ops._FwdPlan, ops._BwdPlan))})


def test_a_changed_signature_never_reuses_a_plan(monkeypatch, tmp_path):
    """Each key part of a launch plan (dtype, strides, flags, a forced or tuned
    config) changes what is launched: a fresh plan each time, never a stale one
    (the split path, whose configs are selected per kernel)."""
    with ops.launch_overrides(path="split"):
        _changed_signature(monkeypatch, tmp_path)


def test_the_path_is_part_of_the_plan(monkeypatch):
    """Forcing the other path makes a new plan with the other kernels, and back."""
    spies = {name: _Launches(getattr(ops.K, name)) for name in ("fused_forward_kernel",
                                                                 "stats_partial_kernel")}
    for name, spy in spies.items():
        monkeypatch.setattr(ops.K, name, spy)
    bn = tritonbn.BatchNorm2d(4, activation="relu", device=DEVICE)
    for path, kernel in ((None, "fused_forward_kernel"), ("split", "stats_partial_kernel"),
                         ("fused", "fused_forward_kernel"), (None, "fused_forward_kernel")):
        for spy in spies.values():
            spy.seen.clear()
        with ops.launch_overrides(path=path):
            _step(bn, (3, 4, 5, 6))
        assert [n for n, spy in spies.items() if spy.seen] == [kernel], path


@pytest.mark.parametrize("path", ["split", "fused"])
def test_a_changed_alpha_or_slope_never_reuses_a_plan(monkeypatch, path):
    """elu's alpha and leaky_relu's negative_slope changed on one module between calls
    (the kernels' one scalar): a plan per value, each computing with its own, against
    torch; a value seen before reuses its plans."""
    import torch.nn.functional as F

    monkeypatch.setattr(ops, "_plans", {})
    x = make_input((3, 4, 5, 2), requires_grad=True)
    dy = make_input((3, 4, 5, 2), mean=0.3)
    for act, attr, fn in (("elu", "alpha", F.elu), ("leaky_relu", "negative_slope",
                                                     F.leaky_relu)):
        bn = tritonbn.BatchNorm2d(4, activation=act, device=DEVICE)
        plans = set()
        for value in (0.5, 1.5, 0.5, 0.25):
            setattr(bn, attr, value)
            x.grad = None
            with ops.launch_overrides(path=path):
                y = bn(x)
                y.backward(dy)
            x64 = x.detach().double().requires_grad_()
            y64 = fn(torch.nn.functional.batch_norm(x64, None, None, training=True), value)
            y64.backward(dy.double())
            torch.testing.assert_close(y.double(), y64, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(x.grad.double(), x64.grad, atol=1e-5, rtol=1e-5)
            plans |= {id(p) for k, p in ops._plans.items()
                      if isinstance(p, (ops._FwdPlan, ops._BwdPlan)) and act in k}
        assert len(plans) == 2 * 3, plans  # forward and backward, per distinct value


def _changed_signature(monkeypatch, tmp_path):
    spies = {name: _Launches(getattr(ops.K, name)) for name in ("stats_partial_kernel",
                                                                 "normalize_kernel",
                                                                 "bwd_dx_kernel")}
    for name, spy in spies.items():
        monkeypatch.setattr(ops.K, name, spy)
    monkeypatch.setattr(ops, "_plans", {})
    bn = tritonbn.BatchNorm2d(4, activation="relu", device=DEVICE)
    shape = (3, 4, 5, 6)

    def launched(**kw):
        for spy in spies.values():
            spy.seen.clear()
        _step(bn, shape, **kw)
        return {name: spy.seen[-1] for name, spy in spies.items()}

    base = launched()
    assert launched() == base and _n_plans() == 2  # the same call: both plans reused
    launched(dtype=torch.float16)  # same scalars here, but a kernel of another dtype
    assert _n_plans() == 4
    variants = {"strides": launched(fmt=torch.channels_last),
                "residual": launched(residual=True)}
    bn.activation = "silu"
    variants["activation"] = launched()
    bn.activation = "relu"
    forced = Config(BLOCK_M=2, BLOCK_C=2, split=3, num_warps=2)
    with ops.launch_overrides(reduce=forced, elementwise=forced):
        variants["forced config"] = launched()
    assert launched() == base  # and back: the original plans, not the forced ones
    with ops.launch_overrides(int64=True):
        variants["64-bit offsets"] = launched()
    assert _n_plans() == 4 + 2 * len(variants)
    for why, got in variants.items():
        assert got["normalize_kernel"] != base["normalize_kernel"], why
    # a tuned config appearing in the cache for this bucket replaces the plan built on
    # the heuristic (simulate_gpu: the interpreter selects as on a GPU)
    monkeypatch.setenv("TRITONBN_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(tuning, "_stores", {})
    with tuning.simulate_gpu(timer=None, gpu="Plan Test GPU"):
        assert launched() == base
        x = make_input(shape)
        v = ops.kernel_view(x)[1]
        tuned = Config(BLOCK_M=4, BLOCK_C=2, split=2, num_warps=2)
        tuning.store("Plan Test GPU").put(
            {tuning.bucket(k, torch.float32, v): (tuned, {}) for k in ("normalize", "dx")})
        got = launched()
    assert got["normalize_kernel"] != base["normalize_kernel"]
    assert dict(got["normalize_kernel"][2])["num_warps"] == 2
    assert got["bwd_dx_kernel"] != base["bwd_dx_kernel"]


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("eps", [-1.0, 0.0, -1])
def test_eps_errors_are_torchs(training, eps):
    """A negative eps (or 0 in training) raises torch's ValueError, with its message."""
    x = make_input((4, 3, 2, 2))
    ours = tritonbn.BatchNorm2d(3, eps=eps, device=DEVICE).train(training)
    ref = torch.nn.BatchNorm2d(3, eps=eps, device=DEVICE).train(training)
    try:
        ref(x)
    except ValueError as e:
        with pytest.raises(ValueError, match=f"^{e}$"):
            ours(x)
        with pytest.raises(ValueError, match=f"^{e}$"):
            functional.batch_norm(x, ours.running_mean, ours.running_var, training=training,
                                  eps=eps)
    else:  # eval with eps=0 is allowed by torch: ours runs too, and agrees
        torch.testing.assert_close(ours(x), ref(x), atol=1e-5, rtol=1e-5)


def test_stubbed_launches_run_nothing_and_count():
    from tritonbn.perf.host import stubbed_launches

    bn = tritonbn.BatchNorm2d(3, activation="relu")
    x = make_input((2, 3, 4, 4), requires_grad=True)
    launches = []
    with stubbed_launches(launches):
        y = bn(x)
        y.backward(torch.ones_like(y))
    assert launches == ["fused_forward_kernel", "fused_backward_kernel"]  # a small shape
    launches.clear()
    with stubbed_launches(launches), ops.launch_overrides(path="split"):
        bn(x).backward(torch.ones_like(y))  # the combines in the reduce launches
    assert launches == ["stats_partial_kernel", "normalize_kernel", "bwd_reduce_kernel",
                        "bwd_dx_kernel"]
    launches.clear()
    with stubbed_launches(launches), ops.launch_overrides(path="split", combine="kernel"):
        bn(x).backward(torch.ones_like(y))
    assert launches == ["stats_partial_kernel", "stats_combine_kernel", "normalize_kernel",
                        "bwd_reduce_kernel", "bwd_combine_kernel", "bwd_dx_kernel"]
    assert torch.equal(bn.running_mean, torch.zeros(3))  # no kernel wrote the running stats
    bn(x).backward(torch.ones_like(y))  # outside the block the kernels run again
    assert not torch.equal(bn.running_mean, torch.zeros(3))


@pytest.mark.skipif(DEVICE == "cuda", reason="a CPU benchmark (launches stubbed in the interpreter)")
def test_host_benchmark_and_its_report(tmp_path):
    """`tritonbn bench --host` from a shell (no TRITON_INTERPRET: it sets it), then
    `tritonbn report` on its file."""
    out = tmp_path / "host.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    p = subprocess.run([sys.executable, "-m", "tritonbn", "bench", "--host", "--out", str(out)],
                       env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert p.returncode == 0, p.stdout + p.stderr
    doc = json.loads(out.read_text())
    from tritonbn.perf import host

    host.validate(doc)
    cases = [(r["op"], r["mode"]) for r in doc["records"]]
    assert cases == list(host.CASES)
    assert [r["launches"] for r in doc["records"]] == [2, 2, 2, 1]  # the single-program path
    assert all(r["ratio"] == r["tritonbn_us"] / r["torch_us"] for r in doc["records"])
    assert doc["python_node_floor_us"] > 0
    rep = tmp_path / "rep"
    p = subprocess.run([sys.executable, "-m", "tritonbn", "report", str(out), "--out", str(rep)],
                       env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert p.returncode == 0, p.stdout + p.stderr
    text = (rep / "report.md").read_text()
    assert "host time per call" in text and "bn_add_relu train fwd+bwd" in text
    with pytest.raises(ValueError, match="kind"):
        host.validate({"kind": "bench"})


def test_autotuning_leaves_the_single_program_path_alone(monkeypatch, tmp_path):
    """TRITONBN_AUTOTUNE=1 tunes the split kernels; a shape on the single-program path
    has nothing to tune and keeps its two launches (simulate_gpu: as on a GPU)."""
    from tritonbn.perf.host import stubbed_launches
    from tritonbn.tuning import tuner

    monkeypatch.setenv("TRITONBN_AUTOTUNE", "1")
    monkeypatch.setenv("TRITONBN_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(tuning, "_stores", {})
    tuned = []
    monkeypatch.setattr(tuner, "tune", lambda *a, **k: tuned.append(a) or [])
    bn = tritonbn.BatchNorm2d(3, activation="relu")
    x = make_input((2, 3, 4, 4), requires_grad=True)
    launches = []
    with tuning.simulate_gpu(timer=lambda fn: 1.0, gpu="Autotune Test GPU"):
        with stubbed_launches(launches):
            bn(x).backward(torch.ones(2, 3, 4, 4))
        assert tuned == [] and launches == ["fused_forward_kernel", "fused_backward_kernel"]
        with stubbed_launches(launches), ops.launch_overrides(path="split"):
            bn(x).backward(torch.ones(2, 3, 4, 4))
    assert tuned  # the split path's kernels were offered for tuning


class _FakeCompiled:
    """Stands in for a CompiledKernel (the interpreter makes none): records launches."""
    function, packed_metadata = "function-handle", "packed-metadata"

    def __init__(self, calls):
        self.calls = calls

    def run(self, *args):
        self.calls.append(("run", args))


class _FakeJit:
    """Stands in for a JITFunction: fn[grid](*args, **options) records and returns a
    compiled kernel."""

    def __init__(self, calls):
        self.calls, self.pre_run_hooks = calls, []

    def __getitem__(self, grid):
        def launch(*args, **options):
            self.calls.append(("jit", grid, args, options))
            return _FakeCompiled(self.calls)
        return launch


def test_a_planned_launch_calls_the_compiled_kernel_while_its_specialization_holds(monkeypatch):
    """ops._go: the first launch goes through the JIT; later ones through the kept
    kernel's launcher with what the JIT passes (grid, stream, handle, metadata, then
    every argument in order), until a pointer's dtype or alignment, the device or a
    hook changes, which go through the JIT again."""
    if ops.interpreting():  # the kernels really run under the interpreter: no fast path
        assert not ops._FAST_LAUNCH
    monkeypatch.setattr(ops, "_FAST_LAUNCH", True)
    device = [0]
    monkeypatch.setattr(ops, "_device_stream", lambda: (device[0], 1234))
    calls = []
    fn, compiled = _FakeJit(calls), {}
    x, y = torch.randn(8, 4), torch.randn(8, 4)
    launch = ((3, 2), (5, 7, True), dict(num_warps=4, num_stages=3))

    def last():
        kind, *rest = calls[-1]
        return kind, rest

    ops._go(fn, launch, compiled, "k", x, y)
    kind, (grid, args, options) = last()
    assert kind == "jit" and grid == (3, 2) and options == launch[2]
    assert args[0] is x and args[1] is y and args[2:] == (5, 7, True)
    for _ in range(2):
        ops._go(fn, launch, compiled, "k", x, y)
        kind, (args,) = last()
        assert kind == "run" and args[:4] == (3, 2, 1, 1234)
        assert args[4:9] == ("function-handle", "packed-metadata", None, None, None)
        assert args[9] is x and args[10] is y and args[11:] == (5, 7, True)
    n = len(calls)
    ops._go(fn, launch, compiled, "k", x.double(), y)  # another dtype: another variant
    assert last()[0] == "jit"
    ops._go(fn, launch, compiled, "k", x, y)  # the kept one is now the double's
    assert last()[0] == "jit"
    unaligned = torch.randn(33)[1:].view(8, 4)
    assert unaligned.data_ptr() % 16
    ops._go(fn, launch, compiled, "k", unaligned, y)
    assert last()[0] == "jit"
    ops._go(fn, launch, compiled, "k", x, y)
    ops._go(fn, launch, compiled, "k", x, y)
    assert last()[0] == "run"
    device[0] = 1  # another current device
    ops._go(fn, launch, compiled, "k", x, y)
    assert last()[0] == "jit"
    fn.pre_run_hooks.append(lambda *a, **k: None)  # a hook: always the JIT
    ops._go(fn, launch, compiled, "k", x, y)
    ops._go(fn, launch, compiled, "k", x, y)
    assert [c[0] for c in calls[-2:]] == ["jit", "jit"]
    assert len(calls) == n + 8
    monkeypatch.setattr(ops, "_FAST_LAUNCH", False)
    fn.pre_run_hooks.clear()
    ops._go(fn, launch, compiled, "k", x, y)
    assert last()[0] == "jit"


def test_fast_launch_is_off_by_environment():
    """TRITONBN_FAST_LAUNCH=0, read at import, keeps every launch on the JIT; it is
    on by default outside the interpreter, off under it."""
    code = "import tritonbn.ops as o; print(o._FAST_LAUNCH)"

    def fast(**env):
        base = {k: v for k, v in os.environ.items()
                if k not in ("TRITON_INTERPRET", "TRITONBN_FAST_LAUNCH")}
        return subprocess.run([sys.executable, "-c", code], env=base | env, capture_output=True,
                              text=True, check=True).stdout.strip()

    assert fast() == "True"
    assert fast(TRITONBN_FAST_LAUNCH="0") == "False"
    assert fast(TRITON_INTERPRET="1") == "False"


@pytest.mark.skipif(DEVICE == "cuda", reason="stubs the interpreter's launcher")
@pytest.mark.parametrize("path,combine", [("fused", None), ("split", "last"), ("split", "kernel")])
def test_the_statistics_kernel_counts_the_batch(path, combine):
    """num_batches_tracked += 1 is done by the statistics launch, not by a host add of
    its own: with every launch stubbed the count stays, with them it equals torch's
    after each step, running stats too."""
    from tritonbn.perf.host import stubbed_launches

    ours, theirs = tritonbn.BatchNorm2d(3), torch.nn.BatchNorm2d(3)
    x = make_input((4, 3, 5, 5))
    with ops.launch_overrides(path=path, combine=combine):
        with stubbed_launches():
            ours(x)
        assert ours.num_batches_tracked.item() == 0
        for step in range(1, 4):
            torch.testing.assert_close(ours(x), theirs(x))
            assert ours.num_batches_tracked.item() == theirs.num_batches_tracked.item() == step
    torch.testing.assert_close(ours.running_mean, theirs.running_mean)
    torch.testing.assert_close(ours.running_var, theirs.running_var)


@pytest.mark.skipif(DEVICE == "cuda", reason="stubs the interpreter's launcher")
def test_the_host_counts_where_the_kernels_cannot():
    """momentum=None (its kernels read the count), an empty batch and a refused input
    count on the host, as torch's module does (the last before F.batch_norm's check);
    eval and track_running_stats=False count nothing."""
    from tritonbn.perf.host import stubbed_launches

    def both(**kw):
        return tritonbn.BatchNorm2d(3, **kw), torch.nn.BatchNorm2d(3, **kw)

    ours, theirs = both(momentum=None)
    with stubbed_launches():
        ours(make_input((2, 3, 4, 4)))
    assert ours.num_batches_tracked.item() == 1  # added before the (stubbed) kernel
    for bad in (torch.randn(1, 3, 1, 1), torch.randn(0, 3, 4, 4)):
        ours, theirs = both()
        for m in (ours, theirs):
            try:
                m(bad)
            except ValueError as e:
                assert "more than 1 value" in str(e)
        assert ours.num_batches_tracked.item() == theirs.num_batches_tracked.item() == 1
    ours, theirs = both()
    ours.eval(), theirs.eval()
    x = make_input((2, 3, 4, 4))
    torch.testing.assert_close(ours(x), theirs(x))
    assert ours.num_batches_tracked.item() == theirs.num_batches_tracked.item() == 0
    ours, theirs = both(track_running_stats=False)
    torch.testing.assert_close(ours(x), theirs(x))
    assert ours.num_batches_tracked is theirs.num_batches_tracked is None


def test_the_backward_kept_on_the_forward_plan_follows_launch_overrides(monkeypatch):
    """A single-program forward keeps its backward's plan (issue 14: host time): found
    once, then reused step after step; a launch_overrides block started or ended
    between a forward and its backward makes the backward choose again."""
    spies = {name: _Launches(getattr(ops.K, name)) for name in ("fused_backward_kernel",
                                                                 "bwd_reduce_kernel")}
    for name, spy in spies.items():
        monkeypatch.setattr(ops.K, name, spy)
    found = []
    plan = ops._backward_plan
    monkeypatch.setattr(ops, "_backward_plan", lambda *a: found.append(1) or plan(*a))
    bn = tritonbn.BatchNorm2d(4, activation="relu", device=DEVICE)
    ref = torch.nn.Sequential(torch.nn.BatchNorm2d(4), torch.nn.ReLU()).to(DEVICE)

    def step(block=False, backward_path=None):
        for spy in spies.values():
            spy.seen.clear()
        found.clear()
        x = make_input((3, 4, 5, 6), requires_grad=True)
        xr = x.detach().clone().requires_grad_()
        y, yr = bn(x), ref(xr)
        dy = make_input((3, 4, 5, 6), mean=0.3)
        with ops.launch_overrides(path=backward_path) if block else contextlib.nullcontext():
            y.backward(dy)
        yr.backward(dy)
        torch.testing.assert_close(x.grad, xr.grad)
        return [n for n, spy in spies.items() if spy.seen], len(found)

    assert step() == (["fused_backward_kernel"], 1)
    assert step() == (["fused_backward_kernel"], 0)  # kept: nothing chosen again
    assert step(True) == (["fused_backward_kernel"], 1)  # a block: chosen again, the same
    assert step(True, "split") == (["bwd_reduce_kernel"], 1)
    assert step() == (["fused_backward_kernel"], 1)  # the blocks' epochs have passed
    assert step() == (["fused_backward_kernel"], 0)
    torch.testing.assert_close(bn.weight.grad, ref[0].weight.grad)
    torch.testing.assert_close(bn.bias.grad, ref[0].bias.grad)


def test_a_refused_launch_overrides_changes_nothing():
    """An unknown kernel name is refused before any override is set, so none leaks out
    of the block that never started."""
    before = dict(ops._overrides)
    with pytest.raises(TypeError, match="unknown kernel"):
        with ops.launch_overrides(stats=Config(8, 8, 2), nonesuch=Config(8, 8, 2)):
            pass
    assert ops._overrides == before


def test_a_call_signature_never_reuses_a_stale_plan():
    """A single-program forward finds its plan by the call's signature in one lookup
    (ops.forward: shape, strides, dtype, device, flags, scalars, which tensors are
    given, the launch_overrides epoch). Each part changed in turn, between calls of
    the base signature: a plan of its own (the base's again on the way back), and
    every y, running stat and num_batches_tracked torch's, in float64."""
    from tritonbn import reference
    C, base = 4, dict(shape=(3, 4, 5, 2), fmt=torch.contiguous_format, dtype=torch.float32,
                      batch=True, count=True, momentum=0.1, eps=1e-5, act="relu", slope=0.01,
                      affine=True, running=True, residual=False, strided=False)

    def call(**changed):
        k = base | changed
        shape = (*k["shape"][:-1], 2 * k["shape"][-1]) if k["strided"] else k["shape"]
        x = make_input(shape, k["dtype"], k["fmt"])
        if k["strided"]:  # every other column: no tiling fits, the kernels read a copy
            x = x[..., ::2]
        z = make_input(k["shape"], k["dtype"], k["fmt"], mean=-0.5) if k["residual"] else None
        w, b, rm, rv = (torch.rand(C, device=DEVICE) * 0.5 + m for m in (0.8, -0.2, 0.1, 0.9))
        w, b = (w, b) if k["affine"] else (None, None)
        rm, rv = (rm, rv) if k["running"] else (None, None)
        nbt = torch.tensor(7, device=DEVICE) if k["running"] else None
        want = [t.double().clone() if t is not None else None for t in (rm, rv)]
        y, *_, plan = ops.forward(x, w, b, rm, rv, nbt, k["batch"], k["momentum"], k["eps"],
                                  k["act"], residual=z, slope=k["slope"],
                                  count=k["count"] and k["running"] and k["batch"])
        f64 = [t.double() if t is not None else None for t in (x, w, b)]
        y64 = torch.nn.functional.batch_norm(f64[0], *want, *f64[1:], k["batch"],
                                             k["momentum"], k["eps"])
        y64 = reference.activate(y64 + (z.double() if z is not None else 0), k["act"], k["slope"])
        tol = 1e-5 if k["dtype"] == torch.float32 else 1e-2
        torch.testing.assert_close(y.double(), y64, atol=tol, rtol=tol)
        if k["running"]:
            torch.testing.assert_close(rm.double(), want[0], atol=1e-6, rtol=1e-6)
            torch.testing.assert_close(rv.double(), want[1], atol=1e-6, rtol=1e-6)
            assert nbt.item() == 7 + (k["count"] and k["batch"])
        return plan

    first = call()
    assert first is not None and first.fused is not None and call() is first
    changes = dict(shape=(3, 4, 5, 3), fmt=torch.channels_last, dtype=torch.float16,
                   count=False, momentum=0.3, eps=1e-3, act="silu", slope=0.5, affine=False,
                   running=False, residual=True)
    for part, value in changes.items():
        plan = call(**{part: value})
        changed = call(**{part: value})
        assert plan is not first and changed is plan, part
        assert call() is first, part
    eval_plan = call(batch=False)  # eval: the split path's normalize, not looked up so
    assert eval_plan is not first and eval_plan.fused is None and call() is first
    assert call(strided=True) is first  # read through a contiguous copy: the base's plan
    assert call(strided=True) is first and call() is first
    assert not any(k[0] == "signature" and k[2] == (80, 20, 4, 2) for k in ops._plans)
    with ops.launch_overrides(path="fused"):  # another epoch: looked up anew
        n = sum(k[0] == "signature" for k in ops._plans)
        assert call() is first
        assert sum(k[0] == "signature" for k in ops._plans) == n + 1


_ACTIONS = st.one_of(
    st.tuples(st.just("step"), st.sampled_from([((3, 4, 5, 2), torch.contiguous_format),
                                                ((3, 4, 5, 2), torch.channels_last),
                                                ((2, 4, 3, 3), torch.contiguous_format)])),
    st.tuples(st.just("train"), st.booleans()),
    st.tuples(st.just("momentum"), st.sampled_from([0.1, 0.5, None])),
    st.tuples(st.just("eps"), st.sampled_from([1e-5, 1e-2])),
    st.tuples(st.just("reset"), st.just(None)))


@settings(max_examples=25, deadline=None)
@given(actions=st.lists(_ACTIONS, min_size=4, max_size=12), act=st.sampled_from([None, "relu"]))
def test_module_state_changed_between_calls_matches_torch(actions, act):
    """One module whose state changes between calls as a training script may change
    it (train and eval, momentum with None among its values, eps,
    reset_running_stats, the input's shape and memory format): after the same
    actions every output, grad, running stat and num_batches_tracked equals torch's
    module in float64, so no cached plan or signature outlives what it was made for."""
    ours = tritonbn.BatchNorm2d(4, activation=act, device=DEVICE)
    ref = torch.nn.BatchNorm2d(4, dtype=torch.float64, device=DEVICE)
    with torch.no_grad():
        ours.weight.uniform_(0.5, 1.5)
        ours.bias.uniform_(-0.5, 0.5)
    ref.load_state_dict(ours.state_dict())
    for what, value in actions + [("step", ((3, 4, 5, 2), torch.contiguous_format))]:
        if what != "step":
            for m in (ours, ref):
                if what == "train":
                    m.train(value)
                elif what == "reset":
                    m.reset_running_stats()
                else:
                    setattr(m, what, value)
            continue
        shape, fmt = value
        x = make_input(shape, memory_format=fmt, requires_grad=True)
        x64 = x.detach().double().requires_grad_()
        dy = make_input(shape, memory_format=fmt, mean=0.3)
        y, y64 = ours(x), ref(x64)
        y64 = torch.relu(y64) if act == "relu" else y64
        y.backward(dy)
        y64.backward(dy.double())
        assert y.stride() == x.stride()
        for a, b in [(y, y64), (x.grad, x64.grad), (ours.weight.grad, ref.weight.grad),
                     (ours.bias.grad, ref.bias.grad), (ours.running_mean, ref.running_mean),
                     (ours.running_var, ref.running_var)]:
            torch.testing.assert_close(a.double(), b, atol=2e-4, rtol=2e-4)
        assert ours.num_batches_tracked.item() == ref.num_batches_tracked.item()
