"""The GPU smoke subset (marker ``gpu_smoke``): each kernel family compiled once
per kind of launch that matters, on realistic shapes on the GPU and on small
analogues here, against torch.nn in float64 with every tritonbn buffer poisoned.

`perf/gpu_check.sh` runs `pytest -m gpu_smoke` as its first stage, in about 90 s
on an H100 with pytest-xdist: the whole suite compiles hundreds of variants and
would not finish in a lease. The subset covers every tiling (channel-last and
channel-first, 1-D/2-D/3-D), every dtype, every activation, both residual modes
(the 1-bit mask and the re-read z), eval, momentum=None, 64-bit offsets, forced
small tiles and splits, both paths (split, and single-program where the reduced
extent is <= 1024), and the small edge cases (one channel, two values per
channel, odd C, H*W = 49). Other tests marked gpu_smoke: CUDA-graph replay,
Inductor, no host sync (test_compile.py, test_api.py), and SyncBatchNorm's
training step with its NCCL collectives captured in a CUDA graph, eager and
compiled, on one GPU (test_distributed.py).
"""
import pytest
import torch
from torch import nn

import tritonbn
from conftest import DEVICE, check_steps
from tritonbn import ops
from tritonbn.heuristics import Config

pytestmark = pytest.mark.gpu_smoke

CL = {4: torch.channels_last, 5: torch.channels_last_3d}
F16, BF16, F32, F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64

# (id, GPU shape, CPU shape, channels_last, dtype, activation, residual, momentum)
CASES = [
    ("resnet_cl_fp16_relu", (256, 64, 56, 56), (3, 6, 4, 3), True, F16, "relu", False, 0.1),
    ("7x7_nchw_fp16_relu", (32, 2048, 7, 7), (2, 9, 7, 7), False, F16, "relu", False, 0.1),
    ("nchw_bf16_relu_mask", (32, 256, 56, 56), (2, 5, 4, 4), False, BF16, "relu", True, 0.1),
    ("cl_fp32_silu_reload", (32, 512, 28, 28), (2, 5, 3, 3), True, F32, "silu", True, None),
    ("cl_bf16_leaky_mask", (32, 1024, 14, 14), (2, 7, 3, 2), True, BF16, "leaky_relu", True, 0.1),
    ("ncl_fp16_gelu", (20, 6, 65536), (3, 6, 300), False, F16, "gelu", False, 0.1),
    ("nc_fp32_leaky", (4096, 1024), (40, 11), False, F32, "leaky_relu", False, None),
    ("nc_fp16_none_res", (256, 4096), (9, 19), False, F16, None, True, 0.1),
    ("ndhwc_fp16_none", (8, 32, 8, 16, 16), (2, 5, 3, 2, 3), True, F16, None, False, 0.1),
    ("ncdhw_bf16_gelu_reload", (4, 16, 8, 16, 16), (2, 4, 3, 2, 3), False, BF16, "gelu", True, 0.1),
    ("one_channel", (2, 1, 3, 3), (2, 1, 3, 3), False, F32, "relu", False, 0.1),
    ("two_values", (2, 37, 1, 1), (2, 37, 1, 1), True, F16, "relu", True, 0.1),
    ("odd_c_cl_fp16", (32, 37, 56, 56), (2, 37, 5, 5), True, F16, "silu", False, 0.1),
    ("fp64_cl_gelu", (8, 24, 14, 14), (2, 6, 3, 3), True, F64, "gelu", True, 0.1),
    # the single-program path (reduced extent <= 1024): channel-last rows, and
    # channel-first 7x7 planes with the residual's bit mask
    ("fused_nc_fp16", (1024, 512), (64, 19), False, F16, "relu", False, None),
    ("fused_7x7_nchw_mask", (16, 256, 7, 7), (2, 6, 7, 7), False, BF16, "relu", True, 0.1),
]


def _modules(shape, dtype, act, momentum):
    C = shape[1]
    cls = {2: "BatchNorm1d", 3: "BatchNorm1d", 4: "BatchNorm2d", 5: "BatchNorm3d"}[len(shape)]
    param = F64 if dtype == F64 else F32
    ours = getattr(tritonbn, cls)(C, momentum=momentum, activation=act, device=DEVICE,
                                  dtype=param)
    ref = getattr(nn, cls)(C, momentum=momentum, device=DEVICE, dtype=F64)
    with torch.no_grad():
        ours.weight.uniform_(0.5, 1.5)
        ours.bias.uniform_(-0.5, 0.5)
    ref.load_state_dict(ours.state_dict())
    return ours, ref


@pytest.mark.parametrize("gpu_shape,cpu_shape,cl,dtype,act,residual,momentum",
                         [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_smoke_training_then_eval(gpu_shape, cpu_shape, cl, dtype, act, residual, momentum):
    shape = gpu_shape if DEVICE == "cuda" else cpu_shape
    fmt = CL[len(shape)] if cl else torch.contiguous_format
    ours, ref = _modules(shape, dtype, act, momentum)
    check_steps(ours, ref, shape, fmt, dtype, steps=2, residual=residual)


@pytest.mark.parametrize("forced", [dict(int64=True),
                                    dict(reduce=Config(BLOCK_M=8, BLOCK_C=4, split=7),
                                         elementwise=Config(BLOCK_M=16, BLOCK_C=2, split=3))],
                         ids=["int64_offsets", "small_tiles_splits"])
@pytest.mark.parametrize("cl", [True, False], ids=["cl", "nchw"])
def test_smoke_forced_launches(forced, cl):
    """64-bit offsets, and tiles and splits that do not divide the shape (masked
    edges, several splits per channel block, the mask's whole-byte tiles)."""
    shape = (4, 40, 9, 9) if DEVICE == "cuda" else (2, 5, 4, 3)
    fmt = torch.channels_last if cl else torch.contiguous_format
    ours, ref = _modules(shape, F16, "relu", 0.1)
    with ops.launch_overrides(**forced):
        check_steps(ours, ref, shape, fmt, F16, steps=1, residual=True)


def test_smoke_empty_batch_and_eval_only():
    """An empty batch gives an empty output; a module never trained runs eval from
    its initial running stats, forward and backward."""
    ours, ref = _modules((2, 8, 4, 4), F32, "relu", 0.1)
    empty = torch.empty(0, 8, 4, 4, device=DEVICE, requires_grad=True)
    y = ours(empty)
    y.sum().backward()
    ref(empty.detach().double())  # torch counts the empty batch too
    assert y.shape == empty.shape and empty.grad.shape == empty.shape
    ours.eval(), ref.eval()
    check_steps(ours, ref, (16, 8, 28, 28) if DEVICE == "cuda" else (2, 8, 3, 3),
                torch.channels_last, F32, steps=0)


@pytest.mark.skipif(DEVICE != "cuda", reason="compiled kernels exist on a GPU only")
@pytest.mark.parametrize("shape,cl,residual", [((32, 256, 14, 14), True, True),
                                               ((16, 64, 7, 7), False, False)],
                         ids=["split_cl_mask", "fused_nchw"])
def test_smoke_fast_launch_equals_the_jit(monkeypatch, shape, cl, residual):
    """Training steps launched through the kept compiled kernels (ops._go) give
    bit for bit what the same steps launched through Triton's JIT give: y, every
    grad and the running stats; and the fast launches did happen."""
    fmt = torch.channels_last if cl else torch.contiguous_format
    results = []
    for fast in (False, True):
        monkeypatch.setattr(ops, "_FAST_LAUNCH", fast)
        ops._plans.clear()
        torch.manual_seed(0)
        m = tritonbn.BatchNorm2d(shape[1], activation="relu", device=DEVICE)
        out = []
        for _ in range(3):
            x = torch.randn(shape, device=DEVICE, dtype=F16).to(memory_format=fmt) + 1.5
            x.requires_grad_()
            z = torch.randn_like(x, requires_grad=True) if residual else None
            y = m(x, z)
            y.backward(torch.randn_like(y))
            out += [y, x.grad, m.weight.grad.clone(), m.bias.grad.clone()]
            out += [z.grad] if residual else []
            m.weight.grad = m.bias.grad = None
        out += [m.running_mean, m.running_var]
        kept = [p.compiled for p in ops._plans.values() if hasattr(p, "compiled")]
        assert all(not c for c in kept) if not fast else any(kept)
        results.append(out)
    for a, b in zip(*results):
        assert torch.equal(a, b)


@pytest.mark.skipif(DEVICE != "cuda", reason="CUDA streams")
def test_smoke_last_program_combine_on_two_streams_at_once():
    """The split path's last-program combine, two BatchNorms launched on two streams
    at once (each stream its own arrival counters, ops._counter): bit for bit what
    each gives alone, and the counters are left at 0."""
    shape = (32, 256, 28, 28)
    torch.manual_seed(0)
    xs = [torch.randn(shape, device=DEVICE, dtype=F16).to(memory_format=torch.channels_last)
          + 1.5 for _ in range(2)]
    dys = [torch.randn_like(x) for x in xs]

    def steps(i, out):
        m = tritonbn.BatchNorm2d(shape[1], activation="relu", device=DEVICE)
        for _ in range(3):
            x = xs[i].detach().requires_grad_()
            y = m(x)
            y.backward(dys[i])
            out += [y, x.grad, m.weight.grad.clone()]
            m.weight.grad = m.bias.grad = None
        out += [m.running_mean, m.running_var]

    with ops.launch_overrides(path="split", combine="last"):
        alone = [[], []]
        for i in range(2):
            steps(i, alone[i])
        together = [[], []]
        streams = [torch.cuda.Stream() for _ in range(2)]
        torch.cuda.synchronize()
        for i, s in enumerate(streams):
            with torch.cuda.stream(s):
                steps(i, together[i])
        torch.cuda.synchronize()
    for a, b in zip(alone[0] + alone[1], together[0] + together[1]):
        assert torch.equal(a, b)
    assert len(ops._counters) >= 2
    assert all(int(c.abs().sum()) == 0 for c in ops._counters.values())


@pytest.mark.skipif(DEVICE != "cuda", reason="compiled kernels exist on a GPU only")
@pytest.mark.parametrize("shape,cl", [((256, 64, 56, 56), True), ((256, 256, 14, 14), False)],
                         ids=["cl", "nchw"])
def test_smoke_grids_fill_the_waves_the_registers_allow(shape, cl):
    """On an sm_90 GPU (H100, H200): a training step's tile kernels, compiled by this
    GPU's Triton, hold as many programs per SM as heuristics.SM90_REGISTERS says, and
    the grids of those sized by waves (SIZED_BY_WAVES) fill whole waves of them (issue
    15); the launches with the last-program combine in them are not in the table."""
    from tritonbn import heuristics, tuning
    from tritonbn.layout import kernel_view

    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the registers table is sm_90's")
    ops._plans.clear()
    fmt = torch.channels_last if cl else torch.contiguous_format
    m = tritonbn.BatchNorm2d(shape[1], activation="relu", device=DEVICE)
    x = (torch.randn(shape, device=DEVICE, dtype=F16) + 1.5).to(memory_format=fmt)
    x.requires_grad_()
    with tuning.heuristics_only():  # a tuned config's split is its own
        for _ in range(2):
            m(x).backward(torch.randn(shape, device=DEVICE, dtype=F16).to(memory_format=fmt))
    sms, checked, bad = heuristics.sm_count(x.device), 0, []
    names = {"stats": "stats", "normalize": "normalize", "reduce": "bwd_reduce", "dx": "dx"}
    v = kernel_view(x)[1]
    for p in ops._plans.values():
        for launch, (_, k) in getattr(p, "compiled", {}).items():
            if launch not in names:  # stats_last, reduce_last, combine, fused
                continue
            grid = getattr(p, launch)[0]
            warps = k.metadata.num_warps
            cfg = heuristics.heuristic(names[launch], v, x.element_size(), x.device, False)
            assert cfg.num_warps == warps  # the heuristic's launch, not a tuned one
            table = heuristics.sm90_registers(names[launch], v, cfg, x.element_size())
            per_sm = heuristics.resident(k.n_regs, warps)
            checked += 1
            if table is None or heuristics.resident(table, warps) != per_sm:
                bad.append(f"{launch}: {k.n_regs} registers, the table {table}")
            elif (names[launch] in heuristics.SIZED_BY_WAVES
                  and not heuristics.whole_waves(grid[0] * grid[1], per_sm * sms)):
                bad.append(f"{launch}: grid {grid}, {per_sm} programs per SM, {sms} SMs")
    assert checked >= 2 and not bad, bad
