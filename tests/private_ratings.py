"""Small seeded rating logs for the private-training tests: per-item quality plus noise, rounded to
the 1–5 stars, each user rating a random set of items (how many: uniform in ``per_user``)."""

from __future__ import annotations

from typing import Any

import numpy as np


def small_ratings(
    seed: int = 0,
    *,
    n_users: int = 300,
    n_items: int = 30,
    per_user: tuple[int, int] = (3, 15),
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, int]:
    """``(users, items, ratings, n_users, n_items)``; ``per_user`` = (low, high) of numpy's
    ``integers`` (high excluded)."""
    rng = np.random.default_rng(seed)
    users: list[int] = []
    items: list[int] = []
    for u in range(n_users):
        its = rng.choice(n_items, size=int(rng.integers(*per_user)), replace=False)
        users += [u] * len(its)
        items += its.tolist()
    u, i = np.array(users), np.array(items)
    quality = rng.normal(0, 0.7, n_items)
    r = np.clip(np.round(3.5 + quality[i] + rng.normal(0, 0.8, u.size)), 1, 5)
    return u, i, r.astype(float), n_users, n_items


def fit_without_and_with(
    data: tuple[Any, ...], random_state: int, **options: bool
) -> tuple[Any, Any]:
    """``fit_private`` on ``data`` (:func:`small_ratings`) with ``PrivateConfig.for_data`` and the
    given boolean ``options`` off, then on (the same seed): the two fits."""
    from lrs_rec.training.private_train import PrivateConfig, fit_private

    u, i, r, nu, ni = data
    fits = []
    for on in (False, True):
        opts = {name: on and value for name, value in options.items()}
        cfg = PrivateConfig.for_data(u, n_items=ni, epsilon=1.0, random_state=random_state, **opts)
        fit = fit_private(
            u, i, r, n_users=nu, n_items=ni, rating_min=1.0, rating_max=5.0, config=cfg,
            report_pld=False,
        )  # fmt: skip
        fits.append(fit)
    return fits[0], fits[1]
