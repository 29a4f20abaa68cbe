"""The one training loop: cleaned ratings -> :class:`training.model_dir.TrainedModel`.

Steps (each a function, so that a variant — e.g. the private trainer — can swap one):

    load (training.loaders) -> build_vocabularies -> split_validation -> init_features (biases + item
    features, from training ratings only) -> init_state -> fit (alternating user / U / item steps,
    per-iteration train and validation RMSE) -> final_passes (all ratings) -> population_prior ->
    assemble_model (history CSR, manifest)
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from lrs_rec.training.config import TrainConfig
from lrs_rec.training.features import als_factors, fit_biases, load_item_features
from lrs_rec.training.loaders import RatingTable
from lrs_rec.training.lrs_als import (
    LRSState,
    Samples,
    StepParams,
    item_step,
    rmse,
    u_step,
    user_step,
)
from lrs_rec.training.vocab import Vocabulary

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
    from tqdm import tqdm

    t0 = time.perf_counter()
    rng = np.random.default_rng(cfg.seed)
    user_vocab, item_vocab = build_vocabularies(table)
    n_users, n_items = len(user_vocab), len(item_vocab)
    data = encode(table, user_vocab, item_vocab)
    train_part, val_part = split_validation(data, cfg.validation_fraction, rng)

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
    params = method_params(cfg)
    refine = cfg.refine_features and plugin is None
    learn_u = (not refine) and cfg.method in ("lrs", "rep")
    reg_u = effective_reg_u(cfg, plugin=plugin is not None)
    lo, hi = table.rating_min, table.rating_max

    history: list[dict[str, float]] = [
        {
            "iteration": 0.0,  # after initialisation (biases + item features), before the LRS fit
            "train_rmse": rmse(state, train_part, lo, hi),
            "val_rmse": rmse(state, val_part, lo, hi),
        }
    ]
    bar = tqdm(
        range(1, cfg.n_iter + 1),
        desc=f"train {cfg.method}",
        unit="iter",
        disable=not progress,
        file=sys.stderr,
    )
    early = bool(len(val_part)) and cfg.patience > 0
    best_val, best_it = float("inf"), 0  # the LRS fit always runs at least one iteration
    best_state: LRSState | None = None
    for it in bar:
        iterate(state, cfg, train_part, params, learn_u=learn_u, refine=refine, reg_u=reg_u)
        row = {
            "iteration": float(it),
            "train_rmse": rmse(state, train_part, lo, hi),
            "val_rmse": rmse(state, val_part, lo, hi),
        }
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
        best_it = len(history) - 1
    elif history[0]["val_rmse"] < best_val:
        print(
            f"warning: no {cfg.method} iteration beat the start (biases and item features only) on "
            f"validation: val RMSE {history[0]['val_rmse']:.4f} at iteration 0, {best_val:.4f} at "
            f"best; the item features may carry little signal about the ratings",
            file=sys.stderr,
        )
    elif best_state is not None and best_it < len(history) - 1:
        state = best_state  # early stopping: back to the best validation iterate
    # final passes on all ratings (the validation part included), then a last user step
    if len(val_part):
        for _ in range(cfg.final_passes):
            iterate(state, cfg, data, params, learn_u=learn_u, refine=refine, reg_u=reg_u)
        if cfg.final_passes:
            user_step(state, data, params)

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
        "hyperparameters": {**hyperparameters, "effective_reg_u": reg_u if learn_u else None},
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
            "train_rmse": history[best_it]["train_rmse"],
            "val_rmse": history[best_it]["val_rmse"],
            "history": history,
            "best_iteration": best_it,
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
        rating_min=lo,
        rating_max=hi,
        manifest=manifest,
        history_timestamps=h_times if np.isfinite(h_times).all() else None,
    )
    return TrainResult(model=model, history=history, seconds=seconds)
