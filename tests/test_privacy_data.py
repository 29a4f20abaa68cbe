"""Private training's data-touching steps behind ``training.private_data.PrivateData``: the refactor
kept ``fit_private`` bit-identical, and every release is a sum over users — users cut into
partitions, each computing its part, give the same ledger and the same model (the basis of the Dask
engine's private training)."""

from __future__ import annotations

import itertools
from dataclasses import replace

import numpy as np
import pytest
from lrs_rec.training.private_data import LocalPrivateData
from lrs_rec.training.private_train import PrivateConfig, fit_private, release
from private_ratings import small_ratings


def _ratings(seed: int = 0):
    return small_ratings(seed, n_users=120, per_user=(2, 14))


class _Partitioned:
    """``PrivateData`` over users cut into ranges of consecutive indices, each a ``LocalPrivateData``
    of its own users (local indices, their global ids): statistics added up, per-user steps per
    part — what each Dask partition does."""

    def __init__(self, u, i, r, n_items, bounds, F=None):
        self.parts = []
        for lo, hi in itertools.pairwise(bounds):
            sel = (u >= lo) & (u < hi)
            ids = np.arange(lo, hi).astype(str)
            part = LocalPrivateData(
                u[sel] - lo, i[sel], r[sel], n_users=hi - lo, n_items=n_items, F=F, user_ids=ids
            )
            self.parts.append(part)

    def __getattr__(self, name):
        def call(*args):
            out = [getattr(p, name)(*args) for p in self.parts]
            if out[0] is None:
                return None
            if isinstance(out[0], tuple):
                return tuple(sum(x[j] for x in out) for j in range(len(out[0])))
            return sum(out)

        return call


CONFIGS = {
    "for_data": {},
    "ridge_random_start": {
        "u_solve": "ridge",
        "u_init": "random",
        "u_w_sphere": False,
        "u_carry": False,
    },
    "item_weights_below_one": {"u_item_snr": 1e-3},  # knee ≪ counts: c_i < 1 for most items
    "min_support": {"u_min_support": 3.0},
    # the random selections (keyed draws: the same on every partition of the users)
    "blocks_random": {"u_step_gram": "blocks", "u_select": "random", "u_item_snr": 0.0},
    "population_random": {"u_select": "random", "u_item_snr": 0.0},
    "population_popular": {"u_select": "popular", "u_item_snr": 0.0},
    "plugin": {"features": "plugin"},
}


def _config(name: str, u: np.ndarray, ni: int) -> tuple[PrivateConfig, np.ndarray | None]:
    if name == "plugin":  # the plug-in defaults: ≤ m random samples per user (m = 5 < most n_u)
        F = np.random.default_rng(5).random((ni, 6))
        cfg = PrivateConfig(
            epsilon=4.0, features="plugin", rank=3, sparsity=2, max_samples_per_user=5,
            random_state=11,
        )  # fmt: skip
        return cfg, F
    cfg = PrivateConfig.for_data(u, n_items=ni, epsilon=4.0, random_state=11, **CONFIGS[name])
    if cfg.u_select != "weighted":
        cfg = replace(cfg, max_samples_per_user=5)  # most users have more: the cap chooses
    return cfg, None


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_partitioned_statistics_give_the_local_fit(name):
    u, i, r, nu, ni = _ratings()
    cfg, F = _config(name, u, ni)
    local = fit_private(
        u, i, r, n_users=nu, n_items=ni, rating_min=1.0, rating_max=5.0, config=cfg,
        item_features=F, report_pld=False,
    )  # fmt: skip
    Fc = None if F is None else local.item_features
    data = _Partitioned(u, i, r, ni, [0, 37, 80, nu], Fc)
    rel = release(data, cfg, Fc, n_items=ni, rating_min=1.0, rating_max=5.0, report_pld=False)
    assert rel.privacy == local.privacy  # the same events, noise multipliers and ε
    assert rel.global_mean == pytest.approx(local.global_mean, abs=1e-12)
    np.testing.assert_allclose(rel.item_bias, local.item_bias, atol=1e-10)
    np.testing.assert_allclose(rel.U, local.lrs.U, atol=1e-8)
    np.testing.assert_allclose(rel.w_prior_mean, local.w_prior_mean, atol=1e-8)
    np.testing.assert_allclose(rel.w_prior_cov, local.w_prior_cov, atol=1e-8)
    W = np.concatenate([p.user_values(0).W for p in data.parts])
    c = np.concatenate([p.user_values(0).user_bias for p in data.parts])
    np.testing.assert_allclose(W, local.lrs.W, atol=1e-8)
    np.testing.assert_allclose(c, local.user_bias, atol=1e-10)
    if cfg.u_select != "weighted":  # the partitions chose the local samples: ≤ m, not all
        chosen = sum(p.uk.size for p in data.parts)
        assert chosen < u.size and np.bincount(np.concatenate(
            [p.uk + lo for p, lo in zip(data.parts, (0, 37, 80), strict=True)]
        )).max() <= 5  # fmt: skip
    sse, n = data.squared_error(rel.global_mean, rel.item_bias, rel.U, 1.0, 5.0)
    pred = local.predict(u, i, 1.0, 5.0)
    assert n == u.size
    assert sse == pytest.approx(float(np.sum((pred - r) ** 2)), rel=1e-10)


# fit_private before the PrivateData refactor (main 1c7531e), same data and configs: train RMSE.
# "blocks" and "plugin" choose ≤ m random samples per user for the U-step: re-pinned when that
# choice became keyed draws (lrs_rec.privacy.cap_samples_by_key) instead of one permutation of all
# ratings — with the old permutation put back, the code still gives 0.8621211867029268 and
# 0.9202562934246789, the 1c7531e values. "for_data" (the weighted selection) draws nothing.
PINNED_RMSE = {
    "blocks": 0.8539987216695497,
    "for_data": 1.0263945305624453,
    "plugin": 0.9179847712523496,
}


def _pinned_config(name: str, u: np.ndarray, ni: int) -> tuple[PrivateConfig, np.ndarray | None]:
    if name == "for_data":
        # the for_data defaults of 1c7531e (item weights, carried posterior, L = 3, PLD, the posterior
        # item bias and the final step's released w prior came later)
        old = {"u_item_snr": 0.0, "u_carry": False, "n_iters": 2, "accountant": "rdp"}
        old |= {"item_bias_solve": "ratio", "item_bias_prior_var": 0.25, "final_w_prior": False}
        return PrivateConfig.for_data(u, n_items=ni, epsilon=2.0, random_state=3, **old), None
    if name == "blocks":
        return PrivateConfig(epsilon=1.0, rank=2, sparsity=2, random_state=4), None
    F = np.random.default_rng(5).random((ni, 6))
    return PrivateConfig(epsilon=1.0, features="plugin", rank=3, sparsity=2, random_state=4), F


@pytest.mark.parametrize("name", sorted(PINNED_RMSE))
def test_fit_private_is_unchanged_by_the_data_interface(name):
    u, i, r, nu, ni = _ratings(3)
    cfg, F = _pinned_config(name, u, ni)
    fit = fit_private(
        u, i, r, n_users=nu, n_items=ni, rating_min=1.0, rating_max=5.0, config=cfg,
        item_features=F, report_pld=False,
    )  # fmt: skip
    rmse = float(np.sqrt(np.mean((fit.predict(u, i, 1.0, 5.0) - r) ** 2)))
    assert rmse == pytest.approx(PINNED_RMSE[name], rel=1e-12)
