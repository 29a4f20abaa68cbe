"""Erasure of and access to one user's stored data (``DELETE /v1/users/{id}``,
``GET /v1/users/{id}/ratings``).

Erasure removes the user's parameter record, rating history and onboarded marker from EVERY
stored version, and writes a deletion marker ``lrs:erased`` (user id -> erasure time in ns, outside
the versioned namespaces, :mod:`serving.keys`). The marker is what keeps the user erased:

* ``publish`` never writes the row of a marked user from a model directory (a model trained
  before the erasure still holds their training ratings), and removes the rows of users marked
  while it wrote; its carry-over skips a user marked after their data was read
  (``RedisStore.publish`` / ``update_user``). So an erased trained user is served like an unknown
  one (population model), whatever model directory is published or served.
* A later onboarding (``PUT /v1/users/{id}/ratings``) of the same id is a NEW user: their history
  starts empty (never from the training history of the model directory) and publishes carry it
  over like any onboarded user. The marker stays (it is not removed by the re-onboarding): a
  publish of a model trained before the erasure must still not bring the old training rows back.
* Durable like onboarding: on a single server, the marker and every removal are one MULTI/EXEC
  (``appendfsync always`` on the embedded server: the reply means the AOF is fsync'ed). The data
  leaves the files on disk at the next AOF rewrite (``BGREWRITEAOF``) and RDB save.
* A trained user's slot in a version is found through that version's user vocabulary: the served
  model's, or the user ids (``users.json`` / the shards) of the version's model directory when it still holds that model.
  Versions whose vocabulary is not available (e.g. the directory was retrained in place) are
  reported as ``unscrubbed_versions``: the user's onboarded data is removed there, a trained row
  may remain until the version is deleted (``lrs-rec publish --prune`` / ``--delete-version``).

On Redis Cluster (no multi-slot transactions) the marker is written first, then each version's
removals, the current version last; a retried DELETE finishes an interrupted one.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lrs_rec.serving.encoding import decode_history, decode_history_unknown
from lrs_rec.serving.history import history_ratings
from lrs_rec.serving.onboarding import validate_user_id
from lrs_rec.serving.recommender import ServingError
from lrs_rec.serving.store import RedisStore, VersionMeta

from lrs_rec.model_dir import load_user_index, read_manifest

if TYPE_CHECKING:
    from lrs_rec.serving.recommender import Recommender


class UnknownUserError(ServingError, LookupError):
    """Nothing is stored for this user in the served version (HTTP 404)."""


@dataclass(frozen=True)
class StoredRatings:
    user_id: str
    ratings: list[tuple[str, float]]  # (item id, rating), oldest first
    updated_at: float | None  # time of the last onboarding write (s since epoch), None if never
    store_version: str
    model_version: str


@dataclass(frozen=True)
class ErasureResult:
    user_id: str
    erased_at: float  # seconds since the epoch (the marker holds nanoseconds)
    store_versions: list[str]  # versions the user's data was removed from
    unscrubbed_versions: list[str]  # versions whose trained rows could not be located


# -- a version's user vocabulary -----------------------------------------------------------------------
_VOCAB: dict[tuple[str, str, str], Mapping[str, int]] = {}
_VOCAB_LOCK = threading.Lock()
_VOCAB_MAX = 4


def _vocabulary(rec: Recommender, loaded: Any, meta: VersionMeta) -> Mapping[str, int] | None:
    """User id -> dense index of ``meta``'s model, or None when it is not available."""
    if rec._matches(meta, loaded.model):
        served: Mapping[str, int] = loaded.user_index
        return served
    return vocabulary_from_dir(meta)


def vocabulary_from_dir(meta: VersionMeta) -> Mapping[str, int] | None:
    """User id -> index from the user ids of ``meta.model_dir`` if it still holds ``meta``'s
    model (same model version and shared-array digest), else None."""
    if not meta.model_dir:
        return None
    key = (meta.model_dir, meta.model_version, meta.arrays_sha256)
    with _VOCAB_LOCK:
        hit = _VOCAB.get(key)
    if hit is not None:
        return hit
    root = Path(meta.model_dir)
    try:
        manifest = read_manifest(root)
        if manifest.get("model_version") != meta.model_version or (
            meta.arrays_sha256 and manifest.get("arrays_sha256") != meta.arrays_sha256
        ):
            return None
        index = load_user_index(root, manifest)  # compact: (longest id + 4) bytes per user
    except (OSError, ValueError):
        return None
    with _VOCAB_LOCK:
        while len(_VOCAB) >= _VOCAB_MAX:
            _VOCAB.pop(next(iter(_VOCAB)))
        _VOCAB[key] = index
    return index


# -- access ---------------------------------------------------------------------------------------------
def _stored(rec: Recommender, user_id: str) -> tuple[VersionMeta, Any, bytes | None, bytes | None]:
    meta, loaded = rec._current()
    loc = rec.store.locate(meta, user_id, loaded.user_index.get(user_id))
    record, hist = rec.store.fetch([loc], with_history=True)[0]
    return meta, loaded, record, hist


def user_ratings(rec: Recommender, user_id: str) -> StoredRatings:
    """The stored rating history of ``user_id`` in the served version (404: nothing stored)."""
    user_id = validate_user_id(user_id)
    try:
        meta, loaded, record, hist = _stored(rec, user_id)
        if record is None and hist is None:
            raise UnknownUserError(f"no data is stored for user {user_id!r}")
        mark = rec.store.r.hget(rec.store.keys.onboarded(meta.version), user_id)
    except _redis_errors() as e:
        raise rec._unavailable(e) from e
    ratings: list[tuple[str, float]] = []
    if hist is not None:  # ratings of items the model does not know follow, by external id
        items, values = decode_history(hist)
        ratings = history_ratings(items, values, decode_history_unknown(hist), loaded.item_ids)
    updated = int(mark.split(b":", 1)[0]) / 1e9 if mark is not None else None
    return StoredRatings(user_id, ratings, updated, meta.version, loaded.model.model_version)


# -- erasure --------------------------------------------------------------------------------------------
def erase_user(rec: Recommender, user_id: str) -> ErasureResult:
    """Remove everything stored for ``user_id`` from every version and mark them erased (404:
    nothing stored in the served version — e.g. already erased)."""
    user_id = validate_user_id(user_id)
    store = rec.store
    try:
        meta, loaded, record, hist = _stored(rec, user_id)
        onboarded = store.r.hexists(store.keys.onboarded(meta.version), user_id)
        if record is None and hist is None and not onboarded:
            raise UnknownUserError(f"no data is stored for user {user_id!r}")
        versions = store.list_versions()
        # the served version last: a DELETE interrupted before it is retried (not a 404)
        versions.sort(key=lambda m: m.version == meta.version)
        plans = [(m, _vocabulary(rec, loaded, m)) for m in versions]
        now = time.time_ns()
        _remove(store, user_id, now, plans)
    except _redis_errors() as e:
        raise rec._unavailable(e) from e
    return ErasureResult(
        user_id=user_id,
        erased_at=now / 1e9,
        store_versions=[m.version for m, _ in plans],
        unscrubbed_versions=[m.version for m, vocab in plans if vocab is None],
    )


def _remove(
    store: RedisStore,
    user_id: str,
    now_ns: int,
    plans: list[tuple[VersionMeta, Mapping[str, int] | None]],
) -> None:
    """The marker, then the user's fields in each version: one transaction on a single server."""
    cluster = store.handle.is_cluster
    if cluster:
        store.r.hset(store.keys.erased, user_id, str(now_ns))
        pipe = None
    else:
        pipe = store.r.pipeline(transaction=True)
        pipe.hset(store.keys.erased, user_id, str(now_ns))
    for meta, vocab in plans:
        part = store.r.pipeline(transaction=False) if cluster else pipe
        assert part is not None
        part.hdel(store.keys.onboarded(meta.version), user_id)
        onb = store.locate(meta, user_id, None)
        part.hdel(onb.params_key, onb.field)
        part.hdel(onb.history_key, onb.field)
        index = vocab.get(user_id) if vocab is not None else None
        if index is not None:
            loc = store.locate(meta, user_id, index)
            part.hdel(loc.params_key, loc.field)
            part.hdel(loc.history_key, loc.field)
        if cluster:
            part.execute()
    if pipe is not None:
        pipe.execute()
    store.invalidation_barrier()  # serving.user_cache: every server has the invalidations now


def scrub_version(store: RedisStore, meta: VersionMeta, vocab: Mapping[str, int]) -> int:
    """Remove from ``meta`` the trained rows of erased users (``vocab``: its model's users) that
    were not onboarded there after their erasure; returns how many users were scrubbed. What a
    rollback (``lrs-rec publish --switch V``) runs first, for the versions an erasure could not
    locate the user in (``unscrubbed_versions``)."""
    marks = store.erased_marks()
    if not marks:
        return 0
    onboarded = store.onboarded_users(meta.version)
    users = []
    for user_id, mark in marks.items():
        if user_id not in vocab:
            continue
        since = onboarded.get(user_id)
        if since is not None and since[0] > int(mark):
            continue  # onboarded again after the erasure: their new data
        users.append(user_id)
    pipe = store.r.pipeline(transaction=False)
    for user_id in users:
        loc = store.locate(meta, user_id, vocab[user_id])
        pipe.hdel(loc.params_key, loc.field)
        pipe.hdel(loc.history_key, loc.field)
    if users:
        pipe.execute()
    return len(users)


def _redis_errors() -> tuple[type[BaseException], ...]:
    import redis

    return (redis.RedisError, OSError)
