"""Regularised AMHT-LRS steps on rating data (paper Sec. 2.1, Algorithm 1), with biases.

Model of a rating (the reference prediction of :class:`training.model_dir.TrainedModel`)::

    r̂(u, i) = μ + c_u + c_i + ⟨f_i, θ_u⟩,   θ_u = U·w_u + b_u,   ‖b_u‖₀ ≤ k

Real rating data is noisy and very uneven (many users have fewer ratings than d), so every least-squares
problem of Algorithm 1 is solved as a ridge problem:

* user step (Eq. 4 then Eq. 3): ``(c_u, w_u)`` by ridge with ``w_u`` shrunk towards the population
  Gaussian prior N(w̄, Σ_w) (mean and trace-normalised covariance of all users' w; strength λ_w), then ``b_u`` by one hard-thresholding-pursuit step: the ridge solution over
  all d coordinates, keep its top-k support (``lrs_rec.thresholding.top_k_indices``, the HT of
  Algorithm 2), refit on that support (λ_b). Two inner rounds.
* U step (Eq. 5, only when item features are fixed, e.g. plug-in mode): least squares in vec(U), then QR.
* item step (alternating refinement of the features): ``(c_i, f_i)`` by ridge given all users' θ_u —
  still learned from the training ratings only.

All per-user / per-item problems are solved together from their Gram matrices (batched solves).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from lrs_rec.engine.grouped import grouped_gram, grouped_sum
from lrs_rec.engine.parallel import block_map
from lrs_rec.engine.sparse_b import SparseB, sparse_b_step
from lrs_rec.engine.u_solve import cg_u_solve, joint_block, orthonormalize, refit_b
from lrs_rec.thresholding import ridge_top_k_refit


@dataclass
class Samples:
    """Dense-index rating samples."""

    users: np.ndarray
    items: np.ndarray
    ratings: np.ndarray
    # fixed features only (the paper setting): the per-user Grams Σ f_i f_iᵀ of each user block,
    # kept across steps and iterations, keyed by the block (lo, hi); None: recomputed every time
    gram_cache: dict[tuple[int, int], np.ndarray] | None = None
    gram_key: tuple[int, int] | None = None

    def __len__(self) -> int:
        return int(self.ratings.shape[0])


@dataclass
class LRSState:
    """The current iterate of the alternating minimisation (mutable, owned by the training loop)."""

    global_mean: float
    user_bias: np.ndarray  # (n_users,)
    item_bias: np.ndarray  # (n_items,)
    F: np.ndarray  # (n_items, d) item features
    U: np.ndarray  # (d, r) orthonormal
    W: np.ndarray  # (n_users, r)
    B: np.ndarray  # (n_users, d), each row at most k non-zeros
    support: np.ndarray | None = None  # (n_users, k) sorted supports S_u of b_u (paper b-step)
    gamma: np.ndarray | None = None  # (n_users,) Algorithm 2's γ per user (b_step "iht")

    def theta(self) -> np.ndarray:
        return np.asarray(self.W @ self.U.T + self.B)

    def predict(self, users: np.ndarray, items: np.ndarray, lo: float, hi: float) -> np.ndarray:
        """The same formula as ``TrainedModel.predict`` on known users/items (used for losses).
        Row chunks of :data:`ROW_CHUNK` (no per-rating d-vectors for all ratings at once)."""
        out = np.empty(users.shape[0])
        for a in range(0, users.shape[0], ROW_CHUNK):
            u, i = users[a : a + ROW_CHUNK], items[a : a + ROW_CHUNK]
            theta = self.W[u] @ self.U.T + self.B[u]
            out[a : a + ROW_CHUNK] = (
                self.global_mean
                + self.user_bias[u]
                + self.item_bias[i]
                + np.einsum("nd,nd->n", self.F[i], theta)
            )
        return np.asarray(np.clip(out, lo, hi))


@dataclass(frozen=True)
class StepParams:
    """What the user step fits, per method."""

    k: int  # sparsity of b_u (0: no sparse part)
    per_user_w: bool  # False: one shared w for all users (single / prompt)
    user_bias: bool  # False: c_u = 0 (single)
    reg_w: float
    reg_b: float
    reg_bias: float
    population_prior: bool = True  # shape the ridge on w_u by the population covariance Σ_w
    conditional_prior: bool = True  # prior mean of w_u conditioned on which items u rated
    n_inner: int = 2
    # the paper setting (lrs_rec.amht.AMHTLRS): b_step "htp" / "iht" (Eq. 3 by lrs_rec.engine.sparse_b,
    # then the w-step, Eq. 4) or "fixed" (the w-step alone); "ridge" is the trainer's b-step
    b_step: str = "ridge"
    sparse: SparseB = field(default_factory=SparseB)
    w_prior_mean: bool = True  # False: the ridge on w_u shrinks towards 0 (the paper's Eq. 4)
    jitter: float = 0.0  # relative diagonal jitter of the w solve (the paper's exact least squares)


def population_precision(W: np.ndarray) -> np.ndarray:
    """Shape of the Gaussian prior on w_u: Σ̃⁻¹ with Σ̃ = cov(W) / mean(diag cov(W)) (trace-normalised,
    so λ_w keeps its scale). The ridge term λ_w (w - w̄)ᵀ Σ̃⁻¹ (w - w̄) is a MAP estimate under
    w_u ~ N(w̄, Σ_w / λ_w'), the same population prior onboarding uses. Identity when there are too few
    users to estimate Σ_w."""
    n, r = W.shape
    if n <= r:
        return np.eye(r)
    cov = np.cov(W, rowvar=False, bias=True).reshape(r, r)
    scale = float(np.mean(np.diag(cov)))
    if not np.isfinite(scale) or scale <= 0:
        return np.eye(r)
    cov = cov / scale + 1e-6 * np.eye(r)
    return np.asarray(np.linalg.inv(cov))


@dataclass
class _UserStats:
    """Sufficient statistics of every user's least-squares problem: XᵀX, Xᵀt, Σx, n, Σt."""

    G: np.ndarray  # (n_users, d, d)
    h: np.ndarray  # (n_users, d)
    s: np.ndarray  # (n_users, d)
    n: np.ndarray  # (n_users,)
    T: np.ndarray  # (n_users,)


def _user_stats(state: LRSState, data: Samples, n_users: int) -> _UserStats:
    X = state.F[data.items]
    t = data.ratings - state.global_mean - state.item_bias[data.items]
    cache, key = data.gram_cache, data.gram_key
    G = None if cache is None or key is None else cache.get(key)
    if G is None:
        G = grouped_gram(data.users, n_users, X)
        if cache is not None and key is not None:
            cache[key] = G
    return _UserStats(
        G=G,
        h=grouped_sum(data.users, n_users, X * t[:, None]),
        s=grouped_sum(data.users, n_users, X),
        n=np.bincount(data.users, minlength=n_users).astype(float),
        T=np.bincount(data.users, t, minlength=n_users),
    )


BLOCK_FLOATS = 1 << 23  # Gram storage per block of users (~64 MB), instead of O(n_users · d²)
ROW_CHUNK = 1 << 20  # ratings per chunk where every rating needs a d-vector (losses, residuals)


def user_block_size(d: int) -> int:
    """Users per block of the user / U steps: their d × d Grams take about BLOCK_FLOATS floats."""
    return max(16, BLOCK_FLOATS // max(1, d * d))


def key_blocks(
    keys: np.ndarray, n_keys: int, block: int, max_samples: int | None = None
) -> Iterator[tuple[int, int, np.ndarray]]:
    """(lo, hi, indices of the samples whose key is in lo..hi-1) for consecutive key blocks of at
    most ``block`` keys and (when given) at most ``max_samples`` samples — a key with more samples
    than that is a block of its own. Within a key the samples keep their order."""
    order = np.argsort(keys, kind="stable")
    bounds = np.searchsorted(keys[order], np.arange(n_keys + 1))
    lo = 0
    while lo < n_keys:
        hi = min(n_keys, lo + block)
        if max_samples is not None:  # the last key whose samples still fit, at least one key
            fit = int(np.searchsorted(bounds, bounds[lo] + max_samples, side="right")) - 1
            hi = max(lo + 1, min(hi, fit))
        yield lo, hi, order[bounds[lo] : bounds[hi]]
        lo = hi


def sample_budget(width: int) -> int:
    """Samples per block when each sample carries ``width`` floats: about BLOCK_FLOATS floats."""
    return max(1, BLOCK_FLOATS // max(1, width))


def _user_blocks(data: Samples, n_users: int, block: int) -> Iterator[tuple[int, int, Samples]]:
    """(lo, hi, the samples of users lo..hi-1 with user indices shifted to start at 0)."""
    for lo, hi, sl in key_blocks(data.users, n_users, block):
        sub = Samples(data.users[sl] - lo, data.items[sl], data.ratings[sl])
        if data.gram_cache is not None:
            sub.gram_cache, sub.gram_key = data.gram_cache, (lo, hi)
        yield lo, hi, sub


def user_step(state: LRSState, data: Samples, p: StepParams, *, block: int | None = None) -> None:
    """Update c_u, w_u, b_u of every user given U and the item features (Eq. 4 and Eq. 3)."""
    if not p.per_user_w:
        _pooled_user_step(state, data, p)
        return
    n_users, r = state.W.shape
    w_bar = state.W.mean(axis=0)
    prec = population_precision(state.W) if p.population_prior else np.eye(r)
    if p.conditional_prior:
        means = conditional_prior_means(state, data)
    else:
        means = np.broadcast_to(w_bar if p.w_prior_mean else np.zeros(r), (n_users, r))
    sparse_b_step(state, data, p, block=block)  # the paper's b-step (a no-op for the trainer's)
    size = block or user_block_size(state.B.shape[1])

    def fit_block(blk: tuple[int, int, Samples]) -> tuple[int, int, tuple[np.ndarray, ...]]:
        lo, hi, sub = blk
        st = _user_stats(state, sub, hi - lo)
        return (
            lo,
            hi,
            _fit_users(state.U, st, p, state.W[lo:hi], state.B[lo:hi], means[lo:hi], prec),
        )

    # blocks are independent: each reads and writes only its own users' rows
    for lo, hi, (c, W, B) in block_map(fit_block, _user_blocks(data, n_users, size)):
        state.user_bias[lo:hi] = c
        state.W[lo:hi] = W
        state.B[lo:hi] = B


def _fit_users(
    U: np.ndarray,
    st: _UserStats,
    p: StepParams,
    W: np.ndarray,
    B: np.ndarray,
    w_prior: np.ndarray,
    prec: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The per-user problems of one block of users, all solved together (batched).
    ``w_prior`` (n, r) holds each user's prior mean of w."""
    n_users, d = B.shape
    r = U.shape[1]
    B = B.copy()
    c = np.zeros(n_users)
    GU = st.G @ U  # (n, d, r)
    UGU = np.einsum("dr,nds->nrs", U, GU)
    sU = st.s @ U
    for _ in range(p.n_inner):
        Gb = np.einsum("uab,ub->ua", st.G, B)  # XᵀX b
        # (c_u, w_u): design [1, X U]; ridge λ_bias on c_u, λ_w (w - w̄)ᵀ Σ̃⁻¹ (w - w̄) on w_u
        A = np.zeros((n_users, r + 1, r + 1))
        A[:, 0, 0] = st.n + (p.reg_bias if p.user_bias else 0.0)
        A[:, 0, 1:] = sU
        A[:, 1:, 0] = sU
        A[:, 1:, 1:] = UGU + p.reg_w * prec[None]
        if p.jitter:
            tr = np.maximum(np.trace(UGU, axis1=1, axis2=2) / r, 1e-30)
            A[:, 1:, 1:] += (p.jitter * tr)[:, None, None] * np.eye(r)[None]
        rhs = np.zeros((n_users, r + 1))
        rhs[:, 0] = st.T - np.einsum("ud,ud->u", st.s, B)
        rhs[:, 1:] = (st.h - Gb) @ U + p.reg_w * (w_prior @ prec)  # prec is symmetric
        if not p.user_bias:
            A[:, 0, :] = 0.0
            A[:, :, 0] = 0.0
            A[:, 0, 0] = 1.0
            rhs[:, 0] = 0.0
        sol = np.linalg.solve(A, rhs[:, :, None])[:, :, 0]
        c, W = sol[:, 0], sol[:, 1:]
        if p.b_step != "ridge":
            continue  # b_u fixed here (the paper's b-step ran before, in sparse_b_step)
        if p.k > 0:
            # b_u: ridge on all d coordinates, hard-threshold to the top k, refit on the support
            xr = st.h - c[:, None] * st.s - np.einsum("uab,ub->ua", GU, W)
            idx, bs = ridge_top_k_refit(st.G, xr, p.k, p.reg_b)
            B = np.zeros((n_users, d))
            np.put_along_axis(B, idx, bs, axis=1)
        else:
            B = np.zeros((n_users, d))
    return c, W, B


def conditional_prior_means(state: LRSState, data: Samples, *, ridge: float = 1e-3) -> np.ndarray:
    """Each user's prior mean of w, conditioned on *which* items they rated (implicit feedback):
    m_u = w̄ + (z_u - z̄) A, with z_u the mean of the rated items' projected features U ᵀ f_i and A
    (r × r) the ridge regression of the current W on z (ridge relative to its curvature).
    Only the training step uses it; the stored w_u already contain its effect."""
    n_users, r = state.W.shape
    n = np.maximum(np.bincount(data.users, minlength=n_users), 1).astype(float)
    Z = np.empty((n_users, r))
    size = user_block_size(state.F.shape[1])
    for lo, hi, sl in key_blocks(data.users, n_users, size, sample_budget(state.F.shape[1])):
        Z[lo:hi] = grouped_sum(data.users[sl] - lo, hi - lo, state.F[data.items[sl]] @ state.U)
    Z /= n[:, None]
    Zc = Z - Z.mean(axis=0)
    G = Zc.T @ Zc
    lam = ridge * max(float(np.trace(G)) / r, 1e-12)
    w_bar = state.W.mean(axis=0)
    A = np.linalg.solve(G + lam * np.eye(r), Zc.T @ (state.W - w_bar))
    return np.asarray(w_bar + Zc @ A)


def _pooled_user_step(state: LRSState, data: Samples, p: StepParams) -> None:
    """single / prompt: one shared w for all users (pooled ridge), then per-user biases given it."""
    n_users, d = state.B.shape
    U = state.U
    r = U.shape[1]
    X = state.F[data.items]
    t = data.ratings - state.global_mean - state.item_bias[data.items]
    n = np.bincount(data.users, minlength=n_users).astype(float)
    c = state.user_bias if p.user_bias else np.zeros(n_users)
    A1 = U.T @ (X.T @ X) @ U + p.reg_w * np.eye(r)
    w = np.zeros(r)
    for _ in range(p.n_inner):
        w = np.linalg.solve(A1, U.T @ (X.T @ (t - c[data.users])))
        if p.user_bias:
            c = np.bincount(data.users, t - X @ (U @ w), minlength=n_users) / (n + p.reg_bias)
    state.W = np.repeat(w[None, :], n_users, axis=0)
    state.user_bias = np.asarray(c, dtype=np.float64).copy()
    state.B = np.zeros((n_users, d))


_JointTerms = list[tuple[int, int, tuple[np.ndarray, np.ndarray, np.ndarray]]]


def u_statistics(
    state: LRSState,
    data: Samples,
    *,
    block: int | None = None,
    joint_ridge_b: float | None = None,
    joint_active: np.ndarray | None = None,
    jitter: float = 0.0,
) -> tuple[np.ndarray, np.ndarray, _JointTerms]:
    """The normal equations of Eq. 5 in vec(U) (row-major, index a·r + p), summed over user blocks:
    ``M = Σ_u G_u ⊗ w_u w_uᵀ`` (dr × dr) and ``rhs = Σ_u (h_u − c_u s_u − G_u b_u) w_uᵀ`` (d × r).
    With ``joint_ridge_b`` each b_u is eliminated on ``state.support`` (variable projection,
    :func:`lrs_rec.engine.u_solve.joint_block`); the per-block terms to refit it are returned."""
    n_users, d = state.B.shape
    r = state.U.shape[1]
    A = np.zeros((d, d, r, r))
    rhs = np.zeros((d, r))
    terms: _JointTerms = []
    for lo, hi, sub in _user_blocks(data, n_users, block or user_block_size(d)):
        st = _user_stats(state, sub, hi - lo)
        W, B, c = state.W[lo:hi], state.B[lo:hi], state.user_bias[lo:hi]
        WW = np.einsum("up,uq->upq", W, W).reshape(hi - lo, r * r)
        A += (st.G.reshape(hi - lo, d * d).T @ WW).reshape(d, d, r, r)
        if joint_ridge_b is None:
            resid = st.h - c[:, None] * st.s - np.einsum("uab,ub->ua", st.G, B)
        else:
            assert state.support is not None
            act = None if joint_active is None else joint_active[lo:hi]
            corr, resid, t = joint_block(
                st.G, st.h - c[:, None] * st.s, state.support[lo:hi], W, joint_ridge_b, jitter, act
            )
            A -= corr
            terms.append((lo, hi, t))
        rhs += resid.T @ W
    return A.transpose(0, 2, 1, 3).reshape(d * r, d * r), rhs, terms


def u_step(
    state: LRSState,
    data: Samples,
    *,
    ridge: float = 10.0,
    block: int | None = None,
    ridge_relative: bool = True,
    jitter: float = 0.0,
    joint_ridge_b: float | None = None,
    joint_active: np.ndarray | None = None,
    solver: str = "direct",
    cg_maxiter: int | None = None,
) -> None:
    """Eq. 5: U = argmin Σ (t - c_u - ⟨x, b_u⟩ - ⟨x, U w_u⟩)², then orthonormalise by QR
    (W absorbs R so that Θ is unchanged by the QR).

    The trainer's ridge is relative to the mean curvature (``ridge_relative``); the paper setting
    uses an absolute ``ridge`` plus a relative ``jitter``, optionally solves jointly with each b_u on
    its support (``joint_ridge_b``, b refitted on the support afterwards; ``joint_active`` (n_users, k)
    drops zeroed slots) and may solve by matrix-free CG (``solver="cg"``, warm-started)."""
    n_users, d = state.B.shape
    r = state.U.shape[1]
    b_new = None
    if solver == "cg":
        U, b_new = cg_u_solve(
            state, data, ridge=ridge, maxiter=cg_maxiter, joint_ridge_b=joint_ridge_b,
            active=joint_active, jitter=jitter,
        )  # fmt: skip
    else:
        M, rhs, terms = u_statistics(
            state, data, block=block, joint_ridge_b=joint_ridge_b, joint_active=joint_active,
            jitter=jitter,
        )  # fmt: skip
        scale = float(np.trace(M)) / (d * r)
        if ridge_relative:
            # ridge relative to the mean curvature (its strength does not depend on the data size).
            # Features fitted on the same ratings make an unregularised Eq. 5 overfit badly (u1.base
            # validation RMSE 0.955 at ridge 1e-6 vs 0.912 at 10); QR removes the shrinkage of the
            # scale afterwards
            lam = ridge * max(scale, 1e-12)
        else:
            lam = ridge + jitter * max(scale, 1e-30)
        U = np.linalg.solve(M + lam * np.eye(d * r), rhs.reshape(d * r)).reshape(d, r)
        if terms:
            b_new = np.zeros((n_users, terms[0][2][1].shape[1]))
            for lo, hi, t in terms:
                b_new[lo:hi] = refit_b(t, U, state.W[lo:hi])
    if b_new is not None:  # b re-optimised on the supports with the new U (before the QR)
        assert state.support is not None
        B = np.zeros_like(state.B)
        np.put_along_axis(B, state.support, b_new, axis=1)
        state.B = B
    Q, R = orthonormalize(U)  # U = QR with diag(R) >= 0, so U's column signs are deterministic
    state.U = Q
    state.W = state.W @ R.T


def item_step(
    state: LRSState, data: Samples, *, reg_features: float, reg_bias: float, refine_features: bool
) -> None:
    """Update c_i (and f_i when refining) of every item given all users' θ_u."""
    n_items, d = state.F.shape
    theta = state.theta()
    t = data.ratings - state.global_mean - state.user_bias[data.users]
    if not refine_features:
        resid = np.empty_like(t)
        for a in range(0, t.size, ROW_CHUNK):
            i, u = data.items[a : a + ROW_CHUNK], data.users[a : a + ROW_CHUNK]
            resid[a : a + ROW_CHUNK] = t[a : a + ROW_CHUNK] - np.einsum(
                "nd,nd->n", state.F[i], theta[u]
            )
        n_i = np.bincount(data.items, minlength=n_items)
        state.item_bias = np.bincount(data.items, resid, minlength=n_items) / (n_i + reg_bias)
        return
    reg = np.full(d + 1, reg_features)
    reg[0] = reg_bias
    F = np.empty_like(state.F)
    c_i = np.empty(n_items)

    def solve_block(blk: tuple[int, int, np.ndarray]) -> tuple[int, int, np.ndarray]:
        lo, hi, sl = blk
        Z = np.hstack([np.ones((sl.size, 1)), theta[data.users[sl]]])
        G = grouped_gram(data.items[sl] - lo, hi - lo, Z)
        h = grouped_sum(data.items[sl] - lo, hi - lo, Z * t[sl, None])
        return lo, hi, np.linalg.solve(G + np.diag(reg)[None], h[:, :, None])[:, :, 0]

    blocks = key_blocks(data.items, n_items, user_block_size(d + 1), sample_budget(d + 1))
    for lo, hi, sol in block_map(solve_block, blocks):  # results in block order
        c_i[lo:hi] = sol[:, 0]
        F[lo:hi] = sol[:, 1:]
    state.item_bias = c_i
    state.F = F


def rmse(state: LRSState, data: Samples, lo: float, hi: float) -> float:
    if len(data) == 0:
        return float("nan")
    err = state.predict(data.users, data.items, lo, hi) - data.ratings
    return float(np.sqrt(np.mean(err**2)))
