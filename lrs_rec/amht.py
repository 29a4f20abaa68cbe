"""AMHT-LRS: alternating minimisation with hard thresholding (paper Sec. 2.1, Algorithms 1 and 2).

Each outer iteration ℓ (Algorithm 1):

1. b-step (Eq. 3): for every user, a sparse update of b_u given U and w_u — either the paper's
   Algorithm 2 (gradient step + hard threshold HT(·, Δ) with its Δ/γ schedule, ``b_step="iht"``,
   with a stable normalised step instead of 1/m) or hard-thresholding pursuit (support from the
   thresholded gradient step, then least squares jointly on ``[X_u U, X_u[:, S_u]]`` for (w_u, b_u),
   ``b_step="htp"``, the default), with OMP and IRLS restarts kept per user where they fit better.
2. w-step (Eq. 4): per-user least squares for w_u given U and b_u.
3. U-step (Eq. 5): least squares over vec(U), then a QR decomposition. The normal equations are
   ``A vec(U) = vec(V)`` with ``A = Σ_u w_u w_uᵀ ⊗ Σ_j x_j x_jᵀ`` and ``V = Σ_j x_j (y_j − x_jᵀ b_u) w_uᵀ``
   (the non-private form of Eq. 7–8); by default (``u_step="joint"``) each b_u is re-optimised on its
   support jointly with U (variable projection). Solved directly when d·r is small, otherwise by
   matrix-free conjugate gradients (O(N·d·r) per step).

Everything per user is vectorised across users: samples are sorted by user once, per-user sums are
segment sums (sparse incidence products), and the small per-user least-squares systems are solved in
batches grouped by sample count. :mod:`lrs_rec.amht_reference` is the slow per-user-loop twin.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Literal

import numpy as np
import scipy.sparse as sp

from lrs_rec._types import FloatArray, IntArray
from lrs_rec.init import moments_init, random_orthonormal
from lrs_rec.model import LRSModel
from lrs_rec.thresholding import enforce_row_sparsity, top_k_indices
from lrs_rec.validation import (
    check_fit_inputs,
    check_non_negative,
    check_rank_sparsity,
    check_users,
    check_X,
)

JITTER = 1e-10
"""Relative diagonal jitter (times the mean diagonal of the Gram) that keeps every small
least-squares solve well posed, e.g. for users with fewer samples than unknowns."""

DIRECT_MAX_DR = 1024
"""``u_solver="auto"`` solves the (dr × dr) normal equations directly up to this d·r, else uses CG."""

CG_MAXITER = 100
"""Inside the estimator each CG U-step is warm-started and capped at this many iterations (an inexact
U-step is fine for alternating minimisation; the outer loop keeps refining)."""

GRAM_CACHE_MAX = 20_000_000
"""The direct U-step caches the per-user Grams X_uᵀX_u (t·d² floats) when t·d² is at most this;
A = Σ_u w_u w_uᵀ ⊗ X_uᵀX_u then costs O(t·d²·r²) per iteration instead of O(N·d²·r²)."""

Callback = Callable[[int, LRSModel], None]


# ---------------------------------------------------------------------------------------------
# Data layout: samples sorted by user, per-user segments and count buckets
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Bucket:
    users: IntArray  # (n_b,) users in this bucket
    rows: IntArray  # (n_b, m_pad) row indices into the user-sorted samples (pads repeat a row)
    mask: FloatArray | None  # (n_b, m_pad) 1 for real rows, 0 for pads; None when unpadded


@dataclass(frozen=True)
class UserData:
    """Samples sorted by user, with the per-user segments used by the vectorised steps.

    ``X: (N, d)``, ``y: (N,)``, ``user_of: (N,)`` non-decreasing; user u owns rows
    ``starts[u] : starts[u] + counts[u]`` (every user has at least one row).
    """

    X: FloatArray
    y: FloatArray
    user_of: IntArray
    starts: IntArray
    counts: IntArray
    buckets: tuple[_Bucket, ...]

    @property
    def n_users(self) -> int:
        return int(self.counts.shape[0])

    @property
    def d(self) -> int:
        return int(self.X.shape[1])

    @classmethod
    def build(
        cls, X: FloatArray, y: FloatArray, users: IntArray, n_users: int
    ) -> tuple[UserData, IntArray]:
        """Sort by user (stable); returns the data and the permutation ``order`` applied."""
        order = np.argsort(users, kind="stable").astype(np.int64)
        user_of = users[order]
        counts = np.bincount(user_of, minlength=n_users).astype(np.int64)
        if np.any(counts == 0):
            raise ValueError("every user needs at least one sample")
        starts = np.concatenate(([0], np.cumsum(counts)[:-1])).astype(np.int64)
        return (
            cls(
                X=np.ascontiguousarray(X[order]),
                y=np.ascontiguousarray(y[order]),
                user_of=user_of,
                starts=starts,
                counts=counts,
                buckets=_make_buckets(starts, counts),
            ),
            order,
        )

    def segment_sum(self, values: FloatArray) -> FloatArray:
        """Per-user sums of ``values: (N, ...)`` → ``(n_users, ...)``."""
        return np.asarray(np.add.reduceat(values, self.starts, axis=0), dtype=np.float64)

    def subset(self, keep: np.ndarray[Any, Any]) -> tuple[UserData, IntArray]:
        """The data of the users with ``keep[u]`` (renumbered 0.., same order) and their row indices."""
        if keep.all():
            return self, np.arange(self.X.shape[0], dtype=np.int64)
        rows = np.flatnonzero(keep[self.user_of]).astype(np.int64)
        new_id = np.cumsum(keep) - 1
        sub, _ = UserData.build(
            self.X[rows], self.y[rows], new_id[self.user_of[rows]], int(keep.sum())
        )
        return sub, rows

    @cached_property
    def col_norms(self) -> FloatArray:
        """Per-user column norms ``‖X_u[:, i]‖`` → ``(n_users, d)`` (zeros replaced by 1)."""
        c = np.sqrt(self.segment_sum(self.X * self.X))
        c[c == 0] = 1.0
        return c

    def gather(self, S: IntArray) -> FloatArray:
        """``X[j, S[user_of[j]]]`` for every sample: each sample's covariates on its user's support
        ``S: (n_users, k)`` → ``(N, k)``."""
        N, d = self.X.shape
        flat = (np.arange(N, dtype=np.int64) * d)[:, None] + S[self.user_of]
        return np.asarray(self.X.reshape(-1)[flat], dtype=np.float64)

    def user_grams(self) -> FloatArray:
        """Per-user Gram matrices ``X_uᵀ X_u`` → ``(n_users, d, d)`` (batched by count bucket)."""
        G = np.empty((self.n_users, self.d, self.d))
        for b in self.buckets:
            Xp = self.X[b.rows]
            if b.mask is not None:
                Xp = Xp * b.mask[:, :, None]
            G[b.users] = np.matmul(Xp.transpose(0, 2, 1), Xp)
        return G

    def segment_xt(self, res: FloatArray) -> FloatArray:
        """Per-user ``X_uᵀ res_u`` → ``(n_users, d)`` without an (N, d) temporary."""
        N = self.X.shape[0]
        indptr = np.concatenate((self.starts, [N]))
        P = sp.csr_array((res, np.arange(N), indptr), shape=(self.n_users, N))
        return np.asarray(P @ self.X, dtype=np.float64)


def _make_buckets(starts: IntArray, counts: IntArray) -> tuple[_Bucket, ...]:
    """Group users whose counts share the same power-of-two ceiling; pad to the bucket's max count."""
    key = np.ceil(np.log2(np.maximum(counts, 1))).astype(np.int64)
    out = []
    for kv in np.unique(key):
        members = np.flatnonzero(key == kv).astype(np.int64)
        c = counts[members]
        m_pad = int(c.max())
        j = np.arange(m_pad)
        rows = starts[members][:, None] + np.minimum(j[None, :], c[:, None] - 1)
        mask = None if int(c.min()) == m_pad else (j[None, :] < c[:, None]).astype(np.float64)
        out.append(_Bucket(users=members, rows=rows.astype(np.int64), mask=mask))
    return tuple(out)


def _solve_spd(G: FloatArray, h: FloatArray, ridge: FloatArray) -> FloatArray:
    """Solve ``(G + diag(ridge) + jitter·I) s = h`` for a batch ``G: (n, p, p)``, ``h: (n, p)``."""
    p = G.shape[-1]
    scale = np.trace(G, axis1=-2, axis2=-1) / max(p, 1)
    jitter = JITTER * np.maximum(scale, 1e-30)
    Greg = G + (ridge[None, :] + jitter[:, None])[:, :, None] * np.eye(p)[None, :, :]
    return np.asarray(np.linalg.solve(Greg, h[..., None])[..., 0], dtype=np.float64)


def _batched_ls(data: UserData, F: FloatArray, t: FloatArray, ridge: FloatArray) -> FloatArray:
    """Per-user least squares ``min_s ‖F_u s − t_u‖² + Σ_i ridge_i s_i²`` → ``(n_users, p)``.

    ``F: (N, p)`` are per-sample features (user-sorted), ``t: (N,)`` targets; users are solved in
    batches of similar sample count (one batched ``np.linalg.solve`` per bucket).
    """
    p = F.shape[1]
    out = np.zeros((data.n_users, p))
    for b in data.buckets:
        Fp = F[b.rows]
        tp = t[b.rows]
        if b.mask is not None:
            Fp = Fp * b.mask[:, :, None]
            tp = tp * b.mask
        G = np.matmul(Fp.transpose(0, 2, 1), Fp)
        h = np.einsum("bmp,bm->bp", Fp, tp)
        out[b.users] = _solve_spd(G, h, ridge)
    return out


# ---------------------------------------------------------------------------------------------
# Elementary pieces
# ---------------------------------------------------------------------------------------------
def sparse_predict(
    X: FloatArray, users: IntArray, B_idx: IntArray, B_val: FloatArray
) -> FloatArray:
    """``x_jᵀ b_{u_j}`` for every sample, using the compressed B (O(N·k))."""
    if B_idx.shape[1] == 0:
        return np.zeros(X.shape[0])
    return np.asarray(
        np.einsum("nk,nk->n", gather_rows(X, B_idx[users]), B_val[users]),
        dtype=np.float64,
    )


def gather_rows(M: FloatArray, idx: IntArray) -> FloatArray:
    """``out[n, i] = M[n, idx[n, i]]`` (``np.take_along_axis(M, idx, axis=1)``, via flat indexing)."""
    n, d = M.shape
    flat = np.ascontiguousarray(M).reshape(-1)
    return np.asarray(flat[np.arange(n)[:, None] * d + idx], dtype=np.float64)


def _low_rank_predict(Z: FloatArray, W: FloatArray, users: IntArray) -> FloatArray:
    return np.asarray(np.einsum("nr,nr->n", Z, W[users]), dtype=np.float64)


def _dense_b(B_idx: IntArray, B_val: FloatArray, d: int) -> FloatArray:
    B = np.zeros((B_idx.shape[0], d))
    np.put_along_axis(B, B_idx, B_val, axis=1)
    return B


def _compress_b(C: FloatArray, k: int) -> tuple[IntArray, FloatArray]:
    """Keep the top-k magnitudes of each row of a dense (n_users, d) matrix."""
    idx = top_k_indices(C, k)
    return idx, np.take_along_axis(C, idx, axis=1)


def _normalized_step(data: UserData, g: FloatArray, k: int) -> FloatArray:
    """Per-user step size η_u = ‖g_S‖² / ‖X_{u,S} g_S‖² with S the top-k entries of |g_u|.

    This is the exact line-search step along the thresholded gradient (normalised IHT, Blumensath &
    Davies 2010). Unlike the paper's 1/m it is stable when m_u < d: it never exceeds
    1/σ_min²(X_{u,S}) and adapts to each user's sample count and covariates. (After an HTP least
    squares the gradient vanishes on the current support, so S must come from g itself.)
    """
    S = top_k_indices(g, k)
    gS = gather_rows(g, S)
    num = np.sum(gS * gS, axis=1)
    Xg = np.einsum("nk,nk->n", data.gather(S), gS[data.user_of])
    den = data.segment_sum(Xg * Xg)
    eta = 1.0 / data.counts.astype(np.float64)
    ok = den > 0
    eta[ok] = num[ok] / den[ok]
    return eta


# ---------------------------------------------------------------------------------------------
# Steps on user-sorted data (the hot path)
# ---------------------------------------------------------------------------------------------
def _w_step(
    data: UserData, Z: FloatArray, B_idx: IntArray, B_val: FloatArray, ridge_w: float
) -> FloatArray:
    t = data.y - sparse_predict(data.X, data.user_of, B_idx, B_val)
    return _batched_ls(data, Z, t, np.full(Z.shape[1], ridge_w))


def _objective(
    data: UserData,
    F: FloatArray,
    sol: FloatArray,
    ridge: FloatArray,
) -> FloatArray:
    """Per-user ``‖y_u − F_u s_u‖² + Σ_i ridge_i s_{u,i}²``."""
    res = data.y - np.einsum("np,np->n", F, sol[data.user_of])
    return data.segment_sum(res * res) + (sol * sol) @ ridge


def _omp(
    data: UserData, Z: FloatArray, k: int, ridge: FloatArray
) -> tuple[IntArray, FloatArray, FloatArray]:
    """Orthogonal matching pursuit for every user with U fixed: k greedy picks of the coordinate
    most correlated (normalised by column norm) with the residual of the least squares on
    ``[X_u U, X_u[:, S]]``. Returns (S sorted, solution (t, r + k) in S order, objective)."""
    t, r = data.n_users, Z.shape[1]
    colnorm = data.col_norms
    S = np.zeros((t, k), dtype=np.int64)
    F = Z
    sol = _batched_ls(data, F, data.y, ridge[:r])
    rows = np.arange(t)
    for i in range(k):
        res = data.y - np.einsum("np,np->n", F, sol[data.user_of])
        score = np.abs(data.segment_xt(res)) / colnorm
        score[rows[:, None], S[:, :i]] = -1.0
        S[:, i] = np.argmax(score, axis=1)
        F = np.concatenate((F, data.gather(S[:, i : i + 1])), axis=1)
        sol = _batched_ls(data, F, data.y, ridge[: r + i + 1])
    order = np.argsort(S, axis=1)
    S = np.take_along_axis(S, order, axis=1)
    sol = np.concatenate((sol[:, :r], np.take_along_axis(sol[:, r:], order, axis=1)), axis=1)
    F = np.concatenate((Z, data.gather(S)), axis=1)
    return S, sol, _objective(data, F, sol, ridge)


OMP_ALL_ITERS = 3
"""OMP restarts run for every user in the first outer iterations, later only while some user is
badly fitted (see ``_badly_fitted``)."""

IRLS_SCHEDULES: tuple[tuple[int, float], ...] = ((50, 0.7), (100, 0.85), (200, 0.93))
"""(iterations, ε decay) of the reweighted least-squares (ℓ0-like, p = 0; Chartrand & Yin 2008) support
searches tried in turn on users that are still badly fitted. With U known, d=150, k=10, m=40: the
first misses 8/300 users, all three together 2/300 (OMP alone: 79/300)."""


def _irls_supports(
    data: UserData,
    Z: FloatArray,
    k: int,
    flag: np.ndarray[Any, Any],
    n_iter: int = 50,
    decay: float = 0.7,
) -> tuple[IntArray, np.ndarray[Any, Any]]:
    """Sparse supports by iteratively reweighted least squares for the flagged users.

    For user u with A_u = [X_u U, X_u] (m_u × (r + d), underdetermined: m_u < r + d), iterate the
    weighted minimum-norm interpolation ``x = D A_uᵀ (A_u D A_uᵀ)⁻¹ y_u`` with weights
    ``D = diag(big, …, (b_i² + ε))`` (w essentially unpenalised, b pushed towards ℓ0-sparsity) and
    ε decayed each iteration. Returns the top-k support of b for the flagged users it searched and
    the mask of those users: a flagged user with m_u ≥ r + d (not underdetermined) is skipped, and
    their row of zeros must not be used as a support.
    """
    r, d = Z.shape[1], data.d
    p = r + d
    S = np.zeros((data.n_users, k), dtype=np.int64)
    searched = np.zeros(data.n_users, dtype=bool)
    for bk in data.buckets:
        sel = flag[bk.users] & (data.counts[bk.users] < p)
        if not sel.any():
            continue
        rows = bk.rows[sel]
        n, m = rows.shape
        A = np.concatenate((Z[rows], data.X[rows]), axis=2)  # (n, m, p)
        y = data.y[rows]
        pad = None
        if bk.mask is not None:
            mk = bk.mask[sel]
            A = A * mk[:, :, None]
            y = y * mk
            pad = 1.0 - mk
        m_u = data.counts[bk.users[sel]].astype(np.float64)
        Dg = np.ones((n, p))
        eps = np.zeros(n)
        b = np.zeros((n, d))
        for it in range(n_iter):
            M = np.matmul(A * Dg[:, None, :], A.transpose(0, 2, 1))
            scale = np.trace(M, axis1=1, axis2=2) / m_u
            M = M + (JITTER * np.maximum(scale, 1e-30))[:, None, None] * np.eye(m)
            if pad is not None:
                M = M + pad[:, :, None] * np.eye(m)
            lam = np.linalg.solve(M, y[..., None])[..., 0]
            x = Dg * np.einsum("nmp,nm->np", A, lam)
            b = x[:, r:]
            eps = np.maximum(np.max(b * b, axis=1), 1e-300) if it == 0 else decay * eps
            wb = b * b + eps[:, None]
            Dg = np.concatenate((np.full((n, r), 1e4), wb / np.max(wb, axis=1)[:, None]), axis=1)
        S[bk.users[sel]] = top_k_indices(b, k)
        searched[bk.users[sel]] = True
    return S, searched


def _badly_fitted(obj: FloatArray, counts: IntArray, y_scale: float) -> np.ndarray[Any, Any]:
    """Users whose mean squared residual obj_u/m_u is 10× the median user's and not ~0 (relative to
    the mean y²). With noise every well-fitted user sits near σ², so only outliers are flagged."""
    msr = obj / counts
    return np.asarray(msr > max(10.0 * float(np.median(msr)), 1e-12 * y_scale))


def _b_step_htp(
    data: UserData,
    Z: FloatArray,
    W: FloatArray,
    B_idx: IntArray,
    B_val: FloatArray,
    k: int,
    *,
    n_inner: int,
    ridge_w: float,
    ridge_b: float,
    restart: bool = True,
    omp_all: bool = True,
    irls: bool | None = None,
    local: bool = False,
) -> tuple[FloatArray, IntArray, FloatArray]:
    """HTP b-step; with ``restart``, OMP candidates (always when ``omp_all``, otherwise only if some
    user is badly fitted) and IRLS candidates for badly fitted users, each kept where it fits better.
    ``irls`` (default: ``not omp_all``, the estimator's schedule) says whether IRLS candidates run.
    ``local``: every user's result depends on their own samples only — OMP and IRLS candidates are
    tried for every user instead of those fitted 10× worse than the median user (a cross-user
    statistic), as user-level DP needs."""
    run_irls = (not omp_all) if irls is None else irls
    r = Z.shape[1]
    ridge = np.concatenate((np.full(r, ridge_w), np.full(k, ridge_b)))
    obj = np.zeros(0)
    for _ in range(n_inner):
        res = (
            data.y
            - _low_rank_predict(Z, W, data.user_of)
            - sparse_predict(data.X, data.user_of, B_idx, B_val)
        )
        g = data.segment_xt(res)
        eta = _normalized_step(data, g, k)
        C = _dense_b(B_idx, B_val, data.d) + eta[:, None] * g
        S = top_k_indices(C, k)
        F = np.concatenate((Z, data.gather(S)), axis=1)
        sol = _batched_ls(data, F, data.y, ridge)
        W, B_idx, B_val = sol[:, :r], S, sol[:, r:]
        obj = _objective(data, F, sol, ridge)
    if not restart:
        return W, B_idx, B_val
    y_scale = float(np.mean(data.y * data.y))
    everyone = np.ones(data.n_users, dtype=bool)
    flag = everyone if omp_all or local else _badly_fitted(obj, data.counts, y_scale)
    if flag.any():
        # HTP can stall at a wrong support: keep OMP's answer where it fits better
        sub, rows = data.subset(flag)
        S_o, sol_o, obj_o = _omp(sub, Z[rows], k, ridge)
        better = np.zeros(data.n_users, dtype=bool)
        better[flag] = obj_o < obj[flag]
        src = np.cumsum(flag) - 1  # position of each flagged user in the subset
        W = np.where(better[:, None], sol_o[src, :r], W)
        B_idx = np.where(better[:, None], S_o[src], B_idx)
        B_val = np.where(better[:, None], sol_o[src, r:], B_val)
        obj = np.where(better, obj_o[src], obj)
        # users still fitted much worse than the typical user: try IRLS supports as well (once U is
        # past the first iterations: before that a poor fit mostly reflects the error of U)
        for n_it, decay in IRLS_SCHEDULES if run_irls else ():
            flag = everyone if local else _badly_fitted(obj, data.counts, y_scale)
            if not flag.any():
                break
            S_irls, searched = _irls_supports(data, Z, k, flag, n_it, decay)
            flag = flag & searched
            S_i = np.where(flag[:, None], S_irls, B_idx)
            F = np.concatenate((Z, data.gather(S_i)), axis=1)
            sol_i = _batched_ls(data, F, data.y, ridge)
            obj_i = _objective(data, F, sol_i, ridge)
            better = flag & (obj_i < obj)
            W = np.where(better[:, None], sol_i[:, :r], W)
            B_idx = np.where(better[:, None], S_i, B_idx)
            B_val = np.where(better[:, None], sol_i[:, r:], B_val)
            obj = np.where(better, obj_i, obj)
    return W, B_idx, B_val


@dataclass
class IHTState:
    """Per-user γ of Algorithm 2, carried across outer iterations (None before the first call)."""

    gamma: FloatArray | None = None


def _b_step_iht(
    data: UserData,
    Z: FloatArray,
    W: FloatArray,
    B_idx: IntArray,
    B_val: FloatArray,
    k: int,
    *,
    n_inner: int,
    state: IHTState,
    alpha: float,
    beta: float,
    c1: float,
    max_backtrack: int = 8,
) -> tuple[IntArray, FloatArray]:
    lr = _low_rank_predict(Z, W, data.user_of)
    target = data.y - lr
    sq = np.sqrt(max(k, 1))
    for _ in range(n_inner):
        res = target - sparse_predict(data.X, data.user_of, B_idx, B_val)
        loss_old = data.segment_sum(res * res)
        g = data.segment_xt(res)
        eta = _normalized_step(data, g, k)
        Bd = _dense_b(B_idx, B_val, data.d)
        if state.gamma is None:
            state.gamma = np.max(np.abs(Bd + eta[:, None] * g), axis=1)
        delta = alpha + c1 * (state.gamma + beta / sq)
        accepted = np.zeros(data.n_users, dtype=bool)
        new_idx, new_val = B_idx.copy(), B_val.copy()
        for _ in range(max_backtrack + 1):
            C = Bd + eta[:, None] * g  # Algorithm 2, step 2 (with a stable step η_u)
            C = np.where(np.abs(C) > delta[:, None], C, 0.0)  # step 3: HT(c, Δ)
            idx, val = _compress_b(C, k)  # and at most k entries (Eq. 3)
            res_new = target - sparse_predict(data.X, data.user_of, idx, val)
            ok = (data.segment_sum(res_new * res_new) <= loss_old) & ~accepted
            new_idx[ok], new_val[ok] = idx[ok], val[ok]
            accepted |= ok
            if accepted.all():
                break
            eta = np.where(accepted, eta, 0.5 * eta)
        B_idx, B_val = new_idx, new_val
        state.gamma = 2 * c1 * state.gamma + 2 * (alpha + c1 * beta / sq)  # step 4
    return B_idx, B_val


# ---------------------------------------------------------------------------------------------
# Public step functions (unsorted data; each documents the paper equation it implements)
# ---------------------------------------------------------------------------------------------
def w_step(
    X: FloatArray,
    y: FloatArray,
    users: IntArray,
    U: FloatArray,
    B_idx: IntArray,
    B_val: FloatArray,
    *,
    ridge: float = 0.0,
    n_users: int | None = None,
) -> FloatArray:
    """Eq. 4: ``w_u = argmin_w ‖X_u(U w + b_u) − y_u‖² + ridge‖w‖²`` for every user → ``W: (t, r)``."""
    X, y, users, n_users = check_fit_inputs(X, y, users, n_users)
    data, _ = UserData.build(X, y, users, n_users)
    return _w_step(data, data.X @ U, B_idx, B_val, ridge)


def b_step(
    X: FloatArray,
    y: FloatArray,
    users: IntArray,
    U: FloatArray,
    W: FloatArray,
    B_idx: IntArray,
    B_val: FloatArray,
    *,
    method: Literal["htp", "iht"] = "htp",
    n_inner: int = 1,
    restart: bool = True,
    ridge_w: float = 0.0,
    ridge_b: float = 0.0,
    alpha: float = 0.0,
    beta: float = 0.0,
    c1: float = 0.25,
    n_users: int | None = None,
    local: bool = False,
) -> tuple[FloatArray, IntArray, FloatArray]:
    """Eq. 3 for every user: the sparse update of b_u → ``(W, B_idx, B_val)``.

    ``method="iht"`` is Algorithm 2: ``c = b + η_u X_uᵀ(y_u − X_u(U w_u + b))``, ``Δ = α + c₁(γ + β/√k)``,
    ``b = HT(c, Δ)`` (also capped at k entries), ``γ ← 2c₁γ + 2(α + c₁β/√k)``, with γ₀ = ‖c‖_∞ and the
    stable normalised step η_u (see ``_normalized_step``) plus backtracking instead of 1/m; W is
    returned unchanged. ``method="htp"`` (hard-thresholding pursuit) takes the support S_u of the top-k
    of the same gradient step and then solves least squares jointly on ``[X_u U, X_u[:, S_u]]`` for
    (w_u, b_u), so W is updated too; with ``restart`` it also runs orthogonal matching pursuit from
    scratch and, for users still fitted badly, IRLS support searches, and keeps per user the best
    fit (the estimator skips IRLS in its first iterations; a standalone call always runs it).
    ``local=True`` makes each user's result a function of their own samples only (rescues tried for
    every user, not chosen by a cross-user statistic): what DP-AMHT-LRS needs for its sensitivity.
    Samples need not be sorted by user, but
    the rows of W/B are in user order whatever the sample order.
    """
    X, y, users, n_users = check_fit_inputs(X, y, users, n_users)
    data, _ = UserData.build(X, y, users, n_users)
    k = int(B_idx.shape[1])
    Z = data.X @ U
    if k == 0:
        return W, B_idx, B_val
    if method == "htp":
        return _b_step_htp(
            data,
            Z,
            W,
            B_idx,
            B_val,
            k,
            n_inner=n_inner,
            ridge_w=ridge_w,
            ridge_b=ridge_b,
            restart=restart,
            irls=restart,  # a standalone call has no iteration schedule: all rescues run
            local=local,
        )
    if method == "iht":
        idx, val = _b_step_iht(
            data,
            Z,
            W,
            B_idx,
            B_val,
            k,
            n_inner=n_inner,
            state=IHTState(),
            alpha=alpha,
            beta=beta,
            c1=c1,
        )
        return W, idx, val
    raise ValueError(f"method must be 'htp' or 'iht', got {method!r}")


def u_step_statistics(
    X: FloatArray,
    y: FloatArray,
    users: IntArray,
    W: FloatArray,
    B_idx: IntArray,
    B_val: FloatArray,
    *,
    offset: FloatArray | None = None,
) -> tuple[FloatArray, FloatArray]:
    """The normal equations of Eq. 5 (the non-private Eq. 7–8, without the 1/(mt) factor).

    ``A = Σ_u (w_u w_uᵀ) ⊗ (Σ_j x_j x_jᵀ)`` of shape (dr, dr) and ``V = Σ_j x_j (y_j − x_jᵀ b_u) w_uᵀ``
    of shape (d, r), so that vec(U) (column-major: ``vec(U)[c·d + i] = U[i, c]``) solves
    ``A vec(U) = vec(V)``. ``offset`` replaces ``x_jᵀ b_{u_j}`` (e.g. a clipped value, as in Eq. 8).
    Samples need not be sorted. Cost O(N·d²·r²/2).
    """
    X = np.asarray(X, dtype=np.float64)
    users = np.asarray(users, dtype=np.int64)
    t = np.asarray(y, dtype=np.float64) - (
        sparse_predict(X, users, B_idx, B_val) if offset is None else np.asarray(offset)
    )
    Wj = np.asarray(W, dtype=np.float64)[users]
    d, r = X.shape[1], Wj.shape[1]
    V = X.T @ (t[:, None] * Wj)
    A = np.empty((d * r, d * r))
    for c in range(r):
        for c2 in range(c, r):
            blk = X.T @ (X * (Wj[:, c] * Wj[:, c2])[:, None])
            A[c * d : (c + 1) * d, c2 * d : (c2 + 1) * d] = blk
            if c2 != c:
                A[c2 * d : (c2 + 1) * d, c * d : (c + 1) * d] = blk.T
    return A, np.asarray(V, dtype=np.float64)


def _u_statistics_cached(
    data: UserData, grams: FloatArray, W: FloatArray, B_idx: IntArray, B_val: FloatArray
) -> tuple[FloatArray, FloatArray]:
    """:func:`u_step_statistics` from cached per-user Grams ``X_uᵀX_u`` (O(t·d²·r²))."""
    t = data.y - sparse_predict(data.X, data.user_of, B_idx, B_val)
    V = data.segment_xt(t).T @ W
    d, r = data.d, W.shape[1]
    A = np.empty((d * r, d * r))
    for c in range(r):
        for c2 in range(c, r):
            blk = np.tensordot(W[:, c] * W[:, c2], grams, axes=1)
            A[c * d : (c + 1) * d, c2 * d : (c2 + 1) * d] = blk
            if c2 != c:
                A[c2 * d : (c2 + 1) * d, c * d : (c + 1) * d] = blk.T
    return A, np.asarray(V, dtype=np.float64)


def _support_cross(data: UserData, grams: FloatArray | None, S: IntArray) -> FloatArray:
    """``C_u = X_uᵀ X_u[:, S_u]`` for every user → ``(n_users, d, k)``."""
    if grams is not None:
        t, d = grams.shape[0], grams.shape[1]
        base = (np.arange(t) * d * d)[:, None, None] + (np.arange(d) * d)[None, :, None]
        return np.asarray(grams.reshape(-1)[base + S[:, None, :]], dtype=np.float64)
    XS = data.gather(S)
    return np.stack([data.segment_xt(XS[:, i]) for i in range(S.shape[1])], axis=2)


def _ridged(G: FloatArray, ridge: float) -> FloatArray:
    """``G + (ridge + jitter)·I`` for a batch of small Grams (same jitter as the LS solves)."""
    p = G.shape[-1]
    scale = np.trace(G, axis1=-2, axis2=-1) / max(p, 1)
    reg = ridge + JITTER * np.maximum(scale, 1e-30)
    return np.asarray(G + reg[:, None, None] * np.eye(p)[None, :, :], dtype=np.float64)


def _joint_u_statistics(
    data: UserData,
    grams: FloatArray | None,
    h: FloatArray,
    W: FloatArray,
    S: IntArray,
    ridge_b: float,
    active: FloatArray | None = None,
) -> tuple[FloatArray, FloatArray, FloatArray, FloatArray]:
    """Normal equations of Eq. 5 solved jointly with each user's b on its fixed support S_u.

    Minimising ``Σ_u ‖y_u − X_u U w_u − X_u[:, S_u] b_S‖² + ridge_b‖b_S‖²`` over (U, {b_S}) and
    eliminating b_S (variable projection) leaves the Eq. 5 form with per-user projected Grams:
    ``A = Σ_u w_u w_uᵀ ⊗ (X_uᵀX_u − C_u G_u⁻¹ C_uᵀ)``, ``V = Σ_u (h_u − C_u G_u⁻¹ h_{u,S}) w_uᵀ`` with
    ``C_u = X_uᵀX_u[:, S_u]``, ``G_u = X_{u,S}ᵀX_{u,S} + ridge_b·I`` and ``h_u = X_uᵀ y_u``.
    ``active: (t, k)`` (1/0) drops support slots (those zeroed by the row-sparsity constraint).
    Returns (A, V, C, G).
    """
    d, r = data.d, W.shape[1]
    C = _support_cross(data, grams, S)
    if active is not None:
        C = C * active[:, None, :]
    G0 = np.take_along_axis(C, S[:, :, None], axis=1)
    G = _ridged(G0 if active is None else G0 * active[:, :, None], ridge_b)
    L = np.linalg.cholesky(G)
    Mt = np.linalg.solve(L, C.transpose(0, 2, 1))  # (t, k, d): L⁻¹ C_uᵀ
    hS = gather_rows(h, S) if active is None else gather_rows(h, S) * active
    q = np.linalg.solve(L, hS[..., None])[..., 0]
    V = (h - np.einsum("tkd,tk->td", Mt, q)).T @ W
    A = np.empty((d * r, d * r))
    tk = Mt.shape[0] * Mt.shape[1]
    for c in range(r):
        Mc = (Mt * W[:, c, None, None]).reshape(tk, d)
        for c2 in range(c, r):
            if grams is not None:
                blk = np.tensordot(W[:, c] * W[:, c2], grams, axes=1)
            else:
                blk = data.X.T @ (data.X * (W[data.user_of, c] * W[data.user_of, c2])[:, None])
            Mc2 = Mc if c2 == c else (Mt * W[:, c2, None, None]).reshape(tk, d)
            blk = blk - Mc.T @ Mc2
            A[c * d : (c + 1) * d, c2 * d : (c2 + 1) * d] = blk
            if c2 != c:
                A[c2 * d : (c2 + 1) * d, c * d : (c + 1) * d] = blk.T
    return A, np.asarray(V, dtype=np.float64), C, G


def _refit_b(
    C: FloatArray,
    G: FloatArray,
    h: FloatArray,
    S: IntArray,
    U: FloatArray,
    W: FloatArray,
    active: FloatArray | None = None,
) -> FloatArray:
    """``b_S = G_u⁻¹ (h_{u,S} − C_uᵀ U w_u)``: each user's b on its support given (U, w_u)."""
    hS = gather_rows(h, S) if active is None else gather_rows(h, S) * active
    rhs = hS - np.einsum("tdk,td->tk", C, W @ U.T)
    return np.asarray(np.linalg.solve(G, rhs[..., None])[..., 0], dtype=np.float64)


def _joint_u_step_cg(
    data: UserData,
    W: FloatArray,
    S: IntArray,
    U0: FloatArray,
    ridge_b: float,
    ridge_u: float,
    active: FloatArray | None = None,
    rtol: float = 1e-12,
    maxiter: int | None = None,
) -> tuple[FloatArray, FloatArray]:
    """Matrix-free version of :func:`_joint_u_statistics` + solve; returns (U_ls, B_val)."""
    XS = data.gather(S)  # (N, k)
    if active is not None:
        XS = XS * active[data.user_of]
    G = _ridged(data.segment_sum(XS[:, :, None] * XS[:, None, :]), ridge_b)
    Wj = W[data.user_of]

    def b_of(z: FloatArray) -> FloatArray:  # per-user LS of z on the support columns
        s_ = data.segment_sum(XS * z[:, None])
        return np.asarray(np.linalg.solve(G, s_[..., None])[..., 0], dtype=np.float64)

    def project(z: FloatArray) -> FloatArray:  # P_u z = z − X_S G⁻¹ X_Sᵀ z
        return np.asarray(z - np.einsum("nk,nk->n", XS, b_of(z)[data.user_of]), dtype=np.float64)

    def matvec(M: FloatArray) -> FloatArray:
        p = project(np.einsum("nr,nr->n", data.X @ M, Wj))
        return np.asarray(data.X.T @ (p[:, None] * Wj) + ridge_u * M, dtype=np.float64)

    V = data.X.T @ (project(data.y)[:, None] * Wj)
    diag = (data.X * data.X).T @ (Wj * Wj) + ridge_u
    U_ls, _ = _pcg_op(matvec, V, diag, U0, rtol, maxiter)
    z = data.y - np.einsum("nr,nr->n", data.X @ U_ls, Wj)
    return U_ls, b_of(z)


def u_least_squares(A: FloatArray, V: FloatArray, ridge: float = 0.0) -> FloatArray:
    """Solve ``(A + ridge·I) vec(U) = vec(V)`` (Eq. 5) → the un-orthonormalised U: (d, r)."""
    d, r = V.shape
    scale = float(np.trace(A)) / max(A.shape[0], 1)
    reg = ridge + JITTER * max(scale, 1e-30)
    sol = np.linalg.solve(A + reg * np.eye(A.shape[0]), V.reshape(-1, order="F"))
    return np.asarray(sol.reshape((d, r), order="F"), dtype=np.float64)


def orthonormalize(U: FloatArray) -> tuple[FloatArray, FloatArray]:
    """QR with a deterministic sign (diag(R) ≥ 0): ``U = Q R``. Returns (Q, R)."""
    Q, R = np.linalg.qr(U)
    s = np.sign(np.diag(R))
    s[s == 0] = 1.0
    return np.asarray(Q * s, dtype=np.float64), np.asarray(R * s[:, None], dtype=np.float64)


def solve_u_step(A: FloatArray, V: FloatArray, ridge: float = 0.0) -> FloatArray:
    """Eq. 5 followed by QR (Algorithm 1): the new orthonormal U from the statistics (A, V)."""
    return orthonormalize(u_least_squares(A, V, ridge=ridge))[0]


def u_step_cg(
    X: FloatArray,
    y: FloatArray,
    users: IntArray,
    W: FloatArray,
    B_idx: IntArray,
    B_val: FloatArray,
    *,
    U0: FloatArray | None = None,
    ridge: float = 0.0,
    rtol: float = 1e-12,
    maxiter: int | None = None,
    offset: FloatArray | None = None,
) -> tuple[FloatArray, int]:
    """Eq. 5 matrix-free: Jacobi-preconditioned conjugate gradients on ``(A + ridge·I) vec(U) = vec(V)``.

    ``A vec(U)`` is applied as ``Σ_j x_j (x_jᵀ U w_{u_j}) w_{u_j}ᵀ`` at O(N·d·r) per step, never
    forming the (dr × dr) A. Warm-started from ``U0``. Returns (un-orthonormalised U, iterations).
    """
    X = np.asarray(X, dtype=np.float64)
    users = np.asarray(users, dtype=np.int64)
    t = np.asarray(y, dtype=np.float64) - (
        sparse_predict(X, users, B_idx, B_val) if offset is None else np.asarray(offset)
    )
    Wj = np.asarray(W, dtype=np.float64)[users]
    V = X.T @ (t[:, None] * Wj)
    diag = (X * X).T @ (Wj * Wj) + ridge
    return _pcg(X, Wj, V, diag, ridge, U0, rtol, maxiter)


def _pcg(
    X: FloatArray,
    Wj: FloatArray,
    V: FloatArray,
    diag: FloatArray,
    ridge: float,
    U0: FloatArray | None,
    rtol: float,
    maxiter: int | None,
) -> tuple[FloatArray, int]:
    def matvec(M: FloatArray) -> FloatArray:
        p = np.einsum("nr,nr->n", X @ M, Wj)
        return np.asarray(X.T @ (p[:, None] * Wj) + ridge * M, dtype=np.float64)

    return _pcg_op(matvec, V, diag, U0, rtol, maxiter)


def _pcg_op(
    matvec: Callable[[FloatArray], FloatArray],
    V: FloatArray,
    diag: FloatArray,
    U0: FloatArray | None,
    rtol: float,
    maxiter: int | None,
) -> tuple[FloatArray, int]:
    """Jacobi-preconditioned CG on ``A(U) = V`` over (d, r) matrices with the Frobenius product."""
    d, r = V.shape
    inv_diag = np.where(diag > 0, 1.0 / np.where(diag > 0, diag, 1.0), 0.0)
    U = np.zeros((d, r)) if U0 is None else np.array(U0, dtype=np.float64)
    R = V - matvec(U)
    target = rtol * float(np.linalg.norm(V))
    maxiter = 10 * d * r if maxiter is None else maxiter
    Zr = inv_diag * R
    P = Zr.copy()
    rz = float(np.sum(R * Zr))
    it = 0
    while it < maxiter and float(np.linalg.norm(R)) > target:
        AP = matvec(P)
        pap = float(np.sum(P * AP))
        if pap <= 0:
            break
        a = rz / pap
        U += a * P
        R -= a * AP
        Zr = inv_diag * R
        rz_new = float(np.sum(R * Zr))
        P = Zr + (rz_new / rz) * P
        rz = rz_new
        it += 1
    return U, it


# ---------------------------------------------------------------------------------------------
# The estimator
# ---------------------------------------------------------------------------------------------
def _split_folds(users: IntArray, n_users: int, n_folds: int) -> list[IntArray]:
    """Row indices of each fold: a user's samples go round-robin to the folds (fresh batches).

    A user with fewer samples than folds reuses its samples so that every fold holds every user.
    """
    order = np.argsort(users, kind="stable")
    counts = np.bincount(users, minlength=n_users)
    starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
    rank = np.arange(users.shape[0]) - starts[users[order]]
    fold_of = np.empty(users.shape[0], dtype=np.int64)
    fold_of[order] = rank % n_folds
    folds = []
    for f in range(n_folds):
        rows = np.flatnonzero(fold_of == f)
        short = np.flatnonzero(counts <= f)
        if short.size:
            extra = order[starts[short] + f % counts[short]]
            rows = np.sort(np.concatenate((rows, extra)))
        folds.append(rows.astype(np.int64))
    return folds


class AMHTLRS:
    """AMHT-LRS estimator (Algorithm 1) with scikit-learn conventions.

    Parameters are only stored by ``__init__``. ``fit(X, y, users)`` learns ``model_`` (an
    :class:`~lrs_rec.model.LRSModel`), ``n_iter_`` and ``history_`` (training mean squared error after
    each iteration). Ridge strengths are absolute (added to the per-user Gram matrices).

    ``b_step``: ``"htp"`` (hard-thresholding pursuit, default) or ``"iht"`` (Algorithm 2).
    ``b_iter``: inner iterations of the b-step per outer iteration.
    ``b_restart``: with HTP, also run orthogonal matching pursuit from scratch each b-step and keep,
    per user, whichever fits better (HTP alone can stall at a wrong support).
    ``init``: ``"moments"`` (Appendix E, pairwise form: top-r eigenvectors of an unbiased estimate of
    (1/t) Σ_u θ_u θ_uᵀ), ``"moments_y2"`` (top-r eigenvectors of (1/t) Σ_u (1/m_u) Σ_j y_j² (x_j x_jᵀ − I)),
    ``"random"`` or an explicit (d, r) array.
    ``u_solver``: ``"direct"`` (dr × dr normal equations), ``"cg"`` (matrix-free) or ``"auto"``.
    ``u_step``: ``"eq5"`` is the paper's U-step with b fixed; ``"joint"`` (default) solves Eq. 5 jointly
    with each user's b on its current support (b eliminated by variable projection), so that b cannot
    absorb the error of U; it converges much faster and reaches exact recovery with fewer samples.
    ``sample_splitting``: False, True (2 folds) or a number of folds; iteration ℓ uses fold ℓ mod K
    (the paper's fresh batches), then (w, b) are refitted on all samples.
    ``zeta``: if set, enforce Assumption A1's row sparsity after each b-step.
    ``tol``: stop when the relative change of the training predictions falls below it.
    ``callback(iteration, model)`` is called after each iteration.
    """

    def __init__(
        self,
        rank: int,
        sparsity: int,
        *,
        n_iter: int = 100,
        tol: float = 1e-10,
        b_step: Literal["htp", "iht"] = "htp",
        b_iter: int = 1,
        b_restart: bool = True,
        ridge_w: float = 0.0,
        ridge_b: float = 0.0,
        ridge_u: float = 0.0,
        init: Literal["moments", "moments_y2", "random"] | FloatArray = "moments",
        u_solver: Literal["auto", "direct", "cg"] = "auto",
        u_step: Literal["joint", "eq5"] = "joint",
        sample_splitting: bool | int = False,
        zeta: int | None = None,
        iht_alpha: float = 0.0,
        iht_beta: float = 0.0,
        iht_c1: float = 0.25,
        random_state: int | np.random.Generator | None = None,
        callback: Callback | None = None,
    ) -> None:
        self.rank = rank
        self.sparsity = sparsity
        self.n_iter = n_iter
        self.tol = tol
        self.b_step = b_step
        self.b_iter = b_iter
        self.b_restart = b_restart
        self.ridge_w = ridge_w
        self.ridge_b = ridge_b
        self.ridge_u = ridge_u
        self.init = init
        self.u_solver = u_solver
        self.u_step = u_step
        self.sample_splitting = sample_splitting
        self.zeta = zeta
        self.iht_alpha = iht_alpha
        self.iht_beta = iht_beta
        self.iht_c1 = iht_c1
        self.random_state = random_state
        self.callback = callback

    # -- parameters ---------------------------------------------------------------------------
    @property
    def n_params_per_user(self) -> int:
        """Fine-tunable parameters per user: r + k."""
        return int(self.rank) + int(self.sparsity)

    def _check_params(self, d: int) -> None:
        check_rank_sparsity(self.rank, self.sparsity, d)
        if int(self.n_iter) != self.n_iter or self.n_iter < 1:
            raise ValueError(f"n_iter must be a positive integer, got {self.n_iter!r}")
        if int(self.b_iter) != self.b_iter or self.b_iter < 1:
            raise ValueError(f"b_iter must be a positive integer, got {self.b_iter!r}")
        check_non_negative(
            tol=self.tol,
            ridge_w=self.ridge_w,
            ridge_b=self.ridge_b,
            ridge_u=self.ridge_u,
            iht_alpha=self.iht_alpha,
            iht_beta=self.iht_beta,
        )
        if not 0 < self.iht_c1 < 0.5:
            raise ValueError(f"iht_c1 must lie in (0, 1/2) (Algorithm 2), got {self.iht_c1!r}")
        if self.b_step not in ("htp", "iht"):
            raise ValueError(f"b_step must be 'htp' or 'iht', got {self.b_step!r}")
        if self.u_solver not in ("auto", "direct", "cg"):
            raise ValueError(f"u_solver must be 'auto', 'direct' or 'cg', got {self.u_solver!r}")
        if self.u_step not in ("joint", "eq5"):
            raise ValueError(f"u_step must be 'joint' or 'eq5', got {self.u_step!r}")
        if self.zeta is not None and (int(self.zeta) != self.zeta or self.zeta < 1):
            raise ValueError(f"zeta must be a positive integer or None, got {self.zeta!r}")
        if isinstance(self.sample_splitting, bool) or self.sample_splitting is None:
            pass
        elif int(self.sample_splitting) != self.sample_splitting or self.sample_splitting < 1:
            raise ValueError(
                f"sample_splitting must be a bool or a positive number of folds, "
                f"got {self.sample_splitting!r}"
            )

    def _n_folds(self) -> int:
        s = self.sample_splitting
        if isinstance(s, bool) or s is None:
            return 2 if s else 1
        return int(s)

    def _initial_u(
        self, X: FloatArray, y: FloatArray, users: IntArray, n_users: int, rng: np.random.Generator
    ) -> FloatArray:
        d, r = X.shape[1], int(self.rank)
        init: Any = self.init
        if isinstance(init, str):
            if init == "moments":
                return moments_init(X, y, users, n_users, r)
            if init == "moments_y2":
                return moments_init(X, y, users, n_users, r, pairwise=False)
            if init == "random":
                return random_orthonormal(d, r, rng)
            raise ValueError(
                f"init must be 'moments', 'moments_y2', 'random' or a (d, r) array, got {init!r}"
            )
        U0 = check_X(init, name="init", d=None)
        if U0.shape != (d, r):
            raise ValueError(f"init array must have shape (d={d}, r={r}), got {U0.shape}")
        return orthonormalize(U0)[0]

    # -- fitting ------------------------------------------------------------------------------
    def fit(self, X: Any, y: Any, users: Any, n_users: int | None = None) -> AMHTLRS:
        """Fit on samples ``X: (N, d)``, ``y: (N,)``, ``users: (N,)`` with ids 0..n_users-1."""
        Xa, ya, ua, nu = check_fit_inputs(X, y, users, n_users)
        d = Xa.shape[1]
        self._check_params(d)
        r, k = int(self.rank), int(self.sparsity)
        if nu < r:
            # the U-step (Eq. 5) is rank-deficient with fewer users than r: part of U would be set
            # by rounding, not by the data
            raise ValueError(f"a rank-{r} U needs at least {r} users, got n_users={nu}")
        rng = np.random.default_rng(self.random_state)

        full, _ = UserData.build(Xa, ya, ua, nu)
        n_folds = self._n_folds()
        if n_folds > 1:
            parts = [
                UserData.build(Xa[f], ya[f], ua[f], nu)[0] for f in _split_folds(ua, nu, n_folds)
            ]
        else:
            parts = [full]
        use_cg = self.u_solver == "cg" or (self.u_solver == "auto" and d * r > DIRECT_MAX_DR)
        grams = (
            [p.user_grams() for p in parts]
            if not use_cg and nu * d * d * len(parts) <= GRAM_CACHE_MAX
            else None
        )

        hs = [p.segment_xt(p.y) for p in parts]  # X_uᵀ y_u per user
        U = self._initial_u(Xa, ya, ua, nu, rng)
        B_idx = np.tile(np.arange(k, dtype=np.int64), (nu, 1))
        B_val = np.zeros((nu, k))
        W = _w_step(parts[0], parts[0].X @ U, B_idx, B_val, self.ridge_w)
        iht = IHTState()

        history: list[float] = []
        pred_prev = _low_rank_predict(full.X @ U, W, full.user_of)
        n_done = 0
        for it in range(int(self.n_iter)):
            data = parts[it % n_folds]
            gram = None if grams is None else grams[it % n_folds]
            U, W, B_idx, B_val = self._iteration(
                data, gram, hs[it % n_folds], U, W, B_idx, B_val, iht, use_cg, it
            )
            n_done = it + 1
            pred = _low_rank_predict(full.X @ U, W, full.user_of) + sparse_predict(
                full.X, full.user_of, B_idx, B_val
            )
            history.append(float(np.mean((full.y - pred) ** 2)))
            if self.callback is not None:
                self.callback(it, LRSModel(U=U, W=W, B_idx=B_idx, B_val=B_val))
            change = float(np.linalg.norm(pred - pred_prev))
            pred_prev = pred
            if change <= self.tol * max(float(np.linalg.norm(pred)), 1e-300):
                break
        if n_folds > 1:  # refit the per-user parameters on all samples
            W, B_idx, B_val = self._per_user_steps(
                full, full.X @ U, W, B_idx, B_val, IHTState(), n_done
            )
        self.model_ = LRSModel(U=U, W=W, B_idx=B_idx, B_val=B_val)
        self.n_iter_ = n_done
        self.history_ = history
        self.n_users_ = nu
        return self

    def _per_user_steps(
        self,
        data: UserData,
        Z: FloatArray,
        W: FloatArray,
        B_idx: IntArray,
        B_val: FloatArray,
        iht: IHTState,
        iteration: int,
    ) -> tuple[FloatArray, IntArray, FloatArray]:
        k = int(self.sparsity)
        if k > 0:
            if self.b_step == "htp":
                W, B_idx, B_val = _b_step_htp(
                    data,
                    Z,
                    W,
                    B_idx,
                    B_val,
                    k,
                    n_inner=int(self.b_iter),
                    ridge_w=self.ridge_w,
                    ridge_b=self.ridge_b,
                    restart=bool(self.b_restart),
                    omp_all=iteration < OMP_ALL_ITERS,
                )
            else:
                B_idx, B_val = _b_step_iht(
                    data,
                    Z,
                    W,
                    B_idx,
                    B_val,
                    k,
                    n_inner=int(self.b_iter),
                    state=iht,
                    alpha=self.iht_alpha,
                    beta=self.iht_beta,
                    c1=self.iht_c1,
                )
            if self.zeta is not None:
                B_val = enforce_row_sparsity(B_idx, B_val, zeta=int(self.zeta), d=data.d)
        W = _w_step(data, Z, B_idx, B_val, self.ridge_w)  # Eq. 4
        return W, B_idx, B_val

    def _iteration(
        self,
        data: UserData,
        gram: FloatArray | None,
        h: FloatArray,
        U: FloatArray,
        W: FloatArray,
        B_idx: IntArray,
        B_val: FloatArray,
        iht: IHTState,
        use_cg: bool,
        iteration: int,
    ) -> tuple[FloatArray, FloatArray, IntArray, FloatArray]:
        W, B_idx, B_val = self._per_user_steps(data, data.X @ U, W, B_idx, B_val, iht, iteration)
        if self.u_step == "joint" and B_idx.shape[1] > 0:
            # Eq. 5 jointly with b on the supports just chosen (variable projection), then QR
            active = None if self.zeta is None else (B_val != 0).astype(np.float64)
            if use_cg:
                U_ls, B_val = _joint_u_step_cg(
                    data, W, B_idx, U, self.ridge_b, self.ridge_u, active, maxiter=CG_MAXITER
                )
            else:
                A, V, C, G = _joint_u_statistics(data, gram, h, W, B_idx, self.ridge_b, active)
                U_ls = u_least_squares(A, V, ridge=self.ridge_u)
                B_val = _refit_b(C, G, h, B_idx, U_ls, W, active)
            U, R = orthonormalize(U_ls)
            return U, W @ R.T, B_idx, B_val
        if use_cg:  # Eq. 5, matrix-free, warm-started at the current U
            U_ls, _ = u_step_cg(
                data.X,
                data.y,
                data.user_of,
                W,
                B_idx,
                B_val,
                U0=U,
                ridge=self.ridge_u,
                maxiter=CG_MAXITER,
            )
        else:  # Eq. 5, direct normal equations
            if gram is not None:
                A, V = _u_statistics_cached(data, gram, W, B_idx, B_val)
            else:
                A, V = u_step_statistics(data.X, data.y, data.user_of, W, B_idx, B_val)
            U_ls = u_least_squares(A, V, ridge=self.ridge_u)
        U, R = orthonormalize(U_ls)  # QR; U_ls w = Q (R w) keeps θ unchanged
        return U, W @ R.T, B_idx, B_val

    # -- prediction ---------------------------------------------------------------------------
    def predict(self, X: Any, users: Any) -> FloatArray:
        """⟨x_j, θ_{u_j}⟩ for the fitted model."""
        if not hasattr(self, "model_"):
            raise ValueError("this AMHTLRS is not fitted yet: call fit(X, y, users) first")
        Xa = check_X(X, d=self.model_.d)
        ua, _ = check_users(users, n=Xa.shape[0], n_users=self.model_.n_users, require_all=False)
        return self.model_.predict(Xa, ua)
