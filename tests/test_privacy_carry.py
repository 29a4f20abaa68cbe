"""Combining the L noisy U-step releases (lrs_rec.privacy_items.carried_item_rows): the batched
Kalman update against its per-item reference twin, its first step against the one-release posterior,
and two releases combined being closer to the truth than the last one alone."""

from __future__ import annotations

import numpy as np

from lrs_rec.privacy_items import (
    carried_item_rows,
    carried_item_rows_reference,
    drifted_precision,
    wiener_item_rows,
)


def _release(rng, U, counts, M, noise_sd):
    return (counts[:, None] * (U @ M.T)) + noise_sd * rng.standard_normal(U.shape)


def test_first_step_equals_the_one_release_posterior():
    rng = np.random.default_rng(0)
    n, r = 30, 4
    V = 5 * rng.standard_normal((n, r))
    counts = rng.uniform(-5, 300, n)
    B = rng.standard_normal((r, r))
    M = B @ B.T / r
    kw = dict(noise_var=30.0, prior_var=0.4, ridge=3.0)
    mean, prec = carried_item_rows(V, counts, M, **kw)
    np.testing.assert_allclose(mean, wiener_item_rows(V, counts, M, **kw), atol=1e-10)
    assert prec.shape == (n, r, r)
    np.testing.assert_allclose(prec, np.transpose(prec, (0, 2, 1)), atol=1e-10)


def test_carried_update_equals_per_item_reference_solves():
    rng = np.random.default_rng(1)
    n, r = 25, 3
    V = 5 * rng.standard_normal((n, r))
    counts = rng.uniform(-3, 200, n)
    B = rng.standard_normal((r, r))
    M = B @ B.T / r
    M[0, 1] += 0.02  # a noisy release need not be symmetric
    m0 = rng.standard_normal((n, r))
    A = rng.standard_normal((n, r, r))
    P0 = np.einsum("nab,ncb->nac", A, A) + 0.5 * np.eye(r)
    kw = dict(noise_var=50.0, prior_var=0.3, ridge=2.0)
    fast, _ = carried_item_rows(V, counts, M, prior_mean=m0, prior_prec=P0, **kw)
    slow = carried_item_rows_reference(V, counts, M, prior_mean=m0, prior_prec=P0, **kw)
    np.testing.assert_allclose(fast, slow, atol=1e-9)


def test_drift_widens_the_prior_covariance():
    P = np.array([[[4.0, 1.0], [1.0, 2.0]]])
    out = drifted_precision(P, 0.5)
    np.testing.assert_allclose(np.linalg.inv(out), np.linalg.inv(P) + 0.5 * np.eye(2), atol=1e-12)
    np.testing.assert_array_equal(drifted_precision(P, 0.0), P)


def test_two_releases_combined_beat_the_last_one_alone():
    """Same target U in both steps: the carried posterior uses both releases' information."""
    rng = np.random.default_rng(2)
    n, r, prior_var, noise_sd = 4000, 4, 0.5, 20.0
    U = np.sqrt(prior_var) * rng.standard_normal((n, r))
    counts = rng.uniform(10, 400, n)
    M = np.eye(r) / r
    kw = dict(noise_var=noise_sd**2, prior_var=prior_var, ridge=1e-9)
    V1, V2 = (_release(rng, U, counts, M, noise_sd) for _ in range(2))
    m1, p1 = carried_item_rows(V1, counts, M, **kw)
    m2, _ = carried_item_rows(V2, counts, M, prior_mean=m1, prior_prec=p1, **kw)
    last = wiener_item_rows(V2, counts, M, **kw)
    err_carried = float(np.mean((m2 - U) ** 2))
    err_last = float(np.mean((last - U) ** 2))
    assert err_carried < 0.85 * err_last
