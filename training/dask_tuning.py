"""Tuning for `lrs-rec train --engine dask`: the local search (``training.tuning.tune``) on the
driver, on the same seeded user sample the local engine tunes on (all users when there are at
most ``tune_sample_users``): their start and ratings are gathered (bounded by the sample size),
the chosen strengths are then fitted on the cluster from the same start."""

from __future__ import annotations

from typing import Any

import numpy as np
from lrs_rec.training import dask_parts as dp
from lrs_rec.training.config import TrainConfig
from lrs_rec.training.pipeline import FitData

from lrs_rec.engine.steps import LRSState, Samples


def _concat(xs: list[Samples]) -> Samples:
    return Samples(
        np.concatenate([x.users for x in xs]),
        np.concatenate([x.items for x in xs]),
        np.concatenate([x.ratings for x in xs]),
    )


TUNE_SAMPLE_USERS = 50_000  # until TrainConfig.tune_sample_users is in (the local engine's sample)


def sample_of_users(n_users: int, cfg: TrainConfig) -> np.ndarray:
    """The users the local engine tunes on: a seeded sample of ``tune_sample_users`` (all users
    when there are no more), never all users of a big run on the driver."""
    size = getattr(cfg, "tune_sample_users", TUNE_SAMPLE_USERS)
    if size is None or n_users <= size:
        return np.arange(n_users)
    from lrs_rec.training import tuning

    if hasattr(tuning, "user_sample"):
        users: np.ndarray = tuning.user_sample(n_users, size, cfg.seed)
        return users
    rng = np.random.default_rng([cfg.seed, 14])
    return np.sort(rng.choice(n_users, size=size, replace=False))


def tune_on_sample(
    cl: Any,
    start: dp.Shared,
    cfg: TrainConfig,
    *,
    n_users: int,
    learn_u: bool,
    refine: bool,
    reg_u: float,
    progress: bool,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the chosen strengths, the tuning record) — the partitions must hold the start."""
    from lrs_rec.training import pipeline
    from lrs_rec.training.tuning import tune

    sample = sample_of_users(n_users, cfg)
    got: list[dp.UserSample] = cl.run.gather(cl.run.map(dp.sample_users, cl.parts, sample))
    state = LRSState(
        start.global_mean,
        np.concatenate([g.c_u for g in got]),
        start.item_bias.copy(),
        start.F.copy(),
        start.U.copy(),
        np.concatenate([g.W for g in got]),
        np.concatenate([g.B_idx for g in got]),
        np.concatenate([g.B_val for g in got]),
    )
    fd = FitData(
        _concat([g.train for g in got]),
        _concat([g.val for g in got]),
        cl.lo,
        cl.hi,
        cl.unit,
        learn_u,
        refine,
        reg_u,
    )
    del got
    snapshot = getattr(pipeline, "Snapshot", None)
    start_arg: Any = snapshot.of(state) if snapshot is not None else state
    _, record = tune(start_arg, cfg, fd, progress=progress)
    if sample.size < n_users:
        record.setdefault("sample_users", int(sample.size))
    return dict(record["chosen"]), record
