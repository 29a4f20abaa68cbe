"""Few-shot onboarding: fit a new user's (c_u, w_u, b_u) from n ratings with U and the items frozen.

The rating model is the trained one (see ``training.model_dir``)::

    r_ui = μ + c_u + c_i + ⟨f_i, U·w_u + b_u⟩ + ε,      ε ~ N(0, σ²)

so with ``y_j = r_j − μ − c_{i_j}``, ``z_j = Uᵀ f_{i_j}`` (precomputed per model as ``FU = F·U``) and
``x_j = f_{i_j}`` the user's ratings are the linear measurements of paper Eq. 1 for a *new task*
(Theorem 1, "generalisation for a new task": U frozen, only the task's w and b are estimated).

For tiny n plain least squares over-fits (n may be smaller than r + 1), so we take the MAP estimate under
the population prior learned at training time (empirical Bayes)::

    w_u ~ N(w̄, s_w·Σ_w)      (w̄, Σ_w: mean / covariance of the trained users' w)
    c_u ~ N(0, s_c·τ_c²)     (τ_c²: mean square of the trained users' biases)
    b_j ~ N(0, s_b·τ_b²)     on an opened coordinate j (τ_b²: mean square of trained non-zero b values)

The sparse part follows the hard-thresholding-pursuit refinement of Algorithm 2 (paper Sec. 2.1, Eq. 3):
the support is read off the thresholded gradient ``Xᵀ(y − ŷ)`` (each coordinate's score statistic,
``HT(·, Δ)`` with Δ = ``support_z`` standard errors, then keep-top-``k_eff``), followed by a joint
ridge-regularised solve for (c_u, w_u, b_S). The number of opened coordinates ``k_eff(n)`` grows with n
(0 below ``sparse_min_ratings``), matching the O(r + k) per-task sample complexity of Theorem 1: a
coordinate is only paid for when the data can support it.

Everything model-wide is precomputed once (:class:`Onboarder`); one fit is a handful of (1+r+k)-sized
dense solves. :func:`onboard_reference` is the slow, obvious twin (augmented least squares, plain loops)
the tests compare with.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from lrs_rec._types import FloatArray, IntArray
from lrs_rec.model import LRSModel

__all__ = [
    "OnboardedUser",
    "Onboarder",
    "OnboardingConfig",
    "OnboardingPrior",
    "effective_sparsity",
    "estimate_prior",
    "onboard_reference",
]


@dataclass(frozen=True)
class OnboardingConfig:
    """Hyperparameters of onboarding (validated, immutable).

    The ``*_scale`` factors multiply the empirical-Bayes variances estimated from the trained users
    (1.0 = use them as estimated). Only ratios of prior to noise variance change the MAP estimate.
    ``k_eff(n) = 0`` for ``n < sparse_min_ratings``, else ``min(k, 1 + (n − sparse_min_ratings) //
    ratings_per_coordinate)``.
    """

    w_prior_scale: float = 1.0
    bias_prior_scale: float = 1.0
    b_prior_scale: float = 1.0
    noise_scale: float = 1.0
    sparse_min_ratings: int = 20
    ratings_per_coordinate: int = 10
    support_z: float = 2.5
    htp_iters: int = 3

    def __post_init__(self) -> None:
        for name in ("w_prior_scale", "bias_prior_scale", "b_prior_scale", "noise_scale"):
            v = getattr(self, name)
            if not (isinstance(v, int | float) and math.isfinite(v) and v > 0):
                raise ValueError(f"OnboardingConfig.{name} must be a finite number > 0, got {v!r}")
        if not (isinstance(self.sparse_min_ratings, int) and self.sparse_min_ratings >= 1):
            raise ValueError(
                f"OnboardingConfig.sparse_min_ratings must be an int >= 1, got "
                f"{self.sparse_min_ratings!r}"
            )
        if not (isinstance(self.ratings_per_coordinate, int) and self.ratings_per_coordinate >= 1):
            raise ValueError(
                f"OnboardingConfig.ratings_per_coordinate must be an int >= 1, got "
                f"{self.ratings_per_coordinate!r}"
            )
        if not (math.isfinite(self.support_z) and self.support_z >= 0):
            raise ValueError(f"OnboardingConfig.support_z must be >= 0, got {self.support_z!r}")
        if not (isinstance(self.htp_iters, int) and self.htp_iters >= 1):
            raise ValueError(
                f"OnboardingConfig.htp_iters must be an int >= 1, got {self.htp_iters!r}"
            )


@dataclass(frozen=True, eq=False)
class OnboardingPrior:
    """The population distribution of trained users (empirical Bayes), before config scaling."""

    w_mean: FloatArray  # (r,)  w̄
    w_cov: FloatArray  # (r, r) Σ_w
    bias_var: float  # τ_c²
    b_var: float  # τ_b²
    noise_var: float  # σ²

    def __post_init__(self) -> None:
        w_mean = np.asarray(self.w_mean, dtype=np.float64).reshape(-1)
        r = w_mean.shape[0]
        w_cov = np.asarray(self.w_cov, dtype=np.float64)
        if w_cov.shape != (r, r):
            raise ValueError(f"w_cov must be ({r}, {r}) to match w_mean, got {w_cov.shape}")
        if not (np.all(np.isfinite(w_mean)) and np.all(np.isfinite(w_cov))):
            raise ValueError("w_mean / w_cov contain NaN or inf")
        for name in ("bias_var", "b_var", "noise_var"):
            v = float(getattr(self, name))
            if not (math.isfinite(v) and v > 0):
                raise ValueError(f"OnboardingPrior.{name} must be finite and > 0, got {v!r}")
            object.__setattr__(self, name, v)
        object.__setattr__(self, "w_mean", w_mean)
        object.__setattr__(self, "w_cov", 0.5 * (w_cov + w_cov.T))

    def to_json(self) -> dict[str, object]:
        return {
            "bias_var": self.bias_var,
            "b_var": self.b_var,
            "noise_var": self.noise_var,
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
) -> OnboardingPrior:
    """Empirical-Bayes prior from the trained model's arrays.

    * w: ``w_prior_mean`` / ``w_prior_cov`` as stored by training, with a small ridge (1e-6·tr/r) so
      the precision exists even when some direction of Σ_w is degenerate.
    * c_u: τ_c² = mean of the trained users' c_u², b: τ_b² = mean of the non-zero b values squared.
    * noise: σ² = training residual sum of squares / (N − n_users·(1 + r + k)) (degrees-of-freedom
      corrected, since training residuals are optimistic); falls back to the raw mean square.
    """
    r = lrs.rank
    w_cov = np.asarray(w_prior_cov, dtype=np.float64)
    jitter = 1e-6 * max(float(np.trace(w_cov)) / max(r, 1), 1e-12)
    w_cov = w_cov + jitter * np.eye(r)
    user_bias = np.asarray(user_bias, dtype=np.float64)
    bias_var = float(np.mean(user_bias**2)) if user_bias.size else 0.0
    nz = lrs.B_val[lrs.B_val != 0.0]
    b_var = float(np.mean(nz**2)) if nz.size else 0.0
    indptr = np.asarray(history_indptr, dtype=np.int64)
    items = np.asarray(history_items, dtype=np.int64)
    ratings = np.asarray(history_ratings, dtype=np.float64)
    counts = np.diff(indptr)
    users = np.repeat(np.arange(lrs.n_users, dtype=np.int64), counts)
    noise_var = 0.0
    if users.size:
        feats = np.asarray(item_features, dtype=np.float64)
        theta = lrs.theta()
        pred = (
            global_mean
            + user_bias[users]
            + np.asarray(item_bias, dtype=np.float64)[items]
            + np.einsum("nd,nd->n", feats[items], theta[users])
        )
        sse = float(np.sum((ratings - pred) ** 2))
        dof = users.size - lrs.n_users * (1 + r + lrs.sparsity)
        noise_var = sse / dof if dof > users.size // 4 else sse / users.size
    # Floors keep the prior proper on degenerate models (e.g. all-zero biases in a toy model).
    floor = 1e-6
    return OnboardingPrior(
        w_mean=np.asarray(w_prior_mean, dtype=np.float64),
        w_cov=w_cov,
        bias_var=max(bias_var, floor),
        b_var=max(b_var, floor),
        noise_var=max(noise_var, floor),
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


@dataclass(frozen=True, eq=False)
class Onboarder:
    """Fits new (or refits existing) users against a frozen model; immutable, thread-safe.

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
    prior_precision: FloatArray = field(
        init=False
    )  # (1+r, 1+r) blockdiag(1/τ_c², Σ_w⁻¹), σ²-scaled
    prior_rhs: FloatArray = field(init=False)  # (1+r,) prior precision · prior mean, σ²-scaled
    b_precision: float = field(init=False)  # σ²/τ_b²
    noise_sd: float = field(init=False)

    def __post_init__(self) -> None:
        U = np.ascontiguousarray(self.U, dtype=np.float64)
        F = np.ascontiguousarray(self.item_features, dtype=np.float64)
        if U.ndim != 2 or F.ndim != 2 or F.shape[1] != U.shape[0]:
            raise ValueError(
                f"item_features {F.shape} and U {U.shape} do not match (F: n×d, U: d×r)"
            )
        r = U.shape[1]
        if self.prior.w_mean.shape != (r,):
            raise ValueError(f"prior w_mean has shape {self.prior.w_mean.shape}, U has rank {r}")
        if not 0 <= self.k <= U.shape[0]:
            raise ValueError(f"sparsity k={self.k} must lie in [0, d={U.shape[0]}]")
        cfg = self.config
        noise = self.prior.noise_var * cfg.noise_scale
        # Everything is multiplied by σ² so the normal equations are AᵀA + σ²·P (Eq. 4 with a prior).
        P = np.zeros((1 + r, 1 + r))
        P[0, 0] = noise / (self.prior.bias_var * cfg.bias_prior_scale)
        Pw = np.linalg.inv(self.prior.w_cov * cfg.w_prior_scale) * noise
        P[1:, 1:] = 0.5 * (Pw + Pw.T)
        rhs = np.zeros(1 + r)
        rhs[1:] = P[1:, 1:] @ self.prior.w_mean
        for name, arr in (("U", U), ("item_features", F)):
            arr.setflags(write=False)
            object.__setattr__(self, name, arr)
        fu = F @ U
        fu.setflags(write=False)
        ib = np.array(self.item_bias, dtype=np.float64)
        ib.setflags(write=False)
        object.__setattr__(self, "item_bias", ib)
        object.__setattr__(self, "FU", fu)
        object.__setattr__(self, "prior_precision", P)
        object.__setattr__(self, "prior_rhs", rhs)
        object.__setattr__(self, "b_precision", noise / (self.prior.b_var * cfg.b_prior_scale))
        object.__setattr__(self, "noise_sd", math.sqrt(noise))

    @property
    def n_items(self) -> int:
        return int(self.item_features.shape[0])

    @property
    def d(self) -> int:
        return int(self.U.shape[0])

    @property
    def rank(self) -> int:
        return int(self.U.shape[1])

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
    ) -> Onboarder:
        """Estimate the prior from the trained arrays (unless given) and precompute."""
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
    def fit(self, items: IntArray, ratings: FloatArray) -> OnboardedUser:
        """MAP fit of (c_u, w_u, b_u) from one user's ratings (item indices, raw ratings).

        Pass the user's FULL history to refit an existing user: the estimate is a function of all
        their ratings, never an update from the newest ones only.
        """
        it, rt = _check_ratings(items, ratings, self.n_items)
        n = it.shape[0]
        r = self.rank
        y = rt - self.global_mean - self.item_bias[it]
        A = np.empty((n, 1 + r))
        A[:, 0] = 1.0
        A[:, 1:] = self.FU[it]
        H = A.T @ A + self.prior_precision
        g = A.T @ y + self.prior_rhs
        sol = np.linalg.solve(H, g)
        k_eff = effective_sparsity(n, self.k, self.config)
        support: list[int] = []
        b_S = np.zeros(0)
        if k_eff > 0:
            X = self.item_features[it]
            col_sq = np.einsum("nd,nd->d", X, X)
            b_full = np.zeros(self.d)
            resid = y - A @ sol
            for _ in range(self.config.htp_iters):
                # score statistic of each coordinate given the others (thresholded gradient step)
                stat = (X.T @ resid + b_full * col_sq) / (self.noise_sd * np.sqrt(col_sq + 1e-300))
                new_support = _select_support(stat, k_eff, self.config.support_z)
                if new_support == support:
                    break
                support = new_support
                if not support:
                    sol = np.linalg.solve(H, g)
                    b_S = np.zeros(0)
                    break
                XS = X[:, support]
                s = len(support)
                Hj = np.empty((1 + r + s, 1 + r + s))
                Hj[: 1 + r, : 1 + r] = H
                Hj[: 1 + r, 1 + r :] = A.T @ XS
                Hj[1 + r :, : 1 + r] = Hj[: 1 + r, 1 + r :].T
                Hj[1 + r :, 1 + r :] = XS.T @ XS + self.b_precision * np.eye(s)
                gj = np.concatenate([g, XS.T @ y])
                full = np.linalg.solve(Hj, gj)
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


def _select_support(stat: FloatArray, k_eff: int, z: float) -> list[int]:
    """HT(stat, z) then keep-top-k_eff by |stat| (ties to the lower index); sorted coordinates."""
    mag = np.abs(stat)
    order = np.argsort(-mag, kind="stable")[:k_eff]
    return sorted(int(j) for j in order if mag[j] > z)


def onboard_reference(onboarder: Onboarder, items: IntArray, ratings: FloatArray) -> OnboardedUser:
    """Slow, obvious twin of :meth:`Onboarder.fit` (used by the tests).

    Builds the MAP problem as one augmented least-squares system per support (data rows, then
    √precision prior rows) and solves it with ``lstsq``; the support is chosen with plain Python.
    """
    it, rt = _check_ratings(items, ratings, onboarder.n_items)
    cfg = onboarder.config
    prior = onboarder.prior
    U, F = onboarder.U, onboarder.item_features
    d, r = U.shape
    sigma2 = prior.noise_var * cfg.noise_scale
    n = len(it)
    y = np.array([rt[j] - onboarder.global_mean - onboarder.item_bias[it[j]] for j in range(n)])

    def solve(support: list[int]) -> FloatArray:
        s = len(support)
        p = 1 + r + s
        rows: list[FloatArray] = []
        rhs: list[float] = []
        for j in range(n):
            f = F[it[j]]
            data_row = [1.0, *list(f @ U), *[f[c] for c in support]]
            rows.append(np.array(data_row) / math.sqrt(sigma2))
            rhs.append(y[j] / math.sqrt(sigma2))
        # prior rows: c_u ~ N(0, τ_c²), w ~ N(w̄, Σ_w), b_j ~ N(0, τ_b²)
        tau_c2 = prior.bias_var * cfg.bias_prior_scale
        row = np.zeros(p)
        row[0] = 1.0 / math.sqrt(tau_c2)
        rows.append(row)
        rhs.append(0.0)
        L = np.linalg.cholesky(np.linalg.inv(prior.w_cov * cfg.w_prior_scale))
        for a in range(r):
            row = np.zeros(p)
            row[1 : 1 + r] = L[:, a]
            rows.append(row)
            rhs.append(float(L[:, a] @ prior.w_mean))
        for q in range(s):
            row = np.zeros(p)
            row[1 + r + q] = 1.0 / math.sqrt(prior.b_var * cfg.b_prior_scale)
            rows.append(row)
            rhs.append(0.0)
        solution, *_ = np.linalg.lstsq(np.array(rows), np.array(rhs), rcond=None)
        return np.asarray(solution, dtype=np.float64)

    def residual(sol: FloatArray, support: list[int]) -> FloatArray:
        out = []
        for j in range(n):
            f = F[it[j]]
            pred = sol[0] + float(f @ U @ sol[1 : 1 + r])
            for q, c in enumerate(support):
                pred += f[c] * sol[1 + r + q]
            out.append(y[j] - pred)
        return np.array(out)

    support: list[int] = []
    sol = solve(support)
    k_eff = effective_sparsity(n, onboarder.k, cfg)
    if k_eff > 0:
        for _ in range(cfg.htp_iters):
            res = residual(sol, support)
            b = {c: sol[1 + r + q] for q, c in enumerate(support)}
            stats = []
            for c in range(d):
                col = [F[it[j], c] for j in range(n)]
                sq = sum(v * v for v in col)
                grad = sum(col[j] * res[j] for j in range(n))
                stat = (grad + b.get(c, 0.0) * sq) / (math.sqrt(sigma2) * math.sqrt(sq + 1e-300))
                stats.append((-abs(stat), c, abs(stat)))
            stats.sort()
            new_support = sorted(c for _, c, mag in stats[:k_eff] if mag > cfg.support_z)
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
