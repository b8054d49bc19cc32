"""Triton kernels of the GPU backend (launched by `normkit.backends.gpu_launch`).

Every call is written over *sub-items*: the smallest runs of elements that share one weight
channel and one statistics item (`gpu_launch.Geometry` says how a plan maps onto them).
  - 'mid' memory (A, NSUB, S): sub q owns x[:, q, :] (BatchNorm NCHW, InstanceNorm, GroupNorm).
  - 'cols' memory (P, Q, L): sub p*L + l owns x[p, :, l] (channels_last BatchNorm / GroupNorm).
Item = sub // J (J subs per item), weight channel = sub % C.
  - 'rows' memory (M, L): LayerNorm, one item per row, weight per column.

Launches: a 'mid' item of at most `gpu_launch.ITEM_MAX_BYTES` is normalized whole by one
program (mid_item_*): two passes over the item, the second served from L2 because few items are
in flight at once, so memory sees x read once forward and x, dy once backward. Otherwise the
forward is partials -> merge (+ per-sub coefficients) -> elementwise apply, and the backward
partials -> coefficients -> apply, with a fixed-order column sum for dweight / dbias when
several subs share a channel.

Statistics are taken of x - K (K = the item's first element, so large means keep their
precision): per-lane Welford in the partials kernels, per-block centred sums in mid_item_*,
merged with Chan's formula in a fixed order (a split count fixed by the shape): no atomics,
bitwise reproducible. Accumulation in
float32 (float64 for float64 input): the accumulation dtype is the dtype of the partial /
coefficient buffers. Float scalars arrive as float32 (hi, lo) pairs so float64 keeps eps exact
(Inductor passes them as float64 scalars: their sums are cast to the working dtype).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _chan(n1, m1, q1, n2, m2, q2):
    """Chan et al.: (count, mean, M2) of the union of two disjoint sets."""
    n = n1 + n2
    w = tl.where(n > 0, n2 / tl.where(n > 0, n, 1.0), 0.0)
    d = m2 - m1
    return n, m1 + d * w, q1 + q2 + d * d * n1 * w


@triton.jit
def _combine_lanes(n, m, q, axis: tl.constexpr):
    """(count, mean, M2) of the union of the lanes along `axis`: the count-weighted mean of
    the lane means, then M2 = sum(q) + sum(n * (lane mean - mean)^2) (centred, no cancellation)."""
    total = tl.sum(n, axis)
    safe = tl.where(total > 0, total, 1.0)
    mean = tl.sum(n * m, axis) / safe
    d = m - tl.expand_dims(mean, axis)
    return total, mean, tl.sum(q, axis) + tl.sum(n * d * d, axis)


@triton.jit
def _welford(n, m, q, x, mask):
    """One Welford step per lane; masked lanes are left unchanged."""
    n_new = n + tl.where(mask, 1.0, 0.0)
    d = tl.where(mask, x - m, 0.0)
    m = m + d / tl.where(n_new > 0, n_new, 1.0)
    q = q + d * tl.where(mask, x - m, 0.0)
    return n_new, m, q


@triton.jit
def _rstd(var, eps_hi, eps_lo):
    """1 / sqrt(var + eps), correctly rounded."""
    eps = (tl.zeros_like(var) + eps_hi + eps_lo).to(var.dtype)  # Inductor passes float64
    if var.dtype == tl.float64:
        rstd = 1.0 / tl.sqrt(var + eps)
    else:
        rstd = tl.div_rn(tl.full(var.shape, 1.0, var.dtype), tl.sqrt_rn(var + eps))
    return rstd


@triton.jit
def _item_first(item, IPP, PSTRIDE, ISTRIDE):
    """Offset of an item's first element: (item // IPP) * PSTRIDE + (item % IPP) * ISTRIDE.
    That element is the item's shift K: statistics are taken of x - K, exact for data near K,
    so a mean far larger than the spread costs no accuracy (the mean is kept as the pair
    K, mean(x - K))."""
    return (item // IPP) * PSTRIDE + (item % IPP) * ISTRIDE


@triton.jit
def _accumulate(n, m, q, x_ptr, dy_ptr, addr, mask, shift, shifted_mean,
                BACKWARD: tl.constexpr):
    """One tile into the lane accumulators: Welford (n, m, q) of x - K, or BACKWARD the
    sums (m: dy, q: dy * (x - mean)) with mean = K + shifted_mean."""
    acc = n.dtype
    xs = tl.load(x_ptr + addr, mask=mask, other=0.0).to(acc) - shift
    if BACKWARD:
        dy = tl.load(dy_ptr + addr, mask=mask, other=0.0).to(acc)
        m += dy
        q += dy * tl.where(mask, xs - shifted_mean, 0.0)
    else:
        n, m, q = _welford(n, m, q, xs, mask)
    return n, m, q


@triton.jit
def _store_partials(part_ptr, idx, total, n, m, q, mask, BACKWARD: tl.constexpr):
    """The lanes (axis 0) of one program's accumulators as partial idx of `part_ptr`."""
    if BACKWARD:
        tl.store(part_ptr + idx, tl.sum(m, 0), mask=mask)
        tl.store(part_ptr + total + idx, tl.sum(q, 0), mask=mask)
    else:
        n, m, q = _combine_lanes(n, m, q, 0)
        tl.store(part_ptr + idx, n, mask=mask)
        tl.store(part_ptr + total + idx, m, mask=mask)
        tl.store(part_ptr + 2 * total + idx, q, mask=mask)


@triton.jit
def mid_partials(
    x_ptr,  # (A, NSUB, S) input
    dy_ptr,  # (A, NSUB, S) output grad (BACKWARD only)
    coef_ptr,  # (5, NSUB) forward coefficients (K, mean(x - K), ..) (BACKWARD only)
    part_ptr,  # (3, NSUB, SPLITS) acc dtype: Welford (n, mean, M2) of x - K,
    #            or BACKWARD (sum dy, sum dy * (x - mean), unused)
    NSUB, J, S, SPAN, CHUNK, SPLITS, IPP, PSTRIDE, ISTRIDE,
    BACKWARD: tl.constexpr, BLOCK: tl.constexpr, INT64: tl.constexpr,
):
    """Per (sub, split): statistics of x - K, or the two backward sums, over a CHUNK of the
    sub's SPAN = A * S elements (t -> a = t // S, s = t % S)."""
    sub = tl.program_id(0)
    split = tl.program_id(1)
    if INT64:
        sub = sub.to(tl.int64)
    acc = part_ptr.dtype.element_ty
    offs = tl.arange(0, BLOCK)
    n = tl.zeros([BLOCK], acc)
    m = tl.zeros([BLOCK], acc)
    q = tl.zeros([BLOCK], acc)
    shifted_mean = 0.0
    if BACKWARD:
        shift = tl.load(coef_ptr + sub)
        shifted_mean = tl.load(coef_ptr + NSUB + sub)
    else:
        shift = tl.load(x_ptr + _item_first(sub // J, IPP, PSTRIDE, ISTRIDE)).to(acc)
    start = split * CHUNK
    end = tl.minimum(start + CHUNK, SPAN)
    for t0 in range(start, end, BLOCK):
        t = t0 + offs
        mask = t < end
        if INT64:
            t = t.to(tl.int64)
        addr = (t // S) * NSUB * S + sub * S + t % S
        n, m, q = _accumulate(n, m, q, x_ptr, dy_ptr, addr, mask, shift, shifted_mean,
                              BACKWARD)
    _store_partials(part_ptr, sub * SPLITS + split, NSUB * SPLITS, n, m, q, None, BACKWARD)


@triton.jit
def cols_partials(
    x_ptr,  # (P, Q, L) input
    dy_ptr,  # (P, Q, L) output grad (BACKWARD only)
    coef_ptr,  # as in mid_partials (NSUB = P * L)
    part_ptr,  # (3, NSUB, SPLITS) acc dtype, as in mid_partials
    Q, L, NSUB, J, CHUNK, SPLITS, IPP, PSTRIDE, ISTRIDE,
    BACKWARD: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_L: tl.constexpr, INT64: tl.constexpr,
):
    """Per (p, column block, split): column statistics of x - K (or the backward sums) over
    CHUNK rows."""
    p = tl.program_id(0)
    if INT64:
        p = p.to(tl.int64)
    cols = tl.program_id(1) * BLOCK_L + tl.arange(0, BLOCK_L)
    split = tl.program_id(2)
    cmask = cols < L
    acc = part_ptr.dtype.element_ty
    rows = tl.arange(0, BLOCK_Q)
    n = tl.zeros([BLOCK_Q, BLOCK_L], acc)
    m = tl.zeros([BLOCK_Q, BLOCK_L], acc)
    q = tl.zeros([BLOCK_Q, BLOCK_L], acc)
    sub = p * L + cols
    shifted_mean = 0.0
    if BACKWARD:
        shift = tl.load(coef_ptr + sub, mask=cmask, other=0.0)[None, :]
        shifted_mean = tl.load(coef_ptr + NSUB + sub, mask=cmask, other=0.0)[None, :]
    else:
        first = _item_first(sub // J, IPP, PSTRIDE, ISTRIDE)
        shift = tl.load(x_ptr + first, mask=cmask, other=0.0).to(acc)[None, :]
    base = p * Q * L
    start = split * CHUNK
    end = tl.minimum(start + CHUNK, Q)
    for r0 in range(start, end, BLOCK_Q):
        r = r0 + rows
        mask = (r < end)[:, None] & cmask[None, :]
        if INT64:
            r = r.to(tl.int64)
        addr = base + r[:, None] * L + cols[None, :]
        n, m, q = _accumulate(n, m, q, x_ptr, dy_ptr, addr, mask, shift, shifted_mean,
                              BACKWARD)
    _store_partials(part_ptr, sub * SPLITS + split, NSUB * SPLITS, n, m, q, cmask, BACKWARD)


@triton.jit
def merge_stats(
    part_ptr,  # (3, ITEMS * K) acc dtype: Welford partials, an item's K entries contiguous
    x_ptr,  # input: the items' shifts K
    w_ptr, b_ptr,  # (C,) or unused
    stats_ptr,  # (5, ITEMS) acc dtype out: mean, biased var, rstd, K, mean(x - K)
    coef_ptr,  # (5, NSUB) acc dtype out: K, mean(x - K), rstd, rstd * w, b of each sub
    running_mean_ptr, running_var_ptr,  # (ITEMS,) buffers updated in place (UPDATE only)
    ITEMS, K, NSUB, J, C, IPP, PSTRIDE, ISTRIDE, eps_hi, eps_lo,
    momentum_hi, momentum_lo, correction_hi, correction_lo,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, UPDATE: tl.constexpr, BLOCK: tl.constexpr,
    BLOCK_J: tl.constexpr,
):
    """Merge each item's K partials (its J subs x SPLITS splits) in a fixed order, update the
    item's running statistics (BatchNorm: one item per channel), then write the coefficients
    of y = ((x - K) - mean(x - K)) * (rstd * w) + b for its subs."""
    item = tl.program_id(0).to(tl.int64)
    acc = stats_ptr.dtype.element_ty
    offs = tl.arange(0, BLOCK)
    n = tl.zeros([BLOCK], acc)
    m = tl.zeros([BLOCK], acc)
    q = tl.zeros([BLOCK], acc)
    total = ITEMS * K
    for k0 in range(0, K, BLOCK):
        k = item * K + k0 + offs
        mask = k0 + offs < K
        n2 = tl.load(part_ptr + k, mask=mask, other=0.0)
        m2 = tl.load(part_ptr + total + k, mask=mask, other=0.0)
        q2 = tl.load(part_ptr + 2 * total + k, mask=mask, other=0.0)
        n, m, q = _chan(n, m, q, n2, m2, q2)
    n, m, q = _combine_lanes(n, m, q, 0)
    var = q / n
    rstd = _rstd(var, eps_hi, eps_lo)
    shift = tl.load(x_ptr + _item_first(item, IPP, PSTRIDE, ISTRIDE)).to(acc)
    _store_item_stats(stats_ptr, item, ITEMS, shift, m, var, rstd)
    if UPDATE:
        _update_running(running_mean_ptr, running_var_ptr, item, shift + m, var, momentum_hi,
                        momentum_lo, correction_hi, correction_lo, None)
    for j0 in range(0, J, BLOCK_J):
        j = j0 + tl.arange(0, BLOCK_J)
        jmask = j < J
        sub = item * J + j
        ones = tl.full([BLOCK_J], 1.0, acc)
        scale = rstd * ones
        if HAS_W:
            scale = rstd * tl.load(w_ptr + sub % C, mask=jmask, other=0.0).to(acc)
        bias = tl.zeros([BLOCK_J], acc)
        if HAS_B:
            bias = tl.load(b_ptr + sub % C, mask=jmask, other=0.0).to(acc)
        tl.store(coef_ptr + sub, shift * ones, mask=jmask)
        tl.store(coef_ptr + NSUB + sub, m * ones, mask=jmask)
        tl.store(coef_ptr + 2 * NSUB + sub, rstd * ones, mask=jmask)
        tl.store(coef_ptr + 3 * NSUB + sub, scale, mask=jmask)
        tl.store(coef_ptr + 4 * NSUB + sub, bias, mask=jmask)


@triton.jit
def given_coefficients(
    mean_ptr, var_ptr,  # (NSTAT,) given statistics; item i uses entry i % NSTAT
    w_ptr, b_ptr,  # (C,) or unused
    coef_ptr,  # (5, NSUB) acc dtype out: mean, 0, rstd, rstd * w, b of each sub (K = mean)
    NSUB, J, C, NSTAT, eps_hi, eps_lo,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, BLOCK: tl.constexpr,
):
    """Per-sub coefficients of y = (x - mean) * (rstd * w) + b from given (running) stats."""
    sub = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = sub < NSUB
    acc = coef_ptr.dtype.element_ty
    chan = sub % C
    stat = (sub // J) % NSTAT
    rstd = _rstd(tl.load(var_ptr + stat, mask=mask, other=0.0).to(acc), eps_hi, eps_lo)
    scale = rstd
    if HAS_W:
        scale = rstd * tl.load(w_ptr + chan, mask=mask, other=0.0).to(acc)
    bias = tl.zeros([BLOCK], acc)
    if HAS_B:
        bias = tl.load(b_ptr + chan, mask=mask, other=0.0).to(acc)
    tl.store(coef_ptr + sub, tl.load(mean_ptr + stat, mask=mask, other=0.0).to(acc), mask=mask)
    tl.store(coef_ptr + NSUB + sub, tl.zeros([BLOCK], acc), mask=mask)
    tl.store(coef_ptr + 2 * NSUB + sub, rstd, mask=mask)
    tl.store(coef_ptr + 3 * NSUB + sub, scale, mask=mask)
    tl.store(coef_ptr + 4 * NSUB + sub, bias, mask=mask)


@triton.jit
def backward_coefficients(
    part_ptr,  # (2, NSUB, SPLITS) acc dtype: sum dy, sum dy * (x - mean)
    fcoef_ptr,  # (5, NSUB) forward coefficients (K, mean(x - K), rstd, ..)
    w_ptr,  # (C,) or unused
    bcoef_ptr,  # (5, NSUB) out: K, mean(x - K), k1, k2, k3 with
    #             dx = k1 * dy + k2 * (x - mean) + k3
    sums_ptr,  # (2, NSUB) out: dweight, dbias contribution of each sub
    NSUB, J, C, SPLITS, COUNT,
    HAS_W: tl.constexpr, BATCH_STATS: tl.constexpr,
    BLOCK_J: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """Per item: its subs' split sums, then the dx coefficients
    dx = rstd * (g - mean(g) - xhat * mean(g * xhat)), g = w * dy (batch statistics), or
    dx = w * rstd * dy (given statistics)."""
    item = tl.program_id(0)
    acc = bcoef_ptr.dtype.element_ty
    local = tl.arange(0, BLOCK_J)
    splits = tl.arange(0, BLOCK_S)
    total = NSUB * SPLITS
    g_sum = tl.zeros([BLOCK_J], acc)
    gx_sum = tl.zeros([BLOCK_J], acc)
    for j0 in range(0, J, BLOCK_J):
        sub = item * J + j0 + local
        smask = j0 + local < J
        dy_sum = tl.zeros([BLOCK_J], acc)
        dyx_sum = tl.zeros([BLOCK_J], acc)
        for s0 in range(0, SPLITS, BLOCK_S):
            mask = smask[:, None] & (s0 + splits < SPLITS)[None, :]
            idx = sub[:, None] * SPLITS + s0 + splits[None, :]
            dy_sum += tl.sum(tl.load(part_ptr + idx, mask=mask, other=0.0), 1)
            dyx_sum += tl.sum(tl.load(part_ptr + total + idx, mask=mask, other=0.0), 1)
        rstd = tl.load(fcoef_ptr + 2 * NSUB + sub, mask=smask, other=0.0)
        tl.store(sums_ptr + sub, rstd * dyx_sum, mask=smask)
        tl.store(sums_ptr + NSUB + sub, dy_sum, mask=smask)
        w = tl.full([BLOCK_J], 1.0, acc)
        if HAS_W:
            w = tl.load(w_ptr + sub % C, mask=smask, other=0.0).to(acc)
        g_sum += w * dy_sum
        gx_sum += w * dyx_sum
    g_mean = tl.sum(g_sum, 0) / COUNT
    gx_mean = tl.sum(gx_sum, 0) / COUNT
    for j0 in range(0, J, BLOCK_J):
        sub = item * J + j0 + local
        smask = j0 + local < J
        rstd = tl.load(fcoef_ptr + 2 * NSUB + sub, mask=smask, other=0.0)
        w = tl.full([BLOCK_J], 1.0, acc)
        if HAS_W:
            w = tl.load(w_ptr + sub % C, mask=smask, other=0.0).to(acc)
        k2 = tl.zeros([BLOCK_J], acc)
        k3 = tl.zeros([BLOCK_J], acc)
        if BATCH_STATS:
            k2 = -rstd * rstd * rstd * gx_mean
            k3 = -rstd * g_mean
        tl.store(bcoef_ptr + sub, tl.load(fcoef_ptr + sub, mask=smask), mask=smask)
        tl.store(bcoef_ptr + NSUB + sub, tl.load(fcoef_ptr + NSUB + sub, mask=smask), mask=smask)
        tl.store(bcoef_ptr + 2 * NSUB + sub, w * rstd, mask=smask)
        tl.store(bcoef_ptr + 3 * NSUB + sub, k2, mask=smask)
        tl.store(bcoef_ptr + 4 * NSUB + sub, k3, mask=smask)


@triton.jit
def apply_coefficients(
    x_ptr,  # (NUMEL,) input, in memory order
    dy_ptr,  # (NUMEL,) output grad (HAS_DY only)
    coef_ptr,  # (5, NSUB) acc dtype: K, mean(x - K), c1, c2, c3
    out_ptr,  # (NUMEL,) out: c2 * ((x - K) - mean(x - K)) + c3 (+ c1 * dy)
    NUMEL, NSUB, D1, M1, D2, K2,
    HAS_DY: tl.constexpr, BLOCK: tl.constexpr, INT64: tl.constexpr,
):
    """Elementwise pass of forward (y) and backward (dx); element e belongs to sub
    (e // D1) % M1 + (e // D2) * K2. Programs walk memory from its end: the partials kernels
    before this one read the end last, so that part is still in L2."""
    pid = tl.num_programs(0) - 1 - tl.program_id(0)
    if INT64:
        pid = pid.to(tl.int64)
    e = pid * BLOCK + tl.arange(0, BLOCK)
    mask = e < NUMEL
    acc = coef_ptr.dtype.element_ty
    sub = (e // D1) % M1 + (e // D2) * K2
    x = tl.load(x_ptr + e, mask=mask, other=0.0).to(acc)
    shift = tl.load(coef_ptr + sub, mask=mask, other=0.0)
    shifted_mean = tl.load(coef_ptr + NSUB + sub, mask=mask, other=0.0)
    c2 = tl.load(coef_ptr + 3 * NSUB + sub, mask=mask, other=0.0)
    c3 = tl.load(coef_ptr + 4 * NSUB + sub, mask=mask, other=0.0)
    out = ((x - shift) - shifted_mean) * c2 + c3
    if HAS_DY:
        c1 = tl.load(coef_ptr + 2 * NSUB + sub, mask=mask, other=0.0)
        out += c1 * tl.load(dy_ptr + e, mask=mask, other=0.0).to(acc)
    tl.store(out_ptr + e, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _store_item_stats(stats_ptr, item, items, shift, shifted_mean, var, rstd):
    """Row `item` of the (5, items) statistics: mean, biased var, rstd, K, mean(x - K)."""
    tl.store(stats_ptr + item, shift + shifted_mean)
    tl.store(stats_ptr + items + item, var)
    tl.store(stats_ptr + 2 * items + item, rstd)
    tl.store(stats_ptr + 3 * items + item, shift)
    tl.store(stats_ptr + 4 * items + item, shifted_mean)


@triton.jit
def _item_block(item, a0, j0, s0, NSUB, J, S, A, BLOCK_A: tl.constexpr, BLOCK_J: tl.constexpr,
                BLOCK_S: tl.constexpr):
    """Offsets and mask of one (BLOCK_A, BLOCK_J, BLOCK_S) block of a 'mid' item's elements,
    starting at (a0, j0, s0)."""
    a = a0 + tl.arange(0, BLOCK_A)[:, None, None]
    j = j0 + tl.arange(0, BLOCK_J)[None, :, None]
    s = s0 + tl.arange(0, BLOCK_S)[None, None, :]
    return a * NSUB * S + (item * J + j) * S + s, (a < A) & (j < J) & (s < S)


@triton.jit
def _sub_params(w_ptr, b_ptr, item, j0, J, C, acc, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                BLOCK_J: tl.constexpr):
    """Weight and bias (1, BLOCK_J, 1) of the subs j0.. of an item (1 and 0 when absent)."""
    j = j0 + tl.arange(0, BLOCK_J)
    chan = (item * J + j) % C
    w = tl.full([BLOCK_J], 1.0, acc)
    if HAS_W:
        w = tl.load(w_ptr + chan, mask=j < J, other=0.0).to(acc)
    b = tl.zeros([BLOCK_J], acc)
    if HAS_B:
        b = tl.load(b_ptr + chan, mask=j < J, other=0.0).to(acc)
    return w[None, :, None], b[None, :, None]


@triton.jit
def mid_item_forward(
    x_ptr,  # (A, NSUB, S) input
    w_ptr, b_ptr,  # (C,) or unused
    y_ptr,  # (A, NSUB, S) out
    stats_ptr,  # (5, ITEMS) acc dtype out: mean, biased var, rstd, K, mean(x - K)
    running_mean_ptr, running_var_ptr,  # (ITEMS,) buffers updated in place (UPDATE only)
    ITEMS, NSUB, J, C, S, A, eps_hi, eps_lo, momentum_hi, momentum_lo, correction_hi,
    correction_lo,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, UPDATE: tl.constexpr, BLOCK_A: tl.constexpr,
    BLOCK_J: tl.constexpr, BLOCK_S: tl.constexpr, INT64: tl.constexpr,
):
    """Whole 'mid' items (A x J x S elements each), items pid, pid + programs, ...: pass 1
    reads the item (statistics of x - K: each block's centred sums, merged by Chan's formula;
    a block is never empty), pass 2 reads it again, from L2 while few enough items
    are in flight, and writes y; then the running-statistics update (UPDATE)."""
    acc = stats_ptr.dtype.element_ty
    first = tl.program_id(0)
    if INT64:
        first = first.to(tl.int64)
    for item in range(first, ITEMS, tl.num_programs(0)):
        shift = tl.load(x_ptr + item * J * S).to(acc)
        n = tl.sum(tl.zeros([BLOCK_S], acc), 0)
        shifted_mean = n
        q = n
        for j0 in range(0, J, BLOCK_J):
            for a0 in range(0, A, BLOCK_A):
                for s0 in range(0, S, BLOCK_S):
                    offs, mask = _item_block(item, a0, j0, s0, NSUB, J, S, A, BLOCK_A, BLOCK_J,
                                             BLOCK_S)
                    xs = tl.where(mask, tl.load(x_ptr + offs, mask=mask).to(acc) - shift, 0.0)
                    block_n = tl.sum(tl.where(mask, 1.0, 0.0).to(acc), axis=None)
                    block_mean = tl.sum(xs, axis=None) / block_n
                    centred = tl.where(mask, xs - block_mean, 0.0)
                    n, shifted_mean, q = _chan(n, shifted_mean, q, block_n, block_mean,
                                               tl.sum(centred * centred, axis=None))
        var = q / n
        rstd = _rstd(var, eps_hi, eps_lo)
        for j0 in range(0, J, BLOCK_J):
            w, b = _sub_params(w_ptr, b_ptr, item, j0, J, C, acc, HAS_W, HAS_B, BLOCK_J)
            scale = rstd * w
            for a0 in range(0, A, BLOCK_A):
                for s0 in range(0, S, BLOCK_S):
                    offs, mask = _item_block(item, a0, j0, s0, NSUB, J, S, A, BLOCK_A, BLOCK_J,
                                             BLOCK_S)
                    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(acc)
                    y = ((x - shift) - shifted_mean) * scale + b
                    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)
        _store_item_stats(stats_ptr, item, ITEMS, shift, shifted_mean, var, rstd)
        if UPDATE:
            _update_running(running_mean_ptr, running_var_ptr, item, shift + shifted_mean, var,
                            momentum_hi, momentum_lo, correction_hi, correction_lo, None)


@triton.jit
def mid_item_backward(
    x_ptr, dy_ptr,  # (A, NSUB, S)
    w_ptr,  # (C,) or unused
    stats_ptr,  # (5, ITEMS) acc dtype, from mid_item_forward
    dx_ptr,  # (A, NSUB, S) out (NEED_DX only)
    sums_ptr,  # (2, NSUB) acc dtype out: dweight, dbias contribution of each sub
    ITEMS, NSUB, J, C, S, A,
    HAS_W: tl.constexpr, NEED_DX: tl.constexpr, BLOCK_A: tl.constexpr,
    BLOCK_J: tl.constexpr, BLOCK_S: tl.constexpr, INT64: tl.constexpr,
):
    """Backward of mid_item_forward, item by item: pass 1 reads x and dy (per-sub sums of dy
    and dy * xhat), pass 2 reads them again and writes
    dx = rstd * (g - mean(g) - xhat * mean(g * xhat)), g = w * dy."""
    acc = sums_ptr.dtype.element_ty
    first = tl.program_id(0)
    if INT64:
        first = first.to(tl.int64)
    for item in range(first, ITEMS, tl.num_programs(0)):
        mean_ = tl.load(stats_ptr + 4 * ITEMS + item)
        rstd = tl.load(stats_ptr + 2 * ITEMS + item)
        shift = tl.load(stats_ptr + 3 * ITEMS + item)
        g_sum = tl.sum(tl.zeros([BLOCK_J], acc), 0)
        gx_sum = tl.sum(tl.zeros([BLOCK_J], acc), 0)
        for j0 in range(0, J, BLOCK_J):
            dys = tl.zeros([BLOCK_A, BLOCK_J, BLOCK_S], acc)
            dyx = tl.zeros([BLOCK_A, BLOCK_J, BLOCK_S], acc)
            for a0 in range(0, A, BLOCK_A):
                for s0 in range(0, S, BLOCK_S):
                    offs, mask = _item_block(item, a0, j0, s0, NSUB, J, S, A, BLOCK_A, BLOCK_J,
                                             BLOCK_S)
                    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(acc)
                    dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(acc)
                    dys += dy
                    dyx += dy * tl.where(mask, ((x - shift) - mean_) * rstd, 0.0)
            dys_j = tl.sum(tl.sum(dys, 2), 0)
            dyx_j = tl.sum(tl.sum(dyx, 2), 0)
            j = j0 + tl.arange(0, BLOCK_J)
            tl.store(sums_ptr + item * J + j, dyx_j, mask=j < J)
            tl.store(sums_ptr + NSUB + item * J + j, dys_j, mask=j < J)
            w, _ = _sub_params(w_ptr, w_ptr, item, j0, J, C, acc, HAS_W, False, BLOCK_J)
            g_sum += tl.sum(tl.reshape(w, [BLOCK_J]) * dys_j, 0)
            gx_sum += tl.sum(tl.reshape(w, [BLOCK_J]) * dyx_j, 0)
        if NEED_DX:
            count = A * J * S
            g_mean = g_sum / count
            gx_mean = gx_sum / count
            for j0 in range(0, J, BLOCK_J):
                w, _ = _sub_params(w_ptr, w_ptr, item, j0, J, C, acc, HAS_W, False, BLOCK_J)
                for a0 in range(0, A, BLOCK_A):
                    for s0 in range(0, S, BLOCK_S):
                        offs, mask = _item_block(item, a0, j0, s0, NSUB, J, S, A, BLOCK_A,
                                                 BLOCK_J, BLOCK_S)
                        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(acc)
                        dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(acc)
                        xhat = ((x - shift) - mean_) * rstd
                        dx = (w * dy - g_mean - xhat * gx_mean) * rstd
                        tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def column_sums(
    src_ptr,  # (2, ROWS, C) acc dtype
    dst_ptr,  # (2, C) acc dtype out: sums over ROWS in a fixed order
    ROWS, C,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """dweight / dbias: the per-sub (or per-program) contributions summed per channel."""
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    plane = tl.program_id(1).to(tl.int64)
    cmask = cols < C
    rows = tl.arange(0, BLOCK_R)
    total = tl.zeros([BLOCK_R, BLOCK_C], dst_ptr.dtype.element_ty)
    for r0 in range(0, ROWS, BLOCK_R):
        r = r0 + rows
        mask = (r < ROWS)[:, None] & cmask[None, :]
        total += tl.load(src_ptr + plane * ROWS * C + r[:, None] * C + cols[None, :],
                         mask=mask, other=0.0)
    tl.store(dst_ptr + plane * C + cols, tl.sum(total, 0), mask=cmask)


@triton.jit
def rows_forward(
    x_ptr,  # (M, L) input
    w_ptr, b_ptr,  # (L,) or unused
    y_ptr,  # (M, L) out
    stats_ptr,  # (5, M) acc dtype out: mean, biased var, rstd, K, mean(x - K)
    M, L, eps_hi, eps_lo,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, BLOCK_L: tl.constexpr, INT64: tl.constexpr,
):
    """LayerNorm forward of one row held in registers: two-pass centred variance of x - K,
    K the row's first element."""
    row = tl.program_id(0)
    if INT64:
        row = row.to(tl.int64)
    acc = stats_ptr.dtype.element_ty
    cols = tl.arange(0, BLOCK_L)
    mask = cols < L
    x = tl.load(x_ptr + row * L + cols, mask=mask, other=0.0).to(acc)
    shift = tl.load(x_ptr + row * L).to(acc)
    xs = tl.where(mask, x - shift, 0.0)
    shifted_mean = tl.sum(xs, 0) / L
    xc = tl.where(mask, xs - shifted_mean, 0.0)
    var = tl.sum(xc * xc, 0) / L
    rstd = _rstd(var, eps_hi, eps_lo)
    y = xc * rstd
    if HAS_W:
        y = y * tl.load(w_ptr + cols, mask=mask, other=0.0).to(acc)
    if HAS_B:
        y = y + tl.load(b_ptr + cols, mask=mask, other=0.0).to(acc)
    tl.store(y_ptr + row * L + cols, y.to(y_ptr.dtype.element_ty), mask=mask)
    _store_item_stats(stats_ptr, row, M, shift, shifted_mean, var, rstd)


@triton.jit
def rows_backward(
    x_ptr, dy_ptr,  # (M, L)
    w_ptr,  # (L,) or unused
    stats_ptr,  # (5, M) acc dtype, from rows_forward
    dx_ptr,  # (M, L) out (NEED_DX only)
    part_ptr,  # (2, PROGRAMS, L) acc dtype out: per-program dweight, dbias
    M, L, ROWS_PER_PROGRAM,
    HAS_W: tl.constexpr, NEED_DX: tl.constexpr, BLOCK_L: tl.constexpr, INT64: tl.constexpr,
):
    """LayerNorm backward of ROWS_PER_PROGRAM rows: dx per row,
    dx = rstd * (g - mean(g) - xhat * mean(g * xhat)), g = w * dy, and this program's
    dweight = sum(dy * xhat), dbias = sum(dy) partials."""
    pid = tl.program_id(0)
    if INT64:
        pid = pid.to(tl.int64)
    acc = part_ptr.dtype.element_ty
    cols = tl.arange(0, BLOCK_L)
    mask = cols < L
    w = tl.full([BLOCK_L], 1.0, acc)
    if HAS_W:
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(acc)
    dw = tl.zeros([BLOCK_L], acc)
    db = tl.zeros([BLOCK_L], acc)
    first = pid * ROWS_PER_PROGRAM
    for row in range(first, tl.minimum(first + ROWS_PER_PROGRAM, M)):
        x = tl.load(x_ptr + row * L + cols, mask=mask, other=0.0).to(acc)
        dy = tl.load(dy_ptr + row * L + cols, mask=mask, other=0.0).to(acc)
        rstd = tl.load(stats_ptr + 2 * M + row)
        xc = (x - tl.load(stats_ptr + 3 * M + row)) - tl.load(stats_ptr + 4 * M + row)
        xhat = tl.where(mask, xc * rstd, 0.0)
        dw += dy * xhat
        db += dy
        if NEED_DX:
            g = dy * w
            dx = (g - xhat * (tl.sum(g * xhat, 0) / L) - tl.sum(g, 0) / L) * rstd
            tl.store(dx_ptr + row * L + cols, dx.to(dx_ptr.dtype.element_ty), mask=mask)
    tl.store(part_ptr + pid * L + cols, dw, mask=mask)
    tl.store(part_ptr + tl.num_programs(0) * L + pid * L + cols, db, mask=mask)


@triton.jit
def _lerp(start, end, weight):
    """torch.lerp's formula: exact at both ends."""
    return tl.where(weight < 0.5, start + weight * (end - start),
                    end - (end - start) * (1.0 - weight))


@triton.jit
def _update_running(running_mean_ptr, running_var_ptr, idx, mean, var, momentum_hi, momentum_lo,
                    correction_hi, correction_lo, mask):
    """running.lerp_(batch, momentum) at idx, as torch computes lerp, in the buffers' dtype
    (float32 arithmetic for 16-bit buffers); the variance enters unbiased
    (times correction = count / (count - 1))."""
    rm = tl.load(running_mean_ptr + idx, mask=mask)
    rv = tl.load(running_var_ptr + idx, mask=mask)
    acc = tl.float64 if rm.dtype == tl.float64 else tl.float32
    momentum = (tl.zeros_like(rm).to(acc) + momentum_hi + momentum_lo).to(acc)
    correction = (tl.zeros_like(rm).to(acc) + correction_hi + correction_lo).to(acc)
    mean = mean.to(rm.dtype).to(acc)
    var = (var.to(acc) * correction).to(rv.dtype).to(acc)
    tl.store(running_mean_ptr + idx, _lerp(rm.to(acc), mean, momentum).to(rm.dtype), mask=mask)
    tl.store(running_var_ptr + idx, _lerp(rv.to(acc), var, momentum).to(rv.dtype), mask=mask)


@triton.jit
def running_stats_update(
    running_mean_ptr, running_var_ptr,  # (C,) buffers, updated in place in their dtype
    mean_ptr, var_ptr,  # (C,) batch mean and biased variance
    C, momentum_hi, momentum_lo, correction_hi, correction_lo,
    BLOCK: tl.constexpr,
):
    """The running-statistics update on its own (InstanceNorm's batch-averaged statistics)."""
    c = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = c < C
    _update_running(running_mean_ptr, running_var_ptr, c, tl.load(mean_ptr + c, mask=mask),
                    tl.load(var_ptr + c, mask=mask), momentum_hi, momentum_lo, correction_hi,
                    correction_lo, mask)
