"""Accuracy regressions on small data unlike MovieLens (issue 13): sparse users, a −10..10 scale,
data where the LRS iterations cannot help; plus the scale invariance and the tuning record."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from lrs_rec.serving.cli import main
from lrs_rec.training.config import TrainConfig
from lrs_rec.training.features import fit_biases
from lrs_rec.training.loaders import CleaningReport, RatingTable
from lrs_rec.training.pipeline import item_step_overfits, rating_unit, train
from lrs_rec.training.synthetic_ratings import SCALES, DataSpec, generate, split
from lrs_rec.training.tuning import clearly_better

SMALL: dict[str, Any] = {"dim": 16, "rank": 8, "sparsity": 2, "n_iter": 6, "init_iter": 6}


def _table(u: np.ndarray, i: np.ndarray, y: np.ndarray, lo: float, hi: float) -> RatingTable:
    return RatingTable(
        users=np.array([f"u{x}" for x in u]),
        items=np.array([f"i{x}" for x in i]),
        ratings=y.astype(np.float64),
        timestamps=np.full(y.size, np.nan),
        rating_min=lo,
        rating_max=hi,
        report=CleaningReport(source="generated", format="csv"),
        fingerprint="generated",
    )


def _fit_and_score(spec: DataSpec, cfg: TrainConfig) -> tuple[float, float, dict[str, Any]]:
    """(test RMSE of the trained model, test RMSE of a plain bias baseline, manifest)."""
    u, i, y = generate(spec)
    test = split(y.size, 0.1, spec.seed)
    lo, hi = SCALES[spec.scale][:2]
    model = train(_table(u[~test], i[~test], y[~test], lo, hi), cfg, progress=False).model
    uid = {s: j for j, s in enumerate(model.user_ids)}
    iid = {s: j for j, s in enumerate(model.item_ids)}
    pu = np.array([uid.get(f"u{x}", -1) for x in u[test]])
    pi = np.array([iid.get(f"i{x}", -1) for x in i[test]])
    rmse = float(np.sqrt(np.mean((model.predict(pu, pi) - y[test]) ** 2)))
    # the plain baseline: μ + c_u + c_i with Surprise BaselineOnly's strengths (15 users, 10 items)
    mu, cu, ci = fit_biases(
        u[~test], i[~test], y[~test], n_users=spec.n_users, n_items=spec.n_items,
        reg_user=15.0, reg_item=10.0, n_iter=10,
    )  # fmt: skip
    base = np.clip(mu + cu[u[test]] + ci[i[test]], lo, hi)
    return rmse, float(np.sqrt(np.mean((base - y[test]) ** 2))), model.manifest


def test_sparse_users_beat_the_bias_baseline() -> None:
    """Median 4 ratings per user (long-tailed), Pareto item popularity, 1–5 stars."""
    spec = DataSpec("sparse", "mf", 1500, 400, 4, "1-5", noise=0.6, seed=21)
    rmse, base, manifest = _fit_and_score(spec, TrainConfig(**SMALL, tune=False))
    assert rmse < base, (rmse, base, manifest["metrics"]["candidates_val_rmse"])
    assert manifest["metrics"]["val_rmse"] <= manifest["metrics"]["start_val_rmse"]


def test_continuous_minus_10_to_10_beats_the_bias_baseline() -> None:
    """100 items, dense, continuous −10..10: the scale that made the old trainer overfit."""
    spec = DataSpec("cont", "mf", 800, 100, 20, "-10..10", pareto=3.0, seed=22)
    rmse, base, manifest = _fit_and_score(spec, TrainConfig(**SMALL, tune=False))
    assert rmse < 0.95 * base, (rmse, base)
    assert manifest["hyperparameters"]["rating_unit"] > 3.0  # std ≈ 5 vs MovieLens' 1.13
    assert manifest["metrics"]["val_rmse"] <= manifest["metrics"]["start_val_rmse"]


def test_trainer_keeps_its_start_when_lrs_iterations_cannot_help() -> None:
    """Ratings = biases + noise (no interaction at all): whatever the LRS loop fits is noise, so
    the written model must not be worse on validation than the start, and it says what it kept."""
    rng = np.random.default_rng(5)
    n_u, n_i = 300, 80
    u = np.repeat(np.arange(n_u), 25)
    i = np.concatenate([rng.choice(n_i, 25, replace=False) for _ in range(n_u)])
    y = 3.0 + rng.normal(0, 0.4, n_u)[u] + rng.normal(0, 0.5, n_i)[i] + rng.normal(0, 1.0, u.size)
    table = _table(u, i, np.clip(y, 1, 5), 1.0, 5.0)
    # a weak ridge, so that the loop visibly overfits the noise
    cfg = TrainConfig(**SMALL, reg_w=0.1, reg_b=0.1, reg_features=0.1, init_reg=0.01, tune=False)
    m = train(table, cfg, progress=False).model.manifest["metrics"]
    cands = m["candidates_val_rmse"]
    assert m["selected"] in ("start", "biases"), cands
    assert m["val_rmse"] == min(cands.values())
    assert m["val_rmse"] <= m["start_val_rmse"]
    assert cands["lrs"] > m["val_rmse"]


def test_standardised_training_is_scale_invariant() -> None:
    """Training on 3·y + 1 gives 3·(the predictions on y) + 1: no strength depends on the scale."""
    spec = DataSpec("inv", "mf", 300, 60, 15, "-10..10", pareto=3.0, seed=23)
    u, i, y = generate(spec)
    cfg = TrainConfig(**SMALL, tune=False)
    a = train(_table(u, i, y, -10.0, 10.0), cfg, progress=False).model
    b = train(_table(u, i, 3 * y + 1, -29.0, 31.0), cfg, progress=False).model
    idx = np.arange(len(a.user_ids)) % len(a.item_ids)
    users = np.arange(len(a.user_ids))
    np.testing.assert_allclose(
        b.predict(users, idx, clip=False), 3 * a.predict(users, idx, clip=False) + 1, atol=1e-6
    )
    assert rating_unit(3 * y) == pytest.approx(3 * rating_unit(y))


def test_item_step_overfit_rule() -> None:
    h = [{"val_rmse": v} for v in (1.03, 1.0116, 1.0132, 1.0192)]
    assert item_step_overfits(h, 1)  # +0.16 % one iteration after the best
    h = [{"val_rmse": v} for v in (0.9395, 0.9327, 0.9265, 0.9269, 0.9284)]
    assert not item_step_overfits(h, 2)  # +0.04 %
    assert not item_step_overfits(h, 4)  # no iteration after the best
    assert not item_step_overfits(h, 0)


def test_tuning_moves_only_on_a_clear_validation_gain() -> None:
    rng = np.random.default_rng(0)
    old = rng.exponential(1.0, 4000)  # squared errors of the current fit
    noisy = old + rng.normal(0.0, 0.3, 4000)  # another fit: no better on average, only different
    noisy[0] -= 4000 * (noisy.mean() - old.mean()) + 1.0  # now 0.00025 lower in mean: noise
    assert noisy.mean() < old.mean() and not clearly_better(noisy, old)
    assert clearly_better(old * 0.99, old)  # 1 % lower on every rating
    assert not clearly_better(old * 1.01, old)
    assert not clearly_better(old.copy(), old)


def test_tuning_is_recorded_and_no_tune_trains_once(tmp_path: Path) -> None:
    spec = DataSpec("tune", "mf", 400, 80, 12, "1-10", seed=24)
    u, i, y = generate(spec)
    path = tmp_path / "r.csv"
    path.write_text(
        "user,item,rating\n"
        + "".join(f"u{a},i{b},{c:g}\n" for a, b, c in zip(u, i, y, strict=True))
    )
    common = ["train", "--ratings", str(path), "--rating-scale", "1", "10", "--dim", "8",
              "--rank", "4", "--sparsity", "2", "--n-iter", "3", "--no-export", "--quiet", "--json"]  # fmt: skip
    assert main([*common, "--out", str(tmp_path / "t"), "--tune-trials", "2"]) == 0
    man = json.loads((tmp_path / "t" / "manifest.json").read_text())
    tuning = man["tuning"]
    assert len(tuning["trials"]) == 3  # the default fit and two more
    for name, value in tuning["chosen"].items():
        assert man["hyperparameters"][name] == value
    assert man["hyperparameters"]["tune"] is True
    # never worse on validation than the fit with the given strengths (trial 0)
    assert man["metrics"]["val_rmse"] <= tuning["trials"][0]["val_rmse"] + 1e-12
    assert main([*common, "--out", str(tmp_path / "n"), "--no-tune"]) == 0
    man = json.loads((tmp_path / "n" / "manifest.json").read_text())
    assert "tuning" not in man and man["hyperparameters"]["tune"] is False
    assert man["hyperparameters"]["reg_features"] == TrainConfig().reg_features


def test_tune_seconds_flag_is_checked(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "r.csv"
    path.write_text("user,item,rating\na,x,1\nb,y,2\n")
    code = main(
        ["train", "--ratings", str(path), "--out", str(tmp_path / "m"), "--tune-seconds", "-1"]
    )
    assert code != 0
    assert "--tune-seconds" in capsys.readouterr().err
