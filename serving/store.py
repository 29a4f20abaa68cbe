"""Storage of per-user served parameters: versioned namespaces, atomic publish, batched fetch.

:class:`UserStore` is the interface the serving layer and onboarding use; :class:`RedisStore` is
the Redis implementation (key layout in :mod:`serving.keys`, record codec in
:mod:`serving.encoding`). A publish writes a whole new version namespace with pipelining and only then
moves the ``current`` pointer with one ``SET`` — readers never see a half-written version.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from functools import partial
from typing import Any, Protocol

import numpy as np
from lrs_rec.serving.connection import RedisHandle
from lrs_rec.serving.encoding import (
    HistoryEncoder,
    RecordError,
    RecordFormat,
    decode_history,
    decode_history_trained,
    decode_history_unknown,
    decode_record,
    encode_history,
    encode_records,
    pack_params,
)
from lrs_rec.serving.history import merge_trained, merge_unknown
from lrs_rec.serving.keys import KeyLayout, onboarded_slot, trained_slot

from lrs_rec.model_dir import SharedModel, TrainedModel
from lrs_rec.model_shards import UserShard

log = logging.getLogger(__name__)

DEFAULT_BUCKET_SIZE = 128
DEFAULT_ONB_BUCKETS = 1024
DEFAULT_HISTORY_CAP = 1000
_PIPELINE_KEYS = 256  # hashes written per pipeline round trip during publish
# history records up to this size keep a bucket's history hash listpack-encoded (issue 15: 20 ratings
# cost 196 B/user as a hashtable entry, ~135 B in a listpack); larger ones (long histories) leave
# that bucket's hash a hashtable, as before
HISTORY_LISTPACK_VALUE = 4096


_UNSET: Any = object()  # RedisStore.update_user(erased_mark=...) not given


class UnknownVersionError(LookupError, ValueError):
    """A store version (or its item vocabulary) that does not exist."""


class ConcurrentWriteError(RuntimeError):
    """A user's read-modify-write lost the race to other writers too many times in a row."""


class VersionMovedError(RuntimeError):
    """``update_user(..., require_current=True)``: the version written to is no longer current (a
    publish switched away from it), so a write there would not be carried over: nothing written.
    ``current``: the version that is current instead (None if none)."""

    def __init__(self, message: str, *, current: str | None) -> None:
        super().__init__(message)
        self.current = current


UserUpdate = Callable[[bytes | None, Callable[[], bool]], tuple[bytes | None, bytes, Any]]
"""``compute(stored history, is_live) -> (record or None, history, result)`` (:meth:`RedisStore.update_user`)."""


@dataclass(frozen=True)
class VersionMeta:
    """Metadata of one store version (``lrs:versions`` field -> this, as JSON)."""

    version: str
    model_version: str
    arrays_sha256: str
    model_dir: str
    n_users: int
    n_items: int
    d: int
    record_format: RecordFormat
    bucket_size: int
    n_buckets: int
    n_onb_buckets: int
    history_cap: int
    with_history: bool
    status: str  # "writing" -> "ready" (or "failed")
    created_at: float
    published_at: float | None = None
    n_carried_over: int = 0

    def to_json(self) -> str:
        d = asdict(self)
        d["record_format"] = self.record_format.to_json()
        return json.dumps(d, sort_keys=True)

    @classmethod
    def from_json(cls, raw: str | bytes) -> VersionMeta:
        d = json.loads(raw)
        d["record_format"] = RecordFormat.from_json(d["record_format"])
        return cls(**d)

    @property
    def seq(self) -> int:
        return _version_seq(self.version)


@dataclass(frozen=True)
class UserLocation:
    """Where one user's record and history live in a version."""

    params_key: bytes
    history_key: bytes
    field: bytes


# A refit hook for publish (provided by onboarding): given the NEW model, a user id and their full
# history as item indices of the new model + ratings, return (bias, w (r,), b_idx (k,), b_val (k,)).
PublishModel = TrainedModel | SharedModel
"""What a publish takes the shared part from (ids, versions, dimensions, the refit's weights)."""
RefitHook = Callable[[PublishModel, str, np.ndarray, np.ndarray], tuple[Any, Any, Any, Any]]


@dataclass(frozen=True, eq=False)
class UserBlock:
    """The trained users ``start .. start + n_users - 1`` to publish: ids (for the erasure
    markers), parameters, and training histories as CSR with every user's ratings oldest first."""

    start: int
    user_ids: Sequence[str]
    user_bias: np.ndarray
    W: np.ndarray
    B_idx: np.ndarray
    B_val: np.ndarray
    history_indptr: np.ndarray
    history_items: np.ndarray
    history_ratings: np.ndarray

    @property
    def n_users(self) -> int:
        return int(np.asarray(self.user_bias).shape[0])


def user_block(model: TrainedModel | UserShard) -> UserBlock:
    """All users of a :class:`~lrs_rec.model_dir.TrainedModel`, or of one shard of a model
    directory (:class:`~lrs_rec.model_shards.UserShard`), as a :class:`UserBlock`."""
    items, ratings = model.history_by_time()
    if isinstance(model, TrainedModel):
        lrs = model.lrs
        W, B_idx, B_val, start = lrs.W, lrs.B_idx, lrs.B_val, 0
    else:
        W, B_idx, B_val, start = model.W, model.B_idx, model.B_val, model.start
    return UserBlock(
        start=start,
        user_ids=model.user_ids,
        user_bias=model.user_bias,
        W=W,
        B_idx=B_idx,
        B_val=B_val,
        history_indptr=model.history_indptr,
        history_items=items,
        history_ratings=ratings,
    )


@dataclass(frozen=True)
class PublishPlan:
    """A version being written (:meth:`RedisStore.begin_publish`): its metadata, the erasure
    markers read when it began, the pipelining depth and the key prefix. Sent to writer processes
    as JSON (:meth:`to_json`), never pickled."""

    meta: VersionMeta
    erased: dict[str, bytes]
    pipeline_buckets: int
    prefix: str

    def to_json(self) -> str:
        return json.dumps(
            {
                "meta": json.loads(self.meta.to_json()),
                "erased": {u: m.decode() for u, m in self.erased.items()},
                "pipeline_buckets": self.pipeline_buckets,
                "prefix": self.prefix,
            }
        )

    @classmethod
    def from_json(cls, raw: str) -> PublishPlan:
        d = json.loads(raw)
        return cls(
            meta=VersionMeta.from_json(json.dumps(d["meta"])),
            erased={u: m.encode() for u, m in d["erased"].items()},
            pipeline_buckets=int(d["pipeline_buckets"]),
            prefix=str(d["prefix"]),
        )


def _dims(model: PublishModel) -> tuple[int, int, int]:
    """(rank, sparsity, d) without touching per-user arrays."""
    if isinstance(model, SharedModel):
        return model.rank, model.sparsity, model.d
    return model.lrs.rank, model.lrs.sparsity, model.lrs.d


class UserStore(Protocol):
    """What serving and onboarding need from a parameter store."""

    def current_version(self) -> str | None: ...
    def meta(self, version: str) -> VersionMeta: ...
    def version_exists(self, version: str) -> bool: ...
    def locate(self, meta: VersionMeta, user_id: str, index: int | None) -> UserLocation: ...
    def fetch(
        self, locations: Sequence[UserLocation], *, with_history: bool
    ) -> list[tuple[bytes | None, bytes | None]]: ...
    def put_user(
        self, meta: VersionMeta, user_id: str, index: int | None, record: bytes, history: bytes
    ) -> None: ...


def resp_hset(key: bytes, fields: Sequence[bytes], values: Sequence[bytes]) -> bytes:
    """The RESP encoding of ``HSET key f1 v1 f2 v2 ...`` (bulk strings, as redis-py packs them)."""
    parts = [b"*%d\r\n$4\r\nHSET\r\n$%d\r\n" % (2 + 2 * len(fields), len(key)), key, b"\r\n"]
    for f, v in zip(fields, values, strict=True):
        parts += (b"$%d\r\n" % len(f), f, b"\r\n$%d\r\n" % len(v), v, b"\r\n")
    return b"".join(parts)


class RedisStore:
    """Redis implementation of :class:`UserStore` (works on a single server and on Redis Cluster)."""

    def __init__(self, handle: RedisHandle, layout: KeyLayout | None = None) -> None:
        self.handle = handle
        self.keys = layout or KeyLayout()
        self._meta_cache: dict[str, VersionMeta] = {}

    @property
    def r(self) -> Any:
        return self.handle.client

    # -- versions -----------------------------------------------------------------------------------
    def current_version(self) -> str | None:
        v = self.r.get(self.keys.current)
        return v.decode() if v is not None else None

    def version_exists(self, version: str) -> bool:
        """Whether ``version`` is (still) registered — read from Redis, not from the meta cache."""
        return bool(self.r.hexists(self.keys.versions, version))

    def meta(self, version: str) -> VersionMeta:
        cached = self._meta_cache.get(version)
        if cached is not None and cached.status == "ready":
            return cached
        raw = self.r.hget(self.keys.versions, version)
        if raw is None:
            raise UnknownVersionError(f"store version {version!r} does not exist")
        meta = VersionMeta.from_json(raw)
        self._meta_cache[version] = meta
        return meta

    def list_versions(self) -> list[VersionMeta]:
        raw = self.r.hgetall(self.keys.versions)
        metas = [VersionMeta.from_json(v) for v in raw.values()]
        return sorted(metas, key=lambda m: m.seq)

    def _put_meta(self, meta: VersionMeta) -> None:
        self.r.hset(self.keys.versions, meta.version, meta.to_json())

    def switch(self, version: str, *, only_forward: bool = False) -> bool:
        """Make ``version`` the served one (a single atomic SET). It must be fully written.

        ``only_forward`` (what publish uses): switch only if no NEWER version is current — of two
        overlapping publishes the one started last wins, whichever finishes first — checked and set
        atomically (WATCH on the current pointer). Returns whether it switched; an explicit
        rollback (``lrs-rec publish --switch V``) passes ``only_forward=False``."""
        import redis

        meta = self.meta(version)
        if meta.status != "ready":
            raise ValueError(
                f"store version {version} is {meta.status!r}, not ready; not switching"
            )
        if not only_forward:
            self.r.set(self.keys.current, version)
            return True
        while True:
            with self.r.pipeline(transaction=True) as pipe:
                try:
                    pipe.watch(self.keys.current)
                    cur = pipe.get(self.keys.current)
                    if cur is not None and _version_seq(cur.decode()) > _version_seq(version):
                        log.warning(
                            "not switching to %s: the newer version %s is already current",
                            version,
                            cur.decode(),
                        )
                        return False
                    pipe.multi()
                    pipe.set(self.keys.current, version)
                    pipe.execute()
                    return True
                except redis.WatchError:
                    continue

    def item_ids(self, version: str) -> list[str]:
        raw = self.r.get(self.keys.items(version))
        if raw is None:
            raise UnknownVersionError(f"store version {version!r} has no item vocabulary")
        return [str(x) for x in json.loads(raw)]

    def version_keys(self, meta: VersionMeta) -> list[bytes]:
        v = meta.version
        keys = [self.keys.items(v), self.keys.onboarded(v)]
        for b in range(meta.n_buckets):
            keys += [self.keys.params(v, b), self.keys.history(v, b)]
        for b in range(meta.n_onb_buckets):
            keys += [self.keys.onb_params(v, b), self.keys.onb_history(v, b)]
        return keys

    def delete_version(self, version: str, *, force: bool = False) -> int:
        """Delete every key of ``version``; refuses the current version unless ``force``."""
        if version == self.current_version() and not force:
            raise ValueError(f"store version {version} is the served (current) version")
        meta = self.meta(version)
        keys = self.version_keys(meta)
        n = 0
        for i in range(0, len(keys), 1024):
            pipe = self.r.pipeline(transaction=False)
            for k in keys[i : i + 1024]:
                pipe.unlink(k)
            n += sum(int(x) for x in pipe.execute())
        self.r.hdel(self.keys.versions, version)
        self._meta_cache.pop(version, None)
        return n

    def prune(self, *, keep: int = 2) -> list[str]:
        """Delete old versions: keep the current one and the newest ``keep - 1`` other ready ones;
        half-written versions older than the current one (interrupted publishes) go too."""
        if keep < 1:
            raise ValueError(f"keep must be at least 1 (the current version), got {keep}")
        current = self.current_version()
        cur_seq = _version_seq(current) if current else 0
        ready = [m for m in self.list_versions() if m.status == "ready" and m.version != current]
        keep_set = (
            {m.version for m in ready[len(ready) - max(keep - 1, 0) :]} if keep > 1 else set()
        )
        deleted = []
        for m in self.list_versions():
            if m.version == current or m.version in keep_set:
                continue
            if m.status == "writing" and m.seq > cur_seq:
                continue  # possibly a publish still in progress
            self.delete_version(m.version)
            deleted.append(m.version)
        return deleted

    # -- user records -------------------------------------------------------------------------------
    def locate(self, meta: VersionMeta, user_id: str, index: int | None) -> UserLocation:
        """``index`` is the user's dense index in the version's vocabulary, or None (onboarded)."""
        v = meta.version
        if index is not None and index >= 0:
            b, f = trained_slot(index, meta.bucket_size)
            return UserLocation(self.keys.params(v, b), self.keys.history(v, b), f)
        b, f = onboarded_slot(user_id, meta.n_onb_buckets)
        return UserLocation(self.keys.onb_params(v, b), self.keys.onb_history(v, b), f)

    def fetch_record(self, loc: UserLocation) -> bytes | None:
        """One user's parameter record: a single HGET."""
        if self.handle.is_cluster:
            out: bytes | None = self.r.hget(loc.params_key, loc.field)
            return out
        (record,) = self._one_round_trip([("HGET", loc.params_key, loc.field)])
        return record  # type: ignore[no-any-return]

    def fetch(
        self, locations: Sequence[UserLocation], *, with_history: bool
    ) -> list[tuple[bytes | None, bytes | None]]:
        """Records (and histories) of many users in one pipelined round trip."""
        if not locations:
            return []
        if len(locations) == 1 and not with_history:
            return [(self.fetch_record(locations[0]), None)]
        if len(locations) == 1 and not self.handle.is_cluster:
            return [self._record_and_history(locations[0])]
        pipe = self.r.pipeline(transaction=False)
        for loc in locations:
            pipe.hget(loc.params_key, loc.field)
            if with_history:
                pipe.hget(loc.history_key, loc.field)
        res = pipe.execute()
        if with_history:
            return [(res[2 * i], res[2 * i + 1]) for i in range(len(locations))]
        return [(x, None) for x in res]

    def _record_and_history(self, loc: UserLocation) -> tuple[bytes | None, bytes | None]:
        record, history = self._one_round_trip(
            [("HGET", loc.params_key, loc.field), ("HGET", loc.history_key, loc.field)]
        )
        return record, history

    def _hset_packed(
        self, chunks: Iterable[Sequence[tuple[bytes, list[bytes], list[bytes]]]]
    ) -> None:
        """``HSET key field value ...`` for every ``(key, fields, values)`` of every chunk on one
        connection of a single server: RESP built here with one ``bytes.join`` per command (tested
        equal to redis-py's ``pipeline().hset(key, mapping=...)``); a chunk is written, then the
        previous chunk's replies are read and checked (at most two chunks in flight; the replies
        are a few bytes each, so neither side can block the other)."""
        import redis

        def check(n: int) -> None:
            for _ in range(n):
                reply = conn.read_response()
                if isinstance(reply, redis.ResponseError):
                    raise reply

        conn = self.r.connection_pool.get_connection()
        try:
            pending = 0
            for commands in chunks:
                packed = [resp_hset(key, names, values) for key, names, values in commands]
                if packed:
                    conn.send_packed_command(packed)
                check(pending)
                pending = len(packed)
            check(pending)
        except BaseException:
            conn.disconnect()  # no unread reply may reach the next command on this connection
            raise
        finally:
            self.r.connection_pool.release(conn)

    def _one_round_trip(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        """The serving hot path on a single server: all commands written at once on one pooled
        connection, then every reply read — one round trip like a pipeline, without redis-py's
        command/pipeline bookkeeping (≈ 35 µs less per call than a two-command pipeline). A broken
        pooled connection (e.g. after a Redis restart) is retried once on a fresh one; any error
        drops the connection so that no unread reply can leak into the next request."""
        import redis

        pool = self.r.connection_pool
        for attempt in (0, 1):
            conn = pool.get_connection()
            try:
                conn.send_packed_command(conn.pack_commands(commands))
                return [conn.read_response() for _ in commands]
            except redis.ConnectionError:
                conn.disconnect()
                if attempt:
                    raise
            except BaseException:
                conn.disconnect()
                raise
            finally:
                pool.release(conn)
        raise AssertionError("unreachable")  # pragma: no cover

    def put_user(
        self, meta: VersionMeta, user_id: str, index: int | None, record: bytes, history: bytes
    ) -> None:
        """Durably write ONE user's record and history into ``meta``'s namespace and mark them as
        onboarded (so the next publish carries them over). Record and history are written in one
        MULTI/EXEC (same hash slot); on the embedded server ``appendfsync always`` makes the reply
        imply an fsync'ed append-only file."""
        mark = f"{time.time_ns()}:{-1 if index is None else int(index)}"
        self._put_user(meta, user_id, index, record, history, mark)

    def _put_user(
        self,
        meta: VersionMeta,
        user_id: str,
        index: int | None,
        record: bytes,
        history: bytes,
        mark: str,
    ) -> None:
        loc = self.locate(meta, user_id, index)
        if self.handle.is_cluster:
            # the onboarded marker lives in another slot: write it first, so a crash in between
            # leaves at worst a marker without a record (skipped by carry-over), never the reverse
            self.r.hset(self.keys.onboarded(meta.version), user_id, mark)
            pipe = self.r.pipeline(transaction=True)
        else:
            pipe = self.r.pipeline(transaction=True)
            pipe.hset(self.keys.onboarded(meta.version), user_id, mark)
        pipe.hset(loc.params_key, loc.field, record)
        pipe.hset(loc.history_key, loc.field, history)
        pipe.execute()
        self.invalidation_barrier()

    def invalidation_barrier(self) -> None:
        """One more round trip after a write (single server): Redis writes the client-side-caching
        invalidations a command causes (serving.user_cache) to the tracking connections before it
        reads its next command, so once this returns every serving process's connection has
        them — a request that process starts after this write's acknowledgement is answered from
        the new data. (Without it they follow within the same Redis event-loop iteration.)"""
        if not self.handle.is_cluster:
            self.r.ping()

    def onboarded_users(self, version: str) -> dict[str, tuple[int, int | None]]:
        """Users onboarded in ``version``: id -> (write time in ns, the marker's sequence number;
        trained index or None)."""
        return _parse_onboarded(self.r.hgetall(self.keys.onboarded(version)))

    # -- memory -------------------------------------------------------------------------------------
    def used_memory(self) -> int:
        """``used_memory`` from INFO memory (summed over the nodes of a cluster)."""
        info = self.r.info("memory")
        if isinstance(info, dict) and "used_memory" in info:
            return int(info["used_memory"])
        return sum(int(node["used_memory"]) for node in info.values())

    def ensure_compact_encoding(self, *, entries: int, value_bytes: int) -> None:
        """Make sure a hash of ``entries`` fields with values up to ``value_bytes`` stays
        listpack-encoded. Sets it on the embedded server; on an external one it only warns."""
        try:
            cfg = self.r.config_get("hash-max-*")
        except Exception as e:  # CONFIG may be disabled on managed Redis
            log.warning(
                "cannot read hash-max-* config (%s); make sure hash-max-listpack-entries "
                ">= %d and hash-max-listpack-value >= %d",
                e,
                entries,
                value_bytes,
            )
            return
        if not isinstance(cfg, dict) or not cfg:
            return
        flat: dict[str, Any] = {}
        for k, v in cfg.items():
            if isinstance(v, dict):  # cluster: per node
                flat.update(v)
            else:
                flat[k] = v
        want = {"entries": entries, "value": value_bytes}
        for name, val in flat.items():
            key = str(name.decode() if isinstance(name, bytes) else name)
            kind = key.rsplit("-", 1)[-1]
            if kind not in want or int(val) >= want[kind]:
                continue
            if self.handle.embedded:
                self.r.config_set(key, str(want[kind]))
            else:
                log.warning(
                    "%s=%s on %s: records of this version will not stay in Redis's compact "
                    "hash encoding (set it to >= %d)",
                    key,
                    val,
                    self.handle.describe(),
                    want[kind],
                )

    # -- publish ------------------------------------------------------------------------------------
    def publish(
        self,
        model: TrainedModel,
        *,
        model_dir: str = "",
        precision: str = "float16",
        bucket_size: int = DEFAULT_BUCKET_SIZE,
        n_onb_buckets: int = DEFAULT_ONB_BUCKETS,
        history_cap: int = DEFAULT_HISTORY_CAP,
        with_history: bool = True,
        refit: RefitHook | None = None,
        carry_over_grace: float = 2.0,
        switch: bool = True,
        progress: bool = False,
        pipeline_buckets: int = _PIPELINE_KEYS,
        _fail_after_buckets: int | None = None,
    ) -> VersionMeta:
        """Write every user of ``model`` into a new version namespace, carry over onboarded users
        of the current version, then switch ``current`` to it (unless ``switch=False``).
        :meth:`publish_blocks` with all users as one block."""
        return self.publish_blocks(
            model,
            [user_block(model)],
            model_dir=model_dir,
            precision=precision,
            bucket_size=bucket_size,
            n_onb_buckets=n_onb_buckets,
            history_cap=history_cap,
            with_history=with_history,
            refit=refit,
            carry_over_grace=carry_over_grace,
            switch=switch,
            progress=progress,
            pipeline_buckets=pipeline_buckets,
            _fail_after_buckets=_fail_after_buckets,
        )

    def publish_blocks(
        self,
        model: PublishModel,
        blocks: Iterable[UserBlock],
        *,
        model_dir: str = "",
        precision: str = "float16",
        bucket_size: int = DEFAULT_BUCKET_SIZE,
        n_onb_buckets: int = DEFAULT_ONB_BUCKETS,
        history_cap: int = DEFAULT_HISTORY_CAP,
        with_history: bool = True,
        refit: RefitHook | None = None,
        carry_over_grace: float = 2.0,
        switch: bool = True,
        progress: bool = False,
        pipeline_buckets: int = _PIPELINE_KEYS,
        _fail_after_buckets: int | None = None,
    ) -> VersionMeta:
        """:meth:`publish` of a model whose users come block by block (e.g. the shards of a model
        directory, one in memory at a time); ``model`` gives the shared part (a
        :class:`~lrs_rec.model_dir.SharedModel`: ids, versions, dimensions, the refit's weights).
        Same keys and bytes as :meth:`publish` of the whole model."""
        plan = self.begin_publish(
            model,
            model_dir=model_dir,
            precision=precision,
            bucket_size=bucket_size,
            n_onb_buckets=n_onb_buckets,
            history_cap=history_cap,
            with_history=with_history,
            pipeline_buckets=pipeline_buckets,
        )
        with self.failing(plan):
            for block in blocks:
                self.write_users(
                    plan, block, progress=progress, _fail_after_buckets=_fail_after_buckets
                )
        return self.finish_publish(
            plan, model, refit=refit, carry_over_grace=carry_over_grace, switch=switch
        )

    @contextmanager
    def failing(self, plan: PublishPlan) -> Iterator[None]:
        """Mark the version being written ``failed`` if the block raises."""
        try:
            yield
        except BaseException:
            self.mark_failed(plan.meta)
            raise

    def mark_failed(self, meta: VersionMeta) -> None:
        try:
            self._put_meta(replace(meta, status="failed"))
        except Exception:  # Redis itself may be what failed
            pass

    def begin_publish(
        self,
        model: PublishModel,
        *,
        model_dir: str = "",
        precision: str = "float16",
        bucket_size: int = DEFAULT_BUCKET_SIZE,
        n_onb_buckets: int = DEFAULT_ONB_BUCKETS,
        history_cap: int = DEFAULT_HISTORY_CAP,
        with_history: bool = True,
        pipeline_buckets: int = _PIPELINE_KEYS,
    ) -> PublishPlan:
        """Allocate a new version, register it as ``writing``, store its item ids and read the
        erasure markers: what every writer of its users (:meth:`write_users`, in this process or
        on workers, :class:`PublishPlan` travels as JSON) needs."""
        if not 1 <= bucket_size <= 4096:
            raise ValueError(f"bucket_size must be in [1, 4096], got {bucket_size}")
        if history_cap < 1:
            raise ValueError(
                f"history_cap must be >= 1, got {history_cap}: refits see only the stored history, so "
                "without one a trained user's next rating would refit them from that rating alone"
            )
        rank, sparsity, d = _dims(model)
        fmt = RecordFormat.for_model(rank=rank, sparsity=sparsity, d=d, precision=precision)
        n_buckets = -(-model.n_users // bucket_size)
        version = f"v{int(self.r.incr(self.keys.version_seq))}"
        meta = VersionMeta(
            version=version,
            model_version=model.model_version,
            arrays_sha256=str(model.manifest.get("arrays_sha256", "")),
            model_dir=model_dir,
            n_users=model.n_users,
            n_items=model.n_items,
            d=d,
            record_format=fmt,
            bucket_size=bucket_size,
            n_buckets=n_buckets,
            n_onb_buckets=n_onb_buckets,
            history_cap=history_cap,
            with_history=with_history,
            status="writing",
            created_at=time.time(),
        )
        self._put_meta(meta)  # first, so an interrupted publish can be found and deleted
        plan = PublishPlan(meta, {}, pipeline_buckets, self.keys.prefix)
        with self.failing(plan):
            self.ensure_compact_encoding(entries=bucket_size, value_bytes=fmt.size)
            self.r.set(self.keys.items(version), json.dumps(list(model.item_ids)))
            # erased users (serving.erasure): their rows of the model directory are never written
            plan = replace(plan, erased=self.erased_marks())
        return plan

    def write_users(
        self,
        plan: PublishPlan,
        block: UserBlock,
        *,
        progress: bool = False,
        _fail_after_buckets: int | None = None,
    ) -> int:
        """Write the records (and histories) of the users of ``block`` into ``plan``'s version
        being written: one ``HSET`` per bucket and key, pipelined. Blocks may be written in any
        order and by several processes at once (two blocks sharing a bucket write different
        fields). Users erased before the publish began are skipped. Returns the users written."""
        meta = plan.meta
        version, bucket_size, fmt = meta.version, meta.bucket_size, meta.record_format
        n = block.n_users
        if n == 0:
            return 0
        start, end = block.start, block.start + n
        if start < 0 or end > meta.n_users:
            raise ValueError(f"users {start}..{end - 1} outside the version's {meta.n_users}")
        hist = HistoryEncoder(  # oldest first, so the cap keeps each user's most recent
            block.history_indptr,
            block.history_items,
            block.history_ratings,
            n_items=meta.n_items,
            cap=meta.history_cap,
        )
        if meta.with_history:
            value_bytes = max(fmt.size, min(hist.max_size(), HISTORY_LISTPACK_VALUE))
            if value_bytes > fmt.size:  # raised before the block's writes: as one publish would
                self.ensure_compact_encoding(entries=bucket_size, value_bytes=value_bytes)
        rec_bytes = pack_params(fmt, block.user_bias, block.W, block.B_idx, block.B_val).tobytes()
        L = fmt.size
        skip: set[int] = set()
        if plan.erased:
            skip = {start + j for j, u in enumerate(block.user_ids) if u in plan.erased}
        first, last = start // bucket_size, (end - 1) // bucket_size
        from tqdm import tqdm

        steps = tqdm(
            range(first, last + 1, plan.pipeline_buckets),
            desc=f"publish {version}",
            unit="chunk",
            disable=not progress,
        )
        fields = [str(s).encode() for s in range(bucket_size)]
        keys = self.keys

        def chunks() -> Iterator[list[tuple[bytes, list[bytes], list[bytes]]]]:
            """``(key, fields, values)`` of every HSET, by chunks of ``pipeline_buckets``."""
            for chunk in steps:
                if _fail_after_buckets is not None and chunk >= _fail_after_buckets:
                    raise RuntimeError("simulated failure during publish (test hook)")
                commands = []
                for b in range(chunk, min(chunk + plan.pipeline_buckets, last + 1)):
                    lo = b * bucket_size
                    u_lo, u_hi = max(lo, start), min(lo + bucket_size, end)
                    users = (
                        [u for u in range(u_lo, u_hi) if u not in skip]
                        if skip
                        else range(u_lo, u_hi)
                    )
                    if not users:
                        continue
                    names = [fields[u - lo] for u in users]
                    recs = [rec_bytes[(u - start) * L : (u - start + 1) * L] for u in users]
                    commands.append((keys.params(version, b), names, recs))
                    if meta.with_history:
                        hists = [hist.record(u - start) for u in users]
                        commands.append((keys.history(version, b), names, hists))
                yield commands

        if not self.handle.is_cluster:
            # a single server: RESP packed here, one connection, the next chunk sent before
            # the previous one's replies are read (the encoding overlaps Redis's work)
            self._hset_packed(chunks())
        else:  # a Cluster routes every bucket's keys through redis-py's cluster pipeline
            for commands in chunks():
                pipe = self.r.pipeline(transaction=False)
                for key, names, values in commands:
                    pipe.hset(key, mapping=dict(zip(names, values, strict=True)))
                pipe.execute()
        return n - len(skip)

    def finish_publish(
        self,
        plan: PublishPlan,
        model: PublishModel,
        *,
        refit: RefitHook | None = None,
        carry_over_grace: float = 2.0,
        switch: bool = True,
    ) -> VersionMeta:
        """After every user of ``plan`` is written (:meth:`write_users`): remove users erased
        meanwhile, carry over the users onboarded into the current version, mark the version
        ready and (``switch``) make it current atomically, as :meth:`publish` does."""
        meta = plan.meta
        version = meta.version
        try:
            # users erased while the buckets were written: a bucket written after their erasure
            # removed them from this version holds them again (nothing else writes here yet)
            self._scrub_trained(meta, model, plan.erased)
            old = self.current_version()
            seen: dict[str, int] = {}
            written: dict[str, _Written] = {}
            n_carried = 0
            if old is not None and old != version:
                n_carried = self._carry_over(old, meta, model, refit, seen, written)
            meta = replace(meta, status="ready", published_at=time.time(), n_carried_over=n_carried)
            raw = self.r.hget(self.keys.versions, version)
            if raw is None or VersionMeta.from_json(raw).status != "writing":
                # e.g. `publish --prune` took this slow publish for an interrupted one (writing and
                # older than a version an overlapping publish has made current) and deleted keys
                # it had written: marking it ready would register a version with holes
                raise RuntimeError(
                    f"store version {version} was deleted or changed by another process while "
                    "it was being written (`publish --prune` during an overlapping publish?); "
                    "it is marked failed, publish again"
                )
            self._put_meta(meta)
        except BaseException:
            self.mark_failed(meta)
            raise
        if not switch:
            return meta
        switched, old, n_late, exact = self._settle_and_switch(
            meta, model, refit, old, seen, written
        )
        if switched and old is not None and (seen or not exact) and carry_over_grace >= 0:
            # users onboarded into the old version around the switch by a server that cannot
            # guard its write with the current pointer atomically (Redis Cluster: no cross-slot
            # WATCH), or when the switch could not be made atomically with the last pass: carry
            # them over again once the servers have noticed the switch
            if carry_over_grace:
                time.sleep(carry_over_grace)
            n_late += self._carry_over(old, meta, model, refit, seen, written, switched=True)
        if n_late:
            meta = replace(meta, n_carried_over=meta.n_carried_over + n_late)
            self._put_meta(meta)
        return meta

    def _settle_and_switch(
        self,
        meta: VersionMeta,
        model: PublishModel,
        refit: RefitHook | None,
        old: str | None,
        seen: dict[str, int],
        written: dict[str, _Written],
    ) -> tuple[bool, str | None, int, bool]:
        """Carry over the users onboarded into the served version since the last pass, then
        switch forward to ``meta.version`` — on a single server atomically: the SET is made under
        WATCH of the current pointer and of the old version's onboarded markers, so an onboarding
        acknowledged into the old version before the switch is always carried (a later one is
        refused by the onboarding's own WATCH on the pointer, ``update_user(require_current=True)``).
        Returns (switched?, the version carried from, users carried by these passes, whether the
        switch was atomic with the last pass). Under onboarding traffic so heavy that the markers
        change on every attempt, it switches after ``_SETTLE_ATTEMPTS`` passes without that
        guarantee (the grace pass follows)."""
        import redis

        version = meta.version
        self.meta(version)  # must exist (and be ready: checked by switch() below)
        n = 0
        cluster = self.handle.is_cluster
        for _ in range(_SETTLE_ATTEMPTS):
            if cluster:  # no cross-slot WATCH: pass until quiet, then switch (grace pass follows)
                cur = self.current_version()
                if cur is not None and _version_seq(cur) > _version_seq(version):
                    return self.switch(version, only_forward=True), old, n, False
                if cur is not None and cur != old and cur != version:
                    old = cur
                    seen.clear()
                if old is not None and old != version:
                    m = self._carry_over(old, meta, model, refit, seen, written)
                    n += m
                    if m:
                        continue
                return self.switch(version, only_forward=True), old, n, False
            with self.r.pipeline(transaction=True) as pipe:
                try:
                    pipe.watch(self.keys.current)
                    raw = pipe.get(self.keys.current)
                    cur = raw.decode() if raw is not None else None
                    if cur is not None and _version_seq(cur) > _version_seq(version):
                        log.warning(
                            "not switching to %s: the newer version %s is already current",
                            version,
                            cur,
                        )
                        return False, old, n, True
                    if cur is not None and cur != old and cur != version:
                        # another publish (or a rollback) switched meanwhile: carry from it
                        pipe.reset()
                        old = cur
                        seen.clear()
                        continue
                    if old is not None and old != version:
                        pipe.watch(self.keys.onboarded(old))
                        marks = _parse_onboarded(pipe.hgetall(self.keys.onboarded(old)))
                        if any(seen.get(u) != s[0] for u, s in marks.items()):
                            pipe.reset()
                            n += self._carry_over(old, meta, model, refit, seen, written)
                            continue
                    if self.meta(version).status != "ready":
                        raise ValueError(f"store version {version} is not ready; not switching")
                    pipe.multi()
                    pipe.set(self.keys.current, version)
                    pipe.execute()
                    return True, old, n, True
                except redis.WatchError:
                    continue
        log.warning(
            "onboarding into %s kept changing its users during %d carry-over passes: switching to "
            "%s without waiting for a quiet moment (the grace pass catches the rest)",
            old,
            _SETTLE_ATTEMPTS,
            version,
        )
        return self.switch(version, only_forward=True), old, n, False

    def update_user(
        self,
        meta: VersionMeta,
        user_id: str,
        index: int | None,
        compute: UserUpdate,
        *,
        require_current: bool = False,
        mark: str | None = None,
        own_mark: str | None = None,
        check_erased: bool = False,
        erased_mark: Any = _UNSET,
    ) -> Any:
        """Read the user's stored history in ``meta``, ``compute`` what to write, and write it with
        the onboarded marker, atomically: the one read-modify-write of a user (onboarding and the
        carry-over of a publish). ``compute(history, is_live)`` returns ``(record, history,
        result)``; record None writes only the history; ``is_live()`` tells whether the user is
        already marked onboarded in ``meta`` (by a marker other than ``own_mark``: a carry-over's
        own earlier write does not make a user live). ``mark`` is the marker value to write
        (default ``"<time_ns>:<index or -1>"``). Returns ``result``.

        ``require_current`` (onboarding): write only while ``meta`` is the current version — the
        pointer is WATCHed with the user's keys, so a publish that switches away before EXEC makes
        the write fail with :class:`VersionMovedError` instead of landing, acknowledged, in a
        version the publish has already carried over.

        Single server: WATCH the user's two hashes, MULTI/EXEC, retry when another client wrote
        them in between, so concurrent writers never lose each other's ratings. Redis Cluster (no
        cross-slot WATCH in the client): a per-process lock per user stripe, marker first (see
        :meth:`put_user`); ``require_current`` is then checked just before the write (not
        atomically: publish's grace pass covers the rest).

        Erasure (serving.erasure; the marker hash is WATCHed too on a single server):
        ``check_erased`` (onboarding): a user marked erased without a stored history starts from
        an empty one — never from the training history of the model directory.
        ``erased_mark`` (carry-over): the user's marker as it was when the data to write was read;
        if it differs now, the user was erased since: nothing is written, returns ``_ERASED``."""
        import redis

        loc = self.locate(meta, user_id, index)
        marker = self.keys.onboarded(meta.version)
        if mark is None:
            mark = f"{time.time_ns()}:{-1 if index is None else int(index)}"
        guard = check_erased or erased_mark is not _UNSET
        if self.handle.is_cluster:
            with _USER_LOCKS[hash(user_id) % len(_USER_LOCKS)]:
                hist = self.r.hget(loc.history_key, loc.field)
                if guard:
                    hist = self._erasure_guard(meta, user_id, hist, self.r, erased_mark)
                    if hist is _ERASED:
                        return _ERASED
                record, history, result = compute(
                    hist, partial(_is_live, self.r, marker, user_id, own_mark)
                )
                if require_current:
                    self._check_current(meta, self.r.get(self.keys.current))
                if record is None:
                    self.r.hset(marker, user_id, mark)
                    self.r.hset(loc.history_key, loc.field, history)
                else:
                    self._put_user(meta, user_id, index, record, history, mark)
                return result
        watched = [loc.history_key, loc.params_key]
        if require_current:
            watched.append(self.keys.current)
        if guard:
            watched.append(self.keys.erased)
        for _ in range(_UPDATE_RETRIES):
            with self.r.pipeline(transaction=True) as pipe:
                try:
                    pipe.watch(*watched)
                    if require_current:
                        self._check_current(meta, pipe.get(self.keys.current))
                    hist = pipe.hget(loc.history_key, loc.field)
                    if guard:
                        hist = self._erasure_guard(meta, user_id, hist, pipe, erased_mark)
                        if hist is _ERASED:
                            return _ERASED
                    record, history, result = compute(
                        hist, partial(_is_live, pipe, marker, user_id, own_mark)
                    )
                    pipe.multi()
                    pipe.hset(marker, user_id, mark)
                    if record is not None:
                        pipe.hset(loc.params_key, loc.field, record)
                    pipe.hset(loc.history_key, loc.field, history)
                    pipe.execute()
                    self.invalidation_barrier()
                    return result
                except redis.WatchError:
                    continue
        raise ConcurrentWriteError(
            f"could not store {user_id!r}: {_UPDATE_RETRIES} concurrent-write retries"
        )

    def _erasure_guard(
        self, meta: VersionMeta, user_id: str, hist: bytes | None, client: Any, erased_mark: object
    ) -> Any:
        """``hist`` as :meth:`update_user` passes it on under its erasure options, or _ERASED."""
        now = client.hget(self.keys.erased, user_id)
        if erased_mark is not _UNSET and now != erased_mark:
            return _ERASED
        if now is not None and hist is None:
            return encode_history(_NO_HISTORY[0], _NO_HISTORY[1], n_items=meta.n_items)
        return hist

    def erased_marks(self) -> dict[str, bytes]:
        """Erased user id -> marker (erasure time in ns, ASCII), from ``lrs:erased``."""
        return {k.decode(): v for k, v in self.r.hgetall(self.keys.erased).items()}

    def _scrub_trained(
        self, meta: VersionMeta, model: PublishModel, before: dict[str, bytes]
    ) -> None:
        """Remove from ``meta`` (being written) the trained rows of users erased since ``before``
        (the markers read when the rows were chosen)."""
        late = [u for u, m in self.erased_marks().items() if before.get(u) != m]
        if not late:
            return
        index = model.user_index()
        pipe = self.r.pipeline(transaction=False)
        for u in late:
            if u in index:
                loc = self.locate(meta, u, index[u])
                pipe.hdel(loc.params_key, loc.field)
                pipe.hdel(loc.history_key, loc.field)
        pipe.execute()

    @staticmethod
    def _check_current(meta: VersionMeta, raw: bytes | None) -> None:
        current = raw.decode() if raw is not None else None
        if current != meta.version:
            raise VersionMovedError(
                f"store version {meta.version} is no longer current ({current} is)",
                current=current,
            )

    def _carry_over(
        self,
        old_version: str,
        new: VersionMeta,
        model: PublishModel,
        refit: RefitHook | None,
        seen: dict[str, int],
        written: dict[str, _Written],
        *,
        switched: bool = False,
    ) -> int:
        """Carry users onboarded in ``old_version`` (not yet in ``seen`` at that sequence number)
        into ``new``: refit them from their full stored history with the new model. ``written``:
        user -> the marker this publish wrote into ``new`` (filled in). Before the switch
        (``switched`` False) nothing but this publish writes into ``new``, so the old version's
        copy (the newer one) wins; after it, a user whose marker in ``new`` is not ours has
        been onboarded there by a server, and what ``new`` holds wins."""
        onboarded = self.onboarded_users(old_version)
        todo = {u: s for u, s in onboarded.items() if seen.get(u) != s[0]}
        if not todo:
            return 0
        old = self.meta(old_version)
        same_model = bool(old.arrays_sha256) and old.arrays_sha256 == new.arrays_sha256
        old_items = self.item_ids(old_version)
        new_item_index = model.item_index()
        new_user_index = model.user_index()
        job = _CarryOver(old, new, model, refit, same_model, switched)
        n = 0
        ids = list(todo)
        locs = [self.locate(old, u, todo[u][1]) for u in ids]
        # each user's erasure marker as it was before their data was read: one erased since is
        # not written into ``new`` (RedisStore.update_user, ``erased_mark``)
        marks = self.r.hmget(self.keys.erased, ids)
        fetched = self.fetch(locs, with_history=True)
        for user_id, loc, mark, (rec, hist) in zip(ids, locs, marks, fetched, strict=True):
            seen[user_id] = todo[user_id][0]
            if rec is None or hist is None:
                continue
            try:
                n += self._carry_user(
                    job,
                    user_id,
                    (rec, hist),
                    old_items,
                    (new_item_index, new_user_index),
                    written,
                    erased_mark=mark,
                )
            except RecordError as e:
                raise RecordError(
                    f"onboarded user {user_id!r} of store version {old_version}: {e} (hash "
                    f"{loc.history_key.decode()} / {loc.params_key.decode()}, field "
                    f"{loc.field.decode(errors='replace')!r}); publish carries every onboarded "
                    "user over, so it stops: repair or delete that user's field in both hashes "
                    "(HDEL), then publish again"
                ) from e
        return n

    def _carry_user(
        self,
        job: _CarryOver,
        user_id: str,
        stored: tuple[bytes, bytes],
        old_items: list[str],
        new_index: tuple[dict[str, int], Mapping[str, int]],
        written: dict[str, _Written],
        *,
        erased_mark: bytes | None = None,
    ) -> int:
        """Carry one onboarded user (``stored``: record, history in the old version) into
        ``job.new`` (see :meth:`_carry_over`); 1 if refitted, else 0."""
        rec, hist = stored
        new_item_index, new_user_index = new_index
        items_old, ratings = decode_history(hist)
        idx = new_user_index.get(user_id)
        trained = decode_history_trained(hist)  # leading entries from the old training data
        if idx is not None:
            # the new model was trained on this user: their training ratings are its own (already
            # in ``new``), only what they rated through the service is carried over — the old
            # training ratings must not override the newer log's
            items_old, ratings, trained = items_old[trained:], ratings[trained:], 0
        ext = [old_items[i] for i in items_old]
        keep = np.array([e in new_item_index for e in ext], dtype=bool)
        items_carried = np.array(
            [new_item_index[e] for e in ext if e in new_item_index], dtype=np.int64
        )
        carried = (items_carried, ratings[keep])
        carried_trained = int(keep[:trained].sum())
        # ratings of items outside a vocabulary are kept by external id: those the new model knows
        # join the fitted history, items it no longer knows move to the unknown-item list
        cap = job.new.history_cap
        unknown_old = decode_history_unknown(hist)
        now_known = [(new_item_index[i], r) for i, r in unknown_old if i in new_item_index]
        if now_known:
            c_items, c_ratings, carried_trained = merge_trained(
                *carried,
                carried_trained,
                np.array([i for i, _ in now_known], dtype=np.int64),
                np.array([r for _, r in now_known]),
                0,
                cap,
            )
            carried = (c_items, c_ratings)
        # (old training ratings of items the new model does not know are not service ratings: dropped)
        dropped = [
            (e, float(r))
            for k, (e, r, kept) in enumerate(zip(ext, ratings, keep, strict=True))
            if not kept and k >= trained
        ]
        still_unknown = [(i, r) for i, r in unknown_old if i not in new_item_index]
        carried_unknown = merge_unknown(dropped, still_unknown, cap)
        mark = f"{time.time_ns()}:{-1 if idx is None else int(idx)}"
        before = written.get(user_id)
        # the marker is ours before the write (a retried or failed one is still ours); the history
        # once written: the grace pass tells the ratings servers wrote into ``new`` from it
        written[user_id] = _Written(mark, before.history if before is not None else None)
        compute = partial(
            job.carried_user,
            user_id=user_id,
            rec=rec,
            carried=carried,
            carried_trained=carried_trained,
            ours=before,
            carried_unknown=carried_unknown,
        )
        out = self.update_user(
            job.new,
            user_id,
            idx,
            compute,
            mark=mark,
            own_mark=before.mark if before else None,
            erased_mark=erased_mark,
        )
        if out is _ERASED:  # erased since its data was read: nothing written
            if before is None:
                written.pop(user_id, None)
            else:
                written[user_id] = before
            return 0
        refitted, history = out
        written[user_id] = _Written(mark, history)
        return 1 if refitted else 0


_UPDATE_RETRIES = 50
_ERASED = object()  # RedisStore.update_user: the user was erased meanwhile, nothing written
_SETTLE_ATTEMPTS = 20
_USER_LOCKS = [threading.Lock() for _ in range(64)]


@dataclass(frozen=True)
class _CarryOver:
    """One carry-over from ``old`` into ``new`` (with ``model``): turns a user's carried history
    and what ``new`` already holds into the record + history to write (``RedisStore.update_user``)."""

    old: VersionMeta
    new: VersionMeta
    model: PublishModel
    refit: RefitHook | None
    same_model: bool
    switched: bool = False

    def carried_user(
        self,
        new_hist: bytes | None,
        is_live: Callable[[], bool],
        *,
        user_id: str,
        rec: bytes,
        carried: tuple[np.ndarray, np.ndarray],
        carried_trained: int = 0,
        ours: _Written | None = None,
        carried_unknown: list[tuple[str, float]] | None = None,
    ) -> tuple[bytes | None, bytes, tuple[bool, bytes]]:
        """``(record or None, history, (refitted?, history))`` for :meth:`RedisStore.update_user`;
        ``carried_trained``: how many leading entries of ``carried`` are old training data (only
        for a user the new model was not trained on); ``ours``: what this publish wrote for the
        user into ``new`` in an earlier pass; ``carried_unknown``: the user's ratings of items
        outside the new vocabulary (by id)."""
        live = self.switched and is_live()
        # what the new version already holds for the user: their new training history (published
        # moments ago), what this publish carried there in an earlier pass and, once the new
        # version is live, what servers wrote there since the switch. The service's ratings win
        # over training data and the old version's copy (the latest before the switch) over an
        # earlier pass's; only ratings written into the new version since then win over it.
        # merge_trained: the second one wins.
        cap = self.new.history_cap
        present = decode_history(new_hist) if new_hist is not None else _NO_HISTORY
        present_trained = decode_history_trained(new_hist) if new_hist is not None else 0
        items, ratings, n_trained = merge_trained(
            present[0], present[1], present_trained, carried[0], carried[1], carried_trained, cap
        )
        # unknown-item ratings (never fitted) merge the same way, by id
        present_unknown = decode_history_unknown(new_hist) if new_hist is not None else []
        unknown = merge_unknown(present_unknown, list(carried_unknown or ()), cap)
        if live:
            since_i, since_r = _written_since(present, ours)
            items, ratings, n_trained = merge_trained(
                items, ratings, n_trained, since_i, since_r, 0, cap
            )
            # what servers wrote since ours, by value (order aside, exact: these are never fitted)
            mine = set(decode_history_unknown(ours.history)) if ours and ours.history else set()
            unknown = merge_unknown(unknown, [e for e in present_unknown if e not in mine], cap)
        history = encode_history(
            items, ratings, n_items=self.model.n_items, unknown=unknown, n_trained=n_trained
        )
        fmt = self.new.record_format
        if self.same_model and not live:  # same parameters: carry the record as it is
            if self.old.record_format == fmt:
                return rec, history, (True, history)
            p = decode_record(self.old.record_format, rec)
            return encode_records(fmt, p.bias, p.w, p.b_idx, p.b_val)[0], history, (True, history)
        if self.refit is None:
            log.warning(
                "user %r was onboarded in %s but no refit hook is installed: their history is "
                "carried over, their parameters are not refitted",
                user_id,
                self.old.version,
            )
            return None, history, (False, history)
        bias, w, b_idx, b_val = self.refit(self.model, user_id, items, ratings)
        return encode_records(fmt, [bias], [w], [b_idx], [b_val])[0], history, (True, history)


_NO_HISTORY = (np.zeros(0, dtype=np.int64), np.zeros(0))


@dataclass(frozen=True)
class _Written:
    """What a publish wrote for one user into the new version: its onboarded marker and history."""

    mark: str
    history: bytes | None


def _written_since(
    present: tuple[np.ndarray, np.ndarray], ours: _Written | None
) -> tuple[np.ndarray, np.ndarray]:
    """The entries of ``present`` (the new version's history of a user) that servers stored there
    after this publish wrote ``ours``. Every write is a :func:`~serving.history.merge_history`:
    the entries kept in their order, then the request's ratings appended (a re-rated item moves
    to the end), the oldest cut by the cap. So ``present`` is a tail of ``ours`` without the
    items rated since, followed by those ratings: the shortest suffix of ``present`` that leaves
    such a head is what was written since (by position, so a re-rating to the very value the
    publish wrote counts too — unless it re-rates the publish's last entry, which then stays in
    place and cannot be told from no write). A history of any other shape (not expected): every entry whose
    value differs from ours."""
    if ours is None or ours.history is None:
        return present
    items, ratings = (a.tolist() for a in present)
    o_items, o_ratings = (a.tolist() for a in decode_history(ours.history))
    mine = list(zip(o_items, o_ratings, strict=True))
    entries = list(zip(items, ratings, strict=True))
    for k in range(len(entries), -1, -1):  # k: length of the head left from ours
        since_items = set(items[k:])
        head = [e for e in mine if e[0] not in since_items]
        if k <= len(head) and entries[:k] == head[len(head) - k :]:
            return present[0][k:], present[1][k:]
    by_value = dict(mine)
    keep = np.array([by_value.get(i) != r for i, r in entries], dtype=bool)
    return present[0][keep], present[1][keep]


def _is_live(client: Any, key: bytes, field: str, own_mark: str | None) -> bool:
    """Whether ``field`` is marked onboarded in ``key`` by someone else than ``own_mark``."""
    raw = client.hget(key, field)
    return raw is not None and (own_mark is None or raw.decode() != own_mark)


def _parse_onboarded(raw: dict[bytes, bytes]) -> dict[str, tuple[int, int | None]]:
    out: dict[str, tuple[int, int | None]] = {}
    for k, v in raw.items():
        seq, idx = v.decode().split(":")
        out[k.decode()] = (int(seq), None if int(idx) < 0 else int(idx))
    return out


def _version_seq(version: str) -> int:
    """The sequence number of a store version name ``v<N>``."""
    return int(version[1:]) if version[1:].isdigit() else -1


def trained_user_records(model: TrainedModel, precision: str) -> Iterable[bytes]:
    """Every trained user's encoded record (fast encoder), in user-index order."""
    lrs = model.lrs
    fmt = RecordFormat.for_model(rank=lrs.rank, sparsity=lrs.sparsity, d=lrs.d, precision=precision)
    return encode_records(fmt, model.user_bias, lrs.W, lrs.B_idx, lrs.B_val)
