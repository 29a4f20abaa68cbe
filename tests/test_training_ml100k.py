"""MovieLens 100K (skipped when ../shared/data/ml-100k is absent): loading and the default trainer on u1."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from training.config import TrainConfig
from training.evaluate import evaluate_table
from training.loaders import load_ratings
from training.pipeline import train


@pytest.mark.ml100k
def test_ml100k_files_load_clean(ml100k_dir: Path) -> None:
    full = load_ratings(ml100k_dir / "u.data")
    assert full.report.format == "ml-100k"
    assert len(full) == 100_000 and full.report.counts == {}
    assert np.unique(full.users).size == 943 and np.unique(full.items).size == 1682
    assert set(np.unique(full.ratings).tolist()) == {1.0, 2.0, 3.0, 4.0, 5.0}


@pytest.mark.ml100k
def test_default_training_on_u1_beats_svd_reference(ml100k_dir: Path) -> None:
    """Default settings on u1.base, scored on u1.test. Measured 0.916 (bench/movielens.py); the
    surprise SVD reference on u1..u5 is 0.938 mean, so 0.93 guards against regressions."""
    tr = load_ratings(ml100k_dir / "u1.base")
    te = load_ratings(ml100k_dir / "u1.test")
    model = train(tr, TrainConfig(), progress=False).model
    ev = evaluate_table(model, te, ranking=False)
    assert ev["n"] == 20_000
    assert ev["rmse"] < 0.93
    assert model.lrs.rank + model.lrs.sparsity == model.manifest["params_per_user"]
    # data-starved users are predicted worse than heavy users, but still beat the global mean
    assert ev["by_activity"]["<=20"] > ev["by_activity"][">100"]
    mean_only = float(np.sqrt(np.mean((te.ratings - tr.ratings.mean()) ** 2)))
    assert ev["by_activity"]["<=20"] < mean_only
