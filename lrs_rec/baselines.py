"""Baselines of the paper's Sec. 3, with the same ``fit(X, y, users)`` / ``predict(X, users)`` API.

* :class:`SingleModel` — one θ for all users (u_central), 0 fine-tunable parameters per user.
* :class:`FullFineTuning` — a separate θ_u per user (u_indv): per-user ridge around the single model,
  d parameters per user.
* :class:`RepresentationLearning` — low rank only, θ_u = U w_u (AMHT-LRS with k = 0), r per user.
* :class:`PromptLearning` — a shared θ on [x ‖ c_u] with a learned per-user embedding c_u ∈ R^p,
  p per user (in a linear model this is a per-user bias ⟨θ_c, c_u⟩).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from lrs_rec._types import FloatArray
from lrs_rec.amht import AMHTLRS
from lrs_rec.engine.user_rows import UserData, batched_ls
from lrs_rec.validation import check_fit_inputs, check_non_negative, check_users, check_X


def _ridge_lstsq(F: FloatArray, t: FloatArray, ridge: float) -> FloatArray:
    p = F.shape[1]
    G = F.T @ F
    reg = ridge + 1e-10 * max(float(np.trace(G)) / max(p, 1), 1e-30)
    return np.asarray(np.linalg.solve(G + reg * np.eye(p), F.T @ t), dtype=np.float64)


class _Base:
    n_users_: int
    d_: int

    def _check_predict(self, X: Any, users: Any) -> tuple[FloatArray, Any]:
        if not hasattr(self, "n_users_"):
            raise ValueError(f"this {type(self).__name__} is not fitted yet: call fit() first")
        Xa = check_X(X, d=self.d_)
        ua, _ = check_users(users, n=Xa.shape[0], n_users=self.n_users_, require_all=False)
        return Xa, ua


class SingleModel(_Base):
    """One shared linear model θ for every user (ridge least squares)."""

    n_params_per_user = 0

    def __init__(self, *, ridge: float = 0.0) -> None:
        self.ridge = ridge

    def fit(self, X: Any, y: Any, users: Any, n_users: int | None = None) -> SingleModel:
        Xa, ya, _, nu = check_fit_inputs(X, y, users, n_users)
        check_non_negative(ridge=self.ridge)
        self.theta_ = _ridge_lstsq(Xa, ya, self.ridge)
        self.n_users_, self.d_ = nu, Xa.shape[1]
        return self

    def predict(self, X: Any, users: Any) -> FloatArray:
        Xa, _ = self._check_predict(X, users)
        return np.asarray(Xa @ self.theta_, dtype=np.float64)


class FullFineTuning(_Base):
    """Per-user θ_u = θ₀ + δ_u: the single model fine-tuned per user with ridge ‖δ_u‖² (d per user)."""

    def __init__(self, *, ridge: float = 1.0) -> None:
        self.ridge = ridge

    @property
    def n_params_per_user(self) -> int:
        return int(getattr(self, "d_", 0))

    def fit(self, X: Any, y: Any, users: Any, n_users: int | None = None) -> FullFineTuning:
        Xa, ya, ua, nu = check_fit_inputs(X, y, users, n_users)
        check_non_negative(ridge=self.ridge)
        theta0 = _ridge_lstsq(Xa, ya, 0.0)
        data, _ = UserData.build(Xa, ya - Xa @ theta0, ua, nu)
        delta = batched_ls(data, data.X, data.y, np.full(Xa.shape[1], float(self.ridge)))
        self.theta_ = theta0[None, :] + delta
        self.n_users_, self.d_ = nu, Xa.shape[1]
        return self

    def predict(self, X: Any, users: Any) -> FloatArray:
        Xa, ua = self._check_predict(X, users)
        return np.asarray(np.einsum("nd,nd->n", Xa, self.theta_[ua]), dtype=np.float64)


class RepresentationLearning(_Base):
    """θ_u = U w_u only (Thekumparampil et al. 2021): alternating minimisation, AMHT-LRS with k = 0."""

    def __init__(
        self,
        rank: int,
        *,
        n_iter: int = 100,
        tol: float = 1e-10,
        ridge_w: float = 0.0,
        init: str = "moments",
        random_state: int | np.random.Generator | None = None,
    ) -> None:
        self.rank = rank
        self.n_iter = n_iter
        self.tol = tol
        self.ridge_w = ridge_w
        self.init = init
        self.random_state = random_state

    @property
    def n_params_per_user(self) -> int:
        return int(self.rank)

    def fit(self, X: Any, y: Any, users: Any, n_users: int | None = None) -> RepresentationLearning:
        est = AMHTLRS(
            self.rank,
            0,
            n_iter=self.n_iter,
            tol=self.tol,
            ridge_w=self.ridge_w,
            init=self.init,  # type: ignore[arg-type]
            random_state=self.random_state,
        ).fit(X, y, users, n_users)
        self.model_ = est.model_
        self.n_iter_ = est.n_iter_
        self.n_users_, self.d_ = est.model_.n_users, est.model_.d
        return self

    def predict(self, X: Any, users: Any) -> FloatArray:
        Xa, ua = self._check_predict(X, users)
        return self.model_.predict(Xa, ua)


class PromptLearning(_Base):
    """Prediction ⟨θ, [x ‖ c_u]⟩ with a shared θ ∈ R^{d+p} and a learned per-user c_u ∈ R^p.

    Alternating least squares: θ by ridge regression on the concatenated covariates, then each c_u in
    closed form (the rank-one problem ``min_c Σ_j (r_j − ⟨θ_c, c⟩)² + ridge‖c‖²``).
    """

    def __init__(
        self,
        embedding_dim: int = 1,
        *,
        n_iter: int = 50,
        tol: float = 1e-8,
        ridge: float = 1e-3,
        random_state: int | np.random.Generator | None = None,
    ) -> None:
        self.embedding_dim = embedding_dim
        self.n_iter = n_iter
        self.tol = tol
        self.ridge = ridge
        self.random_state = random_state

    @property
    def n_params_per_user(self) -> int:
        return int(self.embedding_dim)

    def fit(self, X: Any, y: Any, users: Any, n_users: int | None = None) -> PromptLearning:
        Xa, ya, ua, nu = check_fit_inputs(X, y, users, n_users)
        p = int(self.embedding_dim)
        if p < 1:
            raise ValueError(
                f"embedding_dim must be a positive integer, got {self.embedding_dim!r}"
            )
        check_non_negative(ridge=self.ridge, tol=self.tol)
        rng = np.random.default_rng(self.random_state)
        d = Xa.shape[1]
        C = rng.standard_normal((nu, p))
        counts = np.bincount(ua, minlength=nu).astype(np.float64)
        prev = np.inf
        self.n_iter_ = 0
        theta = np.zeros(d + p)
        for it in range(int(self.n_iter)):
            theta = _ridge_lstsq(np.hstack([Xa, C[ua]]), ya, float(self.ridge))
            tc = theta[d:]
            res_sum = np.bincount(ua, weights=ya - Xa @ theta[:d], minlength=nu)
            C = (res_sum / (counts * float(tc @ tc) + float(self.ridge) + 1e-300))[:, None] * tc
            loss = float(np.mean((ya - Xa @ theta[:d] - C[ua] @ tc) ** 2))
            self.n_iter_ = it + 1
            if prev - loss <= self.tol * max(prev, 1e-300):
                break
            prev = loss
        self.theta_, self.C_ = theta, C
        self.n_users_, self.d_ = nu, d
        return self

    def predict(self, X: Any, users: Any) -> FloatArray:
        Xa, ua = self._check_predict(X, users)
        return np.asarray(Xa @ self.theta_[: self.d_] + self.C_[ua] @ self.theta_[self.d_ :])
