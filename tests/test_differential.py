"""tritonbn.BatchNorm1d/2d/3d against torch.nn.BatchNorm1d/2d/3d (+ torch.relu) in float64.

Several training steps (forward, grads of input/weight/bias, running stats,
num_batches_tracked), then eval (forward and its backward): conftest.check_steps.
"""
import itertools

import pytest
import torch

from conftest import LAYOUTS, check_steps, module_pair, widen

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
