"""ONNX export (training.export) and the ONNX Runtime scorer (serving.onnx_scorer) against their
float64 reference twins and TrainedModel.predict, on small random models (no training pipeline)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from lrs_rec.serving.cli import main as cli_main
from lrs_rec.serving.onnx_scorer import OnnxScorer, reference_score, reference_topn
from lrs_rec.training.export import (
    INPUT_NAMES,
    OUTPUT_NAMES,
    build_scoring_graph,
    check_scoring_model,
    export_model_dir,
    export_onnx,
)

from lrs_rec.model import LRSModel
from lrs_rec.model_dir import TrainedModel, load_model_dir, read_manifest, save_model_dir

RTOL = 1e-5  # issue 4: relative error <= 1e-5 in float32


def random_model(
    *, n_users: int = 30, n_items: int = 80, d: int = 12, r: int = 4, k: int = 3, seed: int = 0
) -> TrainedModel:
    """A random TrainedModel whose predictions mostly fall inside the 1..5 rating scale (some clip),
    with two pairs of identical items (10 = 11, 20 = 21) to create exact ties."""
    rng = np.random.default_rng(seed)
    U, _ = np.linalg.qr(rng.normal(size=(d, r)))
    W = rng.normal(size=(n_users, r))
    B_idx = np.sort(np.stack([rng.choice(d, k, replace=False) for _ in range(n_users)]), axis=1)
    B_val = rng.normal(size=(n_users, k)) * 0.5
    F = rng.normal(size=(n_items, d)) * 0.4
    item_bias = rng.normal(size=n_items) * 0.4
    for a, b in ((10, 11), (20, 21)):
        F[b], item_bias[b] = F[a], item_bias[a]
    counts = rng.integers(0, 8, n_users)
    indptr = np.concatenate([[0], np.cumsum(counts)])
    history = np.concatenate([rng.choice(n_items, c, replace=False) for c in counts])
    return TrainedModel(
        lrs=LRSModel(U=U, W=W, B_idx=B_idx, B_val=B_val),
        item_features=F,
        item_bias=item_bias,
        user_bias=rng.normal(size=n_users) * 0.3,
        global_mean=3.5,
        user_ids=tuple(f"u{i}" for i in range(n_users)),
        item_ids=tuple(f"i{i}" for i in range(n_items)),
        w_prior_mean=W.mean(axis=0),
        w_prior_cov=np.atleast_2d(np.cov(W.T)),
        history_indptr=indptr,
        history_items=history,
        history_ratings=rng.integers(1, 6, len(history)).astype(np.float64),
        rating_min=1.0,
        rating_max=5.0,
        manifest={"model_version": "test-v1"},
    )


Params = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def user_params(model: TrainedModel, users: np.ndarray) -> Params:
    """Per-user graph inputs in float32, as a serving layer would pass them."""
    return (
        model.lrs.W[users].astype(np.float32),
        model.user_bias[users].astype(np.float32),
        model.lrs.B_idx[users],
        model.lrs.B_val[users].astype(np.float32),
    )


def one_user(model: TrainedModel, u: int) -> Params:
    w, ub, bi, bv = user_params(model, np.array([u]))
    return w[0], ub[0], bi[0], bv[0]


def rel_err(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.max(np.abs(got - want) / np.abs(want)))


@pytest.fixture(scope="module")
def model() -> TrainedModel:
    return random_model()


@pytest.fixture(scope="module")
def onnx_path(model: TrainedModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_onnx(model, tmp_path_factory.mktemp("onnx") / "model.onnx")


@pytest.fixture(scope="module")
def scorer(onnx_path: Path) -> OnnxScorer:
    return OnnxScorer(onnx_path)


# -- the graph itself -----------------------------------------------------------------------------
@pytest.mark.parametrize("opset", [17, 18])
def test_graph_passes_full_checker_and_strict_shape_inference(
    model: TrainedModel, opset: int
) -> None:
    g = build_scoring_graph(model, opset=opset)
    onnx.checker.check_model(g, full_check=True)
    inferred = onnx.shape_inference.infer_shapes(g, check_type=True, strict_mode=True)
    assert [o.version for o in g.opset_import] == [opset]
    types = {
        v.name: (
            v.type.tensor_type.elem_type,
            [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim],
        )
        for v in [*inferred.graph.input, *inferred.graph.output]
    }
    F32, I64 = onnx.TensorProto.FLOAT, onnx.TensorProto.INT64
    assert [i.name for i in g.graph.input] == list(INPUT_NAMES)
    assert [o.name for o in g.graph.output] == list(OUTPUT_NAMES)
    assert types["w"] == (F32, ["batch", model.lrs.rank])
    assert types["b_idx"] == (I64, ["batch", model.lrs.sparsity])
    assert types["items"] == (I64, ["items_batch", "candidates"])
    assert types["scores"] == (F32, ["batch", "candidates"])
    assert types["top_items"][0] == I64 and types["top_scores"][0] == F32


def test_invalid_opset_rejected(model: TrainedModel) -> None:
    with pytest.raises(ValueError, match="opset"):
        build_scoring_graph(model, opset=11)


def test_too_large_for_one_onnx_file_is_a_clear_error(
    model: TrainedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    import lrs_rec.training.export

    monkeypatch.setattr(lrs_rec.training.export, "MAX_WEIGHT_BYTES", 1000)
    with pytest.raises(ValueError, match="single-file ONNX model"):
        build_scoring_graph(model)


def test_full_graph_in_onnxruntime_matches_predict(model: TrainedModel, onnx_path: Path) -> None:
    """All outputs of model.onnx at once, fed directly (no OnnxScorer)."""
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(1)
    users = rng.choice(model.n_users, 5, replace=False)
    items = rng.integers(-1, model.n_items, size=(5, 40))
    w, ub, bi, bv = user_params(model, users)
    exclude = np.full((5, 3), -1, dtype=np.int64)
    exclude[0, :2] = items[0, :2]
    feeds = dict(
        w=w, user_bias=ub, b_idx=bi, b_val=bv, items=items, n=np.array([7]), exclude=exclude
    )
    scores, top_items, top_scores, all_scores, all_top, all_top_scores = sess.run(None, feeds)
    want = model.predict(np.repeat(users, 40), items.ravel()).reshape(5, 40)
    assert scores.dtype == np.float32 and scores.shape == (5, 40)
    assert rel_err(scores, want) <= RTOL
    all_want = model.predict(np.repeat(users, model.n_items), np.tile(np.arange(model.n_items), 5))
    assert rel_err(all_scores, all_want.reshape(5, -1)) <= RTOL
    assert top_items.shape == top_scores.shape == (5, 7)
    assert all_top.shape == all_top_scores.shape == (5, 7)
    # each top item's score is its (clipped) prediction; the excluded never appear
    assert rel_err(top_scores, np.take_along_axis(all_want.reshape(5, -1), top_items, 1)) <= RTOL
    assert not set(items[0, :2]) & set(top_items[0])


# -- OnnxScorer vs references ---------------------------------------------------------------------
@pytest.mark.parametrize(("batch", "n_cand"), [(1, 1), (1, 33), (4, 7), (16, 80), (3, 250)])
def test_score_parity_dynamic_batch_and_candidates(
    model: TrainedModel, scorer: OnnxScorer, batch: int, n_cand: int
) -> None:
    rng = np.random.default_rng(batch * 1000 + n_cand)
    users = rng.integers(0, model.n_users, batch)
    items = rng.integers(-1, model.n_items, size=(batch, n_cand))  # repeats and unknown (-1)
    got = scorer.score(*user_params(model, users), items)
    want = model.predict(np.repeat(users, n_cand), items.ravel()).reshape(batch, n_cand)
    ref = reference_score(model, *user_params(model, users), items)
    assert got.shape == (batch, n_cand) and got.dtype == np.float32
    assert rel_err(got, want) <= RTOL
    assert rel_err(got, ref) <= RTOL
    np.testing.assert_allclose(ref, want, rtol=1e-6)  # the twin agrees with the contract
    # candidates shared by the batch: (C,) and (1, C)
    shared = items[0]
    want_shared = model.predict(np.repeat(users, n_cand), np.tile(shared, batch))
    for arg in (shared, shared[None, :]):
        assert (
            rel_err(scorer.score(*user_params(model, users), arg), want_shared.reshape(batch, -1))
            <= RTOL
        )


@pytest.mark.parametrize(("r", "k"), [(4, 0), (1, 2), (12, 12)])
def test_edge_dimensions(tmp_path: Path, r: int, k: int) -> None:
    """No sparse part (k = 0, the 'rep' method), rank 1, and k = r = d."""
    trained = random_model(d=12, r=r, k=k, seed=r + k)
    scorer = OnnxScorer(export_onnx(trained, tmp_path / "m.onnx"))
    users = np.arange(6)
    items = np.tile(np.arange(-1, trained.n_items), (6, 1))
    got = scorer.score(*user_params(trained, users), items)
    want = trained.predict(np.repeat(users, items.shape[1]), items.ravel()).reshape(got.shape)
    assert rel_err(got, want) <= RTOL
    excl = [trained.user_history(int(u))[0] for u in users]
    params = user_params(trained, users)
    assert_same_ranking(
        scorer.topn(*params, 9, exclude=excl),
        reference_topn(trained, *params, 9, exclude=excl),
        model=trained,
        params=params,
    )


def test_score_routes_agree(model: TrainedModel, onnx_path: Path) -> None:
    """score() gathers candidates (few) or picks them from the all-items pass (many): same result."""
    gather, dense = OnnxScorer(onnx_path), OnnxScorer(onnx_path)
    gather.all_items_from, dense.all_items_from = 10**9, 1
    rng = np.random.default_rng(11)
    users = rng.integers(0, model.n_users, 4)
    for items in (rng.integers(0, model.n_items, (4, 50)), rng.integers(0, model.n_items, 50)):
        want = model.predict(
            np.repeat(users, 50), items.ravel() if items.ndim == 2 else np.tile(items, 4)
        ).reshape(4, 50)
        a = gather.score(*user_params(model, users), items)
        b = dense.score(*user_params(model, users), items)
        assert a.shape == b.shape == (4, 50)
        assert rel_err(a, want) <= RTOL and rel_err(b, want) <= RTOL
    one = one_user(model, 1)
    items = np.array([0, 5, 5, 79])
    np.testing.assert_allclose(gather.score(*one, items), dense.score(*one, items), rtol=RTOL)
    with_unknown = np.array([0, -1, 3])  # -1 always takes the gather route
    assert (
        rel_err(dense.score(*one, with_unknown), model.predict(np.full(3, 1), with_unknown)) <= RTOL
    )


def test_single_user_forms_and_score_all(model: TrainedModel, scorer: OnnxScorer) -> None:
    u = 7
    w, ub, bi, bv = one_user(model, u)
    items = np.array([3, 0, 79, -1, 3])
    got = scorer.score(w, float(ub), bi, bv, items)
    assert got.shape == (5,)
    assert rel_err(got, model.predict(np.full(5, u), items)) <= RTOL
    every = scorer.score_all(w, ub, bi, bv)
    assert every.shape == (model.n_items,)
    assert (
        rel_err(every, model.predict(np.full(model.n_items, u), np.arange(model.n_items))) <= RTOL
    )


def test_non_contiguous_and_other_dtype_inputs(model: TrainedModel, scorer: OnnxScorer) -> None:
    """Fortran-ordered, strided, float64 and int32 inputs give the same scores."""
    users = np.arange(0, 30, 2)
    W = np.asfortranarray(model.lrs.W)  # float64, rows are strided views
    B_idx = np.asfortranarray(model.lrs.B_idx.astype(np.int32))
    items = np.asfortranarray(np.tile(np.arange(0, 20, 2), (len(users), 1)))
    got = scorer.score(
        W[users], model.user_bias[users], B_idx[users], model.lrs.B_val[users], items
    )
    want = model.predict(np.repeat(users, 10), items.ravel()).reshape(got.shape)
    assert rel_err(got, want) <= RTOL
    assert not W[3].flags["C_CONTIGUOUS"]
    one = scorer.score(W[3], model.user_bias[3], B_idx[3], model.lrs.B_val[3], items[0, ::3])
    assert rel_err(one, model.predict(np.full(4, 3), items[0, ::3])) <= RTOL


def test_unknown_user_gets_population_model(model: TrainedModel, scorer: OnnxScorer) -> None:
    items = np.arange(-1, model.n_items)
    got = scorer.score(*scorer.population_params(), items)
    want = model.predict(np.full(items.shape, -1), items)
    assert rel_err(got, want) <= RTOL
    top, top_scores = scorer.topn(*scorer.population_params(), 5)
    ref_top, ref_scores = reference_topn(model, *scorer.population_params(), 5)
    np.testing.assert_array_equal(top, ref_top)
    np.testing.assert_allclose(top_scores, ref_scores, rtol=RTOL)


def raw64(model: TrainedModel, params: Params, b: int, items: np.ndarray) -> np.ndarray:
    """Unclipped float64 scores of ``items`` for row ``b`` of ``params`` (-1 = unknown item)."""
    w, ub, bi, bv = (np.asarray(a[b], dtype=np.float64) for a in params)
    theta = model.lrs.U @ w
    theta[bi.astype(np.int64)] += bv
    items = np.asarray(items, dtype=np.int64)
    known = items >= 0
    out = np.full(items.shape, model.global_mean + float(ub))
    out[known] += model.item_bias[items[known]] + model.item_features[items[known]] @ theta
    return out


def assert_same_ranking(
    got: tuple[np.ndarray, np.ndarray],
    ref: tuple[np.ndarray, np.ndarray],
    *,
    model: TrainedModel | None = None,
    params: Params | None = None,
) -> None:
    """Same scores position by position (float32 tolerance) and the same items in the same order.

    With ``model``/``params``, two items may swap places only where float32 cannot tell them apart:
    their float64 raw scores differ by < 1e-6 relative (a near-tie that another CPU's SIMD kernel
    may round the other way). Filler (-inf) must match exactly.
    """
    np.testing.assert_allclose(got[1], ref[1], rtol=RTOL)
    if model is None or params is None:
        np.testing.assert_array_equal(got[0], ref[0])
        return
    g_items, r_items = np.atleast_2d(got[0]), np.atleast_2d(ref[0])
    r_scores = np.atleast_2d(ref[1])
    assert g_items.shape == r_items.shape
    for b in range(g_items.shape[0]):
        filler = r_scores[b] == -np.inf
        np.testing.assert_array_equal(g_items[b][filler], r_items[b][filler])
        real = ~filler
        np.testing.assert_allclose(
            raw64(model, params, b, g_items[b][real]),
            raw64(model, params, b, r_items[b][real]),
            rtol=1e-6,
            atol=0,
        )


@pytest.mark.parametrize("n", [1, 5, 80, 1000])
def test_topn_all_items_matches_reference(model: TrainedModel, scorer: OnnxScorer, n: int) -> None:
    users = np.arange(0, model.n_users, 3)
    params = user_params(model, users)
    excl = [model.user_history(int(u))[0] for u in users]
    got = scorer.topn(*params, n, exclude=excl)
    ref = reference_topn(model, *params, n, exclude=excl)
    assert got[0].shape == (len(users), min(n, model.n_items))
    assert_same_ranking(got, ref, model=model, params=params)
    for row in got[0]:  # every item at most once
        assert len(set(row.tolist())) == len(row)
    # single users: identical to the batch rows, filler dropped
    for b in range(4):
        w, ub, bi, bv = (a[b] for a in params)
        one = scorer.topn(w, ub, bi, bv, n, exclude=excl[b])
        keep = got[1][b] > -np.inf
        assert_same_ranking(
            one,
            (got[0][b][keep], got[1][b][keep]),
            model=model,
            params=user_params(model, users[b : b + 1]),
        )
        assert not set(one[0]) & set(excl[b].tolist())
        assert len(one[0]) == min(n, model.n_items - len(excl[b]))


def test_topn_candidates_match_reference(model: TrainedModel, scorer: OnnxScorer) -> None:
    rng = np.random.default_rng(5)
    users = rng.integers(0, model.n_users, 6)
    cands = np.stack([rng.choice(np.arange(-1, model.n_items), 30, replace=False) for _ in users])
    excl = np.full((6, 4), -1)
    excl[:, :2] = cands[:, 3:5]
    params = user_params(model, users)
    for n in (1, 10, 30, 31):
        got = scorer.topn(*params, n, candidates=cands, exclude=excl)
        ref = reference_topn(model, *params, n, candidates=cands, exclude=excl)
        assert_same_ranking(got, ref, model=model, params=params)
    # the unknown item (-1) and excluded items come only as -inf filler
    top, top_scores = scorer.topn(*params, 30, candidates=cands, exclude=excl)
    bad = (top == -1) | (top == cands[:, 3:4]) | (top == cands[:, 4:5])
    assert np.all(top_scores[bad] == -np.inf) and np.all(top_scores[~bad] > -np.inf)


def test_topn_exact_ties_go_to_lower_index(model: TrainedModel, scorer: OnnxScorer) -> None:
    """Items 10/11 and 20/21 are identical: in every ranking the lower index comes first."""
    users = np.arange(model.n_users)
    params = user_params(model, users)
    top, top_scores = scorer.topn(*params, model.n_items)
    ref = reference_topn(model, *params, model.n_items)
    assert_same_ranking((top, top_scores), ref, model=model, params=params)
    for row in top:
        pos = {int(i): p for p, i in enumerate(row)}
        assert pos[10] == pos[11] - 1 and pos[20] == pos[21] - 1
    # with candidates, ties follow candidate position: 11 listed before 10 ranks first
    one = one_user(model, 0)
    got, _ = scorer.topn(*one, 2, candidates=[11, 10])
    np.testing.assert_array_equal(got, [11, 10])


def test_topn_ranks_by_unclipped_score(scorer: OnnxScorer, model: TrainedModel) -> None:
    """Two items both clipped to rating_max keep the order of their raw scores."""
    w, ub, bi, bv = one_user(model, 2)
    ranked = reference_topn(model, w, ub, bi, bv, model.n_items)[0]
    worst_first = [int(ranked[-1]), int(ranked[40]), int(ranked[0])]  # candidates in rising order
    items, scores = scorer.topn(w, ub + 100.0, bi, bv, 3, candidates=worst_first)
    np.testing.assert_array_equal(scores, [model.rating_max] * 3)  # all clipped ...
    np.testing.assert_array_equal(items, worst_first[::-1])  # ... yet ranked by the raw score


def test_exclude_forms(model: TrainedModel, scorer: OnnxScorer) -> None:
    users = np.array([1, 2])
    params = user_params(model, users)
    ragged = [np.array([5, 6, 7]), np.array([], dtype=np.int64)]
    padded = np.array([[5, 6, 7], [-1, -1, -1]])
    a = scorer.topn(*params, model.n_items, exclude=ragged)
    b = scorer.topn(*params, model.n_items, exclude=padded)
    assert_same_ranking(a, b)
    assert set(a[0][0][-3:]) == {5, 6, 7} and np.all(a[1][0][-3:] == -np.inf)
    assert np.all(a[1][1] > -np.inf)
    # excluding everything leaves nothing for a single user
    items, scores = scorer.topn(*one_user(model, 1), 10, exclude=np.arange(model.n_items))
    assert items.size == 0 and scores.size == 0


BAD_INPUTS = [
    ("w", {"w": np.zeros(3)}),
    ("w", {"w": np.array([np.nan, 0, 0, 0])}),
    ("w", {"w": "abc"}),
    ("user_bias", {"user_bias": np.zeros(2)}),
    ("b_idx", {"b_idx": np.array([0, 1, 12])}),
    ("b_idx", {"b_idx": np.array([-1, 1, 2])}),
    ("b_idx", {"b_idx": np.array([0.0, 1.0, 2.0])}),
    ("b_val", {"b_val": np.zeros(4)}),
    ("items", {"items": np.array([0, 80])}),
    ("items", {"items": np.array([-2])}),
    ("items", {"items": np.zeros((2, 3), dtype=np.int64)}),
    ("items", {"items": np.array([], dtype=np.int64)}),
]


@pytest.mark.parametrize(("name", "override"), BAD_INPUTS)
def test_score_bad_inputs_name_the_argument(
    model: TrainedModel, scorer: OnnxScorer, name: str, override: dict[str, object]
) -> None:
    w, ub, bi, bv = one_user(model, 0)
    args: dict[str, object] = {"w": w, "user_bias": ub, "b_idx": bi, "b_val": bv, "items": [1, 2]}
    args.update(override)
    with pytest.raises(ValueError, match=name):
        scorer.score(**args)


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("n", {"n": 0}),
        ("n", {"n": True}),
        ("n", {"n": 2.5}),
        ("exclude", {"exclude": [80]}),
        ("exclude", {"exclude": [[1, 2]]}),
        ("candidates", {"candidates": [0, 99]}),
    ],
)
def test_topn_bad_inputs_name_the_argument(
    model: TrainedModel, scorer: OnnxScorer, name: str, kwargs: dict[str, object]
) -> None:
    w, ub, bi, bv = one_user(model, 0)
    call: dict[str, object] = {"n": 3, **kwargs}
    with pytest.raises(ValueError, match=name):
        scorer.topn(w, ub, bi, bv, **call)  # type: ignore[arg-type]
    batch = user_params(model, np.array([0, 1]))
    with pytest.raises(ValueError, match="exclude"):
        scorer.topn(*batch, 3, exclude=[[1]])  # one row for two users


def test_scorer_rejects_missing_or_foreign_onnx(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="lrs-rec export"):
        OnnxScorer(tmp_path / "nope.onnx")
    g = onnx.helper.make_graph(
        [onnx.helper.make_node("Identity", ["x"], ["y"])],
        "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])],
    )
    onnx.save(onnx.helper.make_model(g), tmp_path / "other.onnx")
    with pytest.raises(ValueError, match="not an lrs-rec scoring graph"):
        OnnxScorer(tmp_path / "other.onnx")
    with pytest.raises(ValueError, match="intra_op_threads"):
        OnnxScorer(tmp_path / "other.onnx", intra_op_threads=0)


def test_runner_falls_back_to_public_run(onnx_path: Path) -> None:
    """Without the binding's private ``_sess`` the public InferenceSession.run is used."""
    from lrs_rec.serving.onnx_scorer import _runner

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])

    class PublicOnly:
        def run(self, outputs: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
            return session.run(outputs, feeds)  # type: ignore[no-any-return]

    feeds = {
        "w": np.zeros((1, 4), np.float32),
        "user_bias": np.zeros(1, np.float32),
        "b_idx": np.array([[0, 1, 2]]),
        "b_val": np.zeros((1, 3), np.float32),
        "items": np.array([[-1]]),
        "n": np.array([1]),
        "exclude": np.array([[-1]]),
    }
    fast = _runner(session, ["scores"])(feeds)
    slow = _runner(PublicOnly(), ["scores"])(feeds)
    np.testing.assert_array_equal(fast[0], slow[0])
    assert fast[0][0, 0] == pytest.approx(3.5)  # unknown item, zero user: the global mean


# -- model directory and CLI ----------------------------------------------------------------------
def test_export_model_dir_round_trip(tmp_path: Path) -> None:
    trained = random_model(n_items=120, d=20, r=6, k=5, seed=3)
    mdir = tmp_path / "model"
    save_model_dir(trained, mdir)
    out = export_model_dir(mdir)
    assert out == mdir / "model.onnx"
    manifest = read_manifest(mdir)
    import hashlib

    assert manifest["onnx"]["path"] == "model.onnx"
    assert manifest["onnx"]["opset"] == 17
    assert manifest["onnx"]["sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()
    assert manifest["onnx"]["arrays_sha256"] == manifest["arrays_sha256"]
    assert sorted(p.name for p in mdir.iterdir() if p.name.startswith(".")) == []  # no temp files
    assert out.stat().st_mode & 0o777 == 0o644  # not mkstemp's 0600
    (mdir / "manifest.json").chmod(0o640)
    export_model_dir(mdir)  # re-export: replaces both files, keeps the manifest's mode
    assert (mdir / "manifest.json").stat().st_mode & 0o777 == 0o640
    assert read_manifest(mdir)["onnx"]["sha256"] == manifest["onnx"]["sha256"]  # deterministic
    loaded = load_model_dir(mdir)  # the manifest is still a valid model directory
    scorer = OnnxScorer(out, expected_arrays_sha256=manifest["arrays_sha256"])
    with pytest.raises(ValueError, match="stale export"):
        OnnxScorer(out, expected_arrays_sha256="0" * 64)
    assert scorer.model_version == loaded.model_version
    users = np.arange(loaded.n_users)
    items = np.tile(np.arange(loaded.n_items), (len(users), 1))
    got = scorer.score(*user_params(loaded, users), items)
    want = loaded.predict(np.repeat(users, loaded.n_items), items.ravel()).reshape(got.shape)
    assert rel_err(got, want) <= RTOL
    check_scoring_model(onnx.load(str(out)))


def test_cli_export(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import lrs_rec.training.export

    mdir = tmp_path / "m"
    save_model_dir(random_model(seed=4), mdir)
    assert cli_main(["export", "--model", str(mdir), "--opset", "18"]) == 0
    assert "model.onnx" in capsys.readouterr().out
    assert json.loads((mdir / "manifest.json").read_text())["onnx"]["opset"] == 18
    assert cli_main(["export", "--model", str(tmp_path / "missing")]) == 2
    assert "not a model directory" in capsys.readouterr().err

    def read_only(*args: object, **kwargs: object) -> Path:
        raise PermissionError(13, "Permission denied", str(mdir / "model.onnx"))

    monkeypatch.setattr(lrs_rec.training.export, "export_model_dir", read_only)
    assert cli_main(["export", "--model", str(mdir)]) == 1  # environment error, not a traceback
    assert "cannot write into" in capsys.readouterr().err


def test_export_model_dir_reads_only_the_shared_weights_and_writes_the_same_graph(tmp_path):
    """export_model_dir builds the graph from load_shared_model_dir (no user shard is read): the
    bytes equal the graph built from the whole model."""
    from lrs_rec.training.export import export_model_dir
    from lrs_rec.training.testing import random_trained_model

    from lrs_rec.model_dir import load_shared_model_dir

    model = random_trained_model(n_users=30, n_items=25, d=6, rank=2, sparsity=2)
    root = tmp_path / "m"
    save_model_dir(model, root)
    full = build_scoring_graph(load_model_dir(root)).SerializeToString()
    shared = load_shared_model_dir(root)
    assert build_scoring_graph(shared).SerializeToString() == full
    assert not shared._full  # the per-user arrays were never loaded
    out = export_model_dir(root)
    assert out.read_bytes() == full
