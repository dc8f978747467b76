"""The last-program combine (issue 15): on the split path each reduce launch ends
with its combine, run by the last program of each channel block to finish its
partial (an arrival counter per channel block, left at 0), so a training step is
4 launches, not 6. Against torch in float64, against the combine launches of their
own, and the counters' rules: per device and stream, none allocated mid-capture."""
import pytest
import torch

import tritonbn
from tritonbn import heuristics, ops
from tritonbn.heuristics import CombineConfig, Config
from tritonbn.perf.host import stubbed_launches

from conftest import check_steps, make_input, module_pair

SPLIT = ["stats_partial_kernel", "normalize_kernel", "bwd_reduce_kernel", "bwd_dx_kernel"]
KERNEL = ["stats_partial_kernel", "stats_combine_kernel", "normalize_kernel",
          "bwd_reduce_kernel", "bwd_combine_kernel", "bwd_dx_kernel"]


@pytest.fixture
def counters(monkeypatch):
    """A fresh pool of arrival counters, checked to be all 0 after the test."""
    pool = {}
    monkeypatch.setattr(ops, "_counters", pool)
    yield pool
    assert pool and all(int(c.abs().sum()) == 0 for c in pool.values())


@pytest.mark.parametrize("layout", ["NC", "NCHW", "NHWC"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("act,residual", [("relu", True), ("silu", False), (None, True)])
def test_last_program_combine_equals_torch(counters, layout, dtype, act, residual):
    """Training steps then eval, every buffer poisoned, with the combines in the last
    programs: y, every grad, the running stats and num_batches_tracked as torch's."""
    ours, ref, shape, fmt = module_pair(layout, dtype, act, momentum=None if residual else 0.1)
    with ops.launch_overrides(path="split", combine="last"):
        check_steps(ours, ref, shape, fmt, dtype, steps=2, residual=residual)


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
def test_many_splits_in_several_steps(counters, monkeypatch, fmt):
    """More partials than the last program sums at a step (BLOCK_S = 2 here), from
    more programs than the interpreter's default: every step counts, in order, and
    the result is the combine launch's."""
    monkeypatch.setattr(heuristics, "last_combine_block_s", lambda split, block_c: 2)
    monkeypatch.setattr(ops, "_plans", {})
    x = make_input((4, 6, 5, 4), torch.float64, fmt)
    dy = make_input((4, 6, 5, 4), torch.float64, fmt)
    results = {}
    for combine in ("last", "kernel"):
        bn = tritonbn.BatchNorm2d(6, activation="relu", dtype=torch.float64)
        xx = x.clone().requires_grad_()
        cfg = Config(BLOCK_M=8, BLOCK_C=4, split=7)
        with ops.launch_overrides(path="split", combine=combine, stats=cfg, bwd_reduce=cfg):
            y = bn(xx)
            y.backward(dy)
        results[combine] = (y, xx.grad, bn.weight.grad, bn.bias.grad, bn.running_mean,
                            bn.running_var)
    ref = torch.nn.BatchNorm2d(6, dtype=torch.float64)
    xr = x.clone().requires_grad_()
    yr = torch.relu(ref(xr))
    yr.backward(dy)
    expected = (yr, xr.grad, ref.weight.grad, ref.bias.grad, ref.running_mean, ref.running_var)
    for last, kernel, exp in zip(results["last"], results["kernel"], expected):
        torch.testing.assert_close(last, kernel, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(last, exp, rtol=1e-9, atol=1e-9)


def test_launches_and_the_overrides(counters, monkeypatch):
    """4 launches a training step by default on the split path; 6 with combine="kernel",
    or with a forced combine config (for its own pass only)."""
    bn = tritonbn.BatchNorm2d(3, activation="relu")
    x = make_input((2, 3, 4, 4), requires_grad=True)

    def launched(**overrides):
        names = []
        with stubbed_launches(names), ops.launch_overrides(path="split", **overrides):
            bn(x).backward(torch.ones_like(x))
        return names

    assert launched() == SPLIT
    assert launched(combine="kernel") == KERNEL
    forced = CombineConfig(BLOCK_S=8, BLOCK_C=4)
    assert launched(stats_combine=forced) == KERNEL[:3] + SPLIT[2:]
    assert launched(bwd_combine=forced) == SPLIT[:2] + KERNEL[3:]
    assert launched(combine="last", stats_combine=forced) == SPLIT
    # by default, a sweep of more than LAST_COMBINE_MAX_STEPS steps for the last
    # program takes a combine launch: 32 partials, 1 a step here
    many = Config(BLOCK_M=1, BLOCK_C=4, split=64)  # (2, 3, 4, 4): 32 tiles of one row
    with stubbed_launches(names := []), ops.launch_overrides(stats=many):
        bn(x)
    assert names == ["stats_partial_kernel", "normalize_kernel"]  # 32 partials in 1 step
    monkeypatch.setattr(heuristics, "last_combine_block_s", lambda split, block_c: 1)
    monkeypatch.setattr(ops, "_plans", {})
    with stubbed_launches(names := []), ops.launch_overrides(stats=many):
        bn(x)
    assert names == ["stats_partial_kernel", "stats_combine_kernel", "normalize_kernel"]
    with stubbed_launches(names := []), ops.launch_overrides(stats=many, combine="last"):
        bn(x)
    assert names == ["stats_partial_kernel", "normalize_kernel"]
    with pytest.raises(TypeError, match="combine must be one of"):
        with ops.launch_overrides(combine="first"):
            pass


def test_cuda_graph_capture_takes_the_combine_launches(counters, monkeypatch):
    """Under CUDA graph capture (simulated) no counter is used or allocated: a graph
    would keep their address, and its replay could meet eager launches at them."""
    bn = tritonbn.BatchNorm2d(3, activation="relu")
    x = make_input((2, 3, 4, 4), requires_grad=True)

    def step():
        names = []
        with stubbed_launches(names), ops.launch_overrides(path="split"):
            bn(x).backward(torch.ones_like(x))
        return names

    monkeypatch.setattr(ops, "_capturing", lambda dev: True)
    assert step() == KERNEL and not counters
    monkeypatch.setattr(ops, "_capturing", lambda dev: False)
    assert step() == SPLIT and len(counters) == 1
    monkeypatch.setattr(ops, "_capturing", lambda dev: True)
    assert step() == KERNEL  # counters exist now, and still are not used
    monkeypatch.setattr(ops, "_capturing", lambda dev: False)
    (buf,) = counters.values()
    assert ops._counter(x, 3) is buf
    bigger = ops._counter(x, buf.numel() + 1)  # more channel blocks: a larger one
    assert bigger.numel() > buf.numel() and int(bigger.abs().sum()) == 0


def test_runs_are_bit_identical(counters):
    """The combine goes in split order whoever arrives last: run to run, bit for bit."""
    ours, _, shape, fmt = module_pair("NHWC", torch.float32, "relu")
    x = make_input(shape, torch.float32, fmt)
    dy = make_input(shape, torch.float32, fmt)
    outs = []
    for _ in range(2):
        xx = x.clone().requires_grad_()
        with ops.launch_overrides(path="split"):
            y = ours(xx)
            y.backward(dy)
        outs.append((y, xx.grad, ours.weight.grad.clone()))
        ours.weight.grad = None
    for a, b in zip(*outs):
        assert torch.equal(a, b)
