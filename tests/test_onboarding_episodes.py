"""Episode moments: the rated-item conditioning learned on trained users' FIRST ratings by time."""

from __future__ import annotations

import numpy as np
import pytest
from test_onboarding_core import _synthetic

from lrs_rec.onboarding import Onboarder, OnboardingConfig, estimate_prior, onboard_reference

E = 6  # episode size used below (the synthetic users have 10..29 ratings)


@pytest.fixture(scope="module")
def arrays() -> dict[str, object]:
    return _synthetic(seed=3)


@pytest.fixture(scope="module")
def timestamps(arrays) -> np.ndarray:
    n = np.asarray(arrays["history_items"]).size
    # coarse times so that ties (broken by item index) occur
    return np.random.default_rng(7).integers(0, 5, n).astype(np.float64)


def _first_items_by_time(arrays, timestamps, e):
    """Plain Python: each user's first e items, sorted by (timestamp, item index)."""
    indptr = np.asarray(arrays["history_indptr"])
    items = np.asarray(arrays["history_items"])
    out = []
    for u in range(indptr.size - 1):
        pairs = sorted(
            (float(timestamps[j]), int(items[j])) for j in range(indptr[u], indptr[u + 1])
        )
        out.append([i for _, i in pairs[:e]])
    return out


def test_episode_moments_equal_the_plain_computation(arrays, timestamps):
    prior = estimate_prior(**arrays, history_timestamps=timestamps, episode_size=E)  # type: ignore[arg-type]
    firsts = _first_items_by_time(arrays, timestamps, E)
    desc = prior.item_desc
    M = np.array([desc[f].mean(axis=0) for f in firsts])
    lrs = arrays["lrs"]
    T = np.column_stack([arrays["user_bias"], lrs.W])  # type: ignore[attr-defined]
    np.testing.assert_allclose(prior.m_mean, M.mean(axis=0), rtol=1e-10, atol=1e-12)
    C_tm = (T - T.mean(axis=0)).T @ (M - M.mean(axis=0)) / (len(firsts) - 1)
    np.testing.assert_allclose(prior.C_tm, C_tm, rtol=1e-10, atol=1e-12)
    dev = np.vstack([desc[f] - desc[f].mean(axis=0) for f in firsts])
    S = dev.T @ dev / (dev.shape[0] - len(firsts))
    p = S.shape[0]
    S += 1e-6 * np.trace(S) / p * np.eye(p)
    np.testing.assert_allclose(prior.S_within, S, rtol=1e-10, atol=1e-12)
    # the rest of the prior does not depend on the episodes
    whole = estimate_prior(**arrays)  # type: ignore[arg-type]
    np.testing.assert_array_equal(prior.t_cov, whole.t_cov)
    assert prior.noise_var == whole.noise_var and prior.b_var == whole.b_var
    np.testing.assert_array_equal(prior.item_desc, whole.item_desc)
    assert not np.allclose(prior.C_tm, whole.C_tm)


def test_episodes_longer_than_every_history_are_the_whole_history(arrays, timestamps):
    whole = estimate_prior(**arrays)  # type: ignore[arg-type]
    long = estimate_prior(**arrays, history_timestamps=timestamps, episode_size=1000)  # type: ignore[arg-type]
    for name in ("m_mean", "C_mm", "S_within", "C_tm"):
        # same numbers summed in another order
        np.testing.assert_allclose(
            getattr(long, name), getattr(whole, name), rtol=1e-10, atol=1e-14
        )


@pytest.mark.parametrize("n", [1, 4, 12])
def test_fast_fit_equals_reference_with_an_episode_prior(arrays, timestamps, n):
    onb = Onboarder.from_arrays(
        **arrays,  # type: ignore[arg-type]
        rating_min=-100.0,
        rating_max=100.0,
        config=OnboardingConfig(sparse_min_ratings=3, support_z=0.0),
        history_timestamps=timestamps,
    )
    rng = np.random.default_rng(20 + n)
    items = rng.choice(onb.n_items, n, replace=False)
    ratings = rng.integers(1, 6, n).astype(float)
    fast, ref = onb.fit(items, ratings), onboard_reference(onb, items, ratings)
    np.testing.assert_array_equal(fast.b_idx, ref.b_idx)
    np.testing.assert_allclose(fast.w, ref.w, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(fast.b_val, ref.b_val, rtol=1e-8, atol=1e-10)
    assert fast.user_bias == pytest.approx(ref.user_bias, rel=1e-8, abs=1e-10)


@pytest.mark.parametrize(
    "ts, size, match",
    [
        (np.zeros(3), 20, "history_timestamps must be finite and match"),
        (None, 0, "episode_size"),
        ("nan", 20, "history_timestamps must be finite"),
    ],
)
def test_bad_timestamps_are_a_clear_error(arrays, timestamps, ts, size, match):
    if ts is None:
        ts = timestamps
    elif isinstance(ts, str):
        ts = timestamps.copy()
        ts[0] = np.nan
    with pytest.raises(ValueError, match=match):
        estimate_prior(**arrays, history_timestamps=ts, episode_size=size)  # type: ignore[arg-type]
