"""Baselines (paper Sec. 3) fit and predict; synthetic data generator properties."""

from __future__ import annotations

import numpy as np
import pytest

from lrs_rec import AMHTLRS, make_synthetic
from lrs_rec.baselines import FullFineTuning, PromptLearning, RepresentationLearning, SingleModel


def test_make_synthetic_structure() -> None:
    D = make_synthetic(50, 12, 30, 2, 4, 3, random_state=0)
    assert D.X.shape == (600, 30) and D.y.shape == (600,) and D.users.shape == (600,)
    np.testing.assert_allclose(D.U.T @ D.U, np.eye(2), atol=1e-12)
    assert np.all(np.count_nonzero(D.B, axis=1) <= 4)
    assert np.all(np.count_nonzero(D.B, axis=0) <= 3)  # rows of B* (coordinates) ζ-sparse
    assert D.n_sparse_users == np.count_nonzero(np.count_nonzero(D.B, axis=1) == 4)
    assert D.n_sparse_users >= (30 * 3) // 4 - 4
    np.testing.assert_allclose(D.theta, D.W @ D.U.T + D.B)
    np.testing.assert_allclose(D.y, np.einsum("nd,nd->n", D.X, D.theta[D.users]))
    np.testing.assert_allclose(D.truth().theta(), D.theta)
    E = make_synthetic(50, 12, 30, 2, 4, None, noise=0.5, random_state=0)
    assert np.all(np.count_nonzero(E.B, axis=1) == 4)
    assert np.std(E.y - np.einsum("nd,nd->n", E.X, E.theta[E.users])) > 0.3
    again = make_synthetic(50, 12, 30, 2, 4, 3, random_state=0)
    np.testing.assert_array_equal(again.X, D.X)
    with pytest.raises(ValueError, match="rank=30 must be < d=30"):
        make_synthetic(5, 3, 30, 30, 1, None)


@pytest.fixture(scope="module")
def data():  # type: ignore[no-untyped-def]
    D = make_synthetic(120, 40, 25, 1, 3, None, random_state=1)
    rng = np.random.default_rng(2)
    ut = np.repeat(np.arange(120), 5)
    Xt = rng.standard_normal((ut.size, 25))
    return D, Xt, ut, np.einsum("nd,nd->n", Xt, D.theta[ut])


@pytest.mark.parametrize(
    ("est", "params"),
    [
        (SingleModel(), 0),
        (FullFineTuning(ridge=1.0), 25),
        (RepresentationLearning(1, random_state=0), 1),
        (PromptLearning(3, random_state=0), 3),
        (AMHTLRS(rank=1, sparsity=3, random_state=0), 4),
    ],
    ids=lambda e: type(e).__name__ if not isinstance(e, int) else str(e),
)
def test_baselines_fit_predict(est, params: int, data) -> None:  # type: ignore[no-untyped-def]
    D, Xt, ut, yt = data
    single = np.sqrt(np.mean((SingleModel().fit(D.X, D.y, D.users).predict(Xt, ut) - yt) ** 2))
    assert est.fit(D.X, D.y, D.users) is est
    pred = est.predict(Xt, ut)
    assert pred.shape == yt.shape and np.all(np.isfinite(pred))
    assert est.n_params_per_user == params
    rmse = float(np.sqrt(np.mean((pred - yt) ** 2)))
    if isinstance(est, FullFineTuning | RepresentationLearning):
        assert rmse < single  # personalisation helps here (m=40 > d=25 for fine-tuning)
    if isinstance(est, AMHTLRS):
        assert rmse < 1e-6 * np.sqrt(np.mean(yt**2))


def test_full_fine_tuning_matches_per_user_ridge() -> None:
    D = make_synthetic(6, 9, 5, 1, 1, None, random_state=3)
    ft = FullFineTuning(ridge=0.7).fit(D.X, D.y, D.users)
    theta0 = np.linalg.lstsq(D.X, D.y, rcond=None)[0]
    for u in range(6):
        Xu, yu = D.X[D.users == u], D.y[D.users == u]
        delta = np.linalg.solve(Xu.T @ Xu + 0.7 * np.eye(5), Xu.T @ (yu - Xu @ theta0))
        np.testing.assert_allclose(ft.theta_[u], theta0 + delta, atol=1e-8)
