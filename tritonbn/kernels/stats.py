"""Per-channel statistics: partial Welford/Chan reduction, then the combine.

pass 1  stats_partial_kernel   grid (channel blocks, splits)
        partials[0, split, c] = mean, [1, split, c] = M2, [2, split, c] = count
pass 2  stats_combine_kernel   grid (channel blocks,)
        mean, invstd (saved for backward) and the running-stat update, in place;
        or (WRITE_PARTIAL) this process's own (mean, M2, count) as one partial,
        which SyncBatchNorm gathers from every process and combines again here.

With COMBINE, pass 2 needs no launch of its own: the last program of each channel
block to finish its partial (an arrival counter per channel block) runs the same
combine, in split order, and resets the counter (the last-program combine).

With COUNT_BATCH the combine also counts the batch in the module's
num_batches_tracked (+= 1, in channel block 0's combine), so that a training step
launches no add of its own (issue 14).
"""
import triton
import triton.language as tl

from .common import (TILE_RANGE, channel_block, count_batch, last_to_arrive, per_channel,
                     tile_range, tile_rows)


@triton.jit(do_not_specialize=TILE_RANGE)
def stats_partial_kernel(
    x_ptr, partials_ptr, mean_ptr, invstd_ptr, rmean_ptr, rvar_ptr, nbt_ptr, counter_ptr,
    C, OUTER, INNER, s_outer, s_c, s_inner, n_inner_tiles, n_tiles, tiles_per_split,
    momentum_hi, momentum_lo, eps,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, CHANNEL_LAST: tl.constexpr,
    INT64: tl.constexpr, ACC: tl.constexpr, COMBINE: tl.constexpr, BLOCK_S: tl.constexpr,
    UPDATE_RUNNING: tl.constexpr, MOMENTUM_FROM_NBT: tl.constexpr, COUNT_BATCH: tl.constexpr,
):
    c, cmask, coffs = channel_block(C, s_c, BLOCK_C, INT64)
    t0, t1 = tile_range(n_tiles, tiles_per_split)
    # Shift by the first value of this program's range, per channel, so the sums
    # below are of x - shift: 1e4 + randn sums like randn and keeps its digits.
    first_offs, first_mask, first = tile_rows(t0, OUTER, INNER, n_inner_tiles, s_outer, s_inner,
                                              BLOCK_M, CHANNEL_LAST, INT64)
    shift = tl.load(x_ptr + first + coffs, mask=cmask, other=0.0).to(ACC)
    # Welford per lane: each of the tile's BLOCK_M x BLOCK_C positions keeps its own
    # count (per row: a row is valid for every channel or none), mean and M2, in
    # registers, so the loop has no cross-warp reduction and no barrier (the first
    # GPU lease: a tl.sum per tile held channel-last stats to 14% of DRAM bandwidth).
    rn = tl.zeros([BLOCK_M], ACC)
    lmean = tl.zeros([BLOCK_M, BLOCK_C], ACC)
    lm2 = tl.zeros([BLOCK_M, BLOCK_C], ACC)
    for t in range(t0, t1):
        offs, rmask, _ = tile_rows(t, OUTER, INNER, n_inner_tiles, s_outer, s_inner,
                                BLOCK_M, CHANNEL_LAST, INT64)
        mask = rmask[:, None] & cmask[None, :]
        x = tl.load(x_ptr + offs[:, None] + coffs[None, :], mask=mask, other=0.0).to(ACC)
        valid = rmask.to(ACC)
        rn += valid
        delta = tl.where(mask, x - shift[None, :] - lmean, 0.0)
        lmean += delta * (valid / tl.maximum(rn, 1.0))[:, None]
        lm2 += delta * tl.where(mask, x - shift[None, :] - lmean, 0.0)
    # Chan's combine of the lanes, once: n, the mean, and M2 about it.
    n = tl.sum(rn, axis=0) + tl.zeros([BLOCK_C], ACC)
    mean = tl.sum(lmean * rn[:, None], axis=0) / tl.maximum(n, 1.0)
    d = lmean - mean[None, :]
    m2 = tl.sum(lm2 + d * d * rn[:, None], axis=0)
    split_offs = tl.program_id(1) * C + c
    plane = tl.num_programs(1) * C
    tl.store(partials_ptr + split_offs, shift + mean, mask=cmask)
    tl.store(partials_ptr + plane + split_offs, m2, mask=cmask)
    tl.store(partials_ptr + 2 * plane + split_offs, n, mask=cmask)
    if COMBINE:
        if last_to_arrive(counter_ptr):
            combine_stats(partials_ptr, mean_ptr, invstd_ptr, rmean_ptr, rvar_ptr, nbt_ptr,
                          partials_ptr, partials_ptr, c, cmask, C, tl.num_programs(1),
                          momentum_hi, momentum_lo, eps, BLOCK_S, BLOCK_C, UPDATE_RUNNING,
                          MOMENTUM_FROM_NBT, False, False, COUNT_BATCH, ACC)


@triton.jit
def stats_combine_kernel(
    partials_ptr, mean_ptr, invstd_ptr, rmean_ptr, rvar_ptr, nbt_ptr, stats_ptr, count_ptr,
    C, SPLIT, momentum_hi, momentum_lo, eps,
    BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, UPDATE_RUNNING: tl.constexpr,
    MOMENTUM_FROM_NBT: tl.constexpr, WRITE_PARTIAL: tl.constexpr, STORE_COUNT: tl.constexpr,
    COUNT_BATCH: tl.constexpr, ACC: tl.constexpr,
):
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    combine_stats(partials_ptr, mean_ptr, invstd_ptr, rmean_ptr, rvar_ptr, nbt_ptr, stats_ptr,
                  count_ptr, c, c < C, C, SPLIT, momentum_hi, momentum_lo, eps, BLOCK_S, BLOCK_C,
                  UPDATE_RUNNING, MOMENTUM_FROM_NBT, WRITE_PARTIAL, STORE_COUNT, COUNT_BATCH, ACC)


@triton.jit
def combine_stats(
    partials_ptr, mean_ptr, invstd_ptr, rmean_ptr, rvar_ptr, nbt_ptr, stats_ptr, count_ptr,
    c, cmask, C, SPLIT, momentum_hi, momentum_lo, eps,
    BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, UPDATE_RUNNING: tl.constexpr,
    MOMENTUM_FROM_NBT: tl.constexpr, WRITE_PARTIAL: tl.constexpr, STORE_COUNT: tl.constexpr,
    COUNT_BATCH: tl.constexpr, ACC: tl.constexpr,
):
    """Pass 2 for channels c: the partials [3, SPLIT, C] combined, in split order. Reads
    the partials through L2 (.cg): under the last-program combine other programs
    wrote them during this launch. COUNT_BATCH: num_batches_tracked += 1 (count_batch)."""
    count_batch(nbt_ptr, COUNT_BATCH)
    plane = SPLIT * C
    # Chan's parallel combine in one sweep, in split order: each step's BLOCK_S partials
    # combined (their mean about split 0's, then M2 about theirs), then merged into the
    # running (n, mean, M2); every M2 term is non-negative. The mean itself is
    # shift + sum(n_s * (mean_s - shift)) / n.
    shift = tl.load(partials_ptr + c, mask=cmask, other=0.0, cache_modifier=".cg")  # split 0
    n = tl.zeros([BLOCK_C], ACC)
    weighted = tl.zeros([BLOCK_C], ACC)
    cmean = tl.zeros([BLOCK_C], ACC)  # the running combined mean, about shift
    m2 = tl.zeros([BLOCK_C], ACC)
    for s0 in range(0, SPLIT, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        mask = (s < SPLIT)[:, None] & cmask[None, :]
        offs = s[:, None] * C + c[None, :]
        pmean = tl.load(partials_ptr + offs, mask=mask, other=0.0, cache_modifier=".cg")
        pm2 = tl.load(partials_ptr + plane + offs, mask=mask, other=0.0, cache_modifier=".cg")
        pn = tl.load(partials_ptr + 2 * plane + offs, mask=mask, other=0.0, cache_modifier=".cg")
        dev = tl.where(mask, pmean - shift[None, :], 0.0)
        nb = tl.sum(pn, axis=0)
        wb = tl.sum(pn * dev, axis=0)
        meanb = wb / tl.maximum(nb, 1.0)
        d = tl.where(mask, dev - meanb[None, :], 0.0)
        m2b = tl.sum(pm2 + pn * d * d, axis=0)
        total = n + nb
        delta = meanb - cmean
        frac = nb / tl.maximum(total, 1.0)
        cmean += delta * frac
        m2 += m2b + delta * delta * n * frac
        n = total
        weighted += wb
    n = tl.where(cmask, n, 2.0)  # lanes past C: no 0/0 in the mean or n / (n - 1)
    mean = shift + weighted / n
    if WRITE_PARTIAL:  # the partials layout, one split: [0] mean, [1] M2, [2] count
        tl.store(stats_ptr + c, mean, mask=cmask)
        tl.store(stats_ptr + C + c, m2, mask=cmask)
        tl.store(stats_ptr + 2 * C + c, n, mask=cmask)
    else:
        if STORE_COUNT:  # the values per channel, all partials together (SyncBatchNorm's dx)
            tl.store(count_ptr + c, n, mask=cmask)
        var = m2 / n
        tl.store(mean_ptr + c, mean, mask=cmask)
        tl.store(invstd_ptr + c, 1.0 / tl.sqrt(var + eps), mask=cmask)
        if UPDATE_RUNNING:
            if MOMENTUM_FROM_NBT:
                # momentum=None: cumulative average, factor 1/num_batches_tracked,
                # read on the device so the host never syncs.
                factor = 1.0 / tl.load(nbt_ptr).to(ACC)
            else:
                # a float64 momentum arrives as two float32 halves (kernel float args are fp32)
                factor = tl.cast(momentum_hi, ACC) + tl.cast(momentum_lo, ACC)
            rmean = tl.load(rmean_ptr + c, mask=cmask, other=0.0).to(ACC)
            rvar = tl.load(rvar_ptr + c, mask=cmask, other=0.0).to(ACC)
            unbiased = var * (n / (n - 1.0))  # n: the count summed over every partial
            rmean = (1.0 - factor) * rmean + factor * mean
            rvar = (1.0 - factor) * rvar + factor * unbiased
            tl.store(rmean_ptr + c, per_channel(rmean, rmean_ptr), mask=cmask)
            tl.store(rvar_ptr + c, per_channel(rvar, rvar_ptr), mask=cmask)
