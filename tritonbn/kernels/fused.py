"""The single-program path: one launch forward and one backward, where a channel
block's whole reduced extent fits in one [BLOCK_M, BLOCK_C] tile of registers.

x is read once forward (stats, normalize, activation, residual, the running-stat
update and the saved mean/invstd in the same program: 2·E·s with no residual) and
x and dy once backward (the sums, then dx, dz, dweight and dbias: 3·E·s), against
3·E·s and 5·E·s and three launches each way on the split path. The grid is one
program per channel block, so it is for small reduced extents (BatchNorm1d over
small batches, late ResNet layers at small batch, eval-sized batches), where
launches and host time cost more than bandwidth.

Rows of the tile: channel-last, row r is outer position r; channel-first, row r is
(n, i) = (r // BLOCK_I, r % BLOCK_I), BLOCK_I a power of two >= 8 covering INNER, so
8 consecutive rows are 8 consecutive positions of one n: the bit mask's bytes
(ops.mask_view) are whole groups of rows, as on the split path.
"""
import triton
import triton.language as tl

from .common import (RES_MASK, act_keep, activate, channel_affine, channel_block,
                     channel_params, count_batch, load_dy_xhat, pack_bits, per_channel)


@triton.jit
def whole_rows(OUTER, INNER, s_outer, s_inner, BLOCK_M: tl.constexpr, BLOCK_I: tl.constexpr,
               CHANNEL_LAST: tl.constexpr, INT64: tl.constexpr):
    """Memory offsets and validity of the BLOCK_M rows that hold the whole reduced
    extent (OUTER x INNER positions)."""
    r = tl.arange(0, BLOCK_M)
    if INT64:
        r = r.to(tl.int64)
    if CHANNEL_LAST:
        return r * s_outer, r < OUTER
    n = r // BLOCK_I
    i = r % BLOCK_I
    return n * s_outer + i * s_inner, (n < OUTER) & (i < INNER)


@triton.jit
def whole_mask_bytes(M_OUTER, M_INNER, ms_outer, ms_inner, mcoffs, BLOCK_M: tl.constexpr,
                     BLOCK_I: tl.constexpr, CHANNEL_LAST: tl.constexpr, INT64: tl.constexpr):
    """Offsets and validity of the [BLOCK_M // 8, BLOCK_C] mask bytes of the tile:
    byte j holds rows 8 j .. 8 j + 7 (pack_bits)."""
    offs, valid = whole_rows(M_OUTER, M_INNER, ms_outer, ms_inner, BLOCK_M // 8,
                             BLOCK_I // 8, CHANNEL_LAST, INT64)
    return offs[:, None] + mcoffs[None, :], valid


@triton.jit
def fused_forward_kernel(
    x_ptr, y_ptr, z_ptr, mask_ptr, w_ptr, b_ptr, mean_ptr, invstd_ptr, rmean_ptr, rvar_ptr,
    nbt_ptr,
    C, OUTER, INNER, s_outer, s_c, s_inner, momentum_hi, momentum_lo, eps, slope,
    M_OUTER, M_INNER, ms_outer, ms_c, ms_inner,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_I: tl.constexpr,
    CHANNEL_LAST: tl.constexpr, INT64: tl.constexpr, ACC: tl.constexpr,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACT: tl.constexpr, HAS_RES: tl.constexpr,
    WRITE_MASK: tl.constexpr, UPDATE_RUNNING: tl.constexpr, MOMENTUM_FROM_NBT: tl.constexpr,
    COUNT_BATCH: tl.constexpr, WRITE_Y: tl.constexpr,
):
    """Training forward of a channel block in one program: batch mean and invstd
    (stored for backward), the running stats updated, and with WRITE_Y y = act((x -
    mean) * invstd * w + b [+ z]) stored (without it, the statistics alone: the
    torch.compile op that only takes them), with WRITE_MASK the bit of act'(pre) == 1;
    with COUNT_BATCH num_batches_tracked += 1 (count_batch)."""
    count_batch(nbt_ptr, COUNT_BATCH)
    c, cmask, coffs = channel_block(C, s_c, BLOCK_C, INT64)
    offs, rmask = whole_rows(OUTER, INNER, s_outer, s_inner, BLOCK_M, BLOCK_I, CHANNEL_LAST,
                             INT64)
    mask = rmask[:, None] & cmask[None, :]
    ptrs = offs[:, None] + coffs[None, :]
    x = tl.load(x_ptr + ptrs, mask=mask, other=0.0).to(ACC)
    # shifted by the first value per channel: 1e4 + randn sums like randn
    shift = tl.load(x_ptr + coffs, mask=cmask, other=0.0).to(ACC)
    n = tl.cast(OUTER, ACC) * tl.cast(INNER, ACC)
    mean = shift + tl.sum(tl.where(mask, x - shift[None, :], 0.0), axis=0) / n
    xc = tl.where(mask, x - mean[None, :], 0.0)
    var = tl.sum(xc * xc, axis=0) / n
    invstd = 1.0 / tl.sqrt(var + eps)
    tl.store(mean_ptr + c, mean, mask=cmask)
    tl.store(invstd_ptr + c, invstd, mask=cmask)
    if UPDATE_RUNNING:
        if MOMENTUM_FROM_NBT:  # momentum=None: cumulative average, 1/num_batches_tracked
            factor = 1.0 / tl.load(nbt_ptr).to(ACC)
        else:
            factor = tl.cast(momentum_hi, ACC) + tl.cast(momentum_lo, ACC)
        rmean = tl.load(rmean_ptr + c, mask=cmask, other=0.0).to(ACC)
        rvar = tl.load(rvar_ptr + c, mask=cmask, other=0.0).to(ACC)
        rmean = (1.0 - factor) * rmean + factor * mean
        rvar = (1.0 - factor) * rvar + factor * (var * (n / (n - 1.0)))
        tl.store(rmean_ptr + c, per_channel(rmean, rmean_ptr), mask=cmask)
        tl.store(rvar_ptr + c, per_channel(rvar, rvar_ptr), mask=cmask)
    if WRITE_Y:
        w, b = channel_affine(w_ptr, b_ptr, c, cmask, HAS_W, HAS_B, ACC)
        pre = xc * (invstd * w)[None, :] + b[None, :]
        if HAS_RES:
            pre += tl.load(z_ptr + ptrs, mask=mask, other=0.0).to(ACC)
        y = activate(pre, slope, ACT)
        tl.store(y_ptr + ptrs, y.to(y_ptr.dtype.element_ty), mask=mask)
        if WRITE_MASK:
            _mc, _mcmask, mcoffs = channel_block(C, ms_c, BLOCK_C, INT64)
            moffs, mvalid = whole_mask_bytes(M_OUTER, M_INNER, ms_outer, ms_inner, mcoffs,
                                             BLOCK_M, BLOCK_I, CHANNEL_LAST, INT64)
            keep = act_keep(pre, y_ptr.dtype.element_ty, ACT) & mask
            tl.store(mask_ptr + moffs, pack_bits(keep, BLOCK_M, BLOCK_C),
                     mask=mvalid[:, None] & cmask[None, :])


@triton.jit
def fused_backward_kernel(
    x_ptr, dy_ptr, z_ptr, mask_ptr, dx_ptr, dz_ptr, mean_ptr, s_ptr, w_ptr, b_ptr, dw_ptr,
    db_ptr,
    C, OUTER, INNER, s_outer, s_c, s_inner, eps, slope,
    M_OUTER, M_INNER, ms_outer, ms_c, ms_inner,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_I: tl.constexpr,
    CHANNEL_LAST: tl.constexpr, INT64: tl.constexpr, ACC: tl.constexpr,
    FROM_VAR: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACT: tl.constexpr,
    RES: tl.constexpr, TRAINING: tl.constexpr, WRITE_DX: tl.constexpr, WRITE_DZ: tl.constexpr,
    HAS_DW: tl.constexpr, HAS_DB: tl.constexpr,
):
    """Backward of a channel block in one program: dy' = dy * act'(pre), the sums
    sum dy' (dbias) and sum dy' * xhat (dweight), then dx (training: with the
    statistics' part) and dz = dy'."""
    c, cmask, coffs = channel_block(C, s_c, BLOCK_C, INT64)
    mean, invstd, w, b = channel_params(mean_ptr, s_ptr, w_ptr, b_ptr, c, cmask, eps,
                                        FROM_VAR, HAS_W, HAS_B, ACC)
    scale = invstd * w
    offs, rmask = whole_rows(OUTER, INNER, s_outer, s_inner, BLOCK_M, BLOCK_I, CHANNEL_LAST,
                             INT64)
    mask = rmask[:, None] & cmask[None, :]
    ptrs = offs[:, None] + coffs[None, :]
    moffs = 0
    mmask = False
    if RES == RES_MASK:
        _mc, _mcmask, mcoffs = channel_block(C, ms_c, BLOCK_C, INT64)
        moffs, mvalid = whole_mask_bytes(M_OUTER, M_INNER, ms_outer, ms_inner, mcoffs, BLOCK_M,
                                         BLOCK_I, CHANNEL_LAST, INT64)
        mmask = mvalid[:, None] & cmask[None, :]
    dy, xhat = load_dy_xhat(x_ptr, dy_ptr, z_ptr, mask_ptr, ptrs, mask, moffs, mmask,
                            mean[None, :], invstd[None, :], scale[None, :], b[None, :], slope,
                            BLOCK_M, BLOCK_C, ACC, ACT, RES)
    dy = tl.where(mask, dy, 0.0)
    xhat = tl.where(mask, xhat, 0.0)
    sum_dy = tl.sum(dy, axis=0)
    sum_dy_xhat = tl.sum(dy * xhat, axis=0)
    if HAS_DW:
        tl.store(dw_ptr + c, per_channel(sum_dy_xhat, dw_ptr), mask=cmask)
    if HAS_DB:
        tl.store(db_ptr + c, per_channel(sum_dy, db_ptr), mask=cmask)
    if WRITE_DZ:
        tl.store(dz_ptr + ptrs, dy.to(dz_ptr.dtype.element_ty), mask=mask)
    if WRITE_DX:
        if TRAINING:
            n = tl.cast(OUTER, ACC) * tl.cast(INNER, ACC)
            dy = dy - (sum_dy / n)[None, :] - xhat * (sum_dy_xhat / n)[None, :]
        tl.store(dx_ptr + ptrs, (dy * scale[None, :]).to(dx_ptr.dtype.element_ty), mask=mask)
