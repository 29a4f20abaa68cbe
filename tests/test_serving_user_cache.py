"""The per-process cache of users' Redis rows (serving.user_cache, ``serve --user-cache``) and the
direct JSON of a recommend answer (serving.render), each next to its slow twin: cache on == cache
off, byte for byte; a write by another client, an erasure and a lost connection are seen by the
next request; the cache stays within its bound; ``recommend_json`` == orjson of the answer's dict.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import redis
from fastapi.testclient import TestClient
from lrs_rec.serving.app import create_app
from lrs_rec.serving.connection import connect, embedded_socket
from lrs_rec.serving.guards import ServeLimits
from lrs_rec.serving.recommender import Recommender, TopItems
from lrs_rec.serving.render import item_fragments, recommend_json, reference_recommend_json
from lrs_rec.serving.store import RedisStore
from lrs_rec.serving.user_cache import UserCache
from lrs_rec.training.testing import write_random_model_dirs

from lrs_rec.model_dir import load_model_dir

pytestmark = [pytest.mark.redis, pytest.mark.timeout(120)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    dirs = write_random_model_dirs(
        tmp_path_factory.mktemp("models"), {"a": 5},
        n_users=80, n_items=50, d=12, rank=4, sparsity=4, ratings_per_user=6,
    )  # fmt: skip
    return dirs["a"]


def _publish(model_dir: Path, home: Path) -> RedisStore:
    store = RedisStore(connect(home=home))
    store.publish(load_model_dir(model_dir), model_dir=str(model_dir))
    return store


def _app(model_dir: Path, home: Path, cache: int) -> tuple[TestClient, object]:
    rec = Recommender(model_dir, home=home, version_refresh_interval=0)
    app = create_app(rec, limits=ServeLimits(user_cache=cache))
    return TestClient(app), app


def _ask(client: TestClient, user: str, n: int = 7, exclude: bool = True) -> bytes:
    r = client.post("/v1/recommend", json={"user_id": user, "n": n, "exclude_rated": exclude})
    assert r.status_code == 200, r.text
    return r.content


# -- the JSON of an answer ----------------------------------------------------------------------
def test_recommend_json_equals_orjson_of_the_dict(model_dir):
    from lrs_rec.serving.recommender import _load

    loaded = _load(model_dir, 1)
    # awkward ids: quotes, backslashes, non-ASCII, control characters
    odd = ['a"b', "c\\d", "é€😀", "tab\there", "x" * 60]
    frags = item_fragments([*odd, *loaded.item_ids.tolist()[len(odd) :]])
    names = np.asarray([*odd, *loaded.item_ids.tolist()[len(odd) :]], dtype=object)
    fake = dataclasses.replace(loaded, json_items=frags, item_ids=names)
    rng = np.random.default_rng(0)
    for n in (0, 1, 2, 7, 50):
        for personalized in (True, False):
            items = rng.permutation(len(names))[:n].astype(np.int64)
            scores = (rng.normal(3, 2, n) * 10.0 ** rng.integers(-8, 8, n)).astype(np.float32)
            top = TopItems('u"1é', items, scores, personalized, fake)
            assert recommend_json(top) == reference_recommend_json(top.result())
            assert json.loads(recommend_json(top))["items"] == [
                {"item_id": i, "score": s} for i, s in top.result().items
            ]


# -- the cache --------------------------------------------------------------------------------
def test_user_cache_unit_lru_bound_invalidation_and_drop():
    cache = UserCache(3)
    keys = {u: (f"p{u % 2}".encode(), f"h{u % 2}".encode()) for u in range(5)}
    for u in range(5):
        cache.put("v1", f"u{u}", keys[u], b"r%d" % u, b"h%d" % u, True)
    assert len(cache) == 3  # bounded: u0, u1 evicted (least recently used)
    assert cache.get("v1", "u0", True) is None
    assert cache.get("v1", "u4", True) == (b"r4", b"h4")
    assert cache.get("v1", "u4", False) == (b"r4", None)
    cache.put("v1", "nohist", (b"p9", b"h9"), b"r", None, False)
    assert cache.get("v1", "nohist", True) is None  # its history was not read: a miss
    assert cache.get("v1", "nohist", False) == (b"r", None)
    cache.invalidate([b"h0"])  # the history hash of u2, u4 changed
    assert cache.get("v1", "u4", True) is None and cache.get("v1", "u2", True) is None
    cache.put("v2", "u3", keys[3], b"x", b"y", True)
    cache.drop_user("u3")  # every version
    assert cache.get("v1", "u3", True) is None and cache.get("v2", "u3", True) is None
    cache.invalidate(None)
    assert len(cache) == 0 and not cache._by_key
    with pytest.raises(ValueError, match="max_entries"):
        UserCache(0)


def test_cache_on_and_off_give_identical_answers(model_dir, home):
    _publish(model_dir, home)
    users = [f"u{i}" for i in range(0, 80, 3)] + ["nobody", "u5"]
    asks = [(u, 3 + k % 9, k % 3 != 0) for k, u in enumerate(users)] * 3
    cached, app = _app(model_dir, home, 1000)
    plain, plain_app = _app(model_dir, home, 0)
    with cached, plain:
        for u, n, excl in asks:
            assert _ask(cached, u, n, excl) == _ask(plain, u, n, excl)
        stats = app.state.front.cache.stats()
        assert plain_app.state.front.cache is None
    assert stats["hits"] > len(asks) // 2  # the repeats were served from the cache
    assert stats["misses"] >= len(set(users))


def _row(store: RedisStore, user: str, index: int | None) -> tuple[object, bytes, bytes]:
    meta = store.meta(store.current_version())
    loc = store.locate(meta, user, index)
    return loc, store.r.hget(loc.params_key, loc.field), store.r.hget(loc.history_key, loc.field)


def test_a_write_by_another_client_is_seen_by_the_next_request(model_dir, home):
    store = _publish(model_dir, home)
    model = load_model_dir(model_dir)
    index = model.user_index()
    reference = Recommender(model_dir, home=home, version_refresh_interval=0)  # no cache
    client, app = _app(model_dir, home, 1000)
    with client:
        before = _ask(client, "u1")
        assert _ask(client, "u1") == before
        hits = app.state.front.cache.hits
        assert hits >= 1  # the second answer came from the cache
        # another process's writer (its own connection): u1 gets u2's record and history
        other = RedisStore(connect(home=home))
        _, record2, history2 = _row(store, "u2", index["u2"])
        meta = other.meta(other.current_version())
        other.put_user(meta, "u1", index["u1"], record2, history2)
        after = _ask(client, "u1")
        assert after != before
        assert json.loads(after)["items"] == [
            {"item_id": i, "score": s} for i, s in reference.recommend("u1", 7).items
        ]
        # a bare redis-py client (no lrs-rec): HSET, then any later command of that client
        raw = redis.Redis(unix_socket_path=embedded_socket(home))
        loc1, _, _ = _row(store, "u1", index["u1"])
        _, record3, history3 = _row(store, "u3", index["u3"])
        assert _ask(client, "u1") == after  # cached again
        raw.hset(loc1.params_key, loc1.field, record3)
        raw.hset(loc1.history_key, loc1.field, history3)
        raw.ping()
        expected = reference.recommend("u1", 7)
        assert json.loads(_ask(client, "u1"))["items"] == [
            {"item_id": i, "score": s} for i, s in expected.items
        ]
        assert app.state.front.cache.invalidations >= 2
        raw.close()


def test_erasure_through_this_server_or_another_is_honoured(model_dir, home):
    _publish(model_dir, home)
    client, _ = _app(model_dir, home, 1000)
    with client:
        for user in ("u4", "u6"):
            assert json.loads(_ask(client, user))["personalized"] is True
            assert json.loads(_ask(client, user))["personalized"] is True  # cached
        assert client.delete("/v1/users/u4").status_code == 200
        assert json.loads(_ask(client, "u4"))["personalized"] is False
        # erased by another process (its own Recommender and connection)
        from lrs_rec.serving.erasure import erase_user

        erase_user(Recommender(model_dir, home=home), "u6")
        assert json.loads(_ask(client, "u6"))["personalized"] is False


def test_onboarding_through_this_server_is_seen_at_once(model_dir, home):
    _publish(model_dir, home)
    client, _ = _app(model_dir, home, 1000)
    with client:
        assert json.loads(_ask(client, "newbie"))["personalized"] is False
        assert json.loads(_ask(client, "newbie"))["personalized"] is False  # cached (absent)
        items = load_model_dir(model_dir).item_ids[:4]
        body = {"ratings": [{"item_id": str(i), "rating": 5.0} for i in items]}
        assert client.put("/v1/users/newbie/ratings", json=body).status_code == 200
        answer = json.loads(_ask(client, "newbie"))
        assert answer["personalized"] is True
        assert not {x["item_id"] for x in answer["items"]} & {str(i) for i in items}


def test_a_lost_tracking_connection_empties_the_cache(model_dir, home):
    _publish(model_dir, home)
    client, app = _app(model_dir, home, 1000)
    raw = redis.Redis(unix_socket_path=embedded_socket(home))
    with client:
        first = _ask(client, "u7")
        _ask(client, "u8")
        cache = app.state.front.cache
        assert len(cache) == 2
        # kill every tracking connection (ours): its invalidations could be lost
        for c in raw.client_list():
            if "t" in c.get("flags", ""):
                raw.client_kill_filter(_id=c["id"])
        assert _ask(client, "u7") == first  # retried on a new connection, read from Redis
        assert len(cache) == 1  # emptied when the connection was lost, then u7 again
    raw.close()


def test_the_cache_stays_within_its_bound(model_dir, home):
    _publish(model_dir, home)
    client, app = _app(model_dir, home, 5)
    with client:
        for i in range(30):
            _ask(client, f"u{i}")
        assert len(app.state.front.cache) == 5
        text = client.get("/metrics").text
        assert 'lrs_user_cache_lookups_total{result="miss"} 30.0' in text
        assert "lrs_user_cache_entries 5.0" in text
