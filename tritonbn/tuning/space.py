"""What is tuned: one search space per kernel, and the shape buckets configs are kept under.

A bucket is (kernel, dtype, tiling, C, the reduced extent rounded up to a power of
two, and for channel-first tilings the contiguous spatial extent rounded the same
way). A model with many input sizes thus tunes a handful of buckets, not one per
shape. Any config is correct for any shape (tiles are masked, splits clamped);
the bucket only decides which one is fast.

Tile kernels are searched in two rounds, so the search stays near 30 timings
per kernel and bucket rather than the ~1000 of the full product:
1. the tile: SPACE's tile sizes x contiguous run lengths x num_warps, at the
   default num_stages and the default number of programs per SM;
2. the launch, for the best tile: num_stages x programs per SM (the split).
Combine kernels (a sweep over split x C partials) take their small product at once.
"""
from __future__ import annotations

import dataclasses

import torch

from ..heuristics import (KERNELS, TILE_KERNELS, CombineConfig, Config, pow2, programs_per_sm,
                          split_for)
from ..layout import View

_TILE = dict(
    tile=(2048, 4096, 8192),          # elements per tile, BLOCK_M * BLOCK_C
    channel_last_bytes=(64, 128, 256),  # BLOCK_C * elem_size: one row's run of channels
    channel_first_bytes=(512, 2048, 8192),  # BLOCK_M * elem_size: run along the spatial axis
    num_warps=(4, 8),
    num_stages=(1, 2, 3, 4),
)
SPACE = {
    "stats": _TILE | dict(programs_per_sm=(1, 2, 4, 8, 16)),
    "bwd_reduce": _TILE | dict(programs_per_sm=(1, 2, 4, 8, 16)),
    "normalize": _TILE | dict(programs_per_sm=(2, 4, 8, 16, 32)),
    "dx": _TILE | dict(programs_per_sm=(2, 4, 8, 16, 32)),
    "stats_combine": dict(BLOCK_S=(8, 32), BLOCK_C=(32, 64, 128), num_warps=(2, 4)),
    "bwd_combine": dict(BLOCK_S=(8, 32), BLOCK_C=(32, 64, 128), num_warps=(2, 4)),
}
assert set(SPACE) == set(KERNELS)

DTYPE_NAMES = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32",
               torch.float64: "float64"}
TILINGS = ("channel_last", "channel_first")


def bucket(kernel: str, dtype: torch.dtype, v: View) -> str:
    """The key a config is kept under, e.g. 'stats|float16|channel_last|256|1048576|1'."""
    tiling = TILINGS[0] if v.channel_last else TILINGS[1]
    inner = 1 if v.channel_last else pow2(v.inner)
    return f"{kernel}|{DTYPE_NAMES[dtype]}|{tiling}|{v.C}|{pow2(v.count)}|{inner}"


def parse_bucket(key: str) -> str:
    """The kernel of a well-formed bucket key; ValueError otherwise."""
    parts = key.split("|")
    if len(parts) != 6:
        raise ValueError(f"bucket {key!r}: expected 6 '|'-separated fields")
    kernel, dtype, tiling, *sizes = parts
    if kernel not in KERNELS:
        raise ValueError(f"bucket {key!r}: unknown kernel {kernel!r}")
    if dtype not in DTYPE_NAMES.values() or tiling not in TILINGS:
        raise ValueError(f"bucket {key!r}: unknown dtype or tiling")
    if not all(s.isdigit() and int(s) > 0 for s in sizes):
        raise ValueError(f"bucket {key!r}: sizes must be positive integers")
    return kernel


def _pow2_at_most(n: int) -> int:
    return 1 << (max(1, n).bit_length() - 1)


def tile_candidates(kernel: str, v: View, elem_size: int, sms: int, base: Config) -> list[Config]:
    """Round 1 for a tile kernel: tile shapes and warps, default stages and split."""
    sp = SPACE[kernel]
    out = []
    for tile in sp["tile"]:
        runs = sp["channel_last_bytes" if v.channel_last else "channel_first_bytes"]
        for run in runs:
            contig = _pow2_at_most(run // elem_size)
            if v.channel_last:
                BLOCK_C = min(contig, pow2(v.C))
                BLOCK_M = min(max(1, tile // BLOCK_C), pow2(v.outer))
            else:
                BLOCK_M = min(contig, pow2(v.inner), tile)
                BLOCK_C = min(max(1, tile // BLOCK_M), pow2(v.C))
            split = split_for(kernel, v, BLOCK_C, programs_per_sm(kernel) * sms)
            for num_warps in sp["num_warps"]:
                out.append(Config(BLOCK_M, BLOCK_C, split, num_warps, base.num_stages))
    return _unique([base] + out)


def launch_candidates(kernel: str, v: View, sms: int, best: Config) -> list[Config]:
    """Round 2 for a tile kernel: stages and programs per SM around the best tile."""
    sp = SPACE[kernel]
    out = [dataclasses.replace(best, num_stages=stages,
                               split=split_for(kernel, v, best.BLOCK_C, per_sm * sms))
           for stages in sp["num_stages"] for per_sm in sp["programs_per_sm"]]
    return _unique([best] + out)


def combine_candidates(kernel: str, C: int, split: int, base: CombineConfig) -> list[CombineConfig]:
    """A combine kernel's space, blocks clamped to the split x C partials."""
    sp = SPACE[kernel]
    out = [CombineConfig(min(bs, pow2(split)), min(bc, pow2(C)), w)
           for bs in sp["BLOCK_S"] for bc in sp["BLOCK_C"] for w in sp["num_warps"]]
    return _unique([base] + out)


def _unique(configs: list) -> list:
    return list(dict.fromkeys(configs))


def check_config(kernel: str, cfg) -> None:
    """ValueError unless cfg is a launchable config of kernel's type."""
    typ = Config if kernel in TILE_KERNELS else CombineConfig
    if type(cfg) is not typ:
        raise ValueError(f"{kernel}: expected a {typ.__name__}, got {type(cfg).__name__}")
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if type(value) is not int or value < 1:
            raise ValueError(f"{kernel}: {f.name} must be a positive integer, got {value!r}")
        if f.name.startswith("BLOCK_") and value & (value - 1):
            raise ValueError(f"{kernel}: {f.name}={value} is not a power of two")
    if cfg.num_warps not in (1, 2, 4, 8, 16, 32):
        raise ValueError(f"{kernel}: num_warps={cfg.num_warps} is not a power of two <= 32")
    blocks = cfg.BLOCK_M * cfg.BLOCK_C if typ is Config else cfg.BLOCK_S * cfg.BLOCK_C
    if blocks > 2**16:
        raise ValueError(f"{kernel}: a block of {blocks} elements is over 65536")
    if typ is Config and cfg.num_stages > 8:
        raise ValueError(f"{kernel}: num_stages={cfg.num_stages} is over 8")

