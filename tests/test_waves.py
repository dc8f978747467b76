"""Grids sized by occupancy (issue 15): on an sm_90 GPU the heuristic's split gives
each tile kernel a grid of whole waves (or at least MIN_WAVES of them), from the
registers the kernels compile to (heuristics.SM90_REGISTERS; tests/compile_sm90.py
checks that table against the compiler, the GPU check against the GPU). No kernel
runs here: this is the host's arithmetic."""
import csv
import math
import pathlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tritonbn import heuristics
from tritonbn.layout import View, kernel_view
from tritonbn.perf import shapes

ROOT = pathlib.Path(__file__).resolve().parent.parent
CPU = torch.device("cpu")  # plans off the GPU are an H100's: 132 SMs, sm_90


@pytest.fixture(params=sorted(heuristics.SM90_REGISTERS))
def triton_version(request, monkeypatch):
    """The heuristics as they plan under each Triton version the table knows."""
    monkeypatch.setattr(heuristics, "_triton_version", lambda: request.param)
    heuristics.heuristic.cache_clear()
    heuristics.split_of.cache_clear()
    yield request.param
    heuristics.heuristic.cache_clear()
    heuristics.split_of.cache_clear()


def _ncu_rows():
    """(registers per thread, threads per program, programs per SM the registers allow)
    of every kernel in the committed Nsight Compute exports of the GPU leases."""
    rows = []
    for path in sorted(ROOT.glob("perf/results/*/ncu_*.csv")):
        table = [r for r in csv.reader(path.open()) if len(r) > 100]
        head = table[0]
        col = {k: head.index(k) for k in ("launch__registers_per_thread", "launch__block_size",
                                          "launch__occupancy_limit_registers",
                                          "launch__occupancy_limit_warps")}
        for r in table[1:]:
            try:
                rows.append(tuple(int(r[col[k]].replace(",", "")) for k in col))
            except ValueError:
                continue  # the units row
    return rows


def test_resident_programs_as_the_gpu_counted_them():
    """resident() against what Nsight Compute reported on the H200 leases: the
    programs per SM that registers and warps allow, kernel by kernel."""
    rows = _ncu_rows()
    assert len(rows) >= 10, "no Nsight Compute export committed under perf/results"
    for regs, threads, by_regs, by_warps in rows:
        assert heuristics.resident(regs, threads // 32) == min(by_regs, by_warps), (regs, threads)


def _launched(kernel, v, cfg, elem_size):
    """(programs, registers) of the launch the heuristic's cfg makes; registers None for
    a reduce launch with the last-program combine in it (not in the table)."""
    programs = math.prod(heuristics.plan(v, cfg)[0])
    if (kernel in heuristics.REDUCE_KERNELS
            and heuristics.last_combine_fits(heuristics.split_of(v, cfg), cfg.BLOCK_C)):
        return programs, None
    return programs, heuristics.sm90_registers(kernel, v, cfg, elem_size)


def _any_whole(v, cfg, slots, kernel):
    """Whether any split of cfg's tiling (within the reduce kernels' 1024; none empty)
    fills whole waves of slots: where none does, its tiles are too few or too coarse."""
    n_tiles, blocks = heuristics.n_tiles_of(v, cfg.BLOCK_M), -(-v.C // cfg.BLOCK_C)
    cap = 1024 if kernel in heuristics.REDUCE_KERNELS else n_tiles
    return any(heuristics.whole_waves(blocks * s, slots) for s in range(1, min(n_tiles, cap) + 1)
               if -(-n_tiles // -(-n_tiles // s)) == s)  # a split plan() keeps


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_resnet50_grids_fill_whole_waves(triton_version, dtype):
    """The default launch of every kernel sized by waves (SIZED_BY_WAVES) on the
    ResNet-50 set (batch 256 and 32, NCHW and channels_last), but the reduce launches
    that keep the last-program combine:
    the table knows its registers, and its grid is within WAVE_SLACK of whole waves
    of the programs that fit 132 SMs, or MIN_WAVES waves, wherever a split of its
    tiling can be."""
    bad, sized, whole, combined = [], 0, 0, 0
    for case in shapes.cases("resnet50"):
        for fmt in (torch.contiguous_format, torch.channels_last):
            x = torch.empty(case.shape, dtype=dtype, device="meta").to(memory_format=fmt)
            v = kernel_view(x)[1]
            for kernel in heuristics.SIZED_BY_WAVES:
                cfg = heuristics.heuristic(kernel, v, x.element_size(), CPU, False)
                programs, regs = _launched(kernel, v, cfg, x.element_size())
                if regs is None:  # the reduce launches that keep their combine
                    assert kernel in heuristics.REDUCE_KERNELS, (kernel, case.shape, fmt)
                    combined += 1
                    continue
                slots = heuristics.resident(regs, cfg.num_warps) * 132
                sized += case.shape[0] == 256
                if heuristics.whole_waves(programs, slots):
                    whole += case.shape[0] == 256
                elif _any_whole(v, cfg, slots, kernel):
                    bad.append(f"{case.shape} {fmt} {kernel}: {programs} programs in waves of "
                               f"{slots} ({programs / slots:.2f})")
    assert not bad, "\n".join(bad)
    # batch 256: the tilings allow whole waves nearly everywhere (the 7x7 layers, fp32,
    # have too few tiles in places), and the grids take them
    assert whole >= 0.9 * sized, (whole, sized)
    assert combined <= 2 * len(shapes.cases("resnet50")), combined


def test_kernels_not_sized_by_waves_keep_the_old_split():
    """normalize, bwd_reduce and dx: the programs per SM asked for, as before (their
    registers change with the activation and the residual; SIZED_BY_WAVES)."""
    x = torch.empty((256, 64, 56, 56), dtype=torch.float16,
                    device="meta").to(memory_format=torch.channels_last)
    v = kernel_view(x)[1]
    for kernel in set(heuristics.TILE_KERNELS) - set(heuristics.SIZED_BY_WAVES):
        cfg = heuristics.heuristic(kernel, v, 2, CPU, False)
        assert cfg.split == heuristics.split_for(
            kernel, v, cfg.BLOCK_C, heuristics.programs_per_sm(kernel) * 132)


def test_without_registers_the_split_is_the_old_one(monkeypatch):
    """A Triton version the table does not know, or a GPU that is not sm_90: the split
    asked for programs_per_sm programs per SM, as before."""
    monkeypatch.setattr(heuristics, "_triton_version", lambda: "0.0")
    heuristics.heuristic.cache_clear()
    try:
        x = torch.empty((256, 64, 56, 56), dtype=torch.float16,
                        device="meta").to(memory_format=torch.channels_last)
        v = kernel_view(x)[1]
        for kernel in heuristics.TILE_KERNELS:
            cfg = heuristics.heuristic(kernel, v, 2, CPU, False)
            assert cfg.split == heuristics.split_for(
                kernel, v, cfg.BLOCK_C, heuristics.programs_per_sm(kernel) * 132)
    finally:
        heuristics.heuristic.cache_clear()


@settings(max_examples=300, deadline=None)
@given(n_tiles=st.integers(1, 5000), blocks=st.integers(1, 300), slots=st.integers(1, 4224),
       target=st.integers(1, 8448), cap=st.sampled_from([1024, 10 ** 6]),
       limit=st.one_of(st.none(), st.integers(0, 5000)))
def test_wave_split(n_tiles, blocks, slots, target, cap, limit):
    """Its split is one plan() keeps, within the cap and where slots_of gives slots (up
    to limit, as a launch the table knows only so far); whole waves if any such split
    up to the search's end is, and of those the nearest the target; else the fullest
    last wave."""
    s = heuristics.wave_split(n_tiles, blocks,
                              lambda t: None if limit is not None and t > limit else slots,
                              target, cap)
    most = 2 * max(4 * target, heuristics.MIN_WAVES * slots)
    kept = [t for t in range(1, min(n_tiles, cap, 10 ** 9 if limit is None else limit) + 1)
            if blocks * t <= most and -(-n_tiles // -(-n_tiles // t)) == t]
    if not kept:
        assert s is None
        return
    assert s in kept
    # a channel-last view of n_tiles rows of `blocks` channels, a row and a channel a tile
    v = View(n_tiles, blocks, 1, blocks, 1, 1, True)
    assert heuristics.plan(v, heuristics.Config(BLOCK_M=1, BLOCK_C=1, split=s))[0] == (blocks, s)
    whole = [t for t in kept if heuristics.whole_waves(blocks * t, slots)]
    if whole:
        assert heuristics.whole_waves(blocks * s, slots)
        assert abs(math.log(blocks * s / target)) == min(
            abs(math.log(blocks * t / target)) for t in whole)
    else:
        assert heuristics.wave_fill(blocks * s, slots) == max(
            heuristics.wave_fill(blocks * t, slots) for t in kept)
