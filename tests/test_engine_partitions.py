"""The engine's additive statistics: a run split into user partitions (as the Dask engine splits
it) reduces to the same prior, U-step normal equations and item statistics as one partition, and
each partition's user step with the reduced prior equals the one-partition step on its users."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from lrs_rec.engine.b_rows import pairs_of_dense
from lrs_rec.engine.steps import (
    LRSState,
    Samples,
    StepParams,
    item_block_statistics,
    prior_statistics,
    squared_error,
    u_step_statistics,
    user_prior,
    user_step,
)

N_USERS, N_ITEMS, D, R, K = 60, 40, 6, 3, 2


def _problem(seed: int = 0) -> tuple[LRSState, Samples]:
    rng = np.random.default_rng(seed)
    n = 900
    users = rng.integers(0, N_USERS, n)
    items = rng.integers(0, N_ITEMS, n)
    ratings = rng.normal(size=n)
    U, _ = np.linalg.qr(rng.normal(size=(D, R)))
    B = np.zeros((N_USERS, D))
    B[np.arange(N_USERS), rng.integers(0, D, N_USERS)] = rng.normal(size=N_USERS)
    state = LRSState(
        0.1,
        rng.normal(size=N_USERS),
        rng.normal(size=N_ITEMS),
        rng.normal(size=(N_ITEMS, D)),
        U,
        rng.normal(size=(N_USERS, R)),
        *pairs_of_dense(B, K),
    )
    return state, Samples(users, items, ratings)


def _partition(state: LRSState, data: Samples, lo: int, hi: int) -> tuple[LRSState, Samples]:
    """Users lo..hi-1 re-indexed from 0, with the shared arrays (as a Dask worker holds them)."""
    keep = (data.users >= lo) & (data.users < hi)
    part = LRSState(
        state.global_mean,
        state.user_bias[lo:hi].copy(),
        state.item_bias,
        state.F,
        state.U,
        state.W[lo:hi].copy(),
        state.B_idx[lo:hi].copy(),
        state.B_val[lo:hi].copy(),
    )
    return part, Samples(data.users[keep] - lo, data.items[keep], data.ratings[keep])


CUTS = (0, 17, 41, N_USERS)
SPANS = list(itertools.pairwise(CUTS))  # three user partitions
PARAMS = StepParams(k=K, per_user_w=True, user_bias=True, reg_w=2.0, reg_b=3.0, reg_bias=1.0)


def test_prior_statistics_are_additive_over_user_partitions() -> None:
    state, data = _problem()
    whole = prior_statistics(state, data)
    parts = [prior_statistics(*_partition(state, data, a, b)) for a, b in SPANS]
    total = parts[0] + parts[1] + parts[2]
    for name in ("sw", "sww", "sz", "szz", "szw"):
        np.testing.assert_allclose(
            getattr(total, name), getattr(whole, name), rtol=1e-12, atol=1e-12
        )
    assert total.n == whole.n == N_USERS


@pytest.mark.parametrize("population_prior, conditional_prior", [(True, True), (False, False)])
def test_partitioned_user_step_with_the_reduced_prior_equals_the_whole_step(
    population_prior: bool, conditional_prior: bool
) -> None:
    from dataclasses import replace

    p = replace(PARAMS, population_prior=population_prior, conditional_prior=conditional_prior)
    state, data = _problem(1)
    parts = [_partition(state, data, a, b) for a, b in SPANS]
    stats = prior_statistics(*parts[0]) + prior_statistics(*parts[1]) + prior_statistics(*parts[2])
    from lrs_rec.engine.steps import UserPrior

    prior = UserPrior.from_statistics(
        stats, population_prior=population_prior, conditional_prior=conditional_prior
    )
    whole_prior = user_prior(state, data, p)
    np.testing.assert_allclose(prior.prec, whole_prior.prec, rtol=1e-10)
    user_step(state, data, p)
    for (a, b), (ps, pd) in zip(SPANS, parts, strict=True):
        user_step(ps, pd, p, prior=prior)
        np.testing.assert_allclose(ps.W, state.W[a:b], rtol=1e-9, atol=1e-10)
        np.testing.assert_allclose(ps.dense_b(), state.dense_b()[a:b], rtol=1e-9, atol=1e-10)
        np.testing.assert_allclose(ps.user_bias, state.user_bias[a:b], rtol=1e-9, atol=1e-10)
    assert state.B_idx.shape == (N_USERS, K)


def test_u_step_and_item_statistics_and_losses_are_additive() -> None:
    state, data = _problem(2)
    A, rhs = u_step_statistics(state, data)
    parts = [_partition(state, data, a, b) for a, b in SPANS]
    sums = [u_step_statistics(*part) for part in parts]
    np.testing.assert_allclose(sum(s[0] for s in sums), A, rtol=1e-11, atol=1e-11)
    np.testing.assert_allclose(sum(s[1] for s in sums), rhs, rtol=1e-11, atol=1e-11)

    lo, hi = 5, 23  # one item block
    sl = np.flatnonzero((data.items >= lo) & (data.items < hi))
    G, h = item_block_statistics(state, data, lo, hi, sl)
    Gs, hs = np.zeros_like(G), np.zeros_like(h)
    for ps, pd in parts:
        psl = np.flatnonzero((pd.items >= lo) & (pd.items < hi))
        g, hh = item_block_statistics(ps, pd, lo, hi, psl)
        Gs += g
        hs += hh
    np.testing.assert_allclose(Gs, G, rtol=1e-11, atol=1e-11)
    np.testing.assert_allclose(hs, h, rtol=1e-11, atol=1e-11)
    assert G[:, 0, 0].sum() == sl.size  # the bias column counts the ratings

    sse, n = squared_error(state, data, -3.0, 3.0)
    part_sse = [squared_error(ps, pd, -3.0, 3.0) for ps, pd in parts]
    assert n == sum(x[1] for x in part_sse) == len(data)
    assert sse == pytest.approx(sum(x[0] for x in part_sse), rel=1e-12)
