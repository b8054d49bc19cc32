"""numba kernels for act(batch_norm(x) + residual), fused: one pass forward, one backward.

Same memory shapes and statistics as `cpu_kernels` (mid: (A, M, 1, S) BatchNorm NCHW; cols:
(R, C) BatchNorm channels_last / 2D). Activation codes: 0 identity, 1 relu, 2 leaky_relu,
3 silu (GELU runs as the composition, see `cpu_act`). For relu / leaky_relu the forward also
writes a 1-bit mask of z > 0 (NaN counts as positive, as in torch); the backward reads it
instead of z. It is packed along memory: per row for cols; for mid per sample and channel
block (bits (A, blocks, bytes)), since a block's rows of one sample are contiguous and the
backward turns them into dz in one loop. For silu the forward either keeps act'(z) in the
data's dtype (`keep`; `deriv`, the shape of x) for the backward to read, or the backward
recomputes z from x (and the residual) through a float64 row. The backward writes dz in the
data's dtype, then runs BatchNorm's backward on it (`cpu_kernels`).
Tensors come by address as in `cpu_kernels` (`like`: the data's dtype; `shape`: the plan's
memory shape; the mask is uint8 of `bits_shape`); unused ones (no residual, no mask, no given
statistics) are viewed with extent 1 and indexed modulo their size. float16 / bfloat16 data (x,
residual, out, dout, dz, dx, act'(z)) is read and written as its 16 bits: statistics and sums in
float64 as for float32 data, z = x * alpha + beta (+ r) and BatchNorm's dx in float32 around the
mean as in `cpu_kernels`, silu of that z in float64 (`calc`, `half` as there; parameters, given
statistics and weight / bias grads in float32). Every kernel exists serial and
parallel, as in `cpu_kernels`."""

from __future__ import annotations

import types

import numpy as np
from numba import njit, prange

from normkit.backends.cpu_kernels import (
    FASTMATH,
    _at,
    _block_backward,
    _block_stats,
    _centered,
    _centered_columns,
    _cols_affine_coefficients,
    _cols_batch_stats,
    _cols_elementwise,
    _cols_grad_coefficients,
    _cols_sums,
    _compile,
    _data,
    _given_stats,
    _narrow,
    _scaled,
    _wide,
)
from normkit.backends.cpu_math import exp


@njit(inline="always", cache=True)
def _act_views(x, r, has_r, w, b, bits, stats, like, shape, no_r, bits_shape, calc):
    """The views every fused kernel takes: x, the residual (shape `no_r` when absent) in
    `like`'s dtype, w and b (one per channel, shape[1]) in `calc`'s, the mask and the float64
    statistics."""
    n_c = shape[1]
    return (_at(x, like, shape), _at(r, like, shape if has_r else no_r), _at(w, calc, (n_c,)),
            _at(b, calc, (n_c,)), _at(bits, np.uint8, bits_shape),
            _at(stats, np.float64, (3, n_c)))


@njit(inline="always", cache=True, fastmath=FASTMATH, error_model="numpy")
def _z_row(x_row, r_row, has_r, alpha, beta, center, z, half):
    """z = x * alpha + beta (+ r) for one row, into the float64 buffer z (coefficients from
    `cpu_kernels._centered`: float32 for 16-bit data)."""
    n = z.shape[0]
    if has_r:
        for i in range(n):
            z[i] = _scaled(x_row[i], center, alpha, beta, half) + _data(r_row[i], half)
    else:
        for i in range(n):
            z[i] = _scaled(x_row[i], center, alpha, beta, half)


@njit(inline="always", cache=True, fastmath=FASTMATH, error_model="numpy")
def _z_row_cols(x_row, r_row, has_r, alpha, beta, center, z, half):
    """z = x * alpha[c] + beta[c] (+ r) for one channels-last row, into z (coefficients from
    `cpu_kernels._centered_columns`)."""
    n = z.shape[0]
    if has_r:
        for i in range(n):
            z[i] = _scaled(x_row[i], center[i], alpha[i], beta[i], half) + _data(r_row[i], half)
    else:
        for i in range(n):
            z[i] = _scaled(x_row[i], center[i], alpha[i], beta[i], half)


@njit(inline="always", cache=True, fastmath=FASTMATH, error_model="numpy")
def _silu_slope(z, sig):
    """d silu(z) / dz, given sig = sigmoid(z)."""
    return sig * (1.0 + z * (1.0 - sig))


# The relu mask moves between its bits and a byte-per-element scratch row (`flags`, 0 or 1,
# padded to a multiple of 8, with `words` its uint64 view) eight elements at a time, without a
# branch per bit. Packing gathers the eight bytes of a word into its top byte by one multiply
# (alone: 0.50 against 0.89 ns per element at 49-element rows). Unpacking spreads a byte into
# eight 0/1 bytes (replicate, keep bit k of byte k, carry it into the byte's top bit, shift
# down). The forward computes z, act(z) and the flag of an element in one loop (z stays in a
# register); the backward turns a whole run of flags and dout (a mid block's rows of one
# sample, a cols row) into dz in one loop.
_GATHER = np.uint64(0x0102040810204080)  # byte k's low bit -> bit 56 + k
_TOP_BYTE = np.uint64(56)
_REPLICATE = np.uint64(0x0101010101010101)
_BIT_K = np.uint64(0x8040201008040201)
_CARRY = np.uint64(0x7F7F7F7F7F7F7F7F)
_TOP_BIT = np.uint64(7)


@njit(inline="always", cache=True)
def _mask_scratch(bits_row_length):
    """A zeroed byte-per-element row for mask rows of this many bytes, and its uint64 view."""
    flags = np.zeros(bits_row_length * 8, np.uint8)
    return flags, flags.view(np.uint64)


@njit(inline="always", cache=True)
def _pack_flags(words, bits_row):
    """bits_row = the 0/1 flags of the scratch row (uint64 view `words`), eight per byte."""
    for byte in range(bits_row.shape[0]):
        bits_row[byte] = (words[byte] * _GATHER) >> _TOP_BYTE


@njit(inline="always", cache=True)
def _unpack_flags(bits_row, words):
    """The scratch row (uint64 view `words`) = bits_row's bits as 0/1 bytes."""
    for byte in range(bits_row.shape[0]):
        spread = (np.uint64(bits_row[byte]) * _REPLICATE) & _BIT_K
        words[byte] = ((spread + _CARRY) >> _TOP_BIT) & _REPLICATE


@njit(inline="always", cache=True, fastmath=FASTMATH, error_model="numpy")
def _relu_family(z, leaky, slope):
    """(relu(z) or leaky_relu(z), whether z > 0): NaN counts as positive and passes through,
    as in torch."""
    positive = not z <= 0.0
    return (z if positive else (z * slope if leaky else 0.0)), positive


@njit(inline="always", cache=True, fastmath=FASTMATH, error_model="numpy")
def _relu_family_grad(d, positive, leaky, slope):
    """dL/dz of relu / leaky_relu from dL/dout = d and the mask flag."""
    return d if positive else (d * slope if leaky else 0.0)


@njit(inline="always", cache=True, fastmath=FASTMATH, error_model="numpy")
def _act_row(z, code, slope, out_row, keep, d_row, half):
    """out = act(z) for one row of silu (with `keep` also d = act'(z), which the backward then
    reads instead of recomputing z) or identity, stored as the data is (`half` as in
    `cpu_kernels._narrow`)."""
    n = z.shape[0]
    if code == 3:
        for i in range(n):
            e = 1.0 + exp(-z[i])
            out_row[i] = _narrow(z[i] / e, half)
            if keep:
                d_row[i] = _narrow(_silu_slope(z[i], 1.0 / e), half)
    else:
        for i in range(n):
            out_row[i] = _narrow(z[i], half)


@njit(inline="always", cache=True, fastmath=FASTMATH, error_model="numpy")
def _relu_family_row(x_row, r_row, has_r, alpha, beta, center, leaky, slope, out_row, flags,
                     half):
    """out = relu or leaky_relu of z = x * alpha + beta (+ r) for one row, and its flags
    (coefficients as in `_z_row`)."""
    if has_r:
        for i in range(out_row.shape[0]):
            value, flags[i] = _relu_family(
                _scaled(x_row[i], center, alpha, beta, half) + _data(r_row[i], half), leaky,
                slope)
            out_row[i] = _narrow(value, half)
    else:
        for i in range(out_row.shape[0]):
            value, flags[i] = _relu_family(_scaled(x_row[i], center, alpha, beta, half), leaky,
                                           slope)
            out_row[i] = _narrow(value, half)


@njit(inline="always", cache=True, fastmath=FASTMATH, error_model="numpy")
def _relu_family_row_cols(x_row, r_row, has_r, alpha, beta, center, leaky, slope, out_row,
                          flags, half):
    """_relu_family_row of a channels-last row: alpha[c], beta[c], center[c] per element."""
    if has_r:
        for i in range(out_row.shape[0]):
            value, flags[i] = _relu_family(
                _scaled(x_row[i], center[i], alpha[i], beta[i], half) + _data(r_row[i], half),
                leaky, slope)
            out_row[i] = _narrow(value, half)
    else:
        for i in range(out_row.shape[0]):
            value, flags[i] = _relu_family(
                _scaled(x_row[i], center[i], alpha[i], beta[i], half), leaky, slope)
            out_row[i] = _narrow(value, half)


@njit(inline="always", cache=True, fastmath=FASTMATH, error_model="numpy")
def _dz_row(dout_row, code, slope, flags, z, kept, d_row, dz_row, half):
    """dz = dL/dz for one row (or run of rows), in the data's dtype (as torch's composition
    holds it; 16-bit data: rounded to its 16 bits): from the mask's flags (relu family,
    unpacked by the caller), the kept act'(z) or z (silu), or dout itself (identity)."""
    n = dz_row.shape[0]
    if code == 1 or code == 2:
        for i in range(n):
            dz_row[i] = _narrow(_relu_family_grad(_wide(dout_row[i], half), flags[i], code == 2,
                                                  slope), half)
    elif kept:
        for i in range(n):
            dz_row[i] = _narrow(_wide(dout_row[i], half) * _wide(d_row[i], half), half)
    elif code == 3:
        for i in range(n):
            dz_row[i] = _narrow(_wide(dout_row[i], half)
                                * _silu_slope(z[i], 1.0 / (1.0 + exp(-z[i]))), half)
    else:
        for i in range(n):
            dz_row[i] = dout_row[i]


@njit(inline="always", cache=True, fastmath=FASTMATH, error_model="numpy")
def _mid_act_block_forward(x, r, has_r, w, b, has_w, has_b, given, mean, var, eps, code, slope,
                           out, bits, keep, deriv, stats, blk, m0, m1, half):
    """Channels m0..m1-1 (block blk) of mid_act_forward, `half` a constant."""
    n_a, _, _, n_s = x.shape
    n_stat = mean.shape[0]
    if given:
        for m in range(m0, m1):
            stats[0, m] = mean[m % n_stat]
            stats[1, m] = var[m % n_stat]
            stats[2, m] = 1.0 / np.sqrt(np.float64(var[m % n_stat]) + eps)
    else:
        _block_stats(x, m0, m1, eps, stats, half)
    alpha = np.empty(m1 - m0)
    beta = np.empty(m1 - m0)
    for m in range(m0, m1):
        alpha[m - m0] = stats[2, m] * w[m] if has_w else stats[2, m]
        beta[m - m0] = (b[m] if has_b else 0.0) - stats[0, m] * alpha[m - m0]
    z = np.empty(n_s)
    flags, words = _mask_scratch(bits.shape[2])
    for a in range(n_a):
        for m in range(m0, m1):
            r_row = r[a % r.shape[0], m % r.shape[1], 0]
            al, be, c = _centered(alpha[m - m0], beta[m - m0], stats[0, m], half)
            if code == 1 or code == 2:
                _relu_family_row(x[a, m, 0], r_row, has_r, al, be, c, code == 2, slope,
                                 out[a, m, 0], flags[(m - m0) * n_s:], half)
            else:
                _z_row(x[a, m, 0], r_row, has_r, al, be, c, z, half)
                _act_row(z, code, slope, out[a, m, 0], keep,
                         deriv[a % deriv.shape[0], m % deriv.shape[1], 0], half)
        if code == 1 or code == 2:
            _pack_flags(words, bits[a, blk])


def mid_act_forward(x, r, has_r, w, b, has_w, has_b, given, mean, var, eps, code, slope, out,
                    bits, keep, deriv, stats, like, shape, bits_shape, group, calc, half):
    """out = act((x - mean) * rstd * w + b + r) per channel m of (A, M, 1, S); stats (3, M).

    By blocks of `group` consecutive channels, walked sample by sample (each sample's rows of
    the block are contiguous), as `cpu_kernels.rowwise_forward_train`: the block's statistics
    (four samples' rows per reduction when rows are short), then its outputs, from cache when
    the block fits. x, r, out and deriv hold `like`'s dtype; w, b and the given mean / var
    `calc`'s; `half` as in `cpu_kernels.mid_forward_train`."""
    n_a, n_m, _, n_s = shape
    x, r, w, b, bits, stats = _act_views(x, r, has_r, w, b, bits, stats, like, shape,
                                         (1, 1, 1, 1), bits_shape, calc)
    out, deriv = _at(out, like, shape), _at(deriv, like, shape if keep else (1, 1, 1, 1))
    n_stat = n_m if given else 1
    mean, var = _at(mean, calc, (n_stat,)), _at(var, calc, (n_stat,))
    for blk in prange((n_m + group - 1) // group):
        m0 = blk * group
        m1 = min(n_m, m0 + group)
        if half is None:
            _mid_act_block_forward(x, r, has_r, w, b, has_w, has_b, given, mean, var, eps, code,
                                   slope, out, bits, keep, deriv, stats, blk, m0, m1, None)
        elif half:
            _mid_act_block_forward(x, r, has_r, w, b, has_w, has_b, given, mean, var, eps, code,
                                   slope, out, bits, keep, deriv, stats, blk, m0, m1, True)
        else:
            _mid_act_block_forward(x, r, has_r, w, b, has_w, has_b, given, mean, var, eps, code,
                                   slope, out, bits, keep, deriv, stats, blk, m0, m1, False)


@njit(inline="always", cache=True, fastmath=FASTMATH, error_model="numpy")
def _mid_act_block_backward(x, r, has_r, dout, w, b, has_w, has_b, stats, batch_stats, code,
                            slope, bits, kept, deriv, dz, need_dx, dx, dw, db, blk, m0, m1,
                            in_place, half):
    """Channels m0..m1-1 (block blk) of mid_act_backward, `half` a constant."""
    n_a, n_m, _, n_s = x.shape
    dout_runs, dz_runs = dout.reshape(n_a, n_m * n_s), dz.reshape(n_a, n_m * n_s)
    z = np.empty(n_s)
    flags, words = _mask_scratch(bits.shape[2])
    for a in range(n_a):
        if code == 1 or code == 2:
            _unpack_flags(bits[a, blk], words)
            _dz_row(dout_runs[a, m0 * n_s:m1 * n_s], code, slope, flags, z, kept,
                    deriv[0, 0, 0], dz_runs[a, m0 * n_s:m1 * n_s], half)
            continue
        for m in range(m0, m1):
            if code == 3 and not kept:
                alpha = stats[2, m] * w[m] if has_w else stats[2, m]
                al, be, c = _centered(alpha, (b[m] if has_b else 0.0) - stats[0, m] * alpha,
                                      stats[0, m], half)
                _z_row(x[a, m, 0], r[a % r.shape[0], m % r.shape[1], 0], has_r, al, be, c, z,
                       half)
            _dz_row(dout[a, m, 0], code, slope, flags, z, kept,
                    deriv[a % deriv.shape[0], m % deriv.shape[1], 0], dz[a, m, 0], half)
    if in_place:
        _block_backward(x, dz, w, has_w, stats, batch_stats, m0, m1, need_dx, dz, dw, db, half)
    else:
        _block_backward(x, dz, w, has_w, stats, batch_stats, m0, m1, need_dx, dx, dw, db, half)


def mid_act_backward(x, r, has_r, dout, w, b, has_w, has_b, stats, batch_stats, code, slope,
                     bits, kept, deriv, dz, need_dx, dx, dw, db, like, shape, bits_shape, group,
                     calc, half):
    """Per channel m: dz = dout * act'(z), written to `dz` (the residual's grad when it needs
    one; dx's memory, overwritten in place, when only x needs one); dw[m] = Σ dz·xhat,
    db[m] = Σ dz; (need_dx) dx as BatchNorm's backward with dy = dz.

    By blocks of `group` channels walked sample by sample (see mid_act_forward): the block's
    dz rows, then its sums and its dx from cache (`cpu_kernels._block_backward`). x, r, dout,
    dz, dx and deriv hold `like`'s dtype, w, b, dw and db `calc`'s."""
    n_a, n_m, _, n_s = shape
    x, r, w, b, bits, stats = _act_views(x, r, has_r, w, b, bits, stats, like, shape,
                                         (1, 1, 1, 1), bits_shape, calc)
    in_place = dz == dx  # dx overwrites dz: the loops then read and write one array
    dout, dz, dx = _at(dout, like, shape), _at(dz, like, shape), _at(dx, like, shape)
    deriv = _at(deriv, like, shape if kept else (1, 1, 1, 1))
    dw, db = _at(dw, calc, (n_m,)), _at(db, calc, (n_m,))
    for blk in prange((n_m + group - 1) // group):
        m0 = blk * group
        m1 = min(n_m, m0 + group)
        if half is None:
            _mid_act_block_backward(x, r, has_r, dout, w, b, has_w, has_b, stats, batch_stats,
                                    code, slope, bits, kept, deriv, dz, need_dx, dx, dw, db,
                                    blk, m0, m1, in_place, None)
        elif half:
            _mid_act_block_backward(x, r, has_r, dout, w, b, has_w, has_b, stats, batch_stats,
                                    code, slope, bits, kept, deriv, dz, need_dx, dx, dw, db,
                                    blk, m0, m1, in_place, True)
        else:
            _mid_act_block_backward(x, r, has_r, dout, w, b, has_w, has_b, stats, batch_stats,
                                    code, slope, bits, kept, deriv, dz, need_dx, dx, dw, db,
                                    blk, m0, m1, in_place, False)


@njit(inline="always", cache=True, fastmath=FASTMATH, error_model="numpy")
def _cols_act_forward(x, r, has_r, w, b, has_w, has_b, given, mean, var, eps, code, slope, out,
                      bits, keep, deriv, stats, n_blocks, half):
    """cols_act_forward on its arrays, `half` a constant."""
    n_r, n_c = x.shape
    per_block = (n_r + n_blocks - 1) // n_blocks
    if given:
        _given_stats(mean, var, eps, stats)
    else:
        _cols_batch_stats(x, eps, stats, n_blocks, half)
    alpha = np.empty(n_c)
    beta = np.empty(n_c)
    _cols_affine_coefficients(stats, w, b, has_w, has_b, alpha, beta)
    _, alpha, beta, center = _centered_columns(alpha, alpha, beta, stats[0], half)
    for blk in prange(n_blocks):
        z = np.empty(n_c)
        flags, words = _mask_scratch(bits.shape[2])
        for row in range(blk * per_block, min(n_r, (blk + 1) * per_block)):
            r_row = r[row % r.shape[0]]
            if code == 1 or code == 2:
                _relu_family_row_cols(x[row], r_row, has_r, alpha, beta, center, code == 2,
                                      slope, out[row], flags, half)
                _pack_flags(words, bits[0, row])
            else:
                _z_row_cols(x[row], r_row, has_r, alpha, beta, center, z, half)
                _act_row(z, code, slope, out[row], keep, deriv[row % deriv.shape[0]], half)


def cols_act_forward(x, r, has_r, w, b, has_w, has_b, given, mean, var, eps, code, slope, out,
                     bits, keep, deriv, stats, like, shape, bits_shape, n_blocks, calc, half):
    """out = act(x * alpha[c] + beta[c] + r) for (R, C); bits packed along c per row (dtypes
    as in mid_act_forward)."""
    n_c = shape[1]
    x, r, w, b, bits, stats = _act_views(x, r, has_r, w, b, bits, stats, like, shape, (1, 1),
                                         bits_shape, calc)
    out, deriv = _at(out, like, shape), _at(deriv, like, shape if keep else (1, 1))
    mean, var = _at(mean, calc, (n_c,)), _at(var, calc, (n_c,))
    if half is None:
        _cols_act_forward(x, r, has_r, w, b, has_w, has_b, given, mean, var, eps, code, slope,
                          out, bits, keep, deriv, stats, n_blocks, None)
    elif half:
        _cols_act_forward(x, r, has_r, w, b, has_w, has_b, given, mean, var, eps, code, slope,
                          out, bits, keep, deriv, stats, n_blocks, True)
    else:
        _cols_act_forward(x, r, has_r, w, b, has_w, has_b, given, mean, var, eps, code, slope,
                          out, bits, keep, deriv, stats, n_blocks, False)


@njit(inline="always", cache=True, fastmath=FASTMATH, error_model="numpy")
def _cols_act_backward(x, r, has_r, dout, w, b, has_w, has_b, stats, batch_stats, code, slope,
                       bits, kept, deriv, dz, need_dx, dx, dw, db, n_blocks, n_tasks, in_place,
                       half):
    """cols_act_backward on its arrays, `half` a constant."""
    n_r, n_c = x.shape
    per_block = (n_r + n_blocks - 1) // n_blocks
    alpha = np.empty(n_c)
    beta = np.empty(n_c)
    _cols_affine_coefficients(stats, w, b, has_w, has_b, alpha, beta)
    mean = stats[0].copy()
    _, alpha, beta, center = _centered_columns(alpha, alpha, beta, mean, half)
    s1_part = np.zeros((n_blocks, n_c))
    s2_part = np.zeros((n_blocks, n_c))
    for blk in prange(n_blocks):
        z = np.empty(n_c)
        flags, words = _mask_scratch(bits.shape[2])
        row = blk * per_block
        end = min(n_r, (blk + 1) * per_block)
        while row < end:
            last = min(end, row + 4)
            for i in range(row, last):
                if code == 3 and not kept:
                    _z_row_cols(x[i], r[i % r.shape[0]], has_r, alpha, beta, center, z, half)
                if code == 1 or code == 2:
                    _unpack_flags(bits[0, i], words)
                _dz_row(dout[i], code, slope, flags, z, kept, deriv[i % deriv.shape[0]], dz[i],
                        half)
            _cols_sums(x, dz, row, last, mean, s1_part[blk], s2_part[blk], True, half)
            row = last
    p = np.empty(n_c)
    q = np.empty(n_c)
    zc = np.empty(n_c)
    _cols_grad_coefficients(s1_part, s2_part, stats, w, has_w, batch_stats, n_r, dw, db, p, q,
                            zc)
    if need_dx and in_place:
        _cols_elementwise(x, dz, True, p, q, zc, mean, dz, n_tasks, half)
    elif need_dx:
        _cols_elementwise(x, dz, True, p, q, zc, mean, dx, n_tasks, half)


def cols_act_backward(x, r, has_r, dout, w, b, has_w, has_b, stats, batch_stats, code, slope,
                      bits, kept, deriv, dz, need_dx, dx, dw, db, like, shape, bits_shape,
                      n_blocks, n_tasks, calc, half):
    """Column-wise backward of the fused op (see mid_act_backward): each block of rows writes
    its dz rows and sums them while they are in cache, four rows at a time; then dx as
    `cpu_kernels.cols_backward` with dy = dz (dtypes as in mid_act_backward)."""
    n_c = shape[1]
    x, r, w, b, bits, stats = _act_views(x, r, has_r, w, b, bits, stats, like, shape, (1, 1),
                                         bits_shape, calc)
    in_place = dz == dx  # dx overwrites dz: the loops then read and write one array
    dout, dz, dx = _at(dout, like, shape), _at(dz, like, shape), _at(dx, like, shape)
    deriv = _at(deriv, like, shape if kept else (1, 1))
    dw, db = _at(dw, calc, (n_c,)), _at(db, calc, (n_c,))
    if half is None:
        _cols_act_backward(x, r, has_r, dout, w, b, has_w, has_b, stats, batch_stats, code,
                           slope, bits, kept, deriv, dz, need_dx, dx, dw, db, n_blocks, n_tasks,
                           in_place, None)
    elif half:
        _cols_act_backward(x, r, has_r, dout, w, b, has_w, has_b, stats, batch_stats, code,
                           slope, bits, kept, deriv, dz, need_dx, dx, dw, db, n_blocks, n_tasks,
                           in_place, True)
    else:
        _cols_act_backward(x, r, has_r, dout, w, b, has_w, has_b, stats, batch_stats, code,
                           slope, bits, kept, deriv, dz, need_dx, dx, dw, db, n_blocks, n_tasks,
                           in_place, False)


_KERNELS = {fn.__name__: fn for fn in (mid_act_forward, mid_act_backward, cols_act_forward,
                                       cols_act_backward)}
parallel = types.SimpleNamespace(**{n: _compile(f, True) for n, f in _KERNELS.items()})
serial = types.SimpleNamespace(**{n: _compile(f, False) for n, f in _KERNELS.items()})
