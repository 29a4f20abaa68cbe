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
