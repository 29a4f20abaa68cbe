"""The U-step (Eq. 5) linear algebra shared by the engine's :func:`~lrs_rec.engine.steps.u_step`.

* Direct: ``u_step`` accumulates ``A = Σ_u G_u ⊗ w_u w_uᵀ`` and ``V = Σ_u r_u w_uᵀ`` from per-block user
  Grams ``G_u = X_uᵀX_u``; with ``joint_ridge_b`` (the paper estimator's default) each b_u is
  re-optimised on its support jointly with U (variable projection, :func:`joint_block`): ``G_u`` and
  ``r_u`` are replaced by their projections ``G_u − C_u G_{S,u}⁻¹ C_uᵀ``, ``h_u − C_u G_{S,u}⁻¹ h_{u,S}``
  with ``C_u = G_u[:, S_u]``, and b_u is refitted on S_u afterwards (:func:`refit_b`).
* Matrix-free: Jacobi-preconditioned conjugate gradients (:func:`u_step_cg`, :func:`cg_u_solve`) at
  O(N·d·r) per iteration, never forming the (dr × dr) A.
* :func:`orthonormalize`: the QR with deterministic signs that ends every U-step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from lrs_rec._types import FloatArray, IntArray
from lrs_rec.engine.user_rows import JITTER, UserData, gather_rows, sparse_predict

if TYPE_CHECKING:
    from lrs_rec.engine.steps import LRSState, Samples


def _ridged(G: FloatArray, ridge: float, jitter: float) -> FloatArray:
    """``G + (ridge + jitter·mean diag)·I`` for a batch of small Grams."""
    p = G.shape[-1]
    scale = np.trace(G, axis1=-2, axis2=-1) / max(p, 1)
    reg = ridge + jitter * np.maximum(scale, 1e-30)
    return np.asarray(G + reg[:, None, None] * np.eye(p)[None, :, :], dtype=np.float64)


def joint_block(
    G: FloatArray,
    h: FloatArray,
    S: IntArray,
    W: FloatArray,
    ridge_b: float,
    jitter: float,
    active: FloatArray | None = None,
) -> tuple[FloatArray, FloatArray, tuple[FloatArray, FloatArray, FloatArray]]:
    """Variable projection of one block of users' b_u on their supports S_u (n, k).

    Minimising ``Σ_u ‖t_u − X_u U w_u − X_u[:, S_u] b_S‖² + ridge_b‖b_S‖²`` over b_S leaves the Eq. 5
    form with projected Grams ``G_u − C_u G_{S,u}⁻¹ C_uᵀ`` and right-hand sides ``h_u − C_u G_{S,u}⁻¹ h_{u,S}``
    (``h_u = X_uᵀ t_u``, ``C_u = G_u[:, S_u]``). ``active`` (n, k) of 1/0 drops support slots (zeroed by
    the row-sparsity constraint). Returns (the correction ``Σ_u C_u G_{S,u}⁻¹ C_uᵀ ⊗ w_u w_uᵀ`` to subtract
    from A, shape (d, d, r, r), the projected h, (C, G_S, h_S) for :func:`refit_b`)."""
    d = h.shape[1]
    r = W.shape[1]
    C = np.take_along_axis(G, S[:, None, :], axis=2)  # (n, d, k)
    if active is not None:
        C = C * active[:, None, :]
    G0 = np.take_along_axis(C, S[:, :, None], axis=1)
    GS = _ridged(G0 if active is None else G0 * active[:, :, None], ridge_b, jitter)
    L = np.linalg.cholesky(GS)
    Mt = np.linalg.solve(L, C.transpose(0, 2, 1))  # (n, k, d): L⁻¹ C_uᵀ
    hS = gather_rows(h, S) if active is None else gather_rows(h, S) * active
    q = np.linalg.solve(L, hS[..., None])[..., 0]
    hp = h - np.einsum("nkd,nk->nd", Mt, q)
    corr = np.empty((d, d, r, r))
    nk = Mt.shape[0] * Mt.shape[1]
    for c in range(r):
        Mc = (Mt * W[:, c, None, None]).reshape(nk, d)
        for c2 in range(c, r):
            Mc2 = Mc if c2 == c else (Mt * W[:, c2, None, None]).reshape(nk, d)
            corr[:, :, c, c2] = Mc.T @ Mc2
            if c2 != c:
                corr[:, :, c2, c] = corr[:, :, c, c2].T
    return corr, hp, (C, GS, hS)


def refit_b(
    terms: tuple[FloatArray, FloatArray, FloatArray], U: FloatArray, W: FloatArray
) -> FloatArray:
    """``b_S = G_{S,u}⁻¹ (h_{u,S} − C_uᵀ U w_u)``: each user's b on its support given (U, w_u)."""
    C, GS, hS = terms
    rhs = hS - np.einsum("ndk,nd->nk", C, W @ U.T)
    return np.asarray(np.linalg.solve(GS, rhs[..., None])[..., 0], dtype=np.float64)


def cg_u_solve(
    state: LRSState,
    data: Samples,
    *,
    ridge: float,
    maxiter: int | None,
    joint_ridge_b: float | None,
    active: FloatArray | None,
    jitter: float,
) -> tuple[FloatArray, FloatArray | None]:
    """Eq. 5 by CG on the samples' rows (warm-started at ``state.U``), optionally jointly with b on
    ``state.support``. Returns (the un-orthonormalised U, b on the supports or None)."""
    n_users = state.W.shape[0]
    t = data.ratings - state.global_mean - state.item_bias[data.items] - state.user_bias[data.users]
    ud, _ = UserData.build(state.F[data.items], t, data.users, n_users)
    if joint_ridge_b is not None:
        return _joint_u_step_cg(
            ud, state.W, state.support, state.U, joint_ridge_b, ridge, active, jitter,
            maxiter=maxiter,
        )  # fmt: skip
    S, B_val = state.B_idx, state.B_val
    U_ls, _ = u_step_cg(
        ud.X, ud.y, ud.user_of, state.W, S, B_val, U0=state.U, ridge=ridge, maxiter=maxiter
    )
    return U_ls, None


def _joint_u_step_cg(
    data: UserData,
    W: FloatArray,
    S: IntArray,
    U0: FloatArray,
    ridge_b: float,
    ridge_u: float,
    active: FloatArray | None = None,
    jitter: float = JITTER,
    rtol: float = 1e-12,
    maxiter: int | None = None,
) -> tuple[FloatArray, FloatArray]:
    """Matrix-free joint U-step (:func:`joint_block` + solve) on user-sorted rows → (U_ls, B_val)."""
    XS = data.gather(S)  # (N, k)
    if active is not None:
        XS = XS * active[data.user_of]
    G = _ridged(data.segment_sum(XS[:, :, None] * XS[:, None, :]), ridge_b, jitter)
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


def orthonormalize(U: FloatArray) -> tuple[FloatArray, FloatArray]:
    """QR with a deterministic sign (diag(R) ≥ 0): ``U = Q R``. Returns (Q, R)."""
    Q, R = np.linalg.qr(U)
    s = np.sign(np.diag(R))
    s[s == 0] = 1.0
    return np.asarray(Q * s, dtype=np.float64), np.asarray(R * s[:, None], dtype=np.float64)


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
