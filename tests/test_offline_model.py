"""lrs_rec.load_model: the offline model by external ids, against its reference twins, `lrs-rec
evaluate` (evaluate_table) and the service (Recommender over an embedded Redis)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from lrs_rec.serving.onboarding import onboarder_for
from lrs_rec.training.config import TrainConfig
from lrs_rec.training.evaluate import evaluate_table, score_all_items
from lrs_rec.training.loaders import load_ratings
from lrs_rec.training.pipeline import train
from lrs_rec.training.sample_data import make_sample_ratings, write_sample_ratings
from lrs_rec.training.testing import random_trained_model, write_model_dir

import lrs_rec
from lrs_rec import offline
from lrs_rec.model_dir import TrainedModel, save_model_dir
from lrs_rec.offline import UserParameters, top_n

N_USERS, N_ITEMS, D, R, K = 80, 50, 16, 4, 4


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("offline") / "m"
    model = random_trained_model(
        n_users=N_USERS, n_items=N_ITEMS, d=D, rank=R, sparsity=K, ratings_per_user=8,
        random_state=21, model_version="offline-v1",
    )  # fmt: skip
    write_model_dir(model, out)
    return out


@pytest.fixture(scope="module")
def om(model_dir: Path) -> lrs_rec.OfflineModel:
    return lrs_rec.load_model(model_dir)


def _reference_top(model: TrainedModel, u: int, n: int, exclude_rated: bool) -> list[int]:
    """Stable descending sort of TrainedModel.predict's unclipped scores (index -1: unknown)."""
    s = model.predict(np.full(model.n_items, u), np.arange(model.n_items), clip=False)
    if exclude_rated and u >= 0:
        s[model.user_history(u)[0]] = -np.inf
    order = np.argsort(-s, kind="stable")[:n]
    return [int(i) for i in order if s[i] > -np.inf]


# -- predict -----------------------------------------------------------------------------------------
def test_predict_by_ids_equals_the_reference_with_unknown_fallbacks(om):
    model = om.model
    rng = np.random.default_rng(0)
    n = 500
    users = [f"u{j}" for j in rng.integers(0, N_USERS + 10, n)]  # u80..u89 are unknown
    items = [f"i{j}" for j in rng.integers(0, N_ITEMS + 10, n)]  # i50..i59 are unknown
    uidx = np.array([model.user_index().get(u, -1) for u in users])
    iidx = np.array([model.item_index().get(i, -1) for i in items])
    assert (uidx < 0).any() and (iidx < 0).any()
    got = om.predict(users, items)
    assert got.dtype == np.float64 and got.shape == (n,)
    np.testing.assert_allclose(got, model.predict(uidx, iidx), rtol=1e-13, atol=0)
    # the documented fallbacks, written out
    theta_pop = model.lrs.U @ model.w_prior_mean
    f0 = model.item_features[0]
    pop_known_item = model.global_mean + model.item_bias[0] + f0 @ theta_pop
    np.testing.assert_allclose(om.predict(["nobody"], ["i0"]), [pop_known_item], rtol=1e-12)
    # unknown item: population prediction without the item bias (c_i = 0, f_i = 0)
    np.testing.assert_allclose(
        om.predict(["u3", "nobody"], ["nope", "nope"]),
        np.clip([model.global_mean + model.user_bias[3], model.global_mean], 1, 5),
        rtol=1e-12,
    )


def test_predict_accepts_arrays_scalars_and_integer_ids(om, tmp_path):
    model = om.model
    items = [f"i{j}" for j in range(N_ITEMS)]
    one = om.predict("u5", items)
    np.testing.assert_allclose(
        one, model.predict(np.full(N_ITEMS, 5), np.arange(N_ITEMS)), rtol=1e-13
    )
    np.testing.assert_array_equal(om.predict(np.array(["u5"] * N_ITEMS), np.array(items)), one)
    np.testing.assert_array_equal(
        om.predict(["u1", "u2"], "i3"), om.predict(["u1", "u2"], ["i3"] * 2)
    )
    # integer ids are matched by their digits (as the rating loaders read them)
    m2 = random_trained_model(n_users=5, n_items=6, random_state=1)
    from dataclasses import replace

    m2 = replace(
        m2, user_ids=tuple(str(10 + j) for j in range(5)), item_ids=tuple(str(j) for j in range(6))
    )
    o2 = lrs_rec.OfflineModel(m2)
    by_text = o2.predict(["10", "11", "12"], ["0", "5", "3"])
    np.testing.assert_array_equal(o2.predict([10, 11, 12], [0, 5, 3]), by_text)
    np.testing.assert_array_equal(
        o2.predict(np.array([10, 11, 12]), np.array([0.0, 5.0, 3.0])), by_text
    )
    with pytest.raises(ValueError, match="3 user ids but 2 item ids"):
        om.predict(["u1", "u2", "u3"], ["i1", "i2"])


def test_predict_in_small_blocks_is_identical(om, monkeypatch):
    rng = np.random.default_rng(1)
    users = [f"u{j}" for j in rng.integers(0, N_USERS + 5, 300)]
    items = [f"i{j}" for j in rng.integers(0, N_ITEMS + 5, 300)]
    whole = om.predict(users, items)
    folded = om.fold_in([("i1", 4.0), ("i2", 2.0), ("i7", 5.0)])
    whole_f = om.predict(folded, items)
    monkeypatch.setattr(offline, "PREDICT_BLOCK", 7)
    np.testing.assert_array_equal(om.predict(users, items), whole)
    np.testing.assert_array_equal(om.predict(folded, items), whole_f)


def test_model_is_immutable(om):
    with pytest.raises(AttributeError):
        om.model = None  # type: ignore[misc]
    for arr in (om.model.item_bias, om.model.item_features, om.model.lrs.W, om.model.history_items):
        with pytest.raises(ValueError, match="read-only"):
            arr[0] = 0
    user = om.fold_in([("i1", 4.0)])
    with pytest.raises(ValueError, match="read-only"):
        user.w[0] = 1.0


# -- recommend ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("exclude_rated", [True, False])
def test_recommend_equals_a_stable_sort_of_the_reference_scores(om, exclude_rated):
    model = om.model
    for u in [*range(0, N_USERS, 7), -1]:
        uid = model.user_ids[u] if u >= 0 else "nobody"
        got = om.recommend(uid, n=12, exclude_rated=exclude_rated)
        want = _reference_top(model, u, 12, exclude_rated)
        assert [i for i, _ in got] == [model.item_ids[i] for i in want]
        ref = model.predict(np.full(len(want), u), np.array(want, dtype=np.int64))
        np.testing.assert_allclose([s for _, s in got], ref, rtol=1e-12)
    # more than the eligible items: every eligible one, once
    n_hist = int(np.diff(model.history_indptr)[0])
    assert len(om.recommend("u0", n=10_000)) == N_ITEMS - n_hist
    assert len(om.recommend("u0", n=10_000, exclude_rated=False)) == N_ITEMS
    with pytest.raises(ValueError, match="n must be an integer >= 1"):
        om.recommend("u0", n=0)


def test_recommend_batch_in_blocks_equals_one_by_one(om, monkeypatch):
    users = ["u1", "nobody", "u2", om.fold_in([("i3", 5.0)]), "u40"]
    one_by_one = [om.recommend(u, n=5) for u in users]
    monkeypatch.setattr(offline, "SCORE_BLOCK_CELLS", 2 * N_ITEMS)  # two users per block
    assert om.recommend_batch(users, n=5) == one_by_one


def test_top_n_equals_a_stable_full_sort_with_ties_and_ineligible_items():
    rng = np.random.default_rng(3)
    for trial in range(300):
        size = int(rng.integers(1, 40))
        s = rng.integers(0, 5, size).astype(float)  # many ties
        s[rng.random(size) < 0.3] = -np.inf
        n = int(rng.integers(1, size + 3))
        ref = np.argsort(-s, kind="stable")[:n]
        ref = ref[s[ref] > -np.inf]
        np.testing.assert_array_equal(top_n(s, n), ref, err_msg=f"trial {trial}")


def test_ties_go_to_the_lower_item_index(tmp_path):
    """Items with identical features and bias tie exactly: the lower index ranks first."""
    from dataclasses import replace

    m = random_trained_model(n_users=4, n_items=10, random_state=2)
    feats = m.item_features.copy()
    bias = m.item_bias.copy()
    feats[[3, 7, 8]] = feats[5]
    bias[[3, 5, 7, 8]] = bias[5] + 10.0  # far above every other item
    o = lrs_rec.OfflineModel(replace(m, item_features=feats, item_bias=bias))
    top = [i for i, _ in o.recommend("nobody", n=4)]
    assert top == ["i3", "i5", "i7", "i8"]


def test_recommend_matches_evaluates_ranking(tmp_path):
    """The top-10 `lrs-rec evaluate` ranks for its ranking metrics (score_all_items, training
    history excluded, stable sort) is what recommend returns."""
    om = lrs_rec.OfflineModel(_sample_model(tmp_path)[0])
    model = om.model
    users = np.arange(0, model.n_users, 9)
    scores = score_all_items(model, users)
    for row, u in zip(scores, users, strict=True):
        row[model.user_history(int(u))[0]] = -np.inf
        want = [model.item_ids[i] for i in np.argsort(-row, kind="stable")[:10]]
        assert [i for i, _ in om.recommend(model.user_ids[u], n=10)] == want


# -- evaluate --------------------------------------------------------------------------------------------
def _sample_model(tmp_path: Path) -> tuple[TrainedModel, Path]:
    rows = make_sample_ratings(150, 80, random_state=4)
    rng = np.random.default_rng(0)
    test = rng.random(len(rows)) < 0.2
    train_path = write_sample_ratings(
        tmp_path / "train.csv", [r for r, t in zip(rows, test, strict=True) if not t]
    )
    test_rows = [r for r, t in zip(rows, test, strict=True) if t]
    test_rows += [("new-user", "i1", 4.0, 1), ("u1", "new-item", 3.0, 1)]
    test_path = write_sample_ratings(tmp_path / "test.csv", test_rows)
    cfg = TrainConfig(n_iter=3, init_iter=3, dim=8, rank=3, sparsity=2, seed=0)
    model = save_model_dir(
        train(load_ratings(train_path), cfg, progress=False).model, tmp_path / "m"
    )
    return model, test_path


def test_predictions_equal_evaluates(tmp_path):
    model, test_path = _sample_model(tmp_path)
    om = lrs_rec.load_model(tmp_path / "m")
    table = load_ratings(test_path)
    ev = evaluate_table(model, table, ranking=False)
    assert ev["n_unknown_users"] == 1 and ev["n_unknown_items"] == 1
    pred = om.predict(table.users, table.items)
    rmse = float(np.sqrt(np.mean((pred - table.ratings) ** 2)))
    assert abs(rmse - ev["rmse"]) <= 1e-12
    mae = float(np.mean(np.abs(pred - table.ratings)))
    assert abs(mae - ev["mae"]) <= 1e-12


# -- fold_in -------------------------------------------------------------------------------------------
def test_fold_in_is_the_services_onboarding_fit(om):
    model = om.model
    onb = onboarder_for(model)  # what serving.onboarding fits with
    rng = np.random.default_rng(5)
    for n in (1, 3, 8, 20):
        items = rng.choice(N_ITEMS, size=n, replace=False)
        ratings = rng.integers(1, 6, size=n).astype(float)
        user = om.fold_in([(model.item_ids[i], r) for i, r in zip(items, ratings, strict=True)])
        want = onb.fit(items, ratings)
        np.testing.assert_array_equal(user.w, want.w)
        np.testing.assert_array_equal(user.b_idx, want.b_idx)
        np.testing.assert_array_equal(user.b_val, want.b_val)
        assert user.user_bias == want.user_bias and user.personalized and user.n_ratings == n
        cand = np.arange(N_ITEMS)
        got = om.predict(user, [model.item_ids[i] for i in cand])
        np.testing.assert_allclose(got, onb.predict(want, cand), rtol=1e-12)
        # recommend a folded-in user: a stable sort of the unclipped scores, its items excluded
        raw = (
            model.global_mean
            + want.user_bias
            + model.item_bias
            + model.item_features @ want.theta(model.lrs.U)
        )
        raw[items] = -np.inf
        ref = [model.item_ids[i] for i in np.argsort(-raw, kind="stable")[:5]]
        assert [i for i, _ in om.recommend(user, n=5)] == ref


def test_fold_in_input_rules():
    om = lrs_rec.OfflineModel(random_trained_model(n_users=10, n_items=12, random_state=3))
    # a repeated item keeps its latest rating: by timestamp when every entry has one ...
    a = om.fold_in([("i1", 5.0, 20), ("i2", 1.0, 5), ("i1", 2.0, 10)])
    assert a.rated_item_ids == ("i2", "i1") and a.ratings == (1.0, 5.0)
    # ... else the last one in the list; dicts and mappings are accepted
    b = om.fold_in([{"item_id": "i1", "rating": 5.0}, ("i2", 1.0), ["i1", 2.0]])
    assert b.rated_item_ids == ("i2", "i1") and b.ratings == (1.0, 2.0)
    c = om.fold_in({"i2": 1.0, "i1": 2.0})
    np.testing.assert_array_equal(c.w, b.w)
    # unknown items are ignored by the fit and reported
    d = om.fold_in([("i2", 1.0), ("zz", 3.0), ("i1", 2.0), ("zz", 4.0)])
    assert d.ignored_item_ids == ("zz",)
    np.testing.assert_array_equal(d.w, b.w)
    # nothing known: the population model, not personalised
    e = om.fold_in([("zz", 3.0)])
    assert not e.personalized and e.n_ratings == 0 and e.user_bias == 0.0
    np.testing.assert_array_equal(e.w, om.model.w_prior_mean)
    np.testing.assert_array_equal(om.predict(e, ["i1", "i2"]), om.predict("nobody", ["i1", "i2"]))
    assert om.recommend(e, n=4) == om.recommend("nobody", n=4)
    for bad, match in [
        ([("i1", 6.0)], r"ratings\[0\].rating 6.0 is outside the rating scale \[1, 5\]"),
        ([("i1", float("nan"))], r"ratings\[0\].rating must be a finite number"),
        ([("i1", "4")], r"ratings\[0\].rating must be a number"),
        ([("i1",)], r"ratings\[0\] must be \(item_id, rating\)"),
        ([("", 3.0)], r"ratings\[0\].item_id must be a non-empty id"),
        ([{"item": "i1", "rating": 3}], r"ratings\[0\] must have keys"),
        ("i1", "ratings must be a list"),
    ]:
        with pytest.raises(ValueError, match=match):
            om.fold_in(bad)
    wrong = UserParameters(w=np.zeros(2), user_bias=0.0, b_idx=np.arange(4), b_val=np.zeros(4))
    with pytest.raises(ValueError, match="do not fit this model"):
        om.predict(wrong, ["i1"])


def test_fold_in_of_a_trained_user_refits_from_their_whole_history(om):
    model = om.model
    u = 4
    old_items, old_ratings = model.user_history_by_time(u)
    new = [(model.item_ids[int(old_items[0])], 1.0), ("i49", 5.0)]  # a re-rating and a new item
    user = om.fold_in(new, user_id="u4")
    keep = old_items != old_items[0]
    items = np.concatenate([old_items[keep], [old_items[0]], [49]])
    ratings = np.concatenate([old_ratings[keep], [1.0, 5.0]])
    if 49 in old_items[keep]:  # i49 was rated before: the new rating replaces it
        drop = np.flatnonzero(items[:-2] == 49)
        items, ratings = np.delete(items, drop), np.delete(ratings, drop)
    want = onboarder_for(model).fit(items, ratings)
    np.testing.assert_array_equal(user.w, want.w)
    assert user.rated_item_ids == tuple(model.item_ids[i] for i in items)


# -- the service -------------------------------------------------------------------------------------
@pytest.mark.redis
def test_offline_equals_the_service(model_dir, om, home):
    """Scores, recommendations and onboarding through the Recommender (Redis + ONNX, float32
    records) equal the offline model's within float32 arithmetic."""
    from lrs_rec.serving.connection import connect
    from lrs_rec.serving.recommender import Recommender
    from lrs_rec.serving.store import RedisStore

    from lrs_rec.model_dir import load_model_dir

    RedisStore(connect(home=home)).publish(
        load_model_dir(model_dir), model_dir=str(model_dir), precision="float32"
    )
    rec = Recommender(model_dir, home=home, version_refresh_interval=0)
    model = om.model
    items = [f"i{j}" for j in range(N_ITEMS)]
    users = [*(f"u{j}" for j in range(0, N_USERS, 9)), "nobody"]
    for res in rec.score_batch(users, items):
        np.testing.assert_allclose(res.scores, om.predict(res.user_id, items), atol=2e-5)
    for u in users:
        for excl in (True, False):
            served = rec.recommend(u, n=10, exclude_rated=excl).items
            offline_top = om.recommend(u, n=10, exclude_rated=excl)
            assert [i for i, _ in served] == [i for i, _ in offline_top], (u, excl)
            np.testing.assert_allclose(
                [s for _, s in served], [s for _, s in offline_top], atol=2e-5
            )
    # onboarding: a new user and a trained one
    for user_id, ratings in [
        (
            "new-1",
            [("i3", 5.0), ("i7", 1.0), ("i11", 4.0), ("i3", 4.0), ("i20", 2.0), ("i30", 5.0)],
        ),
        ("u6", [("i2", 5.0), ("i44", 1.0)]),
    ]:
        rec.onboard(user_id, ratings)
        folded = om.fold_in(ratings, user_id=user_id)
        served_scores = rec.score(user_id, items).scores
        np.testing.assert_allclose(served_scores, om.predict(folded, items), atol=2e-5)
        served = rec.recommend(user_id, n=8).items
        assert [i for i, _ in served] == [i for i, _ in om.recommend(folded, n=8)]
    assert model.n_items == N_ITEMS


def test_unknown_item_fallback_equals_the_onnx_graphs(model_dir, om):
    """The ONNX graph scores item index -1 as c_i = 0, f_i = 0: what the service returns for an
    unknown item is what the offline model predicts (trained, unknown and folded-in users)."""
    from lrs_rec.serving.onnx_scorer import OnnxScorer

    scorer = OnnxScorer(str(model_dir / "model.onnx"))
    model = om.model
    cand = np.array([-1, 0, 5, -1])
    names = ["nope", "i0", "i5", "also-nope"]
    lrs = model.lrs
    for u in (0, 17):
        got = scorer.score(lrs.W[u], model.user_bias[u], lrs.B_idx[u], lrs.B_val[u], cand)
        np.testing.assert_allclose(got, om.predict(model.user_ids[u], names), atol=2e-5)
    np.testing.assert_allclose(
        scorer.score(*scorer.population_params(), cand), om.predict("nobody", names), atol=2e-5
    )
    user = om.fold_in([("i1", 5.0), ("i2", 1.0), ("i3", 4.0)])
    got = scorer.score(user.w, user.user_bias, user.b_idx, user.b_val, cand)
    np.testing.assert_allclose(got, om.predict(user, names), atol=2e-5)


def test_predict_of_a_folded_in_user_takes_one_item_id_as_one_item(om):
    # regression: a single item id was iterated as its characters ("i1" -> "i", "1")
    user = om.fold_in([("i1", 5.0), ("i2", 1.0)])
    for item in ("i1", "i10", np.str_("i3")):
        got = om.predict(user, item)
        assert got.shape == (1,)
        np.testing.assert_array_equal(got, om.predict(user, [str(item)]))
    # ... and a folded-in user inside a sequence of ids is refused, not scored as unknown
    with pytest.raises(TypeError, match="goes alone as user_ids"):
        om.predict([user, "u1"], "i1")
