"""The final user step of private training (``final_gls``, ``final_w_prior``,
lrs_rec.privacy_items.final_user_step): the blockwise fast path against its per-user reference
twin, with unit weights and the public prior equal to the engine's one-hot user step, each user's
values depending on that user's own ratings only, and the options adding no release."""

from __future__ import annotations

import numpy as np
import pytest
from lrs_rec.training.private_train import PrivateConfig
from private_ratings import fit_without_and_with, small_ratings

from lrs_rec.engine import onehot
from lrs_rec.engine.steps import Samples, StepParams, UserPrior
from lrs_rec.privacy_items import final_user_step, final_user_step_reference


def _data(seed: int, n_users: int = 60, n_items: int = 40, r: int = 3):
    rng = np.random.default_rng(seed)
    users, items = [], []
    for u in range(n_users):
        if u % 13 == 5:  # a few users without ratings
            continue
        its = rng.choice(n_items, size=int(rng.integers(1, 15)), replace=False)
        users += [u] * len(its)
        items += its.tolist()
    u, i = np.array(users, np.int64), np.array(items, np.int64)
    t = rng.normal(0, 1, u.size)
    U = rng.normal(0, 0.7, (n_items, r))
    W = rng.normal(0, 0.5, (n_users, r))
    c = rng.normal(0, 0.3, n_users)
    B = rng.normal(0, 0.3, (n_items, r, r))
    cov = np.einsum("nab,ncb->nac", B, B) + 0.01 * np.eye(r)
    prec = np.linalg.inv(np.cov(rng.normal(size=(50, r)), rowvar=False))
    return u, i, t, n_users, U, W, c, cov, rng.normal(0, 0.1, r), prec


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("gls", [False, True])
@pytest.mark.parametrize("with_prior", [False, True])
def test_final_user_step_equals_the_per_user_reference(seed, gls, with_prior, monkeypatch):
    u, i, t, nu, U, W, c, cov, m, P = _data(seed)
    kw = dict(
        reg_w=5.0, reg_bias=5.0, row_cov=cov if gls else None,
        prior_mean=m if with_prior else None, prior_prec=P if with_prior else None,
    )  # fmt: skip
    import lrs_rec.engine.steps as steps

    monkeypatch.setattr(steps, "sample_budget", lambda width: 7)  # many blocks of whole users
    fast = final_user_step(u, i, t, nu, U, W, c, **kw)
    ref = final_user_step_reference(u, i, t, nu, U, W, c, **kw)
    np.testing.assert_allclose(fast[0], ref[0], atol=1e-10)
    np.testing.assert_allclose(fast[1], ref[1], atol=1e-10)


def test_unit_weights_and_public_prior_equal_the_engine_one_hot_user_step():
    u, i, t, nu, U, W, c, *_ = _data(7)
    state = onehot.OneHotState(
        0.0, np.zeros(nu), np.zeros(U.shape[0]), U, np.zeros_like(W),
        np.zeros((nu, 0), np.int64), np.zeros((nu, 0)),
    )  # fmt: skip
    p = StepParams(
        k=0, per_user_w=True, user_bias=True, reg_w=5.0, reg_b=20.0, reg_bias=5.0,
        population_prior=False, conditional_prior=False, n_inner=2,
    )  # fmt: skip
    r = U.shape[1]
    onehot.user_step(state, Samples(u, i, t), p, prior=UserPrior(np.zeros(r), np.eye(r)))
    c2, W2 = final_user_step(u, i, t, nu, U, W, c, reg_w=5.0, reg_bias=5.0)
    np.testing.assert_allclose(c2, state.user_bias, atol=1e-10)
    np.testing.assert_allclose(W2, state.W, atol=1e-10)


def test_each_users_final_values_depend_on_their_own_ratings_only():
    u, i, t, nu, U, W, c, cov, m, P = _data(3)
    kw = dict(reg_w=5.0, reg_bias=5.0, row_cov=cov, prior_mean=m, prior_prec=P)
    c_all, W_all = final_user_step(u, i, t, nu, U, W, c, **kw)
    for gone in np.unique(u)[:10]:
        keep = u != gone
        c_n, W_n = final_user_step(u[keep], i[keep], t[keep], nu, U, W, c, **kw)
        others = np.arange(nu) != gone
        np.testing.assert_allclose(c_n[others], c_all[others], atol=1e-12)
        np.testing.assert_allclose(W_n[others], W_all[others], atol=1e-12)


def test_final_step_options_add_no_release_and_change_only_the_per_user_values():
    a, b = fit_without_and_with(small_ratings(), 2, final_gls=True, final_w_prior=True)
    assert a.privacy is not None and b.privacy is not None
    assert a.privacy["events"] == b.privacy["events"]
    for name in ("item_bias", "w_prior_mean", "w_prior_cov"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    np.testing.assert_array_equal(a.lrs.U, b.lrs.U)
    assert not np.allclose(a.lrs.W, b.lrs.W)


def test_final_gls_needs_the_carried_posterior():
    with pytest.raises(ValueError, match="final_gls"):
        PrivateConfig(final_gls=True)
