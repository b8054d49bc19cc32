"""numba kernels for act(batch_norm(x) + residual), fused: one pass forward, one backward.

Same memory shapes and statistics as `cpu_kernels` (mid: (A, M, 1, S) BatchNorm NCHW; cols:
(R, C) BatchNorm channels_last / 2D). Activation codes: 0 identity, 1 relu, 2 leaky_relu,
3 silu (GELU runs as the composition, see `cpu_act`). For relu / leaky_relu the forward also
writes a 1-bit mask of z > 0 (NaN counts as positive, as in torch), packed along the innermost
axis of each row; the backward reads it instead of z. For silu the forward either keeps act'(z)
in the data's dtype (`keep`; `deriv`, the shape of x) for the backward to read, or the backward
recomputes z from x (and the residual). Work goes row by row through small float64 buffers
(z, dz) so that each loop is simple enough to vectorize (e^x is `cpu_math.exp`, which does).
Tensors come by address as in `cpu_kernels` (`like`: the data's dtype; `shape`: the plan's
memory shape; the mask is uint8 of `bits_shape`); unused ones (no residual, no mask, no given
statistics) are viewed with extent 1 and indexed modulo their size. Every kernel exists serial
and parallel, as in `cpu_kernels`.
"""

from __future__ import annotations

import types

import numpy as np
from numba import njit, prange

from normkit.backends.cpu_kernels import (
    FASTMATH,
    _at,
    _block_grad_coefficients,
    _block_stats,
    _cols_affine_coefficients,
    _cols_batch_stats,
    _cols_grad_coefficients,
    _compile,
    _given_stats,
)
from normkit.backends.cpu_math import exp


@njit(inline="always", cache=True)
def _act_views(x, r, has_r, w, b, bits, stats, like, shape, no_r, bits_shape):
    """The views every fused kernel takes: x, the residual (shape `no_r` when absent), w and b
    (one per channel, shape[1]), the mask and the float64 statistics."""
    n_c = shape[1]
    return (_at(x, like, shape), _at(r, like, shape if has_r else no_r), _at(w, like, (n_c,)),
            _at(b, like, (n_c,)), _at(bits, np.uint8, bits_shape),
            _at(stats, np.float64, (3, n_c)))


@njit(inline="always", cache=True, fastmath=FASTMATH, error_model="numpy")
def _z_row(x_row, r_row, has_r, alpha, beta, z):
    """z = x * alpha + beta (+ r) for one row, into the float64 buffer z."""
    n = z.shape[0]
    if has_r:
        for i in range(n):
            z[i] = x_row[i] * alpha + beta + r_row[i]
    else:
        for i in range(n):
            z[i] = x_row[i] * alpha + beta


@njit(inline="always", cache=True, fastmath=FASTMATH, error_model="numpy")
def _z_row_cols(x_row, r_row, has_r, alpha, beta, z):
    """z = x * alpha[c] + beta[c] (+ r) for one channels-last row, into z."""
    n = z.shape[0]
    if has_r:
        for i in range(n):
            z[i] = x_row[i] * alpha[i] + beta[i] + r_row[i]
    else:
        for i in range(n):
            z[i] = x_row[i] * alpha[i] + beta[i]


@njit(inline="always", cache=True, fastmath=FASTMATH, error_model="numpy")
def _silu_slope(z, sig):
    """d silu(z) / dz, given sig = sigmoid(z)."""
    return sig * (1.0 + z * (1.0 - sig))


# The relu mask moves between its bits and a byte-per-element scratch row (`flags`, 0 or 1,
# padded to a multiple of 8, with `words` its uint64 view) eight elements at a time, without a
# branch per bit. Packing gathers the eight bytes of a word into its top byte by one multiply
# (alone: 0.50 against 0.89 ns per element at 49-element rows). Unpacking, for rows of at least
# SPREAD_MASK_FROM elements, spreads a byte into eight 0/1 bytes (replicate, keep bit k of byte
# k, carry it into the byte's top bit, shift down), then selects per element: alone 0.31
# against 0.64 ns per element at 3136-element rows; in the backward kernels 25 % less time at
# 2048 channels (channels_last), 6 % at 196-element rows, no gain at 49 (there the bit loop
# stays).
SPREAD_MASK_FROM = 128
_GATHER = np.uint64(0x0102040810204080)  # byte k's low bit -> bit 56 + k
_TOP_BYTE = np.uint64(56)
_REPLICATE = np.uint64(0x0101010101010101)
_BIT_K = np.uint64(0x8040201008040201)
_CARRY = np.uint64(0x7F7F7F7F7F7F7F7F)
_TOP_BIT = np.uint64(7)


@njit(inline="always", cache=True)
def _mask_scratch(bits_row_length):
    """A zeroed byte-per-element row for `_act_row` / `_grad_row` (mask rows of this many
    bytes) and its uint64 view."""
    flags = np.zeros(bits_row_length * 8, np.uint8)
    return flags, flags.view(np.uint64)


@njit(inline="always", cache=True, fastmath=FASTMATH, error_model="numpy")
def _act_row(z, code, slope, out_row, bits_row, flags, words, keep, d_row):
    """out = act(z) for one row; for relu / leaky_relu also the packed mask of z > 0 (NaN
    counts as positive), through the scratch `flags` / `words`; with `keep` (silu) also
    d = act'(z), which the backward then reads instead of recomputing z."""
    n = z.shape[0]
    if code == 1:
        for i in range(n):
            out_row[i] = 0.0 if z[i] <= 0.0 else z[i]
    elif code == 2:
        for i in range(n):
            out_row[i] = z[i] * slope if z[i] <= 0.0 else z[i]
    elif code == 3:
        for i in range(n):
            e = 1.0 + exp(-z[i])
            out_row[i] = z[i] / e
            if keep:
                d_row[i] = _silu_slope(z[i], 1.0 / e)
    else:
        for i in range(n):
            out_row[i] = z[i]
    if code == 1 or code == 2:
        for i in range(n):
            flags[i] = not z[i] <= 0.0
        for byte in range(bits_row.shape[0]):
            bits_row[byte] = (words[byte] * _GATHER) >> _TOP_BYTE


@njit(inline="always", cache=True, fastmath=FASTMATH, error_model="numpy")
def _grad_row(dout_row, z, code, slope, bits_row, flags, words, g, kept, d_row):
    """g = dL/dz for one row: from the mask (relu family; long rows unpacked into the scratch
    `flags` through its uint64 view `words`), the kept act'(z) or z (silu)."""
    n = g.shape[0]
    if (code == 1 or code == 2) and n >= SPREAD_MASK_FROM:
        low = 0.0 if code == 1 else slope
        for byte in range(bits_row.shape[0]):
            spread = (np.uint64(bits_row[byte]) * _REPLICATE) & _BIT_K
            words[byte] = ((spread + _CARRY) >> _TOP_BIT) & _REPLICATE
        for i in range(n):
            g[i] = dout_row[i] if flags[i] else dout_row[i] * low
    elif code == 1 or code == 2:
        low = 0.0 if code == 1 else slope
        for byte in range(bits_row.shape[0]):
            v = bits_row[byte]
            for k in range(min(8, n - byte * 8)):
                i = byte * 8 + k
                g[i] = dout_row[i] if (v >> k) & 1 else dout_row[i] * low
    elif kept:
        for i in range(n):
            g[i] = np.float64(dout_row[i]) * d_row[i]
    elif code == 3:
        for i in range(n):
            g[i] = dout_row[i] * _silu_slope(z[i], 1.0 / (1.0 + exp(-z[i])))
    else:
        for i in range(n):
            g[i] = dout_row[i]


def mid_act_forward(x, r, has_r, w, b, has_w, has_b, given, mean, var, eps, code, slope, out,
                    bits, keep, deriv, stats, like, shape, bits_shape, group):
    """out = act((x - mean) * rstd * w + b + r) per channel m of (A, M, 1, S); stats (3, M).

    By blocks of `group` consecutive channels, walked sample by sample (each sample's rows of
    the block are contiguous), as `cpu_kernels.rowwise_forward_train`: the block's statistics
    (four samples' rows per reduction when rows are short), then its outputs, from cache when
    the block fits."""
    n_a, n_m, _, n_s = shape
    x, r, w, b, bits, stats = _act_views(x, r, has_r, w, b, bits, stats, like, shape,
                                         (1, 1, 1, 1), bits_shape)
    out, deriv = _at(out, like, shape), _at(deriv, like, shape if keep else (1, 1, 1, 1))
    n_stat = n_m if given else 1
    mean, var = _at(mean, like, (n_stat,)), _at(var, like, (n_stat,))
    for blk in prange((n_m + group - 1) // group):
        m0 = blk * group
        m1 = min(n_m, m0 + group)
        if given:
            for m in range(m0, m1):
                stats[0, m] = mean[m % n_stat]
                stats[1, m] = var[m % n_stat]
                stats[2, m] = 1.0 / np.sqrt(np.float64(var[m % n_stat]) + eps)
        else:
            _block_stats(x, m0, m1, eps, stats)
        alpha = np.empty(m1 - m0)
        beta = np.empty(m1 - m0)
        for m in range(m0, m1):
            alpha[m - m0] = stats[2, m] * w[m] if has_w else stats[2, m]
            beta[m - m0] = (b[m] if has_b else 0.0) - stats[0, m] * alpha[m - m0]
        z = np.empty(n_s)
        flags, words = _mask_scratch(bits.shape[2])
        for a in range(n_a):
            for m in range(m0, m1):
                _z_row(x[a, m, 0], r[a % r.shape[0], m % r.shape[1], 0], has_r,
                       alpha[m - m0], beta[m - m0], z)
                _act_row(z, code, slope, out[a, m, 0],
                         bits[a % bits.shape[0], m % bits.shape[1]], flags, words, keep,
                         deriv[a % deriv.shape[0], m % deriv.shape[1], 0])


def mid_act_backward(x, r, has_r, dout, w, b, has_w, has_b, stats, batch_stats, code, slope,
                     bits, kept, deriv, need_dx, dx, need_dr, dr, dw, db, like, shape,
                     bits_shape, group):
    """Per channel m: dz = dout * act'(z); dr = dz; dw[m] = Σ dz·xhat; db[m] = Σ dz; dx as BN.

    By blocks of `group` channels walked sample by sample (see mid_act_forward); dz of the
    block is kept in a float64 buffer between the sums and the dx pass."""
    n_a, n_m, _, n_s = shape
    x, r, w, b, bits, stats = _act_views(x, r, has_r, w, b, bits, stats, like, shape,
                                         (1, 1, 1, 1), bits_shape)
    dout, dx, dr = _at(dout, like, shape), _at(dx, like, shape), _at(dr, like, shape)
    deriv = _at(deriv, like, shape if kept else (1, 1, 1, 1))
    dw, db = _at(dw, like, (n_m,)), _at(db, like, (n_m,))
    count = n_a * n_s
    for blk in prange((n_m + group - 1) // group):
        m0 = blk * group
        m1 = min(n_m, m0 + group)
        alpha = np.empty(m1 - m0)
        beta = np.empty(m1 - m0)
        for m in range(m0, m1):
            alpha[m - m0] = stats[2, m] * w[m] if has_w else stats[2, m]
            beta[m - m0] = (b[m] if has_b else 0.0) - stats[0, m] * alpha[m - m0]
        g = np.empty((n_a, m1 - m0, n_s))
        z = np.empty(n_s)
        flags, words = _mask_scratch(bits.shape[2])
        sdz = np.zeros(m1 - m0)
        sdzx = np.zeros(m1 - m0)
        for a in range(n_a):
            for m in range(m0, m1):
                i = m - m0
                if code == 3 and not kept:
                    _z_row(x[a, m, 0], r[a % r.shape[0], m % r.shape[1], 0], has_r, alpha[i],
                           beta[i], z)
                gr = g[a, i]
                _grad_row(dout[a, m, 0], z, code, slope,
                          bits[a % bits.shape[0], m % bits.shape[1]], flags, words, gr, kept,
                          deriv[a % deriv.shape[0], m % deriv.shape[1], 0])
                mu = stats[0, m]
                r1 = 0.0
                r2 = 0.0
                for s in range(n_s):
                    r1 += gr[s]
                    r2 += gr[s] * (np.float64(x[a, m, 0, s]) - mu)
                sdz[i] += r1
                sdzx[i] += r2
                if need_dr:
                    for s in range(n_s):
                        dr[a, m, 0, s] = gr[s]
        p, q, zc = _block_grad_coefficients(stats, w, has_w, batch_stats, count, m0, m1, sdz,
                                            sdzx, dw, db)
        if need_dx:
            for a in range(n_a):
                for m in range(m0, m1):
                    i = m - m0
                    for s in range(n_s):
                        dx[a, m, 0, s] = g[a, i, s] * p[i] + x[a, m, 0, s] * q[i] + zc[i]


def cols_act_forward(x, r, has_r, w, b, has_w, has_b, given, mean, var, eps, code, slope, out,
                     bits, keep, deriv, stats, like, shape, bits_shape, n_blocks):
    """out = act(x * alpha[c] + beta[c] + r) for (R, C); bits packed along c per row."""
    n_r, n_c = shape
    x, r, w, b, bits, stats = _act_views(x, r, has_r, w, b, bits, stats, like, shape, (1, 1),
                                         bits_shape)
    out, deriv = _at(out, like, shape), _at(deriv, like, shape if keep else (1, 1))
    mean, var = _at(mean, like, (n_c,)), _at(var, like, (n_c,))
    per_block = (n_r + n_blocks - 1) // n_blocks
    if given:
        _given_stats(mean, var, eps, stats)
    else:
        _cols_batch_stats(x, eps, stats, n_blocks)
    alpha = np.empty(n_c)
    beta = np.empty(n_c)
    _cols_affine_coefficients(stats, w, b, has_w, has_b, alpha, beta)
    for blk in prange(n_blocks):
        z = np.empty(n_c)
        flags, words = _mask_scratch(bits.shape[2])
        for row in range(blk * per_block, min(n_r, (blk + 1) * per_block)):
            _z_row_cols(x[row], r[row % r.shape[0]], has_r, alpha, beta, z)
            _act_row(z, code, slope, out[row], bits[0, row % bits.shape[1]], flags, words,
                     keep, deriv[row % deriv.shape[0]])


def cols_act_backward(x, r, has_r, dout, w, b, has_w, has_b, stats, batch_stats, code, slope,
                      bits, kept, deriv, need_dx, dx, need_dr, dr, dw, db, like, shape,
                      bits_shape, n_blocks):
    """Column-wise backward of the fused op (see mid_act_backward); dz is recomputed for dx."""
    n_r, n_c = shape
    x, r, w, b, bits, stats = _act_views(x, r, has_r, w, b, bits, stats, like, shape, (1, 1),
                                         bits_shape)
    dout, dx, dr = _at(dout, like, shape), _at(dx, like, shape), _at(dr, like, shape)
    deriv = _at(deriv, like, shape if kept else (1, 1))
    dw, db = _at(dw, like, (n_c,)), _at(db, like, (n_c,))
    per_block = (n_r + n_blocks - 1) // n_blocks
    alpha = np.empty(n_c)
    beta = np.empty(n_c)
    _cols_affine_coefficients(stats, w, b, has_w, has_b, alpha, beta)
    s1_part = np.zeros((n_blocks, n_c))
    s2_part = np.zeros((n_blocks, n_c))
    for blk in prange(n_blocks):
        z = np.empty(n_c)
        g = np.empty(n_c)
        flags, words = _mask_scratch(bits.shape[2])
        for row in range(blk * per_block, min(n_r, (blk + 1) * per_block)):
            if code == 3 and not kept:
                _z_row_cols(x[row], r[row % r.shape[0]], has_r, alpha, beta, z)
            _grad_row(dout[row], z, code, slope, bits[0, row % bits.shape[1]], flags, words, g,
                      kept, deriv[row % deriv.shape[0]])
            for c in range(n_c):
                s1_part[blk, c] += g[c]
                s2_part[blk, c] += g[c] * (np.float64(x[row, c]) - stats[0, c])
            if need_dr:
                for c in range(n_c):
                    dr[row, c] = g[c]
    p = np.empty(n_c)
    q = np.empty(n_c)
    zc = np.empty(n_c)
    _cols_grad_coefficients(s1_part, s2_part, stats, w, has_w, batch_stats, n_r, dw, db, p, q,
                            zc)
    if need_dx:
        for blk in prange(n_blocks):
            z = np.empty(n_c)
            g = np.empty(n_c)
            flags, words = _mask_scratch(bits.shape[2])
            for row in range(blk * per_block, min(n_r, (blk + 1) * per_block)):
                if code == 3 and not kept:
                    _z_row_cols(x[row], r[row % r.shape[0]], has_r, alpha, beta, z)
                _grad_row(dout[row], z, code, slope, bits[0, row % bits.shape[1]], flags,
                          words, g, kept, deriv[row % deriv.shape[0]])
                for c in range(n_c):
                    dx[row, c] = g[c] * p[c] + x[row, c] * q[c] + zc[c]


_KERNELS = {fn.__name__: fn for fn in (mid_act_forward, mid_act_backward, cols_act_forward,
                                       cols_act_backward)}
parallel = types.SimpleNamespace(**{n: _compile(f, True) for n, f in _KERNELS.items()})
serial = types.SimpleNamespace(**{n: _compile(f, False) for n, f in _KERNELS.items()})
