"""Few-shot onboarding: fit a new user's (c_u, w_u, b_u) from n ratings with U and the items frozen.

The rating model is the trained one (see ``training.model_dir``)::

    r_ui = μ + c_u + c_i + ⟨f_i, U·w_u + b_u⟩ + ε,      ε ~ N(0, σ²)

so with ``y_j = r_j − μ − c_{i_j}``, ``z_j = Uᵀ f_{i_j}`` (precomputed per model as ``FU = F·U``) and
``x_j = f_{i_j}`` the user's ratings are the linear measurements of paper Eq. 1 for a *new task*
(Theorem 1, generalisation to a new task: U frozen, only the task's w and b are estimated).

For tiny n plain least squares over-fits (n may be smaller than r + 1), so we take the MAP estimate under
the population distribution of the trained users (empirical Bayes, estimated from the model arrays)::

    t_u = (c_u, w_u) ~ N(t̄, Σ_t)      joint: w̄ / Σ_w as stored by training, c_u's variance and its
                                       covariance with w from the trained users' biases
    b_j ~ N(0, τ_b²)                   on an opened coordinate j (τ_b²: trained non-zero b values)

Which items a user chose to rate is itself information about them (the implicit signal of asymmetric
SVD / SVD++). The prior is therefore conditioned on the mean descriptor ``ḡ`` of the n rated items
(``g_i = [f_i, c_i, log(1 + count_i)]``): treating (t_u, m_u) as jointly Gaussian across trained users,
with ``m_u`` a user's mean item descriptor and ``ḡ = m_u + noise`` of covariance ``S/n``::

    t_u | ḡ ~ N(t̄ + K_n (ḡ − m̄),  Σ_t − K_n C_mt),     K_n = C_tm (C_mm + S/n)⁻¹

(``C_mm`` between-user, ``S`` pooled within-user covariance; one generalised eigendecomposition per
model makes every K_n a diagonal rescaling). For n → ∞ this tends to the regression of t on m_u; for
n = 1 it is heavily damped. ``implicit_scale = 0`` switches it off (the plain population prior).
Given the trained ratings' timestamps, these moments are learned on few-shot *episodes* — each trained
user's first ``episode_size`` ratings by time — since a new user's ratings are their earliest ones.

The sparse part follows the hard-thresholding-pursuit refinement of Algorithm 2 (paper Sec. 2.1, Eq. 3):
the support is read off the thresholded gradient ``Xᵀ(y − ŷ)`` (each coordinate's score statistic,
``HT(·, Δ)`` with Δ = ``support_z`` standard errors, then keep-top-``k_eff``), followed by a joint
ridge-regularised solve for (c_u, w_u, b_S). The number of opened coordinates ``k_eff(n)`` grows with n
(0 below ``sparse_min_ratings``), matching the O(r + k) per-task sample complexity of Theorem 1.

Everything model-wide is precomputed once (:class:`Onboarder`); one fit is a few (1+r+k)-sized dense
solves. :func:`onboard_reference` is the slow, obvious twin (explicit inverses, augmented least squares,
plain loops) that the tests compare with.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from itertools import pairwise
from typing import cast

import numpy as np
import scipy.linalg
import scipy.sparse
from scipy.linalg.lapack import dposv

from lrs_rec._types import FloatArray, IntArray
from lrs_rec.model import LRSModel

__all__ = [
    "DEFAULT_SCHEDULE",
    "OnboardedUser",
    "Onboarder",
    "OnboardingConfig",
    "OnboardingPrior",
    "ScheduledOnboarder",
    "check_min_ns",
    "effective_sparsity",
    "estimate_prior",
    "item_descriptors",
    "onboard_reference",
    "public_prior",
]


@dataclass(frozen=True)
class OnboardingConfig:
    """Hyperparameters of onboarding (validated, immutable).

    The ``*_scale`` factors multiply the empirical-Bayes variances estimated from the trained users
    (1.0 = use them as estimated); only ratios of prior to noise variance change the MAP estimate.
    ``implicit_scale`` scales the conditioning on the rated-item set (0 = off, 1 = full Gaussian
    conditioning); ``implicit_max_corr`` caps the canonical correlations between (c_u, w_u) and the
    mean item descriptor (:meth:`OnboardingPrior.with_max_correlation`), which keeps the conditional
    prior positive definite at every n, however many ratings a user has. ``k_eff(n) = 0`` for ``n < sparse_min_ratings``, else
    ``min(k, 1 + (n − sparse_min_ratings) // ratings_per_coordinate)``.
    """

    # defaults: selected on ML-100K *training* users (inner validation split, bench/onboarding.py)
    w_prior_scale: float = 1.0
    bias_prior_scale: float = 0.5
    b_prior_scale: float = 8.0
    noise_scale: float = 1.0
    implicit_scale: float = 1.0
    implicit_max_corr: float = 0.95
    sparse_min_ratings: int = 5
    ratings_per_coordinate: int = 2
    support_z: float = 0.5
    htp_iters: int = 3

    def __post_init__(self) -> None:
        for name in ("w_prior_scale", "bias_prior_scale", "b_prior_scale", "noise_scale"):
            v = getattr(self, name)
            if not (isinstance(v, int | float) and math.isfinite(v) and v > 0):
                raise ValueError(f"OnboardingConfig.{name} must be a finite number > 0, got {v!r}")
        s = self.implicit_scale
        if not (isinstance(s, int | float) and 0.0 <= s <= 1.0):
            raise ValueError(f"OnboardingConfig.implicit_scale must be in [0, 1], got {s!r}")
        rho = self.implicit_max_corr
        if not (isinstance(rho, int | float) and 0.0 < rho < 1.0):
            raise ValueError(f"OnboardingConfig.implicit_max_corr must be in (0, 1), got {rho!r}")
        for name in ("sparse_min_ratings", "ratings_per_coordinate", "htp_iters"):
            v = getattr(self, name)
            if not (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
                raise ValueError(f"OnboardingConfig.{name} must be an int >= 1, got {v!r}")
        z = self.support_z
        if not (isinstance(z, int | float) and math.isfinite(z) and z >= 0):
            raise ValueError(f"OnboardingConfig.support_z must be a finite number >= 0, got {z!r}")


def _sym(a: FloatArray) -> FloatArray:
    return np.asarray(0.5 * (a + a.T), dtype=np.float64)


@dataclass(frozen=True, eq=False)
class OnboardingPrior:
    """The population distribution of the trained users (empirical Bayes), before config scaling.

    ``t`` is the stacked (c_u, w_u) of length 1 + r. The implicit part (``item_desc`` … ``C_tm``)
    may have p = 0 columns, which switches the conditioning off.
    """

    t_mean: FloatArray  # (1+r,)
    t_cov: FloatArray  # (1+r, 1+r)
    b_var: float  # τ_b²
    noise_var: float  # σ²
    item_desc: FloatArray  # (n_items, p)  g_i
    m_mean: FloatArray  # (p,)  m̄
    C_mm: FloatArray  # (p, p)  between-user covariance of m_u (PSD)
    S_within: FloatArray  # (p, p)  pooled within-user covariance of g (positive definite)
    C_tm: FloatArray  # (1+r, p)

    def __post_init__(self) -> None:
        t_mean = np.asarray(self.t_mean, dtype=np.float64).reshape(-1)
        q = t_mean.shape[0]
        desc = np.asarray(self.item_desc, dtype=np.float64)
        if desc.ndim != 2:
            raise ValueError(f"item_desc must be (n_items, p), got shape {desc.shape}")
        p = desc.shape[1]
        shapes = {
            "t_cov": (np.asarray(self.t_cov).shape, (q, q)),
            "m_mean": (np.asarray(self.m_mean).shape, (p,)),
            "C_mm": (np.asarray(self.C_mm).shape, (p, p)),
            "S_within": (np.asarray(self.S_within).shape, (p, p)),
            "C_tm": (np.asarray(self.C_tm).shape, (q, p)),
        }
        for name, (got, want) in shapes.items():
            if got != want:
                raise ValueError(f"OnboardingPrior.{name} must have shape {want}, got {got}")
        for name in ("t_mean", "t_cov", "item_desc", "m_mean", "C_mm", "S_within", "C_tm"):
            arr = np.asarray(getattr(self, name), dtype=np.float64)
            if not np.all(np.isfinite(arr)):
                raise ValueError(f"OnboardingPrior.{name} contains NaN or inf")
            if name in ("t_cov", "C_mm", "S_within"):
                arr = _sym(arr)
            arr.setflags(write=False)
            object.__setattr__(self, name, arr)
        for name in ("b_var", "noise_var"):
            v = float(getattr(self, name))
            if not (math.isfinite(v) and v > 0):
                raise ValueError(f"OnboardingPrior.{name} must be finite and > 0, got {v!r}")
            object.__setattr__(self, name, v)

    @property
    def rank(self) -> int:
        return int(self.t_mean.shape[0]) - 1

    def with_max_correlation(self, rho: float) -> OnboardingPrior:
        """The same prior with ``C_tm`` made consistent with ``t_cov`` and ``C_mm``.

        ``t_cov``, ``C_mm`` (sampling noise removed, projected to PSD) and ``C_tm`` are estimated
        separately, so their joint matrix need not be a covariance: measured on ML-100K, 19–22 of the
        34 descriptor directions have no between-user variance left yet a non-zero covariance with
        t, and the canonical correlations of the rest reach 3–7. The conditional covariance
        ``Σ_t − C_tm (C_mm + S/n)⁻¹ C_mt`` then turns indefinite as n grows and a refit from a
        long history diverges. Here, in the basis where ``Σ_t = LLᵀ`` and ``C_mm`` is diagonal
        relative to S (``C_mm Q = S Q Λ``, ``QᵀSQ = I``): the cross-covariance of directions with
        λ = 0 is set to 0 and the canonical correlations ``svd(L⁻¹ C_tm Q Λ^{-1/2})`` are capped at
        ``rho`` < 1, so ``Σ_t − C_tm C_mm⁺ C_mt ⪰ (1 − rho²) Σ_t`` — a positive-definite conditional
        prior for every n.
        """
        if not 0.0 < rho < 1.0:
            raise ValueError(f"rho must be in (0, 1), got {rho!r}")
        if self.item_desc.shape[1] == 0:
            return self
        lam, Q, pos, L, X = self._canonical_basis()
        X_new = np.zeros_like(X)
        if pos.any():
            root = np.sqrt(lam[pos])
            Ug, corr, Vt = np.linalg.svd(X[:, pos] / root, full_matrices=False)
            X_new[:, pos] = ((Ug * np.minimum(corr, rho)) @ Vt) * root
        return replace(self, C_tm=L @ X_new @ Q.T @ self.S_within)  # Q⁻¹ = QᵀS

    def max_canonical_correlation(self) -> float:
        """Largest canonical correlation of (c_u, w_u) with the mean descriptor (inf if C_tm is
        non-zero where C_mm has no variance); the joint covariance is valid iff it is ≤ 1."""
        if self.item_desc.shape[1] == 0:
            return 0.0
        lam, _, pos, _, X = self._canonical_basis()
        if np.any(np.abs(X[:, ~pos]) > 1e-9 * max(float(np.abs(X).max()), 1e-300)):
            return math.inf
        if not pos.any():
            return 0.0
        return float(np.linalg.svd(X[:, pos] / np.sqrt(lam[pos]), compute_uv=False).max())

    def _canonical_basis(self) -> tuple[FloatArray, FloatArray, np.ndarray, FloatArray, FloatArray]:
        """λ, Q with C_mm Q = S Q Λ and QᵀSQ = I; the directions with λ > 0; Σ_t = LLᵀ; L⁻¹ C_tm Q."""
        lam, Q = scipy.linalg.eigh(self.C_mm, self.S_within)
        pos = lam > 1e-10 * max(float(lam.max()), 0.0)
        L = np.asarray(np.linalg.cholesky(self.t_cov), dtype=np.float64)
        X = scipy.linalg.solve_triangular(L, self.C_tm @ Q, lower=True)
        return lam, Q, pos, L, X

    def summary(self) -> dict[str, float]:
        """Scalars worth recording (e.g. in a manifest or a benchmark)."""
        return {
            "bias_var": float(self.t_cov[0, 0]),
            "w_var_trace": float(np.trace(self.t_cov[1:, 1:])),
            "b_var": self.b_var,
            "noise_var": self.noise_var,
            "implicit_dim": int(self.item_desc.shape[1]),
        }


@dataclass(frozen=True, eq=False)
class OnboardedUser:
    """A fitted user: exactly the per-user record the model stores (r + k numbers and a bias).

    ``b_idx`` has exactly k sorted, distinct coordinates; coordinates beyond the ``n_open`` opened
    ones are padding with value 0 (the :class:`~lrs_rec.model.LRSModel` convention).
    """

    w: FloatArray  # (r,)
    b_idx: IntArray  # (k,)
    b_val: FloatArray  # (k,)
    user_bias: float
    n_ratings: int
    n_open: int

    def theta(self, U: FloatArray) -> FloatArray:
        """θ_u = U·w_u + b_u, shape (d,)."""
        th = np.asarray(U @ self.w, dtype=np.float64)
        th[self.b_idx] += self.b_val
        return th


def effective_sparsity(n: int, k: int, config: OnboardingConfig) -> int:
    """k_eff(n): how many sparse coordinates n ratings may open (0 below ``sparse_min_ratings``)."""
    if n < config.sparse_min_ratings or k == 0:
        return 0
    return min(k, 1 + (n - config.sparse_min_ratings) // config.ratings_per_coordinate)


def item_descriptors(
    item_features: FloatArray, item_bias: FloatArray, item_counts: IntArray
) -> FloatArray:
    """g_i = [f_i, c_i, log(1 + count_i)]: what choosing to rate item i says about a user."""
    F = np.asarray(item_features, dtype=np.float64)
    return np.column_stack(
        [
            F,
            np.asarray(item_bias, dtype=np.float64),
            np.log1p(np.asarray(item_counts, dtype=np.float64)),
        ]
    )


def estimate_prior(
    *,
    lrs: LRSModel,
    item_features: FloatArray,
    item_bias: FloatArray,
    user_bias: FloatArray,
    global_mean: float,
    w_prior_mean: FloatArray,
    w_prior_cov: FloatArray,
    history_indptr: IntArray,
    history_items: IntArray,
    history_ratings: FloatArray,
    implicit: bool = True,
    history_timestamps: FloatArray | None = None,
    episode_size: int = 20,
) -> OnboardingPrior:
    """Empirical-Bayes prior from the trained model's arrays.

    * (c_u, w_u): mean (c̄, w̄) and covariance with the w block = ``w_prior_cov`` as stored by training,
      the c_u variance and c–w covariances from ``user_bias`` and W; a 1e-6 relative ridge keeps it
      positive definite.
    * b: τ_b² = mean square of the trained non-zero b values.
    * noise: σ² = training residual sum of squares / (N − n_users·(1 + r + k)) (degrees-of-freedom
      corrected, training residuals are optimistic); the raw mean square if that has too few dof.
    * implicit: m_u = mean item descriptor of each trained user's history; C_mm = their covariance
      minus the sampling part mean(S/n_u), projected to PSD relative to S; C_tm = cov(t_u, m_u).
    * episodes (meta-learning): with ``history_timestamps`` (aligned with ``history_items``) the
      implicit moments are taken over each trained user's FIRST ``episode_size`` ratings by time
      (ties by item index) instead of their whole history — a new user's few ratings are their
      earliest, which on MovieLens are not a random sample of what they rate later (sign-up pages
      show popular films), so the map from first items to (c_u, w_u) is learned on first items.
    """
    r = lrs.rank
    n_users = lrs.n_users
    n_items = np.asarray(item_features).shape[0]
    ub = np.asarray(user_bias, dtype=np.float64)
    W = lrs.W
    indptr = np.asarray(history_indptr, dtype=np.int64)
    items = np.asarray(history_items)  # int32 stays int32: no O(N) int64 copy
    if not np.issubdtype(items.dtype, np.integer):
        items = items.astype(np.int64)
    ratings = np.asarray(history_ratings)
    counts = np.diff(indptr)
    n_ratings = int(indptr[-1]) if indptr.size else 0

    T = np.column_stack([ub, W])  # (n_users, 1+r)
    t_mean = np.concatenate([[float(ub.mean()) if n_users else 0.0], w_prior_mean])
    t_cov = np.cov(T, rowvar=False) if n_users > 1 else np.eye(1 + r)
    t_cov = np.atleast_2d(t_cov)
    t_cov[1:, 1:] = np.asarray(w_prior_cov, dtype=np.float64)
    t_cov[0, 0] = max(float(t_cov[0, 0]), 1e-6)
    # make it positive definite (the stored Σ_w and the estimated cross terms may disagree slightly)
    evals, evecs = np.linalg.eigh(_sym(t_cov))
    floor = 1e-6 * max(float(evals.max()), 1e-6)
    t_cov = (evecs * np.maximum(evals, floor)) @ evecs.T

    nz = lrs.B_val[lrs.B_val != 0.0]
    b_var = max(float(np.mean(nz**2)) if nz.size else 0.0, 1e-6)

    noise_var = 1e-6
    if n_ratings:
        feats = np.asarray(item_features, dtype=np.float64)
        ib = np.asarray(item_bias, dtype=np.float64)
        sse = 0.0
        # by blocks of users (CSR order), so memory stays bounded: O(block × d), never O(N × d)
        for a, b in _user_blocks(indptr):
            lo, hi = int(indptr[a]), int(indptr[b])
            theta = lrs.theta_rows(np.arange(a, b))
            it, us = items[lo:hi], np.repeat(np.arange(b - a), counts[a:b])
            pred = global_mean + ub[a:b][us] + ib[it] + np.einsum("nd,nd->n", feats[it], theta[us])
            sse += float(np.sum((np.asarray(ratings[lo:hi], dtype=np.float64) - pred) ** 2))
        noise_var = residual_noise_var(sse, n_ratings, n_users * (1 + r + lrs.sparsity))

    desc = np.zeros((n_items, 0))
    if implicit and n_users > 2 and np.all(counts > 0):
        desc = item_descriptors(item_features, item_bias, np.bincount(items, minlength=n_items))
    # int32 user rows (half the bytes of int64; every consumer only indexes with them)
    users = items[:0]
    if desc.shape[1]:
        users = cast(IntArray, np.repeat(np.arange(n_users, dtype=np.int32), counts))
    if history_timestamps is not None and desc.shape[1]:
        items, users, counts = _first_ratings_blocked(
            items, users, indptr, history_timestamps, episode_size
        )
    m_mean, C_mm, S, C_tm = _implicit_moments(T, desc, items, users, counts)
    return OnboardingPrior(
        t_mean=t_mean,
        t_cov=t_cov,
        b_var=b_var,
        noise_var=noise_var,
        item_desc=desc,
        m_mean=m_mean,
        C_mm=C_mm,
        S_within=S,
        C_tm=C_tm,
    )


_BLOCK_RATINGS = 1 << 17  # ratings per block of the prior's passes over the histories


def _user_blocks(indptr: IntArray, per_block: int = _BLOCK_RATINGS) -> list[tuple[int, int]]:
    """Consecutive user ranges [a, b) of at most ``per_block`` ratings each (or one user)."""
    n = indptr.shape[0] - 1
    out, a = [], 0
    while a < n:
        b = int(np.searchsorted(indptr, indptr[a] + per_block, side="right")) - 1
        b = min(max(b, a + 1), n)
        out.append((a, b))
        a = b
    return out


def _first_ratings_blocked(
    items: IntArray,
    users: IntArray,
    indptr: IntArray,
    history_timestamps: FloatArray,
    episode_size: int,
) -> tuple[IntArray, IntArray, IntArray]:
    """``_first_ratings`` over consecutive blocks of users (each user's cut depends on their own
    ratings only, so the blocks give the whole result): its sort temporaries are O(block), not O(N)."""
    ts = np.asarray(history_timestamps)
    if ts.shape != items.shape:
        raise ValueError(
            f"history_timestamps must be finite and match history_items {items.shape}, "
            f"got shape {ts.shape}"
        )
    counts = np.diff(indptr)
    out_items, out_users = [], []
    for a, b in _user_blocks(indptr, _BLOCK_RATINGS * 8):
        lo, hi = int(indptr[a]), int(indptr[b])
        it, us, _ = _first_ratings(
            items[lo:hi], users[lo:hi] - a, counts[a:b], ts[lo:hi], episode_size
        )
        out_items.append(it)
        out_users.append((us + a).astype(users.dtype, copy=False))
    if not out_items:
        return items, users, counts
    return (
        np.concatenate(out_items),
        np.concatenate(out_users),
        np.minimum(counts, episode_size),
    )


def _first_ratings(
    items: IntArray,
    users: IntArray,
    counts: IntArray,
    history_timestamps: FloatArray,
    episode_size: int,
) -> tuple[IntArray, IntArray, IntArray]:
    """Each user's first ``episode_size`` ratings by time (ties by item): (items, users, counts),
    grouped by user (``users`` is the CSR row of every rating, so already grouped).

    Only users with more than ``episode_size`` ratings are sorted (the others keep all theirs), by one
    int64 key (user, dense rank of the time, item) when it fits in 63 bits, else by ``np.lexsort``.
    The slow twin (one lexsort of all ratings) is in tests/test_onboarding_prior_fast.py."""
    ts = np.asarray(history_timestamps, dtype=np.float64)
    if ts.shape != items.shape or not np.all(np.isfinite(ts)):
        raise ValueError(
            f"history_timestamps must be finite and match history_items {items.shape}, "
            f"got shape {ts.shape}"
        )
    if episode_size < 1:
        raise ValueError(f"episode_size must be >= 1, got {episode_size}")
    long_user = counts > episode_size
    if not np.any(long_user):
        return items, users, counts
    sel = np.flatnonzero(long_user[users])  # ratings of the users to cut, grouped by user
    su, si = users[sel], items[sel].astype(np.int64)
    t_rank, n_times = _dense_rank(ts[sel])
    n_items = int(si.max()) + 1
    group = np.cumsum(long_user) - 1  # 0-based index of each long user among the long users
    if n_times * n_items * (int(group[-1]) + 1) < 2**_KEY_BITS:
        key = (group[su] * n_times + t_rank) * n_items + si
        order = np.argsort(key)  # rows with equal (user, time, item) keys are interchangeable
    else:
        order = np.lexsort((si, t_rank, su))
    starts = np.concatenate([[0], np.cumsum(counts[long_user])[:-1]])
    rank = np.arange(sel.size) - np.repeat(starts, counts[long_user])
    cut = sel[order[rank < episode_size]]  # the kept ratings of the long users, by user
    keep = np.ones(users.size, dtype=bool)
    keep[sel] = False
    keep[cut] = True
    kept = np.flatnonzero(keep)  # every short user's ratings and the long users' first ones
    return items[kept], users[kept], np.minimum(counts, episode_size)


_KEY_BITS = 62  # the one-key sort of _first_ratings while its keys fit


def _dense_rank(values: FloatArray) -> tuple[IntArray, int]:
    """(0-based dense rank of each value, number of distinct values): equal values share a rank."""
    order = np.argsort(values)
    v = values[order]
    new = np.empty(v.size, dtype=np.int64)
    new[:1] = 0
    np.not_equal(v[1:], v[:-1], out=new[1:], casting="unsafe")
    rank = np.empty(v.size, dtype=np.int64)
    rank[order] = np.cumsum(new)
    return rank, int(rank[order[-1]]) + 1 if v.size else 0


def _implicit_moments(
    T: FloatArray, desc: FloatArray, items: IntArray, users: IntArray, counts: IntArray
) -> tuple[FloatArray, FloatArray, FloatArray, FloatArray]:
    """(m̄, C_mm, S, C_tm) of the users' mean descriptors m_u (empty when ``desc`` has no columns):
    C_mm is cov(m_u) minus the sampling part mean(S/n_u), projected to PSD relative to S.

    ``users`` must be grouped (non-decreasing) with ``counts`` ratings each. m_u = (A g)/n_u with the
    sparse user × item count matrix A (no per-rating descriptor rows); the within-user scatter is
    Σ_j g_j g_jᵀ − Σ_u n_u m_u m_uᵀ = Gᵀ diag(item counts) G − Σ_u n_u m_u m_uᵀ, on descriptors
    centred by their rating-weighted mean (so the difference does not cancel digits). The slow twin
    (per-rating deviations, ``np.add.at``) is in tests/test_onboarding_prior_fast.py."""
    n_users, q = T.shape
    p = desc.shape[1]
    if p == 0:
        return np.zeros(0), np.zeros((0, 0)), np.zeros((0, 0)), np.zeros((q, 0))
    n_items = desc.shape[0]
    n_i = np.bincount(items, minlength=n_items).astype(np.float64)
    g_bar = (n_i @ desc) / max(float(n_i.sum()), 1.0)
    G = desc - g_bar
    indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    # users with one rating add exactly nothing to the scatter: leave them out rather than add rounding
    n_several = n_i - np.bincount(items[indptr[:-1][counts == 1]], minlength=n_items)
    Tc = T - T.mean(axis=0)
    # one pass over blocks of users: m_u - ḡ = (A g)/n_u of each block, never an (N × p) array
    sum_mc, sum_mcmc, tc_mc = np.zeros(p), np.zeros((p, p)), np.zeros((q, p))
    within = np.zeros((p, p))
    for a, b in _user_blocks(indptr, _BLOCK_RATINGS * 8):
        lo, hi = int(indptr[a]), int(indptr[b])
        A = scipy.sparse.csr_matrix(
            (np.ones(hi - lo), items[lo:hi], indptr[a : b + 1] - lo), shape=(b - a, n_items)
        )
        cnt = counts[a:b]
        Mc = np.asarray(A @ G) / cnt[:, None]
        Mn = Mc[cnt > 1]
        within += (Mn * cnt[cnt > 1, None]).T @ Mn
        sum_mc += Mc.sum(axis=0)
        sum_mcmc += Mc.T @ Mc
        tc_mc += Tc[a:b].T @ Mc
    dof_w = max(int(items.size - n_users), 1)
    mc_mean = sum_mc / n_users
    cov_m = (sum_mcmc - n_users * np.outer(mc_mean, mc_mean)) / (n_users - 1)
    m_mean = mc_mean + g_bar
    S, C_mm = within_and_between(
        (G * n_several[:, None]).T @ G - within, dof_w, cov_m, float(np.mean(1.0 / counts))
    )
    C_tm = (tc_mc - np.outer(Tc.sum(axis=0), mc_mean)) / (n_users - 1)
    return m_mean, C_mm, S, C_tm


def residual_noise_var(sse: float, n_ratings: int, n_params: int) -> float:
    """σ² of the rating noise from the training residuals: SSE over the degrees of freedom left
    after the n_params per-user parameters (SSE / N when fewer than N/4 remain), at least 1e-6.
    Used by the local and the Dask (per-partition sums) onboarding priors alike."""
    dof = n_ratings - n_params
    return max(sse / dof if dof > n_ratings // 4 else sse / n_ratings, 1e-6)


def within_and_between(
    scatter: FloatArray, dof: int, cov_m: FloatArray, mean_inv_count: float
) -> tuple[FloatArray, FloatArray]:
    """(S, C_mm) from the pooled within-user scatter of the descriptors and cov(m_u): S is the
    scatter over its degrees of freedom with a 1e-6 relative ridge; C_mm = cov(m_u) − mean(1/n_u)·S
    projected to PSD relative to S. Shared by this module's blockwise pass and the Dask reduction."""
    p = scatter.shape[0]
    S = _sym(scatter) / dof
    S = S + 1e-6 * max(float(np.trace(S)) / p, 1e-12) * np.eye(p)
    C_raw = cov_m - mean_inv_count * S
    lam, Q = scipy.linalg.eigh(_sym(C_raw), _sym(S))  # C Q = S Q Λ, QᵀSQ = I
    SQ = S @ Q
    return S, (SQ * np.maximum(lam, 0.0)) @ SQ.T


def public_prior(
    *,
    w_prior_mean: FloatArray,
    w_prior_cov: FloatArray,
    rating_min: float,
    rating_max: float,
    n_items: int,
) -> OnboardingPrior:
    """A prior that uses only what a differentially private model releases: w̄ and Σ_w (the
    population prior training publishes), plus fixed public variances tied to the rating scale Δ —
    noise (Δ/4)², user bias (Δ/10)², b coordinates (Δ/30)² — and no item-set conditioning (that
    would be an aggregate of the trained users' histories). On a 1–5 scale this gives 1.0, 0.16 and
    0.018, close to what ML-100K's non-private estimate finds (0.8, 0.13, 0.02)."""
    w_mean = np.asarray(w_prior_mean, dtype=np.float64).reshape(-1)
    r = w_mean.shape[0]
    delta = float(rating_max) - float(rating_min)
    if not (math.isfinite(delta) and delta > 0):
        raise ValueError(f"rating scale [{rating_min}, {rating_max}] is empty")
    t_cov = np.zeros((1 + r, 1 + r))
    t_cov[0, 0] = (delta / 10.0) ** 2
    w_cov = np.asarray(w_prior_cov, dtype=np.float64)
    evals, evecs = np.linalg.eigh(_sym(w_cov))
    floor = 1e-6 * max(float(evals.max()) if evals.size else 0.0, 1e-6)
    t_cov[1:, 1:] = (evecs * np.maximum(evals, floor)) @ evecs.T
    return OnboardingPrior(
        t_mean=np.concatenate([[0.0], w_mean]),
        t_cov=t_cov,
        b_var=(delta / 30.0) ** 2,
        noise_var=(delta / 4.0) ** 2,
        item_desc=np.zeros((n_items, 0)),
        m_mean=np.zeros(0),
        C_mm=np.zeros((0, 0)),
        S_within=np.zeros((0, 0)),
        C_tm=np.zeros((1 + r, 0)),
    )


def _pad_support(
    support: list[int], values: FloatArray, k: int, d: int
) -> tuple[IntArray, FloatArray]:
    """Pad an opened support to exactly k sorted distinct coordinates (padding values are 0)."""
    idx = list(support)
    taken = set(idx)
    j = 0
    while len(idx) < k:
        if j not in taken:
            idx.append(j)
            taken.add(j)
        j += 1
    vals = np.zeros(k)
    vals[: len(support)] = values
    order = np.argsort(np.asarray(idx, dtype=np.int64), kind="stable")
    return np.asarray(idx, dtype=np.int64)[order], vals[order]


def _check_ratings(
    items: IntArray, ratings: FloatArray, n_items: int
) -> tuple[IntArray, FloatArray]:
    it = np.asarray(items)
    rt = np.asarray(ratings, dtype=np.float64)
    if it.ndim != 1 or rt.ndim != 1 or it.shape != rt.shape:
        raise ValueError(
            f"items and ratings must be 1-d of equal length, got shapes {it.shape} and {rt.shape}"
        )
    if it.size == 0:
        raise ValueError("onboarding needs at least one rating, got none")
    if not np.issubdtype(it.dtype, np.integer):
        raise ValueError(f"items must be integer item indices, got dtype {it.dtype}")
    if it.min() < 0 or it.max() >= n_items:
        bad = int(it[(it < 0) | (it >= n_items)][0])
        raise ValueError(f"item index {bad} is outside [0, {n_items})")
    if not np.all(np.isfinite(rt)):
        raise ValueError("ratings contain NaN or inf")
    return it.astype(np.int64), rt


def _scale_diag(config: OnboardingConfig, r: int) -> FloatArray:
    """D such that the scaled prior covariance is D·Σ_t·D (c block by bias, w block by w scale)."""
    scales = np.concatenate([[config.bias_prior_scale], np.full(r, config.w_prior_scale)])
    return np.asarray(np.sqrt(scales), dtype=np.float64)


@dataclass(frozen=True, eq=False)
class Onboarder:
    """Fits new (or refits existing) users against a frozen model; immutable and thread-safe.

    Build it with :meth:`from_arrays` (``serving.onboarding`` builds it from a ``TrainedModel``).
    """

    U: FloatArray  # (d, r)
    item_features: FloatArray  # (n_items, d)  F
    item_bias: FloatArray  # (n_items,)
    global_mean: float
    rating_min: float
    rating_max: float
    k: int
    prior: OnboardingPrior
    config: OnboardingConfig
    # precomputed per model
    FU: FloatArray = field(init=False)  # (n_items, r) = F·U
    _A: FloatArray = field(init=False)  # (n_items, 1+r) = [1, F·U]: design rows of (c_u, w_u)
    _Y: FloatArray = field(init=False)  # (n_items, p) = g_i·Q  (generalised eigenbasis)
    _y_pop: FloatArray = field(init=False)  # (p,) = m̄·Q
    _lam: FloatArray = field(init=False)  # (p,) eigenvalues of C_mm relative to S
    _gain: FloatArray = field(init=False)  # (1+r, p) = D·C_tm·Q
    _t_mean: FloatArray = field(init=False)  # (1+r,)
    _t_cov: FloatArray = field(init=False)  # (1+r, 1+r) = D·Σ_t·D
    _noise: float = field(init=False)
    _noise_eye: FloatArray = field(init=False)  # σ²·I (1+r)
    _b_precision: float = field(init=False)  # σ²/τ_b²

    def __post_init__(self) -> None:
        U = np.array(self.U, dtype=np.float64)
        F = np.array(self.item_features, dtype=np.float64)
        ib = np.array(self.item_bias, dtype=np.float64)
        if U.ndim != 2 or F.ndim != 2 or F.shape[1] != U.shape[0]:
            raise ValueError(
                f"item_features {F.shape} and U {U.shape} do not match (F: n×d, U: d×r)"
            )
        if ib.shape != (F.shape[0],):
            raise ValueError(f"item_bias must be ({F.shape[0]},), got {ib.shape}")
        r = U.shape[1]
        if self.prior.rank != r:
            raise ValueError(f"prior is for rank {self.prior.rank}, U has rank {r}")
        if self.prior.item_desc.shape[0] != F.shape[0]:
            raise ValueError(
                f"prior item_desc has {self.prior.item_desc.shape[0]} items, "
                f"item_features has {F.shape[0]}"
            )
        if not 0 <= self.k <= U.shape[0]:
            raise ValueError(f"sparsity k={self.k} must lie in [0, d={U.shape[0]}]")
        if not self.rating_min < self.rating_max:
            raise ValueError(f"rating scale [{self.rating_min}, {self.rating_max}] is empty")
        cfg, prior = self.config, self.prior
        D = _scale_diag(cfg, r)
        p = prior.item_desc.shape[1]
        if p and cfg.implicit_scale > 0:
            consistent = prior.with_max_correlation(cfg.implicit_max_corr)
            lam, Q = scipy.linalg.eigh(prior.C_mm, prior.S_within)
            lam = np.maximum(lam, 0.0)
            Y = prior.item_desc @ Q
            y_pop = prior.m_mean @ Q
            gain = (D[:, None] * consistent.C_tm) @ Q
        else:
            lam, Y, y_pop, gain = (
                np.zeros(0),
                np.zeros((F.shape[0], 0)),
                np.zeros(0),
                np.zeros((1 + r, 0)),
            )
        values: dict[str, object] = {
            "U": U,
            "item_features": F,
            "item_bias": ib,
            "FU": F @ U,
            "_A": np.column_stack([np.ones(F.shape[0]), F @ U]),
            "_Y": np.ascontiguousarray(Y),
            "_y_pop": y_pop,
            "_lam": lam,
            "_gain": gain,
            "_t_mean": prior.t_mean.copy(),
            "_t_cov": D[:, None] * prior.t_cov * D[None, :],
        }
        for name, arr in values.items():
            assert isinstance(arr, np.ndarray)
            arr.setflags(write=False)
            object.__setattr__(self, name, arr)
        noise = prior.noise_var * cfg.noise_scale
        object.__setattr__(self, "_noise", noise)
        object.__setattr__(self, "_noise_eye", noise * np.eye(1 + r))
        object.__setattr__(self, "_b_precision", noise / (prior.b_var * cfg.b_prior_scale))

    @property
    def n_items(self) -> int:
        return int(self.item_features.shape[0])

    @property
    def d(self) -> int:
        return int(self.U.shape[0])

    @property
    def rank(self) -> int:
        return int(self.U.shape[1])

    def with_config(self, config: OnboardingConfig) -> Onboarder:
        """The same model and prior under another config (no re-estimation of the prior)."""
        return Onboarder(
            U=self.U,
            item_features=self.item_features,
            item_bias=self.item_bias,
            global_mean=self.global_mean,
            rating_min=self.rating_min,
            rating_max=self.rating_max,
            k=self.k,
            prior=self.prior,
            config=config,
        )

    @classmethod
    def from_arrays(
        cls,
        *,
        lrs: LRSModel,
        item_features: FloatArray,
        item_bias: FloatArray,
        user_bias: FloatArray,
        global_mean: float,
        w_prior_mean: FloatArray,
        w_prior_cov: FloatArray,
        history_indptr: IntArray,
        history_items: IntArray,
        history_ratings: FloatArray,
        rating_min: float,
        rating_max: float,
        config: OnboardingConfig | None = None,
        prior: OnboardingPrior | None = None,
        history_timestamps: FloatArray | None = None,
    ) -> Onboarder:
        """Estimate the prior from the trained arrays (unless given) and precompute.

        ``history_timestamps`` (aligned with ``history_items``) switches the implicit moments to
        first-ratings episodes (see :func:`estimate_prior`)."""
        if prior is None:
            prior = estimate_prior(
                lrs=lrs,
                item_features=item_features,
                item_bias=item_bias,
                user_bias=user_bias,
                global_mean=global_mean,
                w_prior_mean=w_prior_mean,
                w_prior_cov=w_prior_cov,
                history_indptr=history_indptr,
                history_items=history_items,
                history_ratings=history_ratings,
                history_timestamps=history_timestamps,
            )
        return cls(
            U=lrs.U,
            item_features=item_features,
            item_bias=item_bias,
            global_mean=float(global_mean),
            rating_min=float(rating_min),
            rating_max=float(rating_max),
            k=lrs.sparsity,
            prior=prior,
            config=config or OnboardingConfig(),
        )

    # -- fitting ---------------------------------------------------------------------------------
    def conditional_prior(self, items: IntArray) -> tuple[FloatArray, FloatArray]:
        """Prior mean and covariance of (c_u, w_u) given the rated items (scaled by the config)."""
        it = np.asarray(items, dtype=np.int64)
        if self._lam.size == 0:
            return self._t_mean, self._t_cov
        s = self.config.implicit_scale
        inv = 1.0 / (self._lam + 1.0 / it.shape[0])  # (C_mm + S/n)⁻¹ in the eigenbasis
        v = (self._Y[it].sum(axis=0) / it.shape[0] - self._y_pop) * inv
        mean = self._t_mean + s * (self._gain @ v)
        cov = self._t_cov - s * ((self._gain * inv) @ self._gain.T)
        return mean, cov

    def fit(self, items: IntArray, ratings: FloatArray) -> OnboardedUser:
        """MAP fit of (c_u, w_u, b_u) from one user's ratings (item indices, raw ratings).

        Pass the user's FULL history to refit an existing user: the estimate is a function of all
        their ratings, never an update from the newest ones only.
        """
        it, rt = _check_ratings(items, ratings, self.n_items)
        n = it.shape[0]
        r = self.rank
        y = rt - self.global_mean - self.item_bias[it]
        A = self._A[it]
        t0, cov = self.conditional_prior(it)
        # normal equations of the MAP problem, multiplied by σ²: (AᵀA + σ²Σ⁻¹) t = Aᵀy + σ²Σ⁻¹t0
        P = _spd_solve(cov, self._noise_eye)  # σ²·Σ⁻¹
        H = A.T @ A + P
        g = A.T @ y + P @ t0
        sol = _spd_solve(H, g)
        k_eff = effective_sparsity(n, self.k, self.config)
        support: list[int] = []
        b_S = np.zeros(0)
        if k_eff > 0:
            X = self.item_features[it]
            col_sq = np.einsum("nd,nd->d", X, X)
            denom = math.sqrt(self._noise) * np.sqrt(col_sq + 1e-300)
            b_full = np.zeros(self.d)
            resid = y - A @ sol
            for _ in range(self.config.htp_iters):
                # score statistic of each coordinate given the others (thresholded gradient step)
                stat = (X.T @ resid + b_full * col_sq) / denom
                new_support = _select_support(stat, k_eff, self.config.support_z)
                if new_support == support:
                    break
                support = new_support
                if not support:
                    sol = _spd_solve(H, g)
                    b_S = np.zeros(0)
                    break
                XS = X[:, support]
                s = len(support)
                Hj = np.empty((1 + r + s, 1 + r + s))
                Hj[: 1 + r, : 1 + r] = H
                Hj[: 1 + r, 1 + r :] = A.T @ XS
                Hj[1 + r :, : 1 + r] = Hj[: 1 + r, 1 + r :].T
                Hj[1 + r :, 1 + r :] = XS.T @ XS + self._b_precision * np.eye(s)
                full = _spd_solve(Hj, np.concatenate([g, XS.T @ y]))
                sol, b_S = full[: 1 + r], full[1 + r :]
                b_full = np.zeros(self.d)
                b_full[support] = b_S
                resid = y - A @ sol - XS @ b_S
        b_idx, b_val = _pad_support(support, b_S, self.k, self.d)
        return OnboardedUser(
            w=np.asarray(sol[1:], dtype=np.float64),
            b_idx=b_idx,
            b_val=b_val,
            user_bias=float(sol[0]),
            n_ratings=n,
            n_open=len(support),
        )

    def predict(self, user: OnboardedUser, items: IntArray) -> FloatArray:
        """clip(μ + c_u + c_i + ⟨f_i, θ_u⟩) for item indices (the model's reference prediction)."""
        it = np.asarray(items, dtype=np.int64)
        pred = (
            self.global_mean
            + user.user_bias
            + self.item_bias[it]
            + self.item_features[it] @ user.theta(self.U)
        )
        return np.asarray(np.clip(pred, self.rating_min, self.rating_max), dtype=np.float64)


def check_min_ns(min_ns: Sequence[int]) -> None:
    """A schedule's step thresholds: at least one, starting at 1, strictly increasing."""
    if len(min_ns) == 0:
        raise ValueError("a schedule needs at least one step")
    if min_ns[0] != 1 or any(b <= a for a, b in pairwise(min_ns)):
        raise ValueError(f"min_ns must start at 1 and increase strictly, got {tuple(min_ns)}")


@dataclass(frozen=True, eq=False)
class ScheduledOnboarder:
    """Onboarding whose config depends on n: the step with the largest ``min_n ≤ n`` is used.

    The hyperparameters that suit one rating (mostly a bias) differ from those that suit twenty; a
    schedule chosen on training users per n is the same privilege the fold-in baselines get (their
    ridge strength tuned per n). All steps share one model and one estimated prior.
    """

    min_ns: tuple[int, ...]
    steps: tuple[Onboarder, ...]

    def __post_init__(self) -> None:
        if len(self.min_ns) != len(self.steps):
            raise ValueError("a schedule needs one min_n per step")
        check_min_ns(self.min_ns)
        if any(o.prior is not self.steps[0].prior for o in self.steps):
            raise ValueError("all steps of a schedule must share one model and prior")

    @classmethod
    def from_onboarder(
        cls, onboarder: Onboarder, schedule: list[tuple[int, OnboardingConfig]]
    ) -> ScheduledOnboarder:
        ordered = sorted(schedule, key=lambda s: s[0])
        return cls(
            min_ns=tuple(int(n) for n, _ in ordered),
            steps=tuple(onboarder.with_config(cfg) for _, cfg in ordered),
        )

    def step_for(self, n: int) -> Onboarder:
        j = 0
        while j + 1 < len(self.min_ns) and self.min_ns[j + 1] <= n:
            j += 1
        return self.steps[j]

    @property
    def base(self) -> Onboarder:
        return self.steps[0]

    @property
    def n_items(self) -> int:
        return self.steps[0].n_items

    def fit(self, items: IntArray, ratings: FloatArray) -> OnboardedUser:
        return self.step_for(int(np.asarray(items).shape[0])).fit(items, ratings)

    def predict(self, user: OnboardedUser, items: IntArray) -> FloatArray:
        return self.steps[0].predict(user, items)


DEFAULT_SCHEDULE: tuple[tuple[int, OnboardingConfig], ...] = ((1, OnboardingConfig()),)
"""Hyperparameters by number of ratings (``min_n``, config) used when a model carries none."""


def _spd_solve(H: FloatArray, g: FloatArray) -> FloatArray:
    """Solve H x = g for a symmetric positive definite H (LAPACK ``posv``: one Cholesky, no
    checks — several times cheaper than ``np.linalg.solve`` at these sizes); LU if H is not SPD."""
    _, x, info = dposv(H, g)
    if info != 0:
        return np.asarray(np.linalg.solve(H, g), dtype=np.float64)
    return np.asarray(x, dtype=np.float64)


def _select_support(stat: FloatArray, k_eff: int, z: float) -> list[int]:
    """HT(stat, z) then keep-top-k_eff by |stat| (ties to the lower index); sorted coordinates."""
    mag = np.abs(stat)
    order = np.argsort(-mag, kind="stable")[:k_eff]
    return sorted(order[mag[order] > z].tolist())


def onboard_reference(onboarder: Onboarder, items: IntArray, ratings: FloatArray) -> OnboardedUser:
    """Slow, obvious twin of :meth:`Onboarder.fit` (used by the tests).

    The conditional prior uses the textbook Gaussian formula with explicit inverses; the MAP problem is
    one augmented least-squares system per support (data rows, then Cholesky-whitened prior rows)
    solved with ``lstsq``; the support is chosen with plain Python.
    """
    it, rt = _check_ratings(items, ratings, onboarder.n_items)
    cfg, prior = onboarder.config, onboarder.prior
    U, F = onboarder.U, onboarder.item_features
    d, r = U.shape
    n = len(it)
    sigma2 = prior.noise_var * cfg.noise_scale
    y = np.array([rt[j] - onboarder.global_mean - onboarder.item_bias[it[j]] for j in range(n)])

    # prior of t = (c_u, w_u) given the rated items
    D = np.diag(_scale_diag(cfg, r))
    t0 = prior.t_mean.copy()
    cov = D @ prior.t_cov @ D
    if prior.item_desc.shape[1] and cfg.implicit_scale > 0:
        C_tm = prior.with_max_correlation(cfg.implicit_max_corr).C_tm
        g_bar = np.mean([prior.item_desc[i] for i in it], axis=0)
        K = D @ C_tm @ np.linalg.inv(prior.C_mm + prior.S_within / n)
        t0 = t0 + cfg.implicit_scale * K @ (g_bar - prior.m_mean)
        cov = cov - cfg.implicit_scale * K @ C_tm.T @ D
    L = np.linalg.cholesky(np.linalg.inv(cov))  # Σ⁻¹ = L Lᵀ: prior rows are Lᵀ(t − t0)

    def solve(support: list[int]) -> FloatArray:
        s = len(support)
        rows: list[FloatArray] = []
        rhs: list[float] = []
        for j in range(n):
            f = F[it[j]]
            data_row = [1.0, *list(f @ U), *[f[c] for c in support]]
            rows.append(np.array(data_row) / math.sqrt(sigma2))
            rhs.append(y[j] / math.sqrt(sigma2))
        for a in range(1 + r):
            row = np.zeros(1 + r + s)
            row[: 1 + r] = L[:, a]
            rows.append(row)
            rhs.append(float(L[:, a] @ t0))
        for q in range(s):
            row = np.zeros(1 + r + s)
            row[1 + r + q] = 1.0 / math.sqrt(prior.b_var * cfg.b_prior_scale)
            rows.append(row)
            rhs.append(0.0)
        solution, *_ = np.linalg.lstsq(np.array(rows), np.array(rhs), rcond=None)
        return np.asarray(solution, dtype=np.float64)

    def residual(sol: FloatArray, support: list[int]) -> list[float]:
        out = []
        for j in range(n):
            f = F[it[j]]
            pred = sol[0] + float(f @ U @ sol[1 : 1 + r])
            for q, c in enumerate(support):
                pred += f[c] * sol[1 + r + q]
            out.append(y[j] - pred)
        return out

    support: list[int] = []
    sol = solve(support)
    k_eff = effective_sparsity(n, onboarder.k, cfg)
    if k_eff > 0:
        for _ in range(cfg.htp_iters):
            res = residual(sol, support)
            b = {c: sol[1 + r + q] for q, c in enumerate(support)}
            ranked = []
            for c in range(d):
                col = [F[it[j], c] for j in range(n)]
                sq = sum(v * v for v in col)
                grad = sum(col[j] * res[j] for j in range(n))
                stat = (grad + b.get(c, 0.0) * sq) / (math.sqrt(sigma2) * math.sqrt(sq + 1e-300))
                ranked.append((-abs(stat), c))
            ranked.sort()
            new_support = sorted(c for neg, c in ranked[:k_eff] if -neg > cfg.support_z)
            if new_support == support:
                break
            support = new_support
            sol = solve(support)
            if not support:
                break
    b_idx, b_val = _pad_support(support, sol[1 + r :], onboarder.k, d)
    return OnboardedUser(
        w=sol[1 : 1 + r],
        b_idx=b_idx,
        b_val=b_val,
        user_bias=float(sol[0]),
        n_ratings=n,
        n_open=len(support),
    )
