"""Launch parameters without autotuning: a block shape, a split count, warps.

Tiles hold about TILE elements: on the GPU enough bytes in flight per program to
stream at bandwidth; under the interpreter (numpy, ~ms per program and per loop
iteration) as few and as large tiles as possible. The split count targets a few
waves of programs on the GPU, so a handful of channels with a long reduced axis
still fills every SM; under the interpreter it stays at 2-4 programs, enough to
exercise the cross-split combine in every test.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton

from .layout import View


@dataclass(frozen=True)
class Config:
    BLOCK_M: int
    BLOCK_C: int
    split: int  # upper bound on splits of the tile range (the grid's 2nd axis)
    num_warps: int = 4


def plan(v: View, cfg: Config) -> tuple[tuple[int, int], dict, dict]:
    """Grid, tile arguments and launch meta-parameters for a tile kernel over v."""
    if v.channel_last:
        n_inner_tiles = 1
        n_tiles = triton.cdiv(v.outer, cfg.BLOCK_M)
    else:
        n_inner_tiles = triton.cdiv(v.inner, cfg.BLOCK_M)
        n_tiles = v.outer * n_inner_tiles
    per_split = triton.cdiv(n_tiles, max(1, min(cfg.split, n_tiles)))
    split = triton.cdiv(n_tiles, per_split)  # no empty split
    grid = (triton.cdiv(v.C, cfg.BLOCK_C), split)
    args = dict(n_inner_tiles=n_inner_tiles, n_tiles=n_tiles, tiles_per_split=per_split)
    meta = dict(BLOCK_M=cfg.BLOCK_M, BLOCK_C=cfg.BLOCK_C, num_warps=cfg.num_warps)
    return grid, args, meta


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    """SMs of a CUDA device; an H100's 132 when planning a launch off the GPU
    (ahead-of-time compile checks)."""
    if device.type != "cuda":
        return 132
    return torch.cuda.get_device_properties(device).multi_processor_count


def heuristic(kind: str, v: View, elem_size: int, device: torch.device, interpret: bool) -> Config:
    """kind: 'reduce' (stats pass 1, backward pass 1) or 'elementwise' (normalize, dx)."""
    tile = 8192 if interpret else (2048 if elem_size >= 4 else 4096)
    pow2 = triton.next_power_of_2
    if v.channel_last:
        # rows of at most 128 bytes of channels; the rest of the tile along rows
        BLOCK_C = min(pow2(v.C), max(1, 128 // elem_size) if not interpret else 64)
        BLOCK_M = min(pow2(v.outer), max(1, tile // BLOCK_C))
    else:
        BLOCK_M = min(pow2(v.inner), tile)
        BLOCK_C = min(pow2(v.C), max(1, tile // BLOCK_M))
    if interpret:
        programs = 4
    else:
        programs = (4 if kind == "reduce" else 8) * _sm_count(device)
    split = max(1, programs // triton.cdiv(v.C, BLOCK_C))
    if kind == "reduce":
        split = min(split, 1024)  # keeps the combine's sweep short
    num_warps = 8 if BLOCK_M * BLOCK_C >= 4096 else 4
    return Config(BLOCK_M, BLOCK_C, split, num_warps)
