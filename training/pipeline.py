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
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from lrs_rec.training.config import TrainConfig
from lrs_rec.training.features import als_factors, fit_biases, load_item_features
from lrs_rec.training.heap import trim as trim_heap
from lrs_rec.training.loaders import RatingTable
from lrs_rec.training.spill import Spill, Spilled
from lrs_rec.training.spill import load as spill_load
from lrs_rec.training.vocab import Vocabulary

from lrs_rec.engine import parallel
from lrs_rec.engine.b_rows import top_k_b, zero_b
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


def index_array(codes: np.ndarray, n: int) -> np.ndarray:
    """Dense indices as int32 when ``n`` fits (half the memory of int64 for every rating), else
    int64."""
    return np.asarray(codes, dtype=np.int32 if n < np.iinfo(np.int32).max else np.int64)


def encode(table: RatingTable, users: Vocabulary, items: Vocabulary) -> Samples:
    """The table as dense-index samples: int32 user / item indices, a float64 copy of the ratings
    (the trainer scales it in place)."""
    return Samples(
        index_array(users.encode(table.user_ids()), len(users)),
        index_array(items.encode(table.item_ids()), len(items)),
        np.array(table.ratings, dtype=np.float64),
    )


def validation_mask(data: Samples, fraction: float, rng: np.random.Generator) -> np.ndarray | None:
    """A seeded random hold-out of the training ratings (True: validation), for the per-iteration
    validation loss; None when ``fraction`` is 0. Users with a single rating always stay in the
    training part."""
    if fraction <= 0.0:
        return None
    counts = np.bincount(data.users)
    return np.asarray((rng.random(len(data)) < fraction) & (counts[data.users] > 1))


COLUMN_CHUNK = 1 << 20  # values per chunk when compacting a column (bounded temporaries)


@dataclass(frozen=True)
class Column:
    """A per-rating column held compactly until the model is assembled: integral values as int32
    offsets from their minimum when they fit (Unix times in seconds, integer ratings), else float32
    when every value survives the round trip (half-star ratings), else float64; a column of NaN
    only (no times in the file) as one value. :meth:`values` gives back the float64 column
    exactly."""

    data: np.ndarray | Spilled
    base: float = 0.0
    size: int = -1  # the length of an all-NaN column (``data`` then holds one NaN)

    @classmethod
    def of(cls, x: np.ndarray, order: np.ndarray | None = None) -> Column:
        """The column ``x`` (float64), or ``x[order]``, compacted in chunks of
        :data:`COLUMN_CHUNK` (no full-length float64 temporaries)."""
        n = int(x.shape[0] if order is None else order.shape[0])

        def chunks() -> Iterator[tuple[int, np.ndarray]]:
            for a in range(0, n, COLUMN_CHUNK):
                sl = slice(a, a + COLUMN_CHUNK)
                yield a, np.asarray(x[sl] if order is None else x[order[sl]], dtype=np.float64)

        finite = integral = exact32 = all_nan = True
        lo, hi = np.inf, -np.inf
        for _, c in chunks():
            f = np.isfinite(c)
            finite = finite and bool(f.all())
            all_nan = all_nan and bool(np.isnan(c).all())
            if c.size and f.any():
                lo, hi = min(lo, float(c[f].min())), max(hi, float(c[f].max()))
            integral = integral and finite and bool((np.floor(c) == c).all())
            exact32 = exact32 and np.array_equal(c.astype(np.float32), c, equal_nan=True)
        if n and all_nan:
            return cls(np.full(1, np.nan), size=n)
        if n and integral and hi - lo < 2**31 - 1:
            out = np.empty(n, np.int32)
            for a, c in chunks():
                out[a : a + c.size] = c - lo
            return cls(out, lo)
        out = np.empty(n, np.float32 if exact32 else np.float64)
        for a, c in chunks():
            out[a : a + c.size] = c
        return cls(out)

    def spilled(self, spill: Spill) -> Column:
        """The same column with its data parked on disk (when large)."""
        data = self.data
        if self.size < 0 and isinstance(data, np.ndarray):
            data = spill.put(data)
        return Column(data, self.base, self.size)

    def values(self) -> np.ndarray:
        if self.size >= 0:
            return np.full(self.size, np.nan)
        out = np.asarray(spill_load(self.data), dtype=np.float64)
        if self.base:
            out += self.base
        return out


def encode_in_history_order(
    table: RatingTable,
    users: Vocabulary,
    items: Vocabulary,
    fraction: float,
    rng: np.random.Generator,
    *,
    release_table: bool = False,
) -> tuple[Samples, np.ndarray | None, Column, Column]:
    """The table as samples sorted by user, then item — the model's history order, and the order
    the compiled kernels read the ratings by user in (:meth:`Samples.csr` then shares the samples'
    own arrays) — with the validation mask (drawn in the table's row order, :func:`validation_mask`,
    then permuted alike) and the ratings and times in that order (:class:`Column`: what the model's
    histories need from the table, so that the table can be released right after this).
    ``release_table``: each of the table's columns is released as soon as it is encoded."""
    u = index_array(users.encode(table.user_ids()), len(users))
    i = index_array(items.encode(table.item_ids()), len(items))
    if release_table:
        table.release("ids")
    mask = None
    if fraction > 0.0:
        counts = np.bincount(u)
        mask = np.asarray((rng.random(u.shape[0]) < fraction) & (counts[u] > 1))
        del counts
    K = parallel.kernels()
    # by user, then item (ties keep the table's order); the compiled twin is two counting sorts
    order = np.lexsort((i, u)) if K is None else K.lex_order(u, len(users), i, len(items))
    u, i = u[order], i[order]
    ratings = np.asarray(table.ratings[order], dtype=np.float64)
    if release_table:
        table.release("ratings")
    times = Column.of(table.timestamps, order)
    if release_table:
        table.release("timestamps")
    if mask is not None:
        mask = mask[order]
    return Samples(u, i, ratings), mask, Column.of(ratings), times


def take(data: Samples, rows: np.ndarray) -> Samples:
    return Samples(data.users[rows], data.items[rows], data.ratings[rows])


def merge(train: Samples, val: Samples, mask: np.ndarray) -> Samples:
    """The inverse of the split: the samples in their original order (``mask``: validation rows)."""
    out = Samples(
        np.empty(mask.size, train.users.dtype),
        np.empty(mask.size, train.items.dtype),
        np.empty(mask.size, train.ratings.dtype),
    )
    for name in ("users", "items", "ratings"):
        getattr(out, name)[~mask] = getattr(train, name)
        getattr(out, name)[mask] = getattr(val, name)
    return out


def split_validation(
    data: Samples, fraction: float, rng: np.random.Generator
) -> tuple[Samples, Samples]:
    """(training part, validation part) of :func:`validation_mask`."""
    val = validation_mask(data, fraction, rng)
    if val is None:
        return data, take(data, np.zeros(0, np.int64))
    return take(data, ~val), take(data, val)


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
            cg_steps=cfg.init_cg_steps,
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
            *zero_b(n_users, 0),
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
        U = top_right_singular_vectors(P, cfg.rank)
    W = project_rows(P, U)
    # B = 0 (width 0: the user step widens it to its k)
    return LRSState(mu, c_u, c_i, np.array(F, dtype=np.float64), U, W, *zero_b(n_users, 0))


SVD_ROWS = 1 << 16  # rows per block of the tall-skinny QR in top_right_singular_vectors


def top_right_singular_vectors(P: np.ndarray, r: int) -> np.ndarray:
    """The top-``r`` right singular vectors of the tall (n, d) ``P`` as a (d, r) matrix, from the
    R factor of a blockwise QR (R of the stacked blocks' R factors: P = QR, so P and R have the
    same singular values and right singular vectors), instead of ``svd(P)``, which would hold a
    copy of P and its (n, d) left singular vectors. Column signs are LAPACK's (may differ from
    ``svd(P)``'s; U Uᵀ and θ do not depend on them)."""
    n = P.shape[0]
    if n <= SVD_ROWS:
        R = _f64(P)
    else:  # P may be stored in float32 (the ALS start's user factors): each block in float64
        parts = [
            np.asarray(np.linalg.qr(_f64(P[a : a + SVD_ROWS]), mode="r"))
            for a in range(0, n, SVD_ROWS)
        ]
        R = np.asarray(np.linalg.qr(np.vstack(parts), mode="r"))
    _, _, Vt = np.linalg.svd(R, full_matrices=False)
    return np.ascontiguousarray(Vt[:r].T)


def _f64(a: np.ndarray) -> np.ndarray:
    return np.asarray(a, dtype=np.float64)


def project_rows(P: np.ndarray, U: np.ndarray) -> np.ndarray:
    """P U in float64, SVD_ROWS rows at a time (P may be float32: no float64 copy of all of it)."""
    out = np.empty((P.shape[0], U.shape[1]))
    for a in range(0, P.shape[0], SVD_ROWS):
        out[a : a + SVD_ROWS] = _f64(P[a : a + SVD_ROWS]) @ U
    return out


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
    spill: Spill | None = None  # where the fit parks its best-iterate snapshot (None: memory)


OVERFIT_RISE = 0.001  # relative rise of the validation RMSE one iteration after the best


@dataclass
class Fit:
    state: LRSState  # the best validation iterate (the last one without a validation part)
    history: list[dict[str, float]]
    best_iteration: int


def fit_lrs(state: LRSState, cfg: TrainConfig, fd: FitData, *, progress: bool = False) -> Fit:
    """The alternating loop from ``state`` (modified): per-iteration train / validation RMSE,
    early stopping with patience, back to the best validation iterate. A validation RMSE more than
    :data:`OVERFIT_RISE` above the best stops the loop at once (the fit has started to overfit;
    waiting out the patience costs iterations that, on the curves measured in docs/scale.md, never
    came back below the best)."""
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
    best_state: Snapshot | None = None
    for it in bar:
        iterate(state, cfg, fd.train, params, learn_u=fd.learn_u, refine=fd.refine, reg_u=fd.reg_u)
        trim_heap()
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
                if best_state is not None:
                    best_state.discard(fd.spill)
                best_val, best_it = row["val_rmse"], it
                best_state = Snapshot.of(state, fd.spill)
            elif it - best_it >= cfg.patience or row["val_rmse"] > best_val * (1 + OVERFIT_RISE):
                break  # patience used up, or a clear rise (overfitting): no further iteration
    if not early:
        return Fit(state, history, len(history) - 1)
    assert best_state is not None
    if best_it == len(history) - 1:
        best_state.discard(fd.spill)
        return Fit(state, history, best_it)  # the last iterate is the best: no copy needed
    best_state.restore_into(state)  # in place: no second copy of the per-user arrays
    best_state.discard(fd.spill)
    return Fit(state, history, best_it)


def item_step_overfits(history: list[dict[str, float]], best_it: int) -> bool:
    """Whether one more alternation after the best iterate raised the validation RMSE by more than
    0.1 %: then the final pass on all ratings (one more alternation, which would continue the
    overfitting: sparse data, where the features of items with a handful of ratings and the θ_u of
    users with a handful follow their noise) is skipped, and the best iterate is written as it is."""
    if best_it + 1 >= len(history) or best_it == 0:
        return False
    before, after = history[best_it]["val_rmse"], history[best_it + 1]["val_rmse"]
    return bool(after > before * (1 + OVERFIT_RISE))


def biases_only(
    start: Snapshot | LRSState, data: Samples, reg_bias: float, *, copy: bool = True
) -> LRSState:
    """μ + c_u + c_i (ridge λ_bias) with zero item features: the model the trainer keeps when
    neither the LRS fit nor its start beats biases alone on validation. U, W stay the start's (the
    population prior keeps its shape for onboarding; with F = 0 they do not change a prediction),
    B is zero. ``copy=False`` shares the start's W and a read-only zero B (enough to score it on
    validation without a copy of the per-user arrays). B = 0 is stored at width 0."""
    mu, c_u, c_i = fit_biases(
        data.users,
        data.items,
        data.ratings,
        n_users=start.user_bias.size,
        n_items=start.item_bias.size,
        reg_user=reg_bias,
        reg_item=reg_bias,
        n_iter=10,
        samples=data,
    )
    n, r = start.user_bias.size, start.U.shape[1]
    if copy:
        W = start.W  # a snapshot's W read back from disk is already a fresh array
        W = W.copy() if isinstance(start, LRSState) or W is start.w else W
    else:  # F = 0: W does not change a prediction (read-only zeros, no per-user array)
        W = np.broadcast_to(np.zeros(1), (n, r))
    return LRSState(mu, c_u, c_i, np.zeros_like(start.F), start.U.copy(), W, *zero_b(n, 0))


@dataclass(frozen=True)
class Snapshot:
    """A copy of an :class:`LRSState` (whose b_u are k-sparse pairs). With a
    :class:`~lrs_rec.training.spill.Spill`, the large per-user arrays (W, the pairs) are parked on
    disk until restored. :meth:`restore` gives back the state exactly."""

    global_mean: float
    user_bias: np.ndarray
    item_bias: np.ndarray
    F: np.ndarray
    U: np.ndarray
    w: np.ndarray | Spilled  # W (n_users, r), in memory or on disk
    b_idx_store: np.ndarray | Spilled  # (n_users, k) the state's B_idx
    b_val_store: np.ndarray | Spilled  # (n_users, k) its B_val
    d: int
    b_dtype: Any

    @property
    def W(self) -> np.ndarray:
        return spill_load(self.w)

    @property
    def b_idx(self) -> np.ndarray:
        return spill_load(self.b_idx_store)

    @property
    def b_val(self) -> np.ndarray:
        return spill_load(self.b_val_store)

    @property
    def n_users(self) -> int:
        return int(self.user_bias.shape[0])

    @classmethod
    def of(cls, state: LRSState, spill: Spill | None = None) -> Snapshot:
        idx, val = state.B_idx.copy(), state.B_val.copy()
        return cls(
            state.global_mean,
            state.user_bias.copy(),
            state.item_bias.copy(),
            state.F.copy(),
            state.U.copy(),
            state.W.copy() if spill is None else spill.put(state.W),
            idx if spill is None else spill.put(idx),
            val if spill is None else spill.put(val),
            state.F.shape[1],
            val.dtype,
        )

    def discard(self, spill: Spill | None) -> None:
        """Remove this snapshot's spilled files (it is superseded)."""
        if spill is not None:
            for a in (self.w, self.b_idx_store, self.b_val_store):
                spill.discard(a)

    def dense_b(self) -> np.ndarray:
        """B as a dense (n_users, d) array (tests only)."""
        B = np.zeros((self.n_users, self.d), self.b_dtype)
        idx = self.b_idx
        if idx.shape[1]:
            np.put_along_axis(B, idx.astype(np.int64), self.b_val, axis=1)
        return B

    def _pairs(self) -> tuple[np.ndarray, np.ndarray]:
        """Fresh copies of the pairs (arrays read back from disk are fresh already)."""
        idx, val = self.b_idx, self.b_val
        return (
            idx.copy() if idx is self.b_idx_store else idx,
            val.copy() if val is self.b_val_store else val,
        )

    def restore(self) -> LRSState:
        """A fresh state equal to the one snapshotted (its own arrays)."""
        W = self.W
        return LRSState(
            self.global_mean,
            self.user_bias.copy(),
            self.item_bias.copy(),
            self.F.copy(),
            self.U.copy(),
            W.copy() if W is self.w else W,
            *self._pairs(),
        )

    def restore_into(self, state: LRSState) -> None:
        """Make ``state`` (of the same shapes) equal to the snapshot, reusing its arrays."""
        state.global_mean = self.global_mean
        for name in ("user_bias", "item_bias", "F", "U"):
            setattr(state, name, getattr(self, name).copy())
        W = self.W
        state.W = W.copy() if W is self.w else W
        state.B_idx, state.B_val = self._pairs()

    def take_users(self, users: np.ndarray) -> Snapshot:
        """The snapshot of the given users only (items, F, U unchanged), in memory."""
        return Snapshot(
            self.global_mean,
            self.user_bias[users],
            self.item_bias,
            self.F,
            self.U,
            self.W[users],
            self.b_idx[users],
            self.b_val[users],
            self.d,
            self.b_dtype,
        )


def run_settings(
    cfg: TrainConfig, *, rank: int, n_users: int, plugin: bool
) -> tuple[dict[str, Any], bool, bool, float]:
    """What a run derives once the start is known (local and Dask engines alike): the
    hyperparameters for the manifest (the rank actually used, with a warning when U has fewer
    directions than asked: it comes from an SVD of the (n_users, d) user factors), whether the item
    features are refined, whether U is learned (Eq. 5, fixed features only) and the U-step ridge."""
    hyperparameters: dict[str, Any] = cfg.to_dict()
    if cfg.method in ("lrs", "rep") and rank < cfg.rank:
        print(
            f"warning: rank r={cfg.rank} exceeds the {n_users} training users; using r={rank}",
            file=sys.stderr,
        )
        hyperparameters.update(rank=rank, rank_requested=cfg.rank)
    refine = cfg.refine_features and not plugin
    learn_u = (not refine) and cfg.method in ("lrs", "rep")
    return hyperparameters, refine, learn_u, effective_reg_u(cfg, plugin=plugin)


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
    state.B_val *= unit


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
    if np.any(np.count_nonzero(state.B_val, axis=1) > k):
        raise ValueError(f"some row of B has more than k={k} non-zeros")
    # the pairs as LRSModel.from_dense_b gives them (sorted top-k, zero padding to the lowest
    # indices), without a dense B
    idx, val = top_k_b(state.B_idx, state.B_val, k, state.F.shape[1])
    return LRSModel(U=state.U, W=state.W, B_idx=idx, B_val=val)


def history_order(data: Samples) -> np.ndarray:
    """The permutation of ``data`` into history-CSR order (by user, then item): np.lexsort((items,
    users))'s order by one stable sort of an int64 key (fast on ratings grouped by user)."""
    n_items = int(data.items.max()) + 1 if len(data) else 1
    return np.argsort(data.users.astype(np.int64) * n_items + data.items, kind="stable")


def history_csr(data: Samples, n_users: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    order = history_order(data)
    indptr = np.zeros(n_users + 1, dtype=np.int64)
    np.cumsum(np.bincount(data.users, minlength=n_users), out=indptr[1:])
    return indptr, data.items[order].astype(np.int64), data.ratings[order].astype(np.float64)


def peak_rss_mb() -> float | None:
    """The process's peak resident memory so far (ru_maxrss; None where unavailable)."""
    try:
        import resource
    except ImportError:  # not on Windows
        return None
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(kb / (1 << 20 if sys.platform == "darwin" else 1 << 10), 1)


class PhaseLog:
    """Wall seconds of each training phase, the process's CPU seconds in it (every thread's; less
    sensitive than the wall time to other jobs on the machine) and the process's peak RSS at its
    end (a high-water mark: the phase where it jumps is the one that needed the memory); written
    to the manifest (``metrics.phases``)."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []
        self._t = time.perf_counter()
        self._cpu = time.process_time()

    def mark(self, phase: str) -> None:
        now, cpu = time.perf_counter(), time.process_time()
        self.rows.append(
            {
                "phase": phase,
                "seconds": round(now - self._t, 3),
                "cpu_seconds": round(cpu - self._cpu, 3),
                "peak_rss_mb": peak_rss_mb(),
            }
        )
        trim_heap()  # the phase's freed temporaries back to the system before the next one
        self._t, self._cpu = now, cpu


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
    release_table: bool = False,
) -> TrainResult:
    """Train on a cleaned rating table; returns the model (not yet saved) and the loss history.

    ``release_table``: drop the table's columns (:meth:`RatingTable.release`) once they are
    encoded, so that they are not alive during training (``lrs-rec train`` does)."""
    spill = Spill()  # large copies read only much later go to disk (training/spill.py)
    try:
        return _train(
            table,
            cfg,
            item_features_path=item_features_path,
            progress=progress,
            extra_manifest=extra_manifest,
            release_table=release_table,
            spill=spill,
        )
    finally:
        spill.close()


def _train(
    table: RatingTable,
    cfg: TrainConfig,
    *,
    item_features_path: str | None,
    progress: bool,
    extra_manifest: dict[str, Any] | None,
    release_table: bool,
    spill: Spill,
) -> TrainResult:
    t0 = time.perf_counter()
    phases = PhaseLog()
    rng = np.random.default_rng(cfg.seed)
    user_vocab, item_vocab = build_vocabularies(table)
    n_users, n_items = len(user_vocab), len(item_vocab)
    data, val_mask, h_ratings_col, h_times_col = encode_in_history_order(
        table, user_vocab, item_vocab, cfg.validation_fraction, rng, release_table=release_table
    )
    table_info = {
        "source": table.report.source,
        "format": table.report.format,
        "fingerprint_sha256": table.fingerprint,
        "n_ratings": len(table),
    }
    cleaning = table.report.to_dict()
    rating_min, rating_max = table.rating_min, table.rating_max
    if release_table:
        table.release()  # (done column by column above) the samples and histories hold it
        trim_heap()
    # read again only when the model is assembled
    h_ratings_col, h_times_col = h_ratings_col.spilled(spill), h_times_col.spilled(spill)
    # the two parts only (the whole is rebuilt from them for the final pass): one copy of the
    # samples is alive during the fits, not the raw, scaled, training and validation ones at once
    if val_mask is None:
        train_part, val_part = data, take(data, np.zeros(0, np.int64))
    else:
        train_part, val_part = take(data, ~val_mask), take(data, val_mask)
    del data
    # work in standardised rating units (ridge strengths independent of the rating scale)
    unit = rating_unit(train_part.ratings) if cfg.standardize else 1.0
    train_part.ratings /= unit
    val_part.ratings /= unit
    phases.mark("encode")

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
    phases.mark("init")
    hyperparameters, refine, learn_u, reg_u = run_settings(
        cfg, rank=state.U.shape[1], n_users=n_users, plugin=plugin is not None
    )
    lo, hi = rating_min / unit, rating_max / unit
    fit_data = FitData(train_part, val_part, lo, hi, unit, learn_u, refine, reg_u, spill)

    start = Snapshot.of(state, spill)
    del state
    tuning: dict[str, Any] | None = None
    fit: Fit | None = None
    if cfg.tune and len(val_part) and cfg.method in ("lrs", "rep", "full"):
        from lrs_rec.training.tuning import tune

        fit, tuning = tune(start, cfg, fit_data, progress=progress)
        cfg = replace(cfg, **tuning["chosen"])
        phases.mark("tune")
    if fit is None:  # no tuning, or tuned on a sample of the users: one fit on all of them
        fit = fit_lrs(start.restore(), cfg, fit_data, progress=progress)
        phases.mark("fit")
    state, history, best_it = fit.state, fit.history, fit.best_iteration
    del fit
    params = method_params(cfg)
    # keep the best on validation of: the best LRS iterate, its start (biases + item features), and
    # biases alone (the population model without item features: μ + c_u + c_i)
    candidates = {"lrs": history[best_it]["val_rmse"], "start": history[0]["val_rmse"]}
    biases = biases_only(start, train_part, cfg.reg_bias, copy=False)
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
        del state
        state, best_it = (start.restore(), 0) if selected == "start" else (biases, 0)
    train_rmse = (
        unit * rmse(biases, train_part, lo, hi)
        if selected == "biases"
        else history[best_it]["train_rmse"]
    )
    val_rmse = candidates[selected] if len(val_part) else history[best_it]["val_rmse"]
    del biases
    # final passes on all ratings (the validation part included), then a last user step
    data = train_part if val_mask is None else merge(train_part, val_part, val_mask)
    del train_part, fit_data
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
    n_val = len(val_part)
    del start, val_part
    phases.mark("final pass")
    # the history CSR in the ratings' own units (the table's), rating times in the same order
    # (the onboarding prior learns from users' first ratings): the samples are in that order
    indptr = np.zeros(n_users + 1, dtype=np.int64)
    np.cumsum(np.bincount(data.users, minlength=n_users), out=indptr[1:])
    n_train = len(data) - n_val
    h_items = data.items.astype(np.int64)
    del data  # with the kernels' layouts of it
    unscale(state, unit)

    lrs = to_lrs_model(state, cfg)
    state.set_b(*zero_b(0, 0))  # stored in lrs now
    w_mean, w_cov = population_prior(
        LRSState(
            state.global_mean, state.user_bias, state.item_bias, state.F, lrs.U, lrs.W,
            state.B_idx, state.B_val,
        )
    )  # fmt: skip
    h_ratings = h_ratings_col.values()
    del h_ratings_col
    h_times = h_times_col.values()
    del h_times_col
    phases.mark("model")
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
            **table_info,
            "n_users": n_users,
            "n_items": n_items,
            "n_train_part": n_train,
            "n_validation_part": n_val,
        },
        "cleaning": cleaning,
        "item_features": plugin_info or {"source": "als", "d": int(state.F.shape[1])},
        "metrics": {
            "train_rmse": train_rmse,
            "val_rmse": val_rmse,
            "history": history,
            "best_iteration": best_it,
            "selected": selected,
            "final_pass": final_pass,
            "candidates_val_rmse": candidates if n_val else None,
            "start_val_rmse": history[0]["val_rmse"],
            "train_seconds": round(seconds, 3),
            "phases": phases.rows,
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
        rating_min=rating_min,
        rating_max=rating_max,
        manifest=manifest,
        history_timestamps=h_times if np.isfinite(h_times).all() else None,
    )
    return TrainResult(model=model, history=history, seconds=seconds)
