"""Built-in sample rating data, generated on the fly from an LRS ground truth (no files shipped).

Realistic in the ways that matter for lrs-rec: skewed user activity (log-normal, a long tail of users
with a handful of ratings), Zipf-like item popularity, user and item biases, and ratings on a 1–5 integer
scale generated as ``round(μ + c_u + c_i + ⟨x_i, θ_u⟩ + noise)`` with θ_u = U·w_u + b_u (k-sparse b_u).

    rows = make_sample_ratings(500, 300, random_state=0)     # [(user, item, rating, timestamp), ...]
    path = write_sample_ratings("sample.csv", rows)          # readable by training.loaders
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

Row = tuple[str, str, float, int]


@dataclass(frozen=True)
class SampleTruth:
    """The ground truth the sample ratings were drawn from (for tests and demos)."""

    item_features: np.ndarray  # (n_items, d)
    U: np.ndarray  # (d, r)
    W: np.ndarray  # (n_users, r)
    B: np.ndarray  # (n_users, d), k-sparse rows
    user_bias: np.ndarray
    item_bias: np.ndarray
    global_mean: float


def make_sample_data(
    n_users: int = 500,
    n_items: int = 300,
    *,
    random_state: int | np.random.Generator = 0,
    d: int = 16,
    rank: int = 4,
    sparsity: int = 2,
    mean_ratings_per_user: float = 30.0,
    noise: float = 0.5,
) -> tuple[list[Row], SampleTruth]:
    """Ratings (user id, item id, rating 1–5, unix timestamp) and their ground truth."""
    if n_users < 1 or n_items < 2:
        raise ValueError(f"need n_users >= 1 and n_items >= 2, got {n_users}, {n_items}")
    if not 0 <= sparsity <= d or not 1 <= rank <= d:
        raise ValueError(f"need 1 <= rank <= d and 0 <= sparsity <= d (d={d})")
    rng = np.random.default_rng(random_state)
    X = rng.normal(0.0, 1.0 / np.sqrt(d), (n_items, d))
    U, _ = np.linalg.qr(rng.normal(size=(d, rank)))
    W = rng.normal(0.0, 1.0, (n_users, rank)) + rng.normal(0.0, 0.5, rank)
    B = np.zeros((n_users, d))
    for u in range(n_users):
        B[u, rng.choice(d, size=sparsity, replace=False)] = rng.normal(0.0, 0.8, sparsity)
    theta = W @ U.T + B
    c_u = rng.normal(0.0, 0.35, n_users)
    popularity = 1.0 / np.arange(1, n_items + 1) ** 1.0
    popularity = popularity[rng.permutation(n_items)]
    popularity /= popularity.sum()
    # popular items are rated a little higher, as in real logs
    c_i = (
        rng.normal(0.0, 0.35, n_items) + 0.3 * (np.log(popularity) - np.log(popularity).mean()) / 3
    )
    mu = 3.55
    sigma = 1.0
    counts = rng.lognormal(np.log(mean_ratings_per_user) - sigma**2 / 2, sigma, n_users)
    counts = np.clip(np.round(counts), 3, n_items).astype(int)
    rows: list[Row] = []
    t0 = 1_600_000_000
    for u in range(n_users):
        its = rng.choice(n_items, size=counts[u], replace=False, p=popularity)
        raw = mu + c_u[u] + c_i[its] + X[its] @ theta[u] + rng.normal(0.0, noise, its.size)
        ratings = np.clip(np.round(raw), 1, 5)
        times = t0 + np.sort(rng.integers(0, 86_400 * 365, its.size))
        rows.extend(
            (f"u{u + 1}", f"i{i + 1}", float(r), int(t))
            for i, r, t in zip(its, ratings, times, strict=True)
        )
    truth = SampleTruth(X, U, W, B, c_u, c_i, mu)
    return rows, truth


def make_sample_ratings(
    n_users: int = 500, n_items: int = 300, *, random_state: int | np.random.Generator = 0
) -> list[Row]:
    """Sample ratings as rows ``(user_id, item_id, rating, timestamp)`` (see :func:`make_sample_data`)."""
    return make_sample_data(n_users, n_items, random_state=random_state)[0]


def write_sample_ratings(
    path: str | os.PathLike[str], rows: list[Row] | None = None, *, fmt: str = "csv"
) -> Path:
    """Write rows as ``csv`` (header user,item,rating,timestamp), ``ml-100k`` (tab-separated, no header,
    integer ids required) or ``parquet``; returns the path. ``rows=None`` writes the default sample."""
    rows = make_sample_ratings() if rows is None else rows
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "csv":
        with open(p, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["user", "item", "rating", "timestamp"])
            w.writerows(rows)
    elif fmt == "ml-100k":
        with open(p, "w") as f:
            for u, i, r, t in rows:
                f.write(f"{u.lstrip('ui')}\t{i.lstrip('ui')}\t{int(r)}\t{t}\n")
    elif fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        cols: list[tuple[object, ...]] = list(zip(*rows, strict=True)) if rows else [(), (), (), ()]
        table = pa.table(
            {
                "user": pa.array(cols[0], pa.string()),
                "item": pa.array(cols[1], pa.string()),
                "rating": pa.array(cols[2], pa.float64()),
                "timestamp": pa.array(cols[3], pa.int64()),
            }
        )
        pq.write_table(table, p)
    else:
        raise ValueError(f"fmt must be csv, ml-100k or parquet, got {fmt!r}")
    return p
