"""DP-AMHT-LRS on (X, y, users) samples (paper Sec. 2.2): Algorithm 1 with the U-step replaced by the
noisy Eq. 7–8 of :mod:`lrs_rec.privacy`, in the billboard model.

Per-user steps (Eq. 3–4) reuse :func:`lrs_rec.amht.w_step` / :func:`lrs_rec.amht.b_step`: they read only
the released U and the user's own samples, so they need no noise. The initial U is random (a
data-independent start; the method-of-moments start would itself have to be privatised). The noise
multipliers z_A, z_V are given (calibrate them with ``training.private_accounting``): the fit releases
``n_iter`` times (Ã, Ṽ), i.e. ``n_iter`` Gaussian events with multiplier z_A on A (sensitivity Δ_A) and
``n_iter`` with z_V on V (Δ_V), under add/remove-one-user.
"""

from __future__ import annotations

import numpy as np

from lrs_rec._types import FloatArray, IntArray
from lrs_rec.amht import b_step, sparse_predict, w_step
from lrs_rec.init import random_orthonormal
from lrs_rec.model import LRSModel
from lrs_rec.privacy import (
    ClipBounds,
    cap_samples_per_user,
    clipped_u_step_statistics,
    dp_u_step,
    u_step_sensitivities,
)
from lrs_rec.validation import check_fit_inputs


class DPAMHTLRS:
    """Differentially private AMHT-LRS (scikit-learn conventions: ``fit`` returns self; learned
    attributes ``model_``, ``sensitivities_``, ``ridge_u_`` end in ``_``).

    ``noise_multiplier_A`` / ``noise_multiplier_V`` = noise std / L2 sensitivity of each release of
    A / V (0 = no noise, the non-private reference with the same clipping). ``ridge_u`` is added to the
    U-step solve, plus ``noise_ridge``·σ_A·√(dr) so the noisy system stays well conditioned.
    """

    def __init__(
        self,
        rank: int,
        sparsity: int,
        *,
        n_iter: int = 5,
        bounds: ClipBounds | None = None,
        noise_multiplier_A: float = 0.0,
        noise_multiplier_V: float = 0.0,
        ridge_u: float = 1e-6,
        noise_ridge: float = 1.0,
        ridge_w: float = 1e-6,
        ridge_b: float = 1e-6,
        random_state: int | np.random.Generator | None = None,
    ) -> None:
        self.rank = rank
        self.sparsity = sparsity
        self.n_iter = n_iter
        self.bounds = bounds
        self.noise_multiplier_A = noise_multiplier_A
        self.noise_multiplier_V = noise_multiplier_V
        self.ridge_u = ridge_u
        self.noise_ridge = noise_ridge
        self.ridge_w = ridge_w
        self.ridge_b = ridge_b
        self.random_state = random_state

    def fit(
        self, X: FloatArray, y: FloatArray, users: IntArray, n_users: int | None = None
    ) -> DPAMHTLRS:
        Xa, ya, ua, nu = check_fit_inputs(X, y, users, n_users)
        d, r, k = Xa.shape[1], int(self.rank), int(self.sparsity)
        if not 1 <= r < d or not 0 <= k <= d:
            raise ValueError(f"need 1 <= rank < d={d} and 0 <= sparsity <= d, got {r}, {k}")
        if int(self.n_iter) < 1:
            raise ValueError(f"n_iter must be >= 1, got {self.n_iter!r}")
        bounds = self.bounds or ClipBounds()
        rng = np.random.default_rng(self.random_state)
        dA, dV = u_step_sensitivities(bounds, one_hot=False)
        sigma_A = float(self.noise_multiplier_A) * dA
        ridge_u = float(self.ridge_u) + float(self.noise_ridge) * sigma_A * float(np.sqrt(d * r))
        U = random_orthonormal(d, r, rng)
        B_idx = np.tile(np.arange(k, dtype=np.int64), (nu, 1))
        B_val = np.zeros((nu, k))
        keep = cap_samples_per_user(ua, bounds.max_samples_per_user, rng)
        Xk, yk, uk = Xa[keep], ya[keep], ua[keep]
        for _ in range(int(self.n_iter)):
            W, B_idx, B_val = self._per_user(Xa, ya, ua, nu, U, B_idx, B_val)
            xb = sparse_predict(Xk, uk, B_idx, B_val)
            A, V = clipped_u_step_statistics(Xk, yk, xb, uk, W, bounds)
            U = dp_u_step(
                A,
                V,
                sensitivity_A=dA,
                sensitivity_V=dV,
                noise_multiplier_A=float(self.noise_multiplier_A),
                noise_multiplier_V=float(self.noise_multiplier_V),
                ridge=ridge_u,
                rng=rng,
            )
        W, B_idx, B_val = self._per_user(Xa, ya, ua, nu, U, B_idx, B_val)
        self.model_ = LRSModel(U=U, W=W, B_idx=B_idx, B_val=B_val)
        self.sensitivities_ = (dA, dV)
        self.ridge_u_ = ridge_u
        return self

    def _per_user(
        self,
        X: FloatArray,
        y: FloatArray,
        users: IntArray,
        n_users: int,
        U: FloatArray,
        B_idx: IntArray,
        B_val: FloatArray,
    ) -> tuple[FloatArray, IntArray, FloatArray]:
        """Eq. 4 then Eq. 3 (HTP) for every user, from the public U and the user's own samples."""
        W = w_step(X, y, users, U, B_idx, B_val, ridge=float(self.ridge_w), n_users=n_users)
        if int(self.sparsity) == 0:
            return W, B_idx, B_val
        # local=True: the rescues must not pick users by a cross-user statistic, or one user's data
        # would move other users' (w, b) and so their U-step terms (sensitivity, docs/privacy.md)
        return b_step(
            X, y, users, U, W, B_idx, B_val, method="htp",
            ridge_w=float(self.ridge_w), ridge_b=float(self.ridge_b), n_users=n_users, local=True,
        )  # fmt: skip
