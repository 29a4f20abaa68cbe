"""Onboarding in the serving layer: validate a user's ratings, merge them into the stored history,
refit (c_u, w_u, b_u) with U frozen (:mod:`lrs_rec.onboarding`), store record + history durably.

``Recommender.onboard(user_id, ratings)`` and ``PUT /v1/users/{user_id}/ratings`` both end here.

Semantics
* ``ratings``: ``(item_id, rating)`` or ``(item_id, rating, timestamp)`` tuples (external item ids).
  Within one request a repeated item keeps its latest rating (by timestamp when given, else the last
  one in the list). A re-rated item replaces its earlier rating in the history.
* Known users (trained or onboarded before): the new ratings are appended to their stored history,
  which is capped to the most recent ``history_cap`` ratings of the served version (``lrs-rec publish
  --history-cap``), and the user is refitted from that FULL history — never from the new ratings alone.
* Durability: record and history are written in one MULTI/EXEC transaction, optimistic (WATCH on the
  user's keys and the current-version pointer, retried on a concurrent write, so two simultaneous
  requests for one user never lose a rating; on Redis Cluster, which has no cross-slot WATCH, only
  requests within one process are serialised). The call returns only after EXEC; the embedded server runs ``appendonly yes`` +
  ``appendfsync always``, so an acknowledged onboarding survives a crash. On an external Redis
  configure the same (or pass ``wait_replicas`` to wait for replicas with WAIT). The very next score or
  recommend reads the new record (no cache in between).
* Publishing a new model version refits every onboarded user from their stored history with the new
  model (:func:`refit_for_publish`, the store's carry-over hook), so nobody loses personalisation.
* Unknown items (not in the served model's vocabulary, e.g. added to the catalogue since the last
  training run) are accepted: their ratings are kept in the user's stored history by external item id
  (history record format 2, :mod:`serving.encoding`), carried over by publish (and fitted once a
  published model knows the item), never used by the fit, and reported as ``ignored_item_ids``.
  With ``unknown_items="error"`` (``lrs-rec serve --unknown-items error``) they are refused as before.
* A user erased before (``DELETE /v1/users/{id}``, :mod:`serving.erasure`) is onboarded as a new
  user: from an empty history, never from the training history of the model directory.
* Bad input (ratings off the scale, NaN, empty or oversized lists, bad ids) raises
  :class:`OnboardingInputError` before anything is written.
"""

from __future__ import annotations

import math
import threading
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from lrs_rec.serving.encoding import (
    decode_history,
    decode_history_trained,
    decode_history_unknown,
    encode_history,
    encode_records,
)
from lrs_rec.serving.history import merge_trained, merge_unknown
from lrs_rec.serving.recommender import (
    NotReadyError,
    ServingError,
    StoreUnavailableError,
    UnknownItemsError,
)
from lrs_rec.serving.store import ConcurrentWriteError, VersionMovedError

from lrs_rec.ids import id_problem
from lrs_rec.model_dir import SharedModel, TrainedModel, onboarding_schedule
from lrs_rec.model_onboarding import build_onboarder, shared_onboarder
from lrs_rec.model_onboarding import onboarder_from_model as onboarder_from_model  # re-export
from lrs_rec.onboarding import OnboardingConfig, ScheduledOnboarder

if TYPE_CHECKING:
    from lrs_rec.serving.recommender import Recommender

DEFAULT_MAX_RATINGS = 1000  # per request


class OnboardingInputError(ServingError, ValueError):
    """The ratings or the user id of an onboarding request are invalid (a client error)."""


@dataclass(frozen=True)
class OnboardResult:
    user_id: str
    n_ratings: int  # ratings in the history the user was fitted from
    personalized: bool
    model_version: str
    n_new: int = 0  # ratings of this request (after de-duplication)
    store_version: str = ""
    # items of this request outside the served vocabulary: stored in the history, not fitted
    ignored_item_ids: list[str] = field(default_factory=list)


# -- the per-model Onboarder (prior estimation + precomputation happen once per model) ---------------
# per loaded model object (weak: a model that is no longer served drops its onboarder), per schedule
_CACHE: weakref.WeakKeyDictionary[TrainedModel | SharedModel, dict[str, ScheduledOnboarder]] = (
    weakref.WeakKeyDictionary()
)
_CACHE_LOCK = threading.Lock()
_BUILD_LOCKS: weakref.WeakKeyDictionary[TrainedModel | SharedModel, dict[str, threading.Lock]] = (
    weakref.WeakKeyDictionary()
)
BUILDS = 0  # onboarders built in this process (the tests count them)


def schedule_for(model: TrainedModel | SharedModel) -> list[tuple[int, OnboardingConfig]]:
    """The onboarding hyperparameters of ``model`` (``training.model_dir.onboarding_schedule``)."""
    return onboarding_schedule(model.manifest)


def onboarder_for(
    model: TrainedModel | SharedModel, schedule: list[tuple[int, OnboardingConfig]] | None = None
) -> ScheduledOnboarder:
    """The (cached) onboarder of ``model``: its stored prior (estimated once from the model arrays
    when the directory predates the stored prior)."""
    # the model's own schedule (the per-request case) is parsed on a cache miss only
    key = "manifest" if schedule is None else repr(schedule)
    with _CACHE_LOCK:
        hit = _CACHE.get(model, {}).get(key)
        if hit is not None:
            return hit
        build_lock = _BUILD_LOCKS.setdefault(model, {}).setdefault(key, threading.Lock())
    # single flight: concurrent first requests wait for one build (its memory peak once, not once
    # per request) instead of each estimating the prior
    with build_lock:
        with _CACHE_LOCK:
            hit = _CACHE.get(model, {}).get(key)
            if hit is not None:
                return hit
        return _build_onboarder(model, key, schedule)


def _build_onboarder(
    model: TrainedModel | SharedModel, key: str, schedule: list[tuple[int, OnboardingConfig]] | None
) -> ScheduledOnboarder:
    global BUILDS
    BUILDS += 1
    if isinstance(model, SharedModel):
        onb = shared_onboarder(model, schedule)
    else:
        onb = build_onboarder(model, schedule)
    with _CACHE_LOCK:
        _CACHE.setdefault(model, {})[key] = onb
    return onb


def refit_for_publish(
    model: TrainedModel, user_id: str, items: np.ndarray, ratings: np.ndarray
) -> tuple[float, np.ndarray, np.ndarray, np.ndarray]:
    """The store's carry-over hook: refit one onboarded user with the NEW model from their full
    stored history (item indices of the new model). An empty history gives the population model."""
    return _fit_or_population(onboarder_for(model), model, items, ratings)


def _fit_or_population(
    onb: ScheduledOnboarder,
    model: TrainedModel | SharedModel,
    items: np.ndarray,
    ratings: np.ndarray,
) -> tuple[float, np.ndarray, np.ndarray, np.ndarray]:
    """``(c_u, w_u, b_idx, b_val)`` fitted from ``items``/``ratings``; the population model
    (c_u = 0, w̄, b = 0) when there is no rating of a known item to fit."""
    items = np.asarray(items, dtype=np.int64)
    if items.size == 0:
        k = model.sparsity if isinstance(model, SharedModel) else model.lrs.sparsity
        return 0.0, np.asarray(model.w_prior_mean, dtype=np.float64), np.arange(k), np.zeros(k)
    user = onb.fit(items, np.asarray(ratings, dtype=np.float64))
    return user.user_bias, user.w, user.b_idx, user.b_val


# -- validation ---------------------------------------------------------------------------------------
def validate_user_id(user_id: Any) -> str:
    if not isinstance(user_id, str):
        raise OnboardingInputError(f"user_id must be a string, got {type(user_id).__name__}")
    if not user_id:
        raise OnboardingInputError("user_id must not be empty")
    _check_id("user_id", user_id)
    return user_id


def _check_id(where: str, s: str) -> None:
    problem = id_problem(s)  # the loaders' rule: no trained id breaks it
    if problem is not None:
        raise OnboardingInputError(f"{where} {problem}")


def parse_ratings(
    ratings: Any,
    *,
    item_index: dict[str, int],
    rating_min: float,
    rating_max: float,
    max_ratings: int = DEFAULT_MAX_RATINGS,
) -> tuple[np.ndarray, np.ndarray]:
    """Validated, de-duplicated (item index, rating) arrays of one request, in time order;
    :class:`UnknownItemsError` for items outside ``item_index`` (the strict rule)."""
    items, values, unknown = parse_ratings_split(
        ratings,
        item_index=item_index,
        rating_min=rating_min,
        rating_max=rating_max,
        max_ratings=max_ratings,
    )
    if unknown:
        raise UnknownItemsError([i for i, _ in unknown])
    return items, values


def parse_ratings_split(
    ratings: Any,
    *,
    item_index: dict[str, int],
    rating_min: float,
    rating_max: float,
    max_ratings: int = DEFAULT_MAX_RATINGS,
) -> tuple[np.ndarray, np.ndarray, list[tuple[str, float]]]:
    """:func:`parse_ratings` that keeps items outside ``item_index`` apart instead of refusing
    them: ``(item indices, ratings, [(unknown item id, rating)])``, each in time order."""
    if isinstance(ratings, str | bytes) or not isinstance(ratings, Sequence):
        raise OnboardingInputError(
            "ratings must be a list of (item_id, rating[, timestamp]) entries, got "
            f"{type(ratings).__name__}"
        )
    if len(ratings) == 0:
        raise OnboardingInputError("ratings must not be empty")
    if len(ratings) > max_ratings:
        raise OnboardingInputError(
            f"too many ratings in one request: {len(ratings)} (at most {max_ratings})"
        )
    rows: list[tuple[str, float, float | None, int]] = []
    for pos, entry in enumerate(ratings):
        where = f"ratings[{pos}]"
        if isinstance(entry, dict):
            extra = set(entry) - {"item_id", "rating", "timestamp"}
            if extra or "item_id" not in entry or "rating" not in entry:
                raise OnboardingInputError(
                    f"{where} must have keys item_id, rating[, timestamp]; got {sorted(entry)}"
                )
            parts: tuple[Any, ...] = (entry["item_id"], entry["rating"], entry.get("timestamp"))
        elif isinstance(entry, tuple | list) and len(entry) in (2, 3):
            parts = (*tuple(entry), None) if len(entry) == 2 else tuple(entry)
        else:
            raise OnboardingInputError(
                f"{where} must be (item_id, rating) or (item_id, rating, timestamp), got {entry!r}"
            )
        item_id, rating, ts = parts
        if isinstance(item_id, int) and not isinstance(item_id, bool):
            item_id = str(item_id)
        if not isinstance(item_id, str) or not item_id:
            raise OnboardingInputError(
                f"{where}.item_id must be a non-empty string, got {item_id!r}"
            )
        _check_id(f"{where}.item_id", item_id)
        rating_f = _number(f"{where}.rating", rating)
        if not rating_min <= rating_f <= rating_max:
            raise OnboardingInputError(
                f"{where}.rating {rating_f!r} is outside the rating scale "
                f"[{rating_min:g}, {rating_max:g}]"
            )
        ts_f = None if ts is None else _number(f"{where}.timestamp", ts)
        rows.append((item_id, rating_f, ts_f, pos))
    # time order: by timestamp when every entry has one (ties: list position), else list position
    # (an entry without a timestamp cannot be placed among timed ones); the latest rating of an
    # item wins
    if all(r[2] is not None for r in rows):
        rows.sort(key=lambda r: (r[2], r[3]))
    latest: dict[str, float] = {}
    for item_id, rating_f, _, _ in rows:
        latest.pop(item_id, None)  # re-insert: dict order = time order of the latest rating
        latest[item_id] = rating_f
    known = [(item_index[i], r) for i, r in latest.items() if i in item_index]
    unknown = [(i, r) for i, r in latest.items() if i not in item_index]
    items = np.fromiter((i for i, _ in known), dtype=np.int64, count=len(known))
    values = np.fromiter((r for _, r in known), dtype=np.float64, count=len(known))
    return items, values, unknown


def _number(where: str, x: Any) -> float:
    if isinstance(x, bool) or not isinstance(x, int | float | np.integer | np.floating):
        raise OnboardingInputError(f"{where} must be a number, got {x!r}")
    try:
        v = float(x)
    except OverflowError:  # an integer beyond float range (JSON allows any number of digits)
        raise OnboardingInputError(
            f"{where} must be a finite number, got an integer of {int(x).bit_length()} bits"
        ) from None
    if not math.isfinite(v):
        raise OnboardingInputError(f"{where} must be a finite number, got {v!r}")
    return v


# -- the operation -----------------------------------------------------------------------------------
def onboard(
    rec: Recommender,
    user_id: Any,
    ratings: Any,
    *,
    max_ratings: int = DEFAULT_MAX_RATINGS,
    wait_replicas: int = 0,
    wait_timeout_ms: int = 1000,
) -> OnboardResult:
    """Fit ``user_id`` from their full history plus ``ratings`` and store them durably."""
    user_id = validate_user_id(user_id)
    for _ in range(_MOVED_RETRIES):
        try:
            return _onboard_once(
                rec,
                user_id,
                ratings,
                max_ratings=max_ratings,
                wait_replicas=wait_replicas,
                wait_timeout_ms=wait_timeout_ms,
            )
        except VersionMovedError as e:
            # the write checks the current version inside its transaction; it was not the one
            # this server served (a switch it has not picked up yet, or one made while we fitted):
            # nothing was written. Reload and start again against the current version
            meta, _ = rec._current(force=True)
            if meta.version != e.current:
                # this server is pinned to an older version (the current one's model is not in its
                # model directory): publish carries over onboarded users of the CURRENT version
                # only, so a rating acknowledged here would be lost at the next publish — refuse it
                raise NotReadyError(
                    f"onboarding refused: this server serves store version {meta.version} but "
                    f"{e.current} is current; update the model directory to serve {e.current}"
                ) from e
    raise StoreUnavailableError(
        f"could not store the onboarding of {user_id!r}: the served store version kept changing"
    )


_MOVED_RETRIES = 3


def _onboard_once(
    rec: Recommender,
    user_id: str,
    ratings: Any,
    *,
    max_ratings: int,
    wait_replicas: int,
    wait_timeout_ms: int,
) -> OnboardResult:
    import redis

    meta, loaded = rec._current()  # one consistent (served version, model) snapshot
    model = loaded.model
    new_items, new_ratings, new_unknown = parse_ratings_split(
        ratings,
        item_index=loaded.item_index,
        rating_min=model.rating_min,
        rating_max=model.rating_max,
        max_ratings=max_ratings,
    )
    if new_unknown and getattr(rec, "unknown_items", "fallback") == "error":
        raise UnknownItemsError([i for i, _ in new_unknown])
    onb = onboarder_for(model)
    index = loaded.user_index.get(user_id)
    store = rec.store
    fmt = meta.record_format
    cap = meta.history_cap

    def compute(hist: bytes | None, _is_live: Any) -> tuple[bytes, bytes, int]:
        old_unknown: list[tuple[str, float]] = []
        if hist is not None:
            old_items, old_ratings = decode_history(hist)
            old_unknown = decode_history_unknown(hist)
            old_trained = decode_history_trained(hist)
        elif index is not None and cap and not meta.with_history:
            # published without histories: the training history from the model directory (the one
            # case where the server reads per-user arrays: the whole directory, on first need)
            old_items, old_ratings = model.user_history_by_time(index)
            old_items, old_ratings = old_items[-cap:], old_ratings[-cap:]
            old_trained = int(old_items.size)
        else:
            old_items, old_ratings = np.zeros(0, np.int64), np.zeros(0)
            old_trained = 0
        # the request's ratings come after the (training) ones kept: provenance stays a prefix
        items, values, n_trained = merge_trained(
            old_items, old_ratings, old_trained, new_items, new_ratings, 0, cap
        )
        # ratings of items outside the vocabulary: stored (by external id) for the next training
        # run and carried over by publish, never used by the fit
        unknown = merge_unknown(old_unknown, new_unknown, cap)
        bias, w, b_idx, b_val = _fit_or_population(onb, model, items, values)
        record = encode_records(fmt, [bias], [w], [b_idx], [b_val])[0]
        stored = (items, values) if cap else (items[:0], values[:0])
        history = encode_history(
            *stored, n_items=model.n_items, unknown=unknown, n_trained=n_trained if cap else 0
        )
        return record, history, int(items.size)

    try:
        # check_erased: an erased trained user starts from an empty history, not the training one
        n = store.update_user(
            meta, user_id, index, compute, require_current=True, check_erased=True
        )
        if wait_replicas > 0:
            acked = int(store.r.wait(wait_replicas, wait_timeout_ms))
            if acked < wait_replicas:
                raise StoreUnavailableError(
                    f"only {acked} of {wait_replicas} replicas acknowledged the onboarding of "
                    f"{user_id!r} within {wait_timeout_ms} ms (it is stored on the primary)"
                )
    except ConcurrentWriteError as e:
        raise StoreUnavailableError(f"could not store the onboarding: {e}") from e
    except (redis.RedisError, OSError) as e:
        raise rec._unavailable(e) from e
    return OnboardResult(
        user_id=user_id,
        n_ratings=n,
        personalized=n > 0,
        model_version=model.model_version,
        n_new=int(new_items.size),
        store_version=meta.version,
        ignored_item_ids=[i for i, _ in new_unknown],
    )
