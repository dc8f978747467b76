"""Forward: y = act((x - mean) * invstd * weight + bias), one read and one write.

Training passes the batch mean/invstd; eval passes running_mean/running_var
with FROM_VAR so the same kernel serves both.
"""
import triton
import triton.language as tl

from .common import activate, channel_block, channel_params, tile_range, tile_rows


@triton.jit
def normalize_kernel(
    x_ptr, y_ptr, mean_ptr, s_ptr, w_ptr, b_ptr,
    C, OUTER, INNER, s_outer, s_c, s_inner, n_inner_tiles, n_tiles, tiles_per_split, eps,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, CHANNEL_LAST: tl.constexpr,
    INT64: tl.constexpr, ACC: tl.constexpr, FROM_VAR: tl.constexpr,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACT: tl.constexpr,
):
    c, cmask, coffs = channel_block(C, s_c, BLOCK_C, INT64)
    mean, invstd, w, b = channel_params(mean_ptr, s_ptr, w_ptr, b_ptr, c, cmask, eps,
                                        FROM_VAR, HAS_W, HAS_B, ACC)
    scale = invstd * w
    t0, t1 = tile_range(n_tiles, tiles_per_split)
    for t in range(t0, t1):
        offs, rmask, _ = tile_rows(t, OUTER, INNER, n_inner_tiles, s_outer, s_inner,
                                BLOCK_M, CHANNEL_LAST, INT64)
        mask = rmask[:, None] & cmask[None, :]
        ptrs = offs[:, None] + coffs[None, :]
        x = tl.load(x_ptr + ptrs, mask=mask, other=0.0).to(ACC)
        y = activate((x - mean[None, :]) * scale[None, :] + b[None, :], ACT)
        tl.store(y_ptr + ptrs, y.to(y_ptr.dtype.element_ty), mask=mask)
