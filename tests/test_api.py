"""Module and functional API: torch.nn's semantics, state_dict, repr, errors."""
import copy
import re

import pytest
import torch
from torch import nn

import tritonbn
import tritonbn.functional as TF
from conftest import DEVICE, assert_close, make_input


@pytest.mark.parametrize("name", ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d"])
def test_subclass_state_dict_and_repr(name):
    ours = getattr(tritonbn, name)(4, activation="relu")
    theirs = getattr(nn, name)(4)
    assert isinstance(ours, nn.modules.batchnorm._BatchNorm)
    assert isinstance(ours, getattr(nn, name))
    assert ours.activation == "relu"
    assert list(ours.state_dict()) == list(theirs.state_dict())
    with torch.no_grad():
        theirs.weight.uniform_()
        theirs.running_mean.uniform_()
        theirs.num_batches_tracked.fill_(7)
    ours.load_state_dict(theirs.state_dict())
    assert torch.equal(ours.weight, theirs.weight) and ours.num_batches_tracked.item() == 7
    with torch.no_grad():
        ours.bias.uniform_()
    theirs.load_state_dict(ours.state_dict())
    assert torch.equal(ours.bias, theirs.bias)
    assert repr(ours).startswith(f"{name}(4, eps=1e-05, momentum=0.1")
    assert "activation='relu'" in repr(ours)
    assert "activation=None" in repr(getattr(tritonbn, name)(4))


@pytest.mark.parametrize("act", ["tanh", "ReLU", "ReLU6", "hardtanh", "gelu_erf", 1, ["relu"]])
def test_bad_activation(act):
    with pytest.raises(ValueError, match="activation") as e:
        tritonbn.BatchNorm2d(3, activation=act)
    for name in ("'relu'", "'leaky_relu'", "'silu'", "'gelu'", "'gelu_tanh'", "'relu6'",
                 "'hardswish'", "'hardsigmoid'", "'mish'", "'elu'", "None"):
        assert name in str(e.value)             # the message lists every choice
    with pytest.raises(ValueError, match="activation"):
        TF.batch_norm(make_input((2, 3)), None, None, training=True, activation=act)


def test_elu_alpha():
    """elu's alpha: a module and functional argument, validated as negative_slope is,
    in the repr, and what the kernels compute with (not the default, nor
    negative_slope); negative_slope stays leaky_relu's."""
    with pytest.raises(TypeError, match="alpha"):
        tritonbn.BatchNorm2d(3, activation="elu", alpha="1")
    with pytest.raises(TypeError, match="alpha"):
        TF.batch_norm(make_input((2, 3)), None, None, training=True, activation="elu",
                      alpha=True)
    m = tritonbn.BatchNorm2d(3, activation="elu", alpha=0.4, negative_slope=0.3, device=DEVICE)
    assert "activation='elu', alpha=0.4" in repr(m) and "negative_slope" not in repr(m)
    assert "alpha" not in repr(tritonbn.BatchNorm2d(3, activation="leaky_relu", alpha=0.4))
    x = make_input((2, 3, 4, 4))
    ref = nn.functional.batch_norm(x.double(), None, None, training=True)
    assert_close(m(x), nn.functional.elu(ref, 0.4), torch.float32, 4)
    y = TF.batch_norm(x, None, None, training=True, activation="elu", alpha=0.4,
                      negative_slope=0.3)
    assert_close(y, nn.functional.elu(ref, 0.4), torch.float32, 4)
    y = TF.batch_norm(x, None, None, training=True, activation="leaky_relu", alpha=0.4,
                      negative_slope=0.3)
    assert_close(y, nn.functional.leaky_relu(ref, 0.3), torch.float32, 4)


@pytest.mark.parametrize("name,ndim,msg", [
    ("BatchNorm1d", 4, "expected 2D or 3D input (got 4D input)"),
    ("BatchNorm1d", 1, "expected 2D or 3D input (got 1D input)"),
    ("BatchNorm2d", 3, "expected 4D input (got 3D input)"),
    ("BatchNorm2d", 5, "expected 4D input (got 5D input)"),
    ("BatchNorm3d", 4, "expected 5D input (got 4D input)"),
])
def test_ndim_errors_as_torch(name, ndim, msg):
    x = torch.randn((2, 3, 2, 2, 2)[:ndim] if ndim > 1 else (3,), device=DEVICE) + 1
    for mod in (getattr(tritonbn, name)(3, device=DEVICE), getattr(nn, name)(3, device=DEVICE)):
        with pytest.raises(ValueError, match=re.escape(msg)):
            mod(x)


@pytest.mark.parametrize("shape", [(1, 3), (1, 3, 1), (1, 3, 1, 1)])
def test_one_value_per_channel(shape):
    msg = ("Expected more than 1 value per channel when training, "
           f"got input size {torch.Size(shape)}")
    cls = tritonbn.BatchNorm1d if len(shape) < 4 else tritonbn.BatchNorm2d
    with pytest.raises(ValueError, match=re.escape(msg)):
        cls(3, device=DEVICE)(make_input(shape))
    with pytest.raises(ValueError, match=re.escape(msg)):
        TF.batch_norm(make_input(shape), None, None, training=True)
    m = cls(3, device=DEVICE).eval()  # eval with one value is fine, as in torch
    assert m(make_input(shape)).shape == shape


def test_channel_mismatch():
    x = make_input((2, 3, 4, 4))
    with pytest.raises(RuntimeError, match="running_mean should contain 3 elements not 4"):
        tritonbn.BatchNorm2d(4, device=DEVICE)(x)
    with pytest.raises(RuntimeError, match="running_mean should contain 3 elements not 4"):
        tritonbn.BatchNorm2d(4, device=DEVICE).eval()(x)
    with pytest.raises(RuntimeError, match="weight should contain 3 elements not 4"):
        tritonbn.BatchNorm2d(4, track_running_stats=False, device=DEVICE)(x)
    with pytest.raises(RuntimeError, match="bias should contain 3 elements not 2"):
        TF.batch_norm(x, None, None, torch.ones(3, device=DEVICE), torch.ones(2, device=DEVICE),
                      training=True)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool,
                                   torch.complex64, torch.float8_e4m3fn, torch.float8_e5m2],
                         ids=str)
def test_input_dtypes_the_kernels_do_not_take(dtype):
    """Integers, bool, complex and float8 raise torch's own error and message (its CPU
    batch_norm's: '"batch_norm" not implemented for 'Long''), in training and eval,
    module and functional; float8 would otherwise run the kernels, untested."""
    x = torch.ones(2, 3, 4, 4, device=DEVICE).to(dtype)
    with pytest.raises(NotImplementedError) as theirs:
        nn.functional.batch_norm(x.cpu(), None, None, training=True)
    assert "not implemented for '" in str(theirs.value)
    module = tritonbn.BatchNorm2d(3, device=DEVICE)
    for call in (module, copy.deepcopy(module).eval(),
                 lambda x: TF.batch_norm(x, None, None, training=True, activation="relu")):
        with pytest.raises(NotImplementedError) as ours:
            call(x)
        assert str(ours.value) == str(theirs.value)


@pytest.mark.parametrize("name", ["running_mean", "running_var", "weight", "bias"])
def test_per_channel_float8_refused(name):
    x = make_input((2, 3, 4))
    ones, zeros = torch.ones(3, device=DEVICE), torch.zeros(3, device=DEVICE)
    args = dict(running_mean=zeros, running_var=ones, weight=ones.clone(), bias=zeros.clone())
    args[name] = args[name].to(torch.float8_e4m3fn)
    for training in (True, False):
        msg = f"{name} must be float16, bfloat16, float32 or float64, got torch.float8_e4m3fn"
        with pytest.raises(NotImplementedError, match=msg):
            TF.batch_norm(x, training=training, **args)


def test_eval_without_running_stats_and_functional_momentum_none():
    x = make_input((2, 3, 4))
    with pytest.raises(RuntimeError, match="running_mean must be defined in evaluation mode"):
        TF.batch_norm(x, None, None, training=False)
    rm, rv = torch.zeros(3, device=DEVICE), torch.ones(3, device=DEVICE)
    with pytest.raises(TypeError, match="momentum"):
        TF.batch_norm(x, rm, rv, training=True, momentum=None)
    assert torch.equal(rm, torch.zeros(3, device=DEVICE))


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("given", ["running_mean", "running_var", "neither", "short_mean"])
def test_one_running_stat_errors_as_torch(given, training):
    """One running stat without the other: torch's error and message (ValueError in
    training, running_var's or running_mean's RuntimeError in eval), sizes first; the
    one given is left as it was. Neither, in training, runs."""
    x = make_input((3, 4, 2))
    stats = {"running_mean": torch.full((4,), 0.5), "running_var": torch.full((4,), 2.0),
             "neither": None, "short_mean": torch.zeros(5)}
    args = [stats[given] if given in ("running_mean", "short_mean") else None,
            stats[given] if given == "running_var" else None]
    if given == "neither" and training:
        ref = nn.functional.batch_norm(x.double().cpu(), None, None, training=True)
        assert_close(TF.batch_norm(x, None, None, training=True), ref, torch.float32, 4)
        return
    with pytest.raises(Exception) as theirs:
        nn.functional.batch_norm(x.cpu(), *args, training=training)
    args = [a.to(DEVICE) if a is not None else None for a in args]
    before = [a.clone() if a is not None else None for a in args]
    with pytest.raises(type(theirs.value), match=re.escape(str(theirs.value))):
        TF.batch_norm(x, *args, training=training, activation="relu")
    for a, b in zip(args, before):
        assert a is None or torch.equal(a, b)


def test_functional_matches_torch_functional():
    x = make_input((4, 3, 5, 5), memory_format=torch.channels_last)
    rm, rv = torch.randn(3, device=DEVICE), torch.rand(3, device=DEVICE) + 0.5
    w, b = torch.rand(3, device=DEVICE) + 0.5, torch.randn(3, device=DEVICE)
    rm2, rv2 = rm.clone().double(), rv.clone().double()
    y = TF.batch_norm(x, rm, rv, w, b, True, 0.3, 1e-3, activation="relu")
    y_ref = torch.relu(torch.nn.functional.batch_norm(x.double(), rm2, rv2, w.double(), b.double(),
                                                      True, 0.3, 1e-3))
    assert_close(y, y_ref, torch.float32, 4)
    assert_close(rm, rm2, torch.float32)
    assert_close(rv, rv2, torch.float32)
    assert y.is_contiguous(memory_format=torch.channels_last)
    y = TF.batch_norm(x, rm, rv, w, b)  # eval by default, as torch's
    assert_close(y, torch.nn.functional.batch_norm(x.double(), rm2, rv2, w.double(), b.double()),
                 torch.float32, 4)


@pytest.mark.parametrize("momentum", [0.1, None])
def test_empty_batch(momentum):
    ours = tritonbn.BatchNorm2d(3, momentum=momentum, device=DEVICE)
    ref = nn.BatchNorm2d(3, momentum=momentum, device=DEVICE)
    x = torch.randn(0, 3, 4, 4, device=DEVICE, requires_grad=True)
    y = ours(x)
    y_ref = ref(x)
    assert y.shape == y_ref.shape == (0, 3, 4, 4)
    assert torch.equal(ours.running_mean, ref.running_mean)
    assert torch.equal(ours.running_var, ref.running_var)
    assert ours.num_batches_tracked.item() == ref.num_batches_tracked.item() == 1
    y.sum().backward()
    assert x.grad.shape == x.shape
    assert torch.equal(ours.weight.grad, torch.zeros(3, device=DEVICE))


def test_frozen_weight_and_input_without_grad():
    m = tritonbn.BatchNorm2d(3, activation="relu", device=DEVICE)
    m.weight.requires_grad_(False)
    x = make_input((2, 3, 4, 4), requires_grad=True)
    m(x).sum().backward()
    assert m.weight.grad is None and m.bias.grad is not None and x.grad is not None
    m.bias.requires_grad_(False)
    x = make_input((2, 3, 4, 4))  # nothing needs a grad: no graph at all
    assert not m(x).requires_grad


def test_eval_with_track_running_stats_false_uses_batch_stats():
    ours = tritonbn.BatchNorm2d(3, track_running_stats=False, device=DEVICE).eval()
    ref = nn.BatchNorm2d(3, track_running_stats=False, dtype=torch.float64, device=DEVICE).eval()
    x = make_input((2, 3, 4, 4))
    assert_close(ours(x), ref(x.double()), torch.float32, 4)


def test_momentum_none_is_cumulative_average():
    ours = tritonbn.BatchNorm1d(3, momentum=None, device=DEVICE)
    xs = [make_input((5, 3)) for _ in range(4)]
    for x in xs:
        ours(x)
    means = torch.stack([x.double().mean(0) for x in xs]).mean(0)
    variances = torch.stack([x.double().var(0) for x in xs]).mean(0)
    # running_mean starts at 0, running_var at 1, but the first factor is 1/1
    assert_close(ours.running_mean, means, torch.float32)
    assert_close(ours.running_var, variances, torch.float32, 4)
    assert ours.num_batches_tracked.item() == 4


def test_running_stats_updated_once_per_call():
    m = tritonbn.BatchNorm2d(3, momentum=0.5, device=DEVICE)
    x = make_input((2, 3, 3, 3))
    m(x)
    first = m.running_mean.clone()
    assert_close(first, 0.5 * x.double().mean((0, 2, 3)), torch.float32)
    m(x)
    assert_close(m.running_mean, 0.75 * x.double().mean((0, 2, 3)), torch.float32)


@pytest.mark.gpu_smoke
@pytest.mark.skipif(DEVICE != "cuda", reason="sync debug mode needs CUDA")
@pytest.mark.parametrize("momentum", [0.1, None])
def test_no_host_sync_gpu(momentum):
    m = tritonbn.BatchNorm2d(8, momentum=momentum, activation="relu", device="cuda")
    x = make_input((4, 8, 8, 8), requires_grad=True)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        m(x).sum().backward()
        m.eval()(x)
    finally:
        torch.cuda.set_sync_debug_mode("default")
