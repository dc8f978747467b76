"""tritonbn.BatchNorm1d/2d/3d against torch.nn.BatchNorm1d/2d/3d (+ torch.relu) in float64.

Several training steps (forward, grads of input/weight/bias, running stats,
num_batches_tracked), then eval (forward and its backward).
"""
import itertools

import pytest
import torch
from torch import nn

import tritonbn
from conftest import DEVICE, LAYOUTS, assert_close, make_input

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def _pair(layout, dtype, act, affine=True, track=True, momentum=0.1, param_dtype=None):
    cls, shape, fmt = LAYOUTS[layout]
    C = shape[1]
    if param_dtype is None:  # half inputs with fp32 parameters/stats, as under autocast
        param_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    ours = getattr(tritonbn, cls)(C, momentum=momentum, affine=affine, track_running_stats=track,
                                  activation=act, device=DEVICE, dtype=param_dtype)
    ref = getattr(nn, cls)(C, momentum=momentum, affine=affine, track_running_stats=track,
                           dtype=torch.float64, device=DEVICE)
    if affine:
        with torch.no_grad():
            ours.weight.uniform_(0.5, 1.5)
            ours.bias.uniform_(-0.5, 0.5)
    ref.load_state_dict(ours.state_dict())
    return ours, ref, shape, fmt


def _check_steps(ours, ref, shape, fmt, dtype, act, steps=3):
    scale = 4.0  # values and grads here reach a few units
    for step in range(steps + 1):
        training = step < steps
        ours.train(training)
        ref.train(training)
        x = make_input(shape, dtype, fmt, requires_grad=True)
        x64 = x.detach().double().requires_grad_()
        y = ours(x)
        y_ref = ref(x64)
        if act == "relu":
            y_ref = torch.relu(y_ref)
        assert y.dtype == dtype and y.shape == x.shape and y.stride() == x.stride()
        assert_close(y, y_ref, dtype, scale)
        dy = make_input(shape, dtype, fmt, mean=0.3, std=1.0)
        y.backward(dy)
        y_ref.backward(dy.double())
        assert_close(x.grad, x64.grad, dtype, scale)
        if ours.affine:
            # sums over the batch: their size grows with it, so compare relatively
            assert_close(ours.weight.grad, ref.weight.grad, dtype, scale=scale * 10)
            assert_close(ours.bias.grad, ref.bias.grad, dtype, scale=scale * 10)
            ours.weight.grad = ours.bias.grad = ref.weight.grad = ref.bias.grad = None
        if ours.track_running_stats:
            assert_close(ours.running_mean, ref.running_mean, dtype)
            assert_close(ours.running_var, ref.running_var, dtype, scale)
            assert ours.num_batches_tracked.item() == ref.num_batches_tracked.item()
        else:
            assert ours.running_mean is None and ours.num_batches_tracked is None


@pytest.mark.parametrize("act", [None, "relu"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layouts_dtypes(layout, dtype, act):
    ours, ref, shape, fmt = _pair(layout, dtype, act)
    _check_steps(ours, ref, shape, fmt, dtype, act)


@pytest.mark.parametrize("affine,track,momentum,act",
                         list(itertools.product([True, False], [True, False], [0.1, None],
                                                [None, "relu"])))
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_module_options(layout, affine, track, momentum, act):
    ours, ref, shape, fmt = _pair(layout, torch.float32, act, affine, track, momentum)
    _check_steps(ours, ref, shape, fmt, torch.float32, act)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_half_module(layout, dtype):
    """A module converted whole to half: half weight, bias and running stats."""
    ours, ref, shape, fmt = _pair(layout, dtype, "relu", param_dtype=dtype)
    _check_steps(ours, ref, shape, fmt, dtype, "relu", steps=2)
    assert ours.weight.dtype == ours.running_var.dtype == dtype
