"""The trainer's memory and time budget at scale (issue 14): compact snapshots, the split and its
inverse, tuning on a seeded user sample, the per-phase log in the manifest."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from lrs_rec.training.config import TrainConfig
from lrs_rec.training.loaders import load_ratings
from lrs_rec.training.pipeline import Snapshot, merge, take, train, validation_mask
from lrs_rec.training.sample_data import make_sample_ratings, write_sample_ratings
from lrs_rec.training.tuning import user_sample

from lrs_rec.engine.b_rows import pairs_of_dense, zero_b
from lrs_rec.engine.steps import LRSState, Samples

FAST: dict[str, Any] = {"n_iter": 3, "init_iter": 3, "dim": 8, "rank": 3, "sparsity": 2}


@pytest.fixture(scope="module")
def ratings_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rows = make_sample_ratings(240, 100, random_state=5)
    return write_sample_ratings(tmp_path_factory.mktemp("budget") / "r.csv", rows)


def _state(rng: np.random.Generator, n: int = 50, d: int = 6, r: int = 3, k: int = 2) -> LRSState:
    B = np.zeros((n, d))
    for u in range(n):  # rows with 0..k non-zeros
        cols = rng.choice(d, size=int(rng.integers(0, k + 1)), replace=False)
        B[u, cols] = rng.normal(size=cols.size)
    return LRSState(
        0.3, rng.normal(size=n), rng.normal(size=9), rng.normal(size=(9, d)),
        np.linalg.qr(rng.normal(size=(d, r)))[0], rng.normal(size=(n, r)), *pairs_of_dense(B, k),
    )  # fmt: skip


def test_snapshot_restores_the_state_exactly_and_keeps_b_sparse() -> None:
    state = _state(np.random.default_rng(0))
    snap = Snapshot.of(state)
    assert snap.b_idx.shape == (50, 2) and snap.b_idx.dtype == np.int32
    names = ("user_bias", "item_bias", "F", "U", "W", "B_idx", "B_val")
    saved = {n: np.array(getattr(state, n)) for n in names}
    state.W += 1.0  # the snapshot owns its arrays
    state.B_val[:] = 0.0
    back = snap.restore()
    for name, value in saved.items():
        np.testing.assert_array_equal(getattr(back, name), value, err_msg=name)
    users = np.array([3, 10, 11, 40])
    sub = snap.take_users(users).restore()
    np.testing.assert_array_equal(sub.B_idx, saved["B_idx"][users])
    np.testing.assert_array_equal(sub.B_val, saved["B_val"][users])
    np.testing.assert_array_equal(sub.W, saved["W"][users])
    empty = Snapshot.of(LRSState(0.0, np.zeros(4), np.zeros(2), np.zeros((2, 3)), np.eye(3),
                                 np.zeros((4, 3)), *zero_b(4, 0)))  # fmt: skip
    assert empty.b_idx.shape == (4, 0) and not empty.restore().dense_b().any()


def test_merge_inverts_the_validation_split() -> None:
    rng = np.random.default_rng(1)
    data = Samples(
        rng.integers(0, 30, 500).astype(np.int32),
        rng.integers(0, 20, 500).astype(np.int32),
        rng.normal(size=500),
    )
    mask = validation_mask(data, 0.2, np.random.default_rng(2))
    assert mask is not None and 0 < mask.sum() < 500
    back = merge(take(data, ~mask), take(data, mask), mask)
    for name in ("users", "items", "ratings"):
        np.testing.assert_array_equal(getattr(back, name), getattr(data, name))
        assert getattr(back, name).dtype == getattr(data, name).dtype
    assert validation_mask(data, 0.0, np.random.default_rng(2)) is None


def test_user_sample_is_seeded_distinct_and_sorted() -> None:
    a, b = user_sample(1000, 100, 3), user_sample(1000, 100, 3)
    np.testing.assert_array_equal(a, b)
    assert np.unique(a).size == 100 and np.all(np.diff(a) > 0)
    assert not np.array_equal(a, user_sample(1000, 100, 4))


def test_tuning_on_a_user_sample_then_one_fit_on_all_users(ratings_file: Path) -> None:
    table = load_ratings(ratings_file)
    cfg = TrainConfig(**FAST, tune_sample_users=60, tune_trials=2)
    res = train(table, cfg, progress=False)
    m = res.model.manifest
    tuning = m["tuning"]
    assert tuning["sample_users"] == 60
    assert 0 < tuning["sample_train_ratings"] < m["data"]["n_train_part"]
    assert 1 <= len(tuning["trials"]) <= 3
    for name, value in tuning["chosen"].items():  # the chosen strengths are the ones trained with
        assert m["hyperparameters"][name] == value
    phases = [p["phase"] for p in m["metrics"]["phases"]]
    assert phases == ["encode", "init", "tune", "fit", "final pass", "model"]
    assert all(p["seconds"] >= 0 for p in m["metrics"]["phases"])
    # the full fit ran on every user: its history is that of all the training users
    assert m["data"]["n_users"] == res.model.n_users == 240
    again = train(table, cfg, progress=False)  # reproducible for a seed
    np.testing.assert_array_equal(again.model.lrs.W, res.model.lrs.W)
    assert again.model.manifest["tuning"]["chosen"] == tuning["chosen"]


def test_small_data_tunes_on_every_user(ratings_file: Path) -> None:
    table = load_ratings(ratings_file)
    res = train(table, TrainConfig(**FAST, tune_trials=1), progress=False)
    m = res.model.manifest
    assert "sample_users" not in m["tuning"]
    assert [p["phase"] for p in m["metrics"]["phases"]] == [
        "encode", "init", "tune", "final pass", "model"
    ]  # fmt: skip
    with pytest.raises(ValueError, match="tune_sample_users must be >= 1"):
        TrainConfig(tune_sample_users=0)


def test_tune_sample_users_flag(
    ratings_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    from lrs_rec.serving.cli import main

    out = tmp_path / "m"
    argv = ["train", "--ratings", str(ratings_file), "--out", str(out), "--dim", "8", "--rank", "3",
            "--sparsity", "2", "--n-iter", "2", "--tune-trials", "1", "--no-export", "--quiet"]  # fmt: skip
    assert main([*argv, "--tune-sample-users", "50"]) == 0
    assert json.loads((out / "manifest.json").read_text())["tuning"]["sample_users"] == 50
    assert main([*argv, "--tune-sample-users", "-1"]) != 0
    assert "--tune-sample-users must be >= 0, got -1" in capsys.readouterr().err


def test_restore_into_reuses_the_state() -> None:
    rng = np.random.default_rng(7)
    a = _state(rng)
    snap = Snapshot.of(a)
    b = _state(rng)
    snap.restore_into(b)
    for name in ("user_bias", "item_bias", "F", "U", "W", "B_idx", "B_val"):
        np.testing.assert_array_equal(getattr(b, name), getattr(a, name), err_msg=name)
    assert b.global_mean == a.global_mean
