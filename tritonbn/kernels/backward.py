"""Backward, with dy' = dy * act'(pre) recomputed from x and the saved stats
(and, after a residual add, from z again or from the bit mask normalize wrote).

pass 1  bwd_reduce_kernel   partials[0, split, c] = sum dy', [1, split, c] = sum dy' * xhat
pass 2  bwd_combine_kernel  sums[0, c], sums[1, c]; dbias = sum dy', dweight = sum dy' * xhat
        (or, with COMBINE, in bwd_reduce's last program of each channel block, as stats.py)
dx      bwd_dx_kernel       training: dx = w * invstd * (dy' - sum dy'/M - xhat * sum dy'xhat/M)
                            (SyncBatchNorm: the sums and M over every process)
                            eval:     dx = w * invstd * dy'
                            and dz = dy', the residual's grad, in the same pass
"""
import triton
import triton.language as tl

from .common import (RES_MASK, TILE_RANGE, channel_block, channel_params, flat_tile,
                     last_to_arrive, load_dy_xhat, mask_tile, per_channel, per_tile, tile_ptrs,
                     tile_range, tile_rows)


@triton.jit
def tile_dy_xhat(x_ptr, dy_ptr, z_ptr, mask_ptr, t, ptrs, mask, cmask, mean, invstd, scale, b,
                 slope, M_OUTER, M_INNER, n_inner_tiles, ms_outer, ms_inner, mcoffs,
                 BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, CHANNEL_LAST: tl.constexpr,
                 INT64: tl.constexpr, ACC: tl.constexpr, ACT: tl.constexpr, RES: tl.constexpr):
    """load_dy_xhat of tile t: its mask bytes (mask_tile) where RES_MASK reads them."""
    moffs = 0
    mmask = False
    if RES == RES_MASK:
        moffs, mvalid = mask_tile(t, M_OUTER, M_INNER, n_inner_tiles, ms_outer, ms_inner,
                                  mcoffs, BLOCK_M, CHANNEL_LAST, INT64)
        mmask = mvalid[:, None] & cmask[None, :]
    return load_dy_xhat(x_ptr, dy_ptr, z_ptr, mask_ptr, ptrs, mask, moffs, mmask, mean, invstd,
                        scale, b, slope, BLOCK_M, BLOCK_C, ACC, ACT, RES)


@triton.jit(do_not_specialize=TILE_RANGE)
def bwd_reduce_kernel(
    x_ptr, dy_ptr, z_ptr, mask_ptr, mean_ptr, s_ptr, w_ptr, b_ptr, partials_ptr, sums_ptr,
    dw_ptr, db_ptr, counter_ptr,
    C, OUTER, INNER, s_outer, s_c, s_inner, n_inner_tiles, n_tiles, tiles_per_split, eps, slope,
    M_OUTER, M_INNER, ms_outer, ms_c, ms_inner,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, CHANNEL_LAST: tl.constexpr,
    INT64: tl.constexpr, ACC: tl.constexpr, FROM_VAR: tl.constexpr,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACT: tl.constexpr, RES: tl.constexpr,
    COMBINE: tl.constexpr, BLOCK_S: tl.constexpr, HAS_DW: tl.constexpr, HAS_DB: tl.constexpr,
):
    c, cmask, coffs = channel_block(C, s_c, BLOCK_C, INT64)
    mean, invstd, w, b = channel_params(mean_ptr, s_ptr, w_ptr, b_ptr, c, cmask, eps,
                                        FROM_VAR, HAS_W, HAS_B, ACC)
    scale = invstd * w
    _mc, _mcmask, mcoffs = channel_block(C, ms_c, BLOCK_C, INT64)
    # per-lane sums in registers, reduced across the tile once after the loop: no
    # cross-warp reduction (and no barrier) per tile (the first GPU lease)
    acc_dy = tl.zeros([BLOCK_M, BLOCK_C], ACC)
    acc_dy_xhat = tl.zeros([BLOCK_M, BLOCK_C], ACC)
    t0, t1 = tile_range(n_tiles, tiles_per_split)
    for t in range(t0, t1):
        offs, rmask, _ = tile_rows(t, OUTER, INNER, n_inner_tiles, s_outer, s_inner,
                                BLOCK_M, CHANNEL_LAST, INT64)
        mask = rmask[:, None] & cmask[None, :]
        ptrs = offs[:, None] + coffs[None, :]
        dy, xhat = tile_dy_xhat(x_ptr, dy_ptr, z_ptr, mask_ptr, t, ptrs, mask, cmask,
                                mean[None, :], invstd[None, :], scale[None, :], b[None, :],
                                slope, M_OUTER, M_INNER, n_inner_tiles, ms_outer, ms_inner,
                                mcoffs, BLOCK_M, BLOCK_C, CHANNEL_LAST, INT64, ACC, ACT, RES)
        acc_dy += dy
        acc_dy_xhat += dy * xhat
    sum_dy = tl.sum(acc_dy, axis=0)
    sum_dy_xhat = tl.sum(acc_dy_xhat, axis=0)
    split_offs = tl.program_id(1) * C + c
    plane = tl.num_programs(1) * C
    tl.store(partials_ptr + split_offs, sum_dy, mask=cmask)
    tl.store(partials_ptr + plane + split_offs, sum_dy_xhat, mask=cmask)
    if COMBINE:
        if last_to_arrive(counter_ptr):
            combine_grads(partials_ptr, sums_ptr, dw_ptr, db_ptr, c, cmask, C,
                          tl.num_programs(1), BLOCK_S, BLOCK_C, HAS_DW, HAS_DB, ACC)


@triton.jit
def bwd_combine_kernel(
    partials_ptr, sums_ptr, dw_ptr, db_ptr, C, SPLIT,
    BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, HAS_DW: tl.constexpr,
    HAS_DB: tl.constexpr, ACC: tl.constexpr,
):
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    combine_grads(partials_ptr, sums_ptr, dw_ptr, db_ptr, c, c < C, C, SPLIT, BLOCK_S, BLOCK_C,
                  HAS_DW, HAS_DB, ACC)


@triton.jit
def combine_grads(partials_ptr, sums_ptr, dw_ptr, db_ptr, c, cmask, C, SPLIT,
                  BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, HAS_DW: tl.constexpr,
                  HAS_DB: tl.constexpr, ACC: tl.constexpr):
    """Pass 2 for channels c: the partials [2, SPLIT, C] summed in split order (read
    through L2, .cg, as stats.combine_stats)."""
    plane = SPLIT * C
    sum_dy = tl.zeros([BLOCK_C], ACC)
    sum_dy_xhat = tl.zeros([BLOCK_C], ACC)
    for s0 in range(0, SPLIT, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        mask = (s < SPLIT)[:, None] & cmask[None, :]
        offs = s[:, None] * C + c[None, :]
        sum_dy += tl.sum(tl.load(partials_ptr + offs, mask=mask, other=0.0,
                                 cache_modifier=".cg"), axis=0)
        sum_dy_xhat += tl.sum(tl.load(partials_ptr + plane + offs, mask=mask, other=0.0,
                                      cache_modifier=".cg"), axis=0)
    tl.store(sums_ptr + c, sum_dy, mask=cmask)
    tl.store(sums_ptr + C + c, sum_dy_xhat, mask=cmask)
    if HAS_DW:
        tl.store(dw_ptr + c, per_channel(sum_dy_xhat, dw_ptr), mask=cmask)
    if HAS_DB:
        tl.store(db_ptr + c, per_channel(sum_dy, db_ptr), mask=cmask)


@triton.jit(do_not_specialize=TILE_RANGE)
def bwd_dx_kernel(
    x_ptr, dy_ptr, z_ptr, mask_ptr, dx_ptr, dz_ptr, mean_ptr, s_ptr, w_ptr, b_ptr, sums_ptr,
    count_ptr,
    C, OUTER, INNER, s_outer, s_c, s_inner, n_inner_tiles, n_tiles, tiles_per_split, eps, slope,
    M_OUTER, M_INNER, ms_outer, ms_c, ms_inner, count,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, CHANNEL_LAST: tl.constexpr,
    INT64: tl.constexpr, ACC: tl.constexpr, FROM_VAR: tl.constexpr,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACT: tl.constexpr, RES: tl.constexpr,
    TRAINING: tl.constexpr, WRITE_DX: tl.constexpr, WRITE_DZ: tl.constexpr,
    COUNT_FROM_PTR: tl.constexpr, FLAT: tl.constexpr,
):
    tl.static_assert(not (FLAT and RES == RES_MASK), "the bit mask is read in 2-D tiles")
    if FLAT:  # one run of the block's planes a tile, the parameters per element
        c, cmask, coffs = flat_tile(C, INNER, s_c, BLOCK_M, BLOCK_C, INT64)
    else:
        c, cmask, coffs = channel_block(C, s_c, BLOCK_C, INT64)
    mean, invstd, w, b = channel_params(mean_ptr, s_ptr, w_ptr, b_ptr, c, cmask, eps,
                                        FROM_VAR, HAS_W, HAS_B, ACC)
    scale = per_tile(invstd * w, FLAT)
    mean, invstd, b = per_tile(mean, FLAT), per_tile(invstd, FLAT), per_tile(b, FLAT)
    _mc, _mcmask, mcoffs = channel_block(C, ms_c, BLOCK_C, INT64)
    if TRAINING:
        if COUNT_FROM_PTR:  # SyncBatchNorm: the count over every process, per channel
            m = tl.load(count_ptr + c, mask=cmask, other=1.0).to(ACC)
        else:
            m = tl.cast(count, ACC)
        mean_dy = per_tile(tl.load(sums_ptr + c, mask=cmask, other=0.0).to(ACC) / m, FLAT)
        mean_dy_xhat = per_tile(tl.load(sums_ptr + C + c, mask=cmask, other=0.0).to(ACC) / m,
                                FLAT)
    t0, t1 = tile_range(n_tiles, tiles_per_split)
    for t in range(t0, t1):
        offs, rmask, base = tile_rows(t, OUTER, INNER, n_inner_tiles, s_outer, s_inner,
                                      BLOCK_M, CHANNEL_LAST, INT64)
        ptrs, mask = tile_ptrs(offs, rmask, base, coffs, cmask, FLAT)
        dy, xhat = tile_dy_xhat(x_ptr, dy_ptr, z_ptr, mask_ptr, t, ptrs, mask, cmask, mean, invstd,
                                scale, b, slope, M_OUTER, M_INNER, n_inner_tiles, ms_outer,
                                ms_inner, mcoffs, BLOCK_M, BLOCK_C, CHANNEL_LAST, INT64, ACC,
                                ACT, RES)
        if WRITE_DZ:
            tl.store(dz_ptr + ptrs, dy.to(dz_ptr.dtype.element_ty), mask=mask)
        if WRITE_DX:
            if TRAINING:
                dy = dy - mean_dy - xhat * mean_dy_xhat
            tl.store(dx_ptr + ptrs, (dy * scale).to(dx_ptr.dtype.element_ty), mask=mask)
