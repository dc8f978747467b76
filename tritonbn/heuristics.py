"""Launch parameters without tuning: block shape, split count, warps and stages.

Tiles hold about TILE elements: on the GPU enough bytes in flight per program to
stream at bandwidth; under the interpreter (numpy, ~ms per program and per loop
iteration) as few and as large tiles as possible. The split count targets a few
waves of programs on the GPU, so a handful of channels with a long reduced axis
still fills every SM, and on an sm_90 GPU (H100, H200) the statistics kernel's is
a grid of whole waves of the programs its registers let each SM hold
(SM90_REGISTERS, SIZED_BY_WAVES, _sm90_split); under the
interpreter it stays at 2-4 programs, enough to exercise the cross-split combine in
every test.

These are the defaults every launch falls back to (and the only configs the
interpreter uses); tuned configs (tritonbn/tuning) replace them per shape bucket.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from .layout import View


# Host-side integer helpers: triton.cdiv and triton.next_power_of_2 are constexpr
# functions in recent Triton, several µs per host call (issue 14: host time).
def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def pow2(n: int) -> int:
    """The smallest power of two >= n, as triton.next_power_of_2 (0 for n <= 0)."""
    return 1 << (n - 1).bit_length() if n > 0 else 0

# The six kernels with launch parameters of their own, by the name configs are kept under.
TILE_KERNELS = ("stats", "normalize", "bwd_reduce", "dx")  # grid: channel blocks x splits
COMBINE_KERNELS = ("stats_combine", "bwd_combine")         # grid: channel blocks
# what a training forward and a backward launch, in order
PASS_KERNELS = {"fwd": ("stats", "stats_combine", "normalize"),
                "bwd": ("bwd_reduce", "bwd_combine", "dx")}
KERNELS = PASS_KERNELS["fwd"] + PASS_KERNELS["bwd"]  # stage order
REDUCE_KERNELS = ("stats", "bwd_reduce")  # write per-split partials that a combine sums
COMBINE_OF = {"stats_combine": "stats", "bwd_combine": "bwd_reduce"}  # combine: its reduce


@dataclass(frozen=True)
class Config:
    """A tile kernel's launch: BLOCK_M reduced-axis positions x BLOCK_C channels per tile."""
    BLOCK_M: int
    BLOCK_C: int
    split: int  # upper bound on splits of the tile range (the grid's 2nd axis)
    num_warps: int = 4
    num_stages: int = 3


@dataclass(frozen=True)
class CombineConfig:
    """A combine kernel's launch: BLOCK_S splits x BLOCK_C channels per step."""
    BLOCK_S: int
    BLOCK_C: int
    num_warps: int = 4


CONFIG_TYPE = {k: Config for k in TILE_KERNELS} | {k: CombineConfig for k in COMBINE_KERNELS}


def plan(v: View, cfg: Config) -> tuple[tuple[int, int], dict, dict]:
    """Grid, tile arguments and launch meta-parameters for a tile kernel over v."""
    n_inner_tiles = 1 if v.channel_last else cdiv(v.inner, cfg.BLOCK_M)
    n_tiles = n_tiles_of(v, cfg.BLOCK_M)
    per_split = tiles_per_split(n_tiles, cfg.split)
    grid = (cdiv(v.C, cfg.BLOCK_C), cdiv(n_tiles, per_split))  # no empty split
    args = dict(n_inner_tiles=n_inner_tiles, n_tiles=n_tiles, tiles_per_split=per_split)
    meta = dict(BLOCK_M=cfg.BLOCK_M, BLOCK_C=cfg.BLOCK_C, num_warps=cfg.num_warps,
                num_stages=cfg.num_stages)
    return grid, args, meta


def n_tiles_of(v: View, BLOCK_M: int) -> int:
    """Tiles of the reduced axis a tile kernel's splits share."""
    return cdiv(v.outer, BLOCK_M) if v.channel_last else v.outer * cdiv(v.inner, BLOCK_M)


def tiles_per_split(n_tiles: int, split: int) -> int:
    """Tiles each split walks when at most `split` splits share n_tiles; plan() launches
    cdiv(n_tiles, this) splits, so none is empty (fewer than asked where it divides
    unevenly)."""
    return cdiv(n_tiles, max(1, min(split, n_tiles)))


@functools.lru_cache(maxsize=4096)
def split_of(v: View, cfg: Config) -> int:
    """The partials a tile kernel's launch on cfg writes: its grid's second axis (what a
    combine sums, and what its config is selected for)."""
    return plan(v, cfg)[0][1]


def plan_combine(C: int, cfg: CombineConfig) -> tuple[tuple[int], dict]:
    """Grid and launch meta-parameters for a combine kernel over C channels."""
    return (cdiv(C, cfg.BLOCK_C),), dict(BLOCK_S=cfg.BLOCK_S, BLOCK_C=cfg.BLOCK_C,
                                                 num_warps=cfg.num_warps)


@functools.lru_cache(maxsize=None)
def sm_count(device: torch.device) -> int:
    """SMs of a CUDA device; an H100's 132 when planning a launch off the GPU
    (ahead-of-time compile checks)."""
    if device.type != "cuda":
        return 132
    return torch.cuda.get_device_properties(device).multi_processor_count


def programs_per_sm(kernel: str) -> int:
    """Waves of the default split: reductions 4 programs per SM, elementwise 8."""
    return 4 if kernel in REDUCE_KERNELS else 8


def split_for(kernel: str, v: View, BLOCK_C: int, programs: int) -> int:
    """Splits of the reduced axis giving about `programs` programs in all."""
    split = max(1, programs // cdiv(v.C, BLOCK_C))
    if kernel in REDUCE_KERNELS:
        split = min(split, 1024)  # keeps the combine's sweep short
    return split


# Channel-first rows this short (7x7, 8x8 planes) take 8 warps at 2048-element tiles
# (heuristic), and, where they are not 16-byte aligned, flat tiles (ops.flat_tiles)
SHORT_ROWS = 64


@functools.lru_cache(maxsize=4096)
def heuristic(kernel: str, v: View, elem_size: int, device: torch.device, interpret: bool) -> Config:
    """The default launch of a tile kernel (see TILE_KERNELS) over v (memoized: it runs
    before every launch that has no tuned config)."""
    # 2-byte channel-first planes of up to 256 positions (7x7 to 14x14) take 2048 too:
    # the first GPU lease's dataset (H200, fp16 NCHW, batch 256) had dx 1.6x and the
    # reductions 2-4x faster at half the tile, and 4096 held dx at 176 registers
    small_planes = not v.channel_last and v.inner <= 256
    tile = 8192 if interpret else (2048 if elem_size >= 4 or small_planes else 4096)
    if v.channel_last:
        # rows of at most 128 bytes of channels; the rest of the tile along rows
        BLOCK_C = min(pow2(v.C), max(1, 128 // elem_size) if not interpret else 64)
        BLOCK_M = min(pow2(v.outer), max(1, tile // BLOCK_C))
    else:
        BLOCK_M = min(pow2(v.inner), tile)
        BLOCK_C = min(pow2(v.C), max(1, tile // BLOCK_M))
    programs = 4 if interpret else programs_per_sm(kernel) * sm_count(device)
    split = split_for(kernel, v, BLOCK_C, programs)
    # channel-first rows of <= SHORT_ROWS positions (7x7, 8x8) at 2048 elements: 8 warps,
    # 8 elements a thread. At 4 warps (16 a thread, holding 8 channels' parameters) the
    # sm_90 compile of 32x2048x7x7 NCHW bn_relu training gave 116-168 registers (dx,
    # bwd_reduce 168); at 8 warps, the same tile and grid, 64-104 (issue 15)
    short_rows = not v.channel_last and BLOCK_M <= SHORT_ROWS
    num_warps = 8 if BLOCK_M * BLOCK_C >= (2048 if short_rows else 4096) else 4
    if not interpret and _plans_sm90(device):
        split = _sm90_split(kernel, v, BLOCK_M, BLOCK_C, num_warps, elem_size, programs,
                            sm_count(device), split)
    return Config(BLOCK_M, BLOCK_C, split, num_warps)


# Grids sized by occupancy (issue 15). A tile kernel's programs run in waves of the
# programs resident at once, SMs x programs per SM, and a last wave that is partly
# empty leaves SMs idle (the second lease's Nsight Compute, H200: the CL fp16 stats
# kernel at 256x64x56x56 ran 523 programs at 3 per SM, 1.32 waves, at 36 % of DRAM
# bandwidth). Where the registers of the kernel compiled for sm_90 are known
# (SM90_REGISTERS) and it is sized so (SIZED_BY_WAVES), the split is the one nearest
# the programs asked for whose grid fills its waves to within WAVE_SLACK, or runs
# MIN_WAVES waves or more (_sm90_split).
WAVE_SLACK = 0.05
MIN_WAVES = 8
# The kernels whose grids are sized so: those whose registers the table gives for
# every launch. The statistics kernel has no activation and no residual (64 registers
# for each of 6 activations, with and without a residual, in the sm_90 compile of the
# CL fp16 256x64x56x56 layer); normalize, bwd_reduce and dx have them, and their
# registers moved with them (normalize 48-64, dx 78-127, bwd_reduce 74-127: 2 to 5
# programs per SM), so a table of bn_relu's would size bn_add_relu's grids for the
# wrong waves (normalize 1.98 -> 2.38 waves of its own). They keep the programs per SM
# asked for until the table is keyed by activation and residual.
SIZED_BY_WAVES = ("stats",)

# Registers per thread of the tile kernels' default launches compiled for sm_90, by
# Triton version (the GPU machine's 3.6, the CPU's 3.9), then (kernel, channel-last,
# warps, element size, BLOCK_M, BLOCK_C, aligned: the contiguous axis's length a
# multiple of 16, as Triton specializes it): JIT-equal compiles (Triton's binder and
# specialization) of a bn_relu training step over the ResNet-50 set in fp16 and fp32
# (bf16 took fp16's within 3 registers), the launches without the last-program
# combine in them. Registers vary with all of these (32 to 122 for the channel-first
# dx kernel; it was 168 at 7x7 on 4 warps, 64-80 on the 8 and the flat tiles those
# take now, ops.flat_tiles; the 7x7 entries regenerated so in 3.9 and 3.6; a 7x7
# launch with the residual's bit mask stays on 2-D tiles at 76-100).
# tests/compile_sm90.py checks that compiled kernels still hold the programs per SM
# this table gives; the second lease's Nsight Compute counted the same 73 (stats),
# 48 (normalize), 94 (bwd_reduce) and 80 (dx) registers for channels_last fp16 at
# 256x64x56x56, Triton 3.6.
_SM90_REGISTERS_39 = {
    ("bwd_reduce", True, 4, 4, 64, 32, True): 80,
    ("bwd_reduce", True, 8, 2, 64, 64, True): 95,
    ("dx", False, 4, 2, 256, 8, False): 122,
    ("dx", False, 4, 4, 1024, 2, True): 38,
    ("dx", False, 4, 4, 2048, 1, True): 32,
    ("dx", False, 4, 4, 256, 8, False): 116,
    ("dx", False, 8, 2, 64, 32, False): 64,
    ("dx", False, 8, 4, 64, 32, False): 80,
    ("dx", False, 8, 2, 1024, 4, True): 43,
    ("dx", False, 8, 2, 4096, 1, True): 32,
    ("dx", True, 4, 4, 64, 32, True): 68,
    ("dx", True, 8, 2, 64, 64, True): 80,
    ("normalize", False, 4, 2, 256, 8, False): 64,
    ("normalize", False, 4, 4, 1024, 2, True): 32,
    ("normalize", False, 4, 4, 2048, 1, True): 32,
    ("normalize", False, 4, 4, 256, 8, False): 64,
    ("normalize", False, 8, 2, 64, 32, False): 48,
    ("normalize", False, 8, 4, 64, 32, False): 48,
    ("normalize", False, 8, 2, 1024, 4, True): 32,
    ("normalize", False, 8, 2, 4096, 1, True): 32,
    ("normalize", True, 4, 4, 64, 32, True): 48,
    ("normalize", True, 8, 2, 64, 64, True): 48,
    ("stats", True, 4, 4, 64, 32, True): 72,
    ("stats", True, 8, 2, 64, 64, True): 64,
}
SM90_REGISTERS = {
    "3.9": _SM90_REGISTERS_39,
    "3.6": {**_SM90_REGISTERS_39,  # where Triton 3.6 differs
            ("bwd_reduce", True, 8, 2, 64, 64, True): 97,
            ("dx", False, 4, 2, 256, 8, False): 124,
            ("dx", False, 4, 4, 1024, 2, True): 32,
            ("dx", False, 8, 2, 1024, 4, True): 44,
            ("dx", False, 8, 4, 64, 32, False): 74,
            ("normalize", False, 8, 2, 64, 32, False): 40,
            ("stats", True, 8, 2, 64, 64, True): 73},
}


@functools.lru_cache(maxsize=None)
def _plans_sm90(device: torch.device) -> bool:
    """Whether launches on device are planned with sm_90's occupancy: an sm_90 GPU
    (H100, H200), or no GPU (plans made off the GPU are an H100's, as sm_count)."""
    if device.type != "cuda":
        return True
    return torch.cuda.get_device_capability(device) == (9, 0)


@functools.lru_cache(maxsize=None)
def _triton_version() -> str:
    import triton
    return ".".join(triton.__version__.split(".")[:2])


def sm90_key(kernel: str, v: View, cfg, elem_size: int) -> tuple:
    """SM90_REGISTERS' key of a launch of kernel on cfg (BLOCK_M, BLOCK_C, num_warps)
    over v."""
    aligned = (v.C if v.channel_last else v.inner) % 16 == 0
    return (kernel, v.channel_last, cfg.num_warps, min(elem_size, 4), cfg.BLOCK_M, cfg.BLOCK_C,
            aligned)


def sm90_registers(kernel: str, v: View, cfg, elem_size: int) -> int | None:
    """SM90_REGISTERS' entry for the installed Triton of a launch of kernel on cfg
    (BLOCK_M, BLOCK_C, num_warps) over v; None where it has none."""
    return SM90_REGISTERS.get(_triton_version(), {}).get(sm90_key(kernel, v, cfg, elem_size))


def resident(regs: int, num_warps: int) -> int:
    """Programs of num_warps warps at regs registers per thread resident on one sm_90
    SM: 64K registers, allocated per warp in units of 256 (8 a thread), 64 warps,
    32 programs (shared memory: the tile kernels use a few KB, never the limit)."""
    warps_by_regs = 65536 // (cdiv(regs, 8) * 8 * 32)
    return max(1, min(warps_by_regs // num_warps, 64 // num_warps, 32))


def wave_fill(programs: int, slots: int) -> float:
    """The share of its waves' slots (slots: programs resident at once) a grid fills."""
    return programs / (cdiv(programs, slots) * slots)


def whole_waves(programs: int, slots: int) -> bool:
    return programs >= MIN_WAVES * slots or wave_fill(programs, slots) >= 1 - WAVE_SLACK


def wave_rank(programs: int, slots: int, target: int) -> tuple:
    """How a grid of `programs` ranks, lowest first: whole waves of `slots` (whole_waves),
    then the fuller last wave, then the nearer `target` programs by ratio."""
    whole = whole_waves(programs, slots)
    return (not whole, 0.0 if whole else -wave_fill(programs, slots),
            abs(math.log(programs / target)))


def wave_split(n_tiles: int, blocks: int, slots_of, target: int, cap: int):
    """The split of n_tiles tiles (at most cap) whose grid of blocks channel blocks x
    splits ranks first by wave_rank in waves of slots_of(split) programs (None: that
    split is not to be taken); None where none is. Only splits plan() keeps as they
    are count (none empty), up to the first past 4 x target programs and MIN_WAVES
    waves (the next such split is at most twice the last)."""
    best, best_rank = None, None
    for s in range(1, min(n_tiles, cap) + 1):
        slots = slots_of(s)
        if blocks * s > 2 * max(4 * target, MIN_WAVES * (slots or 0)):
            break
        if slots is None or cdiv(n_tiles, tiles_per_split(n_tiles, s)) != s:
            continue
        rank = wave_rank(blocks * s, slots, target)
        if best_rank is None or rank < best_rank:
            best, best_rank = s, rank
    return best


def _sm90_split(kernel, v, BLOCK_M, BLOCK_C, num_warps, elem_size, programs, sms, split):
    """The heuristic's split for an sm_90 GPU of `sms` SMs, in waves (wave_split) of
    the programs SM90_REGISTERS' registers let each SM hold; `split` (asked for
    `programs`) where the table does not know the kernel. A reduce kernel whose
    split takes the last-program combine keeps it (a launch saved; the registers of
    a launch with the combine in it vary with its BLOCK_S and with how the split
    divides, so the table has none), and is otherwise sized among the splits that
    do not take it. Only the kernels in SIZED_BY_WAVES are sized so (see there)."""
    if kernel not in SIZED_BY_WAVES:
        return split
    reduce = kernel in REDUCE_KERNELS
    cfg = Config(BLOCK_M, BLOCK_C, split, num_warps)
    regs = sm90_registers(kernel, v, cfg, elem_size)
    if regs is None or (reduce and last_combine_fits(split_of(v, cfg), BLOCK_C)):
        return split
    slots = resident(regs, num_warps) * sms
    n_tiles = n_tiles_of(v, BLOCK_M)
    s = wave_split(n_tiles, cdiv(v.C, BLOCK_C),
                   lambda s: None if reduce and last_combine_fits(s, BLOCK_C) else slots,
                   programs, 1024 if reduce else n_tiles)
    return split if s is None else s


# The single-program path (kernels/fused.py): a channel block's whole reduced extent
# in one tile. Extents up to FUSED_MAX_EXTENT take it by default (issue 15: at least
# every N·H·W <= 1024; a GPU run sets the threshold). A tile has at most
# FUSED_MAX_ROWS rows (a channel-first row pads H·W to a power of two) and
# FUSED_MAX_TILE elements (registers: 16 warps at the most).
FUSED_MAX_EXTENT = 1024
FUSED_MAX_ROWS = 8192
FUSED_MAX_TILE = 16384


@functools.lru_cache(maxsize=4096)
def fused_tile(v: View, elem_size: int, interpret: bool) -> tuple[int, int, int, int] | None:
    """(BLOCK_M, BLOCK_I, BLOCK_C, num_warps) of the single-program tile over v, or
    None where the whole reduced extent does not fit. Rows: the outer positions
    (channel-last, at least 8: whole mask bytes) or pow2(N) blocks of BLOCK_I >= 8
    spatial positions (channel-first). Channel-last tiles keep >= 32 bytes of
    channels per row (whole DRAM sectors); otherwise about 4096 elements a program
    (8192 under the interpreter, where fewer programs run faster)."""
    if v.channel_last:
        block_i, rows, min_c = 1, max(8, pow2(v.outer)), max(1, 32 // elem_size)
    else:
        block_i = max(8, pow2(v.inner))
        rows, min_c = pow2(v.outer) * block_i, 1
    budget = 8192 if interpret else 4096
    block_c = min(pow2(v.C), max(min_c, budget // rows))
    if rows > FUSED_MAX_ROWS or rows * block_c > FUSED_MAX_TILE:
        return None
    elems = rows * block_c
    return rows, block_i, block_c, 4 if elems <= 2048 else 8 if elems <= 8192 else 16


@functools.lru_cache(maxsize=4096)
def heuristic_combine(C: int, split: int) -> CombineConfig:
    """The default launch of a combine kernel over `split` partials of C channels:
    16 channels a program (64-byte rows of fp32 partials), so that C = 64 runs 4
    programs, not one, and up to 2048 partials a step, so that few dependent L2
    round trips remain (the first GPU lease, H200: one program of 64 channels
    sweeping 528 splits 32 at a time took 39 us, against ~3 us for the others)."""
    block_c = min(pow2(C), 16)
    return CombineConfig(BLOCK_S=min(pow2(split), max(8, 2048 // block_c)), BLOCK_C=block_c)


def last_combine_block_s(split: int, block_c: int) -> int:
    """Partials a step of the last-program combine (the combine run by a reduce
    launch's last program, over that launch's BLOCK_C channels): up to 2048 values
    per step, as heuristic_combine (more raised the CL fp16 stats kernel's registers
    past 80, and its programs per SM from 4 to 3 or fewer, in the sm_90 compile)."""
    return min(pow2(split), max(1, 2048 // block_c))


# The last-program combine is the default where its program sweeps the partials in at
# most this many steps: one program's dependent L2 round trips, after every other
# program of its channel block is done, against a combine launch of its own that
# spreads the channels over several programs (the first GPU lease: 4 programs took
# 12.7 µs over 523 partials of 64 channels, 1 program 39 µs).
LAST_COMBINE_MAX_STEPS = 2


def last_combine_fits(split: int, block_c: int) -> bool:
    """Whether a reduce launch of `split` partials over BLOCK_C channels takes the
    last-program combine by default (see LAST_COMBINE_MAX_STEPS)."""
    return cdiv(split, last_combine_block_s(split, block_c)) <= LAST_COMBINE_MAX_STEPS
