"""The paper's sparse b-step (Eq. 3; Algorithm 2 or hard-thresholding pursuit), blockwise.

``StepParams.b_step`` chooses the b-step of :func:`lrs_rec.engine.steps.user_step`: ``"ridge"`` (the
rating trainer: ridge on all d coordinates, top-k, refit), ``"fixed"`` (b_u kept: Eq. 4 alone) or the
paper's ``"htp"`` / ``"iht"`` run here, before the w-step, with the options in :class:`SparseB`:

* ``"iht"`` is Algorithm 2: gradient step, hard threshold HT(·, Δ) with its Δ/γ schedule (γ per user
  in ``LRSState.gamma``), with a stable normalised step instead of 1/m and backtracking.
* ``"htp"`` (hard-thresholding pursuit): the support from the thresholded gradient step, then least
  squares jointly on ``[X_u U, X_u[:, S_u]]`` for (w_u, b_u); with ``restart``, OMP and IRLS
  candidates kept per user where they fit better.

Users are processed in blocks (:func:`lrs_rec.engine.steps.key_blocks`); the one cross-user rule — a
user is "badly fitted" relative to the median user of *all* users — is evaluated between passes over
the blocks, so the result does not depend on the block size. The supports S_u (k indices, sorted)
are kept in ``LRSState.support``: a slot may hold a zero value (row-sparsity, Assumption A1).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from lrs_rec._types import FloatArray, IntArray
from lrs_rec.engine.user_rows import (
    JITTER,
    UserData,
    batched_ls,
    compress_b,
    dense_b,
    gather_rows,
    low_rank_predict,
    sparse_predict,
)
from lrs_rec.thresholding import enforce_row_sparsity, top_k_indices

if TYPE_CHECKING:
    from lrs_rec.engine.steps import LRSState, Samples, StepParams


@dataclass(frozen=True)
class SparseB:
    """Options of the paper's b-step (``StepParams.b_step`` ``"htp"`` or ``"iht"``).

    ``n_inner``: b-step iterations per call. ``restart`` (HTP): OMP candidates (for every user when
    ``omp_all``, else only for badly fitted users) and IRLS candidates for users still badly fitted
    (``irls``; default ``not omp_all``, the estimator's schedule). ``local``: every user's result depends
    on their own samples only (candidates tried for everyone, no cross-user rule), as user-level DP
    needs. ``zeta``: enforce Assumption A1's row sparsity after the step. ``alpha``, ``beta``, ``c1``:
    Algorithm 2's threshold schedule (IHT)."""

    n_inner: int = 1
    restart: bool = True
    omp_all: bool = True
    irls: bool | None = None
    local: bool = False
    zeta: int | None = None
    alpha: float = 0.0
    beta: float = 0.0
    c1: float = 0.25


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
    sol = batched_ls(data, F, data.y, ridge[:r])
    rows = np.arange(t)
    for i in range(k):
        res = data.y - np.einsum("np,np->n", F, sol[data.user_of])
        score = np.abs(data.segment_xt(res)) / colnorm
        score[rows[:, None], S[:, :i]] = -1.0
        S[:, i] = np.argmax(score, axis=1)
        F = np.concatenate((F, data.gather(S[:, i : i + 1])), axis=1)
        sol = batched_ls(data, F, data.y, ridge[: r + i + 1])
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


def _htp(
    data: UserData,
    Z: FloatArray,
    W: FloatArray,
    B_idx: IntArray,
    B_val: FloatArray,
    k: int,
    n_inner: int,
    ridge: FloatArray,
) -> tuple[FloatArray, IntArray, FloatArray, FloatArray]:
    """``n_inner`` HTP steps for one block of users → (W, B_idx, B_val, objective per user)."""
    r = Z.shape[1]
    obj = np.zeros(data.n_users)
    for _ in range(n_inner):
        res = (
            data.y
            - low_rank_predict(Z, W, data.user_of)
            - sparse_predict(data.X, data.user_of, B_idx, B_val)
        )
        g = data.segment_xt(res)
        eta = _normalized_step(data, g, k)
        C = dense_b(B_idx, B_val, data.d) + eta[:, None] * g
        S = top_k_indices(C, k)
        F = np.concatenate((Z, data.gather(S)), axis=1)
        sol = batched_ls(data, F, data.y, ridge)
        W, B_idx, B_val = sol[:, :r], S, sol[:, r:]
        obj = _objective(data, F, sol, ridge)
    return W, B_idx, B_val, obj


_Fit = tuple[FloatArray, IntArray, FloatArray, FloatArray]  # (W, B_idx, B_val, objective)


def _omp_rescue(
    data: UserData, Z: FloatArray, flag: np.ndarray[Any, Any], fit: _Fit, k: int, ridge: FloatArray
) -> _Fit:
    """HTP can stall at a wrong support: OMP from scratch for the flagged users of one block, kept
    where it fits better."""
    W, B_idx, B_val, obj = fit
    r = Z.shape[1]
    sub, rows = data.subset(flag)
    S_o, sol_o, obj_o = _omp(sub, Z[rows], k, ridge)
    better = np.zeros(data.n_users, dtype=bool)
    better[flag] = obj_o < obj[flag]
    src = np.cumsum(flag) - 1  # position of each flagged user in the subset
    return (
        np.where(better[:, None], sol_o[src, :r], W),
        np.where(better[:, None], S_o[src], B_idx),
        np.where(better[:, None], sol_o[src, r:], B_val),
        np.where(better, obj_o[src], obj),
    )


def _irls_rescue(
    data: UserData,
    Z: FloatArray,
    flag: np.ndarray[Any, Any],
    fit: _Fit,
    k: int,
    ridge: FloatArray,
    schedule: tuple[int, float],
) -> _Fit:
    """IRLS supports for the flagged users of one block, kept where they fit better."""
    W, B_idx, B_val, obj = fit
    r = Z.shape[1]
    S_irls, searched = _irls_supports(data, Z, k, flag, *schedule)
    flag = flag & searched
    S_i = np.where(flag[:, None], S_irls, B_idx)
    F = np.concatenate((Z, data.gather(S_i)), axis=1)
    sol_i = batched_ls(data, F, data.y, ridge)
    obj_i = _objective(data, F, sol_i, ridge)
    better = flag & (obj_i < obj)
    return (
        np.where(better[:, None], sol_i[:, :r], W),
        np.where(better[:, None], S_i, B_idx),
        np.where(better[:, None], sol_i[:, r:], B_val),
        np.where(better, obj_i, obj),
    )


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
    lr = low_rank_predict(Z, W, data.user_of)
    target = data.y - lr
    sq = np.sqrt(max(k, 1))
    for _ in range(n_inner):
        res = target - sparse_predict(data.X, data.user_of, B_idx, B_val)
        loss_old = data.segment_sum(res * res)
        g = data.segment_xt(res)
        eta = _normalized_step(data, g, k)
        Bd = dense_b(B_idx, B_val, data.d)
        if state.gamma is None:
            state.gamma = np.max(np.abs(Bd + eta[:, None] * g), axis=1)
        delta = alpha + c1 * (state.gamma + beta / sq)
        accepted = np.zeros(data.n_users, dtype=bool)
        new_idx, new_val = B_idx.copy(), B_val.copy()
        for _ in range(max_backtrack + 1):
            C = Bd + eta[:, None] * g  # Algorithm 2, step 2 (with a stable step η_u)
            C = np.where(np.abs(C) > delta[:, None], C, 0.0)  # step 3: HT(c, Δ)
            idx, val = compress_b(C, k)  # and at most k entries (Eq. 3)
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


ROWS_KEPT_FLOATS = 1 << 25
"""The rows of every block (N·d floats) are kept between the passes of one b-step (HTP, OMP, IRLS)
up to this size (256 MB), else gathered again for each pass."""


def sparse_b_step(
    state: LRSState, data: Samples, p: StepParams, *, block: int | None = None
) -> None:
    """Eq. 3 for every user, block by block: the sparse update of b_u (and, for HTP, w_u) given U,
    the features and the biases. Updates ``state.W`` (HTP), ``state.B_idx`` (the supports),
    ``state.B_val`` and ``state.gamma`` (IHT). Every user needs at least one sample."""
    from lrs_rec.engine.steps import key_blocks, user_block_size

    k, sb = p.k, p.sparse
    n_users, d = state.W.shape[0], state.F.shape[1]
    if k == 0 or p.b_step not in ("htp", "iht"):
        return
    state.ensure_b_width(k)
    S = np.array(state.B_idx, dtype=np.int64)
    B_val = np.array(state.B_val, dtype=np.float64)
    W = np.array(state.W, dtype=np.float64)
    t = data.ratings - state.global_mean - state.item_bias[data.items] - state.user_bias[data.users]
    blocks = list(key_blocks(data.users, n_users, block or user_block_size(d)))

    kept: dict[int, tuple[UserData, FloatArray]] | None = (
        {} if len(data) * d <= ROWS_KEPT_FLOATS else None
    )

    # fixed features (``Samples.gram_cache`` set): the sorted rows are also kept across iterations
    across = data.gram_cache if kept is not None else None

    def rows(lo: int, hi: int, sl: IntArray) -> tuple[UserData, FloatArray]:
        """The block's rows sorted by user, and X_u U (kept between the passes when small)."""
        if kept is not None and lo in kept:
            return kept[lo]
        key = ("sparse_b rows", lo, hi, id(state.F))
        hit = None if across is None else across.get(key)
        if hit is None:
            hit = UserData.build(state.F[data.items[sl]], t[sl], data.users[sl] - lo, hi - lo)
            if across is not None:
                across[key] = hit
            ud = hit[0]
        else:  # same rows, this step's targets
            ud = replace(hit[0], y=np.ascontiguousarray(t[sl][hit[1]]))
        out = (ud, ud.X @ state.U)
        if kept is not None:
            kept[lo] = out
        return out

    if p.b_step == "iht":
        gamma = np.zeros(n_users)
        for lo, hi, sl in blocks:
            ud, Z = rows(lo, hi, sl)
            ist = IHTState(None if state.gamma is None else state.gamma[lo:hi].copy())
            S[lo:hi], B_val[lo:hi] = _b_step_iht(
                ud, Z, W[lo:hi], S[lo:hi], B_val[lo:hi], k, n_inner=sb.n_inner, state=ist,
                alpha=sb.alpha, beta=sb.beta, c1=sb.c1,
            )  # fmt: skip
            assert ist.gamma is not None
            gamma[lo:hi] = ist.gamma
        state.gamma = gamma
    else:
        r = W.shape[1]
        ridge = np.concatenate((np.full(r, p.reg_w), np.full(k, p.reg_b)))
        obj = np.zeros(n_users)

        def update(fit: _Fit, lo: int, hi: int) -> None:
            W[lo:hi], S[lo:hi], B_val[lo:hi], obj[lo:hi] = fit

        for lo, hi, sl in blocks:
            ud, Z = rows(lo, hi, sl)
            update(_htp(ud, Z, W[lo:hi], S[lo:hi], B_val[lo:hi], k, sb.n_inner, ridge), lo, hi)
        if sb.restart:
            counts = np.bincount(data.users, minlength=n_users)
            y_scale = float(np.mean(t * t))
            everyone = np.ones(n_users, dtype=bool)
            run_irls = (not sb.omp_all) if sb.irls is None else sb.irls
            flag = everyone if sb.omp_all or sb.local else _badly_fitted(obj, counts, y_scale)
            schedules = [None, *(IRLS_SCHEDULES if run_irls and flag.any() else ())]
            for n, schedule in enumerate(schedules):
                if n > 0:  # users still fitted much worse than the typical user (of all blocks)
                    flag = everyone if sb.local else _badly_fitted(obj, counts, y_scale)
                if not flag.any():
                    break
                for lo, hi, sl in blocks:
                    f = flag[lo:hi]
                    if not f.any():
                        continue
                    ud, Z = rows(lo, hi, sl)
                    fit = (W[lo:hi], S[lo:hi], B_val[lo:hi], obj[lo:hi])
                    if schedule is None:
                        update(_omp_rescue(ud, Z, f, fit, k, ridge), lo, hi)
                    else:
                        update(_irls_rescue(ud, Z, f, fit, k, ridge, schedule), lo, hi)
    if sb.zeta is not None:
        B_val = enforce_row_sparsity(S, B_val, zeta=int(sb.zeta), d=d)
    state.W = W
    state.B_idx, state.B_val = S, np.asarray(B_val, dtype=np.float64)
