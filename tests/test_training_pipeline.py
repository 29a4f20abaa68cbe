"""Training loop, model directory, evaluation and the train/evaluate CLI on small generated data."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from lrs_rec.serving.cli import main
from lrs_rec.training.config import TrainConfig
from lrs_rec.training.evaluate import evaluate_table
from lrs_rec.training.loaders import load_ratings
from lrs_rec.training.pipeline import train
from lrs_rec.training.sample_data import make_sample_data, make_sample_ratings, write_sample_ratings

from lrs_rec.engine.grouped import grouped_gram, grouped_gram_reference, grouped_sum
from lrs_rec.model_dir import ModelDirError, load_model_dir, save_model_dir

FAST: dict[str, Any] = {"n_iter": 4, "init_iter": 4, "dim": 8, "rank": 3, "sparsity": 2}


@pytest.fixture(scope="module")
def sample_split(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Train/test files: a random 15% of each user's ratings are held out, plus 5 test-only users."""
    rows = make_sample_ratings(300, 120, random_state=3)
    rng = np.random.default_rng(0)
    test_mask = rng.random(len(rows)) < 0.15
    train_rows = [r for r, m in zip(rows, test_mask, strict=True) if not m]
    test_rows = [r for r, m in zip(rows, test_mask, strict=True) if m]
    test_rows += [(f"new{j}", "i1", 4.0, 1) for j in range(5)] + [("u1", "brand-new-item", 3.0, 1)]
    d = tmp_path_factory.mktemp("sample")
    return write_sample_ratings(d / "train.csv", train_rows), write_sample_ratings(
        d / "test.csv", test_rows
    )


def test_grouped_gram_matches_reference() -> None:
    rng = np.random.default_rng(0)
    groups = rng.integers(0, 7, 50)
    groups[groups == 3] = 4  # an empty group
    A = rng.normal(size=(50, 4))
    np.testing.assert_allclose(
        grouped_gram(groups, 7, A), grouped_gram_reference(groups, 7, A), atol=1e-12
    )
    np.testing.assert_allclose(
        grouped_sum(groups, 7, A), np.array([A[groups == g].sum(0) for g in range(7)]), atol=1e-12
    )


def test_grouped_gram_skewed_sizes_and_small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    import lrs_rec.engine.grouped as grouped

    rng = np.random.default_rng(1)
    groups = np.concatenate([np.zeros(300, np.int64), rng.integers(1, 40, 200), [45, 45, 46]])
    rng.shuffle(groups)
    A = rng.normal(size=(groups.size, 3))
    monkeypatch.setattr(grouped, "_CHUNK_FLOATS", 20)  # forces one group per batched product
    np.testing.assert_allclose(
        grouped.grouped_gram(groups, 50, A), grouped_gram_reference(groups, 50, A), atol=1e-10
    )


def test_sample_data_is_skewed_and_on_scale() -> None:
    rows, truth = make_sample_data(500, 300, random_state=1)
    per_user = np.bincount([int(u[1:]) - 1 for u, *_ in rows])
    assert set(r for _, _, r, _ in rows) <= {1.0, 2.0, 3.0, 4.0, 5.0}
    assert per_user.min() >= 3 and per_user.max() > 4 * np.median(per_user)  # long tail
    per_item = np.bincount([int(i[1:]) - 1 for _, i, *_ in rows], minlength=300)
    assert np.sort(per_item)[-30:].sum() > 0.3 * per_item.sum()  # top 10% items: >30% of ratings
    assert np.all(np.count_nonzero(truth.B, axis=1) == 2)
    assert make_sample_ratings(50, 30, random_state=7) == make_sample_ratings(
        50, 30, random_state=7
    )


def test_train_lrs_structure_prior_history_and_reproducible(
    sample_split: tuple[Path, Path],
) -> None:
    table = load_ratings(sample_split[0])
    cfg = TrainConfig(**FAST, seed=5)
    res = train(table, cfg, progress=False)
    m = res.model
    assert m.lrs.rank == 3 and m.lrs.sparsity == 2 and m.lrs.d == 8
    np.testing.assert_allclose(m.lrs.U.T @ m.lrs.U, np.eye(3), atol=1e-8)
    np.testing.assert_allclose(m.w_prior_mean, m.lrs.W.mean(axis=0))
    np.testing.assert_allclose(m.w_prior_cov, np.cov(m.lrs.W, rowvar=False, bias=True))
    # history CSR holds every training rating exactly once
    assert m.history_indptr[-1] == len(table)
    u0_items, u0_ratings = m.user_history(0)
    mask = table.users == m.user_ids[0]
    got = dict(zip(np.asarray(m.item_ids)[u0_items].tolist(), u0_ratings.tolist(), strict=True))
    assert got == dict(zip(table.items[mask].tolist(), table.ratings[mask].tolist(), strict=True))
    # ... with each rating's time aligned (the onboarding prior learns from first ratings by time)
    assert m.history_timestamps is not None
    lo, hi = m.history_indptr[0], m.history_indptr[1]
    got_t = dict(
        zip(np.asarray(m.item_ids)[u0_items].tolist(), m.history_timestamps[lo:hi], strict=True)
    )
    assert got_t == dict(zip(table.items[mask].tolist(), table.timestamps[mask], strict=True))
    assert 2 <= len(res.history) <= cfg.n_iter + 1 and res.history[0]["iteration"] == 0
    best = m.manifest["metrics"]["best_iteration"]
    assert best >= 1 and res.history[best]["val_rmse"] == min(
        h["val_rmse"] for h in res.history[1:]
    )
    assert all(np.isfinite(h["val_rmse"]) for h in res.history)
    again = train(table, cfg, progress=False).model
    np.testing.assert_array_equal(again.lrs.W, m.lrs.W)
    np.testing.assert_array_equal(again.item_features, m.item_features)


@pytest.mark.parametrize(
    ("method", "per_user"), [("single", 0), ("prompt", 1), ("rep", 3), ("full", 8)]
)
def test_baseline_methods(
    sample_split: tuple[Path, Path], method: str, per_user: int, tmp_path: Path
) -> None:
    table = load_ratings(sample_split[0])
    m = train(table, TrainConfig(**FAST, method=method), progress=False).model
    assert m.manifest["params_per_user"] == per_user
    saved = save_model_dir(m, tmp_path / method)
    assert saved.manifest["dims"]["params_per_user"] == per_user  # not the stored r + k
    if method in ("single", "prompt"):
        assert m.lrs.rank == 1 and np.ptp(m.lrs.W) == 0.0
    if method == "single":
        assert np.all(m.user_bias == 0.0)
    if method == "full":
        assert m.lrs.rank == 8 and m.lrs.sparsity == 0


def test_lrs_beats_single_model_on_lrs_data(sample_split: tuple[Path, Path]) -> None:
    tr, te = load_ratings(sample_split[0]), load_ratings(sample_split[1])
    lrs = evaluate_table(train(tr, TrainConfig(**FAST), progress=False).model, te, ranking=False)
    single = evaluate_table(
        train(tr, TrainConfig(**FAST, method="single"), progress=False).model, te, ranking=False
    )
    assert lrs["rmse"] < single["rmse"]


def test_cli_train_then_evaluate_end_to_end(
    sample_split: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "model"
    code = main(
        ["train", "--ratings", str(sample_split[0]), "--out", str(out), "--dim", "8", "--rank",
         "3", "--sparsity", "2", "--n-iter", "3", "--seed", "1", "--no-export", "--json"]
    )  # fmt: skip
    assert code == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["dims"]["params_per_user"] == 5
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["hyperparameters"]["rank"] == 3 and manifest["hyperparameters"]["seed"] == 1
    assert manifest["data"]["fingerprint_sha256"] and manifest["data"]["n_ratings"] > 0
    assert manifest["cleaning"]["counts"]["header_lines"] == 1
    hist = manifest["metrics"]["history"]  # --n-iter 3, or fewer when validation clearly rose
    assert [h["iteration"] for h in hist] == list(range(len(hist))) and 2 <= len(hist) <= 4
    if len(hist) < 4:
        best = min(h["val_rmse"] for h in hist[1:-1])
        assert hist[-1]["val_rmse"] > best * 1.001
    assert main(["evaluate", "--model", str(out), "--ratings", str(sample_split[1]), "--json"]) == 0
    ev = json.loads(capsys.readouterr().out)
    for key in ("rmse", "mae", "n", "n_unknown_users", "n_unknown_items", "by_activity",
                "precision@10", "recall@10", "ndcg@10"):  # fmt: skip
        assert key in ev
    assert set(ev["by_activity"]) == {"<=20", "21-50", "51-100", ">100"}
    test_rows = load_ratings(sample_split[1])
    assert ev["n"] == len(test_rows)  # unknown users/items are predicted, not dropped
    assert ev["n_unknown_users"] == 5 and ev["n_unknown_items"] == 1
    # the reported RMSE is exactly that of TrainedModel.predict
    model = load_model_dir(out)
    uidx, iidx = model.user_index(), model.item_index()
    u = np.array([uidx.get(s, -1) for s in test_rows.users])
    i = np.array([iidx.get(s, -1) for s in test_rows.items])
    rmse = float(np.sqrt(np.mean((model.predict(u, i) - test_rows.ratings) ** 2)))
    assert ev["rmse"] == pytest.approx(rmse, rel=1e-12)
    assert 0.0 <= ev["precision@10"] <= 1.0 and 0.0 <= ev["ndcg@10"] <= 1.0


def test_format_version_mismatch_is_a_clear_error(
    sample_split: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "m"
    assert main(["train", "--ratings", str(sample_split[0]), "--out", str(out), "--dim", "4",
                 "--rank", "2", "--sparsity", "1", "--n-iter", "1", "--no-export", "--quiet"]) == 0  # fmt: skip
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["format_version"] = 999
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelDirError, match="format_version 999 is not supported"):
        load_model_dir(out)
    capsys.readouterr()
    assert main(["evaluate", "--model", str(out), "--ratings", str(sample_split[1])]) == 2
    assert "format_version 999" in capsys.readouterr().err


def test_bad_ratings_file_cli_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = tmp_path / "bad.csv"
    p.write_text("user,item,rating\na,b,4\nc,d,excellent\n")
    assert main(["train", "--ratings", str(p), "--out", str(tmp_path / "m"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "bad.csv:3" in err and "'excellent'" in err


def test_every_format_trains(tmp_path: Path) -> None:
    rows = make_sample_ratings(60, 40, random_state=2)
    files = {
        "csv": write_sample_ratings(tmp_path / "r.csv", rows),
        "ml-100k": write_sample_ratings(tmp_path / "u.data", rows, fmt="ml-100k"),
        "parquet": write_sample_ratings(tmp_path / "r.parquet", rows, fmt="parquet"),
    }
    dat = tmp_path / "ratings.dat"
    dat.write_text("".join(f"{u[1:]}::{i[1:]}::{int(r)}::{t}\n" for u, i, r, t in rows))
    files["ml-1m"] = dat
    sizes = set()
    for fmt, path in files.items():
        t = load_ratings(path)
        assert t.report.format == fmt
        m = train(t, TrainConfig(dim=4, rank=2, sparsity=1, n_iter=1, init_iter=2), progress=False)
        sizes.add((m.model.n_users, m.model.n_items, len(t)))
    assert len(sizes) == 1  # the same data whatever the format


def test_plugin_item_features_npy_and_parquet(
    sample_split: tuple[Path, Path], tmp_path: Path
) -> None:
    table = load_ratings(sample_split[0])
    _, truth = make_sample_data(300, 120, random_state=3)
    ids = [f"i{j + 1}" for j in range(120)]
    npy = tmp_path / "emb.npy"
    np.save(npy, truth.item_features)
    (tmp_path / "emb.npy.ids.txt").write_text("\n".join(ids) + "\n")
    cfg = TrainConfig(rank=4, sparsity=2, n_iter=3, refine_features=False)
    m = train(table, cfg, item_features_path=str(npy), progress=False).model
    assert m.lrs.d == truth.item_features.shape[1]
    j = m.item_index()["i5"]
    np.testing.assert_array_equal(m.item_features[j], truth.item_features[4])
    assert m.manifest["item_features"]["source"] == str(npy)
    pqf = tmp_path / "emb.parquet"
    pq.write_table(pa.table({"item_id": ids, "vec": [list(v) for v in truth.item_features]}), pqf)
    m2 = train(table, cfg, item_features_path=str(pqf), progress=False).model
    np.testing.assert_allclose(m2.item_features, m.item_features)
    (tmp_path / "emb.npy.ids.txt").write_text("\n".join(ids[:-1]))
    with pytest.raises(ValueError, match="119 item ids but"):
        train(table, cfg, item_features_path=str(npy), progress=False)


def test_features_without_signal_are_warned_about(
    sample_split: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Random plug-in features: the LRS fit only over-fits them, and the user is told so (the
    model still keeps its best LRS iterate); the true features give no such warning."""
    table = load_ratings(sample_split[0])
    _, truth = make_sample_data(300, 120, random_state=3)
    ids = [f"i{j + 1}" for j in range(120)]
    cfg = TrainConfig(rank=4, sparsity=2, n_iter=3, refine_features=False)
    for name, feats in {
        "noise": np.random.default_rng(0).standard_normal(truth.item_features.shape),
        "truth": truth.item_features,
    }.items():
        npy = tmp_path / f"{name}.npy"
        np.save(npy, feats)
        (tmp_path / f"{name}.npy.ids.txt").write_text("\n".join(ids) + "\n")
        res = train(table, cfg, item_features_path=str(npy), progress=False)
        err = capsys.readouterr().err
        hist = res.model.manifest["metrics"]["history"]
        best = min(h["val_rmse"] for h in hist[1:])
        assert ("carry little signal" in err) == (hist[0]["val_rmse"] < best), (name, hist)
        assert ("carry little signal" in err) == (name == "noise"), (name, hist)


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="method must be one of"):
        TrainConfig(method="magic")
    with pytest.raises(ValueError, match="sparsity must be >= 0"):
        TrainConfig(sparsity=-1)
    with pytest.raises(ValueError, match="rank r=40 exceeds"):
        TrainConfig(rank=40, dim=32).check_dims(32)


def test_user_and_u_steps_do_not_depend_on_the_block_size(sample_split: tuple[Path, Path]) -> None:
    from lrs_rec.training.pipeline import (
        build_vocabularies,
        encode,
        init_state,
    )

    from lrs_rec.engine.steps import StepParams, item_step, u_step, user_step

    table = load_ratings(sample_split[0])
    uv, iv = build_vocabularies(table)
    data = encode(table, uv, iv)
    cfg = TrainConfig(**FAST)
    state = init_state(cfg, data, len(uv), len(iv), None, np.random.default_rng(0))
    params = StepParams(k=2, per_user_w=True, user_bias=True, reg_w=3.0, reg_b=2.0, reg_bias=1.0)
    a, b = copy.deepcopy(state), copy.deepcopy(state)
    user_step(a, data, params, block=10_000)
    user_step(b, data, params, block=7)
    u_step(a, data, block=10_000)
    u_step(b, data, block=13)
    for name in ("W", "user_bias", "U"):
        np.testing.assert_allclose(getattr(a, name), getattr(b, name), atol=1e-9)
    np.testing.assert_allclose(a.dense_b(), b.dense_b(), atol=1e-9)
    assert a.B_idx.shape == (len(uv), 2)
    import lrs_rec.engine.steps as lrs_als

    item_step(a, data, reg_features=5.0, reg_bias=1.0, refine_features=True)
    lrs_als.BLOCK_FLOATS = 1  # 16 items per block
    try:
        item_step(b, data, reg_features=5.0, reg_bias=1.0, refine_features=True)
    finally:
        lrs_als.BLOCK_FLOATS = 1 << 23
    np.testing.assert_allclose(a.F, b.F, atol=1e-9)
    np.testing.assert_allclose(a.item_bias, b.item_bias, atol=1e-9)


def test_fixed_features_learn_u_by_eq5(
    sample_split: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "fixed"
    assert main(["train", "--ratings", str(sample_split[0]), "--out", str(out), "--dim", "8",
                 "--rank", "3", "--sparsity", "2", "--n-iter", "3", "--fixed-features",
                 "--no-export", "--quiet"]) == 0  # fmt: skip
    m = load_model_dir(out)
    assert m.manifest["hyperparameters"]["refine_features"] is False
    assert m.manifest["hyperparameters"]["effective_reg_u"] == 10.0
    np.testing.assert_allclose(m.lrs.U.T @ m.lrs.U, np.eye(3), atol=1e-8)
    capsys.readouterr()


def test_conditional_prior_means_recover_a_linear_dependence() -> None:
    from lrs_rec.engine.b_rows import zero_b
    from lrs_rec.engine.steps import LRSState, Samples, conditional_prior_means

    rng = np.random.default_rng(0)
    n_users, n_items, d, r = 60, 40, 6, 3
    users = np.repeat(np.arange(n_users), 8)
    items = rng.integers(0, n_items, users.size)
    F = rng.normal(size=(n_items, d))
    U = np.linalg.qr(rng.normal(size=(d, r)))[0]
    Z = np.array([(F[items[users == u]] @ U).mean(0) for u in range(n_users)])
    A = rng.normal(size=(r, r))
    W = 0.5 + Z @ A  # w_u depends only on which items u rated
    state = LRSState(0.0, np.zeros(n_users), np.zeros(n_items), F, U, W, *zero_b(n_users, 0))
    means = conditional_prior_means(state, Samples(users, items, np.zeros(users.size)), ridge=1e-9)
    np.testing.assert_allclose(means, W, atol=1e-6)


def test_rankings_use_unclipped_scores_like_the_served_top_n():
    """Clipped predictions tie every item above the scale's top and the tie would go to the lowest
    item index; rankings (offline metrics and the served top-n) order by the raw score."""
    import dataclasses

    from lrs_rec.training.evaluate import score_all_items
    from lrs_rec.training.testing import random_trained_model

    model = random_trained_model(n_users=6, n_items=30, random_state=2)
    model = dataclasses.replace(model, global_mean=5.5)  # most raw scores above the 5.0 clip
    users = np.arange(6)
    scores = score_all_items(model, users)
    raw = np.stack([model.predict(np.full(30, u), np.arange(30), clip=False) for u in users])
    np.testing.assert_array_equal(scores, raw)
    clipped = np.stack([model.predict(np.full(30, u), np.arange(30)) for u in users])
    assert (clipped == 5.0).sum(axis=1).min() >= 10 and scores.max() > 5.0


def test_cli_summary_names_the_kept_model_by_its_method(
    sample_split: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # the manifest's internal candidate name "lrs" is shown as the fit of the --method that ran
    code = main(
        ["train", "--ratings", str(sample_split[0]), "--out", str(tmp_path / "m"), "--method",
         "single", "--dim", "8", "--n-iter", "2", "--no-tune", "--no-export", "--quiet"]
    )  # fmt: skip
    assert code == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    selected = json.loads((tmp_path / "m" / "manifest.json").read_text())["metrics"]["selected"]
    shown = {"lrs": "the single fit", "start": "its start", "biases": "biases alone"}[selected]
    assert f"kept: {shown})" in line and "kept: lrs" not in line
