"""The sharded model directory (format 2, issue 15): shards written one at a time (also by other
processes), read back exactly; format-1 directories still load in every reader."""

from __future__ import annotations

import dataclasses
import json
import multiprocessing

import numpy as np
import pytest
from legacy_model_dir import save_legacy_model_dir
from lrs_rec.training.testing import random_trained_model

from lrs_rec.model_dir import (
    FORMAT_VERSION,
    ModelDirError,
    TrainedModel,
    load_model_dir,
    load_shared_model_dir,
    load_user_index,
    read_manifest,
    read_user_ids,
    save_model_dir,
)
from lrs_rec.model_shards import (
    abort_model_dir,
    begin_model_dir,
    finish_model_dir,
    iter_user_shards,
    n_user_shards,
    read_user_shard,
    write_user_shard,
)

PER_USER = ("user_bias", "history_indptr", "history_items", "history_ratings")


def _model(n_users: int = 130, **kw) -> TrainedModel:  # type: ignore[no-untyped-def]
    m = random_trained_model(n_users=n_users, n_items=30, d=8, rank=3, sparsity=2, **kw)
    rng = np.random.default_rng(3)
    counts = rng.integers(0, 9, size=n_users)  # ragged histories, some users with none
    indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    items = np.concatenate([rng.choice(30, size=c, replace=False) for c in counts]).astype(np.int64)
    return dataclasses.replace(
        m,
        history_indptr=indptr,
        history_items=items,
        history_ratings=rng.integers(1, 6, size=items.size).astype(np.float64),
        history_timestamps=rng.random(items.size) * 1e9,
        manifest={"model_version": "m-shards", "hyperparameters": {"seed": 3}},
    )


def _assert_same_users(a: TrainedModel, b: TrainedModel) -> None:
    assert a.user_ids == b.user_ids
    for name in PER_USER:
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and np.array_equal(x, y), name
    for name in ("W", "B_idx", "B_val"):
        x, y = getattr(a.lrs, name), getattr(b.lrs, name)
        assert x.dtype == y.dtype and np.array_equal(x, y), name
    assert (a.history_timestamps is None) == (b.history_timestamps is None)
    if a.history_timestamps is not None:
        assert np.array_equal(a.history_timestamps, b.history_timestamps)


@pytest.mark.parametrize("shard_rows", [1, 7, 64, 130, 10_000])
def test_save_load_round_trip_any_shard_size(tmp_path, shard_rows):
    model = _model()
    saved = save_model_dir(model, tmp_path / "m", shard_rows=shard_rows)
    manifest = read_manifest(tmp_path / "m")
    assert manifest["format_version"] == FORMAT_VERSION == 2
    idx = manifest["user_shards"]
    assert idx["n_shards"] == -(-130 // shard_rows) and sum(idx["rows"]) == 130
    assert idx["history_timestamps"] is True
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == [
        "arrays.npz",
        "items.json",
        "manifest.json",
        "users",
    ]
    with np.load(tmp_path / "m" / "arrays.npz") as z:  # no per-user array in the shared file
        assert not {"W", "B_idx", "B_val", "user_bias", "history_items"} & set(z.files)
    loaded = load_model_dir(tmp_path / "m")
    _assert_same_users(model, loaded)
    assert loaded.manifest == saved.manifest
    np.testing.assert_array_equal(loaded.onboarding_prior.C_tm, saved.onboarding_prior.C_tm)
    assert read_user_ids(tmp_path / "m") == model.user_ids
    assert dict(load_user_index(tmp_path / "m")) == model.user_index()
    # shards one at a time: the same users, in order, with their dense-index start
    starts = [s.start for s in iter_user_shards(tmp_path / "m")]
    assert starts == list(range(0, 130, shard_rows))[: len(starts)]
    shard = read_user_shard(tmp_path / "m", len(starts) - 1)
    lo = shard.start
    np.testing.assert_array_equal(shard.W, model.lrs.W[lo:])
    items, _ = shard.history_by_time()
    ref_items, _ = model.history_by_time()
    np.testing.assert_array_equal(items, ref_items[model.history_indptr[lo] :])


def test_models_without_rank_or_sparsity_or_users_round_trip(tmp_path):
    base = _model(n_users=5)
    k0 = dataclasses.replace(
        base,
        lrs=dataclasses.replace(base.lrs, B_idx=np.zeros((5, 0), np.int64), B_val=np.zeros((5, 0))),
        history_timestamps=None,
    )
    save_model_dir(k0, tmp_path / "k0", shard_rows=2)
    _assert_same_users(k0, load_model_dir(tmp_path / "k0"))
    assert load_shared_model_dir(tmp_path / "k0").sparsity == 0


def test_old_format_directory_loads_in_every_reader(tmp_path):
    model = _model(n_users=40)
    save_legacy_model_dir(model, tmp_path / "old")
    assert read_manifest(tmp_path / "old")["format_version"] == 1
    old = load_model_dir(tmp_path / "old")
    _assert_same_users(model, old)
    assert old.onboarding_prior is not None
    shared = load_shared_model_dir(tmp_path / "old")
    assert shared.n_users == 40 and shared.users.get("u39") == 39
    assert read_user_ids(tmp_path / "old") == model.user_ids
    assert n_user_shards(tmp_path / "old") == 1
    (only,) = list(iter_user_shards(tmp_path / "old"))
    np.testing.assert_array_equal(only.B_val, model.lrs.B_val)
    with pytest.raises(ModelDirError, match="one shard"):
        read_user_shard(tmp_path / "old", 1)
    # saving it again writes format 2 with the same users and the same shared digest
    save_model_dir(old, tmp_path / "new", shard_rows=16)
    new = load_model_dir(tmp_path / "new")
    _assert_same_users(old, new)
    assert new.manifest["arrays_sha256"] == old.manifest["arrays_sha256"]
    np.testing.assert_array_equal(
        new.predict(np.arange(40), np.arange(40) % 30),
        old.predict(np.arange(40), np.arange(40) % 30),
    )


def test_unsupported_format_version_is_one_clear_error(tmp_path):
    save_model_dir(_model(n_users=3), tmp_path / "m")
    manifest = read_manifest(tmp_path / "m")
    (tmp_path / "m" / "manifest.json").write_text(json.dumps({**manifest, "format_version": 3}))
    for load in (load_model_dir, load_shared_model_dir):
        with pytest.raises(ModelDirError, match=r"format_version 3 .*reads 1 and 2"):
            load(tmp_path / "m")


# -- the writer API used by distributed trainers --------------------------------------------------
def _write_part(args: tuple[str, int, int, int]) -> dict:
    """A shard written by another process (as a Dask worker would)."""
    staging, index, lo, hi = args
    m = _model()
    a, b = int(m.history_indptr[lo]), int(m.history_indptr[hi])
    return write_user_shard(
        staging,
        index,
        user_ids=m.user_ids[lo:hi],
        user_bias=m.user_bias[lo:hi],
        W=m.lrs.W[lo:hi],
        B_idx=m.lrs.B_idx[lo:hi],
        B_val=m.lrs.B_val[lo:hi],
        history_indptr=m.history_indptr[lo : hi + 1] - a,
        history_items=m.history_items[a:b],
        history_ratings=m.history_ratings[a:b],
        history_timestamps=m.history_timestamps[a:b],
    )


def _shared(m: TrainedModel) -> dict:
    return {
        "U": m.lrs.U,
        "item_features": m.item_features,
        "item_bias": m.item_bias,
        "global_mean": m.global_mean,
        "w_prior_mean": m.w_prior_mean,
        "w_prior_cov": m.w_prior_cov,
        "item_ids": m.item_ids,
        "rating_min": m.rating_min,
        "rating_max": m.rating_max,
    }


def test_shards_written_by_other_processes_equal_save_model_dir(tmp_path):
    model = _model()
    save_model_dir(model, tmp_path / "ref", shard_rows=50)
    staging = begin_model_dir(tmp_path / "m")
    parts = [(str(staging), 2, 100, 130), (str(staging), 0, 0, 50), (str(staging), 1, 50, 100)]
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        infos = pool.map(_write_part, parts)
    manifest = finish_model_dir(
        staging,
        tmp_path / "m",
        shards=infos,
        manifest={"model_version": "m-shards", "hyperparameters": {"seed": 3}},
        onboarding_prior=load_model_dir(tmp_path / "ref").onboarding_prior,
        **_shared(model),
    )
    ref = read_manifest(tmp_path / "ref")
    assert {k: v for k, v in manifest.items() if k != "created_at"} == {
        k: v for k, v in ref.items() if k != "created_at"
    }
    _assert_same_users(load_model_dir(tmp_path / "ref"), load_model_dir(tmp_path / "m"))
    for i in range(3):
        assert (tmp_path / "m" / "users" / f"part-0000{i}.parquet").read_bytes() == (
            tmp_path / "ref" / "users" / f"part-0000{i}.parquet"
        ).read_bytes()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left


@pytest.mark.parametrize(
    ("indices", "message"),
    [([0, 2], r"numbered 0\.\.1 once each"), ([0, 0], r"numbered 0\.\.1 once each")],
)
def test_finish_refuses_missing_or_duplicate_shards(tmp_path, indices, message):
    model = _model(n_users=4)
    staging = begin_model_dir(tmp_path / "m")
    infos = [_write_part((str(staging), i, 0, 2)) for i in indices]
    with pytest.raises(ModelDirError, match=message):
        finish_model_dir(staging, tmp_path / "m", shards=infos, manifest={}, **_shared(model))
    assert not (tmp_path / "m").exists() and not staging.exists()


def test_finish_refuses_a_shard_of_another_rank_or_not_on_disk(tmp_path):
    model = _model(n_users=4)
    staging = begin_model_dir(tmp_path / "m")
    info = _write_part((str(staging), 0, 0, 2))
    bad_rank = {**_shared(model), "U": np.zeros((8, 5))}
    with pytest.raises(ModelDirError, match="disagree on rank"):
        finish_model_dir(staging, tmp_path / "m", shards=[info], manifest={}, **bad_rank)
    staging = begin_model_dir(tmp_path / "m")
    with pytest.raises(ModelDirError, match="shard 0 was not written"):
        finish_model_dir(staging, tmp_path / "m", shards=[info], manifest={}, **_shared(model))
    staging = begin_model_dir(tmp_path / "m")
    abort_model_dir(staging)
    assert not staging.exists()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"user_bias": np.zeros(3)}, "user_bias: 3 rows, but 2 user ids"),
        ({"history_indptr": np.array([0, 5, 1])}, "non-decreasing"),
        ({"history_indptr": np.array([0, 1, 2])}, "CSR history"),
        ({"B_idx": np.zeros((2, 2))}, "must hold integers"),
        ({"history_timestamps": np.zeros(2)}, "history_timestamps: shape"),
    ],
)
def test_write_user_shard_refuses_inconsistent_arrays(tmp_path, change, message):
    args = {
        "user_ids": ["a", "b"],
        "user_bias": np.zeros(2),
        "W": np.zeros((2, 3)),
        "B_idx": np.zeros((2, 2), np.int64),
        "B_val": np.zeros((2, 2)),
        "history_indptr": np.array([0, 1, 1]),
        "history_items": np.array([4]),
        "history_ratings": np.array([3.0]),
        **change,
    }
    with pytest.raises(ValueError, match=message):
        write_user_shard(tmp_path, 0, **args)


def test_user_index_from_utf8_buffers_equals_the_index_of_the_ids():
    import random

    from lrs_rec.user_index import UserIndex

    rnd = random.Random(1)
    alphabet = "abc019_-é漢"
    ids = list(
        dict.fromkeys(
            "".join(rnd.choice(alphabet) for _ in range(rnd.randint(1, 12))) for _ in range(70_000)
        )
    )
    for case in (ids, ids[:1], ["x\x00", "y"], []):  # many chunks, one id, NUL fallback, none
        raw = [u.encode("utf-8") for u in case]
        data = np.frombuffer(b"".join(raw), dtype=np.uint8)
        offsets = np.concatenate([[0], np.cumsum([len(b) for b in raw])]).astype(np.int64)
        fast, ref = UserIndex.from_utf8(data, offsets), UserIndex(case)
        assert list(fast) == list(ref) == case
        assert len(fast) == len(case)
        for u in [*case[:500], "", "zz", "é", "abc漢", "x"]:
            assert fast.get(u) == ref.get(u), u
    with pytest.raises(ValueError, match="distinct"):
        UserIndex.from_utf8(np.frombuffer(b"abab", dtype=np.uint8), np.array([0, 2, 4]))
