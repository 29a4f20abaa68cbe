"""Bad input raises ValueError naming the problem."""

from __future__ import annotations

import numpy as np
import pytest

from lrs_rec import AMHTLRS
from lrs_rec.baselines import FullFineTuning, PromptLearning, RepresentationLearning, SingleModel


def _data(n_users: int = 4, m: int = 6, d: int = 5) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    users = np.repeat(np.arange(n_users), m)
    return rng.standard_normal((users.size, d)), rng.standard_normal(users.size), users


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (
            lambda X, y, u: (np.where(np.arange(X.size).reshape(X.shape) == 7, np.nan, X), y, u),
            "X contains NaN or inf",
        ),
        (
            lambda X, y, u: (X, np.where(np.arange(y.size) == 3, np.inf, y), u),
            "y contains NaN or inf",
        ),
        (lambda X, y, u: (X, y[:-1], u), "mismatched lengths"),
        (lambda X, y, u: (X, y, u[:-2]), "mismatched lengths"),
        (lambda X, y, u: (X, y, np.where(u == 1, -1, u)), "negative ids"),
        (lambda X, y, u: (X, y, np.where(u == 2, 3, u)), "users without samples: ids 2"),
        (lambda X, y, u: (X[:, 0], y, u), "2-D"),
        (lambda X, y, u: (X, y, u + 0.5), "integer ids"),
    ],
)
def test_bad_fit_inputs(mutate, match: str) -> None:  # type: ignore[no-untyped-def]
    X, y, u = mutate(*_data())
    with pytest.raises(ValueError, match=match):
        AMHTLRS(rank=1, sparsity=1).fit(X, y, u)


def test_bad_hyper_parameters() -> None:
    X, y, u = _data()
    with pytest.raises(ValueError, match=r"rank=5 must be < d=5"):
        AMHTLRS(rank=5, sparsity=1).fit(X, y, u)
    with pytest.raises(ValueError, match=r"sparsity=6 must be <= d=5"):
        AMHTLRS(rank=1, sparsity=6).fit(X, y, u)
    with pytest.raises(ValueError, match="rank must be a positive integer"):
        AMHTLRS(rank=0, sparsity=1).fit(X, y, u)
    with pytest.raises(ValueError, match="ridge_w must be a finite non-negative"):
        AMHTLRS(rank=1, sparsity=1, ridge_w=-1.0).fit(X, y, u)
    with pytest.raises(ValueError, match="b_step must be"):
        AMHTLRS(rank=1, sparsity=1, b_step="nope").fit(X, y, u)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="init array must have shape"):
        AMHTLRS(rank=2, sparsity=1, init=np.eye(5)[:, :1]).fit(X, y, u)
    with pytest.raises(ValueError, match="n_users=3"):
        AMHTLRS(rank=1, sparsity=1).fit(X, y, u, n_users=3)
    with pytest.raises(ValueError, match="users without samples: ids 4"):
        AMHTLRS(rank=1, sparsity=1).fit(X, y, u, n_users=6)


def test_predict_checks() -> None:
    X, y, u = _data()
    with pytest.raises(ValueError, match="not fitted"):
        AMHTLRS(rank=1, sparsity=1).predict(X, u)
    est = AMHTLRS(rank=1, sparsity=1, n_iter=3).fit(X, y, u)
    with pytest.raises(ValueError, match="5 columns"):
        est.predict(X[:, :4], u)
    with pytest.raises(ValueError, match="ids >= n_users=4"):
        est.predict(X, u + 1)
    with pytest.raises(ValueError, match="not fitted"):
        SingleModel().predict(X, u)


@pytest.mark.parametrize(
    "est",
    [SingleModel(), FullFineTuning(), RepresentationLearning(1), PromptLearning(2)],
    ids=lambda e: type(e).__name__,
)
def test_baselines_reject_bad_input(est) -> None:  # type: ignore[no-untyped-def]
    X, y, u = _data()
    X[0, 0] = np.nan
    with pytest.raises(ValueError, match="X contains NaN"):
        est.fit(X, y, u)
