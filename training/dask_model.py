"""The model of a Dask training run: the partitions' shares of it fetched one at a time into
the arrays of a :class:`lrs_rec.model_dir.TrainedModel` (a temporary step until the workers write
model shards: the driver then holds the whole model), and the merged cleaning report."""

from __future__ import annotations

from typing import Any

import numpy as np
from lrs_rec.training import dask_parts as dp
from lrs_rec.training.config import TrainConfig

from lrs_rec.model import LRSModel
from lrs_rec.model_dir import TrainedModel


def merged_report(summaries: list[Any], spec: str, dups: int) -> dict[str, Any]:
    if len(summaries) == 1 and not dups:
        return dict(summaries[0].report)
    counts: dict[str, int] = {}
    examples: dict[str, list[str]] = {}
    for s in summaries:
        for key, v in s.report["counts"].items():
            counts[key] = counts.get(key, 0) + int(v)
        for key, v in s.report["examples"].items():
            examples.setdefault(key, []).extend(v)
    if dups:
        counts["duplicates_removed"] = counts.get("duplicates_removed", 0) + dups
    return {
        "source": spec,
        "format": "multiple" if len(summaries) > 1 else summaries[0].report["format"],
        "rows_read": sum(s.report["rows_read"] for s in summaries),
        "rows_kept": sum(s.report["rows_kept"] for s in summaries) - dups,
        "parser": ",".join(sorted({s.report["parser"] for s in summaries})),
        "counts": dict(sorted(counts.items())),
        "examples": {k: v[:5] for k, v in sorted(examples.items())},
        "files": [s.path for s in summaries],
    }


def _part_sizes(m: dp.PartModel) -> tuple[int, int, int, int, int, tuple[float, Any, Any]]:
    return m.lo, m.hi, int(m.h_items.size), m.W.shape[1], m.B_idx.shape[1], m.w_sums


def assemble_model(
    run: Any,
    pieces: list[Any],
    shared: dp.Shared,
    unit: float,
    cfg: TrainConfig,
    users: np.ndarray,
    item_ids: tuple[str, ...],
    rating_min: float,
    rating_max: float,
    manifest_parts: dict[str, Any],
) -> TrainedModel:
    """The TrainedModel from the partitions' shares (futures of PartModels, in user order) — the
    temporary gather: one partition's share at a time is fetched and copied into place."""
    sizes = run.gather([run.submit(_part_sizes, f) for f in pieces])
    n = sum(x[5][0] for x in sizes)
    sw = sum(x[5][1] for x in sizes)
    sww = sum(x[5][2] for x in sizes)
    w_mean = np.asarray(sw / n)
    w_cov = sww / n - np.outer(w_mean, w_mean) if n > 1 else np.zeros_like(sww)
    w_cov = np.atleast_2d((w_cov + w_cov.T) / 2)
    # copied into preallocated arrays piece by piece, each piece dropped once copied (the driver
    # holds one copy of the model plus one partition's share, not two copies)
    n_users = int(sum(x[1] - x[0] for x in sizes))
    nnz = int(sum(x[2] for x in sizes))
    r, k = sizes[0][3], sizes[0][4]
    W = np.empty((n_users, r))
    B_idx = np.empty((n_users, k), np.int64)
    B_val = np.empty((n_users, k))
    user_bias = np.empty(n_users)
    indptr = np.zeros(n_users + 1, np.int64)
    h_items, h_ratings, h_times = np.empty(nnz, np.int64), np.empty(nnz), np.empty(nnz)
    a = 0
    pieces = list(pieces)
    while pieces:
        p: dp.PartModel = run.gather(pieces.pop(0))
        W[p.lo : p.hi], B_idx[p.lo : p.hi], B_val[p.lo : p.hi] = p.W, p.B_idx, p.B_val
        user_bias[p.lo : p.hi] = p.user_bias
        indptr[p.lo + 1 : p.hi + 1] = a + p.indptr[1:]
        b = a + p.h_items.size
        h_items[a:b], h_ratings[a:b], h_times[a:b] = p.h_items, p.h_ratings, p.h_times
        a = b
        del p
    lrs = LRSModel(U=shared.U, W=W, B_idx=B_idx, B_val=B_val)
    manifest: dict[str, Any] = {
        "method": cfg.method,
        **manifest_parts,
        "params_per_user": {"lrs": lrs.rank + lrs.sparsity, "full": lrs.d, "rep": lrs.rank}[
            cfg.method
        ],
    }
    return TrainedModel(
        lrs=lrs,
        item_features=shared.F,
        item_bias=shared.item_bias * unit,
        user_bias=user_bias,
        global_mean=shared.global_mean * unit,
        user_ids=tuple(users.tolist()),
        item_ids=item_ids,
        w_prior_mean=w_mean,
        w_prior_cov=w_cov,
        history_indptr=indptr,
        history_items=h_items,
        history_ratings=h_ratings,
        rating_min=rating_min,
        rating_max=rating_max,
        manifest=manifest,
        history_timestamps=h_times if np.isfinite(h_times).all() else None,
    )
