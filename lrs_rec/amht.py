"""AMHT-LRS: alternating minimisation with hard thresholding (paper Sec. 2.1, Algorithms 1 and 2).

:class:`AMHTLRS` is a thin scikit-learn-style estimator over the one blockwise engine
(:mod:`lrs_rec.engine`) that also trains the rating models: the paper setting is the rating trainer
with fixed features — every sample is its own "item", ``F = X`` and ``items = arange(N)`` — no user or
item biases, no population/conditional prior, exact least squares (absolute ridges, default 0, plus a
1e-10 relative jitter) and the paper's hard-thresholding b-step. Each outer iteration ℓ (Algorithm 1):

1. b-step (Eq. 3, ``StepParams.b_step`` ``"htp"`` or ``"iht"``, :mod:`lrs_rec.engine.sparse_b`): for
   every user, a sparse update of b_u given U and w_u — the paper's Algorithm 2 (``b_step="iht"``,
   with a stable normalised step instead of 1/m) or hard-thresholding pursuit (``"htp"``, default),
   with OMP and IRLS restarts kept per user where they fit better; then Assumption A1's row sparsity
   (``zeta``).
2. w-step (Eq. 4): per-user least squares for w_u given U and b_u (:func:`lrs_rec.engine.steps.user_step`).
3. U-step (Eq. 5, :func:`lrs_rec.engine.steps.u_step`): least squares over vec(U) from per-user Gram
   statistics, then a QR decomposition; by default (``u_step="joint"``) each b_u is re-optimised on its
   support jointly with U (variable projection). Solved directly when d·r is small, otherwise by
   matrix-free conjugate gradients.

:mod:`lrs_rec.amht_reference` is the slow per-user-loop twin the tests compare against. The public
step functions below (:func:`w_step`, :func:`b_step`, :func:`u_step_statistics`, ...) are the same
engine steps on unsorted ``(X, y, users)`` samples.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any, Literal

import numpy as np

from lrs_rec._types import FloatArray, IntArray
from lrs_rec.engine.sparse_b import IRLS_SCHEDULES, OMP_ALL_ITERS, SparseB, sparse_b_step
from lrs_rec.engine.steps import (
    LRSState,
    Samples,
    StepParams,
    least_squares_u,
    u_step,
    user_step,
)
from lrs_rec.engine.steps import u_step_statistics as engine_u_statistics
from lrs_rec.engine.u_solve import orthonormalize, u_step_cg
from lrs_rec.engine.user_rows import JITTER, gather_rows, sparse_predict
from lrs_rec.init import moments_init, random_orthonormal
from lrs_rec.model import LRSModel
from lrs_rec.validation import (
    check_fit_inputs,
    check_non_negative,
    check_rank_sparsity,
    check_users,
    check_X,
)

__all__ = [
    "AMHTLRS",
    "IRLS_SCHEDULES",
    "JITTER",
    "OMP_ALL_ITERS",
    "b_step",
    "gather_rows",
    "orthonormalize",
    "solve_u_step",
    "sparse_predict",
    "u_least_squares",
    "u_step_cg",
    "u_step_statistics",
    "w_step",
]

DIRECT_MAX_DR = 1024
"""``u_solver="auto"`` solves the (dr × dr) normal equations directly up to this d·r, else uses CG."""

CG_MAXITER = 100
"""Inside the estimator each CG U-step is warm-started and capped at this many iterations (an inexact
U-step is fine for alternating minimisation; the outer loop keeps refining)."""

GRAM_CACHE_MAX = 20_000_000
"""The per-user statistics (Grams X_uᵀX_u: t·d² floats per fold, and X_uᵀy_u, Σ x) are computed once
and kept by the engine (``Samples.gram_cache``: features and targets are fixed) when t·d²·folds is at
most this; otherwise every step recomputes them block by block (bounded memory)."""

BLOCK: int | None = None
"""Users per engine block in the estimator's steps (None: the engine's memory-sized default). The
result does not depend on it (tested)."""

Callback = Callable[[int, LRSModel], None]


# ---------------------------------------------------------------------------------------------
# The paper setting on the engine
# ---------------------------------------------------------------------------------------------
def paper_params(
    k: int, *, ridge_w: float, ridge_b: float, b_step: str, sparse: SparseB = SparseB()
) -> StepParams:
    """The engine's user step in the paper setting: per-user w, no biases, no priors (the ridge on w_u
    shrinks towards 0), exact least squares up to the 1e-10 relative jitter, one w solve per step."""
    return StepParams(
        k=k,
        per_user_w=True,
        user_bias=False,
        reg_w=float(ridge_w),
        reg_b=float(ridge_b),
        reg_bias=0.0,
        population_prior=False,
        conditional_prior=False,
        n_inner=1,
        b_step=b_step if k > 0 else "fixed",
        sparse=sparse,
        w_prior_mean=False,
        jitter=JITTER,
    )


def paper_state(
    X: FloatArray, n_users: int, U: FloatArray, W: FloatArray, B_idx: IntArray, B_val: FloatArray
) -> LRSState:
    """Fixed features ``F = X`` (sample j is item j), no biases, b_u on its support (k-sparse)."""
    return LRSState(
        global_mean=0.0,
        user_bias=np.zeros(n_users),
        item_bias=np.zeros(X.shape[0]),
        F=X,
        U=np.asarray(U, dtype=np.float64),
        W=np.array(W, dtype=np.float64),
        B_idx=np.array(B_idx, dtype=np.int64),
        B_val=np.array(B_val, dtype=np.float64),
    )


def _samples(users: IntArray, y: FloatArray, rows: IntArray) -> Samples:
    return Samples(users=users[rows], items=rows, ratings=y[rows])


def _model(state: LRSState) -> LRSModel:
    return LRSModel(U=state.U, W=state.W, B_idx=state.B_idx, B_val=state.B_val)


# ---------------------------------------------------------------------------------------------
# Public step functions (unsorted samples; each documents the paper equation it implements)
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
    state = paper_state(X, n_users, U, np.zeros((n_users, U.shape[1])), B_idx, B_val)
    p = paper_params(B_idx.shape[1], ridge_w=ridge, ridge_b=0.0, b_step="fixed")
    user_step(state, _samples(users, y, np.arange(X.shape[0])), p, block=BLOCK)
    return np.asarray(state.W)


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
    """Eq. 3 for every user: the sparse update of b_u → ``(W, B_idx, B_val)`` (the engine's
    :func:`~lrs_rec.engine.sparse_b.sparse_b_step`).

    ``method="iht"`` is Algorithm 2: ``c = b + η_u X_uᵀ(y_u − X_u(U w_u + b))``, ``Δ = α + c₁(γ + β/√k)``,
    ``b = HT(c, Δ)`` (also capped at k entries), ``γ ← 2c₁γ + 2(α + c₁β/√k)``, with γ₀ = ‖c‖_∞ and the
    stable normalised step η_u plus backtracking instead of 1/m; W is returned unchanged.
    ``method="htp"`` (hard-thresholding pursuit) takes the support S_u of the top-k of the same
    gradient step and then solves least squares jointly on ``[X_u U, X_u[:, S_u]]`` for (w_u, b_u), so
    W is updated too; with ``restart`` it also runs orthogonal matching pursuit from scratch and, for
    users still fitted badly, IRLS support searches, and keeps per user the best fit (the estimator
    skips IRLS in its first iterations; a standalone call always runs it).
    ``local=True`` makes each user's result a function of their own samples only (rescues tried for
    every user, not chosen by a cross-user statistic): what DP-AMHT-LRS needs for its sensitivity.
    Samples need not be sorted by user, but the rows of W/B are in user order whatever the sample order.
    """
    X, y, users, n_users = check_fit_inputs(X, y, users, n_users)
    if method not in ("htp", "iht"):
        raise ValueError(f"method must be 'htp' or 'iht', got {method!r}")
    k = int(B_idx.shape[1])
    if k == 0:
        return W, B_idx, B_val
    state = paper_state(X, n_users, U, W, B_idx, B_val)
    sparse = SparseB(
        n_inner=n_inner,
        restart=restart,
        omp_all=True,
        irls=restart,  # a standalone call has no iteration schedule: all rescues run
        local=local,
        alpha=alpha,
        beta=beta,
        c1=c1,
    )
    p = paper_params(k, ridge_w=ridge_w, ridge_b=ridge_b, b_step=method, sparse=sparse)
    sparse_b_step(state, _samples(users, y, np.arange(X.shape[0])), p, block=BLOCK)
    model = _model(state)
    return model.W, model.B_idx, model.B_val


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
    """The normal equations of Eq. 5 (the non-private Eq. 7–8, without the 1/(mt) factor), from the
    engine's per-user Gram statistics (:func:`lrs_rec.engine.steps.u_step_statistics`).

    ``A = Σ_u (w_u w_uᵀ) ⊗ (Σ_j x_j x_jᵀ)`` of shape (dr, dr) and ``V = Σ_j x_j (y_j − x_jᵀ b_u) w_uᵀ``
    of shape (d, r), so that vec(U) (column-major: ``vec(U)[c·d + i] = U[i, c]``) solves
    ``A vec(U) = vec(V)``. ``offset`` replaces ``x_jᵀ b_{u_j}`` (e.g. a clipped value, as in Eq. 8).
    Samples need not be sorted.
    """
    X = np.asarray(X, dtype=np.float64)
    users = np.asarray(users, dtype=np.int64)
    y = np.asarray(y, dtype=np.float64)
    W = np.asarray(W, dtype=np.float64)
    n_users, r = W.shape
    d = X.shape[1]
    if offset is not None:
        y = y - np.asarray(offset, dtype=np.float64)
        B_idx, B_val = np.zeros((n_users, 0), dtype=np.int64), np.zeros((n_users, 0))
    state = paper_state(X, n_users, np.zeros((d, r)), W, B_idx, B_val)
    A4, V = engine_u_statistics(state, _samples(users, y, np.arange(X.shape[0])), block=BLOCK)
    # the engine's A is (d, d, r, r); this function's vec(U) is column-major (c·d + i)
    A = A4.transpose(2, 0, 3, 1).reshape(d * r, d * r)
    return np.ascontiguousarray(A), np.asarray(V, dtype=np.float64)


def u_least_squares(A: FloatArray, V: FloatArray, ridge: float = 0.0) -> FloatArray:
    """Solve ``(A + (ridge + jitter)·I) vec(U) = vec(V)`` (Eq. 5; vec column-major as in
    :func:`u_step_statistics`) → the un-orthonormalised U: (d, r) (the engine's
    :func:`~lrs_rec.engine.steps.least_squares_u` with an absolute ridge and the 1e-10 jitter)."""
    d, r = V.shape
    A4 = np.asarray(A, dtype=np.float64).reshape(r, d, r, d).transpose(1, 3, 0, 2)
    U = least_squares_u(
        A4, np.asarray(V, dtype=np.float64), ridge=ridge, ridge_relative=False, jitter=JITTER
    )
    return np.asarray(U, dtype=np.float64)


def solve_u_step(A: FloatArray, V: FloatArray, ridge: float = 0.0) -> FloatArray:
    """Eq. 5 followed by QR (Algorithm 1): the new orthonormal U from the statistics (A, V)."""
    return orthonormalize(u_least_squares(A, V, ridge=ridge))[0]


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
    def _params(self, k: int, iteration: int) -> StepParams:
        sparse = SparseB(
            n_inner=int(self.b_iter),
            restart=bool(self.b_restart),
            omp_all=iteration < OMP_ALL_ITERS,  # IRLS rescues only after the first iterations
            zeta=None if self.zeta is None else int(self.zeta),
            alpha=float(self.iht_alpha),
            beta=float(self.iht_beta),
            c1=float(self.iht_c1),
        )
        return paper_params(
            k, ridge_w=self.ridge_w, ridge_b=self.ridge_b, b_step=self.b_step, sparse=sparse
        )

    def fit(self, X: Any, y: Any, users: Any, n_users: int | None = None) -> AMHTLRS:
        """Fit on samples ``X: (N, d)``, ``y: (N,)``, ``users: (N,)`` with ids 0..n_users-1."""
        Xa, ya, ua, nu = check_fit_inputs(X, y, users, n_users)
        N, d = Xa.shape
        self._check_params(d)
        r, k = int(self.rank), int(self.sparsity)
        if nu < r:
            # the U-step (Eq. 5) is rank-deficient with fewer users than r: part of U would be set
            # by rounding, not by the data
            raise ValueError(f"a rank-{r} U needs at least {r} users, got n_users={nu}")
        rng = np.random.default_rng(self.random_state)

        n_folds = self._n_folds()
        rows = np.arange(N, dtype=np.int64)
        folds = [rows] if n_folds == 1 else _split_folds(ua, nu, n_folds)
        parts = [_samples(ua, ya, f) for f in folds]  # x_j = F[items[j]] with F = X
        full = _samples(ua, ya, rows)
        if nu * d * d * len(parts) <= GRAM_CACHE_MAX:
            for part in parts:
                part.gram_cache = {}
        use_cg = self.u_solver == "cg" or (self.u_solver == "auto" and d * r > DIRECT_MAX_DR)
        joint = self.u_step == "joint" and k > 0

        U = self._initial_u(Xa, ya, ua, nu, rng)
        B_idx = np.tile(np.arange(k, dtype=np.int64), (nu, 1))
        state = paper_state(Xa, nu, U, np.zeros((nu, r)), B_idx, np.zeros((nu, k)))
        p0 = self._params(k, 0)
        user_step(state, parts[0], replace(p0, b_step="fixed"), block=BLOCK)  # Eq. 4 with b = 0

        def predict_all() -> FloatArray:
            model = _model(state)
            return model.predict(Xa, ua)

        history: list[float] = []
        pred_prev = predict_all()
        n_done = 0
        for it in range(int(self.n_iter)):
            data = parts[it % n_folds]
            user_step(state, data, self._params(k, it), block=BLOCK)  # Eq. 3, (ζ), Eq. 4
            active = None
            if joint and self.zeta is not None:  # slots zeroed by the row sparsity stay out
                active = (state.B_val != 0).astype(float)
            u_step(  # Eq. 5 (jointly with b on its support by default), then QR
                state,
                data,
                ridge=float(self.ridge_u),
                block=BLOCK,
                ridge_relative=False,
                jitter=JITTER,
                joint_ridge_b=float(self.ridge_b) if joint else None,
                joint_active=active,
                solver="cg" if use_cg else "direct",
                cg_maxiter=CG_MAXITER,
            )
            n_done = it + 1
            pred = predict_all()
            history.append(float(np.mean((ya - pred) ** 2)))
            if self.callback is not None:
                self.callback(it, _model(state))
            change = float(np.linalg.norm(pred - pred_prev))
            pred_prev = pred
            if change <= self.tol * max(float(np.linalg.norm(pred)), 1e-300):
                break
        if n_folds > 1:  # refit the per-user parameters on all samples
            state.gamma = None
            user_step(state, full, self._params(k, n_done), block=BLOCK)
        self.model_ = _model(state)
        self.n_iter_ = n_done
        self.history_ = history
        self.n_users_ = nu
        return self

    # -- prediction ---------------------------------------------------------------------------
    def predict(self, X: Any, users: Any) -> FloatArray:
        """⟨x_j, θ_{u_j}⟩ for the fitted model."""
        if not hasattr(self, "model_"):
            raise ValueError("this AMHTLRS is not fitted yet: call fit(X, y, users) first")
        Xa = check_X(X, d=self.model_.d)
        ua, _ = check_users(users, n=Xa.shape[0], n_users=self.model_.n_users, require_all=False)
        return self.model_.predict(Xa, ua)
