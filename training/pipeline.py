"""The one training loop: cleaned ratings -> :class:`training.model_dir.TrainedModel`.

Steps (each a function, so that a variant — e.g. the private trainer — can swap one):

    load (training.loaders) -> build_vocabularies -> split_validation -> standardise (rating_unit)
    -> init_features (biases + item features, from training ratings only) -> init_state -> fit
    (alternating user / U / item steps, per-iteration train and validation RMSE; with --tune several
    fits, training.tuning) -> keep the best on validation of the fit, its start and biases alone ->
    final_passes (all ratings, unless the loop overfitted) -> unscale -> population_prior ->
    assemble_model (history CSR, manifest)
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from lrs_rec.training.config import TrainConfig
from lrs_rec.training.features import als_factors, fit_biases, load_item_features
from lrs_rec.training.loaders import RatingTable
from lrs_rec.training.vocab import Vocabulary

from lrs_rec.engine.steps import (
    LRSState,
    Samples,
    StepParams,
    item_step,
    rmse,
    u_step,
    user_step,
)
from lrs_rec.model import LRSModel
from lrs_rec.model_dir import TrainedModel


@dataclass
class TrainResult:
    model: TrainedModel
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0


# ------------------------------------------------------------------------------------------------
# steps
# ------------------------------------------------------------------------------------------------
def build_vocabularies(table: RatingTable) -> tuple[Vocabulary, Vocabulary]:
    return Vocabulary.from_ids(table.user_ids()), Vocabulary.from_ids(table.item_ids())


def encode(table: RatingTable, users: Vocabulary, items: Vocabulary) -> Samples:
    return Samples(
        users.encode(table.user_ids()), items.encode(table.item_ids()), table.ratings.copy()
    )


def split_validation(
    data: Samples, fraction: float, rng: np.random.Generator
) -> tuple[Samples, Samples]:
    """A seeded random hold-out of the training ratings, for the per-iteration validation loss.
    Users with a single rating always stay in the training part."""
    n = len(data)
    if fraction <= 0.0:
        return data, Samples(data.users[:0], data.items[:0], data.ratings[:0])
    counts = np.bincount(data.users)
    val = (rng.random(n) < fraction) & (counts[data.users] > 1)
    tr = ~val
    return (
        Samples(data.users[tr], data.items[tr], data.ratings[tr]),
        Samples(data.users[val], data.items[val], data.ratings[val]),
    )


def method_params(cfg: TrainConfig) -> StepParams:
    return StepParams(
        k=cfg.sparsity if cfg.method == "lrs" else 0,
        per_user_w=cfg.method in ("lrs", "rep", "full"),
        user_bias=cfg.method != "single",
        reg_w=cfg.reg_w,
        reg_b=cfg.reg_b,
        reg_bias=cfg.reg_bias,
        population_prior=cfg.population_prior,
        conditional_prior=cfg.conditional_prior,
    )


def init_state(
    cfg: TrainConfig,
    train: Samples,
    n_users: int,
    n_items: int,
    plugin: np.ndarray | None,
    rng: np.random.Generator,
) -> LRSState:
    """Biases and item features from the training part only, then U, W from them.

    ALS mode: biased ALS-WR of rank d gives F and user factors P; U = top-r right singular vectors of P.
    Plug-in mode: F is given; U = top-r eigenvectors of Σ θ̂_u θ̂_uᵀ over per-user ridge solutions θ̂_u
    (a method-of-moments start, paper Remark 2)."""
    if plugin is None:
        als = als_factors(
            train.users,
            train.items,
            train.ratings,
            n_users=n_users,
            n_items=n_items,
            dim=cfg.dim,
            reg=cfg.init_reg,
            reg_bias=cfg.reg_bias,
            n_iter=cfg.init_iter,
            random_state=rng,
            min_count=cfg.init_reg_count,
            samples=train,
        )
        mu, c_u, c_i, F, P = als.global_mean, als.user_bias, als.item_bias, als.Q, als.P
    else:
        F = plugin
        mu, c_u, c_i = fit_biases(
            train.users,
            train.items,
            train.ratings,
            n_users=n_users,
            n_items=n_items,
            reg_user=cfg.reg_bias,
            reg_item=cfg.reg_bias,
        )
        full = LRSState(
            mu,
            c_u,
            c_i,
            F,
            np.eye(F.shape[1]),
            np.zeros((n_users, F.shape[1])),
            np.zeros((n_users, F.shape[1])),
        )
        user_step(
            full,
            train,
            StepParams(
                k=0,
                per_user_w=True,
                user_bias=True,
                reg_w=cfg.reg_w,
                reg_b=cfg.reg_b,
                reg_bias=cfg.reg_bias,
                population_prior=False,
                conditional_prior=False,
                n_inner=1,
            ),
        )
        P, c_u = full.W, full.user_bias
    d = F.shape[1]
    cfg.check_dims(d)
    if cfg.method == "full":
        U = np.eye(d)
    elif cfg.method in ("single", "prompt"):
        U = np.eye(d)  # one shared w ∈ R^d; stored as rank 1 at the end
    else:
        _, _, Vt = np.linalg.svd(P, full_matrices=False)
        U = Vt[: cfg.rank].T.copy()
    W = P @ U
    return LRSState(mu, c_u, c_i, np.array(F, dtype=np.float64), U, W, np.zeros((n_users, d)))


def iterate(
    state: LRSState,
    cfg: TrainConfig,
    data: Samples,
    params: StepParams,
    *,
    learn_u: bool,
    refine: bool,
    reg_u: float = 10.0,
) -> None:
    """One outer iteration of Algorithm 1: users (Eq. 3–4), U (Eq. 5, fixed features only), items."""
    user_step(state, data, params)
    if learn_u:
        u_step(state, data, ridge=reg_u)
    item_step(
        state, data, reg_features=cfg.reg_features, reg_bias=cfg.reg_bias, refine_features=refine
    )


@dataclass(frozen=True)
class FitData:
    """What every LRS fit of one training run shares (standardised units)."""

    train: Samples
    val: Samples
    lo: float
    hi: float
    unit: float  # the rating unit; losses are reported in the ratings' own units
    learn_u: bool
    refine: bool
    reg_u: float


@dataclass
class Fit:
    state: LRSState  # the best validation iterate (the last one without a validation part)
    history: list[dict[str, float]]
    best_iteration: int


def fit_lrs(state: LRSState, cfg: TrainConfig, fd: FitData, *, progress: bool = False) -> Fit:
    """The alternating loop from ``state`` (modified): per-iteration train / validation RMSE,
    early stopping with patience, back to the best validation iterate."""
    from tqdm import tqdm

    params = method_params(cfg)

    def losses(it: int) -> dict[str, float]:
        return {
            "iteration": float(it),
            "train_rmse": fd.unit * rmse(state, fd.train, fd.lo, fd.hi),
            "val_rmse": fd.unit * rmse(state, fd.val, fd.lo, fd.hi),
        }

    history = [losses(0)]  # after initialisation (biases + item features), before the LRS fit
    bar = tqdm(
        range(1, cfg.n_iter + 1),
        desc=f"train {cfg.method}",
        unit="iter",
        disable=not progress,
        file=sys.stderr,
    )
    early = bool(len(fd.val)) and cfg.patience > 0
    best_val, best_it = float("inf"), 0  # the LRS fit always runs at least one iteration
    best_state: LRSState | None = None
    for it in bar:
        iterate(state, cfg, fd.train, params, learn_u=fd.learn_u, refine=fd.refine, reg_u=fd.reg_u)
        row = losses(it)
        history.append(row)
        bar.set_postfix(train=f"{row['train_rmse']:.4f}", val=f"{row['val_rmse']:.4f}")
        if progress:
            tqdm.write(
                f"iter {it:3d}  train RMSE {row['train_rmse']:.4f}  val RMSE {row['val_rmse']:.4f}",
                file=sys.stderr,
            )
        if early:
            if row["val_rmse"] < best_val:
                best_val, best_it, best_state = row["val_rmse"], it, _snapshot(state)
            elif it - best_it >= cfg.patience:
                break
    if not early:
        return Fit(state, history, len(history) - 1)
    assert best_state is not None
    return Fit(best_state, history, best_it)


OVERFIT_RISE = 0.001  # relative rise of the validation RMSE one iteration after the best


def item_step_overfits(history: list[dict[str, float]], best_it: int) -> bool:
    """Whether one more alternation after the best iterate raised the validation RMSE by more than
    0.1 %: then the final pass on all ratings (one more alternation, which would continue the
    overfitting: sparse data, where the features of items with a handful of ratings and the θ_u of
    users with a handful follow their noise) is skipped, and the best iterate is written as it is."""
    if best_it + 1 >= len(history) or best_it == 0:
        return False
    before, after = history[best_it]["val_rmse"], history[best_it + 1]["val_rmse"]
    return bool(after > before * (1 + OVERFIT_RISE))


def biases_only(start: LRSState, data: Samples, reg_bias: float) -> LRSState:
    """μ + c_u + c_i (ridge λ_bias) with zero item features: the model the trainer keeps when
    neither the LRS fit nor its start beats biases alone on validation. U, W stay the start's (the
    population prior keeps its shape for onboarding; with F = 0 they do not change a prediction)."""
    mu, c_u, c_i = fit_biases(
        data.users,
        data.items,
        data.ratings,
        n_users=start.user_bias.size,
        n_items=start.item_bias.size,
        reg_user=reg_bias,
        reg_item=reg_bias,
        n_iter=10,
    )
    return LRSState(
        mu, c_u, c_i, np.zeros_like(start.F), start.U.copy(), start.W.copy(), start.B.copy()
    )


def _snapshot(state: LRSState) -> LRSState:
    return LRSState(
        state.global_mean,
        state.user_bias.copy(),
        state.item_bias.copy(),
        state.F.copy(),
        state.U.copy(),
        state.W.copy(),
        state.B.copy(),
    )


def effective_reg_u(cfg: TrainConfig, *, plugin: bool) -> float:
    """The U-step ridge: as configured, else 0.01 for plug-in features and 10 for ALS features
    fitted on the same ratings (which make an unregularised Eq. 5 overfit; docs/movielens.md)."""
    if cfg.reg_u is not None:
        return cfg.reg_u
    return 0.01 if plugin else 10.0


# spread (std) of the MovieLens 100K ratings, on which the default strengths were chosen
REFERENCE_STD = 1.126


def rating_unit(ratings: np.ndarray) -> float:
    """The rating unit the trainer works in: the training ratings' standard deviation relative to
    MovieLens 100K's. Dividing the ratings by it makes every ridge strength independent of the rating
    scale (a bilinear ⟨f_i, θ_u⟩ term with ridge λ on both factors behaves as λ / scale in the
    ratings' own units), while the defaults keep the meaning they were chosen with on MovieLens."""
    s = float(np.std(ratings)) if ratings.size > 1 else 0.0
    return s / REFERENCE_STD if np.isfinite(s) and s > 0 else 1.0


def scaled(data: Samples, unit: float) -> Samples:
    return Samples(data.users, data.items, data.ratings / unit)


def unscale(state: LRSState, unit: float) -> None:
    """Back to the ratings' own units: μ, biases and θ_u (W, B) times the unit; F unchanged
    (so plug-in features are stored exactly as given)."""
    state.global_mean *= unit
    state.user_bias *= unit
    state.item_bias *= unit
    state.W *= unit
    state.B *= unit


def population_prior(state: LRSState) -> tuple[np.ndarray, np.ndarray]:
    """w_prior_mean / w_prior_cov: mean and covariance of the trained users' w (population model)."""
    W = state.W
    mean = W.mean(axis=0)
    cov = (
        np.atleast_2d(np.cov(W, rowvar=False, bias=True))
        if W.shape[0] > 1
        else np.zeros((W.shape[1], W.shape[1]))
    )
    return mean, cov


def to_lrs_model(state: LRSState, cfg: TrainConfig) -> LRSModel:
    """The stored LRS form: rank r + k for lrs/rep, U = I for full, rank 1 for single/prompt."""
    k = cfg.sparsity if cfg.method == "lrs" else 0
    if cfg.method in ("single", "prompt"):
        theta = state.U @ state.W[0]
        norm = float(np.linalg.norm(theta))
        u = theta / norm if norm > 0 else np.eye(theta.size)[:, 0]
        W = np.full((state.W.shape[0], 1), norm)
        return LRSModel(
            U=u[:, None],
            W=W,
            B_idx=np.zeros((W.shape[0], 0), np.int64),
            B_val=np.zeros((W.shape[0], 0)),
        )
    return LRSModel.from_dense_b(state.U, state.W, state.B, k)


def history_order(data: Samples) -> np.ndarray:
    """The permutation of ``data`` into history-CSR order (by user, then item)."""
    return np.lexsort((data.items, data.users))


def history_csr(data: Samples, n_users: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    order = history_order(data)
    indptr = np.zeros(n_users + 1, dtype=np.int64)
    np.cumsum(np.bincount(data.users, minlength=n_users), out=indptr[1:])
    return indptr, data.items[order].astype(np.int64), data.ratings[order].astype(np.float64)


# ------------------------------------------------------------------------------------------------
# the loop
# ------------------------------------------------------------------------------------------------
def train(
    table: RatingTable,
    cfg: TrainConfig,
    *,
    item_features_path: str | None = None,
    progress: bool = True,
    extra_manifest: dict[str, Any] | None = None,
) -> TrainResult:
    """Train on a cleaned rating table; returns the model (not yet saved) and the loss history."""
    t0 = time.perf_counter()
    rng = np.random.default_rng(cfg.seed)
    user_vocab, item_vocab = build_vocabularies(table)
    n_users, n_items = len(user_vocab), len(item_vocab)
    raw = encode(table, user_vocab, item_vocab)
    raw_train, raw_val = split_validation(raw, cfg.validation_fraction, rng)
    # work in standardised rating units (ridge strengths independent of the rating scale)
    unit = rating_unit(raw_train.ratings) if cfg.standardize else 1.0
    data, train_part, val_part = (scaled(x, unit) for x in (raw, raw_train, raw_val))

    plugin = None
    plugin_info: dict[str, Any] = {}
    if item_features_path is not None:
        pf = load_item_features(item_features_path, item_vocab)
        plugin = pf.features
        plugin_info = {
            "source": pf.source,
            "d": int(plugin.shape[1]),
            "items_without_features": pf.n_missing,
            "unused_feature_rows": pf.n_unused,
        }
    state = init_state(cfg, train_part, n_users, n_items, plugin, rng)
    hyperparameters: dict[str, Any] = cfg.to_dict()
    if cfg.method in ("lrs", "rep") and state.U.shape[1] < cfg.rank:
        # U comes from an SVD of the (n_users, d) user factors: at most n_users directions
        print(
            f"warning: rank r={cfg.rank} exceeds the {n_users} training users; "
            f"using r={state.U.shape[1]}",
            file=sys.stderr,
        )
        hyperparameters.update(rank=state.U.shape[1], rank_requested=cfg.rank)
    refine = cfg.refine_features and plugin is None
    learn_u = (not refine) and cfg.method in ("lrs", "rep")
    reg_u = effective_reg_u(cfg, plugin=plugin is not None)
    lo, hi = table.rating_min / unit, table.rating_max / unit
    fit_data = FitData(train_part, val_part, lo, hi, unit, learn_u, refine, reg_u)

    start = _snapshot(state)
    tuning: dict[str, Any] | None = None
    if cfg.tune and len(val_part) and cfg.method in ("lrs", "rep", "full"):
        from lrs_rec.training.tuning import tune

        fit, tuning = tune(start, cfg, fit_data, progress=progress)
        cfg = replace(cfg, **tuning["chosen"])
    else:
        fit = fit_lrs(_snapshot(start), cfg, fit_data, progress=progress)
    state, history, best_it = fit.state, fit.history, fit.best_iteration
    params = method_params(cfg)
    # keep the best on validation of: the best LRS iterate, its start (biases + item features), and
    # biases alone (the population model without item features: μ + c_u + c_i)
    candidates = {"lrs": history[best_it]["val_rmse"], "start": history[0]["val_rmse"]}
    biases = biases_only(start, train_part, cfg.reg_bias)
    if len(val_part):
        candidates["biases"] = unit * rmse(biases, val_part, lo, hi)
    selected = "lrs"
    # (single / prompt: the start has per-user factors and biases, not that method's form)
    if len(val_part) and cfg.keep_best and cfg.method in ("lrs", "rep", "full"):
        selected = min(candidates, key=lambda k: (candidates[k], k != "lrs"))
    if selected != "lrs":
        print(
            f"note: no {cfg.method} iteration beat the "
            + ("start (biases and item features)" if selected == "start" else "biases alone")
            + " on validation (val RMSE "
            + ", ".join(f"{k} {v:.4f}" for k, v in candidates.items())
            + f"); keeping the {selected} model; the item features may carry little signal about"
            " the ratings",
            file=sys.stderr,
        )
        state, best_it = (start, 0) if selected == "start" else (biases, 0)
    train_rmse = (
        unit * rmse(biases, train_part, lo, hi)
        if selected == "biases"
        else history[best_it]["train_rmse"]
    )
    val_rmse = candidates[selected] if len(val_part) else history[best_it]["val_rmse"]
    # final passes on all ratings (the validation part included), then a last user step
    final_pass = "none"
    if len(val_part) and selected == "lrs" and cfg.final_passes:
        if item_step_overfits(history, best_it):
            final_pass = "skipped: the iteration after the best overfitted on validation"
        else:
            final_pass = "all ratings"
            for _ in range(cfg.final_passes):
                iterate(state, cfg, data, params, learn_u=learn_u, refine=refine, reg_u=reg_u)
            user_step(state, data, params)
    elif len(val_part) and selected == "biases":
        state = biases_only(start, data, cfg.reg_bias)
    unscale(state, unit)
    data = raw

    lrs = to_lrs_model(state, cfg)
    w_mean, w_cov = population_prior(
        LRSState(
            state.global_mean, state.user_bias, state.item_bias, state.F, lrs.U, lrs.W, state.B
        )
    )
    indptr, h_items, h_ratings = history_csr(data, n_users)
    # rating times in the same order (the onboarding prior learns from users' first ratings)
    h_times = table.timestamps[history_order(data)].astype(np.float64)
    seconds = time.perf_counter() - t0
    manifest: dict[str, Any] = {
        "method": cfg.method,
        "hyperparameters": {
            **hyperparameters,
            **(tuning["chosen"] if tuning else {}),
            "effective_reg_u": reg_u if learn_u else None,
            "rating_unit": unit,
        },
        "data": {
            "source": table.report.source,
            "format": table.report.format,
            "fingerprint_sha256": table.fingerprint,
            "n_ratings": len(table),
            "n_users": n_users,
            "n_items": n_items,
            "n_train_part": len(train_part),
            "n_validation_part": len(val_part),
        },
        "cleaning": table.report.to_dict(),
        "item_features": plugin_info or {"source": "als", "d": int(state.F.shape[1])},
        "metrics": {
            "train_rmse": train_rmse,
            "val_rmse": val_rmse,
            "history": history,
            "best_iteration": best_it,
            "selected": selected,
            "final_pass": final_pass,
            "candidates_val_rmse": candidates if len(val_part) else None,
            "start_val_rmse": history[0]["val_rmse"],
            "train_seconds": round(seconds, 3),
        },
        "params_per_user": {
            "lrs": lrs.rank + lrs.sparsity,
            "single": 0,
            "prompt": 1,
            "full": lrs.d,
            "rep": lrs.rank,
        }[cfg.method],
    }
    if tuning is not None:
        manifest["tuning"] = tuning
    if extra_manifest:
        manifest.update(extra_manifest)
    model = TrainedModel(
        lrs=lrs,
        item_features=state.F,
        item_bias=state.item_bias,
        user_bias=state.user_bias,
        global_mean=state.global_mean,
        user_ids=user_vocab.ids,
        item_ids=item_vocab.ids,
        w_prior_mean=w_mean,
        w_prior_cov=w_cov,
        history_indptr=indptr,
        history_items=h_items,
        history_ratings=h_ratings,
        rating_min=table.rating_min,
        rating_max=table.rating_max,
        manifest=manifest,
        history_timestamps=h_times if np.isfinite(h_times).all() else None,
    )
    return TrainResult(model=model, history=history, seconds=seconds)
