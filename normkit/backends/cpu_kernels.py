"""numba kernels of the CPU backend (fp32/fp64/fp16/bf16 data, fp64 accumulation).

Four memory shapes cover every op (see `normkit.backends.plan`):
- mid  (A, M, J, S): statistics per m over (a, j, s); affine per (m % Wm, j). BatchNorm NCHW
  (A=N, M=C), InstanceNorm (M=N*C), GroupNorm NCHW (M=N*G, J=C/G).
- rows (R, K): statistics per row, affine per column (LayerNorm).
- cols (R, C): statistics per column over all rows (BatchNorm channels_last / 2D input).
- nsc  (N, S, G, Cg): statistics per (n, g) over (s, cg) (GroupNorm channels_last).

Statistics are single-pass shifted sums in float64 (shift = the item's first element, so no
E[x²]-E[x]² cancellation); a mid/rows/nsc item is normalized right after its statistics, while
its data is still in cache. Reductions run in a fixed order (prange only splits independent
items; block partials are merged in block order), so results are bitwise reproducible and do
not depend on the thread count. `fastmath` is limited to reassociation/contraction (no NaN/Inf
assumptions), which lets LLVM vectorize the sums; division follows IEEE (error_model="numpy"),
so eps=0 with a constant input gives inf/NaN as torch does, not ZeroDivisionError.

Every kernel exists twice: `parallel` (prange over threads) and `serial` (for small tensors,
where waking the thread pool costs more than the work). Kernels take tensors by address
(`Tensor.data_ptr()`, memory laid out as the plan says) with a zero-size array `like` of the
data's dtype and the plan's sizes: turning a tensor into a numpy array costs microseconds,
which small inputs notice. The kernels also read and write float16 / bfloat16 data (as uint16,
converted by `cpu_half`): statistics and sums in float64 as for float32 data, the elementwise
passes (y, dx) in float32 around the mean (`_centered`), each result rounded to 16 bits:
`like` is then a uint16 array, `calc` float32 and `half` says the format (True float16, False
bfloat16, None for float32 / float64 data). Parameters, given statistics and weight / bias
gradients have `calc`'s dtype (the data's own, or float32 for 16-bit data). Each kernel calls
its row / item / block / whole-body helper once per format with `half` as a constant, so the
conversions vectorize (bfloat16 LayerNorm forward, 1024x1024 from cache: 1.08 ns per element
with `half` a run-time flag in the loop, 0.69 with the constant).
Statistics are a (3, items) float64 array: mean, biased variance, 1/sqrt(var + eps).
"""

from __future__ import annotations

import types

import numpy as np
from numba import carray, njit, prange
from numba import types as nbtypes
from numba.extending import intrinsic

from normkit.backends import cpu_half

FASTMATH = {"reassoc", "contract"}


@intrinsic
def _pointer(typingctx, address, like):
    """The integer `address` as a pointer to elements of `like`'s dtype (an array or a dtype)."""
    pointer = nbtypes.CPointer(like.dtype)

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], context.get_value_type(pointer))

    return pointer(address, like), codegen


@njit(inline="always", cache=True)
def _at(address, like, shape):
    """The memory at `address` as a C-contiguous array of `shape` with `like`'s dtype."""
    return carray(_pointer(address, like), shape)


@njit(inline="always", cache=True, fastmath=FASTMATH, error_model="numpy")
def _finish(s1, s2, shift, count, eps, stats, m):
    """Store (mean, biased var, rstd) of item m from shifted sums Σ(x-shift), Σ(x-shift)²."""
    mu = s1 / count
    var = (s2 - s1 * mu) / count
    if var < 0.0:
        var = 0.0
    stats[0, m] = shift + mu
    stats[1, m] = var
    stats[2, m] = 1.0 / np.sqrt(var + eps)


# _wide / _data / _narrow are plain (not numba-inlined) functions: LLVM inlines them into the
# loops and folds a constant `half` all the same (the loops stay vectorized), while numba-level
# inlining re-typed every call site: compiling cols_forward_train (serial, float32) took 11.5 s
# with them inlined, 3.4 s without; bfloat16 30.1 against 8.6 s.
@njit(cache=True)
def _wide(value, half):
    """A stored value as float64: the data's own value, or (half not None) the float32 value of
    16-bit storage (see cpu_half)."""
    if half is None:
        return np.float64(value)
    return np.float64(cpu_half.load(value, half))


@njit(cache=True)
def _data(value, half):
    """A stored value in the arithmetic's dtype: itself, or the float32 value of 16 bits."""
    if half is None:
        return value
    return cpu_half.load(value, half)


@njit(cache=True)
def _narrow(value, half):
    """float64 `value` stored as float32 data is (rounded), or as 16-bit storage (half not
    None): rounded to float32 first, then to 16 bits, as the float32 kernels' result rounded to
    x's dtype would be."""
    if half is None:
        return value
    return cpu_half.store(np.float32(value), half)


# The elementwise passes compute 16-bit data in float32, centered (`_centered`): in float64 with
# 16-bit storage, the conversions ran 4 lanes wide (bfloat16 y = x * alpha + beta from L1:
# 0.46 ns per element in float64, 0.20 in float32; float16 0.30 and 0.08).
@njit(cache=True)
def _centered(alpha, beta, center, half):
    """(a, b, c) with x * alpha + beta = (x - c) * a + b, for `_shifted`: alpha, beta, 0 for
    float32 / float64 data (computed in float64); for 16-bit data float32, c the float32
    rounding of `center` (the mean of the values) and b corrected for that rounding, so values
    near the mean keep their digits (no cancellation of x * alpha against beta)."""
    if half is None:
        return alpha, beta, 0.0
    c = np.float32(center)
    return np.float32(alpha), np.float32(beta + np.float64(c) * alpha), c


@njit(cache=True)
def _centered_grad(p, q, z, center, half):
    """(p, q, z, c) with g * p + x * q + z = g * p + (x - c) * q + z' for `_grad_affine`, as
    `_centered` does for x * alpha + beta."""
    a, b, c = _centered(q, z, center, half)
    return _calc(p, half), a, b, c


@njit(cache=True)
def _scaled(x, c, a, b, half):
    """(x - c) * a + b for a stored x, in a's dtype (coefficients from `_centered`; c is not
    read for float32 / float64 data)."""
    if half is None:
        return np.float64(x) * a + b
    return (cpu_half.load(x, half) - c) * a + b


@njit(cache=True)
def _shifted(x, c, a, b, half):
    """`_scaled`, as the data's dtype stores it."""
    return _narrow(_scaled(x, c, a, b, half), half)


@njit(cache=True)
def _grad_affine(g, x, p, q, z, c, half):
    """g * p + (x - c) * q + z for stored g and x, as the data's dtype stores it (coefficients
    from `_centered_grad`)."""
    if half is None:
        return np.float64(g) * p + np.float64(x) * q + z
    return cpu_half.store(cpu_half.load(g, half) * p + (cpu_half.load(x, half) - c) * q + z,
                          half)


@njit(inline="always", cache=True, fastmath=FASTMATH, error_model="numpy")
def _run_stats(run, eps, stats, m, half):
    """Store the statistics of the 1-D `run` as item m, its sums shifted by its first value
    (`half` as in `_wide`)."""
    shift = _wide(run[0], half)
    s1 = 0.0
    s2 = 0.0
    for i in range(run.shape[0]):
        d = _wide(run[i], half) - shift
        s1 += d
        s2 += d * d
    _finish(s1, s2, shift, run.shape[0], eps, stats, m)


_ELEMENTWISE_BLOCKS = 64  # contiguous row ranges of an elementwise pass, spread over threads

# From this many columns on, the per-column accumulators of a block no longer sit in L1 next to
# the rows, and the sums take 4 rows per accumulator update (measured: 2.5x faster statistics
# at 2048 columns, 1.4x at 1024, slower at 512 and below).
UNROLL_COLUMNS = 1024


@njit(inline="always", cache=True, fastmath=FASTMATH, error_model="numpy")
def _cols_sums(x, g, lo, hi, center, s1, s2, use_g, half):
    """One block's column sums over rows lo..hi-1, with d = x[r, c] - center[c]:
    s1[c] += Σ d, s2[c] += Σ d² (statistics), or with use_g s1[c] += Σ g, s2[c] += Σ g·d
    (`half` as in `_wide`)."""
    r = lo
    if x.shape[1] >= UNROLL_COLUMNS:
        while r + 4 <= hi:
            for c in range(x.shape[1]):
                k = center[c]
                d0 = _wide(x[r, c], half) - k
                d1 = _wide(x[r + 1, c], half) - k
                d2 = _wide(x[r + 2, c], half) - k
                d3 = _wide(x[r + 3, c], half) - k
                if use_g:
                    g0 = _wide(g[r, c], half)
                    g1 = _wide(g[r + 1, c], half)
                    g2 = _wide(g[r + 2, c], half)
                    g3 = _wide(g[r + 3, c], half)
                    s1[c] += (g0 + g1) + (g2 + g3)
                    s2[c] += (g0 * d0 + g1 * d1) + (g2 * d2 + g3 * d3)
                else:
                    s1[c] += (d0 + d1) + (d2 + d3)
                    s2[c] += (d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3)
            r += 4
    while r < hi:
        for c in range(x.shape[1]):
            d = _wide(x[r, c], half) - center[c]
            if use_g:
                gv = _wide(g[r, c], half)
                s1[c] += gv
                s2[c] += gv * d
            else:
                s1[c] += d
                s2[c] += d * d
        r += 1


@njit(inline="always", cache=True, fastmath=FASTMATH, error_model="numpy")
def _block_totals(s1_part, s2_part):
    """Column totals of the (blocks, columns) partials, added in block order (walked row by
    row: a column-by-column walk costs a TLB miss per block at thousands of columns)."""
    s1 = s1_part[0].copy()
    s2 = s2_part[0].copy()
    for blk in range(1, s1_part.shape[0]):
        for c in range(s1.shape[0]):
            s1[c] += s1_part[blk, c]
            s2[c] += s2_part[blk, c]
    return s1, s2


@njit(inline="always", cache=True, fastmath=FASTMATH, error_model="numpy")
def _cols_merge_stats(s1_part, s2_part, shift, count, eps, stats):
    """Per-column statistics from block partial sums, merged in block order."""
    s1, s2 = _block_totals(s1_part, s2_part)
    for c in range(shift.shape[0]):
        _finish(s1[c], s2[c], shift[c], count, eps, stats, c)


@njit(inline="always", cache=True, fastmath=FASTMATH, error_model="numpy")
def _cols_batch_stats(x, eps, stats, n_blocks, half):
    """Column statistics of x (rows, columns): shifted sums per block of rows (in parallel),
    merged in block order (`half` as in `_wide`)."""
    n_r, n_c = x.shape
    per_block = (n_r + n_blocks - 1) // n_blocks
    s1_part = np.zeros((n_blocks, n_c))
    s2_part = np.zeros((n_blocks, n_c))
    shift = np.empty(n_c)
    for c in range(n_c):
        shift[c] = _wide(x[0, c], half)
    for blk in prange(n_blocks):
        _cols_sums(x, x, blk * per_block, min(n_r, (blk + 1) * per_block), shift,
                   s1_part[blk], s2_part[blk], False, half)
    _cols_merge_stats(s1_part, s2_part, shift, n_r, eps, stats)


# From this many columns on, the elementwise passes take two rows per load of the float64
# per-column coefficients (2048 columns: 16 KB per coefficient array, more than L1 holds
# beside the rows; measured 17-23 % faster there, slower at 1024 and below).
PAIR_ROWS_COLUMNS = 2048


@njit(inline="always", cache=True, fastmath=FASTMATH, error_model="numpy")
def _cols_elementwise(x, g, use_g, p, q, z, center, out, n_tasks, half):
    """out[r, c] = g[r, c] * p[c] + x[r, c] * q[c] + z[c] (dx), or without the g term
    (use_g False: y = x * alpha + beta with q = alpha, z = beta), over `n_tasks` ranges of
    rows in parallel; two rows per coefficient load from PAIR_ROWS_COLUMNS columns (`half` as
    in `_wide` / `_narrow`; 16-bit data in float32 around `center[c]`, the column means, see
    `_centered`)."""
    n_r, n_c = x.shape
    p, q, z, center = _centered_columns(p, q, z, center, half)
    per_task = (n_r + n_tasks - 1) // n_tasks
    step = 2 if n_c >= PAIR_ROWS_COLUMNS else 1
    for task in prange(n_tasks):
        r = task * per_task
        end = min(n_r, (task + 1) * per_task)
        while r < end:
            if step == 2 and r + 2 <= end:
                x0, x1, g0, g1, o0, o1 = x[r], x[r + 1], g[r], g[r + 1], out[r], out[r + 1]
                for c in range(n_c):
                    qc = q[c]
                    zc = z[c]
                    cc = center[c]
                    if use_g:
                        pc = p[c]
                        o0[c] = _grad_affine(g0[c], x0[c], pc, qc, zc, cc, half)
                        o1[c] = _grad_affine(g1[c], x1[c], pc, qc, zc, cc, half)
                    else:
                        o0[c] = _shifted(x0[c], cc, qc, zc, half)
                        o1[c] = _shifted(x1[c], cc, qc, zc, half)
                r += 2
            else:
                xr, gr, orow = x[r], g[r], out[r]
                for c in range(n_c):
                    if use_g:
                        orow[c] = _grad_affine(gr[c], xr[c], p[c], q[c], z[c], center[c], half)
                    else:
                        orow[c] = _shifted(xr[c], center[c], q[c], z[c], half)
                r += 1


@njit(inline="always", cache=True, fastmath=FASTMATH, error_model="numpy")
def _centered_columns(p, q, z, center, half):
    """Per-column (p, q, z, c) of `_grad_affine` (`_shifted`: q, z, c) from float64 p, q, z:
    the arrays themselves (c unread) for float32 / float64 data, else `_centered_grad`'s
    float32 values around center[c]."""
    n_c = p.shape[0]
    if half is None:
        return p, q, z, z
    p32 = np.empty(n_c, np.float32)
    q32 = np.empty(n_c, np.float32)
    z32 = np.empty(n_c, np.float32)
    c32 = np.empty(n_c, np.float32)
    for c in range(n_c):
        p32[c], q32[c], z32[c], c32[c] = _centered_grad(p[c], q[c], z[c], center[c], half)
    return p32, q32, z32, c32


@njit(inline="always", cache=True, fastmath=FASTMATH, error_model="numpy")
def _given_stats(mean, var, eps, stats):
    """stats[:, c] = (mean[c], var[c], 1 / sqrt(var[c] + eps)) for given statistics."""
    for c in range(mean.shape[0]):
        stats[0, c] = mean[c]
        stats[1, c] = var[c]
        stats[2, c] = 1.0 / np.sqrt(np.float64(var[c]) + eps)


@njit(inline="always", cache=True, fastmath=FASTMATH, error_model="numpy")
def _cols_affine_coefficients(stats, w, b, has_w, has_b, alpha, beta):
    """alpha[c] = rstd[c] * w[c], beta[c] = b[c] - mean[c] * alpha[c]."""
    for c in range(alpha.shape[0]):
        alpha[c] = stats[2, c] * w[c] if has_w else stats[2, c]
        beta[c] = (b[c] if has_b else 0.0) - stats[0, c] * alpha[c]


@njit(inline="always", cache=True, fastmath=FASTMATH, error_model="numpy")
def _cols_grad_coefficients(s1_part, s2_part, stats, w, has_w, batch_stats, count, dw, db, p, q,
                            z):
    """From block partials of Σg and Σg·(x - mean): dw, db and dx = g·p + x·q + z per column."""
    sg_all, sgx_all = _block_totals(s1_part, s2_part)
    for c in range(p.shape[0]):
        sg = sg_all[c]
        sgx = sgx_all[c]
        r = stats[2, c]
        dw[c] = sgx * r
        db[c] = sg
        p[c] = r * w[c] if has_w else r
        q[c] = -p[c] * r * r * sgx / count if batch_stats else 0.0
        z[c] = (-p[c] * sg / count if batch_stats else 0.0) - q[c] * stats[0, c]


@njit(inline="always", cache=True, fastmath=FASTMATH, error_model="numpy")
def _mid_item_forward(x, y, w, b, has_w, has_b, eps, stats, m, n_w, half):
    """Item m of mid_forward_train: its statistics, then its normalized values."""
    n_a, _, n_j, n_s = x.shape
    runs = x.reshape(n_a, x.shape[1], n_j * n_s)  # an item's (j, s) values: one contiguous run
    shift = _wide(x[0, m, 0, 0], half)
    s1 = 0.0
    s2 = 0.0
    for a in range(n_a):
        run = runs[a, m]
        for i in range(n_j * n_s):
            d = _wide(run[i], half) - shift
            s1 += d
            s2 += d * d
    _finish(s1, s2, shift, n_a * n_j * n_s, eps, stats, m)
    mean = stats[0, m]
    rstd = stats[2, m]
    k = m % n_w
    for a in range(n_a):
        for j in range(n_j):
            alpha = rstd * w[k, j] if has_w else rstd
            al, be, c = _centered(alpha, (b[k, j] if has_b else 0.0) - mean * alpha, mean, half)
            for s in range(n_s):
                y[a, m, j, s] = _shifted(x[a, m, j, s], c, al, be, half)


def mid_forward_train(x, w, b, has_w, has_b, eps, y, stats, like, shape, n_w, calc, half):
    """y = (x - mean[m]) * rstd[m] * w[m % Wm, j] + b[m % Wm, j]; stats over (a, j, s).

    x, y: (A, M, J, S) = `shape`; w, b: (Wm, J), Wm = n_w. x and y hold `like`'s dtype, w and
    b `calc`'s, `half` as in rows_forward_train (and passed to the item helper as a constant,
    as there)."""
    n_a, n_m, n_j, n_s = shape
    x, y = _at(x, like, shape), _at(y, like, shape)
    w, b = _at(w, calc, (n_w, n_j)), _at(b, calc, (n_w, n_j))
    stats = _at(stats, np.float64, (3, n_m))
    for m in prange(n_m):
        if half is None:
            _mid_item_forward(x, y, w, b, has_w, has_b, eps, stats, m, n_w, None)
        elif half:
            _mid_item_forward(x, y, w, b, has_w, has_b, eps, stats, m, n_w, True)
        else:
            _mid_item_forward(x, y, w, b, has_w, has_b, eps, stats, m, n_w, False)


# Items (contiguous runs of S elements, each with its own statistics) shorter than this are
# summed four at a time: at S = 49 one item's two reductions cost about as much as its
# elements (InstanceNorm 65536x49 forward, kernel alone: 2.1 -> 1.4 ms; 98304x32 2.1 -> 1.2;
# 49152x64 1.7 -> 1.3; at 100 no clear gain, from 128 on slower).
ITEM_QUADS_BELOW = 96


@njit(inline="always", cache=True, fastmath=FASTMATH, error_model="numpy")
def _four_item_sums(x, m, c0, c1, c2, c3, half):
    """Shifted sums (Σd, Σd²) of rows m..m+3 of x (M, S), d = x[m + i] - c_i, in one loop:
    Σd of the four rows, then Σd² of the four rows (`half` as in `_wide`)."""
    x0, x1, x2, x3 = x[m], x[m + 1], x[m + 2], x[m + 3]
    a0 = a1 = a2 = a3 = 0.0
    b0 = b1 = b2 = b3 = 0.0
    for s in range(x.shape[1]):
        d0 = _wide(x0[s], half) - c0
        d1 = _wide(x1[s], half) - c1
        d2 = _wide(x2[s], half) - c2
        d3 = _wide(x3[s], half) - c3
        a0 += d0
        a1 += d1
        a2 += d2
        a3 += d3
        b0 += d0 * d0
        b1 += d1 * d1
        b2 += d2 * d2
        b3 += d3 * d3
    return a0, a1, a2, a3, b0, b1, b2, b3


@njit(inline="always", cache=True, fastmath=FASTMATH, error_model="numpy")
def _item_quad_forward(x, y, w, b, has_w, has_b, eps, stats, m0, m1, n_w, half):
    """Items m0..m1-1 (four, or the last few) of items_forward_train: their statistics, then
    their values."""
    n_s = x.shape[1]
    if m1 - m0 == 4:
        c0, c1 = _wide(x[m0, 0], half), _wide(x[m0 + 1, 0], half)
        c2, c3 = _wide(x[m0 + 2, 0], half), _wide(x[m0 + 3, 0], half)
        a0, a1, a2, a3, b0, b1, b2, b3 = _four_item_sums(x, m0, c0, c1, c2, c3, half)
        _finish(a0, b0, c0, n_s, eps, stats, m0)
        _finish(a1, b1, c1, n_s, eps, stats, m0 + 1)
        _finish(a2, b2, c2, n_s, eps, stats, m0 + 2)
        _finish(a3, b3, c3, n_s, eps, stats, m0 + 3)
    else:
        for m in range(m0, m1):
            _run_stats(x[m], eps, stats, m, half)
    for m in range(m0, m1):
        k = m % n_w
        alpha = stats[2, m] * w[k] if has_w else stats[2, m]
        al, be, c = _centered(alpha, (b[k] if has_b else 0.0) - stats[0, m] * alpha,
                              stats[0, m], half)
        xr = x[m]
        yr = y[m]
        for s in range(n_s):
            yr[s] = _shifted(xr[s], c, al, be, half)


def items_forward_train(x, w, b, has_w, has_b, eps, y, stats, like, shape, n_w, calc, half):
    """mid_forward_train for many short items (A = J = 1: InstanceNorm, one-channel GroupNorm
    groups, a batch of one at small spatial sizes), four items' statistics per loop, each item
    shifted by its own first element; then each item normalized from cache. `like`, `calc` and
    `half` as in mid_forward_train."""
    n_m, n_s = shape[1], shape[3]
    x, y = _at(x, like, (n_m, n_s)), _at(y, like, (n_m, n_s))
    w, b = _at(w, calc, (n_w,)), _at(b, calc, (n_w,))
    stats = _at(stats, np.float64, (3, n_m))
    for quad in prange((n_m + 3) // 4):
        m0 = 4 * quad
        m1 = min(m0 + 4, n_m)
        if half is None:
            _item_quad_forward(x, y, w, b, has_w, has_b, eps, stats, m0, m1, n_w, None)
        elif half:
            _item_quad_forward(x, y, w, b, has_w, has_b, eps, stats, m0, m1, n_w, True)
        else:
            _item_quad_forward(x, y, w, b, has_w, has_b, eps, stats, m0, m1, n_w, False)


@njit(inline="always", cache=True, fastmath=FASTMATH, error_model="numpy")
def _affine(x, mu, alpha, beta, half):
    """(x - mu) * alpha + beta for one stored value: in the data's dtype, or (half not None:
    16-bit storage, see cpu_half) in float32, rounded back to 16 bits."""
    if half is None:
        return (x - mu) * alpha + beta
    return cpu_half.store((cpu_half.load(x, half) - mu) * alpha + beta, half)


def mid_forward_given(x, w, b, has_w, has_b, mean, var, n_stat, eps, y, stats, like, shape,
                      n_w, calc, half):
    """As mid_forward_train with given statistics mean[m % K], var[m % K] (K = n_stat).

    Purely elementwise, y = (x - mean) * alpha + b in x's dtype (as torch computes eval batch
    norm; x - mean keeps the precision of data near a large mean): per-(m, j) coefficients
    first, then each thread walks a contiguous range of the (a, m, j) rows, keeping its place
    in the coefficients by counting (no division per row). x and y hold `like`'s dtype; the
    parameters, given statistics and arithmetic `calc`'s (x's own, or float32 for 16-bit data:
    `half` True / False for float16 / bfloat16 stored as uint16, None otherwise)."""
    n_a, n_m, n_j, n_s = shape
    x, y = _at(x, like, shape), _at(y, like, shape)
    w, b = _at(w, calc, (n_w, n_j)), _at(b, calc, (n_w, n_j))
    mean, var = _at(mean, calc, (n_stat,)), _at(var, calc, (n_stat,))
    stats = _at(stats, np.float64, (3, n_m))
    for m in range(n_m):
        k = m if n_stat == n_m else m % n_stat
        stats[0, m] = mean[k]
        stats[1, m] = var[k]
        stats[2, m] = 1.0 / np.sqrt(np.float64(var[k]) + eps)
    n_mj = n_m * n_j
    coef = np.empty((3, n_mj), dtype=calc.dtype)  # mean, alpha = rstd * w, b per (m, j)
    for m in range(n_m):
        k = m if n_w == n_m else m % n_w
        for j in range(n_j):
            coef[0, m * n_j + j] = stats[0, m]
            coef[1, m * n_j + j] = stats[2, m] * w[k, j] if has_w else stats[2, m]
            coef[2, m * n_j + j] = b[k, j] if has_b else 0.0
    rows = n_a * n_mj
    xr = x.reshape(rows, n_s)
    yr = y.reshape(rows, n_s)
    per_block = (rows + _ELEMENTWISE_BLOCKS - 1) // _ELEMENTWISE_BLOCKS
    for blk in prange(_ELEMENTWISE_BLOCKS):
        lo = blk * per_block
        i = lo % n_mj
        for r in range(lo, min(rows, lo + per_block)):
            mu = coef[0, i]
            al = coef[1, i]
            be = coef[2, i]
            xrow = xr[r]
            yrow = yr[r]
            for s in range(n_s):
                yrow[s] = _affine(xrow[s], mu, al, be, half)
            i += 1
            if i == n_mj:
                i = 0


# Rows shorter than this many elements are summed four samples at a time (one reduction per
# four rows: each row's own reduction costs about as much as its elements at 7x7; measured
# 0.26 -> 0.17 ns per element at 49 elements, no gain at 196, a loss at 784).
SAMPLE_QUADS_BELOW = 128


@njit(inline="always", cache=True, fastmath=FASTMATH, error_model="numpy")
def _row_sums(x, g, a, n_rows, m, center, use_g, half):
    """Sums over rows x[a .. a+n_rows-1, m, 0, :] (n_rows 1 or 4), with d = x - center:
    (Σd, Σd²), or with use_g (Σg, Σg·d) for the rows of g (`half` as in `_wide`)."""
    r1 = 0.0
    r2 = 0.0
    if n_rows == 4:
        x0, x1, x2, x3 = x[a, m, 0], x[a + 1, m, 0], x[a + 2, m, 0], x[a + 3, m, 0]
        g0, g1, g2, g3 = g[a, m, 0], g[a + 1, m, 0], g[a + 2, m, 0], g[a + 3, m, 0]
        for s in range(x0.shape[0]):
            d0 = _wide(x0[s], half) - center
            d1 = _wide(x1[s], half) - center
            d2 = _wide(x2[s], half) - center
            d3 = _wide(x3[s], half) - center
            if use_g:
                e0 = _wide(g0[s], half)
                e1 = _wide(g1[s], half)
                e2 = _wide(g2[s], half)
                e3 = _wide(g3[s], half)
                r1 += (e0 + e1) + (e2 + e3)
                r2 += (e0 * d0 + e1 * d1) + (e2 * d2 + e3 * d3)
            else:
                r1 += (d0 + d1) + (d2 + d3)
                r2 += (d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3)
    else:
        xr, gr = x[a, m, 0], g[a, m, 0]
        for s in range(xr.shape[0]):
            d = _wide(xr[s], half) - center
            if use_g:
                e = _wide(gr[s], half)
                r1 += e
                r2 += e * d
            else:
                r1 += d
                r2 += d * d
    return r1, r2


@njit(inline="always", cache=True, fastmath=FASTMATH, error_model="numpy")
def _block_row_sums(x, g, m0, m1, centers, s1, s2, use_g, half):
    """s1[m - m0], s2[m - m0] += `_row_sums` of every sample's row m, for m in m0..m1-1,
    walking the block sample by sample (its rows in memory order); by four samples at a time
    when rows are shorter than SAMPLE_QUADS_BELOW. `centers[m - m0]` is row m's center."""
    n_a = x.shape[0]
    step = 4 if x.shape[3] < SAMPLE_QUADS_BELOW else 1
    a = 0
    while a < n_a:
        n_rows = step if a + step <= n_a else 1
        for m in range(m0, m1):
            r1, r2 = _row_sums(x, g, a, n_rows, m, centers[m - m0], use_g, half)
            s1[m - m0] += r1
            s2[m - m0] += r2
        a += n_rows


@njit(inline="always", cache=True, fastmath=FASTMATH, error_model="numpy")
def _block_stats(x, m0, m1, eps, stats, half):
    """stats[:, m] for channels m0..m1-1 of x (A, M, 1, S), each shifted by its first element,
    summed by `_block_row_sums` (`half` as in `_wide`)."""
    s1 = np.zeros(m1 - m0)
    s2 = np.zeros(m1 - m0)
    shifts = np.empty(m1 - m0)
    for m in range(m0, m1):
        shifts[m - m0] = _wide(x[0, m, 0, 0], half)
    _block_row_sums(x, x, m0, m1, shifts, s1, s2, False, half)
    for m in range(m0, m1):
        _finish(s1[m - m0], s2[m - m0], shifts[m - m0], x.shape[0] * x.shape[3], eps, stats, m)


@njit(inline="always", cache=True, fastmath=FASTMATH, error_model="numpy")
def _block_forward(x, y, w, b, has_w, has_b, eps, stats, m0, m1, half):
    """Channels m0..m1-1 of rowwise_forward_train: their statistics, then their values,
    walked sample by sample."""
    _block_stats(x, m0, m1, eps, stats, half)
    for a in range(x.shape[0]):
        for m in range(m0, m1):
            alpha = stats[2, m] * w[m, 0] if has_w else stats[2, m]
            al, be, c = _centered(alpha, (b[m, 0] if has_b else 0.0) - stats[0, m] * alpha,
                                  stats[0, m], half)
            x_row, y_row = x[a, m, 0], y[a, m, 0]
            for s in range(x.shape[3]):
                y_row[s] = _shifted(x_row[s], c, al, be, half)


def rowwise_forward_train(x, w, b, has_w, has_b, eps, y, stats, like, shape, group, calc, half):
    """mid_forward_train for BatchNorm with short rows (A, M, 1, S), by blocks of `group`
    consecutive channels.

    Channel-by-channel walks jump a whole sample between rows shorter than a page (a TLB miss
    per row); here a block's rows are walked sample by sample, its channels' rows contiguous,
    accumulating each channel's shifted sums over the samples in order; then the block is
    walked again, from cache when it fits (see cpu.ROW_GROUP_BYTES), to normalize it. `like`,
    `calc` and `half` as in mid_forward_train."""
    n_a, n_m, _, n_s = shape
    x, y = _at(x, like, shape), _at(y, like, shape)
    w, b = _at(w, calc, (n_m, 1)), _at(b, calc, (n_m, 1))
    stats = _at(stats, np.float64, (3, n_m))
    for blk in prange((n_m + group - 1) // group):
        m0 = blk * group
        m1 = min(n_m, m0 + group)
        if half is None:
            _block_forward(x, y, w, b, has_w, has_b, eps, stats, m0, m1, None)
        elif half:
            _block_forward(x, y, w, b, has_w, has_b, eps, stats, m0, m1, True)
        else:
            _block_forward(x, y, w, b, has_w, has_b, eps, stats, m0, m1, False)


@njit(inline="always", cache=True, fastmath=FASTMATH, error_model="numpy")
def _block_grad_coefficients(stats, w, has_w, batch_stats, count, m0, m1, s_g, s_gx, dw, db):
    """For channels m0..m1-1 from their Σg and Σg·(x - mean) (s_g, s_gx, indexed m - m0):
    dw[m], db[m], and (p, q, z) with dx = g·p + x·q + z (batch statistics: the mean / xhat
    terms; given statistics: dx = g·w·rstd)."""
    p = np.empty(m1 - m0)
    q = np.empty(m1 - m0)
    z = np.empty(m1 - m0)
    for m in range(m0, m1):
        i = m - m0
        r = stats[2, m]
        dw[m] = s_gx[i] * r
        db[m] = s_g[i]
        p[i] = r * w[m] if has_w else r
        q[i] = -p[i] * r * r * s_gx[i] / count if batch_stats else 0.0
        z[i] = (-p[i] * s_g[i] / count if batch_stats else 0.0) - q[i] * stats[0, m]
    return p, q, z


@njit(inline="always", cache=True, fastmath=FASTMATH, error_model="numpy")
def _block_backward(x, dy, w, has_w, stats, batch_stats, m0, m1, need_dx, dx, dw, db, half):
    """BatchNorm backward of channels m0..m1-1 of (A, M, 1, S) x / dy: their sums
    (`_block_row_sums`), dw / db (M,), and (need_dx) dx, walked sample by sample (`half` as
    in `_wide`)."""
    sdy = np.zeros(m1 - m0)
    sdyx = np.zeros(m1 - m0)
    _block_row_sums(x, dy, m0, m1, stats[0, m0:m1], sdy, sdyx, True, half)
    p, q, z = _block_grad_coefficients(stats, w, has_w, batch_stats, x.shape[0] * x.shape[3],
                                       m0, m1, sdy, sdyx, dw, db)
    if need_dx:
        for a in range(x.shape[0]):
            for m in range(m0, m1):
                i = m - m0
                pi, qi, zi, c = _centered_grad(p[i], q[i], z[i], stats[0, m], half)
                x_row, dy_row, dx_row = x[a, m, 0], dy[a, m, 0], dx[a, m, 0]
                for s in range(x.shape[3]):
                    dx_row[s] = _grad_affine(dy_row[s], x_row[s], pi, qi, zi, c, half)


def rowwise_backward(x, dy, w, has_w, stats, batch_stats, need_dx, dx, dw, db, like, shape,
                     group, calc, half):
    """mid_backward for BatchNorm with short rows, by channel blocks walked in memory order
    (see rowwise_forward_train): the sums pass, then the dx pass from cache.

    dw / db are (M,): the per-channel sums of dy·xhat and dy. x, dy and dx hold `like`'s
    dtype, w, dw and db `calc`'s (`half` as in mid_forward_train)."""
    n_a, n_m, _, n_s = shape
    x, dy, dx = _at(x, like, shape), _at(dy, like, shape), _at(dx, like, shape)
    w, dw, db = _at(w, calc, (n_m,)), _at(dw, calc, (n_m,)), _at(db, calc, (n_m,))
    stats = _at(stats, np.float64, (3, n_m))
    for blk in prange((n_m + group - 1) // group):
        m0 = blk * group
        m1 = min(n_m, m0 + group)
        if half is None:
            _block_backward(x, dy, w, has_w, stats, batch_stats, m0, m1, need_dx, dx, dw, db,
                            None)
        elif half:
            _block_backward(x, dy, w, has_w, stats, batch_stats, m0, m1, need_dx, dx, dw, db,
                            True)
        else:
            _block_backward(x, dy, w, has_w, stats, batch_stats, m0, m1, need_dx, dx, dw, db,
                            False)


@njit(inline="always", cache=True, fastmath=FASTMATH, error_model="numpy")
def _mid_item_backward(x, dy, w, has_w, stats, batch_stats, need_dx, dx, dw_part, db_part, m,
                       n_w, half):
    """Item m of mid_backward: its sums (into dw_part[m], db_part[m]), then its dx."""
    n_a, _, n_j, n_s = x.shape
    count = n_a * n_j * n_s
    mu = stats[0, m]
    r = stats[2, m]
    k = m % n_w
    sum_g = 0.0
    sum_gx = 0.0
    for j in range(n_j):
        sdy = 0.0
        sdyx = 0.0
        for a in range(n_a):
            for s in range(n_s):
                d = _wide(dy[a, m, j, s], half)
                sdy += d
                sdyx += d * (_wide(x[a, m, j, s], half) - mu)
        dw_part[m, j] = sdyx * r
        db_part[m, j] = sdy
        wj = w[k, j] if has_w else 1.0
        sum_g += sdy * wj
        sum_gx += sdyx * r * wj
    if need_dx:
        c_mean = sum_g / count if batch_stats else 0.0
        c_x = sum_gx / count * r if batch_stats else 0.0
        q = -r * c_x
        z = -r * c_mean - q * mu
        for a in range(n_a):
            for j in range(n_j):
                pj, qj, zj, c = _centered_grad(r * w[k, j] if has_w else r, q, z, mu, half)
                for s in range(n_s):
                    dx[a, m, j, s] = _grad_affine(dy[a, m, j, s], x[a, m, j, s], pj, qj, zj, c,
                                                  half)


def mid_backward(x, dy, w, has_w, stats, batch_stats, need_dx, dx, dw, db, like, shape, n_w,
                 calc, half):
    """dw[k, j] = Σ dy·xhat, db[k, j] = Σ dy over the m with m % Wm = k, and (need_dx) the
    input grad.

    With batch statistics dx = rstd·(g - mean(g) - xhat·mean(g·xhat)), g = dy·w; otherwise
    dx = g·rstd. Each m's data is read twice, the second time from cache. The per-m sums are
    added into dw / db in order of m. x, dy and dx hold `like`'s dtype, w, dw and db `calc`'s
    (`half` as in mid_forward_train).
    """
    n_a, n_m, n_j, n_s = shape
    x, dy, dx = _at(x, like, shape), _at(dy, like, shape), _at(dx, like, shape)
    w = _at(w, calc, (n_w, n_j))
    dw, db = _at(dw, calc, (n_w, n_j)), _at(db, calc, (n_w, n_j))
    stats = _at(stats, np.float64, (3, n_m))
    dw_part = np.empty((n_m, n_j))
    db_part = np.empty((n_m, n_j))
    for m in prange(n_m):
        if half is None:
            _mid_item_backward(x, dy, w, has_w, stats, batch_stats, need_dx, dx, dw_part,
                               db_part, m, n_w, None)
        elif half:
            _mid_item_backward(x, dy, w, has_w, stats, batch_stats, need_dx, dx, dw_part,
                               db_part, m, n_w, True)
        else:
            _mid_item_backward(x, dy, w, has_w, stats, batch_stats, need_dx, dx, dw_part,
                               db_part, m, n_w, False)
    _sum_groups(dw_part, n_w, dw)
    _sum_groups(db_part, n_w, db)


@njit(inline="always", cache=True, fastmath=FASTMATH, error_model="numpy")
def _sum_groups(part, n_w, out):
    """out[k, j] = Σ part[m, j] over m = k, k + n_w, ..., added in that order in float64.

    Walked as flat runs of n_w rows (a vectorized add per run, no m % n_w per element:
    65536x1 rows into 2048 took 0.20 ms the per-element way, 0.011 ms this way)."""
    n_m, n_j = part.shape
    width = n_w * n_j
    flat = part.reshape(n_m * n_j)
    total = flat[:width].copy()
    for start in range(width, n_m * n_j, width):
        run = flat[start:start + width]
        head = total[:run.shape[0]]
        for i in range(run.shape[0]):
            head[i] += run[i]
    flat_out = out.reshape(width)
    for i in range(width):
        flat_out[i] = total[i]



@njit(cache=True)
def _calc(value, half):
    """A float64 coefficient in the elementwise passes' dtype: float64, float32 for 16-bit
    data (see `_centered`)."""
    if half is None:
        return value
    return np.float32(value)


@njit(cache=True)
def _row_center(mean, rstd, half):
    """(mean, low, rstd) of a row for `_row_diff`: as they are (low 0) for float32 / float64
    data; for 16-bit data float32, the mean split into its float32 rounding and the rest."""
    if half is None:
        return mean, 0.0, rstd
    high = np.float32(mean)
    return high, np.float32(mean - np.float64(high)), np.float32(rstd)


@njit(cache=True)
def _row_diff(x, mean, low, half):
    """x - mean for a stored x: in float64 for float32 / float64 data; for 16-bit data in
    float32, as (x - high) - low, which keeps the digits of values near the mean."""
    if half is None:
        return np.float64(x) - mean
    return (cpu_half.load(x, half) - mean) - low


@njit(inline="always", cache=True, fastmath=FASTMATH, error_model="numpy")
def _forward_row(x, y, w, b, has_w, has_b, eps, stats, r, half):
    """Row r of rows_forward_train: its statistics, then y = (x - mean) * rstd * w + b."""
    _run_stats(x, eps, stats, r, half)
    mean, low, rstd = _row_center(stats[0, r], stats[2, r], half)
    for k in range(x.shape[0]):
        wk = w[k] if has_w else 1.0
        bk = b[k] if has_b else 0.0
        y[k] = _narrow(_row_diff(x[k], mean, low, half) * (rstd * wk) + bk, half)


@njit(inline="always", cache=True, fastmath=FASTMATH, error_model="numpy")
def _backward_row(x, dy, dx, w, has_w, mu, rs, need_dx, dwb, dbb, half):
    """One row of rows_backward: dwb += dy·xhat, dbb += dy, and (need_dx)
    dx = rstd·(g - mean(g) - xhat·mean(g·xhat)), g = dy·w."""
    n_k = x.shape[0]
    sum_g = 0.0
    sum_gx = 0.0
    for k in range(n_k):
        d = _wide(dy[k], half)
        xh = (_wide(x[k], half) - mu) * rs
        dwb[k] += d * xh
        dbb[k] += d
        g = d * w[k] if has_w else d
        sum_g += g
        sum_gx += g * xh
    if need_dx:
        c_mean = sum_g / n_k
        c_x = sum_gx / n_k
        mean, low, rstd = _row_center(mu, rs, half)
        c_mean, c_x = _calc(c_mean, half), _calc(c_x, half)
        for k in range(n_k):
            g = _data(dy[k], half) * w[k] if has_w else _data(dy[k], half)
            xh = _row_diff(x[k], mean, low, half) * rstd
            dx[k] = _narrow((g - c_mean - xh * c_x) * rstd, half)


def rows_forward_train(x, w, b, has_w, has_b, eps, y, stats, like, shape, calc, half):
    """Per row r of (R, K) = `shape`: y = (x - mean[r]) * rstd[r] * w[k] + b[k].

    x and y hold `like`'s dtype, w and b `calc`'s: x's own, or float32 for float16 / bfloat16
    data stored as uint16 (`half` True / False; None otherwise), computed as the float32 kernel
    computes it and rounded to 16 bits (see `_wide`, `_narrow`)."""
    n_r, n_k = shape
    x, y = _at(x, like, shape), _at(y, like, shape)
    w, b = _at(w, calc, (n_k,)), _at(b, calc, (n_k,))
    stats = _at(stats, np.float64, (3, n_r))
    for r in prange(n_r):
        if half is None:
            _forward_row(x[r], y[r], w, b, has_w, has_b, eps, stats, r, None)
        elif half:
            _forward_row(x[r], y[r], w, b, has_w, has_b, eps, stats, r, True)
        else:
            _forward_row(x[r], y[r], w, b, has_w, has_b, eps, stats, r, False)


def rows_backward(x, dy, w, has_w, stats, need_dx, dx, dw, db, like, shape, n_blocks, calc,
                  half):
    """Row-wise backward; dw/db summed per block of rows, then over the blocks in order. x, dy
    and dx hold `like`'s dtype, w, dw and db `calc`'s (`half` as in rows_forward_train)."""
    n_r, n_k = shape
    x, dy, dx = _at(x, like, shape), _at(dy, like, shape), _at(dx, like, shape)
    w, dw, db = _at(w, calc, (n_k,)), _at(dw, calc, (1, n_k)), _at(db, calc, (1, n_k))
    stats = _at(stats, np.float64, (3, n_r))
    dw_part = np.empty((n_blocks, n_k))
    db_part = np.empty((n_blocks, n_k))
    per_block = (n_r + n_blocks - 1) // n_blocks
    for blk in prange(n_blocks):
        dwb = np.zeros(n_k)
        dbb = np.zeros(n_k)
        for r in range(blk * per_block, min(n_r, (blk + 1) * per_block)):
            mu = stats[0, r]
            rs = stats[2, r]
            if half is None:
                _backward_row(x[r], dy[r], dx[r], w, has_w, mu, rs, need_dx, dwb, dbb, None)
            elif half:
                _backward_row(x[r], dy[r], dx[r], w, has_w, mu, rs, need_dx, dwb, dbb, True)
            else:
                _backward_row(x[r], dy[r], dx[r], w, has_w, mu, rs, need_dx, dwb, dbb, False)
        dw_part[blk] = dwb
        db_part[blk] = dbb
    _sum_groups(dw_part, 1, dw)
    _sum_groups(db_part, 1, db)


@njit(inline="always", cache=True, fastmath=FASTMATH, error_model="numpy")
def _cols_forward(x, w, b, has_w, has_b, eps, y, stats, n_blocks, n_tasks, half):
    """cols_forward_train on its arrays, `half` a constant."""
    _cols_batch_stats(x, eps, stats, n_blocks, half)
    alpha = np.empty(x.shape[1])
    beta = np.empty(x.shape[1])
    _cols_affine_coefficients(stats, w, b, has_w, has_b, alpha, beta)
    _cols_elementwise(x, x, False, alpha, alpha, beta, stats[0], y, n_tasks, half)


def cols_forward_train(x, w, b, has_w, has_b, eps, y, stats, like, shape, n_blocks, n_tasks,
                       calc, half):
    """Per column c of (R, C) = `shape` over all rows: y = (x - mean[c]) * rstd[c] * w[c] + b[c].

    Statistics by `n_blocks` row blocks (each with float64 partial sums), the elementwise pass by
    `n_tasks` row ranges. `like`, `calc` and `half` as in mid_forward_train."""
    n_c = shape[1]
    x, y = _at(x, like, shape), _at(y, like, shape)
    w, b = _at(w, calc, (n_c,)), _at(b, calc, (n_c,))
    stats = _at(stats, np.float64, (3, n_c))
    if half is None:
        _cols_forward(x, w, b, has_w, has_b, eps, y, stats, n_blocks, n_tasks, None)
    elif half:
        _cols_forward(x, w, b, has_w, has_b, eps, y, stats, n_blocks, n_tasks, True)
    else:
        _cols_forward(x, w, b, has_w, has_b, eps, y, stats, n_blocks, n_tasks, False)


def cols_forward_given(x, w, b, has_w, has_b, mean, var, eps, y, stats, like, shape, n_tasks,
                       calc, half):
    """Per column c: y = (x - mean[c]) * alpha[c] + b[c], alpha = w[c] / sqrt(var[c] + eps),
    elementwise in x's dtype as mid_forward_given (and torch's eval batch norm) computes it;
    `like`, `calc` and `half` as there."""
    n_r, n_c = shape
    x, y = _at(x, like, shape), _at(y, like, shape)
    w, b = _at(w, calc, (n_c,)), _at(b, calc, (n_c,))
    mean, var = _at(mean, calc, (n_c,)), _at(var, calc, (n_c,))
    stats = _at(stats, np.float64, (3, n_c))
    _given_stats(mean, var, eps, stats)
    mu = np.empty(n_c, dtype=calc.dtype)
    alpha = np.empty(n_c, dtype=calc.dtype)
    beta = np.empty(n_c, dtype=calc.dtype)
    for c in range(n_c):
        mu[c] = stats[0, c]
        alpha[c] = stats[2, c] * w[c] if has_w else stats[2, c]
        beta[c] = b[c] if has_b else 0.0
    per_task = (n_r + n_tasks - 1) // n_tasks
    for task in prange(n_tasks):
        for r in range(task * per_task, min(n_r, (task + 1) * per_task)):
            xr = x[r]
            yr = y[r]
            for c in range(n_c):
                yr[c] = _affine(xr[c], mu[c], alpha[c], beta[c], half)


@njit(inline="always", cache=True, fastmath=FASTMATH, error_model="numpy")
def _cols_backward(x, dy, w, has_w, stats, batch_stats, need_dx, dx, dw, db, n_blocks, n_tasks,
                   half):
    """cols_backward on its arrays, `half` a constant."""
    n_r, n_c = x.shape
    per_block = (n_r + n_blocks - 1) // n_blocks
    s1_part = np.zeros((n_blocks, n_c))
    s2_part = np.zeros((n_blocks, n_c))
    mean = stats[0].copy()
    for blk in prange(n_blocks):
        _cols_sums(x, dy, blk * per_block, min(n_r, (blk + 1) * per_block), mean,
                   s1_part[blk], s2_part[blk], True, half)
    p = np.empty(n_c)
    q = np.empty(n_c)
    z = np.empty(n_c)
    _cols_grad_coefficients(s1_part, s2_part, stats, w, has_w, batch_stats, n_r, dw, db, p, q, z)
    if need_dx:
        _cols_elementwise(x, dy, True, p, q, z, mean, dx, n_tasks, half)


def cols_backward(x, dy, w, has_w, stats, batch_stats, need_dx, dx, dw, db, like, shape,
                  n_blocks, n_tasks, calc, half):
    """Column-wise backward: dw[c] = Σ dy·xhat, db[c] = Σ dy (by `n_blocks` row blocks), and
    (need_dx) the input grad (by `n_tasks` row ranges). x, dy and dx hold `like`'s dtype, w,
    dw and db `calc`'s (`half` as in mid_forward_train)."""
    n_c = shape[1]
    x, dy, dx = _at(x, like, shape), _at(dy, like, shape), _at(dx, like, shape)
    w, dw, db = _at(w, calc, (n_c,)), _at(dw, calc, (n_c,)), _at(db, calc, (n_c,))
    stats = _at(stats, np.float64, (3, n_c))
    if half is None:
        _cols_backward(x, dy, w, has_w, stats, batch_stats, need_dx, dx, dw, db, n_blocks,
                       n_tasks, None)
    elif half:
        _cols_backward(x, dy, w, has_w, stats, batch_stats, need_dx, dx, dw, db, n_blocks,
                       n_tasks, True)
    else:
        _cols_backward(x, dy, w, has_w, stats, batch_stats, need_dx, dx, dw, db, n_blocks,
                       n_tasks, False)


@njit(inline="always", cache=True, fastmath=FASTMATH, error_model="numpy")
def _nsc_sample_forward(xs, ys, w, b, has_w, has_b, eps, stats, n, half):
    """Sample n of nsc_forward_train, its (S, C) slabs xs / ys (`half` as in `_wide`)."""
    n_s, n_c = xs.shape
    n_g, n_cg = w.shape
    count = n_s * n_cg
    shift = np.empty(n_c)
    for c in range(n_c):
        shift[c] = _wide(xs[0, (c // n_cg) * n_cg], half)
    s1 = np.zeros(n_c)
    s2 = np.zeros(n_c)
    _cols_sums(xs, xs, 0, n_s, shift, s1, s2, False, half)
    alpha = np.empty(n_c)
    beta = np.empty(n_c)
    mean_c = np.empty(n_c)
    for g in range(n_g):
        m = n * n_g + g
        g1 = 0.0
        g2 = 0.0
        for cg in range(n_cg):
            g1 += s1[g * n_cg + cg]
            g2 += s2[g * n_cg + cg]
        _finish(g1, g2, shift[g * n_cg], count, eps, stats, m)
        for cg in range(n_cg):
            c = g * n_cg + cg
            mean_c[c] = stats[0, m]
            alpha[c] = stats[2, m] * w[g, cg] if has_w else stats[2, m]
            beta[c] = (b[g, cg] if has_b else 0.0) - stats[0, m] * alpha[c]
    _, alpha, beta, center = _centered_columns(alpha, alpha, beta, mean_c, half)
    for s in range(n_s):
        x_row, y_row = xs[s], ys[s]
        for c in range(n_c):
            y_row[c] = _shifted(x_row[c], center[c], alpha[c], beta[c], half)


def nsc_forward_train(x, w, b, has_w, has_b, eps, y, stats, like, shape, calc, half):
    """Per (n, g) over (s, cg): y = (x - mean) * rstd * w[g, cg] + b[g, cg]; stats[:, n*G + g].

    Each sample is a channels-last (S, C) slab: per-channel shifted sums run along whole rows
    of C contiguous values (vectorizable), then the channels of each group are merged. `like`,
    `calc` and `half` as in mid_forward_train."""
    n_n, n_s, n_g, n_cg = shape
    x, y = _at(x, like, shape), _at(y, like, shape)
    w, b = _at(w, calc, (n_g, n_cg)), _at(b, calc, (n_g, n_cg))
    stats = _at(stats, np.float64, (3, n_n * n_g))
    n_c = n_g * n_cg
    for n in prange(n_n):
        xs = x[n].reshape(n_s, n_c)
        ys = y[n].reshape(n_s, n_c)
        if half is None:
            _nsc_sample_forward(xs, ys, w, b, has_w, has_b, eps, stats, n, None)
        elif half:
            _nsc_sample_forward(xs, ys, w, b, has_w, has_b, eps, stats, n, True)
        else:
            _nsc_sample_forward(xs, ys, w, b, has_w, has_b, eps, stats, n, False)


@njit(inline="always", cache=True, fastmath=FASTMATH, error_model="numpy")
def _nsc_sample_backward(xs, dys, dxs, w, has_w, stats, need_dx, dw_part, db_part, n, half):
    """Sample n of nsc_backward, its (S, C) slabs xs / dys / dxs: dw_part[n], db_part[n]
    (G, Cg) and (need_dx) dxs (`half` as in `_wide`)."""
    n_s, n_c = xs.shape
    n_g, n_cg = w.shape
    count = n_s * n_cg
    mean_c = np.empty(n_c)
    for c in range(n_c):
        mean_c[c] = stats[0, n * n_g + c // n_cg]
    sdy = np.zeros(n_c)
    sdyx = np.zeros(n_c)
    _cols_sums(xs, dys, 0, n_s, mean_c, sdy, sdyx, True, half)
    p = np.empty(n_c)
    q = np.empty(n_c)
    z = np.empty(n_c)
    for g in range(n_g):
        m = n * n_g + g
        r = stats[2, m]
        sum_g = 0.0
        sum_gx = 0.0
        for cg in range(n_cg):
            c = g * n_cg + cg
            dw_part[n, g, cg] = sdyx[c] * r
            db_part[n, g, cg] = sdy[c]
            wj = w[g, cg] if has_w else 1.0
            sum_g += sdy[c] * wj
            sum_gx += sdyx[c] * r * wj
            p[c] = r * wj
        for cg in range(n_cg):
            c = g * n_cg + cg
            q[c] = -r * r * sum_gx / count
            z[c] = -r * sum_g / count - q[c] * stats[0, m]
    if need_dx:
        p, q, z, center = _centered_columns(p, q, z, mean_c, half)
        for s in range(n_s):
            x_row, dy_row, dx_row = xs[s], dys[s], dxs[s]
            for c in range(n_c):
                dx_row[c] = _grad_affine(dy_row[c], x_row[c], p[c], q[c], z[c], center[c], half)


def nsc_backward(x, dy, w, has_w, stats, need_dx, dx, dw, db, like, shape, calc, half):
    """GroupNorm channels_last backward; dw/db (G, Cg) summed per sample, then over samples in
    order. x, dy and dx hold `like`'s dtype, w, dw and db `calc`'s (`half` as in
    mid_forward_train)."""
    n_n, n_s, n_g, n_cg = shape
    x, dy, dx = _at(x, like, shape), _at(dy, like, shape), _at(dx, like, shape)
    w = _at(w, calc, (n_g, n_cg))
    dw, db = _at(dw, calc, (1, n_g * n_cg)), _at(db, calc, (1, n_g * n_cg))
    stats = _at(stats, np.float64, (3, n_n * n_g))
    dw_part = np.empty((n_n, n_g, n_cg))
    db_part = np.empty((n_n, n_g, n_cg))
    n_c = n_g * n_cg
    for n in prange(n_n):
        xs = x[n].reshape(n_s, n_c)
        dys = dy[n].reshape(n_s, n_c)
        dxs = dx[n].reshape(n_s, n_c) if need_dx else dys
        if half is None:
            _nsc_sample_backward(xs, dys, dxs, w, has_w, stats, need_dx, dw_part, db_part, n,
                                 None)
        elif half:
            _nsc_sample_backward(xs, dys, dxs, w, has_w, stats, need_dx, dw_part, db_part, n,
                                 True)
        else:
            _nsc_sample_backward(xs, dys, dxs, w, has_w, stats, need_dx, dw_part, db_part, n,
                                 False)
    _sum_groups(dw_part.reshape(n_n, n_c), 1, dw)
    _sum_groups(db_part.reshape(n_n, n_c), 1, db)


@njit(cache=True, nogil=True, error_model="numpy")
def running_update(running_mean, running_var, like, mean, var, n, momentum, correction, half):
    """running += momentum * (batch - running) in float64, rounded into the buffers (n values of
    `like`'s dtype; `half` as in `_wide` / `_narrow` for 16-bit buffers); the variance enters
    unbiased (times `correction`). The batch `mean` / biased `var` are n float64 values each."""
    running_mean, running_var = _at(running_mean, like, (n,)), _at(running_var, like, (n,))
    mean, var = _at(mean, np.float64, (n,)), _at(var, np.float64, (n,))
    for c in range(n):
        rm = _wide(running_mean[c], half)
        rv = _wide(running_var[c], half)
        running_mean[c] = _narrow(rm + momentum * (mean[c] - rm), half)
        running_var[c] = _narrow(rv + momentum * (var[c] * correction - rv), half)


def _compile(fn, parallel: bool):
    """A numba dispatcher of fn; serial and parallel builds get distinct cache entries."""
    suffix = "parallel" if parallel else "serial"
    clone = types.FunctionType(fn.__code__, fn.__globals__, f"{fn.__name__}_{suffix}",
                               fn.__defaults__, fn.__closure__)
    clone.__qualname__ = clone.__name__
    return njit(parallel=parallel, cache=True, fastmath=FASTMATH, nogil=True,
                error_model="numpy")(clone)


_KERNELS = {
    fn.__name__: fn
    for fn in (mid_forward_train, items_forward_train, mid_forward_given, mid_backward,
               rowwise_forward_train,
               rowwise_backward, rows_forward_train,
               rows_backward, cols_forward_train, cols_forward_given, cols_backward,
               nsc_forward_train, nsc_backward)
}
parallel = types.SimpleNamespace(**{n: _compile(f, True) for n, f in _KERNELS.items()})
serial = types.SimpleNamespace(**{n: _compile(f, False) for n, f in _KERNELS.items()})
