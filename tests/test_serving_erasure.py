"""Erasure (DELETE /v1/users/{id}) and access (GET /v1/users/{id}/ratings) against a real embedded
Redis: gone from every version, gone from the files on disk after an AOF rewrite, not brought back by
publishing a model trained before the erasure, re-onboarding as a new user."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from lrs_rec.serving import erasure
from lrs_rec.serving.app import create_app
from lrs_rec.serving.connection import connect
from lrs_rec.serving.encoding import decode_history
from lrs_rec.serving.onboarding import refit_for_publish
from lrs_rec.serving.recommender import Recommender
from lrs_rec.serving.store import RedisStore, VersionMeta
from lrs_rec.training.testing import write_random_model_dirs

from lrs_rec.model_dir import load_model_dir

pytestmark = pytest.mark.redis

N_USERS, N_ITEMS = 80, 40


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> dict[str, Path]:
    return write_random_model_dirs(
        tmp_path_factory.mktemp("erase_models"), {"a": 21, "b": 22},
        n_users=N_USERS, n_items=N_ITEMS, d=8, rank=4, sparsity=4, ratings_per_user=6,
        model_version="model-{name}",
    )  # fmt: skip


def _publish(store: RedisStore, model_dir: Path) -> VersionMeta:
    return store.publish(
        load_model_dir(model_dir), model_dir=str(model_dir), refit=refit_for_publish,
        carry_over_grace=0,
    )  # fmt: skip


@pytest.fixture
def served(model_dirs, home):
    """(store, recommender, test client) on model a, published twice (versions v1 and v2)."""
    store = RedisStore(connect(home=home))
    _publish(store, model_dirs["a"])
    _publish(store, model_dirs["a"])
    rec = Recommender(model_dirs["a"], home=home, version_refresh_interval=0)
    with TestClient(create_app(rec), raise_server_exceptions=False) as c:
        yield store, rec, c


def _slot(store: RedisStore, version: str, user: str, index: int | None):
    """(record, history) of ``user`` in ``version`` (``index``: trained index or None)."""
    loc = store.locate(store.meta(version), user, index)
    return store.r.hget(loc.params_key, loc.field), store.r.hget(loc.history_key, loc.field)


def test_get_ratings_returns_the_stored_history(served, model_dirs):
    _, _, c = served
    model = load_model_dir(model_dirs["a"])
    r = c.get("/v1/users/u4/ratings")
    assert r.status_code == 200
    body = r.json()
    items, ratings = model.user_history_by_time(4)
    assert [x["item_id"] for x in body["ratings"]] == [model.item_ids[i] for i in items]
    np.testing.assert_allclose([x["rating"] for x in body["ratings"]], ratings, rtol=1e-6)
    assert body["n_ratings"] == len(items) and body["updated_at"] is None
    assert body["store_version"] == "v2" and body["model_version"] == "model-a"
    # an onboarded user: their ratings in time order, the write time
    t0 = time.time()
    put = {"ratings": [{"item_id": "i3", "rating": 4.5}, {"item_id": "i7", "rating": 1.0}]}
    assert c.put("/v1/users/new%2F1/ratings", json=put).status_code == 200
    body = c.get("/v1/users/new%2F1/ratings").json()
    assert body["user_id"] == "new/1"
    assert body["ratings"] == [{"item_id": "i3", "rating": 4.5}, {"item_id": "i7", "rating": 1.0}]
    assert t0 - 1 <= body["updated_at"] <= time.time() + 1
    # unknown and impossible ids
    assert c.get("/v1/users/nobody/ratings").status_code == 404
    assert "no data is stored" in c.get("/v1/users/nobody/ratings").json()["error"]
    assert c.get("/v1/users/bad%0Aid/ratings").status_code == 422


def test_delete_removes_a_trained_user_from_every_version(served):
    store, _rec, c = served
    assert c.post("/v1/score", json={"user_id": "u5", "item_ids": ["i1"]}).json()["personalized"]
    for v in ("v1", "v2"):
        assert _slot(store, v, "u5", 5) != (None, None)
    r = c.delete("/v1/users/u5")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["erased"] is True and body["user_id"] == "u5"
    assert sorted(body["store_versions"]) == ["v1", "v2"] and body["unscrubbed_versions"] == []
    for v in ("v1", "v2"):
        assert _slot(store, v, "u5", 5) == (None, None)
    assert store.r.hexists(store.keys.erased, "u5")
    assert _slot(store, "v2", "u6", 6)[0] is not None  # neighbours in the bucket stay
    # served as unknown (population model), no history to exclude, nothing to read or erase
    res = c.post("/v1/recommend", json={"user_id": "u5", "n": 3}).json()
    assert res["personalized"] is False
    assert (
        res["items"] == c.post("/v1/recommend", json={"user_id": "ghost", "n": 3}).json()["items"]
    )
    assert c.get("/v1/users/u5/ratings").status_code == 404
    assert c.delete("/v1/users/u5").status_code == 404
    assert c.delete("/v1/users/nobody").status_code == 404
    assert c.delete("/v1/users/bad%0Aid").status_code == 422


def test_delete_removes_an_onboarded_user_and_their_marker(served):
    store, _, c = served
    put = {"ratings": [{"item_id": "i2", "rating": 3.0}]}
    assert c.put("/v1/users/fresh/ratings", json=put).status_code == 200
    assert "fresh" in store.onboarded_users("v2")
    assert c.delete("/v1/users/fresh").status_code == 200
    assert "fresh" not in store.onboarded_users("v2")
    assert _slot(store, "v2", "fresh", None) == (None, None)
    # the next publish has nothing to carry over
    assert _publish(store, Path(store.meta("v2").model_dir)).n_carried_over == 0


def test_publish_of_the_old_model_does_not_bring_an_erased_user_back(served, model_dirs):
    store, _, c = served
    assert c.delete("/v1/users/u7").status_code == 200
    # model a still holds u7's training rows: publishing it (again) must not write them
    v3 = _publish(store, model_dirs["a"])
    assert _slot(store, v3.version, "u7", 7) == (None, None)
    assert _slot(store, v3.version, "u8", 8)[0] is not None
    # a server started now, on the directory that still contains u7, serves them as unknown
    rec2 = Recommender(model_dirs["a"], home=store.handle.home, version_refresh_interval=0)
    assert rec2.score("u7", ["i1"]).personalized is False
    assert rec2.recommend("u7", 3).personalized is False
    # an erasure made while a publish writes its buckets: the publish took its snapshot of the
    # markers before it, so it wrote the row, then removes it again before the switch
    real = store.erased_marks
    calls = []

    def stale_first(*a, **k):
        calls.append(1)
        return {} if len(calls) == 1 else real(*a, **k)

    store.erased_marks = stale_first  # type: ignore[method-assign]
    v4 = _publish(store, model_dirs["a"])
    assert len(calls) == 2 and _slot(store, v4.version, "u7", 7) == (None, None)


def test_reonboarding_after_erasure_is_a_new_user(served, model_dirs):
    store, _rec, c = served
    assert c.delete("/v1/users/u9").status_code == 200
    put = {"ratings": [{"item_id": "i11", "rating": 5.0}]}
    r = c.put("/v1/users/u9/ratings", json=put)
    assert r.status_code == 200 and r.json()["n_ratings"] == 1  # not the training history + 1
    assert c.get("/v1/users/u9/ratings").json()["ratings"] == [{"item_id": "i11", "rating": 5.0}]
    assert c.post("/v1/score", json={"user_id": "u9", "item_ids": ["i1"]}).json()["personalized"]
    assert store.r.hexists(store.keys.erased, "u9")  # the marker stays
    # a publish of the old model carries the new user over, without the old training rows
    v3 = _publish(store, model_dirs["a"])
    assert v3.n_carried_over == 1
    assert c.get("/v1/users/u9/ratings").json()["ratings"] == [{"item_id": "i11", "rating": 5.0}]
    # and so does one of another model that has u9 as a trained user too (refitted, new history)
    v4 = _publish(store, model_dirs["b"])
    _, hist = _slot(store, v4.version, "u9", load_model_dir(model_dirs["b"]).user_index()["u9"])
    items, ratings = decode_history(hist)
    assert load_model_dir(model_dirs["b"]).item_ids[items[0]] == "i11" and ratings.tolist() == [5.0]


def test_erasure_during_a_carry_over_is_not_undone(served, model_dirs):
    """A user erased between the carry-over's read of the old version and its write into the new
    one is not written (update_user compares the user's erasure marker)."""
    store, rec, c = served
    put = {"ratings": [{"item_id": "i5", "rating": 2.0}]}
    assert c.put("/v1/users/racer/ratings", json=put).status_code == 200
    real_fetch = store.fetch

    def fetch_then_erase(locs, *, with_history):
        out = real_fetch(locs, with_history=with_history)
        if with_history and len(locs) == 1:  # the carry-over's read
            erasure.erase_user(rec, "racer")
        return out

    store.fetch = fetch_then_erase  # type: ignore[method-assign]
    v3 = _publish(store, model_dirs["a"])
    store.fetch = real_fetch  # type: ignore[method-assign]
    assert v3.n_carried_over == 0
    assert _slot(store, v3.version, "racer", None) == (None, None)
    assert "racer" not in store.onboarded_users(v3.version)


def test_unresolvable_version_is_reported_and_scrubbed_on_rollback(
    served, model_dirs, tmp_path, monkeypatch, capsys
):
    """A version whose model directory no longer holds its model: its trained rows cannot be
    located, the response says so (the onboarded data there is still removed); a rollback to it
    (`publish --switch`) removes them first, or refuses while the directory is missing."""
    import json
    import shutil

    from lrs_rec.serving.cli import main as cli_main

    store, _, c = served
    monkeypatch.setenv("LRS_HOME", str(store.handle.home))
    monkeypatch.delenv("LRS_REDIS_URL", raising=False)
    moved = tmp_path / "gone"
    shutil.copytree(model_dirs["b"], moved)
    _publish(store, moved)  # v3: model b, not the served one
    _publish(store, model_dirs["a"])  # v4: the served model again
    shutil.rmtree(moved)
    body = c.delete("/v1/users/u3").json()
    assert body["unscrubbed_versions"] == ["v3"]
    assert sorted(body["store_versions"]) == ["v1", "v2", "v3", "v4"]
    for v in ("v1", "v2", "v4"):
        assert _slot(store, v, "u3", 3) == (None, None)
    index_b = load_model_dir(model_dirs["b"]).user_index()["u3"]
    assert _slot(store, "v3", "u3", index_b)[0] is not None  # what "unscrubbed" means
    assert cli_main(["publish", "--switch", "v3"]) == 2
    assert "users were erased since" in capsys.readouterr().err
    assert store.current_version() == "v4"
    shutil.copytree(model_dirs["b"], moved)  # the directory is back: the rollback scrubs first
    assert cli_main(["publish", "--switch", "v3", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"current": "v3", "erased_users_scrubbed": 1}
    assert _slot(store, "v3", "u3", index_b) == (None, None)
    assert _slot(store, "v3", "u4", load_model_dir(moved).user_index()["u4"])[0] is not None


def test_no_copy_survives_an_aof_rewrite(served, home):
    """The stored history of an erased user is in no file of the Redis data directory after
    BGREWRITEAOF (and BGSAVE): checked against a positive control taken before the erasure."""
    store, _, c = served
    r = store.r
    # plain commands in the rewritten AOF and uncompressed RDB strings, so that a copy of the
    # bytes would be found by a byte search (the control below proves it is)
    r.config_set("aof-use-rdb-preamble", "no")
    r.config_set("rdbcompression", "no")
    ratings = [{"item_id": f"i{j}", "rating": 1.0 + 0.125 * j} for j in range(1, 30)]
    assert c.put("/v1/users/secret-user-7f3a/ratings", json={"ratings": ratings}).status_code == 200
    record, hist = _slot(store, "v2", "secret-user-7f3a", None)
    assert record is not None and len(hist) > 100
    data_dir = Path(r.config_get("dir")["dir"])

    def on_disk(blob: bytes) -> list[str]:
        _rewrite(r)
        return [p.name for p in data_dir.rglob("*") if p.is_file() and blob in p.read_bytes()]

    assert on_disk(hist) and on_disk(record)  # the control: found before the erasure
    assert c.delete("/v1/users/secret-user-7f3a").status_code == 200
    assert on_disk(hist) == [] and on_disk(record) == []


def _rewrite(r) -> None:
    """BGREWRITEAOF and BGSAVE, waiting for both to finish."""
    for cmd in ("BGREWRITEAOF", "BGSAVE"):
        deadline = time.monotonic() + 30
        while True:
            try:
                r.execute_command(cmd)
                break
            except Exception as e:  # another background job running: wait for it
                assert "in progress" in str(e) or "already" in str(e), e
                assert time.monotonic() < deadline
                time.sleep(0.05)
        while True:
            info = r.info("persistence")
            busy = info["aof_rewrite_in_progress"] or info["aof_rewrite_scheduled"]
            if not busy and not info["rdb_bgsave_in_progress"]:
                break
            assert time.monotonic() < deadline, info
            time.sleep(0.05)
