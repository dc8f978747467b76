"""Runs the suite on the GPU when there is one, else through Triton's interpreter.

TRITON_INTERPRET must be set before triton is imported, so it is set here, at
collection time, before any test imports tritonbn's kernels.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") in ("", "0") else "cpu"

LAYOUTS = {
    # name: (module class name, shape, memory format)
    "NC": ("BatchNorm1d", (6, 5), torch.contiguous_format),
    "NCL": ("BatchNorm1d", (3, 5, 7), torch.contiguous_format),
    "NCHW": ("BatchNorm2d", (3, 5, 4, 3), torch.contiguous_format),
    "NHWC": ("BatchNorm2d", (3, 5, 4, 3), torch.channels_last),
    "NCDHW": ("BatchNorm3d", (2, 5, 3, 2, 3), torch.contiguous_format),
    "NDHWC": ("BatchNorm3d", (2, 5, 3, 2, 3), torch.channels_last_3d),
}

# (atol, rtol) against a float64 reference, for values of order 1
TOL = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (2e-5, 2e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (2e-2, 2e-2),
}


def make_input(shape, dtype=torch.float32, memory_format=torch.contiguous_format, *,
               mean=1.5, std=2.0, device=DEVICE, requires_grad=False):
    """Random data with a non-zero, per-channel-varying mean; never zeros. The means
    cycle through 16 values (mean + 0.25 * (c % 16)): with C = 1024 a mean growing
    with c would reach 257 for x and dy alike, and then fp32's own rounding of the
    saved mean, times sum dy over a GPU batch, exceeds any order-1 tolerance
    (issue 13: the first GPU lease, dweight off by 12 of ~500 at C = 1024)."""
    C = shape[1]
    cycle = torch.arange(C, dtype=torch.float64) % 16
    offset = mean + cycle.view(1, C, *([1] * (len(shape) - 2))) * 0.25
    x = (torch.randn(shape, dtype=torch.float64) * std + offset).to(dtype)
    x = x.to(device).to(memory_format=memory_format)
    return x.requires_grad_(requires_grad)


def assert_close(actual, expected, dtype, scale=1.0, extra_atol=0.0):
    """actual (any dtype) against a float64 expected, with tolerances for dtype."""
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(actual.double(), expected.double().to(actual.device),
                               atol=atol * scale + extra_atol, rtol=rtol, equal_nan=True)


def saved_mean_atol(x64, db64, dtype):
    """What rounding the mean to the accumulation dtype may move dweight = sum dy' *
    (x - mean) / sigma by: |sum dy'| * |mean| * 2**-p / sigma per channel (p: the
    mantissa bits), times 4, at its largest. The float64 reference keeps its mean
    exact; ours and torch's keep an fp32 one (the first GPU lease: 0.011 of ~400 at
    M = 25088 in fp32)."""
    dims = [d for d in range(x64.dim()) if d != 1]
    x = x64.detach()
    sigma = x.var(dims, unbiased=False).add(1e-5).sqrt()
    ulp = 2.0 ** -52 if dtype == torch.float64 else 2.0 ** -23
    return 4 * ulp * float((db64.detach().abs().to(x.device) * x.mean(dims).abs() / sigma).max())


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(params=["split", "fused"])
def path(request):
    """Each test using it runs on both paths: the split kernels (stats, combine,
    normalize; reduce, combine, dx) and the single-program ones (kernels/fused.py)."""
    from tritonbn import ops

    with ops.launch_overrides(path=request.param):
        yield request.param


def module_pair(layout, dtype, act, affine=True, track=True, momentum=0.1, param_dtype=None,
                negative_slope=0.01, alpha=1.0):
    """(tritonbn module, torch.nn float64 module with the same state, shape, memory format)."""
    import tritonbn
    from torch import nn

    cls, shape, fmt = LAYOUTS[layout]
    C = shape[1]
    if param_dtype is None:  # half inputs with fp32 parameters/stats, as under autocast
        param_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    ours = getattr(tritonbn, cls)(C, momentum=momentum, affine=affine, track_running_stats=track,
                                  activation=act, negative_slope=negative_slope, alpha=alpha,
                                  device=DEVICE, dtype=param_dtype)
    ref = getattr(nn, cls)(C, momentum=momentum, affine=affine, track_running_stats=track,
                           dtype=torch.float64, device=DEVICE)
    if affine:
        with torch.no_grad():
            ours.weight.uniform_(0.5, 1.5)
            ours.bias.uniform_(-0.5, 0.5)
    ref.load_state_dict(ours.state_dict())
    return ours, ref, shape, fmt


def widen(ours, ref):
    """module_pair's modules with weights in [1, 3.5] and biases in [-1, 1]: pre reaches
    relu6's 6 and both sides of hardswish's and hardsigmoid's -3 and 3 by the dozen
    in a few steps of LAYOUTS' shapes, where [0.5, 1.5] rarely gets there."""
    with torch.no_grad():
        ours.weight.uniform_(1.0, 3.5)
        ours.bias.uniform_(-1.0, 1.0)
    ref.load_state_dict(ours.state_dict())


def kernel_rounded(t, dtype):
    """t rounded to dtype as the kernels round to it, back in float64: to nearest, but
    bfloat16 under Triton's interpreter truncates (its fp32 -> bf16 cast drops the low
    16 bits, where a GPU rounds to nearest), for y and for the value act' tests alike."""
    t = t.detach()
    if dtype == torch.bfloat16 and DEVICE == "cpu":
        return (t.float().view(torch.int32) & -65536).view(torch.float32).double()
    return t.to(dtype).double()


def kink_graph(pre64, y_ref, y, activation, slope=0.01):
    """What the float64 reference backpropagates: y_ref, except where act' jumps (relu,
    leaky_relu and elu at 0, relu6 at 0 and 6, hardswish and hardsigmoid at -3 and 3):
    there the derivative takes the side of the jump that our own y (in its dtype)
    took, as torch's relu backward reads its output. Where pre is within rounding of
    the jump either side is right, and a GPU batch has elements there: one on the
    other side moves its dx by |dy| w/sigma and its channel's sums by |dy| (issue 13:
    the first GPU lease). A y on the wrong side by more than rounding still fails the
    comparison of y itself.

    y shows the side exactly for relu, relu6 (0 or 6 outside), and leaky_relu and elu
    with a positive slope or alpha (y > 0 right of 0). hardswish's and hardsigmoid's
    y is continuous where act' jumps: there the side is torch's test on pre64 rounded
    to y's dtype as the kernels round (kernel_rounded), which differs from the
    kernels' own only where pre64 is within a few fp32 roundings (~1e-6) of where
    that rounding changes sides."""
    if activation in ("relu", "leaky_relu", "relu6"):
        if activation == "leaky_relu" and slope < 0:
            return y_ref
        yd = y.detach().to(pre64.device).double()
        other = slope if activation == "leaky_relu" else 0.0
        inside = (yd > 0) & (yd < 6) if activation == "relu6" else yd > 0
        return pre64 * torch.where(inside, 1.0, other)
    p = kernel_rounded(pre64, y.dtype)  # what torch's backward (and ours) tests
    if activation == "elu":
        right = y.detach().to(pre64.device).double() > 0 if slope > 0 else p > 0
        return torch.where(right, pre64, (pre64.exp() - 1) * slope)
    if activation == "hardswish":
        return torch.where(p <= -3, pre64 * 0, torch.where(p < 3, pre64 * (pre64 + 3) / 6,
                                                            pre64))
    if activation == "hardsigmoid":
        return torch.where((p > -3) & (p < 3), (pre64 + 3) / 6, pre64 * 0)
    return y_ref


def check_steps(ours, ref, shape, fmt, dtype, steps=3, *, residual=False, z_format=None):
    """`steps` training steps then eval, ours against torch's act(ref(x) [+ z]) in float64:
    y, the grads of x, weight, bias [and z], running stats and num_batches_tracked,
    with every buffer tritonbn allocates poisoned."""
    from tritonbn import reference
    from tritonbn.testing import poisoned_allocations

    scale = 4.0  # values and grads here reach a few units
    for step in range(steps + 1):
        training = step < steps
        ours.train(training)
        ref.train(training)
        x = make_input(shape, dtype, fmt, requires_grad=True)
        x64 = x.detach().double().requires_grad_()
        z = z64 = None
        if residual:
            z = make_input(shape, dtype, z_format or fmt, mean=-0.7, std=1.0, requires_grad=True)
            z64 = z.detach().double().requires_grad_()
        with poisoned_allocations():
            y = ours(x, z)
            dy = make_input(shape, dtype, fmt, mean=0.3, std=1.0)
            y.backward(dy)
        pre64 = ref(x64) + z64 if residual else ref(x64)
        y_ref = reference.activate(pre64, ours.activation, ours._slope())
        kink_graph(pre64, y_ref, y, ours.activation, ours._slope()).backward(dy.double())
        assert y.dtype == dtype and y.shape == x.shape and y.stride() == x.stride()
        assert_close(y, y_ref, dtype, scale)
        assert_close(x.grad, x64.grad, dtype, scale)
        if residual:
            assert z.grad.shape == z.shape
            assert_close(z.grad, z64.grad, dtype, scale)
        if ours.affine:
            # sums over the batch: their size grows with it, so compare relatively
            assert_close(ours.weight.grad, ref.weight.grad, dtype, scale=scale * 10,
                         extra_atol=saved_mean_atol(x64, ref.bias.grad, dtype))
            assert_close(ours.bias.grad, ref.bias.grad, dtype, scale=scale * 10)
            ours.weight.grad = ours.bias.grad = ref.weight.grad = ref.bias.grad = None
        if ours.track_running_stats:
            assert_close(ours.running_mean, ref.running_mean, dtype)
            assert_close(ours.running_var, ref.running_var, dtype, scale)
            assert ours.num_batches_tracked.item() == ref.num_batches_tracked.item()
        else:
            assert ours.running_mean is None and ours.num_batches_tracked is None
