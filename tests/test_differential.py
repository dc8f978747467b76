"""tritonbn.BatchNorm1d/2d/3d against torch.nn.BatchNorm1d/2d/3d (+ torch.relu) in float64.

Several training steps (forward, grads of input/weight/bias, running stats,
num_batches_tracked), then eval (forward and its backward): conftest.check_steps.
"""
import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import tritonbn.functional as TF

from conftest import DEVICE, LAYOUTS, TOL, assert_close, check_steps, make_input, module_pair, widen

pytestmark = pytest.mark.usefixtures("path")  # both paths, every test

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


@pytest.mark.parametrize("act", [None, "relu"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layouts_dtypes(layout, dtype, act):
    ours, ref, shape, fmt = module_pair(layout, dtype, act)
    check_steps(ours, ref, shape, fmt, dtype)


@pytest.mark.parametrize("affine,track,momentum,act",
                         list(itertools.product([True, False], [True, False], [0.1, None],
                                                [None, "relu"])))
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_module_options(layout, affine, track, momentum, act):
    ours, ref, shape, fmt = module_pair(layout, torch.float32, act, affine, track, momentum)
    check_steps(ours, ref, shape, fmt, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_half_module(layout, dtype):
    """A module converted whole to half: half weight, bias and running stats."""
    ours, ref, shape, fmt = module_pair(layout, dtype, "relu", param_dtype=dtype)
    check_steps(ours, ref, shape, fmt, dtype, steps=2)
    assert ours.weight.dtype == ours.running_var.dtype == dtype


# relu6, hardswish, hardsigmoid, mish, elu, gelu_tanh (issue 16)
MORE_ACTS = ["relu6", "hardswish", "hardsigmoid", "mish", "elu", "gelu_tanh"]
ALPHA = 0.7  # elu's: not the default, so a dropped alpha shows, and act' jumps at 0


@pytest.mark.parametrize("act", MORE_ACTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_more_activations(layout, dtype, act):
    ours, ref, shape, fmt = module_pair(layout, dtype, act, alpha=ALPHA)
    widen(ours, ref)
    check_steps(ours, ref, shape, fmt, dtype, steps=2)


@pytest.mark.parametrize("param_dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("layout", ["NC", "NHWC"])
def test_float64_input_half_parameters(layout, param_dtype):
    """float64 input with half weight, bias and running stats: the float64
    accumulators reach them through float32, as torch's c10 half types are made,
    where Triton's interpreter would cast float64 to bfloat16 as an integer (0.35 -> 0).
    Running stats, dweight and dbias within a rounding of param_dtype of float64's."""
    ours, ref, shape, fmt = module_pair(layout, torch.float64, "silu", param_dtype=param_dtype)
    with torch.no_grad():
        ours.running_mean.uniform_(0.2, 0.6)
        ours.running_var.uniform_(0.5, 1.5)
    ref.load_state_dict(ours.state_dict())
    x = make_input(shape, torch.float64, fmt, requires_grad=True)
    x64 = x.detach().clone().requires_grad_()
    dy = make_input(shape, torch.float64, fmt, mean=0.5)
    ours(x).backward(dy)
    torch.nn.functional.silu(ref(x64)).backward(dy)
    ulp = 2.0 ** -7 if param_dtype == torch.bfloat16 else 2.0 ** -10  # the rounding, twice over
    for name in ("running_mean", "running_var"):
        got, want = getattr(ours, name), getattr(ref, name)
        assert got.dtype == param_dtype
        torch.testing.assert_close(got.double(), want.to(got.device), rtol=2 * ulp, atol=0)
    for got, want in ((ours.weight.grad, ref.weight.grad), (ours.bias.grad, ref.bias.grad)):
        assert got.dtype == param_dtype
        torch.testing.assert_close(got.double(), want.to(got.device), rtol=2 * ulp,
                                   atol=2 * ulp * float(want.abs().max()))
    assert_close(x.grad, x64.grad, torch.float64)


_FLOATS = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


@settings(max_examples=30, deadline=None)
@given(shape=st.sampled_from([(5, 3), (3, 2, 4), (2, 3, 2, 3), (2, 2, 1, 2, 3)]),
       x_dtype=st.sampled_from(_FLOATS), per_dtypes=st.tuples(*[st.sampled_from(_FLOATS)] * 3),
       stats=st.booleans(), affine=st.booleans(), training=st.booleans(),
       momentum=st.sampled_from([0.1, 0.0, 1.0, 0.37]), eps=st.sampled_from([1e-5, 0.1]),
       act=st.sampled_from([None, "relu", "silu", "hardsigmoid"]),
       mode=st.sampled_from(["grad", "no_grad", "inference_mode"]))
def test_functional_mixed_dtypes_and_grad_modes(shape, x_dtype, per_dtypes, stats, affine, training,
                                                momentum, eps, act, mode):
    """functional.batch_norm with each of input, running stats, weight and bias in any
    of the four float dtypes (torch's CUDA batch_norm takes such mixes), under grad,
    no_grad and inference_mode: y in the input's dtype, running stats and grads in
    their own, against torch in float64 on the same rounded values."""
    stats = stats or not training
    torch.manual_seed(0)  # each example its own data, the same each time it is run
    g = torch.Generator().manual_seed(len(shape) + int(training))
    C = shape[1]
    rm = (torch.rand(C, generator=g) * 0.5).to(per_dtypes[0]) if stats else None
    rv = (torch.rand(C, generator=g) + 0.5).to(per_dtypes[0]) if stats else None
    w = (torch.rand(C, generator=g) + 0.5).to(per_dtypes[1]) if affine else None
    b = (torch.rand(C, generator=g) - 0.5).to(per_dtypes[2]) if affine else None
    x = make_input(shape, x_dtype)
    ins = [t.to(DEVICE) if t is not None else None for t in (rm, rv, w, b)]
    ref = [t.double() if t is not None else None for t in (rm, rv, w, b)]
    if mode == "grad":
        x.requires_grad_()
        for t in ins[2:] + ref[2:]:
            if t is not None:
                t.requires_grad_()
    x64 = x.detach().double().cpu().requires_grad_(mode == "grad")
    context = {"grad": torch.enable_grad, "no_grad": torch.no_grad,
               "inference_mode": torch.inference_mode}[mode]
    with context():
        y = TF.batch_norm(x, *ins, training, momentum, eps, activation=act)
    pre = nn.functional.batch_norm(x64, *ref, training, momentum, eps)
    # hardsigmoid as clamp / 6: torch's own backward multiplies by a float32 1/6, off by
    # 3e-8 in float64, where the kernels' 1/6 is float64's
    y64 = {None: pre, "relu": torch.relu(pre), "silu": nn.functional.silu(pre),
           "hardsigmoid": torch.clamp(pre + 3, 0, 6) / 6}[act]
    used = [x_dtype] + [t.dtype for t in ins if t is not None]
    rtol = max(TOL[d][1] for d in used) * 8
    assert y.dtype == x_dtype and y.is_inference() == (mode == "inference_mode")
    torch.testing.assert_close(y.double().cpu(), y64.detach(), rtol=rtol, atol=rtol)
    for got, want in zip(ins[:2], ref[:2]):
        if got is not None:
            torch.testing.assert_close(got.double().cpu(), want, rtol=rtol, atol=rtol)
    if mode == "grad":
        dy = make_input(shape, x_dtype, mean=0.5)
        y.backward(dy)
        y64.backward(dy.double().cpu())
        for got, want in zip([x] + ins[2:], [x64] + ref[2:]):
            if got is not None:
                assert got.grad.dtype == got.dtype
                scale = float(want.grad.abs().max()) + 1
                torch.testing.assert_close(got.grad.double().cpu(), want.grad,
                                           rtol=rtol * 4, atol=rtol * 4 * scale)
