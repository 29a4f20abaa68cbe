"""Hyperparameters chosen on the internal validation split, within a time budget (`--tune`).

Greedy coordinate search over the ridge strengths, in the order they matter on the accuracy suite
(docs/accuracy.md): each strength is multiplied by 3, then divided by 3 if that did not help, and a
move that helped is repeated while it keeps helping. A move helps when it lowers the validation MSE
by more than two standard errors of the paired per-rating difference (not by noise). Every trial is a full LRS fit (early stopping
included) from the same start (biases + item features, fitted once), so a trial costs one LRS loop,
not one training run. The budget is a number of trials (``tune_trials``, default 3: reproducible,
the same choice on every machine); ``tune_seconds`` adds an optional wall-clock cap (the choice then
depends on the machine's speed).

Only the non-private trainer tunes: the private trainer's data use is accounted for one fit
(docs/privacy.md), and a search over its validation split would be further, unaccounted use.
"""

from __future__ import annotations

import sys
import time
from dataclasses import replace
from typing import Any

import numpy as np
from lrs_rec.training.config import TrainConfig
from lrs_rec.training.pipeline import Fit, FitData, Snapshot, fit_lrs

from lrs_rec.engine.steps import Samples

SEARCH = ("reg_features", "reg_w", "reg_b")  # in this order
FACTOR = 3.0
MAX_STEPS = 2  # repeated moves in one direction per strength
SIGNIFICANCE = 2.0  # standard errors a move must gain on validation


def best_val(fit: Fit) -> float:
    return float(fit.history[fit.best_iteration]["val_rmse"])


def sq_errors(fit: Fit, fd: FitData) -> np.ndarray:
    """Squared validation errors of the fit's best iterate (standardised units)."""
    pred = fit.state.predict(fd.val.users, fd.val.items, fd.lo, fd.hi)
    return np.asarray((pred - fd.val.ratings) ** 2)


def clearly_better(new: np.ndarray, old: np.ndarray, z: float = SIGNIFICANCE) -> bool:
    """Whether the new fit's validation MSE is lower by more than z standard errors of the paired
    per-rating difference: a move away from the current strengths must not be validation noise
    (on MovieLens 100K's 4 000-rating validation split, differences of 0.1–0.2 % are)."""
    d = old - new
    if d.size < 2:
        return bool(d.mean() > 0) if d.size else False
    return bool(d.mean() > z * d.std(ddof=1) / np.sqrt(d.size))


def user_sample(n_users: int, size: int, seed: int) -> np.ndarray:
    """``size`` distinct users (sorted), drawn with their own seeded generator (derived from the
    training seed, so the sample does not shift any other random draw)."""
    rng = np.random.default_rng([seed, 14])
    return np.sort(rng.choice(n_users, size=size, replace=False))


def restrict_to_users(start: Snapshot, fd: FitData, users: np.ndarray) -> tuple[Snapshot, FitData]:
    """The start and the training / validation samples of the given users only, renumbered
    0..len(users)-1 (items keep their indices: F, c_i are the start's)."""
    remap = np.full(start.n_users, -1, fd.train.users.dtype)
    remap[users] = np.arange(users.size)

    def sub(s: Samples) -> Samples:
        keep = remap[s.users] >= 0
        return Samples(remap[s.users[keep]], s.items[keep], s.ratings[keep])

    return start.take_users(users), FitData(
        sub(fd.train), sub(fd.val), fd.lo, fd.hi, fd.unit, fd.learn_u, fd.refine, fd.reg_u
    )


def tune(
    start: Snapshot, cfg: TrainConfig, fd: FitData, *, progress: bool
) -> tuple[Fit | None, dict[str, Any]]:
    """(the best fit found, the tuning record for the manifest: chosen values, trials, budget).

    With more training users than ``cfg.tune_sample_users`` the search runs on a seeded sample of
    that many users (their ratings, the same start for them): the ridge strengths are per-user and
    per-item prior strengths, which do not depend on how many users there are. The fit is then
    None: the caller fits all users once with the chosen strengths."""
    n_users = start.n_users
    sample = cfg.tune_sample_users
    record_sample: dict[str, Any] = {}
    if sample is not None and n_users > sample:
        users = user_sample(n_users, sample, cfg.seed)
        start, fd = restrict_to_users(start, fd, users)
        record_sample = {
            "sample_users": int(sample),
            "sample_train_ratings": len(fd.train),
            "sample_validation_ratings": len(fd.val),
        }
    t_fit = time.perf_counter()
    best = fit_lrs(start.restore(), cfg, fd)
    best_cfg, best_err = cfg, sq_errors(best, fd)
    budget = cfg.tune_seconds if cfg.tune_seconds is not None else float("inf")
    trial_seconds = time.perf_counter() - t_fit
    trials: list[dict[str, Any]] = [
        {"changed": {}, "val_rmse": best_val(best), "seconds": round(trial_seconds, 3)}
    ]
    spent, stopped = 0.0, "searched every strength"

    def attempt(c: TrainConfig, changed: dict[str, float]) -> Fit | None:
        nonlocal spent, trial_seconds
        if len(trials) > cfg.tune_trials or spent + trial_seconds > budget:
            return None
        t = time.perf_counter()
        fit = fit_lrs(start.restore(), c, fd)
        trial_seconds = time.perf_counter() - t
        spent += trial_seconds
        trials.append(
            {"changed": changed, "val_rmse": best_val(fit), "seconds": round(trial_seconds, 3)}
        )
        if progress:
            print(
                f"tune {changed}: val RMSE {best_val(fit):.4f} (best so far {best_val(best):.4f})",
                file=sys.stderr,
            )
        return fit

    # strengths that act in this fit: item features only when refined, b_u only for lrs
    names = [
        n
        for n in SEARCH
        if (n != "reg_features" or fd.refine) and (n != "reg_b" or cfg.method == "lrs")
    ]
    for name in names:
        for factor in (FACTOR, 1.0 / FACTOR):
            moved = False
            for _ in range(MAX_STEPS):
                value = float(getattr(best_cfg, name)) * factor
                changes: dict[str, Any] = {name: value}
                c = replace(best_cfg, **changes)
                fit = attempt(c, {name: value})
                if fit is None:
                    stopped = "budget"
                    break
                err = sq_errors(fit, fd)
                if clearly_better(err, best_err):
                    best, best_cfg, best_err, moved = fit, c, err, True
                else:
                    break
            if stopped == "budget" or moved:
                break
        if stopped == "budget":
            break
    chosen = {n: float(getattr(best_cfg, n)) for n in names}
    record = {
        "chosen": chosen,
        "budget_trials": cfg.tune_trials,
        "budget_seconds": cfg.tune_seconds,
        "tuning_seconds": round(spent, 3),
        "stopped": stopped,
        "trials": trials,
        **record_sample,
    }
    return (None if record_sample else best), record
