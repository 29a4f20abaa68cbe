"""The model directory of a Dask training run, written where the model lives: every partition's
worker writes its users' Parquet shards (:func:`lrs_rec.model_shards.write_user_shard`) into the
staging directory (a file system shared by the driver and the workers); the driver only begins the
directory and finishes it with the small shared part (U, item features and biases, μ, the
population prior and the onboarding prior, both reduced from the partitions' sums). No per-user
array reaches the driver.

Also the merged cleaning report of the input files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from lrs_rec.training import dask_parts as dp
from lrs_rec.training.config import TrainConfig

from lrs_rec import model_shards as ms


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


def shard_starts(sizes: list[int], rows: int) -> list[int]:
    """The first shard index of each partition (partition p of ``sizes[p]`` users writes
    ceil(sizes[p] / rows) shards, numbered after those of the partitions before it)."""
    out, s = [], 0
    for n in sizes:
        out.append(s)
        s += max(1, -(-n // rows))
    return out


def write_model_dir(
    run: Any,
    parts: list[Any],
    shared: dp.Shared,
    unit: float,
    cfg: TrainConfig,
    item_ids: tuple[str, ...],
    rating_min: float,
    rating_max: float,
    out_dir: str | Path,
    manifest_parts: dict[str, Any],
    *,
    shard_rows: int = ms.DEFAULT_SHARD_ROWS,
) -> dict[str, Any]:
    """Write the model of the partitions ``parts`` (futures of Parts, in user order) to
    ``out_dir``: shards by the workers, the shared part by the driver (atomically, as
    :func:`lrs_rec.model_dir.save_model_dir`). Returns the manifest as written.

    The onboarding prior (:func:`lrs_rec.onboarding.estimate_prior`, as ``save_model_dir``
    stores it) is finished on the driver from the partitions' sums (:mod:`training.dask_prior`)."""
    from lrs_rec.training import dask_prior

    k = cfg.sparsity if cfg.method == "lrs" else 0
    sizes, finite, rated = zip(
        *run.gather([run.submit(dp.part_size, p) for p in parts]), strict=True
    )
    with_times = all(finite)
    n_items = len(item_ids)
    item_bias = shared.item_bias * unit
    desc = np.zeros((n_items, 0))
    if dask_prior.wants_implicit(sum(sizes), all(rated)):
        counts = run.gather(run.reduce(run.map(dp.item_counts, parts, n_items)))
        desc = dask_prior.descriptors(shared.F, item_bias, counts)
    prior_inputs = run.broadcast((shared.global_mean * unit, item_bias, shared.F, desc))
    starts = shard_starts(list(sizes), shard_rows)
    staging = ms.begin_model_dir(out_dir)
    try:
        U = run.broadcast(shared.U)
        outs = run.gather(
            [
                run.submit(
                    dp.write_shards, p, U, k, str(staging), s, shard_rows, with_times, prior_inputs
                )
                for p, s in zip(parts, starts, strict=True)
            ]
        )
    except BaseException:
        ms.abort_model_dir(staging)
        raise
    shards = [info for infos, _, _ in outs for info in infos]
    n = sum(w[0] for _, w, _ in outs)
    sw = sum(w[1] for _, w, _ in outs)
    sww = sum(w[2] for _, w, _ in outs)
    w_mean = np.asarray(sw / n)
    w_cov = sww / n - np.outer(w_mean, w_mean) if n > 1 else np.zeros_like(sww)
    w_cov = np.atleast_2d((w_cov + w_cov.T) / 2)
    r = int(shared.U.shape[1])
    try:
        prior = dask_prior.combine(
            [p for _, _, p in outs],
            w_prior_mean=w_mean,
            w_prior_cov=w_cov,
            rank=r,
            sparsity=k,
            desc=desc,
        )
    except (ValueError, np.linalg.LinAlgError):  # as save_model_dir: servers estimate it later
        prior = None
    manifest: dict[str, Any] = {
        "method": cfg.method,
        **manifest_parts,
        "params_per_user": {"lrs": r + k, "full": int(shared.U.shape[0]), "rep": r}[cfg.method],
    }
    return ms.finish_model_dir(
        staging,
        out_dir,
        shards=shards,
        U=shared.U,
        item_features=shared.F,
        item_bias=shared.item_bias * unit,
        global_mean=shared.global_mean * unit,
        w_prior_mean=w_mean,
        w_prior_cov=w_cov,
        item_ids=item_ids,
        rating_min=rating_min,
        rating_max=rating_max,
        manifest=manifest,
        onboarding_prior=prior,
    )
