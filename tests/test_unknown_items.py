"""Unknown items (issue 12 §2) over HTTP against a real embedded Redis: the score fallback and its
``unknown_item_ids``, ``--unknown-items error``, onboarding's ``ignored_item_ids``, and the stored
history that keeps those ratings by external id through publishes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from lrs_rec.serving.app import create_app
from lrs_rec.serving.cli import build_parser
from lrs_rec.serving.connection import connect
from lrs_rec.serving.encoding import (
    RecordError,
    decode_history,
    decode_history_unknown,
    encode_history,
)
from lrs_rec.serving.history import history_ratings, merge_unknown
from lrs_rec.serving.onboarding import onboarder_for, refit_for_publish
from lrs_rec.serving.recommender import Recommender
from lrs_rec.serving.store import RedisStore
from lrs_rec.training.testing import random_trained_model, write_model_dir

from lrs_rec.model_dir import load_model_dir

KW = {"n_users": 80, "d": 16, "rank": 4, "sparsity": 4, "ratings_per_user": 6}


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> dict[str, Path]:
    """``a``: items i0..i39; ``big``: i0..i49 (knows i45); ``small``: i0..i29 (lost i35)."""
    root = tmp_path_factory.mktemp("unknown_items")
    out = {}
    for name, n_items, seed in (("a", 40, 1), ("big", 50, 2), ("small", 30, 3)):
        model = random_trained_model(
            n_items=n_items, random_state=seed, model_version=f"m-{name}", **KW
        )
        write_model_dir(model, root / name)
        out[name] = root / name
    return out


def _serve(model_dir: Path, home: Path, **kw: object) -> Recommender:
    store = RedisStore(connect(home=home))
    store.publish(load_model_dir(model_dir), model_dir=str(model_dir), refit=refit_for_publish)
    return Recommender(model_dir, home=home, version_refresh_interval=0, **kw)  # type: ignore[arg-type]


def _stored(rec: Recommender, user_id: str) -> bytes:
    meta = rec.refresh(force=True)
    index = rec.model.user_index().get(user_id)
    _, hist = rec.store.fetch([rec.store.locate(meta, user_id, index)], with_history=True)[0]
    assert hist is not None
    return bytes(hist)


# -- pure: the history record keeps unknown items by id -------------------------------------------
def test_history_record_with_unknown_items_round_trips():
    plain = encode_history([1, 2], [4.0, 5.0], n_items=10)
    assert decode_history_unknown(plain) == []  # format 1 unchanged, no list
    assert plain == encode_history([1, 2], [4.0, 5.0], n_items=10, unknown=[])
    unknown = [("new-é", 3.0), ("x" * 256, 1.5)]
    blob = encode_history([1, 2], [4.0, 5.0], n_items=10, unknown=unknown)
    assert blob[0] >> 4 == 2
    items, ratings = decode_history(blob)
    assert items.tolist() == [1, 2] and ratings.tolist() == [4.0, 5.0]
    assert decode_history_unknown(blob) == unknown
    only = encode_history([], [], n_items=10, unknown=[("z", 2.0)])
    assert decode_history(only)[0].size == 0 and decode_history_unknown(only) == [("z", 2.0)]
    with pytest.raises(RecordError, match="checksum"):
        decode_history_unknown(blob[:-1] + bytes([blob[-1] ^ 1]))
    with pytest.raises(RecordError):
        decode_history(blob[:-6] + blob[-4:])
    names = ["i0", "i1", "i2"]
    assert history_ratings(items, ratings, unknown, names) == [
        ("i1", 4.0),
        ("i2", 5.0),
        *unknown,
    ]


def test_merge_unknown_replaces_rerated_ids_and_caps():
    old = [("a", 1.0), ("b", 2.0), ("c", 3.0)]
    assert merge_unknown(old, [("b", 5.0), ("d", 4.0)], 3) == [("c", 3.0), ("b", 5.0), ("d", 4.0)]
    assert merge_unknown(old, [], 0) == []


# -- over HTTP ---------------------------------------------------------------------------------------
@pytest.mark.redis
def test_score_falls_back_for_unknown_items_and_names_them(dirs, home):
    rec = _serve(dirs["a"], home)
    model = load_model_dir(dirs["a"])
    with TestClient(create_app(rec), raise_server_exceptions=False) as c:
        ids = ["i2", "zzz", "i30", "new/2"]
        r = c.post("/v1/score", json={"user_id": "u7", "item_ids": ids})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["unknown_item_ids"] == ["zzz", "new/2"] and body["personalized"] is True
        known = c.post("/v1/score", json={"user_id": "u7", "item_ids": ["i2", "i30"]}).json()
        assert known["unknown_item_ids"] == []
        # the same as without the unknown ids (float32 graph, rounding order may differ)
        assert [body["scores"][0], body["scores"][2]] == pytest.approx(known["scores"], rel=1e-6)
        # the fallback: μ + c_u, clipped (item bias and features 0): TrainedModel.predict's item -1
        want = model.predict(np.array([7] * 4), np.array([2, -1, 30, -1]))
        np.testing.assert_allclose(body["scores"], want, atol=2e-2)  # float16 record
        fallback = float(np.clip(model.global_mean + model.user_bias[7], 1, 5))
        assert abs(body["scores"][1] - fallback) < 2e-2 and body["scores"][1] == body["scores"][3]
        # unknown user and unknown item: the global mean (population, c_u = 0)
        r = c.post("/v1/score", json={"user_id": "nobody", "item_ids": ["zzz"]}).json()
        assert r["personalized"] is False and r["unknown_item_ids"] == ["zzz"]
        assert r["scores"] == pytest.approx([float(np.clip(model.global_mean, 1, 5))], abs=1e-5)


@pytest.mark.redis
def test_unknown_items_error_mode_keeps_the_strict_4xx(dirs, home):
    rec = _serve(dirs["a"], home, unknown_items="error")
    with TestClient(create_app(rec), raise_server_exceptions=False) as c:
        r = c.post("/v1/score", json={"user_id": "u1", "item_ids": ["i1", "zzz"]})
        assert r.status_code == 422 and "unknown item ids: 'zzz'" in r.json()["error"]
        assert r.json()["unknown_item_ids"] == ["zzz"]
        body = {"ratings": [{"item_id": "i1", "rating": 4}, {"item_id": "nope", "rating": 3}]}
        r = c.put("/v1/users/newbie/ratings", json=body)
        assert r.status_code == 422 and "'nope'" in r.json()["error"]
    assert rec.store.onboarded_users(rec.store_version or "v1") == {}  # nothing written
    args = build_parser().parse_args(["serve", "--model", "m"])
    assert args.unknown_items == "fallback"
    args = build_parser().parse_args(["serve", "--model", "m", "--unknown-items", "error"])
    assert args.unknown_items == "error"
    with pytest.raises(ValueError, match="unknown_items"):
        Recommender(dirs["a"], home=home, unknown_items="maybe")


@pytest.mark.redis
def test_onboarding_keeps_unknown_items_in_the_history_but_not_in_the_fit(dirs, home):
    rec = _serve(dirs["a"], home)
    model = rec.model
    onb = onboarder_for(model)
    with TestClient(create_app(rec), raise_server_exceptions=False) as c:
        body = {
            "ratings": [
                {"item_id": "i3", "rating": 5.0},
                {"item_id": "brand-new", "rating": 2.0},
                {"item_id": "i4", "rating": 1.0},
                {"item_id": "i45", "rating": 4.0},
            ]
        }
        r = c.put("/v1/users/newbie/ratings", json=body)
        assert r.status_code == 200, r.text
        assert r.json() == {
            "user_id": "newbie",
            "n_ratings": 2,
            "personalized": True,
            "model_version": "m-a",
            "ignored_item_ids": ["brand-new", "i45"],
        }
        # the fit saw the known items only
        want = onb.predict(onb.fit(np.array([3, 4]), np.array([5.0, 1.0])), np.array([0, 5]))
        got = c.post("/v1/score", json={"user_id": "newbie", "item_ids": ["i0", "i5"]}).json()
        np.testing.assert_allclose(got["scores"], want, atol=2e-2)
        # ... and the stored history keeps every rating, the unknown ones by external id
        hist = _stored(rec, "newbie")
        assert decode_history(hist)[0].tolist() == [3, 4]
        assert decode_history_unknown(hist) == [("brand-new", 2.0), ("i45", 4.0)]
        # a later request: re-rating an unknown item replaces it; known history refitted in full
        more = {
            "ratings": [{"item_id": "brand-new", "rating": 5.0}, {"item_id": "i9", "rating": 3}]
        }
        r = c.put("/v1/users/newbie/ratings", json=more).json()
        assert r["n_ratings"] == 3 and r["ignored_item_ids"] == ["brand-new"]
        hist = _stored(rec, "newbie")
        assert decode_history_unknown(hist) == [("i45", 4.0), ("brand-new", 5.0)]
        # the stored-history export (GET, serving.erasure) lists them too, after the known ones
        got = c.get("/v1/users/newbie/ratings").json()["ratings"]
        assert got == [
            {"item_id": "i3", "rating": 5.0},
            {"item_id": "i4", "rating": 1.0},
            {"item_id": "i9", "rating": 3.0},
            {"item_id": "i45", "rating": 4.0},
            {"item_id": "brand-new", "rating": 5.0},
        ]
        # only unknown items, new user: stored, answered with the population model
        r = c.put("/v1/users/fresh/ratings", json={"ratings": [{"item_id": "q", "rating": 3}]})
        assert r.status_code == 200
        assert r.json()["n_ratings"] == 0 and r.json()["personalized"] is False
        assert r.json()["ignored_item_ids"] == ["q"]
        assert decode_history_unknown(_stored(rec, "fresh")) == [("q", 3.0)]
        pop = c.post("/v1/score", json={"user_id": "nobody", "item_ids": ["i0", "i5"]}).json()
        fresh = c.post("/v1/score", json={"user_id": "fresh", "item_ids": ["i0", "i5"]}).json()
        np.testing.assert_allclose(fresh["scores"], pop["scores"], atol=2e-3)
        # a trained user's unknown item keeps their training history in the fit
        r = c.put("/v1/users/u5/ratings", json={"ratings": [{"item_id": "zz", "rating": 1}]})
        assert r.json()["n_ratings"] == model.user_history(5)[0].size


@pytest.mark.redis
def test_publish_carries_unknown_items_over_and_fits_them_once_known(dirs, home):
    rec = _serve(dirs["a"], home)
    rec.onboard("newbie", [("i3", 5.0), ("i35", 2.0), ("i45", 4.0), ("gone", 1.0)])
    store = rec.store
    # a model that knows i45: the carried rating joins the fitted history
    big = load_model_dir(dirs["big"])
    meta = store.publish(big, model_dir=str(dirs["big"]), refit=refit_for_publish)
    loc = store.locate(meta, "newbie", None)
    rec_b, hist = store.fetch([loc], with_history=True)[0]
    assert rec_b is not None and hist is not None
    items, ratings = decode_history(hist)
    assert sorted(zip(items.tolist(), ratings.tolist(), strict=True)) == [
        (3, 5.0),
        (35, 2.0),
        (45, 4.0),
    ]
    assert decode_history_unknown(hist) == [("gone", 1.0)]
    served = Recommender(dirs["big"], home=home, version_refresh_interval=0)
    onb = onboarder_for(served.model)
    want = onb.predict(onb.fit(items, ratings), np.array([0, 45]))
    np.testing.assert_allclose(served.score("newbie", ["i0", "i45"]).scores, want, atol=2e-2)
    # a model that no longer knows i35 / i45: they move to the unknown-item list, kept by id
    small = load_model_dir(dirs["small"])
    meta = store.publish(small, model_dir=str(dirs["small"]), refit=refit_for_publish)
    _, hist = store.fetch([store.locate(meta, "newbie", None)], with_history=True)[0]
    assert hist is not None
    assert decode_history(hist)[0].tolist() == [3]
    assert sorted(decode_history_unknown(hist)) == [("gone", 1.0), ("i35", 2.0), ("i45", 4.0)]
