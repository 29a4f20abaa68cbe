"""A trained model used offline, by the external ids of the rating log: no Redis, no ONNX.

    import lrs_rec

    model = lrs_rec.load_model("models/m1")
    model.predict(["196", "186"], ["242", "302"])        # pairwise: one prediction per (user, item)
    model.predict("196", ["242", "302"])                 # one user (or one item) is broadcast
    model.recommend("196", n=10)                         # [(item_id, score), ...], best first
    user = model.fold_in([("242", 4.0), ("302", 5.0)])   # a new user from a few ratings
    model.predict(user, ["50", "181"])                   # ... used wherever a user id is
    model.recommend(user, n=10)

Everything equals what ``lrs-rec evaluate`` and the service compute for the same user and items:

* ``predict`` is :meth:`TrainedModel.predict`'s formula (the reference ``evaluate`` scores with; the
  tests compare the two), run in blocks of :data:`PREDICT_BLOCK` pairs: clip(μ + c_u + c_i +
  ⟨f_i, θ_u⟩) with θ_u = U·w_u + b_u, each pair's result independent of the block it is in.
* An unknown user gets the population model (θ = U·w̄, c_u = 0, b = 0), an unknown item the
  population prediction without the item bias (c_i = 0, f_i = 0): never an exception. Ids are
  matched as text; integers (and integral floats) are read as their decimal digits (``196`` is
  ``"196"``), as the rating loaders read them.
* ``recommend`` ranks every item of the model by the *unclipped* score, ties to the lower item
  index, and returns clipped scores, as the exported ONNX graph does (``training.export``); with
  ``exclude_rated`` the user's training history is left out (a folded-in user's: the items it was
  folded in from). An unknown user gets the population ranking, nothing excluded. (The service
  excludes the history it stores, the newest ``publish --history-cap`` = 1000 ratings by default:
  the same for every user with at most that many.)
* ``fold_in`` is the service's onboarding fit (:func:`lrs_rec.model_onboarding.build_onboarder`:
  the same prior and per-n schedule), with the same input rules: within one call a repeated item
  keeps its latest rating (by timestamp when every entry has one, else the last in the list).
  Ratings of items the model does not know are not used by the fit and are listed in
  ``ignored_item_ids``; with none left the user is the population model (``personalized`` False).

The model object is immutable (a frozen dataclass over read-only arrays) and safe to share
between threads.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any

import numpy as np

from lrs_rec._types import FloatArray, IntArray
from lrs_rec.model_dir import TrainedModel, load_model_dir
from lrs_rec.model_onboarding import build_onboarder
from lrs_rec.onboarding import ScheduledOnboarder

__all__ = ["OfflineModel", "UserParameters", "load_model"]

PREDICT_BLOCK = 1 << 16
"""Pairs per block of :meth:`OfflineModel.predict` (bounds its temporary memory: ~d·8 bytes each)."""

SCORE_BLOCK_CELLS = 1 << 22
"""Users × items per block of :meth:`OfflineModel.recommend_batch` scores (32 MB of float64)."""


@dataclass(frozen=True, eq=False)
class UserParameters:
    """One user's parameters as the service stores them: (c_u, w_u, b_u) with b_u k-sparse.

    Returned by :meth:`OfflineModel.fold_in`; pass it to ``predict`` / ``recommend`` in place of
    a user id. ``rated_item_ids`` are the known items it was fitted from (oldest first), which
    ``recommend(exclude_rated=True)`` leaves out."""

    w: FloatArray  # (r,)
    user_bias: float
    b_idx: IntArray  # (k,) sorted distinct coordinates (padding values are 0)
    b_val: FloatArray  # (k,)
    rated_item_ids: tuple[str, ...] = ()
    ratings: tuple[float, ...] = ()
    ignored_item_ids: tuple[str, ...] = ()
    personalized: bool = True
    n_open: int = 0  # opened sparse coordinates

    def __post_init__(self) -> None:
        for name, dtype in (("w", np.float64), ("b_idx", np.int64), ("b_val", np.float64)):
            arr = np.array(getattr(self, name), dtype=dtype)
            if arr.ndim != 1:
                raise ValueError(f"UserParameters.{name} must be 1-D, got shape {arr.shape}")
            arr.setflags(write=False)
            object.__setattr__(self, name, arr)
        if self.b_idx.shape != self.b_val.shape:
            raise ValueError(
                f"UserParameters.b_idx {self.b_idx.shape} and b_val {self.b_val.shape} differ"
            )
        object.__setattr__(self, "user_bias", float(self.user_bias))

    @property
    def n_ratings(self) -> int:
        return len(self.rated_item_ids)

    def theta(self, U: FloatArray) -> FloatArray:
        """θ_u = U·w_u + b_u, shape (d,)."""
        th = np.asarray(U @ self.w, dtype=np.float64)
        th[self.b_idx] += self.b_val
        return th


def load_model(model_dir: str | os.PathLike[str]) -> OfflineModel:
    """Load a model directory (written by ``lrs-rec train``) for offline use by external ids.

    All of :func:`lrs_rec.model_dir.load_model_dir`'s checks apply (format version, array digest,
    shapes); ``model.onnx`` is not needed."""
    return OfflineModel(load_model_dir(model_dir))


def _read_only(a: np.ndarray) -> np.ndarray:
    view = a.view()
    view.setflags(write=False)
    return view


@dataclass(frozen=True, eq=False)
class OfflineModel:
    """A trained model by external ids: ``predict``, ``recommend``, ``fold_in`` (see the module)."""

    model: TrainedModel
    _user_index: dict[str, int] = field(init=False, repr=False)
    _item_index: dict[str, int] = field(init=False, repr=False)
    _item_names: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        m = self.model
        frozen: dict[str, Any] = {
            name: _read_only(np.asarray(getattr(m, name)))
            for name in (
                "item_features",
                "item_bias",
                "user_bias",
                "w_prior_mean",
                "w_prior_cov",
                "history_indptr",
                "history_items",
                "history_ratings",
            )
        }
        if m.history_timestamps is not None:
            frozen["history_timestamps"] = _read_only(np.asarray(m.history_timestamps))
        object.__setattr__(self, "model", replace(m, **frozen))
        object.__setattr__(self, "_user_index", m.user_index())
        object.__setattr__(self, "_item_index", m.item_index())
        names = np.asarray(m.item_ids, dtype=object)
        names.setflags(write=False)
        object.__setattr__(self, "_item_names", names)

    # -- what the model is --------------------------------------------------------------------------
    @property
    def user_ids(self) -> tuple[str, ...]:
        return self.model.user_ids

    @property
    def item_ids(self) -> tuple[str, ...]:
        return self.model.item_ids

    @property
    def n_users(self) -> int:
        return self.model.n_users

    @property
    def n_items(self) -> int:
        return self.model.n_items

    @property
    def model_version(self) -> str:
        return self.model.model_version

    @property
    def rating_scale(self) -> tuple[float, float]:
        return self.model.rating_min, self.model.rating_max

    def __repr__(self) -> str:
        m = self.model
        return (
            f"OfflineModel(version={m.model_version!r}, users={m.n_users}, items={m.n_items}, "
            f"d={m.lrs.d}, rank={m.lrs.rank}, sparsity={m.lrs.sparsity})"
        )

    # -- ids -> dense indices (-1: unknown) --------------------------------------------------------
    def user_indices(self, user_ids: Iterable[Any]) -> IntArray:
        """Dense user index of each id, -1 for an id the model does not know."""
        return _indices(self._user_index, user_ids)

    def item_indices(self, item_ids: Iterable[Any]) -> IntArray:
        """Dense item index of each id, -1 for an id the model does not know."""
        return _indices(self._item_index, item_ids)

    # -- prediction ---------------------------------------------------------------------------------
    def predict(self, user_ids: Any, item_ids: Any) -> FloatArray:
        """Predicted ratings, one per (user, item) pair, as a float64 array.

        ``user_ids`` and ``item_ids`` are sequences (lists, tuples, numpy arrays) of equal length;
        a single id on either side (or a :class:`UserParameters` from :meth:`fold_in` for the user)
        is used for every element of the other."""
        users_scalar, items_scalar = _is_scalar(user_ids), _is_scalar(item_ids)
        if isinstance(user_ids, UserParameters):
            items_ = [item_ids] if items_scalar else _as_seq(item_ids)
            return self._predict_params(user_ids, self.item_indices(items_))
        if isinstance(user_ids, list | tuple) and any(
            isinstance(u, UserParameters) for u in user_ids
        ):
            raise TypeError(
                "predict: a folded-in user (UserParameters) goes alone as user_ids, not inside a "
                "sequence; call predict once per folded-in user"
            )
        items = self.item_indices([item_ids] if items_scalar else _as_seq(item_ids))
        users = self.user_indices([user_ids] if users_scalar else _as_seq(user_ids))
        if users_scalar and not items_scalar:
            users = np.full(items.size, users[0], dtype=np.int64)
        elif items_scalar and not users_scalar:
            items = np.full(users.size, items[0], dtype=np.int64)
        if users.shape != items.shape:
            raise ValueError(
                f"predict: {users.size} user ids but {items.size} item ids (pairs need equal "
                "lengths, or one id on either side)"
            )
        m = self.model
        population = m.population_theta()
        out = np.empty(items.size, dtype=np.float64)
        for lo in range(0, items.size, PREDICT_BLOCK):
            u, it = users[lo : lo + PREDICT_BLOCK], items[lo : lo + PREDICT_BLOCK]
            known_u, known_i = u >= 0, it >= 0
            theta = np.empty((u.size, m.lrs.d))
            theta[known_u] = _theta_rows(m, u[known_u])
            theta[~known_u] = population
            feats = np.zeros((it.size, m.lrs.d))
            feats[known_i] = m.item_features[it[known_i]]
            pred = m.global_mean + np.einsum("nd,nd->n", feats, theta)
            pred[known_u] += m.user_bias[u[known_u]]
            pred[known_i] += m.item_bias[it[known_i]]
            out[lo : lo + u.size] = np.clip(pred, m.rating_min, m.rating_max)
        return out

    def _predict_params(self, user: UserParameters, items: IntArray) -> FloatArray:
        m = self.model
        self._check_params(user)
        theta = user.theta(m.lrs.U)
        out = np.empty(items.size, dtype=np.float64)
        for lo in range(0, items.size, PREDICT_BLOCK):
            it = items[lo : lo + PREDICT_BLOCK]
            known = it >= 0
            pred = np.full(it.size, m.global_mean)
            pred[known] += np.einsum("nd,d->n", m.item_features[it[known]], theta)
            pred += user.user_bias
            pred[known] += m.item_bias[it[known]]
            out[lo : lo + it.size] = np.clip(pred, m.rating_min, m.rating_max)
        return out

    def _check_params(self, user: UserParameters) -> None:
        lrs = self.model.lrs
        if user.w.shape != (lrs.rank,) or user.b_idx.shape != (lrs.sparsity,):
            raise ValueError(
                f"user parameters of rank {user.w.size} / sparsity {user.b_idx.size} do not fit "
                f"this model (rank {lrs.rank}, sparsity {lrs.sparsity})"
            )
        if user.b_idx.size and (user.b_idx.min() < 0 or user.b_idx.max() >= lrs.d):
            raise ValueError(f"user parameters: b_idx must lie in [0, {lrs.d})")

    # -- recommendation -----------------------------------------------------------------------------
    def recommend(
        self, user: Any, n: int = 10, exclude_rated: bool = True
    ) -> list[tuple[str, float]]:
        """The top-``n`` items for ``user`` (an id or a :class:`UserParameters`) as
        ``(item_id, score)`` pairs, best first; shorter when fewer items are eligible."""
        return self.recommend_batch([user], n=n, exclude_rated=exclude_rated)[0]

    def recommend_batch(
        self, users: Sequence[Any], n: int = 10, exclude_rated: bool = True
    ) -> list[list[tuple[str, float]]]:
        """:meth:`recommend` for several users (scored in blocks of :data:`SCORE_BLOCK_CELLS`)."""
        if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 1:
            raise ValueError(f"n must be an integer >= 1, got {n!r}")
        if _is_scalar(users) or isinstance(users, UserParameters):
            raise ValueError("recommend_batch: users must be a sequence of ids, not one id")
        users = list(users)
        m = self.model
        block = max(1, SCORE_BLOCK_CELLS // max(m.n_items, 1))
        out: list[list[tuple[str, float]]] = []
        for lo in range(0, len(users), block):
            chunk = users[lo : lo + block]
            scores = self.raw_scores(chunk)
            for row, user in zip(scores, chunk, strict=True):
                if exclude_rated:
                    row[self._rated(user)] = -np.inf
                top = top_n(row, int(n))
                clipped = np.clip(row[top], m.rating_min, m.rating_max)
                out.append(list(zip(self._item_names[top].tolist(), clipped.tolist(), strict=True)))
        return out

    def raw_scores(self, users: Sequence[Any]) -> FloatArray:
        """Unclipped scores of every item, shape (len(users), n_items): what rankings use."""
        m = self.model
        params = {b: u for b, u in enumerate(users) if isinstance(u, UserParameters)}
        idx = np.full(len(users), -1, dtype=np.int64)
        id_rows = [b for b in range(len(users)) if b not in params]
        idx[id_rows] = self.user_indices([users[b] for b in id_rows])
        known = idx >= 0
        theta = np.empty((len(users), m.lrs.d))
        theta[:] = m.population_theta()
        theta[known] = _theta_rows(m, idx[known])
        bias = np.zeros(len(users))
        bias[known] = m.user_bias[idx[known]]
        for b, u in params.items():
            self._check_params(u)
            theta[b], bias[b] = u.theta(m.lrs.U), u.user_bias
        # the order of TrainedModel.predict: μ + ⟨f_i, θ⟩, then c_u, then c_i
        scores = m.global_mean + np.einsum("bd,nd->bn", theta, m.item_features)
        scores += bias[:, None]
        scores += m.item_bias[None, :]
        return np.asarray(scores, dtype=np.float64)

    def _rated(self, user: Any) -> IntArray:
        if isinstance(user, UserParameters):
            items = self.item_indices(user.rated_item_ids)
            return items[items >= 0]
        j = int(self.user_indices([user])[0])
        if j < 0:
            return np.zeros(0, dtype=np.int64)
        return self.model.user_history(j)[0]

    # -- onboarding -----------------------------------------------------------------------------------
    @cached_property
    def onboarder(self) -> ScheduledOnboarder:
        """The service's onboarder for this model (its prior is estimated on first use)."""
        return build_onboarder(self.model)

    def fold_in(self, ratings: Any, *, user_id: Any = None) -> UserParameters:
        """Fit a user from ``ratings`` with the model frozen: the service's onboarding, offline.

        ``ratings``: ``(item_id, rating)`` or ``(item_id, rating, timestamp)`` tuples, dicts with
        keys ``item_id``, ``rating`` [, ``timestamp``], or a mapping ``{item_id: rating}``. With the
        ``user_id`` of a trained user the ratings are added to their training history (oldest
        first; a re-rated item replaced) and the user is refitted from all of it, as the service
        does on that user's first onboarding; otherwise the user is fitted from ``ratings`` alone.
        Bad ratings (off the scale, not finite, malformed) raise ValueError naming the entry."""
        m = self.model
        entries = _parse_ratings(ratings, m.rating_min, m.rating_max)
        known = [(i, r) for i, r in entries if i in self._item_index]
        ignored = tuple(dict.fromkeys(i for i, _ in entries if i not in self._item_index))
        new_items = np.array([self._item_index[i] for i, _ in known], dtype=np.int64)
        new_ratings = np.array([r for _, r in known], dtype=np.float64)
        j = None if user_id is None else self._user_index.get(_key(user_id))
        if j is not None:
            old_items, old_ratings = m.user_history_by_time(j)
            keep = ~np.isin(old_items, new_items)
            new_items = np.concatenate([old_items[keep], new_items]).astype(np.int64)
            new_ratings = np.concatenate([old_ratings[keep], new_ratings]).astype(np.float64)
        rated = tuple(m.item_ids[i] for i in new_items.tolist())
        if new_items.size == 0:
            k = m.lrs.sparsity
            return UserParameters(
                w=m.w_prior_mean,
                user_bias=0.0,
                b_idx=np.arange(k),
                b_val=np.zeros(k),
                ignored_item_ids=ignored,
                personalized=False,
            )
        fit = self.onboarder.fit(new_items, new_ratings)
        return UserParameters(
            w=fit.w,
            user_bias=fit.user_bias,
            b_idx=fit.b_idx,
            b_val=fit.b_val,
            rated_item_ids=rated,
            ratings=tuple(new_ratings.tolist()),
            ignored_item_ids=ignored,
            n_open=fit.n_open,
        )


# -- helpers ------------------------------------------------------------------------------------------
def _theta_rows(model: TrainedModel, users: IntArray) -> FloatArray:
    """θ_u = U·w_u + b_u for the given user indices, each row computed on its own (numpy's einsum
    loops, not BLAS, whose blocking makes a row's rounding depend on the batch it is in): the same
    pair gives the same bits in any block, so streamed output does not depend on the chunk size."""
    lrs = model.lrs
    out = np.einsum("nr,dr->nd", lrs.W[users], lrs.U)
    b_idx = lrs.B_idx[users]
    np.put_along_axis(out, b_idx, np.take_along_axis(out, b_idx, axis=1) + lrs.B_val[users], axis=1)
    return np.asarray(out, dtype=np.float64)


def top_n(scores: FloatArray, n: int) -> IntArray:
    """Indices of the ``n`` largest finite-or-+inf scores (``-inf`` = ineligible), best first, ties
    to the lower index: a stable descending sort's first n, without sorting every item."""
    size = scores.size
    n = min(n, size)
    if n <= 0:
        return np.zeros(0, dtype=np.int64)
    if n < size:
        cut = np.partition(scores, size - n)[size - n]  # the n-th largest score
        cand = np.flatnonzero(scores >= cut)
    else:
        cand = np.arange(size)
    order = np.lexsort((cand, -scores[cand]))[:n]
    top = cand[order]
    return np.asarray(top[scores[top] > -np.inf], dtype=np.int64)


def _key(v: Any) -> str:
    """An id as the text it is matched by (integers and integral floats as their digits)."""
    if isinstance(v, str):
        return v
    if isinstance(v, bool | np.bool_):
        return str(bool(v))
    if isinstance(v, int | np.integer):
        return str(int(v))
    if isinstance(v, float | np.floating):
        f = float(v)
        if math.isnan(f):
            return ""
        return str(int(f)) if f.is_integer() else repr(f)
    if isinstance(v, bytes):
        return v.decode("utf-8", errors="replace")
    return "" if v is None else str(v)


def _is_scalar(v: Any) -> bool:
    return isinstance(v, str | bytes | int | float | np.generic) or v is None


def _as_seq(values: Any) -> Any:
    if isinstance(values, np.ndarray):
        return values.reshape(-1)
    if isinstance(values, list | tuple):
        return values
    if hasattr(values, "tolist"):  # pandas / pyarrow arrays
        return values.tolist()
    return list(values)


def _indices(index: dict[str, int], values: Iterable[Any]) -> IntArray:
    values = _as_seq(values)
    if isinstance(values, np.ndarray):
        if values.dtype.kind in "iu":
            keys: list[str] = values.astype(str).tolist()
        elif values.dtype.kind == "U":
            keys = values.tolist()
        else:
            keys = [_key(v) for v in values.tolist()]
    else:
        keys = [v if type(v) is str else _key(v) for v in values]
    return np.fromiter((index.get(k, -1) for k in keys), dtype=np.int64, count=len(keys))


def _parse_ratings(ratings: Any, rating_min: float, rating_max: float) -> list[tuple[str, float]]:
    """(item id, rating) in time order, one per item (its latest rating): the service's rules."""
    if isinstance(ratings, Mapping):
        ratings = list(ratings.items())
    if isinstance(ratings, str | bytes) or not isinstance(ratings, Iterable):
        raise ValueError(
            "ratings must be a list of (item_id, rating[, timestamp]) entries or a mapping "
            f"{{item_id: rating}}, got {type(ratings).__name__}"
        )
    rows: list[tuple[str, float, float | None, int]] = []
    for pos, entry in enumerate(ratings):
        where = f"ratings[{pos}]"
        if isinstance(entry, Mapping):
            extra = set(entry) - {"item_id", "rating", "timestamp"}
            if extra or "item_id" not in entry or "rating" not in entry:
                raise ValueError(
                    f"{where} must have keys item_id, rating[, timestamp]; got {sorted(entry)}"
                )
            parts = (entry["item_id"], entry["rating"], entry.get("timestamp"))
        elif isinstance(entry, tuple | list) and len(entry) in (2, 3):
            parts = (entry[0], entry[1], entry[2] if len(entry) == 3 else None)
        else:
            raise ValueError(
                f"{where} must be (item_id, rating) or (item_id, rating, timestamp), got {entry!r}"
            )
        item_id = _key(parts[0])
        if not item_id:
            raise ValueError(f"{where}.item_id must be a non-empty id, got {parts[0]!r}")
        rating = _number(f"{where}.rating", parts[1])
        if not rating_min <= rating <= rating_max:
            raise ValueError(
                f"{where}.rating {rating!r} is outside the rating scale "
                f"[{rating_min:g}, {rating_max:g}]"
            )
        ts = None if parts[2] is None else _number(f"{where}.timestamp", parts[2])
        rows.append((item_id, rating, ts, pos))
    if rows and all(r[2] is not None for r in rows):
        rows.sort(key=lambda r: (r[2], r[3]))
    latest: dict[str, float] = {}
    for item_id, rating, _, _ in rows:
        latest.pop(item_id, None)  # re-insert: dict order = time order of the latest rating
        latest[item_id] = rating
    return list(latest.items())


def _number(where: str, x: Any) -> float:
    if isinstance(x, bool | np.bool_) or not isinstance(x, int | float | np.integer | np.floating):
        raise ValueError(f"{where} must be a number, got {x!r}")
    try:
        v = float(x)
    except OverflowError:
        raise ValueError(f"{where} must be a finite number, got {x!r}") from None
    if not math.isfinite(v):
        raise ValueError(f"{where} must be a finite number, got {v!r}")
    return v
