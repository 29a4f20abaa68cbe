"""Seeded synthetic explicit ratings at any scale: a planted *biased MF* (not LRS) log.

The shape of real logs that matters for scale: heavy-tailed user activity (log-normal, mean about 20
and median about 12 ratings per user), Pareto item popularity over 20k items, user and item biases,
and a rank-8 interaction term; ratings are ``clip(round(μ + c_u + c_i + ⟨p_u, q_i⟩ + noise), 1, 5)``.
Everything is vectorised (20M ratings in seconds) and drawn from one seed.

    log = make_biased_mf(100_000, random_state=0)         # arrays: users, items, ratings, timestamps
    train, test = log.split(0.1, random_state=0)          # a seeded 90/10 split of the rows
    write_csv(train, "train.csv")                         # readable by training.loaders
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class RatingLog:
    """Dense 0-based ids (int32), integer 1..5 ratings (float32) and unix times (int64)."""

    users: np.ndarray
    items: np.ndarray
    ratings: np.ndarray
    timestamps: np.ndarray
    n_users: int
    n_items: int

    def __len__(self) -> int:
        return int(self.ratings.size)

    def take(self, rows: np.ndarray) -> RatingLog:
        return RatingLog(
            self.users[rows],
            self.items[rows],
            self.ratings[rows],
            self.timestamps[rows],
            self.n_users,
            self.n_items,
        )

    def split(
        self, test_fraction: float, *, random_state: int | np.random.Generator = 0
    ) -> tuple[RatingLog, RatingLog]:
        """A seeded random split of the rows (train, test); row order is kept within each part."""
        rng = np.random.default_rng(random_state)
        test = rng.random(len(self)) < test_fraction
        return self.take(np.flatnonzero(~test)), self.take(np.flatnonzero(test))


def make_biased_mf(
    n_users: int,
    n_items: int = 20_000,
    *,
    random_state: int | np.random.Generator = 0,
    rank: int = 8,
    median_per_user: float = 12.0,
    mean_per_user: float = 21.0,
    pareto_shape: float = 1.2,
    noise: float = 0.5,
) -> RatingLog:
    """A planted biased-MF rating log (see the module docstring). Users are 0..n_users-1, all with
    at least one rating; (user, item) pairs are distinct (repeated draws of a pair are dropped)."""
    if n_users < 1 or n_items < 2 or rank < 1:
        raise ValueError(f"need n_users >= 1, n_items >= 2, rank >= 1; got {n_users}, {n_items}")
    if not 0 < median_per_user < mean_per_user:
        raise ValueError("need 0 < median_per_user < mean_per_user (a right-skewed activity)")
    rng = np.random.default_rng(random_state)
    # log-normal activity: median exp(m), mean exp(m + s²/2)
    s = float(np.sqrt(2.0 * np.log(mean_per_user / median_per_user)))
    counts = rng.lognormal(np.log(median_per_user), s, n_users)
    counts = np.clip(np.round(counts), 1, n_items // 2).astype(np.int64)
    # Pareto popularity, in a random order over the item ids
    weight = rng.pareto(pareto_shape, n_items) + 1.0
    cdf = np.cumsum(weight / weight.sum())
    cdf[-1] = 1.0
    users = np.repeat(np.arange(n_users, dtype=np.int32), counts.tolist())
    items = np.searchsorted(cdf, rng.random(users.size), side="right").astype(np.int32)
    key = users.astype(np.int64) * n_items + items
    _, first = np.unique(key, return_index=True)
    first.sort()
    users, items = users[first], items[first]
    # the planted model
    P = rng.normal(0.0, 1.0, (n_users, rank)).astype(np.float32)
    Q = rng.normal(0.0, 0.7 / np.sqrt(rank), (n_items, rank)).astype(np.float32)
    c_u = rng.normal(0.0, 0.4, n_users).astype(np.float32)
    c_i = rng.normal(0.0, 0.4, n_items).astype(np.float32)
    raw = np.empty(users.size, dtype=np.float32)
    step = 1 << 22
    for lo in range(0, users.size, step):  # bounded memory: no (N, rank) temporaries at once
        u, i = users[lo : lo + step], items[lo : lo + step]
        raw[lo : lo + step] = 3.6 + c_u[u] + c_i[i] + np.einsum("nr,nr->n", P[u], Q[i])
    raw += rng.normal(0.0, noise, users.size).astype(np.float32)
    ratings = np.clip(np.round(raw), 1.0, 5.0).astype(np.float32)
    times = 1_500_000_000 + rng.integers(0, 86_400 * 365 * 3, users.size, dtype=np.int64)
    return RatingLog(users, items, ratings, times, n_users, n_items)


def write_csv(log: RatingLog, path: str | os.PathLike[str], *, chunk: int = 1 << 20) -> Path:
    """``user,item,rating,timestamp`` with a header; ids written as ``u<k>`` / ``i<k>`` (strings,
    as real logs often have), ratings as integers. Written in chunks (bounded memory)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with open(p, "w", encoding="utf-8", newline="") as f:
        f.write("user,item,rating,timestamp\n")
        for lo in range(0, len(log), chunk):
            sl = slice(lo, lo + chunk)
            u = np.char.add("u", log.users[sl].astype(str))
            i = np.char.add("i", log.items[sl].astype(str))
            r = log.ratings[sl].astype(np.int64).astype(str)
            t = log.timestamps[sl].astype(str)
            rows = np.char.add(np.char.add(np.char.add(np.char.add(u, ","), i), ","), r)
            rows = np.char.add(np.char.add(rows, ","), t)
            f.write("\n".join(rows.tolist()))
            f.write("\n")
    return p
