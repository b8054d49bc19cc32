"""numba kernels of the CPU backend (fp32/fp64 data, fp64 accumulation).

Three memory shapes cover every op (see `normkit.backends.cpu_plan`):
- mid  (A, M, J, S): statistics per m over (a, j, s); affine per (m % Wm, j). BatchNorm NCHW
  (A=N, M=C), InstanceNorm (M=N*C), GroupNorm NCHW (M=N*G, J=C/G).
- rows (R, K): statistics per row, affine per column (LayerNorm).
- cols (R, C): statistics per column over rows, affine per column (BatchNorm channels_last / 2D).

Statistics are single-pass shifted sums in float64 (shift = the first element, so no
E[x²]-E[x]² cancellation); a mid/rows item is normalized right after its statistics, while its
data is still in cache. Reductions run in a fixed order (prange only splits independent items,
and block partials are summed in block order), so results are bitwise reproducible and do not
depend on the thread count. `fastmath` is limited to reassociation/contraction (no NaN/Inf
assumptions), which lets LLVM vectorize the sums.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

FASTMATH = {"reassoc", "contract"}
JIT = dict(cache=True, fastmath=FASTMATH, nogil=True)


@njit(inline="always", **JIT)
def _finish_stats(s1, s2, shift, count, eps):
    """(mean, biased var, rstd) from shifted sums s1 = Σ(x-shift), s2 = Σ(x-shift)²."""
    mu = s1 / count
    var = (s2 - s1 * mu) / count
    if var < 0.0:
        var = 0.0
    return shift + mu, var, 1.0 / np.sqrt(var + eps)


# ---------------------------------------------------------------- mid: (A, M, J, S)


@njit(parallel=True, **JIT)
def mid_forward_train(x, w, b, eps, y, mean_out, var_out, rstd_out):
    """y = (x - mean[m]) * rstd[m] * w[m % Wm, j] + b[m % Wm, j], stats over (a, j, s)."""
    n_a, n_m, n_j, n_s = x.shape
    n_w = w.shape[0]
    count = n_a * n_j * n_s
    for m in prange(n_m):
        shift = np.float64(x[0, m, 0, 0])
        s1 = 0.0
        s2 = 0.0
        for a in range(n_a):
            for j in range(n_j):
                for s in range(n_s):
                    d = np.float64(x[a, m, j, s]) - shift
                    s1 += d
                    s2 += d * d
        mean, var, rstd = _finish_stats(s1, s2, shift, count, eps)
        mean_out[m] = mean
        var_out[m] = var
        rstd_out[m] = rstd
        k = m % n_w
        for a in range(n_a):
            for j in range(n_j):
                alpha = rstd * w[k, j]
                beta = b[k, j] - mean * alpha
                for s in range(n_s):
                    y[a, m, j, s] = x[a, m, j, s] * alpha + beta


@njit(parallel=True, **JIT)
def mid_forward_given(x, w, b, mean, rstd, y):
    """y = (x - mean[m]) * rstd[m] * w[m % Wm, j] + b[m % Wm, j] with given statistics."""
    n_a, n_m, n_j, n_s = x.shape
    n_w = w.shape[0]
    for m in prange(n_m):
        k = m % n_w
        for a in range(n_a):
            for j in range(n_j):
                alpha = rstd[m] * w[k, j]
                beta = b[k, j] - mean[m] * alpha
                for s in range(n_s):
                    y[a, m, j, s] = x[a, m, j, s] * alpha + beta


@njit(parallel=True, **JIT)
def mid_backward(x, dy, w, mean, rstd, batch_stats, need_dx, dx, dw_part, db_part):
    """Per m: dw_part[m, j] = Σ dy·xhat, db_part[m, j] = Σ dy, and (need_dx) the input grad.

    With batch statistics dx = rstd·(g - mean(g) - xhat·mean(g·xhat)), g = dy·w; otherwise
    dx = g·rstd. Each m's data is read twice, the second time from cache.
    """
    n_a, n_m, n_j, n_s = x.shape
    n_w = w.shape[0]
    count = n_a * n_j * n_s
    for m in prange(n_m):
        mu = mean[m]
        r = rstd[m]
        k = m % n_w
        sum_g = 0.0
        sum_gx = 0.0
        for j in range(n_j):
            sdy = 0.0
            sdyx = 0.0
            for a in range(n_a):
                for s in range(n_s):
                    d = np.float64(dy[a, m, j, s])
                    sdy += d
                    sdyx += d * (np.float64(x[a, m, j, s]) - mu)
            dw_part[m, j] = sdyx * r
            db_part[m, j] = sdy
            sum_g += sdy * w[k, j]
            sum_gx += sdyx * r * w[k, j]
        if need_dx:
            c_mean = sum_g / count if batch_stats else 0.0
            c_x = sum_gx / count * r if batch_stats else 0.0
            q = -r * c_x
            z = -r * c_mean - q * mu
            for a in range(n_a):
                for j in range(n_j):
                    p = r * w[k, j]
                    for s in range(n_s):
                        dx[a, m, j, s] = dy[a, m, j, s] * p + x[a, m, j, s] * q + z


# ---------------------------------------------------------------- rows: (R, K)


@njit(parallel=True, **JIT)
def rows_forward_train(x, w, b, eps, y, mean_out, var_out, rstd_out):
    """Per row r: y = (x - mean[r]) * rstd[r] * w[k] + b[k]."""
    n_r, n_k = x.shape
    for r in prange(n_r):
        shift = np.float64(x[r, 0])
        s1 = 0.0
        s2 = 0.0
        for k in range(n_k):
            d = np.float64(x[r, k]) - shift
            s1 += d
            s2 += d * d
        mean, var, rstd = _finish_stats(s1, s2, shift, n_k, eps)
        mean_out[r] = mean
        var_out[r] = var
        rstd_out[r] = rstd
        for k in range(n_k):
            y[r, k] = (x[r, k] - mean) * rstd * w[k] + b[k]


@njit(parallel=True, **JIT)
def rows_backward(x, dy, w, mean, rstd, need_dx, dx, dw_part, db_part):
    """Row-wise backward; dw/db partial sums per block of rows (dw_part.shape[0] blocks)."""
    n_r, n_k = x.shape
    n_blocks = dw_part.shape[0]
    per_block = (n_r + n_blocks - 1) // n_blocks
    for blk in prange(n_blocks):
        for r in range(blk * per_block, min(n_r, (blk + 1) * per_block)):
            mu = mean[r]
            rs = rstd[r]
            sum_g = 0.0
            sum_gx = 0.0
            for k in range(n_k):
                d = np.float64(dy[r, k])
                xh = (np.float64(x[r, k]) - mu) * rs
                dw_part[blk, k] += d * xh
                db_part[blk, k] += d
                g = d * w[k]
                sum_g += g
                sum_gx += g * xh
            if need_dx:
                c_mean = sum_g / n_k
                c_x = sum_gx / n_k
                for k in range(n_k):
                    xh = (np.float64(x[r, k]) - mu) * rs
                    dx[r, k] = (dy[r, k] * w[k] - c_mean - xh * c_x) * rs


# ---------------------------------------------------------------- cols: (R, C)


@njit(parallel=True, **JIT)
def cols_sums(x, shift, s1_part, s2_part):
    """Per block of rows: Σ(x-shift[c]) and Σ(x-shift[c])² for every column c."""
    n_r, n_c = x.shape
    n_blocks = s1_part.shape[0]
    per_block = (n_r + n_blocks - 1) // n_blocks
    for blk in prange(n_blocks):
        s1 = np.zeros(n_c)
        s2 = np.zeros(n_c)
        for r in range(blk * per_block, min(n_r, (blk + 1) * per_block)):
            for c in range(n_c):
                d = np.float64(x[r, c]) - shift[c]
                s1[c] += d
                s2[c] += d * d
        s1_part[blk] = s1
        s2_part[blk] = s2


@njit(parallel=True, **JIT)
def cols_grad_sums(x, dy, mean, sdy_part, sdyx_part):
    """Per block of rows: Σdy and Σdy·(x - mean[c]) for every column c."""
    n_r, n_c = x.shape
    n_blocks = sdy_part.shape[0]
    per_block = (n_r + n_blocks - 1) // n_blocks
    for blk in prange(n_blocks):
        s1 = np.zeros(n_c)
        s2 = np.zeros(n_c)
        for r in range(blk * per_block, min(n_r, (blk + 1) * per_block)):
            for c in range(n_c):
                d = np.float64(dy[r, c])
                s1[c] += d
                s2[c] += d * (np.float64(x[r, c]) - mean[c])
        sdy_part[blk] = s1
        sdyx_part[blk] = s2


@njit(parallel=True, **JIT)
def cols_affine(x, alpha, beta, y, n_blocks):
    """y[r, c] = x[r, c] * alpha[c] + beta[c]."""
    n_r, n_c = x.shape
    per_block = (n_r + n_blocks - 1) // n_blocks
    for blk in prange(n_blocks):
        for r in range(blk * per_block, min(n_r, (blk + 1) * per_block)):
            for c in range(n_c):
                y[r, c] = x[r, c] * alpha[c] + beta[c]


@njit(parallel=True, **JIT)
def cols_affine2(x, dy, p, q, z, dx, n_blocks):
    """dx[r, c] = dy[r, c] * p[c] + x[r, c] * q[c] + z[c]."""
    n_r, n_c = x.shape
    per_block = (n_r + n_blocks - 1) // n_blocks
    for blk in prange(n_blocks):
        for r in range(blk * per_block, min(n_r, (blk + 1) * per_block)):
            for c in range(n_c):
                dx[r, c] = dy[r, c] * p[c] + x[r, c] * q[c] + z[c]
