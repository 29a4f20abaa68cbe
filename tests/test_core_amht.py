"""AMHT-LRS: exact recovery, fast == per-user reference, step functions, determinism."""

from __future__ import annotations

import numpy as np
import pytest

from lrs_rec import AMHTLRS, LRSModel, make_synthetic
from lrs_rec.amht import (
    b_step,
    orthonormalize,
    solve_u_step,
    u_least_squares,
    u_step_cg,
    u_step_statistics,
    w_step,
)
from lrs_rec.amht_reference import fit_reference
from lrs_rec.init import moments_init
from lrs_rec.synthetic import relative_error


def _shuffled(seed: int, n_users: int, m: int, d: int, r: int, k: int, zeta: int | None = None):
    D = make_synthetic(n_users, m, d, r, k, zeta, random_state=seed)
    perm = np.random.default_rng(seed + 100).permutation(D.y.shape[0])
    return D, D.X[perm], D.y[perm], D.users[perm]


def test_exact_recovery_paper_setting() -> None:
    """Sec. 3 setting: d=150, m=100, k=10, ζ=5, r=1, 500 users, noiseless → rel. error ≤ 1e-6."""
    D = make_synthetic(500, 100, 150, 1, 10, 5, random_state=0)
    est = AMHTLRS(rank=1, sparsity=10, random_state=0).fit(D.X, D.y, D.users)
    assert relative_error(est.model_.theta(), D.theta) <= 1e-6
    assert est.n_iter_ == len(est.history_) < est.n_iter


def test_exact_recovery_rank3_all_users_sparse() -> None:
    D, X, y, users = _shuffled(1, 200, 60, 40, 3, 4)
    est = AMHTLRS(rank=3, sparsity=4, random_state=0).fit(X, y, users)
    assert relative_error(est.model_.theta(), D.theta) <= 1e-6
    # the subspace itself is recovered
    assert np.linalg.norm(D.U - est.model_.U @ (est.model_.U.T @ D.U)) <= 1e-6


@pytest.mark.parametrize(
    ("r", "method", "u_step", "zeta", "ridge"),
    [
        (1, "htp", "joint", None, 0.0),
        (2, "htp", "joint", 3, 0.1),
        (1, "iht", "eq5", None, 0.0),
        (2, "htp", "eq5", None, 0.5),
        (2, "iht", "eq5", 4, 0.2),
    ],
)
def test_fast_equals_reference(
    r: int, method: str, u_step: str, zeta: int | None, ridge: float
) -> None:
    _, X, y, users = _shuffled(3, 30, 18, 12, r, 2)
    U0 = moments_init(X, y, users, 30, r)
    kw = dict(
        n_iter=12,
        b_step=method,
        u_step=u_step,
        zeta=zeta,
        ridge_w=ridge,
        ridge_b=ridge,
        ridge_u=ridge,
    )
    fast = AMHTLRS(rank=r, sparsity=2, u_solver="direct", **kw).fit(X, y, users)  # type: ignore[arg-type]
    ref, hist = fit_reference(X, y, users, 30, U0, 2, **kw)  # type: ignore[arg-type]
    np.testing.assert_allclose(fast.model_.theta(), ref.theta(), rtol=0, atol=1e-9)
    np.testing.assert_allclose(fast.history_, hist, rtol=1e-7, atol=1e-12)


def test_fast_equals_reference_uneven_counts_with_ridge() -> None:
    """Very uneven sample counts (1..40 per user, some below r + k) with ridge, plus noise."""
    rng = np.random.default_rng(7)
    n_users, d = 25, 10
    counts = rng.integers(1, 41, size=n_users)
    users = np.repeat(np.arange(n_users), counts)
    rng.shuffle(users)
    X = rng.standard_normal((users.size, d))
    y = X @ rng.standard_normal(d) + 0.3 * rng.standard_normal(users.size)
    U0 = moments_init(X, y, users, n_users, 2)
    kw = dict(n_iter=8, ridge_w=0.5, ridge_b=0.5, ridge_u=0.1)
    fast = AMHTLRS(rank=2, sparsity=3, u_solver="direct", **kw).fit(X, y, users)  # type: ignore[arg-type]
    ref, hist = fit_reference(X, y, users, n_users, U0, 3, **kw)  # type: ignore[arg-type]
    assert np.all(np.isfinite(fast.model_.theta()))
    np.testing.assert_allclose(fast.model_.theta(), ref.theta(), rtol=0, atol=1e-8)
    np.testing.assert_allclose(fast.history_, hist, rtol=1e-7)
    # CG solver gives the same fit
    cg = AMHTLRS(rank=2, sparsity=3, u_solver="cg", **kw).fit(X, y, users)  # type: ignore[arg-type]
    np.testing.assert_allclose(cg.model_.theta(), fast.model_.theta(), rtol=0, atol=1e-6)


def test_u_step_statistics_match_kronecker_sum_and_cg() -> None:
    rng = np.random.default_rng(0)
    n_users, d, r, k = 8, 6, 2, 2
    users = np.repeat(np.arange(n_users), 9)
    X = rng.standard_normal((users.size, d))
    y = rng.standard_normal(users.size)
    W = rng.standard_normal((n_users, r))
    B_idx = np.sort(np.stack([rng.choice(d, k, replace=False) for _ in range(n_users)]), axis=1)
    B_val = rng.standard_normal((n_users, k))
    A, V = u_step_statistics(X, y, users, W, B_idx, B_val)
    A_ref = np.zeros((d * r, d * r))
    V_ref = np.zeros((d, r))
    for j in range(users.size):
        u = users[j]
        b = np.zeros(d)
        b[B_idx[u]] = B_val[u]
        A_ref += np.kron(np.outer(W[u], W[u]), np.outer(X[j], X[j]))
        V_ref += np.outer(X[j] * (y[j] - X[j] @ b), W[u])
    np.testing.assert_allclose(A, A_ref, atol=1e-10)
    np.testing.assert_allclose(V, V_ref, atol=1e-10)
    U_direct = u_least_squares(A, V, ridge=0.3)
    U_cg, iters = u_step_cg(X, y, users, W, B_idx, B_val, ridge=0.3)
    np.testing.assert_allclose(U_cg, U_direct, atol=1e-8)
    assert 0 < iters <= d * r
    Q = solve_u_step(A, V, ridge=0.3)
    np.testing.assert_allclose(Q.T @ Q, np.eye(r), atol=1e-12)
    Q2, R = orthonormalize(U_direct)
    np.testing.assert_allclose(Q2 @ R, U_direct, atol=1e-12)
    assert np.all(np.diag(R) >= 0)


def test_public_step_functions_recover_with_true_u() -> None:
    """With U* known, one HTP b-step then the w-step (Eq. 4) recover every user exactly."""
    D = make_synthetic(40, 40, 30, 2, 3, None, random_state=4)
    k = 3
    B_idx = np.tile(np.arange(k), (40, 1))
    B_val = np.zeros((40, k))
    W0 = w_step(D.X, D.y, D.users, D.U, B_idx, B_val)
    W, B_idx, B_val = b_step(D.X, D.y, D.users, D.U, W0, B_idx, B_val, method="htp", n_inner=3)
    W = w_step(D.X, D.y, D.users, D.U, B_idx, B_val)
    model = LRSModel(U=D.U, W=W, B_idx=B_idx, B_val=B_val)
    assert relative_error(model.theta(), D.theta) <= 1e-8
    _, idx_iht, val_iht = b_step(
        D.X,
        D.y,
        D.users,
        D.U,
        W0,
        np.tile(np.arange(k), (40, 1)),
        np.zeros((40, k)),
        method="iht",
        n_inner=30,
    )
    assert idx_iht.shape == (40, k) and np.all(np.isfinite(val_iht))


def test_same_seed_same_result_and_callback() -> None:
    _, X, y, users = _shuffled(5, 60, 30, 20, 2, 3)
    seen: list[tuple[int, float]] = []

    def cb(it: int, model: LRSModel) -> None:
        seen.append((it, float(np.mean((model.predict(X, users) - y) ** 2))))

    a = AMHTLRS(rank=2, sparsity=3, init="random", random_state=11, callback=cb).fit(X, y, users)
    b = AMHTLRS(rank=2, sparsity=3, init="random", random_state=11).fit(X, y, users)
    np.testing.assert_array_equal(a.model_.theta(), b.model_.theta())
    assert a.history_ == b.history_
    assert [it for it, _ in seen] == list(range(a.n_iter_))
    np.testing.assert_allclose([loss for _, loss in seen], a.history_, rtol=1e-9, atol=1e-20)
    np.testing.assert_allclose(a.predict(X, users), a.model_.predict(X, users))


def test_sample_splitting_and_explicit_init_and_zeta() -> None:
    D, X, y, users = _shuffled(6, 150, 80, 30, 1, 3)
    est = AMHTLRS(rank=1, sparsity=3, sample_splitting=2, random_state=0).fit(X, y, users)
    assert relative_error(est.model_.theta(), D.theta) <= 1e-6
    est = AMHTLRS(rank=1, sparsity=3, init=D.U + 0.05, n_iter=60).fit(X, y, users)
    assert relative_error(est.model_.theta(), D.theta) <= 1e-6
    Dz = make_synthetic(100, 60, 30, 1, 3, 4, random_state=2)
    est = AMHTLRS(rank=1, sparsity=3, zeta=4, random_state=0).fit(Dz.X, Dz.y, Dz.users)
    assert relative_error(est.model_.theta(), Dz.theta) <= 1e-6
    per_coord = np.bincount(est.model_.B_idx[est.model_.B_val != 0], minlength=30)
    assert per_coord.max() <= 4


def test_noisy_fit_is_close_and_ridge_keeps_it_finite() -> None:
    D = make_synthetic(200, 50, 30, 1, 3, None, noise=0.1, random_state=8)
    est = AMHTLRS(rank=1, sparsity=3, ridge_w=1e-3, ridge_b=1e-3, random_state=0).fit(
        D.X, D.y, D.users
    )
    assert relative_error(est.model_.theta(), D.theta) < 0.1
    assert est.history_[-1] < 0.1**2


@pytest.mark.parametrize("seed", [2, 3, 6])
def test_fast_equals_reference_with_irls_rescue(seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Underdetermined users (m=16 < r+d=31): the IRLS rescue path runs and matches the twin."""
    import lrs_rec.engine.sparse_b as sparse_b

    calls: list[int] = []
    original = sparse_b._irls_supports

    def spy(data, Z, k, flag, *schedule):  # type: ignore[no-untyped-def]
        calls.append(int(flag.sum()))
        return original(data, Z, k, flag, *schedule)

    monkeypatch.setattr(sparse_b, "_irls_supports", spy)
    _, X, y, users = _shuffled(seed, 40, 16, 30, 1, 4)
    U0 = moments_init(X, y, users, 40, 1)
    fast = AMHTLRS(rank=1, sparsity=4, n_iter=10, u_solver="direct").fit(X, y, users)
    ref, hist = fit_reference(X, y, users, 40, U0, 4, n_iter=10)
    assert calls and sum(calls) > 0
    np.testing.assert_allclose(fast.model_.theta(), ref.theta(), rtol=0, atol=1e-9)
    np.testing.assert_allclose(fast.history_, hist, rtol=1e-7, atol=1e-14)


def test_algorithm2_step_is_stable_when_m_below_d() -> None:
    """m=40 < d=150: the paper's step 1/m diverges; the normalised step with backtracking never
    increases any user's loss, and Algorithm 2 still recovers exactly on an easier problem."""
    D = make_synthetic(30, 40, 150, 1, 10, None, random_state=1)
    k, t = 10, 30
    B_idx, B_val = np.tile(np.arange(k), (t, 1)), np.zeros((t, k))
    W = w_step(D.X, D.y, D.users, D.U, B_idx, B_val)

    def per_user_loss(B_idx: np.ndarray, B_val: np.ndarray) -> np.ndarray:
        model = LRSModel(U=D.U, W=W, B_idx=B_idx, B_val=B_val)
        return np.bincount(D.users, weights=(model.predict(D.X, D.users) - D.y) ** 2)

    losses = [per_user_loss(B_idx, B_val)]
    for _ in range(15):
        _, B_idx, B_val = b_step(D.X, D.y, D.users, D.U, W, B_idx, B_val, method="iht")
        losses.append(per_user_loss(B_idx, B_val))
    assert np.all(np.diff(np.stack(losses), axis=0) <= 1e-9)
    assert losses[-1].sum() < 0.5 * losses[0].sum()
    # the paper's 1/m step on user 0 blows up
    X0 = D.X[D.users == 0]
    y0 = D.y[D.users == 0] - X0 @ D.U @ W[0]
    b = np.zeros(150)
    for _ in range(20):
        c = b + X0.T @ (y0 - X0 @ b) / 40
        b = np.where(np.isin(np.arange(150), np.argsort(-np.abs(c))[:k]), c, 0.0)
    assert np.linalg.norm(y0 - X0 @ b) > 1e3 * np.linalg.norm(y0)

    E = make_synthetic(150, 50, 40, 1, 3, None, random_state=0)
    est = AMHTLRS(rank=1, sparsity=3, b_step="iht", random_state=0).fit(E.X, E.y, E.users)
    assert relative_error(est.model_.theta(), E.theta) <= 1e-6


def test_block_size_does_not_change_the_fit(monkeypatch: pytest.MonkeyPatch) -> None:
    """The engine's steps run over user blocks; the cross-user rules (the rescues' "badly fitted"
    median, ζ) are global, so blocks of 7 users give the same fit as one block (IRLS included)."""
    import lrs_rec.amht as amht

    _, X, y, users = _shuffled(9, 40, 20, 12, 2, 2)
    kw = dict(n_iter=8, u_solver="direct", ridge_b=0.1, zeta=3)
    one = AMHTLRS(rank=2, sparsity=2, **kw).fit(X, y, users)  # type: ignore[arg-type]
    _, X2, y2, users2 = _shuffled(2, 40, 16, 30, 1, 4)
    one_irls = AMHTLRS(rank=1, sparsity=4, n_iter=10, u_solver="direct").fit(X2, y2, users2)
    kw_iht = dict(n_iter=6, b_step="iht", u_step="eq5", sample_splitting=2, zeta=5)
    one_iht = AMHTLRS(rank=2, sparsity=2, **kw_iht).fit(X, y, users)  # type: ignore[arg-type]
    monkeypatch.setattr(amht, "BLOCK", 7)
    blk_iht = AMHTLRS(rank=2, sparsity=2, **kw_iht).fit(X, y, users)  # type: ignore[arg-type]
    np.testing.assert_allclose(blk_iht.model_.theta(), one_iht.model_.theta(), rtol=0, atol=1e-9)
    blocked = AMHTLRS(rank=2, sparsity=2, **kw).fit(X, y, users)  # type: ignore[arg-type]
    np.testing.assert_allclose(blocked.model_.theta(), one.model_.theta(), rtol=0, atol=1e-9)
    blk_irls = AMHTLRS(rank=1, sparsity=4, n_iter=10, u_solver="direct").fit(X2, y2, users2)
    np.testing.assert_allclose(blk_irls.model_.theta(), one_irls.model_.theta(), rtol=0, atol=1e-9)
    np.testing.assert_array_equal(blk_irls.model_.B_idx, one_irls.model_.B_idx)


def test_standalone_b_step_runs_the_irls_rescue(monkeypatch: pytest.MonkeyPatch) -> None:
    """Callers of the public b_step (DP-AMHT-LRS) get every support rescue, IRLS included: the
    estimator's "skip IRLS in the first iterations" schedule must not leak into standalone calls."""
    import lrs_rec.engine.sparse_b as sparse_b

    calls: list[int] = []
    original = sparse_b._irls_supports

    def spy(data, Z, k, flag, *schedule):  # type: ignore[no-untyped-def]
        calls.append(int(flag.sum()))
        return original(data, Z, k, flag, *schedule)

    monkeypatch.setattr(sparse_b, "_irls_supports", spy)
    # the DP benchmark's regime: few noisy samples per user, a U that is still far from U*
    D = make_synthetic(300, 10, 10, 2, 1, None, noise=0.1, random_state=0)
    U0 = np.linalg.qr(np.random.default_rng(0).normal(size=(10, 2)))[0]
    B_idx, B_val = np.tile(np.arange(1), (300, 1)), np.zeros((300, 1))
    W = w_step(D.X, D.y, D.users, U0, B_idx, B_val, n_users=300)
    b_step(D.X, D.y, D.users, U0, W, B_idx, B_val, n_users=300)
    assert calls and sum(calls) > 0


def test_irls_rescue_never_installs_a_support_it_did_not_search() -> None:
    """Regression: a badly fitted user with m_u >= r + d is skipped by the IRLS search, whose row of
    zeros was still installed as the support [0, 0, 0] when its (ridge-split) fit looked better,
    and LRSModel then refused the repeated index. The reference twin skips such users too."""
    for seed in range(12):
        rng = np.random.default_rng(seed)
        d, r, k = 5, 1, 3
        counts = [4] * 20 + [40]  # the last user is over-determined and very noisy
        users = np.repeat(np.arange(len(counts)), counts)
        X = rng.standard_normal((len(users), d))
        U = np.linalg.qr(rng.standard_normal((d, r)))[0]
        theta = rng.standard_normal((len(counts), r)) @ U.T
        noise = np.where(users == 20, 5.0, 0.01) * rng.standard_normal(len(users))
        y = np.einsum("nd,nd->n", X, theta[users]) + noise
        kw = {"ridge_b": 100.0, "n_iter": 6, "tol": 0}
        est = AMHTLRS(r, k, u_solver="direct", **kw).fit(X, y, users)  # type: ignore[arg-type]
        assert np.all(np.diff(est.model_.B_idx, axis=1) > 0), seed
        init = moments_init(X, y, users, len(counts), r)
        ref, _ = fit_reference(X, y, users, len(counts), init, k, **kw)  # type: ignore[arg-type]
        np.testing.assert_array_equal(est.model_.B_idx[20], ref.B_idx[20])


def test_fit_refuses_fewer_users_than_the_rank() -> None:
    """With one user and r = 2 the U-step is rank-deficient: the second basis column would be set
    by rounding (the fast fit and its reference twin picked different supports)."""
    rng = np.random.default_rng(0)
    X = rng.standard_normal((12, 6))
    y = X @ rng.standard_normal(6)
    with pytest.raises(ValueError, match="rank-2 U needs at least 2 users, got n_users=1"):
        AMHTLRS(2, 2).fit(X, y, np.zeros(12, dtype=int))
    AMHTLRS(1, 2, random_state=0).fit(X, y, np.zeros(12, dtype=int))  # r = 1: one user suffices
