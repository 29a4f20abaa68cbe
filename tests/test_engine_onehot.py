"""The engine's one-hot user step (lrs_rec.engine.onehot) against the dense step it specialises:
``steps.user_step`` with item features F = I and a dense B."""

from __future__ import annotations

import numpy as np
import pytest

from lrs_rec.engine import onehot, steps
from lrs_rec.engine.steps import Samples, StepParams, UserPrior


def _data(seed: int, n_users: int = 40, n_items: int = 30, r: int = 3, k: int = 2):
    rng = np.random.default_rng(seed)
    pairs = sorted(
        {
            (u, int(i))
            for u in range(n_users)
            for i in rng.choice(n_items, rng.integers(1, 15), False)
        }
    )
    users, items = (np.array(c, dtype=np.int64) for c in zip(*pairs, strict=True))
    ratings = rng.integers(1, 6, users.size).astype(float)
    B_idx = np.sort(np.stack([rng.choice(n_items, k, False) for _ in range(n_users)]), axis=1)
    state = onehot.OneHotState(
        3.5, rng.normal(0, 0.3, n_users), rng.normal(0, 0.3, n_items),
        rng.normal(0, 0.5, (n_items, r)), rng.normal(0, 0.5, (n_users, r)),
        B_idx, rng.normal(0, 0.3, (n_users, k)),
    )  # fmt: skip
    prior = UserPrior(rng.normal(0, 0.2, r), np.eye(r) + 0.1 * np.ones((r, r)))
    return Samples(users, items, ratings), state, prior


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("user_bias", [True, False])
def test_one_hot_user_step_equals_the_dense_step_with_identity_features(seed, user_bias):
    data, state, prior = _data(seed)
    p = StepParams(k=2, per_user_w=True, user_bias=user_bias, reg_w=2.0, reg_b=5.0, reg_bias=3.0)
    dense = state.to_dense()
    steps.user_step(dense, data, p, prior=prior)
    onehot.user_step(state, data, p, prior=prior, block=7)  # several user blocks
    np.testing.assert_allclose(state.user_bias, dense.user_bias, rtol=0, atol=1e-10)
    np.testing.assert_allclose(state.W, dense.W, rtol=0, atol=1e-10)
    np.testing.assert_allclose(state.to_dense().dense_b(), dense.dense_b(), rtol=0, atol=1e-10)
    assert np.all(np.diff(state.B_idx, axis=1) > 0)
    lo, hi = 1.0, 5.0
    np.testing.assert_allclose(
        state.predict(data.users, data.items, lo, hi),
        dense.predict(data.users, data.items, lo, hi),
        rtol=0,
        atol=1e-10,
    )


def test_top_k_per_user_matches_the_dense_top_k_with_padding():
    from lrs_rec.thresholding import top_k_indices

    users = np.array([0, 0, 0, 1, 2, 2])
    items = np.array([4, 1, 3, 0, 2, 5])
    vals = np.array([0.5, -2.0, 0.5, 1.0, 0.25, 3.0])  # ties: items 4, 3
    idx, val = onehot.top_k_per_user(users, items, vals, 4, 3)
    dense = np.zeros((4, 6))
    dense[users, items] = vals
    ref = top_k_indices(dense, 3)
    np.testing.assert_array_equal(idx, ref)
    np.testing.assert_array_equal(val, np.take_along_axis(dense, ref, axis=1))
