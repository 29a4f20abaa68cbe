"""Slow, obvious twin of :mod:`lrs_rec.amht`: one Python loop per user, explicit Kronecker products.

It implements the same iteration (same step sizes, jitter, tie-breaking and order of the steps) so the
tests can check the vectorised estimator against it on small problems. Never use it for real work.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from lrs_rec._types import FloatArray, IntArray
from lrs_rec.engine.sparse_b import IRLS_SCHEDULES, OMP_ALL_ITERS
from lrs_rec.engine.user_rows import JITTER
from lrs_rec.model import LRSModel


def _solve_reg(G: FloatArray, h: FloatArray, ridge: FloatArray) -> FloatArray:
    p = G.shape[0]
    scale = float(np.trace(G)) / max(p, 1)
    jitter = JITTER * max(scale, 1e-30)
    return np.asarray(np.linalg.solve(G + np.diag(ridge + jitter), h), dtype=np.float64)


def _top_k(v: FloatArray, k: int) -> IntArray:
    ranked = sorted(range(v.shape[0]), key=lambda i: (-abs(float(v[i])), i))
    return np.array(sorted(ranked[:k]), dtype=np.int64)


def moments_matrix_reference(
    X: FloatArray, y: FloatArray, users: IntArray, n_users: int
) -> FloatArray:
    """M = (1/t) Σ_u (1/m_u) Σ_j y_j² (x_j x_jᵀ − I), user by user and sample by sample."""
    d = X.shape[1]
    M = np.zeros((d, d))
    for u in range(n_users):
        rows = np.flatnonzero(users == u)
        Mu = np.zeros((d, d))
        for j in rows:
            Mu += y[j] ** 2 * (np.outer(X[j], X[j]) - np.eye(d))
        M += Mu / rows.size
    return M / n_users


def pairwise_moments_matrix_reference(
    X: FloatArray, y: FloatArray, users: IntArray, n_users: int
) -> FloatArray:
    """(1/t₂) Σ_{u: m_u ≥ 2} (1/(m_u(m_u−1))) Σ_{j ≠ j'} y_j y_j' x_j x_j'ᵀ, pair by pair."""
    d = X.shape[1]
    M = np.zeros((d, d))
    n_ok = 0
    for u in range(n_users):
        rows = np.flatnonzero(users == u)
        if rows.size < 2:
            continue
        n_ok += 1
        Mu = np.zeros((d, d))
        for j in rows:
            for j2 in rows:
                if j != j2:
                    Mu += y[j] * y[j2] * np.outer(X[j], X[j2])
        M += Mu / (rows.size * (rows.size - 1))
    if n_ok == 0:  # no user has two samples: the fast version falls back to moments_matrix
        return moments_matrix_reference(X, y, users, n_users)
    return M / n_ok


def enforce_row_sparsity_reference(
    B_idx: IntArray, B_val: FloatArray, *, zeta: int, d: int
) -> FloatArray:
    """Per coordinate, keep the ζ largest |b_u[j]| (ties: lower user, then lower slot)."""
    vals = np.array(B_val, dtype=np.float64, copy=True)
    for j in range(d):
        entries = [
            (-abs(float(vals[u, s])), u, s)
            for u in range(B_idx.shape[0])
            for s in range(B_idx.shape[1])
            if B_idx[u, s] == j and vals[u, s] != 0.0
        ]
        for _, u, s in sorted(entries)[zeta:]:
            vals[u, s] = 0.0
    return vals


def _step_size(Xu: FloatArray, g: FloatArray, k: int) -> float:
    S = _top_k(g, k)
    gS = g[S]
    den = float(np.sum((Xu[:, S] @ gS) ** 2))
    return float(np.sum(gS * gS)) / den if den > 0 else 1.0 / Xu.shape[0]


def _objective(F: FloatArray, y: FloatArray, sol: FloatArray, ridge: FloatArray) -> float:
    res = y - F @ sol
    return float(res @ res + np.sum(ridge * sol * sol))


def _omp_user(
    Xu: FloatArray, yu: FloatArray, U: FloatArray, k: int, ridge: FloatArray
) -> tuple[IntArray, FloatArray]:
    """Orthogonal matching pursuit for one user with U fixed (k greedy picks)."""
    r = U.shape[1]
    Z = Xu @ U
    colnorm = np.sqrt(np.sum(Xu * Xu, axis=0))
    colnorm[colnorm == 0] = 1.0
    S: list[int] = []
    sol = _solve_reg(Z.T @ Z, Z.T @ yu, ridge[:r])
    for i in range(k):
        F = np.hstack([Z, Xu[:, S]])
        score = np.abs(Xu.T @ (yu - F @ sol)) / colnorm
        score[S] = -1.0
        S.append(int(np.argmax(score)))
        F = np.hstack([Z, Xu[:, S]])
        sol = _solve_reg(F.T @ F, F.T @ yu, ridge[: r + i + 1])
    order = np.argsort(S)
    return np.array(S)[order].astype(np.int64), np.concatenate([sol[:r], sol[r:][order]])


def _irls_user(
    Xu: FloatArray, yu: FloatArray, U: FloatArray, k: int, n_iter: int, decay: float
) -> IntArray:
    """Reweighted least squares (p = 0) support search for one underdetermined user."""
    r, d = U.shape[1], Xu.shape[1]
    m = Xu.shape[0]
    A = np.hstack([Xu @ U, Xu])
    Dg = np.ones(r + d)
    eps = 0.0
    b = np.zeros(d)
    for it in range(n_iter):
        M = (A * Dg) @ A.T
        M = M + JITTER * max(float(np.trace(M)) / m, 1e-30) * np.eye(m)
        x = Dg * (A.T @ np.linalg.solve(M, yu))
        b = x[r:]
        eps = max(float(np.max(b * b)), 1e-300) if it == 0 else decay * eps
        wb = b * b + eps
        Dg = np.concatenate([np.full(r, 1e4), wb / np.max(wb)])
    return _top_k(b, k)


def _badly(obj: FloatArray, counts: FloatArray, y_scale: float) -> np.ndarray[Any, Any]:
    msr = obj / counts
    return np.asarray(msr > max(10.0 * float(np.median(msr)), 1e-12 * y_scale))


def fit_reference(
    X: FloatArray,
    y: FloatArray,
    users: IntArray,
    n_users: int,
    U0: FloatArray,
    sparsity: int,
    *,
    n_iter: int = 100,
    tol: float = 1e-10,
    b_step: str = "htp",
    b_iter: int = 1,
    ridge_w: float = 0.0,
    ridge_b: float = 0.0,
    ridge_u: float = 0.0,
    u_step: str = "joint",
    zeta: int | None = None,
    iht_alpha: float = 0.0,
    iht_beta: float = 0.0,
    iht_c1: float = 0.25,
    b_restart: bool = True,
) -> tuple[LRSModel, list[float]]:
    """Algorithm 1 with a per-user loop everywhere; ``U0`` is the (orthonormal) initial basis.

    Mirrors ``AMHTLRS(..., u_solver="direct", sample_splitting=False)``; returns (model, history).
    """
    d, r = U0.shape
    k = sparsity
    rows_of = [np.flatnonzero(users == u) for u in range(n_users)]
    Xs = [X[rows] for rows in rows_of]
    ys = [y[rows] for rows in rows_of]
    U = U0.copy()
    B_idx = np.tile(np.arange(k, dtype=np.int64), (n_users, 1))
    B_val = np.zeros((n_users, k))
    W = np.zeros((n_users, r))
    gamma = np.zeros(n_users)
    gamma_set = False
    obj = np.zeros(n_users)
    counts = np.array([yu.shape[0] for yu in ys], dtype=float)
    y_scale = float(np.mean(np.concatenate(ys) ** 2))

    def w_step() -> None:
        for u in range(n_users):
            Z = Xs[u] @ U
            t = ys[u] - Xs[u][:, B_idx[u]] @ B_val[u]
            W[u] = _solve_reg(Z.T @ Z, Z.T @ t, np.full(r, ridge_w))

    def loss_u(u: int, idx: IntArray, val: FloatArray) -> float:
        res = ys[u] - Xs[u] @ U @ W[u] - Xs[u][:, idx] @ val
        return float(res @ res)

    w_step()
    prev = np.concatenate([Xs[u] @ U @ W[u] for u in range(n_users)])
    history: list[float] = []
    for iteration in range(n_iter):
        # b-step (Eq. 3)
        for _inner in range(b_iter if k > 0 else 0):
            for u in range(n_users):
                Xu = Xs[u]
                b = np.zeros(d)
                b[B_idx[u]] = B_val[u]
                res = ys[u] - Xu @ (U @ W[u] + b)
                g = Xu.T @ res
                eta = _step_size(Xu, g, k)
                if b_step == "htp":
                    S = _top_k(b + eta * g, k)
                    F = np.hstack([Xu @ U, Xu[:, S]])
                    ridge = np.concatenate([np.full(r, ridge_w), np.full(k, ridge_b)])
                    sol = _solve_reg(F.T @ F, F.T @ ys[u], ridge)
                    W[u], B_idx[u], B_val[u] = sol[:r], S, sol[r:]
                    if _inner == b_iter - 1:
                        obj[u] = _objective(F, ys[u], sol, ridge)
                else:  # Algorithm 2 with backtracking on the step
                    if not gamma_set:
                        gamma[u] = float(np.max(np.abs(b + eta * g)))
                    delta = iht_alpha + iht_c1 * (gamma[u] + iht_beta / np.sqrt(k))
                    old = loss_u(u, B_idx[u], B_val[u])
                    for _bt in range(9):
                        c = b + eta * g
                        c = np.where(np.abs(c) > delta, c, 0.0)
                        S = _top_k(c, k)
                        if loss_u(u, S, c[S]) <= old:
                            B_idx[u], B_val[u] = S, c[S]
                            break
                        eta *= 0.5
                    gamma[u] = 2 * iht_c1 * gamma[u] + 2 * (
                        iht_alpha + iht_c1 * iht_beta / np.sqrt(k)
                    )
            gamma_set = b_step == "iht"
        if b_step == "htp" and b_restart and k > 0:
            ridge = np.concatenate([np.full(r, ridge_w), np.full(k, ridge_b)])
            flag = (
                np.ones(n_users, dtype=bool)
                if iteration < OMP_ALL_ITERS
                else _badly(obj, counts, y_scale)
            )
            if flag.any():
                for u in np.flatnonzero(flag).tolist():  # OMP restarts
                    S_o, sol_o = _omp_user(Xs[u], ys[u], U, k, ridge)
                    F_o = np.hstack([Xs[u] @ U, Xs[u][:, S_o]])
                    obj_o = _objective(F_o, ys[u], sol_o, ridge)
                    if obj_o < obj[u]:
                        W[u], B_idx[u], B_val[u] = sol_o[:r], S_o, sol_o[r:]
                        obj[u] = obj_o
                # IRLS rescues of users still badly fitted (after the first iterations)
                for n_it, decay in IRLS_SCHEDULES if iteration >= OMP_ALL_ITERS else ():
                    flag = _badly(obj, counts, y_scale)
                    for u in np.flatnonzero(flag).tolist():
                        if Xs[u].shape[0] < r + d:
                            S = _irls_user(Xs[u], ys[u], U, k, n_it, decay)
                            F = np.hstack([Xs[u] @ U, Xs[u][:, S]])
                            sol = _solve_reg(F.T @ F, F.T @ ys[u], ridge)
                            obj_i = _objective(F, ys[u], sol, ridge)
                            if obj_i < obj[u]:
                                W[u], B_idx[u], B_val[u] = sol[:r], S, sol[r:]
                                obj[u] = obj_i
        if zeta is not None and k > 0:
            B_val = enforce_row_sparsity_reference(B_idx, B_val, zeta=zeta, d=d)
        w_step()  # Eq. 4
        # U-step (Eq. 5), then QR
        A = np.zeros((d * r, d * r))
        V = np.zeros((d, r))
        Gs = []
        # slots zeroed by the row-sparsity constraint stay out of the joint U-step
        active = (B_val != 0).astype(float) if zeta is not None else np.ones_like(B_val)
        for u in range(n_users):
            Xu, w = Xs[u], W[u]
            if u_step == "joint" and k > 0:
                XS = Xu[:, B_idx[u]] * active[u]
                G = XS.T @ XS
                reg = ridge_b + JITTER * max(float(np.trace(G)) / k, 1e-30)
                Greg = G + reg * np.eye(k)
                Gs.append(Greg)
                P = np.eye(Xu.shape[0]) - XS @ np.linalg.solve(Greg, XS.T)
                A += np.kron(np.outer(w, w), Xu.T @ P @ Xu)
                V += np.outer(Xu.T @ P @ ys[u], w)
            else:
                A += np.kron(np.outer(w, w), Xu.T @ Xu)
                V += np.outer(Xu.T @ (ys[u] - Xu[:, B_idx[u]] @ B_val[u]), w)
        reg = ridge_u + JITTER * max(float(np.trace(A)) / (d * r), 1e-30)
        U_ls = np.linalg.solve(A + reg * np.eye(d * r), V.reshape(-1, order="F"))
        U_ls = U_ls.reshape((d, r), order="F")
        if u_step == "joint" and k > 0:
            for u in range(n_users):
                XS = Xs[u][:, B_idx[u]] * active[u]
                B_val[u] = np.linalg.solve(Gs[u], XS.T @ (ys[u] - Xs[u] @ U_ls @ W[u]))
        Q, R = np.linalg.qr(U_ls)
        s = np.sign(np.diag(R))
        s[s == 0] = 1.0
        U, R = Q * s, R * s[:, None]
        W = W @ R.T
        pred = np.concatenate(
            [Xs[u] @ U @ W[u] + Xs[u][:, B_idx[u]] @ B_val[u] for u in range(n_users)]
        )
        yy = np.concatenate(ys)
        history.append(float(np.mean((yy - pred) ** 2)))
        change = float(np.linalg.norm(pred - prev))
        prev = pred
        if change <= tol * max(float(np.linalg.norm(pred)), 1e-300):
            break
    return LRSModel(U=U, W=W, B_idx=B_idx, B_val=B_val), history
