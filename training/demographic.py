"""Demographic tasks of the paper's MovieLens experiment (Sec. 3, Fig. 1a), without leakage.

* A **task** is a demographic group: one (gender, age group, occupation) combination
  (:func:`demographic_tasks`); ages in years are bucketed into ML-1M's groups (:func:`age_group`).
* **Split** (:func:`split_task_movies`): per task, a random 20 % of the movies rated by at least one of
  its users go to validation with all of that task's ratings of them; the rest is training.
* **Movie features** (:func:`fit_movie_embedding`): a rank-``dim`` factorisation of the *training*
  ratings, r_ui − μ ≈ ⟨p_u, q_i⟩ (ALS-WR, no biases), whose movie factors q_i are the embedding. With
  no bias terms a group's average rating of a movie is ≈ μ + ⟨p̄_group, q_i⟩: linear in q_i, which is
  the model class the methods fit. A movie without training ratings gets q_i = 0.
* A **sample** of a task is (q_i, average rating of movie i by the task's users) (:func:`task_samples`);
  targets are centred by the training mean μ (one scalar), which every prediction adds back.

:func:`make_task_problem` chains the three steps; applied to its own training ratings with another
seed it gives the inner split used to tune hyper-parameters, with an embedding fitted without the
inner validation ratings either.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from lrs_rec.training.movielens import MovieLens, Users

from lrs_rec.engine.grouped import grouped_gram, grouped_sum

AGE_GROUPS: tuple[tuple[int, str], ...] = (
    (1, "under 18"),
    (18, "18-24"),
    (25, "25-34"),
    (35, "35-44"),
    (45, "45-49"),
    (50, "50-55"),
    (56, "56+"),
)
"""ML-1M's age groups as (lowest age, label); ML-1M's age codes are these lowest ages."""


def age_group(age: int) -> str:
    """The ML-1M age group of an age in years (an ML-1M age code maps to its own group)."""
    if age < 1:
        raise ValueError(f"age must be positive, got {age!r}")
    label = AGE_GROUPS[0][1]
    for low, name in AGE_GROUPS:
        if age >= low:
            label = name
    return label


@dataclass(frozen=True, eq=False)
class DemographicTasks:
    """``labels[t]`` = (gender, age group, occupation) of task t (sorted); ``of_user[u]`` = task of
    the u-th user of the :class:`Users` table."""

    labels: tuple[tuple[str, str, str], ...]
    of_user: np.ndarray  # (n_users,) int64

    @property
    def n_tasks(self) -> int:
        return len(self.labels)


def demographic_tasks(users: Users) -> DemographicTasks:
    """One task per distinct (gender, age group, occupation) of the users."""
    keys = [
        (str(g), age_group(int(a)), str(o))
        for g, a, o in zip(users.gender, users.age, users.occupation, strict=True)
    ]
    labels = tuple(sorted(set(keys)))
    index = {k: t for t, k in enumerate(labels)}
    return DemographicTasks(labels, np.array([index[k] for k in keys], dtype=np.int64))


@dataclass(frozen=True, eq=False)
class TaskRatings:
    """Ratings with dense indices: ``task[j]`` is the task of ``user[j]``."""

    task: np.ndarray  # (N,) int64
    user: np.ndarray  # (N,) int64
    movie: np.ndarray  # (N,) int64
    rating: np.ndarray  # (N,) float64
    n_tasks: int
    n_users: int
    n_movies: int

    def subset(self, mask: np.ndarray) -> TaskRatings:
        return TaskRatings(
            self.task[mask],
            self.user[mask],
            self.movie[mask],
            self.rating[mask],
            self.n_tasks,
            self.n_users,
            self.n_movies,
        )


def task_ratings(ml: MovieLens, tasks: DemographicTasks) -> TaskRatings:
    """The dataset's ratings indexed by user / movie position and tagged with the user's task."""
    user_pos = {u: i for i, u in enumerate(ml.users.ids.tolist())}
    movie_pos = {m: i for i, m in enumerate(ml.movies.ids.tolist())}
    user = np.array([user_pos[u] for u in ml.ratings.users.tolist()], dtype=np.int64)
    movie = np.array([movie_pos[m] for m in ml.ratings.items.tolist()], dtype=np.int64)
    return TaskRatings(
        task=tasks.of_user[user],
        user=user,
        movie=movie,
        rating=np.asarray(ml.ratings.ratings, dtype=np.float64),
        n_tasks=tasks.n_tasks,
        n_users=len(ml.users),
        n_movies=len(ml.movies),
    )


def split_task_movies(
    task: np.ndarray,
    movie: np.ndarray,
    n_tasks: int,
    n_movies: int,
    *,
    val_fraction: float,
    rng: np.random.Generator,
) -> np.ndarray:
    """Per-rating validation mask: per task, round(val_fraction · n_t) of its n_t distinct movies
    (at most n_t − 1, so every task keeps a training movie) are drawn at random; every rating of that
    task for a drawn movie is validation."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
    pair = task.astype(np.int64) * n_movies + movie
    pairs, inverse = np.unique(pair, return_inverse=True)
    pair_task = pairs // n_movies
    order = np.lexsort((rng.random(pairs.size), pair_task))  # by task, random within a task
    counts = np.bincount(pair_task, minlength=n_tasks)
    starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
    rank = np.empty(pairs.size, dtype=np.int64)
    rank[order] = np.arange(pairs.size) - starts[pair_task[order]]
    n_val = np.minimum(np.floor(val_fraction * counts + 0.5), np.maximum(counts - 1, 0))
    pair_val = rank < n_val[pair_task]
    return np.asarray(pair_val[inverse.ravel()], dtype=bool)


@dataclass(frozen=True, eq=False)
class MovieEmbedding:
    mean: float  # μ, the mean training rating
    Q: np.ndarray  # (n_movies, dim) movie factors; 0 for movies without training ratings
    P: np.ndarray  # (n_users, dim) user factors (not used by the tasks)


def _als_half(
    own: np.ndarray, n_own: int, other: np.ndarray, t: np.ndarray, reg: float
) -> np.ndarray:
    dim = other.shape[1]
    counts = np.bincount(own, minlength=n_own).astype(np.float64)
    G = grouped_gram(own, n_own, other)
    G += (reg * np.maximum(counts, 1.0))[:, None, None] * np.eye(dim)[None]
    h = grouped_sum(own, n_own, other * t[:, None])
    return np.asarray(np.linalg.solve(G, h[:, :, None])[:, :, 0])


def fit_movie_embedding(
    user: np.ndarray,
    movie: np.ndarray,
    rating: np.ndarray,
    *,
    n_users: int,
    n_movies: int,
    dim: int = 50,
    reg: float = 0.15,
    n_iter: int = 10,
    seed: int = 0,
) -> MovieEmbedding:
    """ALS-WR without biases on the given (training) ratings: r_ui − μ ≈ ⟨p_u, q_i⟩ with ridge
    ``reg · n`` on each row (n = its number of ratings)."""
    if rating.size == 0:
        raise ValueError("fit_movie_embedding needs at least one rating")
    rng = np.random.default_rng(seed)
    mu = float(np.mean(rating))
    t = rating - mu
    Q = rng.normal(0.0, 0.1, (n_movies, dim))
    P = np.zeros((n_users, dim))
    for _ in range(n_iter):
        P = _als_half(user, n_users, Q[movie], t, reg)
        Q = _als_half(movie, n_movies, P[user], t, reg)
    return MovieEmbedding(mu, Q, P)


def task_samples(
    task: np.ndarray, movie: np.ndarray, rating: np.ndarray, n_movies: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One sample per (task, movie): ``(task, movie, average rating, number of ratings)``,
    sorted by task then movie."""
    pair = task.astype(np.int64) * n_movies + movie
    pairs, inverse = np.unique(pair, return_inverse=True)
    inverse = inverse.ravel()
    n = np.bincount(inverse, minlength=pairs.size)
    avg = np.bincount(inverse, weights=rating, minlength=pairs.size) / n
    return pairs // n_movies, pairs % n_movies, avg, n


@dataclass(frozen=True, eq=False)
class TaskProblem:
    """Training and validation samples of every task: ``X`` rows are movie embeddings, ``y`` the
    task's average rating minus ``mean`` (add ``mean`` back to predict a rating)."""

    X_train: np.ndarray
    y_train: np.ndarray
    task_train: np.ndarray
    movie_train: np.ndarray
    X_val: np.ndarray
    y_val: np.ndarray
    task_val: np.ndarray
    movie_val: np.ndarray
    n_val_ratings: np.ndarray  # (n_val,) ratings averaged into each validation sample
    mean: float
    n_tasks: int
    is_val: np.ndarray  # (N,) per input rating: True if it went to validation
    embedding: MovieEmbedding

    @property
    def train_counts(self) -> np.ndarray:
        """Training samples per task."""
        return np.bincount(self.task_train, minlength=self.n_tasks)


def make_task_problem(
    ratings: TaskRatings,
    *,
    seed: int,
    val_fraction: float = 0.2,
    dim: int = 50,
    reg: float = 0.15,
    n_iter: int = 10,
) -> TaskProblem:
    """Split per task, fit the embedding on the training ratings only, build the samples."""
    rng = np.random.default_rng(seed)
    is_val = split_task_movies(
        ratings.task,
        ratings.movie,
        ratings.n_tasks,
        ratings.n_movies,
        val_fraction=val_fraction,
        rng=rng,
    )
    tr = ratings.subset(~is_val)
    va = ratings.subset(is_val)
    emb = fit_movie_embedding(
        tr.user,
        tr.movie,
        tr.rating,
        n_users=ratings.n_users,
        n_movies=ratings.n_movies,
        dim=dim,
        reg=reg,
        n_iter=n_iter,
        seed=int(rng.integers(2**31)),
    )
    t_tr, m_tr, y_tr, _ = task_samples(tr.task, tr.movie, tr.rating, ratings.n_movies)
    t_va, m_va, y_va, n_va = task_samples(va.task, va.movie, va.rating, ratings.n_movies)
    return TaskProblem(
        X_train=emb.Q[m_tr],
        y_train=y_tr - emb.mean,
        task_train=t_tr,
        movie_train=m_tr,
        X_val=emb.Q[m_va],
        y_val=y_va - emb.mean,
        task_val=t_va,
        movie_val=m_va,
        n_val_ratings=n_va,
        mean=emb.mean,
        n_tasks=ratings.n_tasks,
        is_val=is_val,
        embedding=emb,
    )
