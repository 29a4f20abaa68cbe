"""The server loads only the shared part of a model directory (issue 15): compact user index, the
onboarding prior stored at save time, old directories without it, no per-user array read."""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

import numpy as np
import pytest
from lrs_rec.training.testing import random_trained_model

import lrs_rec.onboarding as onboarding_core
from lrs_rec.model_dir import (
    ARRAYS,
    MANIFEST,
    PRIOR_ARRAYS,
    SHARED_ARRAYS,
    ModelDirError,
    load_model_dir,
    load_shared_model_dir,
    save_model_dir,
)
from lrs_rec.model_onboarding import build_onboarder, shared_onboarder
from lrs_rec.user_index import UserIndex


# -- the compact user index against a dict ----------------------------------------------------------
def test_user_index_equals_a_dict_of_the_same_ids():
    rnd = random.Random(0)
    alphabet = "abc019_-é漢"
    ids = list(
        dict.fromkeys(
            "".join(rnd.choice(alphabet) for _ in range(rnd.randint(1, 9))) for _ in range(2000)
        )
    )
    ids += ["a", "ab", "abc", "abc\x01"]
    ids = list(dict.fromkeys(ids))
    ref = {u: i for i, u in enumerate(ids)}
    idx = UserIndex(ids)
    assert len(idx) == len(ref)
    assert list(idx) == ids
    probes = [*ids, "", "zzz", "a" * 50, "ab\x00", "abcd", "é", "漢漢漢漢漢漢漢漢漢漢"]
    probes += [
        "".join(rnd.choice(alphabet) for _ in range(rnd.randint(1, 10))) for _ in range(2000)
    ]
    for u in probes:
        assert idx.get(u) == ref.get(u), u
        assert (u in idx) == (u in ref)
    assert idx.get(3) is None  # type: ignore[arg-type]
    with pytest.raises(KeyError):
        idx["nope"]
    with pytest.raises(ValueError, match="distinct"):
        UserIndex(["x", "y", "x"])
    assert len(UserIndex([])) == 0 and UserIndex([]).get("x") is None


# -- the onboarding prior stored at save time -------------------------------------------------------
def _model(**kw):
    return random_trained_model(
        n_users=60, n_items=30, d=8, rank=3, sparsity=2, ratings_per_user=6, **kw
    )


def _strip_prior(model_dir: Path) -> None:
    """Rewrite ``model_dir`` the way directories were written before the prior was stored."""
    with np.load(model_dir / ARRAYS, allow_pickle=False) as z:
        arrays = {n: z[n] for n in z.files if n not in PRIOR_ARRAYS}
    np.savez(model_dir / ARRAYS, **arrays)
    manifest = json.loads((model_dir / MANIFEST).read_text())
    del manifest["onboarding_prior_sha256"]
    (model_dir / MANIFEST).write_text(json.dumps(manifest))


def test_stored_prior_is_the_estimated_one_and_fits_identically(tmp_path):
    saved = save_model_dir(_model(), tmp_path / "new")
    full = load_model_dir(tmp_path / "new")
    assert full.onboarding_prior is not None
    estimated = build_onboarder(dataclasses.replace(full, onboarding_prior=None)).steps[0].prior
    for f in ("t_mean", "t_cov", "item_desc", "m_mean", "C_mm", "S_within", "C_tm"):
        np.testing.assert_array_equal(getattr(full.onboarding_prior, f), getattr(estimated, f))
    assert full.onboarding_prior.noise_var == estimated.noise_var
    # an old directory (no stored prior) serves the same fits: estimated once at first need
    save_model_dir(saved, tmp_path / "old")
    _strip_prior(tmp_path / "old")
    assert load_model_dir(tmp_path / "old").onboarding_prior is None
    onb_new = shared_onboarder(load_shared_model_dir(tmp_path / "new"))
    onb_old = shared_onboarder(load_shared_model_dir(tmp_path / "old"))
    onb_ref = build_onboarder(load_model_dir(tmp_path / "old"))
    for items, ratings in (
        ([1, 4, 7], [5.0, 2.0, 4.0]),
        (list(range(12)), [3.0] * 12),
        ([2], [1.0]),
    ):
        fits = [o.fit(np.array(items), np.array(ratings)) for o in (onb_new, onb_old, onb_ref)]
        for got in fits[1:]:
            np.testing.assert_array_equal(got.w, fits[0].w)
            np.testing.assert_array_equal(got.b_idx, fits[0].b_idx)
            np.testing.assert_array_equal(got.b_val, fits[0].b_val)
            assert got.user_bias == fits[0].user_bias


def test_prior_estimated_in_blocks_equals_one_block(monkeypatch):
    model = random_trained_model(
        n_users=80, n_items=40, d=8, rank=3, sparsity=2, ratings_per_user=7
    )
    one = build_onboarder(model).steps[0].prior
    monkeypatch.setattr(onboarding_core, "_BLOCK_RATINGS", 5)  # many blocks, users split across
    blocks = build_onboarder(model).steps[0].prior
    for f in ("t_mean", "t_cov", "item_desc", "m_mean", "C_mm", "S_within", "C_tm"):
        np.testing.assert_allclose(getattr(blocks, f), getattr(one, f), rtol=1e-12, atol=1e-14)
    assert blocks.noise_var == pytest.approx(one.noise_var, rel=1e-12)
    assert blocks.b_var == one.b_var


def test_shared_load_reads_no_per_user_array(tmp_path, monkeypatch):
    save_model_dir(_model(), tmp_path / "m")
    read: list[str] = []
    real = np.lib.npyio.NpzFile.__getitem__

    def spy(self, key):  # type: ignore[no-untyped-def]
        read.append(key)
        return real(self, key)

    import pyarrow.parquet as pq

    columns: list[object] = []
    real_read, real_file_read = pq.read_table, pq.ParquetFile.read

    def spy_read(path, *args, **kw):  # type: ignore[no-untyped-def]
        columns.append(kw.get("columns"))
        return real_read(path, *args, **kw)

    def spy_file_read(self, *args, **kw):  # type: ignore[no-untyped-def]
        columns.append(kw.get("columns"))
        return real_file_read(self, *args, **kw)

    monkeypatch.setattr(np.lib.npyio.NpzFile, "__getitem__", spy)
    monkeypatch.setattr(pq, "read_table", spy_read)
    monkeypatch.setattr(pq.ParquetFile, "read", spy_file_read)
    shared = load_shared_model_dir(tmp_path / "m")
    assert set(read) == set(SHARED_ARRAYS) | set(PRIOR_ARRAYS)
    assert columns == [["user_id"]]  # of the shards (format 2) only the ids are read
    assert shared.n_users == 60 and shared.users.get("u7") == 7 and shared.sparsity == 2
    # per-user attributes are there for tools and tests: they load the whole directory
    columns.clear()
    np.testing.assert_array_equal(
        shared.user_history(7)[0], load_model_dir(tmp_path / "m").user_history(7)[0]
    )
    assert None in columns  # whole shards read
    with pytest.raises(AttributeError):
        shared.no_such_attribute  # noqa: B018


def test_shared_load_of_a_format_1_directory_reads_no_per_user_array(tmp_path, monkeypatch):
    from legacy_model_dir import save_legacy_model_dir

    model = _model()
    save_legacy_model_dir(model, tmp_path / "old")
    read: list[str] = []
    real = np.lib.npyio.NpzFile.__getitem__

    def spy(self, key):  # type: ignore[no-untyped-def]
        read.append(key)
        return real(self, key)

    monkeypatch.setattr(np.lib.npyio.NpzFile, "__getitem__", spy)
    shared = load_shared_model_dir(tmp_path / "old")
    assert set(read) == set(SHARED_ARRAYS) | set(PRIOR_ARRAYS)
    assert shared.n_users == 60 and shared.users.get("u7") == 7 and shared.sparsity == 2
    read.clear()
    np.testing.assert_array_equal(shared.lrs.W, model.lrs.W)
    assert "W" in read and "history_items" in read


def test_tampered_or_partial_prior_is_refused(tmp_path):
    save_model_dir(_model(), tmp_path / "m")
    with np.load(tmp_path / "m" / ARRAYS, allow_pickle=False) as z:
        arrays = {n: z[n] for n in z.files}
    arrays["onboarding_prior_t_mean"] = arrays["onboarding_prior_t_mean"] + 1.0
    np.savez(tmp_path / "m" / ARRAYS, **arrays)
    for load in (load_model_dir, load_shared_model_dir):
        with pytest.raises(ModelDirError, match="onboarding_prior_sha256"):
            load(tmp_path / "m")
    del arrays["onboarding_prior_C_tm"]
    np.savez(tmp_path / "m" / ARRAYS, **arrays)
    with pytest.raises(ModelDirError, match="incomplete onboarding prior"):
        load_shared_model_dir(tmp_path / "m")


def test_private_model_stores_no_prior(tmp_path):
    model = _model()
    model = dataclasses.replace(model, manifest={"privacy": {"epsilon": 1.0, "delta": 1e-6}})
    save_model_dir(model, tmp_path / "p")
    with np.load(tmp_path / "p" / ARRAYS, allow_pickle=False) as z:
        assert not set(PRIOR_ARRAYS) & set(z.files)
    assert "onboarding_prior_sha256" not in json.loads((tmp_path / "p" / MANIFEST).read_text())


# -- publish: RESP packed here, compact histories ------------------------------------------------------
def test_resp_hset_equals_redis_py_packing():
    from lrs_rec.serving.store import resp_hset
    from redis.connection import Connection

    conn = Connection()
    rng = np.random.default_rng(0)
    for n in (1, 3, 128):
        fields = [str(i).encode() for i in range(n)]
        values = [rng.bytes(int(rng.integers(0, 300))) for _ in range(n)]
        args = ["HSET", b"lrs:v1:{b7}:h"]
        for f, v in zip(fields, values, strict=True):
            args += [f, v]
        want = b"".join(conn.pack_command(*args))
        assert resp_hset(b"lrs:v1:{b7}:h", fields, values) == want


def test_history_encoder_max_size_is_the_longest_record():
    from lrs_rec.serving.encoding import HistoryEncoder

    indptr = np.array([0, 3, 3, 10, 12])
    items = np.arange(12) % 5
    ratings = np.ones(12)
    for cap in (None, 2, 5, 100):
        enc = HistoryEncoder(indptr, items, ratings, n_items=300, cap=cap)
        assert enc.max_size() == max(len(enc.record(u)) for u in range(4))
