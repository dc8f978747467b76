"""Forward: y = act((x - mean) * invstd * weight + bias [+ z]), one read and one write
(plus one read of the residual z when there is one).

Training passes the batch mean/invstd; eval passes running_mean/running_var
with FROM_VAR so the same kernel serves both. WRITE_MASK also stores, for relu,
leaky_relu and relu6 after a residual add, one bit per element telling backward
whether act'(pre) is 1 (act_keep), so backward never reads z again.
"""
import triton
import triton.language as tl

from .common import (TILE_RANGE, act_keep, activate, channel_block, channel_params, flat_tile,
                     mask_tile, pack_bits, per_tile, tile_ptrs, tile_range, tile_rows)


@triton.jit(do_not_specialize=TILE_RANGE)
def normalize_kernel(
    x_ptr, y_ptr, z_ptr, mask_ptr, mean_ptr, s_ptr, w_ptr, b_ptr,
    C, OUTER, INNER, s_outer, s_c, s_inner, n_inner_tiles, n_tiles, tiles_per_split, eps, slope,
    M_OUTER, M_INNER, ms_outer, ms_c, ms_inner,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, CHANNEL_LAST: tl.constexpr,
    INT64: tl.constexpr, ACC: tl.constexpr, FROM_VAR: tl.constexpr,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACT: tl.constexpr,
    HAS_RES: tl.constexpr, WRITE_MASK: tl.constexpr, FLAT: tl.constexpr,
):
    tl.static_assert(not (FLAT and WRITE_MASK), "the bit mask is written from 2-D tiles")
    if FLAT:  # one run of the block's planes a tile, the parameters per element
        c, cmask, coffs = flat_tile(C, INNER, s_c, BLOCK_M, BLOCK_C, INT64)
    else:
        c, cmask, coffs = channel_block(C, s_c, BLOCK_C, INT64)
    mean, invstd, w, b = channel_params(mean_ptr, s_ptr, w_ptr, b_ptr, c, cmask, eps,
                                        FROM_VAR, HAS_W, HAS_B, ACC)
    scale = per_tile(invstd * w, FLAT)
    mean = per_tile(mean, FLAT)
    b = per_tile(b, FLAT)
    if WRITE_MASK:
        _mc, _mcmask, mcoffs = channel_block(C, ms_c, BLOCK_C, INT64)
    t0, t1 = tile_range(n_tiles, tiles_per_split)
    for t in range(t0, t1):
        offs, rmask, base = tile_rows(t, OUTER, INNER, n_inner_tiles, s_outer, s_inner,
                                      BLOCK_M, CHANNEL_LAST, INT64)
        ptrs, mask = tile_ptrs(offs, rmask, base, coffs, cmask, FLAT)
        x = tl.load(x_ptr + ptrs, mask=mask, other=0.0).to(ACC)
        pre = (x - mean) * scale + b
        if HAS_RES:
            pre += tl.load(z_ptr + ptrs, mask=mask, other=0.0).to(ACC)
        y = activate(pre, slope, ACT)
        tl.store(y_ptr + ptrs, y.to(y_ptr.dtype.element_ty), mask=mask)
        if WRITE_MASK:
            keep = act_keep(pre, y_ptr.dtype.element_ty, ACT) & mask
            moffs, mvalid = mask_tile(t, M_OUTER, M_INNER, n_inner_tiles, ms_outer, ms_inner,
                                      mcoffs, BLOCK_M, CHANNEL_LAST, INT64)
            tl.store(mask_ptr + moffs, pack_bits(keep, BLOCK_M, BLOCK_C),
                     mask=mvalid[:, None] & cmask[None, :])
