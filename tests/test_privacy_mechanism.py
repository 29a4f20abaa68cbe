"""DP mechanism of the U-step (lrs_rec.privacy): clipping, the stated sensitivities under
add/remove-one-user, fast paths against their reference twins, and the Gaussian noise scale."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lrs_rec.privacy import (
    ClipBounds,
    cap_samples_per_user,
    clip_rows,
    clip_rows_reference,
    clipped_item_block_statistics,
    clipped_u_step_statistics,
    gaussian_noise,
    item_sum_sensitivities,
    item_sum_statistics,
    solve_kron_u_step,
    symmetric_gaussian_noise,
    u_step_sensitivities,
    user_contribution_reference,
)


def _dataset(seed: int, n_users: int, d: int, r: int, m: int, scale: float):
    """Random samples with up to m per user; large ``scale`` makes every clip bind."""
    rng = np.random.default_rng(seed)
    counts = rng.integers(1, m + 1, size=n_users)
    users = np.repeat(np.arange(n_users), counts)
    N = users.size
    X = scale * rng.standard_normal((N, d))
    y = scale * rng.standard_normal(N)
    xb = scale * rng.standard_normal(N)
    W = scale * rng.standard_normal((n_users, r))
    return users, X, y, xb, W


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    n_users=st.integers(2, 6),
    d=st.integers(1, 4),
    r=st.integers(1, 3),
    m=st.integers(1, 5),
    scale=st.sampled_from([0.01, 1.0, 50.0]),
    A1=st.floats(0.1, 3.0),
    A2=st.floats(0.1, 3.0),
    A3=st.floats(0.1, 3.0),
    A_w=st.floats(0.1, 3.0),
)
def test_removing_any_user_moves_A_and_V_within_the_stated_sensitivity(
    seed, n_users, d, r, m, scale, A1, A2, A3, A_w
):
    bounds = ClipBounds(A1=A1, A2=A2, A3=A3, A_w=A_w, max_samples_per_user=m)
    users, X, y, xb, W = _dataset(seed, n_users, d, r, m, scale)
    dA, dV = u_step_sensitivities(bounds, one_hot=False)
    A, V = clipped_u_step_statistics(X, y, xb, users, W, bounds)
    for u in range(n_users):
        keep = users != u  # the neighbour without user u (W of the others is unchanged)
        A2_, V2_ = clipped_u_step_statistics(X[keep], y[keep], xb[keep], users[keep], W, bounds)
        assert np.linalg.norm(A - A2_) <= dA * (1 + 1e-9)
        assert np.linalg.norm(V - V2_) <= dV * (1 + 1e-9)


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    n_users=st.integers(2, 6),
    n_items=st.integers(3, 12),
    r=st.integers(1, 3),
    m=st.integers(1, 3),
    scale=st.sampled_from([0.01, 1.0, 50.0]),
    A2=st.floats(0.1, 3.0),
    A3=st.floats(0.1, 3.0),
    A_w=st.floats(0.1, 3.0),
)
def test_one_hot_blocks_move_within_the_tighter_sqrt_m_sensitivity(
    seed, n_users, n_items, r, m, scale, A2, A3, A_w
):
    rng = np.random.default_rng(seed)
    bounds = ClipBounds(A1=1.0, A2=A2, A3=A3, A_w=A_w, max_samples_per_user=m)
    users, items = [], []
    for u in range(n_users):  # distinct items per user, at most m
        its = rng.choice(n_items, size=int(rng.integers(1, m + 1)), replace=False)
        users += [u] * len(its)
        items += its.tolist()
    users_a, items_a = np.array(users), np.array(items)
    y = scale * rng.standard_normal(users_a.size)
    xb = scale * rng.standard_normal(users_a.size)
    W = scale * rng.standard_normal((n_users, r))
    dA, dV = u_step_sensitivities(bounds, one_hot=True)
    A, V = clipped_item_block_statistics(items_a, y, xb, users_a, W, n_items, bounds)
    # the block statistics are exactly the Kronecker ones restricted to the diagonal blocks
    X = np.eye(n_items)[items_a]
    A_full, V_full = clipped_u_step_statistics(X, y, xb, users_a, W, bounds)
    for i in range(n_items):
        np.testing.assert_allclose(
            A_full[i * r : (i + 1) * r, i * r : (i + 1) * r], A[i], atol=1e-9
        )
    np.testing.assert_allclose(V_full, V, atol=1e-9)
    for u in range(n_users):
        keep = users_a != u
        A2_, V2_ = clipped_item_block_statistics(
            items_a[keep], y[keep], xb[keep], users_a[keep], W, n_items, bounds
        )
        assert np.linalg.norm(A - A2_) <= dA * (1 + 1e-9)
        assert np.linalg.norm(V - V2_) <= dV * (1 + 1e-9)


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    n_users=st.integers(2, 6),
    m=st.integers(1, 6),
    A2=st.floats(0.1, 3.0),
    C=st.one_of(st.none(), st.floats(0.1, 5.0)),
)
def test_item_sums_move_within_the_stated_sensitivity(seed, n_users, m, A2, C):
    rng = np.random.default_rng(seed)
    n_items = 15
    users, items = [], []
    for u in range(n_users):  # users may have MORE than m ratings: the weights s_u bound them
        its = rng.choice(n_items, size=int(rng.integers(1, n_items + 1)), replace=False)
        users += [u] * len(its)
        items += its.tolist()
    users_a, items_a = np.array(users), np.array(items)
    res = 5.0 * rng.standard_normal(users_a.size)
    dS, dN = item_sum_sensitivities(A2=A2, max_samples_per_user=m, user_norm_bound=C)
    kw = {"A2": A2, "max_samples_per_user": m, "user_norm_bound": C}
    S, N = item_sum_statistics(items_a, res, users_a, n_items, **kw)
    for u in range(n_users):
        keep = users_a != u
        S2, N2 = item_sum_statistics(items_a[keep], res[keep], users_a[keep], n_items, **kw)
        assert np.linalg.norm(S - S2) <= dS * (1 + 1e-9)
        assert np.linalg.norm(N - N2) <= dN * (1 + 1e-9)


def test_fast_statistics_equal_the_per_user_reference_sum():
    bounds = ClipBounds(A1=0.7, A2=0.5, A3=0.4, A_w=0.9, max_samples_per_user=4)
    users, X, y, xb, W = _dataset(3, 5, 3, 2, 4, 2.0)
    A, V = clipped_u_step_statistics(X, y, xb, users, W, bounds)
    A_ref = np.zeros_like(A)
    V_ref = np.zeros_like(V)
    for u in range(5):
        s = users == u
        Au, Vu = user_contribution_reference(X[s], y[s], xb[s], W[u], bounds)
        A_ref += Au
        V_ref += Vu
    np.testing.assert_allclose(A, A_ref, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(V, V_ref, rtol=1e-12, atol=1e-12)


def test_clip_rows_matches_reference_and_bounds_norms():
    X = np.random.default_rng(0).standard_normal((50, 4)) * 3
    np.testing.assert_allclose(clip_rows(X, 1.5), clip_rows_reference(X, 1.5), rtol=1e-12)
    assert np.all(np.linalg.norm(clip_rows(X, 1.5), axis=1) <= 1.5 * (1 + 1e-12))
    small = np.full((1, 4), 0.1)
    np.testing.assert_array_equal(clip_rows(small, 1.5), small)  # inside the ball: unchanged


def test_statistics_refuse_users_above_the_sample_cap():
    bounds = ClipBounds(max_samples_per_user=2)
    users, X, y, xb, W = _dataset(0, 3, 2, 1, 5, 1.0)
    with pytest.raises(ValueError, match="max_samples_per_user"):
        clipped_u_step_statistics(X, y, xb, users, W, bounds)
    keep = cap_samples_per_user(users, 2, np.random.default_rng(0))
    assert np.bincount(users[keep]).max() <= 2
    assert np.array_equal(np.bincount(users[keep]), np.minimum(np.bincount(users), 2))
    clipped_u_step_statistics(X[keep], y[keep], xb[keep], users[keep], W, bounds)


def test_one_hot_blocks_refuse_duplicate_user_items():
    bounds = ClipBounds(max_samples_per_user=5)
    with pytest.raises(ValueError, match="duplicate"):
        clipped_item_block_statistics(
            np.array([1, 1]), np.ones(2), np.zeros(2), np.array([0, 0]), np.ones((1, 2)), 3, bounds
        )


def test_noise_has_the_calibrated_standard_deviation_and_symmetry():
    rng = np.random.default_rng(0)
    g = gaussian_noise((200_000,), sensitivity=2.0, noise_multiplier=1.5, rng=rng)
    # std of 200k normal draws has relative standard error ~ 1/sqrt(2n) = 0.16%
    assert abs(g.std() / 3.0 - 1.0) < 0.01
    S = symmetric_gaussian_noise(300, sensitivity=1.0, noise_multiplier=2.0, rng=rng)
    np.testing.assert_array_equal(S, S.T)
    upper = S[np.triu_indices(300)]
    assert abs(upper.std() / 2.0 - 1.0) < 0.02


def test_noiseless_u_step_recovers_the_true_subspace():
    rng = np.random.default_rng(1)
    d, r, n_users, m = 6, 2, 400, 10
    U_true = np.linalg.qr(rng.standard_normal((d, r)))[0]
    W = rng.standard_normal((n_users, r)) * 0.3
    users = np.repeat(np.arange(n_users), m)
    X = rng.standard_normal((users.size, d)) * 0.3
    y = np.einsum("nd,dr,nr->n", X, U_true, W[users])
    bounds = ClipBounds(A1=10.0, A2=10.0, A3=10.0, A_w=10.0, max_samples_per_user=m)
    A, V = clipped_u_step_statistics(X, y, np.zeros_like(y), users, W, bounds)
    U = solve_kron_u_step(A, V, ridge=1e-9)
    # same column space: the projection residual vanishes
    assert np.linalg.norm(U_true - U @ (U.T @ U_true)) < 1e-6


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    n_users=st.integers(2, 6),
    n_items=st.integers(3, 12),
    r=st.integers(1, 3),
    m=st.integers(1, 3),
    scale=st.sampled_from([0.01, 1.0, 50.0]),
    A2=st.floats(0.1, 3.0),
    A_w=st.floats(0.1, 3.0),
)
def test_population_gram_releases_move_within_their_sensitivities(
    seed, n_users, n_items, r, m, scale, A2, A_w
):
    """u_step_gram='population': the capped item counts (√m), the global second moment of ŵ
    (m·A_w²) and, without a sparse part (xb = 0), V within √m·A2·A_w."""
    from lrs_rec.privacy import (
        capped_item_counts,
        clipped_second_moment,
        population_gram_sensitivities,
    )

    rng = np.random.default_rng(seed)
    bounds = ClipBounds(A1=1.0, A2=A2, A3=1.0, A_w=A_w, max_samples_per_user=m)
    users, items = [], []
    for u in range(n_users):
        its = rng.choice(n_items, size=int(rng.integers(1, m + 1)), replace=False)
        users += [u] * len(its)
        items += its.tolist()
    users_a, items_a = np.array(users), np.array(items)
    y = scale * rng.standard_normal(users_a.size)
    xb = np.zeros(users_a.size)  # no sparse part
    W = scale * rng.standard_normal((n_users, r))
    dC, dM = population_gram_sensitivities(bounds)
    _, dV = u_step_sensitivities(bounds, one_hot=True, sparse=False)
    assert dV == pytest.approx(np.sqrt(m) * A2 * A_w)
    C = capped_item_counts(items_a, n_items)
    M = clipped_second_moment(users_a, W, bounds)
    _, V = clipped_item_block_statistics(items_a, y, xb, users_a, W, n_items, bounds)
    for u in range(n_users):
        keep = users_a != u
        C2 = capped_item_counts(items_a[keep], n_items)
        M2 = clipped_second_moment(users_a[keep], W, bounds)
        _, V2 = clipped_item_block_statistics(
            items_a[keep], y[keep], xb[keep], users_a[keep], W, n_items, bounds, with_gram=False
        )
        assert np.linalg.norm(C - C2) <= dC * (1 + 1e-9)
        assert np.linalg.norm(M - M2) <= dM * (1 + 1e-9)
        assert np.linalg.norm(V - V2) <= dV * (1 + 1e-9)


def test_population_solve_equals_per_item_ridge_solves():
    from lrs_rec.privacy import solve_item_population

    rng = np.random.default_rng(0)
    r, n = 3, 7
    G = rng.standard_normal((r, r))
    M = G @ G.T
    V = rng.standard_normal((n, r))
    counts = np.array([5.0, 0.0, -2.0, 1.0, 30.0, 2.5, 100.0])
    U = solve_item_population(V, counts, M, ridge=0.7)
    for i in range(n):
        ref = np.linalg.solve(max(counts[i], 0.0) * M + 0.7 * np.eye(r), V[i])
        np.testing.assert_allclose(U[i], ref, rtol=1e-10, atol=1e-12)


def test_statistics_in_memory_budget_blocks_equal_the_one_block_sums(monkeypatch):
    """The clipped statistics are summed over blocks of samples sized by the engine's memory
    budget: tiny blocks give the same sums (general covariates, gathered from F; one-hot blocks)."""
    from lrs_rec.engine import steps

    rng = np.random.default_rng(4)
    bounds = ClipBounds(A1=0.8, A2=0.9, A3=0.4, A_w=0.7, max_samples_per_user=5)
    n_users, n_items, d, r = 30, 12, 4, 2
    users, items = [], []
    for u in range(n_users):
        its = rng.choice(n_items, size=int(rng.integers(1, 6)), replace=False)
        users += [u] * len(its)
        items += its.tolist()
    users_a, items_a = np.array(users), np.array(items)
    F = rng.standard_normal((n_items, d))
    y, xb = rng.standard_normal(users_a.size), rng.standard_normal(users_a.size)
    W = rng.standard_normal((n_users, r))
    A, V = clipped_u_step_statistics(F[items_a], y, xb, users_a, W, bounds)
    Ab, Vb = clipped_item_block_statistics(items_a, y, xb, users_a, W, n_items, bounds)
    monkeypatch.setattr(steps, "BLOCK_FLOATS", 64)  # blocks of a handful of samples
    A2_, V2_ = clipped_u_step_statistics(None, y, xb, users_a, W, bounds, F=F, items=items_a)
    Ab2, Vb2 = clipped_item_block_statistics(items_a, y, xb, users_a, W, n_items, bounds)
    np.testing.assert_allclose(A2_, A, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(V2_, V, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(Ab2, Ab, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(Vb2, Vb, rtol=1e-12, atol=1e-12)
