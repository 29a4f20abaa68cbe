"""The onboarding prior of a Dask-trained model, from the partitions' sums.

:func:`lrs_rec.onboarding.estimate_prior` reads every user's parameters and history; every
quantity it takes is a mean or a covariance over users or ratings, so each partition returns its
sums (:class:`PriorSums`, of size O(p² + r²), never per user) and the driver finishes the same
formulas (:func:`combine`). ``tests/test_training_dask.py`` compares the result with
``estimate_prior`` on the local engine's model (its slow, obvious twin).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lrs_rec.model import LRSModel
from lrs_rec.onboarding import (
    OnboardingPrior,
    _first_ratings,
    _sym,
    item_descriptors,
    residual_noise_var,
    within_and_between,
)

BLOCK_RATINGS = 1 << 17  # ratings per block of the residual pass (memory O(block × d))
EPISODE_SIZE = 20  # estimate_prior's default: a new user's first ratings


@dataclass(frozen=True)
class PriorSums:
    """A partition's share of the prior's statistics (T = [c_u, w_u] rows, m_u mean descriptors)."""

    n: int  # users
    sum_t: np.ndarray  # Σ T
    sum_tt: np.ndarray  # Σ T Tᵀ
    b_sq: float  # Σ b² over the non-zero b values
    b_n: int
    sse: float  # training residuals (all stored ratings)
    n_ratings: int
    all_rated: bool  # every user has a rating
    n_imp: int  # ratings in the implicit moments (the first EPISODE_SIZE per user with times)
    s_dev: np.ndarray  # Σ (g_i - m_u)(g_i - m_u)ᵀ
    sum_m: np.ndarray
    sum_mm: np.ndarray
    sum_inv_counts: float
    sum_tm: np.ndarray  # Σ T m_uᵀ


def add_sums(a: PriorSums | None, b: PriorSums) -> PriorSums:
    """Two partitions' (or shards') sums together."""
    if a is None:
        return b
    return PriorSums(
        a.n + b.n,
        a.sum_t + b.sum_t,
        a.sum_tt + b.sum_tt,
        a.b_sq + b.b_sq,
        a.b_n + b.b_n,
        a.sse + b.sse,
        a.n_ratings + b.n_ratings,
        a.all_rated and b.all_rated,
        a.n_imp + b.n_imp,
        a.s_dev + b.s_dev,
        a.sum_m + b.sum_m,
        a.sum_mm + b.sum_mm,
        a.sum_inv_counts + b.sum_inv_counts,
        a.sum_tm + b.sum_tm,
    )


def item_counts(items: np.ndarray, n_items: int) -> np.ndarray:
    return np.bincount(items, minlength=n_items).astype(np.float64)


def prior_sums(
    lrs: LRSModel,
    user_bias: np.ndarray,
    global_mean: float,
    item_bias: np.ndarray,
    item_features: np.ndarray,
    users: np.ndarray,
    items: np.ndarray,
    ratings: np.ndarray,
    times: np.ndarray | None,
    desc: np.ndarray,
) -> PriorSums:
    """The sums of one partition: ``users`` are local indices 0..n-1 sorted (CSR order), the
    model in the ratings' own units (as stored); ``desc`` the item descriptors (p = 0: none)."""
    n = lrs.n_users
    T = np.column_stack([user_bias, lrs.W])
    nz = lrs.B_val[lrs.B_val != 0.0]
    counts = np.bincount(users, minlength=n)
    indptr = np.zeros(n + 1, np.int64)
    np.cumsum(counts, out=indptr[1:])
    sse = 0.0
    a = 0
    while a < n:  # user blocks of about BLOCK_RATINGS ratings
        b = int(np.searchsorted(indptr, indptr[a] + BLOCK_RATINGS, side="right")) - 1
        b = min(max(b, a + 1), n)
        lo, hi = int(indptr[a]), int(indptr[b])
        theta = lrs.theta_rows(np.arange(a, b))
        it, us = items[lo:hi], users[lo:hi] - a
        pred = (
            global_mean
            + user_bias[a:b][us]
            + item_bias[it]
            + np.einsum("nd,nd->n", item_features[it], theta[us])
        )
        sse += float(np.sum((ratings[lo:hi] - pred) ** 2))
        a = b
    p = desc.shape[1]
    q = T.shape[1]
    zeros = (0, np.zeros((p, p)), np.zeros(p), np.zeros((p, p)), 0.0, np.zeros((q, p)))
    n_imp, s_dev, sum_m, sum_mm, inv, sum_tm = zeros
    if p:
        it, us, cnt = items, users, counts
        if times is not None:
            it, us, cnt = _first_ratings(items, users, counts, times, EPISODE_SIZE)
        M = np.zeros((n, p))
        blocks = [(s, min(s + BLOCK_RATINGS, us.size)) for s in range(0, us.size, BLOCK_RATINGS)]
        for s, e in blocks:
            np.add.at(M, us[s:e], desc[it[s:e]])
        M /= cnt[:, None]
        for s, e in blocks:
            dev = desc[it[s:e]] - M[us[s:e]]
            s_dev = s_dev + dev.T @ dev
        n_imp, sum_m, sum_mm = int(us.size), M.sum(axis=0), M.T @ M
        inv, sum_tm = float(np.sum(1.0 / cnt)), T.T @ M
    return PriorSums(
        n,
        T.sum(axis=0),
        T.T @ T,
        float(np.sum(nz**2)),
        int(nz.size),
        sse,
        int(users.size),
        bool(np.all(counts > 0)),
        n_imp,
        s_dev,
        sum_m,
        sum_mm,
        inv,
        sum_tm,
    )


def wants_implicit(n_users: int, all_rated: bool) -> bool:
    """estimate_prior's condition for the item-set conditioning (implicit=True)."""
    return n_users > 2 and all_rated


def descriptors(F: np.ndarray, item_bias: np.ndarray, counts: np.ndarray) -> np.ndarray:
    return np.asarray(item_descriptors(F, item_bias, counts))


def combine(
    parts: list[PriorSums],
    *,
    w_prior_mean: np.ndarray,
    w_prior_cov: np.ndarray,
    rank: int,
    sparsity: int,
    desc: np.ndarray,
) -> OnboardingPrior:
    """estimate_prior's formulas on the summed statistics."""

    def total(name: str) -> np.ndarray:
        return np.asarray(np.sum([getattr(s, name) for s in parts], axis=0), dtype=np.float64)

    n = sum(s.n for s in parts)
    sum_t, sum_tt = total("sum_t"), total("sum_tt")
    t_bar = sum_t / max(n, 1)
    t_mean = np.concatenate([[float(t_bar[0]) if n else 0.0], w_prior_mean])
    if n > 1:
        t_cov = np.atleast_2d((sum_tt - n * np.outer(t_bar, t_bar)) / (n - 1))
    else:
        t_cov = np.eye(1 + rank)
    t_cov[1:, 1:] = np.asarray(w_prior_cov, dtype=np.float64)
    t_cov[0, 0] = max(float(t_cov[0, 0]), 1e-6)
    evals, evecs = np.linalg.eigh(_sym(t_cov))
    floor = 1e-6 * max(float(evals.max()), 1e-6)
    t_cov = (evecs * np.maximum(evals, floor)) @ evecs.T
    b_n = sum(s.b_n for s in parts)
    b_var = max(sum(s.b_sq for s in parts) / b_n if b_n else 0.0, 1e-6)
    N = sum(s.n_ratings for s in parts)
    noise_var = 1e-6
    if N:
        sse = sum(s.sse for s in parts)
        noise_var = residual_noise_var(sse, N, n * (1 + rank + sparsity))
    p = desc.shape[1]
    q = 1 + rank
    if p == 0:
        m_mean, C_mm, S, C_tm = np.zeros(0), np.zeros((0, 0)), np.zeros((0, 0)), np.zeros((q, 0))
    else:
        n_imp = sum(s.n_imp for s in parts)
        m_mean = total("sum_m") / n
        cov_m = (total("sum_mm") - n * np.outer(m_mean, m_mean)) / (n - 1)
        inv = float(sum(s.sum_inv_counts for s in parts) / n)
        S, C_mm = within_and_between(total("s_dev"), max(n_imp - n, 1), cov_m, inv)
        C_tm = (total("sum_tm") - n * np.outer(t_bar, m_mean)) / (n - 1)
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
