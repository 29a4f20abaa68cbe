"""Empirical-Bayes priors from released values (post-processing, no new release):
``u_prior_eb`` (lrs_rec.privacy_items.eb_row_prior / carried_chain: the rows' prior covariance by EM
from a released U-step) and ``u_step_w_prior`` (the released M̂'s shape as the precision shape of
the user steps' prior on w_u). The chain with the public isotropic prior is the trainer's carried
posterior; EM recovers a planted anisotropic row covariance; the options change no release."""

from __future__ import annotations

import numpy as np
import pytest
from lrs_rec.training.private_train import PrivateConfig
from private_ratings import fit_without_and_with, small_ratings

from lrs_rec.privacy_items import (
    carried_chain,
    carried_item_rows,
    drifted_precision,
    eb_row_prior,
)


def _release(rng, U, counts, M, noise_sd):
    return counts[:, None] * (U @ M.T) + noise_sd * rng.standard_normal(U.shape)


def test_chain_with_the_isotropic_public_prior_is_the_trainers_carried_posterior():
    rng = np.random.default_rng(0)
    n, r, pv, drift = 40, 3, 0.3, 0.25
    U = rng.normal(0, np.sqrt(pv), (n, r))
    releases = []
    for _ in range(3):
        B = rng.standard_normal((r, r))
        M = B @ B.T / np.trace(B @ B.T)
        counts = rng.uniform(-5, 500, n)
        releases.append((_release(rng, U, counts, M, 20.0), counts, M))
    kw = dict(noise_var=400.0, ridge=5.0)
    carried = None
    for V, counts, M in releases:  # the loop of training.private_train.release (u_carry)
        prior = {} if carried is None else {
            "prior_mean": carried[0], "prior_prec": drifted_precision(carried[1], drift * pv),
        }  # fmt: skip
        carried = carried_item_rows(V, counts, M, prior_var=pv, **kw, **prior)
    mean, prec = carried_chain(releases, prior_var=pv, prior_cov=pv * np.eye(r), drift=drift, **kw)
    np.testing.assert_allclose(mean, carried[0], atol=1e-9)
    np.testing.assert_allclose(prec, carried[1], rtol=1e-9, atol=1e-9)


def test_em_recovers_a_planted_anisotropic_row_covariance():
    rng = np.random.default_rng(1)
    n, r = 4000, 4
    true = np.diag([1.0, 0.5, 0.05, 0.01])
    U = rng.multivariate_normal(np.zeros(r), true, n)
    M = np.eye(r) / r
    counts = rng.pareto(1.2, n) * 300 + 200
    V = _release(rng, U, counts, M, 10.0)
    S = eb_row_prior((V, counts, M), noise_var=100.0, ridge=1e-6, prior_var=0.3, n_iter=200)
    ev = np.sort(np.linalg.eigvalsh(S))[::-1]
    np.testing.assert_allclose(ev[:2], [1.0, 0.5], rtol=0.1)
    assert ev[2] < 0.1 and ev[3] < 0.05  # the weak directions get a small prior variance


@pytest.mark.parametrize("option", ["u_prior_eb", "u_step_w_prior"])
def test_eb_options_change_no_release_event(option):
    a, b = fit_without_and_with(small_ratings(), 6, **{option: True})
    assert a.privacy is not None and b.privacy is not None
    assert a.privacy["events"] == b.privacy["events"]
    np.testing.assert_array_equal(a.item_bias, b.item_bias)  # released before the U-steps
    assert a.global_mean == b.global_mean
    assert not np.allclose(a.lrs.U, b.lrs.U)  # the solve (or the users' ŵ) changed


def test_eb_options_need_their_mode():
    with pytest.raises(ValueError, match="u_prior_eb"):
        PrivateConfig(u_prior_eb=True)
    with pytest.raises(ValueError, match="u_step_w_prior"):
        PrivateConfig(u_step_w_prior=True)
