"""Fused residual add and activations: act(BN(x) + z) against torch in float64 --
forward, the grads of x, weight, bias and z, running stats -- and what backward saves."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tritonbn
import tritonbn.functional as TF
from conftest import (DEVICE, LAYOUTS, assert_close, check_steps, make_input, module_pair,
                      widen)
from tritonbn import ops
from tritonbn.heuristics import Config
from tritonbn.testing import poisoned_allocations, saved_for_backward

pytestmark = pytest.mark.usefixtures("path")  # both paths, every test

ACTS = [None, "relu", "leaky_relu", "silu", "gelu"]
SLOPE = 0.2  # leaky_relu's negative slope: not the default, so a dropped slope shows
MORE_ACTS = ["relu6", "hardswish", "hardsigmoid", "mish", "elu", "gelu_tanh"]  # issue 16
ALPHA = 0.625  # elu's alpha, likewise; exact in fp32 (a GPU gets float scalars as fp32)
MASKED = ("relu", "leaky_relu", "relu6")  # act' is 1 or a constant: 1 bit after a residual


def torch_act(y, act):
    return {None: lambda t: t, "relu": torch.relu, "leaky_relu": lambda t: F.leaky_relu(t, SLOPE),
            "silu": F.silu, "gelu": F.gelu, "relu6": F.relu6, "hardswish": F.hardswish,
            "hardsigmoid": F.hardsigmoid, "mish": F.mish, "elu": lambda t: F.elu(t, ALPHA),
            "gelu_tanh": lambda t: F.gelu(t, approximate="tanh")}[act](y)


def _steps(layout, act, residual, dtype=torch.float32, z_format=None, steps=2, wide=False):
    """Training steps then eval; every output and grad against float64 torch. wide:
    weights in [1, 3.5] (conftest.widen), so pre reaches relu6's 6 and
    hardswish's and hardsigmoid's -3 and 3."""
    ours, ref, shape, fmt = module_pair(layout, dtype, act, negative_slope=SLOPE, alpha=ALPHA)
    if wide:
        widen(ours, ref)
    check_steps(ours, ref, shape, fmt, dtype, steps, residual=residual, z_format=z_format)


@pytest.mark.parametrize("residual", [False, True], ids=["bn", "bn_add"])
@pytest.mark.parametrize("act", ACTS, ids=str)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_activation_residual_layouts(layout, act, residual):
    _steps(layout, act, residual)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("act", ["relu", "silu", "gelu"])
def test_residual_dtypes(act, dtype):
    _steps("NHWC", act, True, dtype)


@pytest.mark.parametrize("act", ["relu", "gelu", None])
@pytest.mark.parametrize("layout,z_format", [("NHWC", torch.contiguous_format),
                                             ("NCHW", torch.channels_last)])
def test_residual_in_another_memory_format(layout, z_format, act):
    _steps(layout, act, True, z_format=z_format, steps=1)


# small tiles, several splits and channel blocks; BLOCK_M under 8 is raised to a
# whole byte of the mask, so relu's mask is written and read by partial bytes too
@pytest.mark.parametrize("cfg", [Config(BLOCK_M=2, BLOCK_C=2, split=3),
                                 Config(BLOCK_M=8, BLOCK_C=4, split=2),
                                 Config(BLOCK_M=16, BLOCK_C=1, split=5)])
@pytest.mark.parametrize("act", ["relu", "leaky_relu", "silu"])
@pytest.mark.parametrize("layout", ["NCL", "NHWC", "NCDHW"])
def test_forced_tilings(layout, act, cfg):
    with ops.launch_overrides(reduce=cfg, elementwise=cfg):
        _steps(layout, act, True, steps=1)


def test_mask_tiles_differ_between_forward_and_backward():
    """normalize writes the mask with one tiling, the backward kernels read it with others."""
    with ops.launch_overrides(normalize=Config(8, 2, 3), bwd_reduce=Config(32, 1, 2),
                              dx=Config(16, 4, 1)):
        _steps("NCL", "relu", True, steps=1)
        _steps("NHWC", "leaky_relu", True, steps=1)
        _steps("NCDHW", "relu6", True, steps=1, wide=True)


# relu6, hardswish, hardsigmoid, mish, elu, gelu_tanh (issue 16): relu6 after a
# residual keeps the bit mask (0 < pre < 6), the others reload z

@pytest.mark.parametrize("act", MORE_ACTS)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_more_activations_residual_layouts(layout, act):
    _steps(layout, act, True, wide=True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("act", MORE_ACTS)
def test_more_activations_residual_dtypes(act, dtype):
    _steps("NHWC", act, True, dtype, wide=True)


@pytest.mark.parametrize("cfg", [Config(BLOCK_M=2, BLOCK_C=2, split=3),
                                 Config(BLOCK_M=16, BLOCK_C=1, split=5)])
@pytest.mark.parametrize("layout,z_format", [("NCL", None), ("NHWC", torch.contiguous_format),
                                             ("NCHW", torch.channels_last)])
def test_relu6_mask_tilings_and_formats(layout, z_format, cfg):
    """relu6's mask written and read by partial bytes, several splits and channel
    blocks, with the residual in another memory format than x."""
    with ops.launch_overrides(reduce=cfg, elementwise=cfg):
        _steps(layout, "relu6", True, z_format=z_format, steps=1, wide=True)


@pytest.mark.parametrize("act", ACTS, ids=str)
@pytest.mark.parametrize("training", [True, False])
def test_gradcheck_float64(act, training):
    shape = (2, 2, 3, 2)
    x = make_input(shape, torch.float64, requires_grad=True)
    z = make_input(shape, torch.float64, torch.channels_last, mean=-1.0, std=1.0,
                   requires_grad=True)
    w = torch.rand(2, dtype=torch.float64, device=DEVICE).add_(0.5).requires_grad_()
    b = torch.rand(2, dtype=torch.float64, device=DEVICE).sub_(0.5).requires_grad_()
    rm = torch.randn(2, dtype=torch.float64, device=DEVICE)
    rv = torch.rand(2, dtype=torch.float64, device=DEVICE) + 0.5

    def fn(x, w, b, z):
        return TF.batch_norm(x, rm.clone(), rv.clone(), w, b, training, 0.1, activation=act,
                             residual=z, negative_slope=SLOPE)

    assert torch.autograd.gradcheck(fn, (x, w, b, z), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("act", ["relu", "gelu", None])
def test_grad_of_residual_alone(act):
    """Only z needs a grad (a frozen BN on a detached input): dz still comes out."""
    m = tritonbn.BatchNorm2d(3, activation=act, device=DEVICE)
    m.requires_grad_(False)
    x = make_input((2, 3, 4, 3))
    z = make_input((2, 3, 4, 3), mean=-1.0, requires_grad=True)
    with poisoned_allocations():
        y = m(x, z)
        y.backward(torch.ones_like(y))
    z64 = z.detach().double().requires_grad_()
    ref = nn.BatchNorm2d(3, dtype=torch.float64, device=DEVICE)
    torch_act(ref(x.double()) + z64, act).backward(torch.ones_like(z64))
    assert_close(z.grad, z64.grad, torch.float32, 4)
    assert m.weight.grad is None and x.grad is None


def test_residual_not_fusable_falls_back_to_torch_semantics():
    """A residual of another dtype or a broadcast shape: act(bn(x) + z) as torch has it."""
    x = make_input((2, 3, 4, 4), requires_grad=True)
    for z in (make_input((2, 3, 4, 4), torch.float64), make_input((1, 3, 1, 4))):
        z.requires_grad_()
        m = tritonbn.BatchNorm2d(3, activation="silu", device=DEVICE)
        y = m(x, z)
        ref = nn.BatchNorm2d(3, device=DEVICE)
        y_ref = F.silu(ref(x) + z)
        assert y.dtype == y_ref.dtype and y.shape == y_ref.shape
        torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
        gz, = torch.autograd.grad(y.sum(), [z])
        gz_ref, = torch.autograd.grad(y_ref.sum(), [z])
        torch.testing.assert_close(gz, gz_ref, atol=1e-5, rtol=1e-5)


def test_residual_errors_and_numbers():
    x = make_input((2, 3, 4))
    y = TF.batch_norm(x, None, None, training=True, residual=1.5, activation="relu")
    assert_close(y, torch.relu(F.batch_norm(x.double(), None, None, training=True) + 1.5),
                 torch.float32, 4)
    with pytest.raises(TypeError):  # torch's own error for what cannot be added
        TF.batch_norm(x, None, None, training=True, residual="z")
    with pytest.raises(RuntimeError):  # shapes that do not broadcast: torch's own error
        TF.batch_norm(x, None, None, training=True, residual=make_input((2, 3, 5)))
    with pytest.raises(TypeError, match="negative_slope"):
        tritonbn.BatchNorm1d(3, activation="leaky_relu", negative_slope="0.1")


def test_repr_and_functional_slope():
    m = tritonbn.BatchNorm2d(3, activation="leaky_relu", negative_slope=0.3)
    assert "activation='leaky_relu', negative_slope=0.3" in repr(m)
    x = make_input((2, 3, 4, 4))
    y = TF.batch_norm(x, None, None, training=True, activation="leaky_relu", negative_slope=0.3)
    y_ref = F.leaky_relu(F.batch_norm(x.double(), None, None, training=True), 0.3)
    assert_close(y, y_ref, torch.float32, 4)


def test_empty_batch_with_residual():
    m = tritonbn.BatchNorm2d(3, activation="relu", device=DEVICE)
    x = torch.empty((0, 3, 2, 2), device=DEVICE, requires_grad=True)
    z = torch.empty((0, 3, 2, 2), device=DEVICE, requires_grad=True)
    m.eval()
    y = m(x, z)
    y.sum().backward()
    assert y.shape == x.shape and z.grad.shape == z.shape


# ----------------------------------------------------------------------------- saved bytes

@pytest.mark.parametrize("act", ACTS + MORE_ACTS, ids=str)
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_saved_bytes(act, dtype):
    """What backward keeps, measured with saved_tensors_hooks: x, plus numel/8 bytes
    of mask (relu, leaky_relu, relu6) or a reference to the caller's own z (the
    others) after a residual add; never a full-size pre-activation. torch's unfused
    act(bn(x) + z) keeps x and a new full-size tensor (relu's output, silu's input)."""
    shape = (4, 16, 8, 8)  # 256 positions per channel: the mask is exactly numel / 8
    x = make_input(shape, dtype, torch.channels_last, requires_grad=True)
    z = make_input(shape, dtype, torch.channels_last, mean=-0.5, requires_grad=True)
    E, s = x.numel(), x.element_size()
    callers = {x.untyped_storage().data_ptr(), z.untyped_storage().data_ptr()}

    def new_bytes(saved):  # full-size storages autograd keeps beyond the caller's x and z
        return sum(n for ptr, n in saved if n >= E // 8 and ptr not in callers)

    def kept(saved):
        return {ptr for ptr, _ in saved} & callers

    m = tritonbn.BatchNorm2d(16, activation=act, device=DEVICE)
    _, alone = saved_for_backward(m, x)
    assert new_bytes(alone) == 0 and kept(alone) == {x.untyped_storage().data_ptr()}
    _, fused = saved_for_backward(m, x, z)
    assert new_bytes(fused) == (E // 8 if act in MASKED else 0)
    assert kept(fused) == (callers if act is not None and act not in MASKED
                           else {x.untyped_storage().data_ptr()})
    ref = nn.BatchNorm2d(16, device=DEVICE).to(dtype)
    _, unfused = saved_for_backward(lambda x, z: torch_act(ref(x) + z, act), x, z)
    assert new_bytes(unfused) == (E * s if act is not None else 0)
