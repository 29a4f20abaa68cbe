"""The posterior item biases (``item_bias_solve="posterior"``,
lrs_rec.privacy_items.wiener_item_bias): the vectorised posterior mean against its per-item
reference twin, the noise-free case equal to the ridge, the empirical-Bayes prior variance
recovering a planted one, and the option changing no release (same ledger, same noise draws:
post-processing of the released S̃, Ñ only)."""

from __future__ import annotations

import numpy as np
import pytest
from lrs_rec.training.private_train import PrivateConfig, fit_private
from private_ratings import small_ratings

from lrs_rec.privacy_items import (
    item_bias_prior_var,
    wiener_item_bias,
    wiener_item_bias_reference,
)


def test_posterior_item_bias_equals_the_per_item_reference():
    rng = np.random.default_rng(0)
    N = np.concatenate([rng.uniform(-50, 3000, 200), [0.0, -3.0]])
    S = N * rng.normal(0, 0.3, N.size) + 30 * rng.standard_normal(N.size)
    for noise_var in (0.0, 900.0):
        kw = dict(noise_var=noise_var, prior_var=0.1, ridge=5.0)
        fast = wiener_item_bias(S, N, **kw)
        np.testing.assert_allclose(fast, wiener_item_bias_reference(S, N, **kw), atol=1e-12)
        assert fast[-1] == fast[-2] == 0.0  # no (or a negative) released count: the prior mean


def test_posterior_item_bias_without_noise_is_the_ridge_and_shrinks_rare_items_more():
    N = np.array([10.0, 100.0, 1000.0, 10000.0])
    S = 0.5 * N
    np.testing.assert_allclose(
        wiener_item_bias(S, N, noise_var=0.0, prior_var=0.1, ridge=5.0), S / (N + 5.0)
    )
    noisy = wiener_item_bias(S, N, noise_var=900.0, prior_var=0.1, ridge=5.0) / 0.5
    assert np.all(np.diff(noisy) > 0) and noisy[-1] > 0.99 and noisy[0] < 0.05


def test_empirical_bayes_prior_variance_recovers_a_planted_one():
    rng = np.random.default_rng(1)
    n_items, tau2, sigma = 20_000, 0.1, 30.0
    N = rng.pareto(1.2, n_items) * 200 + 100
    c = rng.normal(0, np.sqrt(tau2), n_items)
    S = N * c + sigma * rng.standard_normal(n_items)
    Nn = N + 70 * rng.standard_normal(n_items)
    est = item_bias_prior_var(S, Nn, noise_var=sigma**2)
    assert est == pytest.approx(tau2, rel=0.1)
    # too few well-determined items (small data): the public fallback
    assert item_bias_prior_var(S[:5], Nn[:5], noise_var=sigma**2, fallback=0.25) == 0.25


@pytest.mark.parametrize("prior_var", [None, 0.25])
def test_posterior_item_bias_changes_no_release_only_the_solve(prior_var):
    u, i, r, nu, ni = small_ratings()
    fits = {}
    for solve in ("ratio", "posterior"):
        cfg = PrivateConfig.for_data(
            u, n_items=ni, epsilon=1.0, random_state=4, item_bias_solve=solve,
            item_bias_prior_var=prior_var,
        )  # fmt: skip
        fits[solve] = fit_private(
            u, i, r, n_users=nu, n_items=ni, rating_min=1.0, rating_max=5.0, config=cfg,
            report_pld=False,
        )  # fmt: skip
    a, b = fits["ratio"].privacy, fits["posterior"].privacy
    assert a is not None and b is not None
    assert a["events"] == b["events"] and a["sensitivities"] == b["sensitivities"]
    assert a["epsilon"] == b["epsilon"]
    assert fits["ratio"].global_mean == fits["posterior"].global_mean  # same noise draws
    assert not np.allclose(fits["ratio"].item_bias, fits["posterior"].item_bias)
    assert np.all(np.isfinite(fits["posterior"].item_bias))


def test_bad_item_bias_options_are_rejected():
    with pytest.raises(ValueError, match="item_bias_solve"):
        PrivateConfig(item_bias_solve="median")
    with pytest.raises(ValueError, match="item_bias_prior_var"):
        PrivateConfig(item_bias_prior_var=0.0)
