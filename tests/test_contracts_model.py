"""LRSModel and the model directory: the contracts every component builds on."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from lrs_rec.model import LRSModel
from lrs_rec.model_dir import (
    FORMAT_VERSION,
    ModelDirError,
    TrainedModel,
    load_model_dir,
    save_model_dir,
)


def random_lrs(
    rng: np.random.Generator, n_users: int = 6, d: int = 12, r: int = 3, k: int = 4
) -> LRSModel:
    U = np.linalg.qr(rng.normal(size=(d, r)))[0]
    W = rng.normal(size=(n_users, r))
    B_idx = np.sort(
        np.stack([rng.choice(d, size=k, replace=False) for _ in range(n_users)]), axis=1
    )
    return LRSModel(U=U, W=W, B_idx=B_idx, B_val=rng.normal(size=(n_users, k)))


def test_theta_is_uw_plus_sparse_b_entry_by_entry() -> None:
    m = random_lrs(np.random.default_rng(0))
    theta = m.theta()
    for u in range(m.n_users):
        expected = m.U @ m.W[u]
        for j, v in zip(m.B_idx[u], m.B_val[u], strict=True):
            expected[j] += v
        np.testing.assert_allclose(theta[u], expected, rtol=1e-12)
    np.testing.assert_allclose(m.theta_rows(np.array([3, 0, 3])), theta[[3, 0, 3]], rtol=1e-12)


def test_predict_matches_inner_product_with_theta() -> None:
    rng = np.random.default_rng(1)
    m = random_lrs(rng)
    X = rng.normal(size=(20, m.d))
    users = rng.integers(0, m.n_users, size=20)
    expected = [float(X[j] @ m.theta()[users[j]]) for j in range(20)]
    np.testing.assert_allclose(m.predict(X, users), expected, rtol=1e-10)


def test_model_is_immutable() -> None:
    m = random_lrs(np.random.default_rng(2))
    with pytest.raises(ValueError):
        m.W[0, 0] = 1.0
    with pytest.raises(AttributeError):
        m.U = m.U  # type: ignore[misc]


def test_save_load_round_trip_without_pickle(tmp_path) -> None:
    m = random_lrs(np.random.default_rng(3))
    m.save(tmp_path / "m.npz")
    with np.load(tmp_path / "m.npz", allow_pickle=False) as z:
        assert all(z[name].dtype != object for name in z.files)
    m2 = LRSModel.load(tmp_path / "m.npz")
    np.testing.assert_array_equal(m2.theta(), m.theta())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"W": np.zeros((6, 2))}, "W must be"),
        ({"B_val": np.zeros((6, 3))}, "B_val shape"),
        ({"B_idx": np.full((6, 4), 99)}, "B_idx entries"),
        ({"B_idx": np.tile([3, 2, 5, 7], (6, 1))}, "strictly increasing"),
        ({"W": np.full((6, 3), np.nan)}, "NaN"),
    ],
)
def test_bad_model_arrays_are_rejected_with_a_clear_message(kwargs, message) -> None:
    m = random_lrs(np.random.default_rng(4))
    fields = {**m.to_arrays(), **kwargs}
    with pytest.raises(ValueError, match=message):
        LRSModel(**fields)


def tiny_trained_model(rng: np.random.Generator) -> TrainedModel:
    lrs = random_lrs(rng, n_users=5, d=12, r=3, k=4)
    n_items = 9
    counts = np.array([2, 0, 3, 1, 4])
    indptr = np.concatenate([[0], np.cumsum(counts)])
    return TrainedModel(
        lrs=lrs,
        item_features=rng.normal(size=(n_items, lrs.d)),
        item_bias=rng.normal(size=n_items) * 0.1,
        user_bias=rng.normal(size=lrs.n_users) * 0.1,
        global_mean=3.5,
        user_ids=tuple(f"u{i}" for i in range(lrs.n_users)),
        item_ids=tuple(f"item:{i}" for i in range(n_items)),
        w_prior_mean=lrs.W.mean(axis=0),
        w_prior_cov=np.cov(lrs.W.T),
        history_indptr=indptr,
        history_items=rng.integers(0, n_items, size=indptr[-1]),
        history_ratings=rng.integers(1, 6, size=indptr[-1]).astype(np.float32),
        rating_min=1.0,
        rating_max=5.0,
        manifest={"hyperparameters": {"rank": 3}},
    )


def test_model_dir_round_trip_and_manifest(tmp_path) -> None:
    model = save_model_dir(tiny_trained_model(np.random.default_rng(5)), tmp_path / "m")
    loaded = load_model_dir(tmp_path / "m")
    assert loaded.user_ids == model.user_ids and loaded.item_ids == model.item_ids
    np.testing.assert_array_equal(loaded.lrs.theta(), model.lrs.theta())
    manifest = json.loads((tmp_path / "m" / "manifest.json").read_text())
    assert manifest["format_version"] == FORMAT_VERSION
    assert manifest["dims"] == {
        "n_users": 5,
        "n_items": 9,
        "d": 12,
        "rank": 3,
        "sparsity": 4,
        "params_per_user": 7,
    }
    assert manifest["model_version"] == loaded.model_version != ""
    with np.load(tmp_path / "m" / "arrays.npz", allow_pickle=False) as z:
        assert "U" in z.files


def test_reference_prediction_including_unknown_users_and_items() -> None:
    model = tiny_trained_model(np.random.default_rng(6))
    users = np.array([0, 4, -1, 2])
    items = np.array([1, -1, 3, 8])
    got = model.predict(users, items)
    theta = model.lrs.theta()
    expected = []
    for u, i in zip(users, items, strict=True):
        th = theta[u] if u >= 0 else model.lrs.U @ model.w_prior_mean
        f = model.item_features[i] if i >= 0 else np.zeros(model.lrs.d)
        raw = model.global_mean + (model.user_bias[u] if u >= 0 else 0.0)
        raw += (model.item_bias[i] if i >= 0 else 0.0) + float(f @ th)
        expected.append(min(max(raw, 1.0), 5.0))
    np.testing.assert_allclose(got, expected, rtol=1e-12)


def test_other_format_version_fails_clearly(tmp_path) -> None:
    save_model_dir(tiny_trained_model(np.random.default_rng(7)), tmp_path / "m")
    path = tmp_path / "m" / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["format_version"] = FORMAT_VERSION + 1
    path.write_text(json.dumps(manifest))
    with pytest.raises(ModelDirError, match="format_version"):
        load_model_dir(tmp_path / "m")


def test_missing_model_dir_fails_clearly(tmp_path) -> None:
    with pytest.raises(ModelDirError, match="not a model directory"):
        load_model_dir(tmp_path / "nothing")


def test_arrays_digest_covers_shared_weights_only(tmp_path) -> None:
    """The manifest's digest must not be a function of per-user data (a DP leak otherwise)."""
    base = tiny_trained_model(np.random.default_rng(8))
    first = save_model_dir(base, tmp_path / "a").manifest["arrays_sha256"]
    other_users = dataclasses.replace(
        base,
        lrs=LRSModel(
            U=base.lrs.U, W=base.lrs.W + 1.0, B_idx=base.lrs.B_idx, B_val=base.lrs.B_val * 2.0
        ),
        user_bias=base.user_bias + 0.5,
        history_ratings=base.history_ratings[::-1].copy(),
    )
    assert save_model_dir(other_users, tmp_path / "b").manifest["arrays_sha256"] == first
    other_items = dataclasses.replace(base, item_bias=base.item_bias + 0.1)
    assert save_model_dir(other_items, tmp_path / "c").manifest["arrays_sha256"] != first


def test_history_timestamps_are_optional_and_round_trip(tmp_path) -> None:
    base = tiny_trained_model(np.random.default_rng(9))
    save_model_dir(base, tmp_path / "a")
    assert load_model_dir(tmp_path / "a").history_timestamps is None
    times = np.arange(base.history_items.size, dtype=np.float64) * 10.0
    save_model_dir(dataclasses.replace(base, history_timestamps=times), tmp_path / "b")
    np.testing.assert_array_equal(load_model_dir(tmp_path / "b").history_timestamps, times)
    with pytest.raises(ModelDirError, match="history_timestamps"):
        dataclasses.replace(base, history_timestamps=times[:-1])
