"""A frozen copy of the format-1 writer (``save_model_dir`` before issue 15: every user in
``arrays.npz``, the ids in ``users.json``), so that tests keep loading old model directories."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from lrs_rec.model_dir import (
    SHARED_ARRAYS,
    TrainedModel,
    _digest,
    _estimate_prior,
    _finite_json,
    _json_default,
    _prior_to_arrays,
    new_model_version,
)

_FIELDS = (
    "item_features",
    "item_bias",
    "user_bias",
    "w_prior_mean",
    "w_prior_cov",
    "history_indptr",
    "history_items",
    "history_ratings",
)


def save_legacy_model_dir(model: TrainedModel, out_dir: str | Path) -> dict:
    """Write ``model`` as a format-1 directory (as lrs-rec wrote it until issue 15)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=False)
    arrays: dict[str, np.ndarray] = dict(model.lrs.to_arrays())
    for name in _FIELDS:
        arrays[name] = np.asarray(getattr(model, name))
    arrays["global_mean"] = np.asarray(model.global_mean, dtype=np.float64)
    if model.history_timestamps is not None:
        arrays["history_timestamps"] = np.asarray(model.history_timestamps, dtype=np.float64)
    digest = _digest({name: arrays[name] for name in SHARED_ARRAYS})
    manifest = dict(model.manifest)
    for key in ("onboarding_prior_sha256", "user_shards", "format_version"):
        manifest.pop(key, None)
    prior = None if manifest.get("privacy") else _estimate_prior(model)
    if prior is not None:
        prior_arrays = _prior_to_arrays(prior)
        arrays.update(prior_arrays)
        manifest["onboarding_prior_sha256"] = _digest(prior_arrays)
    manifest["format_version"] = 1
    manifest.setdefault("model_version", new_model_version(digest))
    manifest.setdefault("created_at", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    manifest["arrays_sha256"] = digest
    manifest["rating_scale"] = [model.rating_min, model.rating_max]
    manifest["dims"] = {
        "n_users": model.n_users,
        "n_items": model.n_items,
        "d": model.lrs.d,
        "rank": model.lrs.rank,
        "sparsity": model.lrs.sparsity,
        "params_per_user": model.lrs.rank + model.lrs.sparsity,
    }
    manifest = _finite_json(json.loads(json.dumps(manifest, default=_json_default)))
    np.savez(out / "arrays.npz", **arrays)
    (out / "users.json").write_text(json.dumps(list(model.user_ids)))
    (out / "items.json").write_text(json.dumps(list(model.item_ids)))
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return manifest
