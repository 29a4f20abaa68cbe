"""Seeded rating logs with planted structure (bench/accuracy.py and the accuracy tests): planted biased MF or planted LRS, long-tailed
user activity, Pareto item popularity, and four rating scales.

A rating is a latent standardised score ``z = b_u + b_i + ⟨p_u, q_i⟩ + ε`` (biased MF) or
``z = b_u + b_i + ⟨f_i, U·w_u + b_u⟩ + ε`` (planted LRS, k-sparse b_u), mapped to the scale
(``center + spread·z``), rounded to the scale's step and clipped. Which (user, item) pairs are
observed: each user's count is log-normal around the median, items are drawn by a Pareto
popularity (optionally correlated with the item bias: popular items are liked more).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# name: (lo, hi, step (0 = continuous), center, spread)
SCALES = {
    "1-5": (1.0, 5.0, 1.0, 3.5, 1.0),
    "0.5-5": (0.5, 5.0, 0.5, 3.5, 1.0),
    "1-10": (1.0, 10.0, 1.0, 6.5, 2.0),
    "-10..10": (-10.0, 10.0, 0.0, 1.0, 4.5),
}


@dataclass(frozen=True)
class DataSpec:
    name: str
    kind: str  # "mf" (planted biased MF) or "lrs" (planted LRS)
    n_users: int
    n_items: int
    median_per_user: float
    scale: str
    pareto: float = 1.2  # item popularity ~ Pareto(shape): smaller = more skewed
    rank: int = 8
    noise: float = 0.8  # std of ε in standardised units
    popular_liked: float = 0.0  # correlation of log-popularity with the item bias
    seed: int = 0
    quick: bool = False  # part of the --quick subset

    def describe(self) -> str:
        how = (
            "planted LRS (d=32, r=8, k=4)"
            if self.kind == "lrs"
            else f"planted biased MF (rank {self.rank})"
        )
        skew = f", popularity ~ Pareto({self.pareto})" + (
            f" correlated {self.popular_liked} with item quality" if self.popular_liked else ""
        )
        return (
            f"{how}, {self.n_users} users, {self.n_items} items, median {self.median_per_user:g} "
            f"ratings/user, scale {self.scale}{skew}"
        )


def generate(spec: DataSpec) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(users, items, ratings) with distinct (user, item) pairs; deterministic in spec.seed."""
    rng = np.random.default_rng(spec.seed)
    n_u, n_i = spec.n_users, spec.n_items
    # observation: log-normal activity (σ = 1: long tail), Pareto item popularity
    counts = np.exp(rng.normal(np.log(spec.median_per_user), 1.0, n_u))
    counts = np.clip(np.round(counts), 2, max(2, n_i // 2)).astype(np.int64)
    pop = rng.pareto(spec.pareto, n_i) + 1.0
    item_bias = rng.normal(0.0, 0.5, n_i)
    if spec.popular_liked:
        lp = np.log(pop)
        lp = (lp - lp.mean()) / (lp.std() + 1e-12)
        c = spec.popular_liked
        item_bias = 0.5 * (c * lp + np.sqrt(1 - c * c) * item_bias / 0.5)
    cdf = np.cumsum(pop / pop.sum())
    # popularity-weighted draws with replacement, deduplicated; users short of their count draw
    # again (a few rounds: with a skewed popularity over few items some stay a little short)
    key = np.zeros(0, np.int64)
    for _ in range(6):
        have = np.bincount(key // n_i, minlength=n_u)
        deficit = np.maximum(counts - have, 0)
        if not deficit.any():
            break
        users = np.repeat(np.arange(n_u), 2 * deficit + 2)
        items = np.minimum(np.searchsorted(cdf, rng.random(users.size)), n_i - 1)
        key = np.unique(np.concatenate([key, users * n_i + items]))
    users, items = key // n_i, key % n_i
    order = np.lexsort((rng.random(users.size), users))  # a random subset of each user's items
    users, items = users[order], items[order]
    rank_in_user = np.arange(users.size) - np.searchsorted(users, users)
    keep = rank_in_user < counts[users]
    users, items = users[keep], items[keep]
    # signal in standardised units
    user_bias = rng.normal(0.0, 0.4, n_u)
    if spec.kind == "mf":
        P = rng.normal(0.0, 1.0, (n_u, spec.rank))
        Q = rng.normal(0.0, 0.7 / np.sqrt(spec.rank), (n_i, spec.rank))
        inter = np.einsum("nd,nd->n", P[users], Q[items])
    elif spec.kind == "lrs":
        d, r, k = 32, 8, 4
        U, _ = np.linalg.qr(rng.normal(size=(d, r)))
        W = rng.normal(0.0, 1.0, (n_u, r))
        B = np.zeros((n_u, d))
        idx = np.argsort(rng.random((n_u, d)), axis=1)[:, :k]
        np.put_along_axis(B, idx, rng.normal(0.0, 0.7, (n_u, k)), axis=1)
        theta = W @ U.T + B
        F = rng.normal(0.0, 0.7 / np.sqrt(r), (n_i, d))
        inter = np.einsum("nd,nd->n", F[items], theta[users])
    else:
        raise ValueError(f"kind must be mf or lrs, got {spec.kind!r}")
    z = user_bias[users] + item_bias[items] + inter + rng.normal(0.0, spec.noise, users.size)
    lo, hi, step, center, spread = SCALES[spec.scale]
    y = center + spread * z
    if step:
        y = np.round(y / step) * step
    y = np.clip(y, lo, hi)
    return users.astype(np.int64), items.astype(np.int64), y.astype(np.float64)


def split(n: int, test_fraction: float, seed: int) -> np.ndarray:
    """Boolean test mask: a seeded random 10 % of the rows."""
    return np.random.default_rng(seed + 1000).random(n) < test_fraction
