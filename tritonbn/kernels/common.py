"""Tile addressing and per-channel parameter loading shared by all kernels."""
import triton
import triton.language as tl

ACT_NONE = tl.constexpr(0)
ACT_RELU = tl.constexpr(1)


@triton.jit
def channel_block(C, s_c, BLOCK_C: tl.constexpr, INT64: tl.constexpr):
    """Channels of this program: indices, mask, and their memory offsets."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    if INT64:
        coffs = c.to(tl.int64) * s_c
    else:
        coffs = c * s_c
    return c, cmask, coffs


@triton.jit
def tile_range(n_tiles, tiles_per_split):
    """The [start, end) tile indices walked by this program's split."""
    t0 = tl.program_id(1) * tiles_per_split
    t1 = tl.minimum(t0 + tiles_per_split, n_tiles)
    return t0, t1


@triton.jit
def tile_rows(t, OUTER, INNER, n_inner_tiles, s_outer, s_inner,
              BLOCK_M: tl.constexpr, CHANNEL_LAST: tl.constexpr, INT64: tl.constexpr):
    """Memory offsets and validity of the BLOCK_M reduced-axis positions of tile t,
    and the offset of its first position.

    channel-last:  tile t = rows [t*BLOCK_M, (t+1)*BLOCK_M) of the outer axis.
    channel-first: tile t = (o, b), o = t // n_inner_tiles, positions
                   [b*BLOCK_M, (b+1)*BLOCK_M) of the contiguous inner axis.
    """
    m = tl.arange(0, BLOCK_M)
    if INT64:
        t = tl.cast(t, tl.int64)
        m = m.to(tl.int64)
    if CHANNEL_LAST:
        pos = t * BLOCK_M
        base = pos * s_outer
        step = s_outer
        limit = OUTER
    else:
        o = t // n_inner_tiles
        pos = (t - o * n_inner_tiles) * BLOCK_M
        base = o * s_outer + pos * s_inner
        step = s_inner
        limit = INNER
    return base + m * step, pos + m < limit, base


@triton.jit
def channel_params(mean_ptr, s_ptr, w_ptr, b_ptr, c, cmask, eps,
                   FROM_VAR: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                   ACC: tl.constexpr):
    """mean, invstd, weight, bias of the block's channels, in the accumulation dtype.

    FROM_VAR: s_ptr holds a variance (eval mode: running_var) and invstd is
    computed here; otherwise s_ptr holds invstd (training: saved batch stats).
    """
    mean = tl.load(mean_ptr + c, mask=cmask, other=0.0).to(ACC)
    s = tl.load(s_ptr + c, mask=cmask, other=1.0).to(ACC)
    if FROM_VAR:
        invstd = 1.0 / tl.sqrt(s + eps)
    else:
        invstd = s
    if HAS_W:
        w = tl.load(w_ptr + c, mask=cmask, other=1.0).to(ACC)
    else:
        w = tl.zeros_like(mean) + 1.0
    if HAS_B:
        b = tl.load(b_ptr + c, mask=cmask, other=0.0).to(ACC)
    else:
        b = tl.zeros_like(mean)
    return mean, invstd, w, b


@triton.jit
def activate(pre, ACT: tl.constexpr):
    """act(pre). ReLU keeps NaN, as torch.relu does."""
    if ACT == ACT_RELU:
        pre = tl.where(pre <= 0.0, 0.0, pre)
    return pre


@triton.jit
def act_grad(dy, pre, OUT_DTYPE: tl.constexpr, ACT: tl.constexpr):
    """dy * act'(pre). The ReLU mask is taken on the output-dtype value, as torch
    takes it on the rounded output, and passes NaN through as torch does."""
    if ACT == ACT_RELU:
        dy = tl.where(pre.to(OUT_DTYPE).to(pre.dtype) <= 0.0, 0.0, dy)
    return dy
