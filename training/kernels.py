"""Compiled (numba) kernels of the AMHT-LRS engine: the fast twins of ``lrs_rec.engine.steps``' numpy code.

The core engine (``lrs_rec.engine``) is numpy/scipy only and takes these by injection
(:func:`install` → ``lrs_rec.engine.parallel.configure(kernels=...)``); its numpy code stays the
reference backend, and ``tests/test_training_kernels.py`` compares every kernel with it.

Every kernel reads the ratings in CSR order (by user or by item: ``indptr`` + the other side's
int32 indices + the ratings) and accumulates one user's (item's) normal equations straight from the
feature rows (float64 accumulation), without per-rating gathered d-vectors for a whole block. The
outer loops are ``numba.prange`` over fixed chunks of rows whose outputs are independent, so the
result is the same bit for bit for any thread count; reductions over users (the prior's sums, the
squared error) return per-chunk partial sums that the engine adds in chunk order.

* :func:`fit_users` — the user step (``steps._fit_users``): per user G = XᵀX, h = Xᵀt, s = Σx, n,
  T = Σt; the (r+1) ridge solve of (c_u, w_u) with the population prior (Gaussian elimination with
  partial pivoting, as ``np.linalg.solve``), then b_u by the ridge over all d coordinates
  (Cholesky, factored once per user), top-k by |value| (ties to the lower index, as
  ``lrs_rec.thresholding.top_k_indices``) and the k × k refit; ``n_inner`` rounds.
* :func:`user_projected_means` — z_u = Uᵀ(mean of u's rated items' f_i) for the prior statistics.
* :func:`fit_items` — the item refinement (``item_block_statistics`` + ``solve_items``) from θ_u rows.
* :func:`item_statistics` — the item normal equations of a block (the additive form).
* :func:`als_half_step` — one half-step of the biased ALS-WR initialisation (``als_factors``).
* :func:`rating_dots` — ⟨f_i, θ_u⟩ per rating (predictions, losses, item-bias residuals).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

CHUNK = 256  # rows per parallel task (fixed: the partition does not depend on the thread count)


# ------------------------------------------------------------------------------------------------
# small dense solvers (scratch buffers passed in; no allocation per row)
# ------------------------------------------------------------------------------------------------
@njit(cache=True, inline="always")
def _lu_solve(M: np.ndarray, b: np.ndarray, x: np.ndarray, n: int) -> None:
    """x = M⁻¹ b for the leading n × n block of M (destroyed), Gaussian elimination with partial
    pivoting (LAPACK gesv's pivot rule: the first largest magnitude)."""
    for i in range(n):
        x[i] = b[i]
    for col in range(n):
        piv = col
        best = abs(M[col, col])
        for row in range(col + 1, n):
            v = abs(M[row, col])
            if v > best:
                best = v
                piv = row
        if piv != col:
            for j in range(n):
                tmp = M[col, j]
                M[col, j] = M[piv, j]
                M[piv, j] = tmp
            tmp = x[col]
            x[col] = x[piv]
            x[piv] = tmp
        inv = 1.0 / M[col, col]
        for row in range(col + 1, n):
            f = M[row, col] * inv
            if f != 0.0:
                for j in range(col + 1, n):
                    M[row, j] -= f * M[col, j]
                x[row] -= f * x[col]
    for i in range(n - 1, -1, -1):
        acc = x[i]
        for j in range(i + 1, n):
            acc -= M[i, j] * x[j]
        x[i] = acc / M[i, i]


@njit(cache=True, inline="always")
def _cholesky(M: np.ndarray, L: np.ndarray, n: int) -> None:
    """Lower Cholesky factor L of the leading n × n block of the SPD matrix M."""
    for j in range(n):
        acc = M[j, j]
        for p in range(j):
            acc -= L[j, p] * L[j, p]
        ljj = np.sqrt(acc)
        L[j, j] = ljj
        inv = 1.0 / ljj
        for i in range(j + 1, n):
            acc = M[i, j]
            for p in range(j):
                acc -= L[i, p] * L[j, p]
            L[i, j] = acc * inv


@njit(cache=True, inline="always")
def _cholesky_solve(L: np.ndarray, b: np.ndarray, x: np.ndarray, n: int) -> None:
    for i in range(n):
        acc = b[i]
        for p in range(i):
            acc -= L[i, p] * x[p]
        x[i] = acc / L[i, i]
    for i in range(n - 1, -1, -1):
        acc = x[i]
        for p in range(i + 1, n):
            acc -= L[p, i] * x[p]
        x[i] = acc / L[i, i]


# ------------------------------------------------------------------------------------------------
# user step
# ------------------------------------------------------------------------------------------------
@njit(cache=True, parallel=True)
def fit_users(
    indptr: np.ndarray,  # (n_users + 1,) int64, absolute offsets into items / ratings
    items: np.ndarray,  # int32, the rated items in user order
    ratings: np.ndarray,  # float64, in the same order
    F: np.ndarray,  # (n_items, d)
    item_bias: np.ndarray,  # (n_items,)
    mu: float,
    U: np.ndarray,  # (d, r)
    B: np.ndarray,  # (n_users, d) the current b_u (read), overwritten with the new ones
    W: np.ndarray,  # (n_users, r) output
    c: np.ndarray,  # (n_users,) output
    k: int,
    user_bias: bool,
    reg_w: float,
    reg_b: float,
    reg_bias: float,
    n_inner: int,
    prec: np.ndarray,  # (r, r) the prior's precision shape
    w_bar: np.ndarray,  # (r,)
    z_bar: np.ndarray,  # (r,)
    A_cond: np.ndarray,  # (r, r), used when conditional
    conditional: bool,
) -> None:
    n_users = indptr.shape[0] - 1
    d, r = U.shape
    n_chunks = (n_users + CHUNK - 1) // CHUNK
    for ch in prange(n_chunks):
        G = np.empty((d, d))
        h = np.empty(d)
        s = np.empty(d)
        GU = np.empty((d, r))
        UGU = np.empty((r, r))
        sU = np.empty(r)
        m = np.empty(r)
        pm = np.empty(r)
        z = np.empty(r)
        b = np.empty(d)
        Gb = np.empty(d)
        M = np.empty((r + 1, r + 1))
        rhs = np.empty(r + 1)
        sol = np.empty(r + 1)
        L = np.empty((d, d))
        xr = np.empty(d)
        full = np.empty(d)
        chosen = np.empty(d, dtype=np.bool_)
        idx = np.empty(max(k, 1), dtype=np.int64)
        Ms = np.empty((max(k, 1), max(k, 1)))
        rs = np.empty(max(k, 1))
        vs = np.empty(max(k, 1))
        for u in range(ch * CHUNK, min(n_users, (ch + 1) * CHUNK)):
            G[:, :] = 0.0
            h[:] = 0.0
            s[:] = 0.0
            T = 0.0
            lo, hi = indptr[u], indptr[u + 1]
            for j in range(lo, hi):
                i = items[j]
                t = ratings[j] - mu - item_bias[i]
                T += t
                for a in range(d):
                    xa = F[i, a]
                    h[a] += xa * t
                    s[a] += xa
                    for bb in range(d):
                        G[a, bb] += xa * F[i, bb]
            n = float(hi - lo)
            for a in range(d):
                for q in range(r):
                    acc = 0.0
                    for bb in range(d):
                        acc += G[a, bb] * U[bb, q]
                    GU[a, q] = acc
            for p in range(r):
                acc = 0.0
                for a in range(d):
                    acc += s[a] * U[a, p]
                sU[p] = acc
                for q in range(r):
                    acc = 0.0
                    for a in range(d):
                        acc += U[a, p] * GU[a, q]
                    UGU[p, q] = acc
            # prior mean m_u and reg_w · Σ̃⁻¹ m_u
            if conditional:
                nn = max(n, 1.0)
                for p in range(r):
                    z[p] = sU[p] / nn - z_bar[p]
                for q in range(r):
                    acc = 0.0
                    for p in range(r):
                        acc += z[p] * A_cond[p, q]
                    m[q] = w_bar[q] + acc
            else:
                for q in range(r):
                    m[q] = w_bar[q]
            for q in range(r):
                acc = 0.0
                for p in range(r):
                    acc += m[p] * prec[p, q]
                pm[q] = reg_w * acc
            for a in range(d):
                b[a] = B[u, a]
            if k > 0:
                for a in range(d):
                    for bb in range(d):
                        M2 = G[a, bb]
                        L[a, bb] = M2
                    L[a, a] += reg_b
                # factor G + λ_b I in place (lower triangle)
                _cholesky(L, L, d)
            cu = 0.0
            for _ in range(n_inner):
                for a in range(d):
                    acc = 0.0
                    for bb in range(d):
                        acc += G[a, bb] * b[bb]
                    Gb[a] = acc
                M[0, 0] = n + (reg_bias if user_bias else 0.0)
                for p in range(r):
                    M[0, p + 1] = sU[p]
                    M[p + 1, 0] = sU[p]
                    for q in range(r):
                        M[p + 1, q + 1] = UGU[p, q] + reg_w * prec[p, q]
                acc = T
                for a in range(d):
                    acc -= s[a] * b[a]
                rhs[0] = acc
                for q in range(r):
                    acc = 0.0
                    for a in range(d):
                        acc += (h[a] - Gb[a]) * U[a, q]
                    rhs[q + 1] = acc + pm[q]
                if not user_bias:
                    for p in range(r + 1):
                        M[0, p] = 0.0
                        M[p, 0] = 0.0
                    M[0, 0] = 1.0
                    rhs[0] = 0.0
                _lu_solve(M, rhs, sol, r + 1)
                cu = sol[0]
                if k > 0:
                    for a in range(d):
                        acc = h[a] - cu * s[a]
                        for q in range(r):
                            acc -= GU[a, q] * sol[q + 1]
                        xr[a] = acc
                    _cholesky_solve(L, xr, full, d)
                    # top-k by |value|, ties to the lower index; then ascending indices
                    chosen[:] = False
                    for _kk in range(k):
                        best = -1
                        bv = 0.0
                        for a in range(d):
                            if not chosen[a]:
                                v = abs(full[a])
                                if best < 0 or v > bv:
                                    best = a
                                    bv = v
                        chosen[best] = True
                    kk = 0
                    for a in range(d):
                        if chosen[a]:
                            idx[kk] = a
                            kk += 1
                    for p in range(k):
                        for q in range(k):
                            Ms[p, q] = G[idx[p], idx[q]]
                        Ms[p, p] += reg_b
                        rs[p] = xr[idx[p]]
                    _lu_solve(Ms, rs, vs, k)
                    b[:] = 0.0
                    for p in range(k):
                        b[idx[p]] = vs[p]
                else:
                    b[:] = 0.0
            c[u] = cu
            for q in range(r):
                W[u, q] = sol[q + 1]
            for a in range(d):
                B[u, a] = b[a]


@njit(cache=True, parallel=True)
def user_projected_means(
    indptr: np.ndarray, items: np.ndarray, F: np.ndarray, U: np.ndarray, Z: np.ndarray
) -> None:
    """Z[u] = Uᵀ (Σ f_i over u's rated items) / max(n_u, 1) for the users of ``indptr``."""
    n_users = indptr.shape[0] - 1
    d, r = U.shape
    n_chunks = (n_users + CHUNK - 1) // CHUNK
    for ch in prange(n_chunks):
        s = np.empty(d)
        for u in range(ch * CHUNK, min(n_users, (ch + 1) * CHUNK)):
            s[:] = 0.0
            lo, hi = indptr[u], indptr[u + 1]
            for j in range(lo, hi):
                i = items[j]
                for a in range(d):
                    s[a] += F[i, a]
            nn = max(float(hi - lo), 1.0)
            for q in range(r):
                acc = 0.0
                for a in range(d):
                    acc += s[a] * U[a, q]
                Z[u, q] = acc / nn


# ------------------------------------------------------------------------------------------------
# item step
# ------------------------------------------------------------------------------------------------
@njit(cache=True, inline="always")
def _item_normal_equations(
    lo: int,
    hi: int,
    users: np.ndarray,
    ratings: np.ndarray,
    Theta: np.ndarray,
    user_bias: np.ndarray,
    mu: float,
    G: np.ndarray,
    h: np.ndarray,
) -> None:
    e = Theta.shape[1] + 1
    G[:, :] = 0.0
    h[:] = 0.0
    for j in range(lo, hi):
        u = users[j]
        t = ratings[j] - mu - user_bias[u]
        G[0, 0] += 1.0
        h[0] += t
        for a in range(1, e):
            za = Theta[u, a - 1]
            G[a, 0] += za
            h[a] += za * t
            for bb in range(1, e):
                G[a, bb] += za * Theta[u, bb - 1]
    for a in range(1, e):
        G[0, a] = G[a, 0]


@njit(cache=True, parallel=True)
def fit_items(
    indptr: np.ndarray,  # (n_items + 1,) int64
    users: np.ndarray,  # int32, the raters in item order
    ratings: np.ndarray,
    Theta: np.ndarray,  # (n_users, d) θ_u = U w_u + b_u
    user_bias: np.ndarray,
    mu: float,
    reg_features: float,
    reg_bias: float,
    out: np.ndarray,  # (n_items, d + 1): (c_i, f_i)
) -> None:
    n_items = indptr.shape[0] - 1
    e = Theta.shape[1] + 1
    n_chunks = (n_items + CHUNK - 1) // CHUNK
    for ch in prange(n_chunks):
        G = np.empty((e, e))
        h = np.empty(e)
        x = np.empty(e)
        for i in range(ch * CHUNK, min(n_items, (ch + 1) * CHUNK)):
            _item_normal_equations(
                indptr[i], indptr[i + 1], users, ratings, Theta, user_bias, mu, G, h
            )
            G[0, 0] += reg_bias
            for a in range(1, e):
                G[a, a] += reg_features
            _lu_solve(G, h, x, e)
            for a in range(e):
                out[i, a] = x[a]


@njit(cache=True, parallel=True)
def item_statistics(
    indptr: np.ndarray,
    users: np.ndarray,
    ratings: np.ndarray,
    Theta: np.ndarray,
    user_bias: np.ndarray,
    mu: float,
    G_out: np.ndarray,  # (n_items, d + 1, d + 1)
    h_out: np.ndarray,  # (n_items, d + 1)
) -> None:
    n_items = indptr.shape[0] - 1
    n_chunks = (n_items + CHUNK - 1) // CHUNK
    for ch in prange(n_chunks):
        for i in range(ch * CHUNK, min(n_items, (ch + 1) * CHUNK)):
            _item_normal_equations(
                indptr[i], indptr[i + 1], users, ratings, Theta, user_bias, mu, G_out[i], h_out[i]
            )


# ------------------------------------------------------------------------------------------------
# biased ALS-WR initialisation
# ------------------------------------------------------------------------------------------------
@njit(cache=True, parallel=True)
def als_half_step(
    indptr: np.ndarray,  # (n_own + 1,) int64
    other: np.ndarray,  # int32, the other side's index per rating, in own order
    y: np.ndarray,  # ratings in own order
    other_f: np.ndarray,  # (n_other, dim)
    other_bias: np.ndarray,  # (n_other,)
    mu: float,
    reg: float,
    reg_bias: float,
    min_count: float,
    out: np.ndarray,  # (n_own, dim + 1): (bias, factors)
) -> None:
    """Per own row: ridge of t = y - μ - c_other on [1, other_f] with λ_b on the bias and
    λ · max(n, min_count) on the factors (Cholesky of the SPD normal matrix)."""
    n_own = indptr.shape[0] - 1
    dim = other_f.shape[1]
    e = dim + 1
    n_chunks = (n_own + CHUNK - 1) // CHUNK
    for ch in prange(n_chunks):
        G = np.empty((e, e))
        h = np.empty(e)
        x = np.empty(e)
        for o in range(ch * CHUNK, min(n_own, (ch + 1) * CHUNK)):
            G[:, :] = 0.0
            h[:] = 0.0
            lo, hi = indptr[o], indptr[o + 1]
            for j in range(lo, hi):
                q = other[j]
                t = y[j] - mu - other_bias[q]
                G[0, 0] += 1.0
                h[0] += t
                for a in range(1, e):
                    za = other_f[q, a - 1]
                    G[a, 0] += za
                    h[a] += za * t
                    for bb in range(1, e):
                        G[a, bb] += za * other_f[q, bb - 1]
            for a in range(1, e):
                G[0, a] = G[a, 0]
            G[0, 0] += reg_bias
            lam = reg * max(float(hi - lo), min_count)
            for a in range(1, e):
                G[a, a] += lam
            _lu_solve(G, h, x, e)
            for a in range(e):
                out[o, a] = x[a]


# ------------------------------------------------------------------------------------------------
# predictions
# ------------------------------------------------------------------------------------------------
@njit(cache=True, parallel=True)
def rating_dots(
    users: np.ndarray, items: np.ndarray, Theta: np.ndarray, F: np.ndarray, out: np.ndarray
) -> None:
    """out[j] = ⟨F[items[j]], Θ[users[j]]⟩."""
    n = users.shape[0]
    d = F.shape[1]
    n_chunks = (n + 4 * CHUNK - 1) // (4 * CHUNK)
    for ch in prange(n_chunks):
        for j in range(ch * 4 * CHUNK, min(n, (ch + 1) * 4 * CHUNK)):
            u, i = users[j], items[j]
            acc = 0.0
            for a in range(d):
                acc += F[i, a] * Theta[u, a]
            out[j] = acc


class NumbaKernels:
    """The compiled backend the engine calls (``lrs_rec.engine.parallel.configure(kernels=...)``)."""

    name = "numba"
    fit_users = staticmethod(fit_users)
    user_projected_means = staticmethod(user_projected_means)
    fit_items = staticmethod(fit_items)
    item_statistics = staticmethod(item_statistics)
    als_half_step = staticmethod(als_half_step)
    rating_dots = staticmethod(rating_dots)

    def set_threads(self, n: int) -> None:
        import numba

        numba.set_num_threads(max(1, min(int(n), numba.config.NUMBA_NUM_THREADS)))


def install(n_threads: int | None = None) -> NumbaKernels:
    """Select the compiled kernels for the engine (and numba's thread count)."""
    from lrs_rec.engine.parallel import configure

    k = NumbaKernels()
    configure(n_threads=n_threads, kernels=k)
    return k
