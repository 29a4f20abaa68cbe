"""Item-adaptive weights of the one-hot U-step (lrs_rec.privacy_items.item_weights): the weights
from a released popularity, and the V / count / M releases with them staying within the stated
sensitivities when any one user is removed (the weights are public: held fixed in both worlds)."""

from __future__ import annotations

import math

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from lrs_rec.privacy import ClipBounds, population_gram_sensitivities
from lrs_rec.privacy_items import (
    activity_weights,
    clipped_item_rows,
    item_rows_sensitivity,
    item_weights,
    weighted_item_counts,
    weighted_second_moment,
)


def test_item_weights_down_weight_items_above_the_knee_only():
    p = np.array([-5.0, 0.0, 50.0, 100.0, 400.0, 1e4])
    c = item_weights(p, 100.0)
    np.testing.assert_allclose(c, [1, 1, 1, 1, 0.5, 0.1])
    np.testing.assert_allclose((c * p)[3:], np.sqrt(100.0 * p[3:]))  # √(knee·p) above the knee
    for knee in (0.0, -1.0, math.inf, math.nan):  # no noise (knee 0) or nonsense: weight 1
        np.testing.assert_array_equal(item_weights(p, knee), np.ones(p.size))


def test_activity_weights_with_item_weights_bound_each_users_weighted_norm():
    users = np.repeat(np.arange(3), [4, 30, 200])
    c = np.where(np.arange(users.size) % 2 == 0, 1.0, 0.1)
    sigma = activity_weights(users, 3, 10, c)
    norms = np.sqrt(np.bincount(users, weights=c * c))
    assert np.all(sigma * norms <= math.sqrt(10) + 1e-12)
    assert sigma[0] == 1.0  # a light user keeps weight 1
    # down-weighted popular samples leave more of a heavy user's allowance to the others
    assert sigma[2] > activity_weights(users, 3, 10)[2]


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    n_users=st.integers(2, 6),
    m=st.integers(1, 5),
    scale=st.sampled_from([0.01, 1.0, 50.0]),
    A2=st.floats(0.1, 3.0),
    A_w=st.floats(0.1, 3.0),
    C=st.one_of(st.none(), st.floats(0.05, 5.0)),
    knee=st.sampled_from([0.0, 0.5, 3.0, 100.0]),
)
def test_removing_any_user_moves_item_weighted_releases_within_the_sensitivities(
    seed, n_users, m, scale, A2, A_w, C, knee
):
    """Every sample enters with σ_u·c_i, σ_u = min(1, √(m/Σ_i c_i²)), c from a public popularity;
    V's user-norm clip acts on the weighted residuals. Removing any one user moves V by at most
    min(√m·A2, C)·A_w, the counts by √m and M by m·A_w² (no sparse part)."""
    rng = np.random.default_rng(seed)
    n_items = 12
    users_l, items_l = [], []
    for u in range(n_users):
        k = int(rng.integers(1, 3 * m + 1))
        items_l.extend(rng.choice(n_items, size=min(k, n_items), replace=False).tolist())
        users_l.extend([u] * min(k, n_items))
    users, items = np.array(users_l), np.array(items_l)
    y = scale * rng.standard_normal(users.size)
    W = scale * rng.standard_normal((n_users, 3))
    c_item = item_weights(rng.uniform(-2, 10, n_items), knee)  # public: fixed in both worlds

    def releases(keep: np.ndarray, Wx: np.ndarray):
        u, i, c = users[keep], items[keep], c_item[items[keep]]
        sigma = activity_weights(u, n_users, m, c)
        V, s = clipped_item_rows(
            i, y[keep], np.zeros(u.size), u, Wx, n_items, A2=A2, A3=1.0, A_w=A_w, user_norm=C,
            base_weights=sigma, sample_weights=c,
        )  # fmt: skip
        counts = weighted_item_counts(i, u, sigma, n_items, c)
        return V, counts, weighted_second_moment(u, Wx, s, A_w, m)

    full = releases(np.ones(users.size, bool), W)
    dV = item_rows_sensitivity(m=m, A2=A2, A3=0.0, A_w=A_w, user_norm=C, sparse=False)
    dC, dM = population_gram_sensitivities(ClipBounds(A_w=A_w, max_samples_per_user=m))
    for u in range(n_users):
        Wu = W.copy()
        Wu[u] = 0.0
        nb = releases(users != u, Wu)
        for (a, b), bound in zip(zip(full, nb, strict=True), (dV, dC, dM), strict=True):
            assert np.linalg.norm(a - b) <= bound * (1 + 1e-9) + 1e-12
