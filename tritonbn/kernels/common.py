"""Tile addressing and per-channel parameter loading shared by all kernels."""
import triton
import triton.language as tl

# activations (ops.ACTIVATIONS maps their names to these)
ACT_NONE = tl.constexpr(0)
ACT_RELU = tl.constexpr(1)
ACT_LEAKY_RELU = tl.constexpr(2)
ACT_SILU = tl.constexpr(3)
ACT_GELU = tl.constexpr(4)
ACT_RELU6 = tl.constexpr(5)
ACT_HARDSWISH = tl.constexpr(6)
ACT_HARDSIGMOID = tl.constexpr(7)
ACT_MISH = tl.constexpr(8)
ACT_ELU = tl.constexpr(9)       # alpha in `slope`
ACT_GELU_TANH = tl.constexpr(10)

# what backward knows of a residual z added before the activation (ops.residual_mode)
RES_NONE = tl.constexpr(0)    # no residual, or no activation: act'(pre) needs no z
RES_RELOAD = tl.constexpr(1)  # read z again and recompute pre (silu, gelu, ...)
RES_MASK = tl.constexpr(2)    # read the bit "act'(pre) == 1" normalize wrote (relu, leaky_relu,
                              # relu6)

SQRT1_2 = tl.constexpr(0.7071067811865476)    # 1 / sqrt(2)
INV_SQRT_2PI = tl.constexpr(0.3989422804014327)  # 1 / sqrt(2 pi)
SQRT_2_PI = tl.constexpr(0.7978845608028654)     # sqrt(2 / pi): tanh gelu's kBeta
GELU_KAPPA = tl.constexpr(0.044715)              # tanh gelu's kKappa


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
def last_to_arrive(counter_ptr):
    """The last-program combine's ticket: True in the last program of this channel
    block (program_id(0)) to get here, which also leaves the block's arrival counter
    at 0 for the next launch. Nothing waits, so no program depends on another being
    resident. The barrier first: every thread's stores of this program's partial are
    done before the release (acq_rel, GPU scope); the barrier after: the acquire,
    made by one thread, comes before every thread's reads of the others' partials
    (which go through L2: .cg loads)."""
    tl.debug_barrier()
    ptr = counter_ptr + tl.program_id(0)
    ticket = tl.atomic_add(ptr, 1, sem="acq_rel", scope="gpu")
    last = ticket == tl.num_programs(1) - 1
    tl.store(ptr, 0, mask=last)
    tl.debug_barrier()
    return last


@triton.jit
def count_batch(nbt_ptr, COUNT_BATCH: tl.constexpr):
    """With COUNT_BATCH, the module's num_batches_tracked += 1, by program 0 of the
    launch (channel block 0), so that a training step needs no add launch of its own.
    Never with MOMENTUM_FROM_NBT, whose programs read the count: the host adds first
    there (ops.forward)."""
    if COUNT_BATCH:
        if tl.program_id(0) == 0:
            tl.store(nbt_ptr, tl.load(nbt_ptr) + 1)


# The tile kernels take tiles_per_split unspecialized: Triton specializes an int
# argument on == 1 and on divisibility by 16, and their registers then changed with
# the split (32 against 48 in the sm_90 compile of the NCHW fp16 normalize kernel),
# so that the occupancy the split is sized by (heuristics.SM90_REGISTERS) would not
# hold for the split it chose.
TILE_RANGE = ["tiles_per_split"]


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
def flat_tile(C, INNER, s_c, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, INT64: tl.constexpr):
    """FLAT tiles (contiguous channel-first planes of INNER <= BLOCK_M positions that are
    not 16-byte aligned): the program's BLOCK_C planes of one outer index are one run
    of BLOCK_C * INNER elements, read as a [BLOCK_M, BLOCK_C] tile row-major (element
    (m, k) is the run's m * BLOCK_C + k), so its loads are as wide as the run is
    aligned. Per element: its channel, its validity and its offset from the outer
    index's start (tile_rows' base); the channel's parameters are gathered by it."""
    c0 = tl.program_id(0) * BLOCK_C
    f = tl.arange(0, BLOCK_M)[:, None] * BLOCK_C + tl.arange(0, BLOCK_C)[None, :]
    valid = f < tl.minimum(C - c0, BLOCK_C) * INNER
    if INT64:
        offs = c0.to(tl.int64) * s_c + f
    else:
        offs = c0 * s_c + f
    return c0 + f // INNER, valid, offs


@triton.jit
def per_tile(p, FLAT: tl.constexpr):
    """A per-channel value shaped for a [BLOCK_M, BLOCK_C] tile: a row of the block's
    channels, or under FLAT (flat_tile) already one per element."""
    if not FLAT:
        p = p[None, :]
    return p


@triton.jit
def tile_ptrs(offs, rmask, base, coffs, cmask, FLAT: tl.constexpr):
    """Offsets and validity of a tile's elements: rows (tile_rows' offs, rmask) by the
    block's channels (coffs, cmask), or under FLAT base + flat_tile's offsets."""
    if FLAT:
        ptrs = base + coffs
        mask = cmask
    else:
        ptrs = offs[:, None] + coffs[None, :]
        mask = rmask[:, None] & cmask[None, :]
    return ptrs, mask


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
    w, b = channel_affine(w_ptr, b_ptr, c, cmask, HAS_W, HAS_B, ACC)
    return mean, invstd, w, b


@triton.jit
def channel_affine(w_ptr, b_ptr, c, cmask, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                   ACC: tl.constexpr):
    """weight and bias of the block's channels (1 and 0 without them), in ACC."""
    if HAS_W:
        w = tl.load(w_ptr + c, mask=cmask, other=1.0).to(ACC)
    else:
        w = tl.zeros(c.shape, ACC) + 1.0
    if HAS_B:
        b = tl.load(b_ptr + c, mask=cmask, other=0.0).to(ACC)
    else:
        b = tl.zeros(c.shape, ACC)
    return w, b


@triton.jit
def per_channel(v, ptr):
    """v (the accumulation dtype) in the element dtype of ptr, a per-channel tensor
    (running stats, dweight, dbias), as torch rounds it: through float32 unless that
    is float64, since c10's Half and BFloat16 are made from a float. Triton's
    interpreter also casts float64 to bfloat16 as an integer (0.35 -> 0)."""
    if ptr.dtype.element_ty != tl.float64:
        v = v.to(tl.float32)
    return v.to(ptr.dtype.element_ty)


@triton.jit
def mask_tile(t, M_OUTER, M_INNER, n_inner_tiles, ms_outer, ms_inner, mcoffs,
              BLOCK_M: tl.constexpr, CHANNEL_LAST: tl.constexpr, INT64: tl.constexpr):
    """Offsets and validity of the [BLOCK_M // 8, BLOCK_C] bytes of the bit mask that
    hold tile t's bits: bit k of byte j is reduced-axis position 8 j + k of the tile.

    The mask is laid out like the data with its reduced axis packed 8 to a byte:
    channel-last (ceil(OUTER / 8), C), channel-first (OUTER, C, ceil(INNER / 8)).
    BLOCK_M is a multiple of 8, so every tile owns whole bytes.
    """
    offs, valid, _ = tile_rows(t, M_OUTER, M_INNER, n_inner_tiles, ms_outer, ms_inner,
                               BLOCK_M // 8, CHANNEL_LAST, INT64)
    return offs[:, None] + mcoffs[None, :], valid


@triton.jit
def pack_bits(keep, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """[BLOCK_M, BLOCK_C] booleans -> [BLOCK_M // 8, BLOCK_C] bytes, 8 rows to a byte."""
    bits = tl.reshape(keep.to(tl.int32), [BLOCK_M // 8, 8, BLOCK_C])
    weights = 1 << tl.arange(0, 8)
    return tl.sum(bits * weights[None, :, None], axis=1).to(tl.uint8)


@triton.jit
def unpack_bits(packed, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """pack_bits undone: [BLOCK_M // 8, BLOCK_C] bytes -> [BLOCK_M, BLOCK_C] booleans."""
    bits = (packed.to(tl.int32)[:, None, :] >> tl.arange(0, 8)[None, :, None]) & 1
    return tl.reshape(bits, [BLOCK_M, BLOCK_C]) != 0


@triton.jit
def clamp6(u):
    """min(max(u, 0), 6) as torch's clamp: NaN stays NaN (relu6, hardswish, hardsigmoid)."""
    return tl.where(u <= 0.0, 0.0, tl.where(u >= 6.0, 6.0, u))


@triton.jit
def tanh_parts(u):
    """(1 + tanh(u), 1 - tanh(u)^2) from exp(-2|u|): neither cancels where tanh(u) is
    near -1 or 1, as 1 - tanh(u) * tanh(u) would (Triton has no tanh; NaN stays NaN)."""
    e = tl.exp(-2.0 * tl.abs(u))
    r = 1.0 / (1.0 + e)
    return tl.where(u < 0.0, 2.0 * e * r, 2.0 * r), 4.0 * e * r * r


@triton.jit
def gelu_tanh_inner(pre):
    """sqrt(2 / pi) (pre + 0.044715 pre^3), tanh gelu's argument of tanh (constexprs on
    the right: the interpreter cannot multiply a constexpr by a tensor)."""
    return (pre + pre * pre * pre * GELU_KAPPA) * SQRT_2_PI


@triton.jit
def tanh_softplus(pre):
    """tanh(softplus(pre)) = n / (n + 2), n = e^pre (e^pre + 2) (Triton has neither tanh
    nor log1p): exactly 1 beyond pre = 20 in fp32 and fp64 alike, so e^pre is taken at
    20 at most (no inf / inf); NaN stays NaN."""
    e = tl.exp(tl.where(pre > 20.0, 20.0, pre))
    n = e * (e + 2.0)
    return n / (n + 2.0)


@triton.jit
def activate(pre, slope, ACT: tl.constexpr):
    """act(pre), each as torch computes it: relu keeps NaN, gelu is the exact erf form,
    gelu_tanh torch's approximate="tanh", elu's alpha is slope."""
    if ACT == ACT_RELU:
        pre = tl.where(pre <= 0.0, 0.0, pre)
    elif ACT == ACT_LEAKY_RELU:
        pre = tl.where(pre > 0.0, pre, pre * slope)
    elif ACT == ACT_SILU:
        pre = pre / (1.0 + tl.exp(-pre))
    elif ACT == ACT_GELU:
        pre = 0.5 * pre * (1.0 + tl.erf(pre * SQRT1_2))
    elif ACT == ACT_RELU6:
        pre = clamp6(pre)
    elif ACT == ACT_HARDSWISH:
        pre = pre * clamp6(pre + 3.0) / 6.0
    elif ACT == ACT_HARDSIGMOID:
        pre = clamp6(pre + 3.0) / 6.0
    elif ACT == ACT_MISH:
        pre = pre * tanh_softplus(pre)
    elif ACT == ACT_ELU:
        pre = tl.where(pre > 0.0, pre, (tl.exp(pre) - 1.0) * slope)
    elif ACT == ACT_GELU_TANH:
        one_plus_t, _ = tanh_parts(gelu_tanh_inner(pre))
        pre = 0.5 * pre * one_plus_t
    return pre


@triton.jit
def rounded(pre, OUT_DTYPE: tl.constexpr):
    """pre as torch's activation would see it, the output dtype's value (in pre's
    dtype): what the branches of act' test, as torch's backward tests its input."""
    return pre.to(OUT_DTYPE).to(pre.dtype)


@triton.jit
def act_keep(pre, OUT_DTYPE: tl.constexpr, ACT: tl.constexpr):
    """For relu, leaky_relu and relu6, whether act'(pre) is 1 (else 0 or slope): the
    test torch's backward makes, on the output-dtype value (relu and relu6 pass NaN
    through; relu6 = hardtanh(0, 6), 1 strictly inside)."""
    p = rounded(pre, OUT_DTYPE)
    if ACT == ACT_RELU:
        keep = ~(p <= 0.0)
    elif ACT == ACT_RELU6:
        keep = ~((p <= 0.0) | (p >= 6.0))
    else:
        keep = p > 0.0
    return keep


@triton.jit
def act_grad_keep(dy, keep, slope, ACT: tl.constexpr):
    """dy * act'(pre) for relu, leaky_relu and relu6, from act_keep(pre)."""
    if ACT == ACT_RELU or ACT == ACT_RELU6:
        dy = tl.where(keep, dy, 0.0)
    elif ACT == ACT_LEAKY_RELU:
        dy = tl.where(keep, dy, dy * slope)
    return dy


@triton.jit
def load_dy_xhat(x_ptr, dy_ptr, z_ptr, mask_ptr, ptrs, mask, moffs, mmask, mean, invstd, scale,
                 b, slope, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr,
                 ACT: tl.constexpr, RES: tl.constexpr):
    """dy' = dy * act'(pre) and xhat of a [BLOCK_M, BLOCK_C] tile at ptrs: act'(pre) from
    the mask's bytes at moffs (valid where mmask) under RES_MASK, else from pre
    recomputed exactly as the forward has it (with z reloaded under RES_RELOAD).
    mean, invstd, scale and b come shaped for the tile (per_tile)."""
    x = tl.load(x_ptr + ptrs, mask=mask, other=0.0).to(ACC)
    dy = tl.load(dy_ptr + ptrs, mask=mask, other=0.0).to(ACC)
    xc = x - mean
    if RES == RES_MASK:
        packed = tl.load(mask_ptr + moffs, mask=mmask, other=0)
        dy = act_grad_keep(dy, unpack_bits(packed, BLOCK_M, BLOCK_C), slope, ACT)
    else:
        pre = xc * scale + b
        if RES == RES_RELOAD:
            pre += tl.load(z_ptr + ptrs, mask=mask, other=0.0).to(ACC)
        dy = act_grad(dy, pre, slope, x_ptr.dtype.element_ty, ACT)
    return dy, xc * invstd


@triton.jit
def act_grad(dy, pre, slope, OUT_DTYPE: tl.constexpr, ACT: tl.constexpr):
    """dy * act'(pre), with torch's formulas; where act' jumps, the branch is torch's
    test (aten's hardswish_backward, hardsigmoid_backward, elu_backward) on the
    output-dtype value, the formula on pre itself."""
    if ACT == ACT_RELU or ACT == ACT_LEAKY_RELU or ACT == ACT_RELU6:
        dy = act_grad_keep(dy, act_keep(pre, OUT_DTYPE, ACT), slope, ACT)
    elif ACT == ACT_SILU:
        sig = 1.0 / (1.0 + tl.exp(-pre))
        dy = dy * sig * (1.0 + pre * (1.0 - sig))
    elif ACT == ACT_GELU:
        cdf = 0.5 * (1.0 + tl.erf(pre * SQRT1_2))
        pdf = tl.exp(-0.5 * pre * pre) * INV_SQRT_2PI
        dy = dy * (cdf + pre * pdf)
    elif ACT == ACT_HARDSWISH:  # 0 up to -3, 1 from 3 (NaN: dy)
        p = rounded(pre, OUT_DTYPE)
        dy = tl.where(p <= -3.0, 0.0, tl.where(p < 3.0, dy * (pre / 3.0 + 0.5), dy))
    elif ACT == ACT_HARDSIGMOID:  # 1/6 strictly inside (-3, 3) (NaN: 0)
        p = rounded(pre, OUT_DTYPE)
        dy = tl.where((p > -3.0) & (p < 3.0), dy * (1.0 / 6.0), 0.0)
    elif ACT == ACT_MISH:
        t = tanh_softplus(pre)
        sig = 1.0 / (1.0 + tl.exp(-pre))
        dy = dy * (t + pre * sig * (1.0 - t * t))
    elif ACT == ACT_ELU:  # alpha e^pre up to 0 (NaN: dy)
        dy = tl.where(rounded(pre, OUT_DTYPE) <= 0.0, dy * slope * tl.exp(pre), dy)
    elif ACT == ACT_GELU_TANH:
        one_plus_t, dt = tanh_parts(gelu_tanh_inner(pre))
        dy = dy * (0.5 * one_plus_t
                   + 0.5 * pre * dt * SQRT_2_PI * (1.0 + pre * pre * (3.0 * GELU_KAPPA)))
    return dy
