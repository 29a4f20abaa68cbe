"""The one-hot private U-step of lrs_rec.privacy_items: sensitivities checked empirically on
neighbouring data sets (remove any one user), the popularity selection, and the per-item posterior
solve against its slow reference twin."""

from __future__ import annotations

import math

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from lrs_rec.privacy import ClipBounds, population_gram_sensitivities, solve_item_population
from lrs_rec.privacy_items import (
    activity_weights,
    clipped_item_rows,
    item_rows_sensitivity,
    select_popular_per_user,
    spectral_sensitivity,
    spectral_start,
    spectral_statistic,
    weighted_item_counts,
    weighted_second_moment,
    wiener_item_rows,
    wiener_item_rows_reference,
)


def _ratings(seed: int, n_users: int, n_items: int, max_per_user: int, scale: float):
    """Distinct items per user, up to ``max_per_user`` each; large ``scale`` makes every clip bind."""
    rng = np.random.default_rng(seed)
    users, items = [], []
    for u in range(n_users):
        k = int(rng.integers(1, min(max_per_user, n_items) + 1))
        items.extend(rng.choice(n_items, size=k, replace=False).tolist())
        users.extend([u] * k)
    users_a, items_a = np.array(users), np.array(items)
    y = scale * rng.standard_normal(users_a.size)
    xb = scale * rng.standard_normal(users_a.size)
    W = scale * rng.standard_normal((n_users, 3))
    return users_a, items_a, y, xb, W


def _releases(users, items, y, xb, W, n_items, *, m, A2, A3, A_w, C, weighted):
    n_users = W.shape[0]
    base = activity_weights(users, n_users, m) if weighted else None
    V, s = clipped_item_rows(
        items, y, xb, users, W, n_items, A2=A2, A3=A3, A_w=A_w, user_norm=C, base_weights=base
    )
    counts = weighted_item_counts(items, users, np.ones(n_users) if base is None else base, n_items)
    M = weighted_second_moment(users, W, s, A_w, m)
    return V, counts, M


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    n_users=st.integers(2, 6),
    m=st.integers(1, 5),
    scale=st.sampled_from([0.01, 1.0, 50.0]),
    A2=st.floats(0.1, 3.0),
    A3=st.floats(0.1, 3.0),
    A_w=st.floats(0.1, 3.0),
    C=st.one_of(st.none(), st.floats(0.05, 5.0)),
    weighted=st.booleans(),
    sparse=st.booleans(),
)
def test_removing_any_user_moves_V_counts_and_M_within_the_stated_sensitivities(
    seed, n_users, m, scale, A2, A3, A_w, C, weighted, sparse
):
    """Weighted mode: every sample of a user enters with σ_u = min(1, √(m/n_u)) (users with up to
    3m samples); capped mode: at most m samples per user. Removing any one user moves V by at most
    min(√m·(A2 + A3), C)·A_w, the counts by √m and M by m·A_w² (Frobenius)."""
    n_items = 12
    users, items, y, xb, W = _ratings(seed, n_users, n_items, 3 * m if weighted else m, scale)
    if not sparse:
        xb = np.zeros_like(xb)
    a3 = A3 if sparse else 1e-300  # no sparse part: the ⟨x, b⟩ term is zero
    kw = dict(m=m, A2=A2, A3=a3, A_w=A_w, C=C, weighted=weighted)
    full = _releases(users, items, y, xb, W, n_items, **kw)
    dV = item_rows_sensitivity(m=m, A2=A2, A3=A3, A_w=A_w, user_norm=C, sparse=sparse)
    dC, dM = population_gram_sensitivities(ClipBounds(A_w=A_w, max_samples_per_user=m))
    for u in range(n_users):
        keep = users != u
        Wu = W.copy()
        Wu[u] = 0.0  # the user is gone: no samples; their row is never read
        nb = _releases(users[keep], items[keep], y[keep], xb[keep], Wu, n_items, **kw)
        for (a, b), bound in zip(zip(full, nb, strict=True), (dV, dC, dM), strict=True):
            assert np.linalg.norm(a - b) <= bound * (1 + 1e-9) + 1e-12


def test_popular_selection_keeps_the_m_most_popular_own_items_only():
    rng = np.random.default_rng(0)
    n_items, m = 30, 4
    popularity = rng.permutation(n_items).astype(float)  # distinct: no ties
    users, items, *_ = _ratings(1, 20, n_items, 10, 1.0)
    keep = select_popular_per_user(users, items, popularity, m, rng)
    for u in range(20):
        own = items[users == u]
        chosen = items[(users == u) & keep]
        assert chosen.size == min(m, own.size)
        assert set(chosen) == set(own[np.argsort(-popularity[own])][:m])
    # another user's presence does not change a user's choice (distinct popularity: deterministic)
    other = users != 3
    keep2 = select_popular_per_user(users[other], items[other], popularity, m, rng)
    np.testing.assert_array_equal(keep[other], keep2)
    # a support threshold drops items below it
    keep3 = select_popular_per_user(users, items, popularity, m, rng, min_popularity=15.0)
    assert np.all(popularity[items[keep3]] >= 15.0)


def test_activity_weights_bound_each_users_count_vector_by_sqrt_m():
    users = np.repeat(np.arange(4), [1, 5, 20, 80])
    s = activity_weights(users, 4, 10)
    np.testing.assert_allclose(s, [1.0, 1.0, math.sqrt(10 / 20), math.sqrt(10 / 80)])
    assert np.all(s * np.sqrt(np.bincount(users)) <= math.sqrt(10) + 1e-12)


def test_posterior_rows_equal_per_item_reference_solves():
    rng = np.random.default_rng(3)
    n_items, r = 25, 4
    V = rng.standard_normal((n_items, r)) * 5
    counts = rng.uniform(-3, 200, n_items)  # negative noisy counts are treated as 0
    B = rng.standard_normal((r, r))
    M = B @ B.T / r
    M[0, 1] += 0.01  # not exactly symmetric (noisy release): the symmetric part is used
    kw = dict(noise_var=40.0, prior_var=0.3, ridge=2.0)
    fast = wiener_item_rows(V, counts, M, **kw)
    np.testing.assert_allclose(fast, wiener_item_rows_reference(V, counts, M, **kw), atol=1e-10)
    assert np.all(fast[counts <= 0] == 0.0)


def test_posterior_without_dp_noise_is_the_ridge_solve():
    rng = np.random.default_rng(4)
    V = rng.standard_normal((10, 3))
    counts = rng.uniform(1, 50, 10)
    B = rng.standard_normal((3, 3))
    M = B @ B.T + 0.1 * np.eye(3)
    post = wiener_item_rows(V, counts, M, noise_var=0.0, prior_var=1.0, ridge=0.7)
    np.testing.assert_allclose(post, solve_item_population(V, counts, M, ridge=0.7), atol=1e-12)


def test_posterior_shrinks_rare_items_more_than_popular_ones():
    """With DP noise of constant variance the shrinkage factor g/(g + ridge + noise/(prior·g))
    rises with the item's count g: a popular item's row is close to the least-squares solution."""
    V = np.ones((2, 1))
    counts = np.array([10.0, 10_000.0])
    M = np.eye(1)
    post = wiener_item_rows(V, counts, M, noise_var=1e4, prior_var=1.0, ridge=1.0)
    ls = V[:, 0] / counts
    factor = post[:, 0] / ls
    assert factor[0] < 0.01 and factor[1] > 0.98


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    n_users=st.integers(2, 6),
    scale=st.sampled_from([0.01, 1.0, 50.0]),
    A2=st.floats(0.1, 3.0),
    C=st.floats(0.05, 5.0),
    K=st.integers(1, 12),
)
def test_removing_any_user_moves_the_spectral_statistic_within_C_squared(
    seed, n_users, scale, A2, C, K
):
    n_items = 12
    users, items, y, *_ = _ratings(seed, n_users, n_items, 8, scale)
    top = np.random.default_rng(seed).permutation(n_items)[:K]
    G = spectral_statistic(users, items, y, top, n_users, A2=A2, user_norm=C)
    assert np.allclose(G, G.T) and np.all(np.diag(G) == 0.0)
    for u in range(n_users):
        keep = users != u
        Gu = spectral_statistic(users[keep], items[keep], y[keep], top, n_users, A2=A2, user_norm=C)
        assert np.linalg.norm(G - Gu) <= spectral_sensitivity(C) * (1 + 1e-9) + 1e-12


def test_spectral_start_recovers_a_planted_item_subspace_without_noise():
    """Random raters of a planted rank-2 model: the start's rows span the item factors' subspace."""
    rng = np.random.default_rng(7)
    n_users, n_items, r = 3000, 40, 2
    Q = rng.standard_normal((n_items, r))
    P = rng.standard_normal((n_users, r))
    users = np.repeat(np.arange(n_users), 8)
    items = np.concatenate([rng.choice(n_items, 8, replace=False) for _ in range(n_users)])
    t = np.einsum("nr,nr->n", P[users], Q[items]) * 0.3
    top = np.arange(n_items)
    G = spectral_statistic(users, items, t, top, n_users, A2=10.0, user_norm=100.0)
    U = spectral_start(G, np.bincount(items, minlength=n_items).astype(float), r)
    Qo, Uo = np.linalg.qr(Q)[0], np.linalg.qr(U)[0]
    cosines = np.linalg.svd(Qo.T @ Uo, compute_uv=False)
    assert cosines.min() > 0.95
