"""The Triton kernels themselves: every element written, any layout or tiling,
and no PyTorch fallback under the interpreter."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import tritonbn
import tritonbn.functional as TF
from conftest import DEVICE, TOL, assert_close, make_input
from tritonbn import ops, reference
from tritonbn.heuristics import Config
from tritonbn.testing import poisoned_allocations

FORMATS = {4: torch.channels_last, 5: torch.channels_last_3d}


@pytest.fixture
def poisoned():
    with poisoned_allocations():
        yield


@pytest.mark.parametrize("cfg", [None, Config(BLOCK_M=2, BLOCK_C=2, split=5),
                                 Config(BLOCK_M=8, BLOCK_C=1, split=2)])
@pytest.mark.parametrize("shape,fmt", [((5, 7), None), ((3, 7, 5), None),
                                       ((3, 7, 5, 3), None), ((3, 7, 5, 3), torch.channels_last),
                                       ((2, 7, 3, 2, 3), torch.channels_last_3d)])
def test_every_element_written(poisoned, shape, fmt, cfg):
    """Outputs, partials, stats and grads all start as NaN; none may survive."""
    x = make_input(shape, memory_format=fmt or torch.contiguous_format, requires_grad=True)
    m = tritonbn.BatchNorm1d if len(shape) < 4 else (
        tritonbn.BatchNorm2d if len(shape) == 4 else tritonbn.BatchNorm3d)
    bn = m(shape[1], activation="relu", device=DEVICE)
    with ops.launch_overrides(reduce=cfg, elementwise=cfg):
        y = bn(x)
        y.backward(make_input(shape, memory_format=fmt or torch.contiguous_format))
        bn.eval()
        y_eval = bn(x)
        y_eval.backward(torch.ones_like(y_eval))
    for t in (y, x.grad, bn.weight.grad, bn.bias.grad, bn.running_mean, bn.running_var, y_eval):
        assert not torch.isnan(t).any()


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    n=st.integers(1, 4), c=st.integers(1, 9),
    spatial=st.lists(st.integers(1, 6), min_size=0, max_size=3),
    channels_last=st.booleans(), act=st.sampled_from(list(ops.ACTIVATIONS)),
    residual=st.booleans(),
    affine=st.booleans(), training=st.booleans(),
    block_m=st.sampled_from([None, 1, 2, 4, 16]), block_c=st.sampled_from([1, 2, 4, 16]),
    split=st.integers(1, 6), mean=st.floats(-100, 100), std=st.floats(0.1, 10),
)
# found by hypothesis: 2 values per channel, mean 59, std 0.1 (torch float32 errs as much)
@example(n=2, c=4, spatial=[], channels_last=False, act="relu", residual=False, affine=False,
         training=True, block_m=2, block_c=4, split=1, mean=59.12869054270905,
         std=0.10000000000000002)
def test_property_random_shapes(n, c, spatial, channels_last, act, residual, affine, training,
                                block_m, block_c, split, mean, std):
    shape = (n, c, *spatial)
    count = n
    for s in spatial:
        count *= s
    if training and count == 1:
        return  # torch raises; tested in test_api
    fmt = FORMATS.get(len(shape)) if channels_last else None
    x = make_input(shape, memory_format=fmt or torch.contiguous_format, mean=mean, std=std,
                   requires_grad=True)
    x64 = x.detach().double().requires_grad_()
    w = (torch.rand(c, dtype=torch.float64, device=DEVICE) + 0.5) if affine else None
    b = torch.randn(c, dtype=torch.float64, device=DEVICE) if affine else None
    rm = torch.randn(c, dtype=torch.float64, device=DEVICE) + mean
    rv = torch.rand(c, dtype=torch.float64, device=DEVICE) * std**2 + 0.1
    rm32, rv32 = rm.float(), rv.float()
    # a residual of a few units, contiguous: another memory format than a channels_last x
    z = make_input(shape, mean=-1.0, std=1.0, requires_grad=True) if residual else None
    z64 = z.detach().double().requires_grad_() if residual else None
    cfg = Config(block_m, block_c, split) if block_m else None
    with ops.launch_overrides(reduce=cfg, elementwise=cfg):
        y = TF.batch_norm(x, rm32, rv32, w.float() if affine else None,
                          b.float() if affine else None, training, 0.2, activation=act,
                          residual=z)
        y.backward(torch.ones_like(y))
    y_ref = torch.nn.functional.batch_norm(x64, rm, rv, w, b, training, 0.2)
    y_ref = reference.activate(y_ref + z64 if residual else y_ref, act)
    y_ref.backward(torch.ones_like(y_ref))
    # torch's own float32 result on the same input: what float32 can do here. With
    # few values per channel the batch variance can sit far below std**2 while the
    # mean is large, and then x - mean loses digits in any float32 implementation.
    x32 = x.detach().clone().requires_grad_()
    y32 = torch.nn.functional.batch_norm(x32, rm.float(), rv.float(), w.float() if affine else None,
                                         b.float() if affine else None, training, 0.2)
    y32 = reference.activate(y32 + z.detach() if residual else y32, act)
    y32.backward(torch.ones_like(y32))
    torch_err = lambda a, r: (a.double() - r.double()).abs().max().item()  # noqa: E731
    atol = TOL[torch.float32][0]
    assert y.stride() == x.stride()
    assert_close(y, y_ref, torch.float32, max(8, 4 * torch_err(y32, y_ref) / atol))
    assert_close(rm32, rm, torch.float32, abs(mean) + 1)
    assert_close(rv32, rv, torch.float32, std**2 + 1)
    # dx has near-cancelling terms in training: scale its tolerance with 1/std, and
    # allow up to 4x torch float32's own error
    assert_close(x.grad, x64.grad, torch.float32, max(8 / std, 4 * torch_err(x32.grad, x64.grad) / atol))
    if residual:
        assert_close(z.grad, z64.grad, torch.float32, 8)


@pytest.mark.parametrize("make", [
    lambda: make_input((4, 6, 8, 5))[:, ::2],                      # strided channels
    lambda: make_input((4, 3, 8, 10))[..., ::2],                    # strided spatial
    lambda: make_input((3, 4, 5, 6)).permute(0, 1, 3, 2),           # transposed H/W
    lambda: make_input((8, 3, 4, 4)).permute(2, 1, 0, 3).contiguous().permute(2, 1, 0, 3),
    lambda: make_input((5, 3)).t().contiguous().t(),                # (N, C) column-major
])
def test_other_strides(make):
    x = make().requires_grad_()
    x64 = x.detach().double().requires_grad_()
    C = x.shape[1]
    m = (tritonbn.BatchNorm2d if x.dim() == 4 else tritonbn.BatchNorm1d)(C, activation="relu",
                                                                        device=DEVICE)
    r = (torch.nn.BatchNorm2d if x.dim() == 4 else torch.nn.BatchNorm1d)(
        C, dtype=torch.float64, device=DEVICE)
    y, y_ref = m(x), torch.relu(r(x64))
    assert_close(y, y_ref, torch.float32, 4)
    dy = make_input(tuple(x.shape)).transpose(0, 1).contiguous().transpose(0, 1)  # other strides
    y.backward(dy)
    y_ref.backward(dy.double())
    assert_close(x.grad, x64.grad, torch.float32, 4)
    assert_close(m.running_var, r.running_var, torch.float32)


MORE_ACTS = ["relu6", "hardswish", "hardsigmoid", "mish", "elu", "gelu_tanh"]  # issue 16


@pytest.mark.skipif(DEVICE != "cpu", reason="the interpreter runs on the CPU")
@pytest.mark.parametrize("act", ["relu", *MORE_ACTS])
def test_interpreter_runs_the_triton_kernels(monkeypatch, act):
    """Under TRITON_INTERPRET=1 the kernels run: the PyTorch path is never taken."""
    assert ops.interpreting() and ops.uses_triton(torch.empty(1))

    def forbidden(*args, **kwargs):
        raise AssertionError("PyTorch fallback used under the interpreter")

    monkeypatch.setattr(reference, "batch_norm", forbidden)
    monkeypatch.setattr(reference, "activate", forbidden)
    launched = []
    names = ("stats_partial_kernel", "normalize_kernel", "bwd_dx_kernel", "fused_forward_kernel",
             "fused_backward_kernel")
    for name in names:
        kernel = getattr(ops.K, name)
        monkeypatch.setattr(ops.K, name, _Recorder(kernel, name, launched))
    m = tritonbn.BatchNorm2d(3, activation=act)
    x = make_input((2, 3, 4, 4), requires_grad=True)
    m(x).sum().backward()  # a small shape: the single-program path
    assert launched == ["fused_forward_kernel", "fused_backward_kernel"]
    launched.clear()
    with ops.launch_overrides(path="split"):
        m(x).sum().backward()
    assert launched == ["stats_partial_kernel", "normalize_kernel", "bwd_dx_kernel"]


class _Recorder:
    def __init__(self, kernel, name, log):
        self.kernel, self.name, self.log = kernel, name, log

    def __getitem__(self, grid):
        self.log.append(self.name)
        return self.kernel[grid]


def test_cpu_without_interpreter_uses_torch(monkeypatch):
    """Outside the interpreter a CPU tensor takes the documented plain-PyTorch path,
    with the same semantics (momentum=None included)."""
    monkeypatch.setattr(ops, "interpreting", lambda: False)
    called = []
    real = reference.batch_norm
    monkeypatch.setattr(reference, "batch_norm", lambda *a, **k: called.append(1) or real(*a, **k))
    ours = tritonbn.BatchNorm2d(3, momentum=None, activation="relu")
    ref = torch.nn.BatchNorm2d(3, momentum=None)
    for _ in range(3):
        x = torch.randn(2, 3, 4, 4) + 1
        torch.testing.assert_close(ours(x), torch.relu(ref(x)))
    torch.testing.assert_close(ours.running_var, ref.running_var)
    assert called == [1, 1, 1]


@pytest.mark.parametrize("act", MORE_ACTS)
def test_cpu_without_interpreter_more_activations(monkeypatch, act):
    """The plain-PyTorch path maps each name to torch's function (elu with its alpha,
    gelu_tanh with approximate="tanh"), grads and a residual included."""
    monkeypatch.setattr(ops, "interpreting", lambda: False)
    fn = {"relu6": F.relu6, "hardswish": F.hardswish, "hardsigmoid": F.hardsigmoid,
          "mish": F.mish, "elu": lambda t: F.elu(t, 0.4),
          "gelu_tanh": lambda t: F.gelu(t, approximate="tanh")}[act]
    ours = tritonbn.BatchNorm2d(3, activation=act, alpha=0.4)
    ref = torch.nn.BatchNorm2d(3)
    with torch.no_grad():
        ours.weight.uniform_(1.0, 3.5)
    ref.load_state_dict(ours.state_dict())
    x, z = torch.randn(2, 3, 4, 4) + 1, torch.randn(2, 3, 4, 4)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    y, y_ref = ours(xa, z), fn(ref(xb) + z)
    torch.testing.assert_close(y, y_ref)
    y.backward(z)
    y_ref.backward(z)
    torch.testing.assert_close(xa.grad, xb.grad)


@pytest.mark.parametrize("block_c", [None, 2])
@pytest.mark.parametrize("act,residual", [("relu", True), ("gelu", True), ("silu", False),
                                          ("relu6", True)])
@pytest.mark.parametrize("shape,fmt", [((2, 5, 7, 7), torch.contiguous_format),  # H·W = 49
                                       ((3, 5, 1, 1), torch.channels_last),  # 3 rows of 8
                                       ((11, 5), torch.contiguous_format),
                                       ((2, 5, 3, 2, 3), torch.channels_last_3d),
                                       ((2, 5, 3, 2, 3), torch.contiguous_format)])
def test_single_program_path_edges(monkeypatch, shape, fmt, act, residual, block_c):
    """The single-program kernels where tiles are ragged: spatial extents that are
    not a multiple of 8 (the mask's bytes), fewer rows than a byte, and channel
    blocks that do not divide C (block_c=2 over 5 channels); against torch in float64
    with every buffer poisoned, training then eval."""
    from conftest import check_steps
    from tritonbn import heuristics

    real = heuristics.fused_tile
    if block_c is not None:
        def narrow(v, elem_size, interpret):
            rows, block_i, _, warps = real(v, elem_size, interpret)
            return rows, block_i, block_c, warps
        monkeypatch.setattr(heuristics, "fused_tile", narrow)
    cls = {2: "BatchNorm1d", 4: "BatchNorm2d", 5: "BatchNorm3d"}[len(shape)]
    ours = getattr(tritonbn, cls)(shape[1], activation=act, device=DEVICE)
    ref = getattr(torch.nn, cls)(shape[1], dtype=torch.float64, device=DEVICE)
    with torch.no_grad():
        ours.weight.uniform_(0.5, 1.5)
        ours.bias.uniform_(-0.5, 0.5)
    ref.load_state_dict(ours.state_dict())
    launched = []
    monkeypatch.setattr(ops.K, "fused_forward_kernel",
                        _Recorder(ops.K.fused_forward_kernel, "fwd", launched))
    monkeypatch.setattr(ops.K, "fused_backward_kernel",
                        _Recorder(ops.K.fused_backward_kernel, "bwd", launched))
    with ops.launch_overrides(path="fused"):
        check_steps(ours, ref, shape, fmt, torch.float16, steps=2, residual=residual)
    assert launched[:4] == ["fwd", "bwd", "fwd", "bwd"]  # the path under test really ran


class _FlatRecorder:
    """A tile kernel whose launches log their FLAT argument (passed positionally)."""

    def __init__(self, kernel, log):
        self.kernel, self.log = kernel, log
        self.at = kernel.arg_names.index("FLAT")

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.log.append((self.kernel.__name__, bool(args[self.at])))
            return self.kernel[grid](*args, **kwargs)
        return launch


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("shape", [(3, 8, 7, 7), (2, 5, 3, 3)], ids=["7x7", "3x3"])  # rows of 49, 9
@pytest.mark.parametrize("act,residual,affine",
                         [(a, False, True) for a in ops.ACTIVATIONS]
                         + [("silu", True, True), ("relu", True, True), ("relu", False, False)])
def test_flat_tiles(monkeypatch, shape, dtype, act, residual, affine):
    """normalize and dx on FLAT tiles (ops.flat_tiles: contiguous NCHW whose rows are
    not 16-byte aligned, walked as one run of the block's planes, the parameters per
    element): training then eval, against torch in float64, every buffer poisoned, on
    the split path; channel blocks that do not divide C (5 over 4) and 8 channels that
    do. A launch that writes or reads the bit mask (relu after a residual) keeps 2-D
    tiles."""
    from conftest import check_steps

    log = []
    for name in ("normalize_kernel", "bwd_dx_kernel"):
        monkeypatch.setattr(ops.K, name, _FlatRecorder(getattr(ops.K, name), log))
    cfg = Config(BLOCK_M=64 if shape[-1] == 7 else 16, BLOCK_C=4, split=2)
    ours = tritonbn.BatchNorm2d(shape[1], activation=act, alpha=0.4, affine=affine, device=DEVICE)
    ref = torch.nn.BatchNorm2d(shape[1], affine=affine, dtype=torch.float64, device=DEVICE)
    if affine:
        with torch.no_grad():
            ours.weight.uniform_(0.5, 1.5)
            ours.bias.uniform_(-0.5, 0.5)
    ref.load_state_dict(ours.state_dict())
    with ops.launch_overrides(path="split", elementwise=cfg):
        check_steps(ours, ref, shape, torch.contiguous_format, dtype, steps=2, residual=residual)
    mask = residual and ops.residual_mode(act, True) == ops.RES_MASK
    # 2 training steps and eval: normalize and dx each
    assert sorted(set(log)) == [("bwd_dx_kernel", not mask), ("normalize_kernel", not mask)]
    assert len(log) == 6
