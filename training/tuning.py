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
from lrs_rec.training.pipeline import Fit, FitData, _snapshot, fit_lrs

from lrs_rec.engine.steps import LRSState

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


def tune(
    start: LRSState, cfg: TrainConfig, fd: FitData, *, progress: bool
) -> tuple[Fit, dict[str, Any]]:
    """(the best fit found, the tuning record for the manifest: chosen values, trials, budget)."""
    t_fit = time.perf_counter()
    best = fit_lrs(_snapshot(start), cfg, fd)
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
        fit = fit_lrs(_snapshot(start), c, fd)
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
    }
    return best, record
