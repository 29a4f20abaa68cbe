"""estimate_prior's vectorised moments against their slow reference twins (the previous code: one
lexsort of all ratings for the first-ratings episodes, per-rating deviations and ``np.add.at``)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg

import lrs_rec.onboarding as ob
from lrs_rec.model import LRSModel


def _first_ratings_reference(items, users, counts, history_timestamps, episode_size):
    indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    ts = np.asarray(history_timestamps, dtype=np.float64)
    order = np.lexsort((items, ts, users))  # by user, then time, then item
    rank = np.arange(users.size) - indptr[users[order]]
    keep = order[rank < episode_size]
    return items[keep], users[keep], np.minimum(counts, episode_size)


def _implicit_moments_reference(T, desc, items, users, counts):
    n_users, q = T.shape
    p = desc.shape[1]
    if p == 0:
        return np.zeros(0), np.zeros((0, 0)), np.zeros((0, 0)), np.zeros((q, 0))
    M = np.zeros((n_users, p))
    np.add.at(M, users, desc[items])
    M /= counts[:, None]
    dev = desc[items] - M[users]
    S = dev.T @ dev / max(int(users.size - n_users), 1)
    S = S + 1e-6 * max(float(np.trace(S)) / p, 1e-12) * np.eye(p)
    m_mean = M.mean(axis=0)
    C_raw = np.cov(M, rowvar=False) - float(np.mean(1.0 / counts)) * S
    lam, Q = scipy.linalg.eigh(ob._sym(C_raw), ob._sym(S))
    SQ = S @ Q
    C_mm = (SQ * np.maximum(lam, 0.0)) @ SQ.T
    Tc = T - T.mean(axis=0)
    C_tm = Tc.T @ (M - m_mean) / (n_users - 1)
    return m_mean, C_mm, S, C_tm


def _arrays(seed: int, n_users: int, n_items: int, max_count: int, zero_users: bool):
    """Random trained-model-like arrays: users with 1..max_count ratings (and some with 0 when
    ``zero_users``), the last fifth of the items never rated, coarse times (many ties)."""
    rng = np.random.default_rng(seed)
    d, r, k = 6, 2, 2
    U, _ = np.linalg.qr(rng.normal(size=(d, r)))
    W = rng.normal(0.2, 0.5, (n_users, r))
    B_idx = np.sort(np.stack([rng.choice(d, k, replace=False) for _ in range(n_users)]), axis=1)
    lrs = LRSModel(U, W, B_idx, rng.normal(0, 0.3, (n_users, k)))
    counts = rng.integers(0 if zero_users else 1, max_count + 1, n_users)
    counts[: n_users // 4] = 1  # many single-rating users
    rated = max(2, 4 * n_items // 5)
    items = np.concatenate(
        [rng.choice(rated, min(int(c), rated), replace=False) for c in counts]
    ).astype(np.int64)
    counts = np.minimum(counts, rated)
    indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    ts = rng.integers(0, 4, items.size).astype(np.float64)
    arrays = {
        "lrs": lrs,
        "item_features": rng.normal(0, 1.0, (n_items, d)),
        "item_bias": rng.normal(0, 0.3, n_items),
        "user_bias": rng.normal(0, 0.3, n_users),
        "global_mean": 3.0,
        "w_prior_mean": W.mean(axis=0),
        "w_prior_cov": np.cov(W, rowvar=False),
        "history_indptr": indptr,
        "history_items": items,
        "history_ratings": rng.integers(1, 6, items.size).astype(np.float64),
    }
    return arrays, ts


def _close(fast: ob.OnboardingPrior, slow: ob.OnboardingPrior) -> None:
    for name in ("t_mean", "t_cov", "item_desc", "m_mean", "C_mm", "S_within", "C_tm"):
        a, b = np.asarray(getattr(fast, name)), np.asarray(getattr(slow, name))
        assert a.shape == b.shape, name
        scale = max(float(np.max(np.abs(b))) if b.size else 0.0, 1.0)
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-10 * scale, err_msg=name)
    assert fast.noise_var == pytest.approx(slow.noise_var, rel=1e-10)
    assert fast.b_var == pytest.approx(slow.b_var, rel=1e-10)


@pytest.mark.parametrize(
    ("seed", "n_users", "n_items", "max_count", "zero_users", "episode"),
    [
        (0, 60, 40, 12, False, 5),
        (1, 200, 25, 30, False, 3),
        (2, 40, 200, 8, False, 1),
        (3, 80, 30, 15, True, 4),  # users without ratings: no implicit part
        (4, 150, 60, 40, False, 100),  # no user longer than the episode
    ],
)
@pytest.mark.parametrize("block_ratings", [None, 2, 5])
def test_estimate_prior_equals_the_slow_twin(
    monkeypatch, seed, n_users, n_items, max_count, zero_users, episode, block_ratings
):
    arrays, ts = _arrays(seed, n_users, n_items, max_count, zero_users)
    if block_ratings is not None:  # many small user blocks (8 × this many ratings each)
        monkeypatch.setattr(ob, "_BLOCK_RATINGS", block_ratings)
    fast_whole = ob.estimate_prior(**arrays)
    fast_first = ob.estimate_prior(**arrays, history_timestamps=ts, episode_size=episode)
    monkeypatch.setattr(ob, "_first_ratings", _first_ratings_reference)
    monkeypatch.setattr(ob, "_implicit_moments", _implicit_moments_reference)
    _close(fast_whole, ob.estimate_prior(**arrays))
    _close(fast_first, ob.estimate_prior(**arrays, history_timestamps=ts, episode_size=episode))
    if not zero_users:
        assert fast_first.S_within.shape == (8, 8)


def test_first_ratings_lexsort_fallback_equals_the_key_sort(monkeypatch):
    """A key that would not fit in 63 bits takes np.lexsort: same episodes."""
    arrays, ts = _arrays(5, 90, 50, 20, False)
    ts = ts * 1e6 + np.arange(ts.size)  # all times distinct
    fast = ob.estimate_prior(**arrays, history_timestamps=ts, episode_size=3)
    monkeypatch.setattr(ob, "_KEY_BITS", 1)
    _close(ob.estimate_prior(**arrays, history_timestamps=ts, episode_size=3), fast)
