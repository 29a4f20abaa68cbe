"""Small random trained models for serving tests and benchmarks (no training pipeline needed)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from lrs_rec.model import LRSModel
from lrs_rec.model_dir import TrainedModel, save_model_dir


def random_trained_model(
    *,
    n_users: int = 50,
    n_items: int = 40,
    d: int = 16,
    rank: int = 4,
    sparsity: int = 4,
    ratings_per_user: int = 5,
    random_state: int | np.random.Generator = 0,
    model_version: str | None = None,
) -> TrainedModel:
    """A TrainedModel with random U, W, k-sparse B, item features/biases and rating histories.

    User ids are ``"u0", "u1", ...`` and item ids ``"i0", "i1", ...``; ratings are on [1, 5].
    """
    rng = np.random.default_rng(random_state)
    U, _ = np.linalg.qr(rng.normal(size=(d, rank)))
    W = rng.normal(scale=0.5, size=(n_users, rank))
    B_idx = np.sort(
        np.stack([rng.choice(d, size=sparsity, replace=False) for _ in range(n_users)]), axis=1
    ).reshape(n_users, sparsity)
    B_val = rng.normal(scale=0.3, size=(n_users, sparsity))
    per = min(ratings_per_user, n_items)
    hist_items = np.concatenate(
        [rng.choice(n_items, size=per, replace=False) for _ in range(n_users)]
    ).astype(np.int64)
    manifest = {"model_version": model_version} if model_version else {}
    return TrainedModel(
        lrs=LRSModel(U=U, W=W, B_idx=B_idx, B_val=B_val),
        item_features=rng.normal(scale=0.5, size=(n_items, d)),
        item_bias=rng.normal(scale=0.2, size=n_items),
        user_bias=rng.normal(scale=0.2, size=n_users),
        global_mean=3.5,
        user_ids=tuple(f"u{i}" for i in range(n_users)),
        item_ids=tuple(f"i{j}" for j in range(n_items)),
        w_prior_mean=W.mean(axis=0),
        w_prior_cov=np.cov(W.T).reshape(rank, rank),
        history_indptr=np.arange(n_users + 1, dtype=np.int64) * per,
        history_items=hist_items,
        history_ratings=rng.integers(1, 6, size=hist_items.size).astype(np.float64),
        rating_min=1.0,
        rating_max=5.0,
        manifest=manifest,
    )


def write_model_dir(model: TrainedModel, out_dir: str | os.PathLike[str]) -> TrainedModel:
    """Save ``model`` as a model directory and export its ONNX graph; returns the saved model."""
    from lrs_rec.training.export import export_model_dir

    from lrs_rec.model_dir import load_model_dir

    save_model_dir(model, out_dir)
    export_model_dir(out_dir)
    return load_model_dir(Path(out_dir))


def write_random_model_dirs(
    root: str | os.PathLike[str], seeds: dict[str, int], **model_kw: Any
) -> dict[str, Path]:
    """One model directory ``root/name`` per ``name: seed`` of ``random_trained_model(random_state=
    seed, **model_kw)``; a ``model_version`` of ``"{name}"`` form is filled in by ``str.format``."""
    out = {}
    for name, seed in seeds.items():
        kw = dict(model_kw)
        if isinstance(kw.get("model_version"), str):
            kw["model_version"] = kw["model_version"].format(name=name)
        write_model_dir(random_trained_model(random_state=seed, **kw), Path(root) / name)
        out[name] = Path(root) / name
    return out
