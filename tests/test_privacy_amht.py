"""DPAMHTLRS on synthetic samples (paper Eq. 1): noise-free it recovers U*; with noise it is seeded."""

from __future__ import annotations

import numpy as np
import pytest

from lrs_rec.privacy import ClipBounds
from lrs_rec.privacy_amht import DPAMHTLRS
from lrs_rec.synthetic import make_synthetic


def _data(k: int = 1):
    return make_synthetic(600, 12, 6, 2, k, None, noise=0.0, random_state=3)


def _subspace_error(U_true: np.ndarray, U: np.ndarray) -> float:
    return float(np.linalg.norm(U_true - U @ (U.T @ U_true)))


def test_noise_free_fit_recovers_the_subspace_and_noise_degrades_it():
    data = _data(k=0)  # low-rank only: from a random start AM converges in a few steps
    bounds = ClipBounds(A1=10.0, A2=20.0, A3=20.0, A_w=10.0, max_samples_per_user=12)
    clean = DPAMHTLRS(2, 0, n_iter=8, bounds=bounds, random_state=0).fit(data.X, data.y, data.users)
    assert _subspace_error(data.U, clean.model_.U) < 1e-4
    noisy = DPAMHTLRS(
        2,
        0,
        n_iter=8,
        bounds=bounds,
        noise_multiplier_A=0.5,
        noise_multiplier_V=0.5,
        random_state=0,
    ).fit(data.X, data.y, data.users)
    assert _subspace_error(data.U, noisy.model_.U) > 10 * _subspace_error(data.U, clean.model_.U)
    assert noisy.sensitivities_ == (12 * 10.0**2 * 10.0**2, 12 * 10.0 * 40.0 * 10.0)


def test_same_seed_same_model():
    data = _data()
    kw = {"n_iter": 2, "noise_multiplier_A": 2.0, "noise_multiplier_V": 2.0}
    a = DPAMHTLRS(2, 1, random_state=5, **kw).fit(data.X, data.y, data.users)
    b = DPAMHTLRS(2, 1, random_state=5, **kw).fit(data.X, data.y, data.users)
    c = DPAMHTLRS(2, 1, random_state=6, **kw).fit(data.X, data.y, data.users)
    np.testing.assert_array_equal(a.model_.U, b.model_.U)
    np.testing.assert_array_equal(a.model_.W, b.model_.W)
    assert not np.array_equal(a.model_.U, c.model_.U)


def test_bad_parameters_are_rejected():
    data = _data()
    with pytest.raises(ValueError, match="rank"):
        DPAMHTLRS(6, 1).fit(data.X, data.y, data.users)
    with pytest.raises(ValueError, match="n_iter"):
        DPAMHTLRS(2, 1, n_iter=0).fit(data.X, data.y, data.users)


def _per_user_and_statistics(est, X, y, users, n, U, bounds):
    from lrs_rec.amht import sparse_predict
    from lrs_rec.privacy import clipped_u_step_statistics

    k = int(est.sparsity)
    idx, val = np.tile(np.arange(k), (n, 1)), np.zeros((n, k))
    W, Bi, Bv = est._per_user(X, y, users, n, U, idx, val)
    pred = sparse_predict(X, users, Bi, Bv)
    A, V = clipped_u_step_statistics(X, y, pred, users, W, bounds)
    return W, Bi, Bv, A, V


def test_per_user_step_depends_on_the_users_own_data_only():
    """User-level DP: with the released U fixed, removing one user must leave every other user's
    (w_u, b_u) unchanged, so the clipped U-step statistics move by at most their sensitivities.
    Regression: the b-step's rescue chose users by a cross-user statistic (10x the median user's
    error), which moved other users' (w, b) and A by up to 1.31 Δ_A."""
    from lrs_rec.init import random_orthonormal
    from lrs_rec.privacy import u_step_sensitivities

    t, d, r, k, m = 9, 6, 2, 1, 4
    bounds = ClipBounds(A1=1.0, A2=1.0, A3=1.0, A_w=0.5, max_samples_per_user=m)
    dA, dV = u_step_sensitivities(bounds, one_hot=False)
    est = DPAMHTLRS(r, k)
    for seed in range(40, 70):
        rng = np.random.default_rng(seed)
        U = random_orthonormal(d, r, rng)
        users = np.repeat(np.arange(t), m)
        X = rng.standard_normal((t * m, d))
        theta = rng.standard_normal((t, r)) @ U.T
        theta[np.arange(t), rng.integers(0, d, t)] += 2 * rng.standard_normal(t)
        sig = np.exp(rng.uniform(np.log(1e-3), np.log(3), t))  # very unequal noise levels
        y = np.einsum("nd,nd->n", X, theta[users]) + sig[users] * rng.standard_normal(t * m)

        W, Bi, Bv, A, V = _per_user_and_statistics(est, X, y, users, t, U, bounds)
        keep = users != 0  # user 0 removed
        W2, Bi2, Bv2, A2, V2 = _per_user_and_statistics(
            est, X[keep], y[keep], users[keep] - 1, t - 1, U, bounds
        )
        np.testing.assert_array_equal(Bi[1:], Bi2, err_msg=f"seed {seed}")
        np.testing.assert_allclose(W[1:], W2, rtol=0, atol=1e-9, err_msg=f"seed {seed}")
        np.testing.assert_allclose(Bv[1:], Bv2, rtol=0, atol=1e-9, err_msg=f"seed {seed}")
        assert np.linalg.norm(A - A2) <= dA * (1 + 1e-9), seed
        assert np.linalg.norm(V - V2) <= dV * (1 + 1e-9), seed
