"""Hard thresholding (both forms), row sparsity and the moments matrix against slow twins."""

from __future__ import annotations

import numpy as np
import pytest

from lrs_rec.amht import gather_rows
from lrs_rec.amht_reference import (
    enforce_row_sparsity_reference,
    moments_matrix_reference,
    pairwise_moments_matrix_reference,
)
from lrs_rec.init import moments_init, moments_matrix, pairwise_moments_matrix, random_orthonormal
from lrs_rec.thresholding import (
    enforce_row_sparsity,
    hard_threshold,
    hard_threshold_reference,
    ridge_top_k_refit,
    ridge_top_k_refit_reference,
    top_k_indices,
)


@pytest.mark.parametrize("seed", range(5))
def test_hard_threshold_matches_reference(seed: int) -> None:
    rng = np.random.default_rng(seed)
    V = rng.standard_normal((7, 20))
    V[:, 3] = V[:, 5]  # ties
    V[0, :4] = 0.0
    for k in (0, 1, 4, 20):
        fast = hard_threshold(V, k=k)
        for i in range(V.shape[0]):
            np.testing.assert_array_equal(fast[i], hard_threshold_reference(V[i], k=k))
            assert np.count_nonzero(fast[i]) <= k
    for delta in (0.0, 0.5, 1.3):
        fast = hard_threshold(V, delta=delta)
        for i in range(V.shape[0]):
            np.testing.assert_array_equal(fast[i], hard_threshold_reference(V[i], delta=delta))
        assert np.all(np.abs(fast[fast != 0]) > delta)


def test_hard_threshold_forms_and_errors() -> None:
    v = np.array([0.1, -3.0, 2.0, -2.0, 0.0])
    np.testing.assert_array_equal(hard_threshold(v, k=2), [0, -3.0, 2.0, 0, 0])  # tie → lower index
    np.testing.assert_array_equal(hard_threshold(v, delta=1.0), [0, -3.0, 2.0, -2.0, 0])
    np.testing.assert_array_equal(top_k_indices(v[None, :], 3), [[1, 2, 3]])
    with pytest.raises(ValueError, match="exactly one"):
        hard_threshold(v)
    bad: list[dict[str, object]] = [{"k": 6}, {"k": -1}, {"k": 2.0}, {"delta": float("nan")}]
    for kw in bad:  # the fast path and its twin refuse the same inputs
        for f in (hard_threshold, hard_threshold_reference):
            with pytest.raises(ValueError, match=r"k must be an integer in|delta must be"):
                f(v, **kw)  # type: ignore[arg-type]
    for f in (hard_threshold, hard_threshold_reference):
        with pytest.raises(ValueError, match="NaN"):
            f(np.array([1.0, np.nan, 3.0]), k=2)  # NaN was silently dropped by the fast path


def test_enforce_row_sparsity_matches_reference() -> None:
    rng = np.random.default_rng(1)
    d, n_users, k = 8, 30, 3
    idx = np.sort(np.stack([rng.choice(d, k, replace=False) for _ in range(n_users)]), axis=1)
    val = rng.standard_normal((n_users, k))
    val[rng.random((n_users, k)) < 0.2] = 0.0
    for zeta in (1, 2, 5):
        fast = enforce_row_sparsity(idx, val, zeta=zeta, d=d)
        np.testing.assert_array_equal(
            fast, enforce_row_sparsity_reference(idx, val, zeta=zeta, d=d)
        )
        assert np.bincount(idx[fast != 0], minlength=d).max() <= zeta


def test_gather_rows_is_take_along_axis() -> None:
    rng = np.random.default_rng(2)
    M = rng.standard_normal((9, 6))
    idx = rng.integers(0, 6, size=(9, 4))
    np.testing.assert_array_equal(gather_rows(M, idx), np.take_along_axis(M, idx, axis=1))


def test_moments_matrix_matches_reference_and_finds_subspace() -> None:
    rng = np.random.default_rng(3)
    users = rng.integers(0, 6, size=50)
    users[:6] = np.arange(6)
    X = rng.standard_normal((50, 5))
    y = rng.standard_normal(50)
    np.testing.assert_allclose(
        moments_matrix(X, y, users, 6), moments_matrix_reference(X, y, users, 6), atol=1e-12
    )
    users[6] = 6  # a user with a single sample is left out of the pairwise form
    np.testing.assert_allclose(
        pairwise_moments_matrix(X, y, users, 7),
        pairwise_moments_matrix_reference(X, y, users, 7),
        atol=1e-12,
    )
    # population check: θ_u = u* w_u → M's top eigenvector is u*
    d, t, m = 20, 400, 50
    u_star = random_orthonormal(d, 1, rng)
    w = rng.standard_normal(t)
    users = np.repeat(np.arange(t), m)
    X = rng.standard_normal((t * m, d))
    y = X @ u_star[:, 0] * w[users]
    for pairwise in (True, False):
        U0 = moments_init(X, y, users, t, 1, pairwise=pairwise)
        assert abs(float(U0[:, 0] @ u_star[:, 0])) > 0.95


def test_pairwise_moments_twin_falls_back_when_no_user_has_two_samples() -> None:
    """Every user with one sample: the pairwise form has no pairs, the fast version falls back to
    the y² moments matrix; the reference twin divided by zero users (NaN) instead."""
    rng = np.random.default_rng(0)
    users = np.arange(5)
    X, y = rng.standard_normal((5, 4)), rng.standard_normal(5)
    ref = pairwise_moments_matrix_reference(X, y, users, 5)
    assert np.all(np.isfinite(ref))
    np.testing.assert_allclose(pairwise_moments_matrix(X, y, users, 5), ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("k", [0, 1, 3, 6])
def test_ridge_top_k_refit_matches_the_per_user_reference(k: int) -> None:
    rng = np.random.default_rng(k)
    X = rng.standard_normal((5, 9, 6))
    G = np.einsum("uja,ujb->uab", X, X)
    h = rng.standard_normal((5, 6))
    idx, val = ridge_top_k_refit(G, h, k, 0.3)
    ref_idx, ref_val = ridge_top_k_refit_reference(G, h, k, 0.3)
    np.testing.assert_array_equal(idx, ref_idx)
    np.testing.assert_allclose(val, ref_val, rtol=1e-10, atol=1e-12)
    if k == 6:  # the whole support: the refit is the ridge solution itself
        full = np.linalg.solve(G + 0.3 * np.eye(6)[None], h[:, :, None])[:, :, 0]
        np.testing.assert_allclose(val, full, rtol=1e-10)
