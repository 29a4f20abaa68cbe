"""Every reader of per-user data works on a format-1 directory (written by the previous code path,
tests/legacy_model_dir.py) and gives what it gives on the same model saved as format 2 (issue 15):
offline predict / recommend, ``lrs-rec evaluate``, ``lrs-rec publish`` (same Redis keys and bytes),
the serving Recommender, the erasure vocabulary."""

from __future__ import annotations

import json

import numpy as np
import pytest
from legacy_model_dir import save_legacy_model_dir
from lrs_rec.serving.cli import main
from lrs_rec.serving.connection import connect, stop_embedded
from lrs_rec.serving.store import RedisStore
from lrs_rec.training.testing import random_trained_model

from lrs_rec import load_model
from lrs_rec.model_dir import read_manifest, save_model_dir

pytestmark = pytest.mark.redis


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    from lrs_rec.training.export import export_model_dir

    root = tmp_path_factory.mktemp("formats")
    model = random_trained_model(
        n_users=150, n_items=40, d=8, rank=3, sparsity=2, random_state=2, model_version="m-fmt"
    )
    save_legacy_model_dir(model, root / "old")
    save_model_dir(model, root / "new", shard_rows=64)
    for d in ("old", "new"):
        export_model_dir(root / d)
    assert read_manifest(root / "old")["format_version"] == 1
    assert read_manifest(root / "new")["format_version"] == 2
    ratings = root / "test.csv"
    rng = np.random.default_rng(0)
    rows = [
        f"u{rng.integers(0, 160)},i{rng.integers(0, 40)},{rng.integers(1, 6)}" for _ in range(300)
    ]
    ratings.write_text("user,item,rating\n" + "\n".join(rows) + "\n")
    return {"old": root / "old", "new": root / "new", "ratings": ratings}


def test_offline_predict_recommend_and_evaluate_agree(dirs, capsys):
    old, new = load_model(dirs["old"]), load_model(dirs["new"])
    users = [f"u{j}" for j in range(0, 160, 7)]  # u150+ are unknown
    items = [f"i{j % 40}" for j in range(len(users))]
    np.testing.assert_array_equal(old.predict(users, items), new.predict(users, items))
    assert old.recommend("u3", n=5) == new.recommend("u3", n=5)
    out = {}
    for d in ("old", "new"):
        argv = ["evaluate", "--model", str(dirs[d]), "--ratings", str(dirs["ratings"]), "--json"]
        assert main(argv) == 0
        out[d] = json.loads(capsys.readouterr().out)
    assert out["old"]["rmse"] == out["new"]["rmse"] and out["old"] == out["new"]


def _dump(store: RedisStore) -> dict:
    r = store.r
    out = {}
    for key in r.scan_iter(count=1000):
        out[key] = r.hgetall(key) if r.type(key) == b"hash" else r.get(key)
    for v, raw in out[store.keys.versions].items():
        meta = json.loads(raw)
        for k in ("created_at", "published_at", "model_dir"):
            meta.pop(k)
        out[store.keys.versions][v] = meta
    return out


def test_publish_serve_and_erase_from_either_format(dirs, tmp_path, monkeypatch):
    from lrs_rec.serving.erasure import vocabulary_from_dir
    from lrs_rec.serving.recommender import Recommender

    dumps, recs = {}, {}
    for d in ("old", "new"):
        home = tmp_path / d
        monkeypatch.setenv("LRS_HOME", str(home))
        try:
            assert main(["publish", "--model", str(dirs[d]), "--bucket-size", "32"]) == 0
            store = RedisStore(connect(home=home))
            dumps[d] = _dump(store)
            vocab = vocabulary_from_dir(store.meta("v1"))
            assert vocab is not None and vocab.get("u149") == 149 and vocab.get("x") is None
            rec = Recommender(dirs[d], home=home)
            try:
                recs[d] = [rec.recommend(f"u{j}", n=5) for j in (0, 77, 149, 400)]
            finally:
                rec.close()
        finally:
            stop_embedded(home, save=False)
    assert dumps["old"] == dumps["new"]
    assert sum(len(v) for k, v in dumps["new"].items() if k.endswith(b":p")) == 150
    assert [r.items for r in recs["old"]] == [r.items for r in recs["new"]]
    assert [r.personalized for r in recs["new"]] == [True, True, True, False]
