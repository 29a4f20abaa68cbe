"""Demographic tasks, the per-task movie split and the training-only embedding (generated data)."""

from __future__ import annotations

import importlib.util
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from lrs_rec.training.demographic import (
    TaskRatings,
    age_group,
    demographic_tasks,
    fit_movie_embedding,
    make_task_problem,
    split_task_movies,
    task_ratings,
    task_samples,
)
from lrs_rec.training.movielens import ML1M_OCCUPATIONS, Users, load_movielens


@pytest.mark.parametrize(
    ("age", "group"),
    [
        (1, "under 18"),
        (17, "under 18"),
        (18, "18-24"),
        (24, "18-24"),
        (25, "25-34"),
        (34, "25-34"),
        (35, "35-44"),
        (44, "35-44"),
        (45, "45-49"),
        (49, "45-49"),
        (50, "50-55"),
        (55, "50-55"),
        (56, "56+"),
        (73, "56+"),
    ],
)
def test_age_groups_are_ml1m_groups(age: int, group: str) -> None:
    assert age_group(age) == group


def test_age_group_refuses_non_positive() -> None:
    with pytest.raises(ValueError, match="age must be positive"):
        age_group(0)


def test_tasks_are_unique_demographic_combinations() -> None:
    users = Users(
        ids=np.array(["a", "b", "c", "d", "e"]),
        gender=np.array(["M", "M", "F", "M", "M"]),
        age=np.array([20, 24, 20, 25, 18]),  # 20, 24, 18 share a group
        occupation=np.array(["writer", "writer", "writer", "writer", "artist"]),
    )
    t = demographic_tasks(users)
    assert t.labels == (
        ("F", "18-24", "writer"),
        ("M", "18-24", "artist"),
        ("M", "18-24", "writer"),
        ("M", "25-34", "writer"),
    )
    assert t.of_user.tolist() == [2, 2, 0, 3, 1]
    assert t.n_tasks == 4


def generated_ratings(seed: int = 0, n_users: int = 40, n_movies: int = 60) -> TaskRatings:
    """Users in 6 tasks, each rating a random 15-40 movies (1..5 stars)."""
    rng = np.random.default_rng(seed)
    task_of_user = rng.integers(0, 6, n_users)
    task_of_user[:6] = np.arange(6)
    rows = [
        (u, m)
        for u in range(n_users)
        for m in rng.choice(n_movies, int(rng.integers(15, 41)), replace=False)
    ]
    user = np.array([r[0] for r in rows], dtype=np.int64)
    movie = np.array([r[1] for r in rows], dtype=np.int64)
    return TaskRatings(
        task=task_of_user[user],
        user=user,
        movie=movie,
        rating=rng.integers(1, 6, user.size).astype(float),
        n_tasks=6,
        n_users=n_users,
        n_movies=n_movies,
    )


def test_split_moves_20_percent_of_each_tasks_movies_with_all_their_ratings() -> None:
    R = generated_ratings()
    is_val = split_task_movies(
        R.task, R.movie, R.n_tasks, R.n_movies, val_fraction=0.2, rng=np.random.default_rng(1)
    )
    flags: dict[tuple[int, int], set[bool]] = defaultdict(set)
    for t, m, v in zip(R.task.tolist(), R.movie.tolist(), is_val.tolist(), strict=True):
        flags[(t, m)].add(v)
    assert all(len(f) == 1 for f in flags.values())  # a (task, movie) is wholly val or train
    for t in range(R.n_tasks):
        movies = {m for (tt, m) in flags if tt == t}
        val = {m for (tt, m) in flags if tt == t and flags[(tt, m)] == {True}}
        assert len(val) == int(np.floor(0.2 * len(movies) + 0.5))
    # the draw differs between tasks: the same movie can be val for one task, train for another
    per_movie = defaultdict(set)
    for (_t, m), f in flags.items():
        per_movie[m] |= f
    assert any(f == {True, False} for f in per_movie.values())


def split_reference(
    task: np.ndarray, movie: np.ndarray, n_tasks: int, val_fraction: float, seed: int
) -> np.ndarray:
    """The split one task at a time: the same random key per (task, movie) pair (drawn in sorted
    pair order), the task's n_val lowest keys go to validation."""
    pairs = sorted(set(zip(task.tolist(), movie.tolist(), strict=True)))
    keys = dict(zip(pairs, np.random.default_rng(seed).random(len(pairs)).tolist(), strict=True))
    val: set[tuple[int, int]] = set()
    for t in range(n_tasks):
        ranked = sorted((keys[p], p) for p in pairs if p[0] == t)
        n_val = min(int(np.floor(val_fraction * len(ranked) + 0.5)), max(len(ranked) - 1, 0))
        val |= {p for _, p in ranked[:n_val]}
    return np.array([p in val for p in zip(task.tolist(), movie.tolist(), strict=True)])


@pytest.mark.parametrize("val_fraction", [0.2, 0.5, 0.0])
def test_split_matches_the_per_task_reference(val_fraction: float) -> None:
    R = generated_ratings(2)
    fast = split_task_movies(
        R.task,
        R.movie,
        R.n_tasks,
        R.n_movies,
        val_fraction=val_fraction,
        rng=np.random.default_rng(9),
    )
    np.testing.assert_array_equal(
        fast, split_reference(R.task, R.movie, R.n_tasks, val_fraction, 9)
    )


def test_split_keeps_a_training_movie_per_task() -> None:
    task = np.array([0, 0, 1])
    movie = np.array([0, 0, 1])  # task 0: one movie (rated twice), task 1: one movie
    is_val = split_task_movies(task, movie, 2, 2, val_fraction=0.6, rng=np.random.default_rng(0))
    assert not is_val.any()
    with pytest.raises(ValueError, match="val_fraction"):
        split_task_movies(task, movie, 2, 2, val_fraction=1.0, rng=np.random.default_rng(0))


def test_task_samples_are_per_task_movie_averages() -> None:
    R = generated_ratings(3)
    t, m, avg, n = task_samples(R.task, R.movie, R.rating, R.n_movies)
    ref: dict[tuple[int, int], list[float]] = defaultdict(list)
    for tt, mm, r in zip(R.task.tolist(), R.movie.tolist(), R.rating.tolist(), strict=True):
        ref[(tt, mm)].append(r)
    assert list(zip(t.tolist(), m.tolist(), strict=True)) == sorted(ref)
    np.testing.assert_allclose(avg, [np.mean(ref[k]) for k in sorted(ref)], rtol=1e-12)
    assert n.tolist() == [len(ref[k]) for k in sorted(ref)]


def als_reference(
    user: np.ndarray, movie: np.ndarray, r: np.ndarray, nu: int, nm: int, Q0: np.ndarray, reg: float
) -> tuple[np.ndarray, np.ndarray]:
    """One ALS-WR sweep, one row at a time."""
    t = r - r.mean()
    P = np.zeros((nu, Q0.shape[1]))
    for u in range(nu):
        sel = user == u
        A = Q0[movie[sel]]
        P[u] = np.linalg.solve(A.T @ A + reg * max(sel.sum(), 1) * np.eye(A.shape[1]), A.T @ t[sel])
    Q = np.zeros_like(Q0)
    for i in range(nm):
        sel = movie == i
        A = P[user[sel]]
        Q[i] = np.linalg.solve(A.T @ A + reg * max(sel.sum(), 1) * np.eye(A.shape[1]), A.T @ t[sel])
    return P, Q


def test_embedding_matches_the_row_by_row_reference() -> None:
    R = generated_ratings(4)
    emb = fit_movie_embedding(
        R.user, R.movie, R.rating, n_users=R.n_users, n_movies=R.n_movies, dim=5, n_iter=1, seed=7
    )
    Q0 = np.random.default_rng(7).normal(0.0, 0.1, (R.n_movies, 5))
    P, Q = als_reference(R.user, R.movie, R.rating, R.n_users, R.n_movies, Q0, 0.15)
    np.testing.assert_allclose(emb.P, P, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(emb.Q, Q, rtol=1e-9, atol=1e-12)
    assert emb.mean == pytest.approx(R.rating.mean())


def test_no_leakage_from_validation_ratings() -> None:
    R = generated_ratings(5)
    P = make_task_problem(R, seed=11, dim=8, n_iter=3)
    # no validation (task, movie) of a task is among that task's training samples
    train_pairs = set(zip(P.task_train.tolist(), P.movie_train.tolist(), strict=True))
    val_pairs = set(zip(P.task_val.tolist(), P.movie_val.tolist(), strict=True))
    assert val_pairs and not (train_pairs & val_pairs)
    assert P.X_val.shape[0] == len(val_pairs)
    # every rating is in exactly one side, and a sample's target is that side's average
    assert P.n_val_ratings.sum() == P.is_val.sum()
    # the embedding and the training samples do not change when validation ratings change
    shuffled = R.rating.copy()
    shuffled[P.is_val] = 6.0 - shuffled[P.is_val]
    R2 = TaskRatings(R.task, R.user, R.movie, shuffled, R.n_tasks, R.n_users, R.n_movies)
    P2 = make_task_problem(R2, seed=11, dim=8, n_iter=3)
    np.testing.assert_array_equal(P2.is_val, P.is_val)
    np.testing.assert_array_equal(P2.embedding.Q, P.embedding.Q)
    np.testing.assert_array_equal(P2.X_train, P.X_train)
    np.testing.assert_array_equal(P2.y_train, P.y_train)
    assert not np.array_equal(P2.y_val, P.y_val)
    # ... and the embedding is exactly the one fitted on the training ratings alone
    tr = R.subset(~P.is_val)
    assert P.mean == pytest.approx(tr.rating.mean())
    # the inner (tuning) split only ever sees the outer training ratings
    inner = make_task_problem(tr, seed=12, dim=8, n_iter=3)
    assert inner.is_val.shape == (tr.rating.size,)
    inner_pairs = set(zip(inner.task_train.tolist(), inner.movie_train.tolist(), strict=True))
    inner_pairs |= set(zip(inner.task_val.tolist(), inner.movie_val.tolist(), strict=True))
    assert inner_pairs == train_pairs


def write_tiny_ml1m(d: Path, seed: int = 0) -> Path:
    """12 demographic groups of 4 users; each user rates 30 of 50 movies."""
    rng = np.random.default_rng(seed)
    d.mkdir(parents=True)
    users, ratings = [], []
    taste = rng.normal(size=(12, 3))
    movie_f = rng.normal(size=(50, 3))
    uid = 0
    for g, gender in enumerate("MF"):
        for a, age in enumerate((18, 25, 56)):
            for o in (0, 4):
                for _ in range(4):
                    uid += 1
                    users.append(f"{uid}::{gender}::{age}::{o}::12345")
                    task = g * 6 + a * 2 + o // 4
                    for m in rng.choice(50, 30, replace=False):
                        r = np.clip(np.rint(3 + movie_f[m] @ taste[task] + rng.normal()), 1, 5)
                        ratings.append(f"{uid}::{m + 1}::{int(r)}::{978300000 + m}")
    (d / "users.dat").write_text("\n".join(users) + "\n")
    (d / "ratings.dat").write_text("\n".join(ratings) + "\n")
    (d / "movies.dat").write_bytes(
        "".join(f"{m + 1}::Film {m + 1} é (1990)::Drama\n" for m in range(50)).encode("latin-1")
    )
    return d


def test_ml1m_directory_builds_tasks(tmp_path: Path) -> None:
    ml = load_movielens(write_tiny_ml1m(tmp_path / "ml-1m"))
    tasks = demographic_tasks(ml.users)
    assert tasks.n_tasks == 12
    assert {lab[2] for lab in tasks.labels} == {ML1M_OCCUPATIONS[0], ML1M_OCCUPATIONS[4]}
    R = task_ratings(ml, tasks)
    assert R.rating.size == 48 * 30
    assert np.array_equal(R.task, tasks.of_user[R.user])


def test_bench_runs_on_an_ml1m_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """bench/paper_fig1a.py --ml-1m DIR --json: the JSON contract on a tiny generated ML-1M."""
    d = write_tiny_ml1m(tmp_path / "ml-1m")
    spec = importlib.util.spec_from_file_location(
        "paper_fig1a", Path(__file__).resolve().parents[1] / "bench" / "paper_fig1a.py"
    )
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "paper_fig1a", bench)  # dataclasses look their module up
    spec.loader.exec_module(bench)
    out = tmp_path / "res.json"
    assert bench.main(["--ml-1m", str(d), "--quick", "--seeds", "2", "--out", str(out)]) == 0
    res = json.loads(out.read_text(), parse_constant=lambda c: pytest.fail(f"{c} in the JSON"))
    assert res["dataset"] == "ml-1m" and res["n_tasks"] == 12
    for key in ("single_model", "full_fine_tuning", "rep_learning", "prompt_learning", "amht_lrs"):
        m = res["methods"][key]
        assert np.isfinite(m["rmse"]) and m["rmse"] > 0
        assert {"rmse_starved", "params_pct"} <= set(m)
        assert len(m["per_seed"]) == 2
    assert res["methods"]["amht_lrs"]["params_pct"] == 10.0  # r + k = 5 of d = 50
    assert res["methods"]["full_fine_tuning"]["params_pct"] == 100.0
    assert [r["k"] for r in res["amht_lrs_sweep"]] == [1, 4, 9]
    # every task has < 100 training samples here: the starved RMSE is the overall one
    assert res["methods"]["single_model"]["rmse_starved"] == res["methods"]["single_model"]["rmse"]
    assert res["methods"]["single_model"]["rmse_rest"] is None  # no other tasks: null, not NaN
    assert res["claims"]["3_full_ft_overfits_starved_amht_not"]["amht_better_than_single"] in (
        True,
        False,
    )
    with pytest.raises(SystemExit):
        bench.main(["--ml-1m", str(tmp_path / "nowhere")])


def test_bench_skips_without_data(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import subprocess

    bench = Path(__file__).resolve().parents[1] / "bench" / "paper_fig1a.py"
    out = subprocess.run(
        [sys.executable, str(bench), "--data", str(tmp_path), "--json", "--no-write"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(out.stdout)["skipped"].startswith(f"skipped: {tmp_path} has no u.user")
    assert "MovieLens data not available" in out.stderr


@pytest.mark.ml100k
def test_ml100k_demographic_tasks(ml100k_dir: Path) -> None:
    ml = load_movielens(ml100k_dir)
    tasks = demographic_tasks(ml.users)
    assert tasks.n_tasks == 168  # of the 2 x 7 x 21 = 294 possible groups
    R = task_ratings(ml, tasks)
    P = make_task_problem(R, seed=0, dim=4, n_iter=1)
    train_pairs = set(zip(P.task_train.tolist(), P.movie_train.tolist(), strict=True))
    val_pairs = set(zip(P.task_val.tolist(), P.movie_val.tolist(), strict=True))
    assert not (train_pairs & val_pairs)
    assert len(train_pairs) + len(val_pairs) == 50_507  # distinct (task, movie) pairs
    assert P.train_counts.min() >= 1
