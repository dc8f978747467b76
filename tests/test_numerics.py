"""Numerics: large means, NaN/Inf, gradcheck in float64, tiling and 64-bit offsets."""
import pytest
import torch
import torch.nn.functional as F

import tritonbn
import tritonbn.functional as TF
from conftest import DEVICE, LAYOUTS, TOL, assert_close, kernel_rounded, make_input
from tritonbn import ops, reference
from tritonbn.heuristics import Config


def _ref(x, rm, rv, w, b, training, momentum=0.1, act=None):
    y = F.batch_norm(x.double(), rm, rv, w.double() if w is not None else None,
                     b.double() if b is not None else None, training, momentum)
    return torch.relu(y) if act == "relu" else y


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_large_mean_fp32(layout):
    """x = 1e4 + randn: E[x^2] - E[x]^2 in fp32 would get the variance wrong by tens."""
    fmt = LAYOUTS[layout][2]
    shape = (8, 3, 16, 16)
    x = (torch.randn(shape, dtype=torch.float64) + 1e4).float().to(DEVICE).to(memory_format=fmt)
    rm, rv = torch.zeros(3, device=DEVICE), torch.ones(3, device=DEVICE)
    y = TF.batch_norm(x, rm, rv, training=True, momentum=1.0)
    rm64, rv64 = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    y_ref = _ref(x.cpu(), rm64, rv64, None, None, True, momentum=1.0)
    torch.testing.assert_close(rv.double().cpu(), rv64, rtol=1e-3, atol=0)
    torch.testing.assert_close(rm.double().cpu(), rm64, rtol=1e-7, atol=0)
    # fp32 x near 1e4 is itself quantised to ~1e-3
    torch.testing.assert_close(y.double().cpu(), y_ref, atol=3e-3, rtol=0)


def test_nan_inf_stay_in_their_channel():
    x = make_input((4, 3, 5, 5))
    x[1, 0, 2, 2] = float("nan")
    x[2, 2, 0, 1] = float("inf")
    rm, rv = torch.zeros(3, device=DEVICE), torch.ones(3, device=DEVICE)
    y = TF.batch_norm(x, rm, rv, training=True)
    assert torch.isnan(y[:, 0]).all() and torch.isnan(rm[0]) and torch.isnan(rv[0])
    assert torch.isfinite(y[:, 1]).all() and torch.isfinite(rm[1]) and torch.isfinite(rv[1])
    y_ref = _ref(x.cpu(), torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64),
                 None, None, True)
    assert_close(y[:, 1], y_ref[:, 1], torch.float32, 4)
    assert not torch.isfinite(y[:, 2]).all()


@pytest.mark.parametrize("act", [None, "relu"])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("layout", ["NC", "NCHW", "NHWC"])
def test_gradcheck_float64(layout, training, act):
    fmt = LAYOUTS[layout][2]
    shape = (4, 2) if layout == "NC" else (2, 2, 3, 2)
    x = make_input(shape, torch.float64, fmt, requires_grad=True)
    w = torch.rand(2, dtype=torch.float64, device=DEVICE).add_(0.5).requires_grad_()
    b = torch.rand(2, dtype=torch.float64, device=DEVICE).sub_(0.5).requires_grad_()
    rm = torch.randn(2, dtype=torch.float64, device=DEVICE)
    rv = torch.rand(2, dtype=torch.float64, device=DEVICE) + 0.5

    def fn(x, w, b):
        return TF.batch_norm(x, rm.clone(), rv.clone(), w, b, training, 0.1, activation=act)

    assert torch.autograd.gradcheck(fn, (x, w, b), eps=1e-6, atol=1e-5)


# Configs that force several channel blocks, several splits and partial tiles
SMALL = Config(BLOCK_M=4, BLOCK_C=2, split=3)


@pytest.mark.parametrize("int64", [False, True])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_forced_tilings_and_int64_offsets(layout, int64):
    """Small blocks, many splits and 64-bit offset arithmetic give the same numbers."""
    cls, shape, fmt = LAYOUTS[layout]
    m = getattr(tritonbn, cls)(shape[1], activation="relu", device=DEVICE)
    r = getattr(torch.nn, cls)(shape[1], dtype=torch.float64, device=DEVICE)
    x = make_input(shape, memory_format=fmt, requires_grad=True)
    x64 = x.detach().double().requires_grad_()
    with ops.launch_overrides(reduce=SMALL, elementwise=SMALL, int64=int64):
        y = m(x)
        y.backward(torch.ones_like(y) * 0.5 + x.detach() * 0.1)
    y_ref = torch.relu(r(x64))
    y_ref.backward(torch.ones_like(y_ref) * 0.5 + x64.detach() * 0.1)
    assert_close(y, y_ref, torch.float32, 4)
    assert_close(x.grad, x64.grad, torch.float32, 4)
    assert_close(m.weight.grad, r.weight.grad, torch.float32, 40)
    assert_close(m.running_var, r.running_var, torch.float32, 4)


@pytest.mark.skipif(DEVICE != "cuda", reason="needs a GPU with > 8 GB free")
def test_numel_over_2_pow_31_gpu():
    """A real >= 2^31-element input takes the 64-bit offset path (fp16, 4 GiB)."""
    x = (torch.randn(2**16 + 1, 2, 2**14, device="cuda", dtype=torch.float16) + 1)
    assert x.numel() >= 2**31
    rm, rv = torch.zeros(2, device="cuda"), torch.ones(2, device="cuda")
    y = TF.batch_norm(x, rm, rv, training=True)
    mean = x.float().mean(dim=(0, 2))
    torch.testing.assert_close(rm, 0.1 * mean, atol=1e-4, rtol=1e-3)
    # the last elements, beyond 2^31, were written and normalised
    tail = y[-1, 1, -8:].float()
    expect = (x[-1, 1, -8:].float() - mean[1]) / x[:, 1].float().std(unbiased=False)
    torch.testing.assert_close(tail, expect, atol=2e-2, rtol=2e-2)


# relu6, hardswish, hardsigmoid, mish, elu, gelu_tanh (issue 16)
MORE_ACTS = ["relu6", "hardswish", "hardsigmoid", "mish", "elu", "gelu_tanh"]
ALPHA = 0.7
# dy' at a NaN pre, as torch's backward formulas have it (aten's decompositions, its
# CUDA kernels): a test that is false for NaN takes the other branch
NAN_GRAD = {"relu6": "dy", "hardswish": "dy", "hardsigmoid": 0.0, "elu": "dy",
            "mish": "nan", "gelu_tanh": "nan"}


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # inf * 0, as torch's
@pytest.mark.usefixtures("path")
@pytest.mark.parametrize("residual", [False, True], ids=["pre=x+b", "pre=b+z"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("act", MORE_ACTS)
def test_jumps_inf_nan_as_torch(act, dtype, residual):
    """pre at, and one ulp either side of, the points where act' jumps (relu6's 0 and
    6 strictly outside, hardswish 0 up to -3 and 1 from 3, hardsigmoid 1/6 strictly
    inside (-3, 3), elu alpha e^x up to 0), at +-inf and NaN, each moved by 0, +-1/4
    and +-3/4 ulp (the bias of 5 channels): y and dy' as torch's own activation has
    them on pre rounded to the dtype (by kernel_rounded, as the kernels round), the
    value torch's backward tests. Eval with eps = 0, mean 0, var 1 and weight 1
    makes pre = x + bias exactly in fp32, and dx = dy' (recomputed from x); with x
    = 0, pre = bias + z and dz = dy' (relu6: from the bit mask)."""
    s = 2 * torch.finfo(dtype).eps  # the spacing of [2, 4); [4, 8) has 2 s
    points = [-3 - s, -3, -3 + s, -1e-3, 0, 1e-3, 3 - s, 3, 3 + s, 6 - 2 * s, 6, 6 + 2 * s,
              -25, 25, -1.3, 0.7, 2.2, 4.5, -float("inf"), float("inf"), float("nan")]
    shifts = torch.tensor([0, 0.25, -0.25, 0.75, -0.75], dtype=torch.float64) * s
    v = torch.tensor(points, dtype=torch.float64).to(dtype).view(-1, 1).repeat(1, 5)
    dy = make_input(tuple(v.shape), dtype, mean=1.0, std=0.1)
    x = (torch.zeros_like(v) if residual else v.clone()).to(DEVICE).requires_grad_()
    z = v.clone().to(DEVICE).requires_grad_() if residual else None
    ones, zeros = torch.ones(5, device=DEVICE), torch.zeros(5, device=DEVICE)
    y = TF.batch_norm(x, zeros, ones, ones, shifts.float().to(DEVICE), False, 0.1, 0.0,
                      activation=act, residual=z, alpha=ALPHA)
    y.backward(dy)
    grad = z.grad if residual else x.grad
    p = kernel_rounded(v.double() + shifts, dtype).to(dtype).requires_grad_()
    y_t = reference.activate(p, act, ALPHA)          # torch's, on the dtype's values
    y_t.backward(dy.cpu())
    nan = torch.isnan(v)
    assert torch.isnan(y[nan]).all()
    want = {"dy": dy[nan], 0.0: torch.zeros_like(dy[nan]),
            "nan": torch.full_like(dy[nan], float("nan"))}[NAN_GRAD[act]]
    torch.testing.assert_close(grad[nan], want, equal_nan=True)
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(y[~nan].cpu(), y_t[~nan], atol=atol, rtol=rtol, equal_nan=True)
    torch.testing.assert_close(grad[~nan].cpu(), p.grad[~nan], atol=atol, rtol=rtol,
                               equal_nan=True)


@pytest.mark.parametrize("act", MORE_ACTS)
def test_gradcheck_float64_more_activations(act):
    """gradcheck of x, weight, bias and a residual z through each activation of issue
    16 (elu with alpha 0.7), training; weights in [1, 3] put pre past -3, 3 and 6."""
    shape = (2, 2, 3, 2)
    x = make_input(shape, torch.float64, requires_grad=True)
    z = make_input(shape, torch.float64, torch.channels_last, mean=-1.0, std=1.0,
                   requires_grad=True)
    w = (torch.rand(2, dtype=torch.float64, device=DEVICE) * 2 + 1).requires_grad_()
    b = torch.rand(2, dtype=torch.float64, device=DEVICE).sub_(0.5).requires_grad_()

    def fn(x, w, b, z):
        return TF.batch_norm(x, None, None, w, b, True, 0.1, activation=act, residual=z,
                             alpha=ALPHA)

    assert torch.autograd.gradcheck(fn, (x, w, b, z), eps=1e-6, atol=1e-5)
