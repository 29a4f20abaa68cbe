"""score and recommend without blocking the event loop and without a thread hop per request.

The record (and history) reads run on the event loop, every command bounded by the same socket
timeout as the synchronous client: through :class:`~lrs_rec.serving.resp_pipe.RespPipe` (one
pipelined connection; the reads of all requests of one loop iteration share one write and one
round trip) when Redis is a unix socket or a plain ``redis://`` server, else through
``redis.asyncio`` (``rediss://``; also the pipe's reference twin in the tests). Redis Cluster, and
the version check once per refresh interval, go to the worker threads (``serving.offload``).

Micro-batching: the recommendations whose Redis replies arrive in the same loop iteration are
scored together — one batched record decode and one ONNX Runtime run for all of them
(:meth:`Recommender.recommend_rows`, equal to one :meth:`Recommender.recommend_from` per request,
tested) — so under concurrent load the per-request cost of the ONNX run and the Redis round trip
shrinks; a lone request is scored alone, in the next loop iteration. With Redis paused, every
request waits for its own socket timeout side by side and gets 503; ``/healthz`` is not held up.

Why not the thread pool for every request: on a busy machine each hand-over to a worker thread and
back costs two thread wake-ups (about 1 ms at p50 measured in-process with the two cores shared), more
than the whole recommendation.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from lrs_rec.serving.offload import Offload
from lrs_rec.serving.recommender import (
    _REDIS_ERRORS,
    Recommender,
    RecommendResult,
    ScoreResult,
    TopItems,
)
from lrs_rec.serving.resp_pipe import RespPipe, pack, pipe_for
from lrs_rec.serving.store import UserLocation
from lrs_rec.serving.user_cache import UserCache

MAX_CONNECTIONS = (
    512  # asyncio Redis connections per process (beyond: a 503 "too many connections")
)
# requests scored in one ONNX Runtime run: per request the run costs ≈ 31 µs alone, ≈ 12 µs in a
# batch of 8-12, but more again beyond ≈ 14 (ORT's TopK over [B, n_items] grows faster than B)
MAX_BATCH = 12
MAX_CACHED_BUCKETS = 16_384  # per-bucket packed HGET prefixes kept (≈ 150 B each)


class AsyncFront:
    """``await front.score(user_id, item_ids)`` / ``await front.recommend(user_id, n, excl)``.

    ``pipe=False`` reads through ``redis.asyncio`` even where the pipe would do (the reference twin);
    ``batch=False`` scores every recommendation on its own; ``cache=N`` keeps up to N users'
    Redis rows for recommend (:mod:`lrs_rec.serving.user_cache`; 0: none), only on a pipe to a
    unix socket (a local server: a dead peer is seen at once) that tracks its reads."""

    def __init__(
        self,
        rec: Recommender,
        offload: Offload,
        *,
        pipe: bool = True,
        batch: bool = True,
        cache: int = 0,
    ) -> None:
        self.rec = rec
        self.offload = offload
        self.use_pipe = pipe
        self.batch = batch
        self.cache = UserCache(cache) if cache and pipe else None
        self._client: Any = None
        self._pipe: RespPipe | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._direct: bool | None = None  # None: not decided yet (needs the sync client)
        self._pending: list[tuple[Any, str, int, Any, asyncio.Future[TopItems]]] = []
        self._heads: dict[tuple[str, int], tuple[bytes, bytes, bytes, bytes]] = {}
        self._reading = 0  # recommendations waiting for their Redis replies
        self.batches = 0  # scoring runs of more than one request (tests, metrics)
        self.batched = 0  # requests scored in those runs

    async def aclose(self) -> None:
        """Close the asyncio Redis clients (at the app's shutdown): a connection left open would
        keep the embedded server from being stopped by the last process leaving it."""
        client, self._client, self._loop = self._client, None, None
        pipe, self._pipe = self._pipe, None
        if pipe is not None:
            await pipe.aclose()
        if client is not None:
            await client.aclose()

    async def _snapshot(self) -> Any:
        return self.rec.fresh_snapshot() or await self.offload(self.rec.snapshot)

    async def _use_async(self) -> bool:
        if self._direct is None:
            handle = self.rec.handle
            # creating the synchronous client decides cluster or not (and starts an embedded
            # server): blocking, so in a worker thread, once
            is_cluster = await self.offload(lambda: handle.is_cluster)
            self._direct = not is_cluster and (
                _unix_path(handle.client) is not None or handle.url is not None
            )
        return self._direct

    def _bind(self) -> None:
        """(Re)create the clients when first used in this event loop (tests run apps in several)."""
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            self._client, self._pipe, self._loop = None, None, loop
            self._pending = []
            if self.cache is not None:
                self.cache.clear()
            if self.use_pipe:
                handle = self.rec.handle
                self._pipe = pipe_for(
                    handle.client,
                    timeout=handle.socket_timeout,
                    connect_timeout=handle.connect_timeout,
                    tracking=self.cache is not None and _unix_path(handle.client) is not None,
                )
                if self._pipe is not None and self.cache is not None:
                    self._pipe.listener = self.cache.invalidate

    def _redis(self) -> Any:
        self._bind()
        if self._client is None:
            import redis.asyncio as aredis
            from redis.asyncio.retry import Retry
            from redis.backoff import NoBackoff
            from redis.exceptions import ConnectionError as RedisConnectionError

            handle = self.rec.handle
            kw: dict[str, Any] = {
                "socket_timeout": handle.socket_timeout,
                "socket_connect_timeout": handle.connect_timeout,
                "retry": Retry(
                    NoBackoff(), handle.retries, supported_errors=(RedisConnectionError,)
                ),
                "max_connections": MAX_CONNECTIONS,
            }
            path = _unix_path(handle.client)
            if path is not None:
                self._client = aredis.Redis(unix_socket_path=path, **kw)
            else:
                from lrs_rec.serving.connection import _split_cluster_flag

                url, _ = _split_cluster_flag(str(handle.url))
                self._client = aredis.Redis.from_url(url, **kw)
        return self._client

    def _hgets(self, meta: Any, user_id: str, index: int | None, with_history: bool) -> bytes:
        """The RESP of the record's (and history's) HGET of ``user_id`` in version ``meta`` —
        the same keys and field as ``store.locate`` (tested), with each bucket's two key
        prefixes packed once and kept (a bounded cache)."""
        return self._packed(meta, user_id, index, with_history)[0]

    def _packed(
        self, meta: Any, user_id: str, index: int | None, with_history: bool
    ) -> tuple[bytes, tuple[bytes, bytes]]:
        """:meth:`_hgets` and the two keys read (the record's and the history's hash)."""
        if index is None or index < 0:
            loc = self.rec.store.locate(meta, user_id, index)
            commands = [("HGET", loc.params_key, loc.field)]
            if with_history:
                commands.append(("HGET", loc.history_key, loc.field))
            return pack(commands), (_b(loc.params_key), _b(loc.history_key))
        bucket, slot = divmod(index, meta.bucket_size)
        key = (meta.version, bucket)
        heads = self._heads.get(key)
        if heads is None:
            if len(self._heads) >= MAX_CACHED_BUCKETS:
                self._heads.clear()
            loc = self.rec.store.locate(meta, user_id, index)
            heads = self._heads[key] = (
                b"*3\r\n$4\r\nHGET\r\n$%d\r\n%s\r\n" % (len(loc.params_key), loc.params_key),
                b"*3\r\n$4\r\nHGET\r\n$%d\r\n%s\r\n" % (len(loc.history_key), loc.history_key),
                _b(loc.params_key),
                _b(loc.history_key),
            )
        field = b"%d" % slot
        tail = b"$%d\r\n%s\r\n" % (len(field), field)
        payload = heads[0] + tail + heads[1] + tail if with_history else heads[0] + tail
        return payload, (heads[2], heads[3])

    async def _fetch(
        self, loc: UserLocation, with_history: bool
    ) -> tuple[bytes | None, bytes | None]:
        """One user's record (and history) in one round trip: on the shared pipelined connection
        when there is one, else :meth:`_fetch_reference`."""
        self._bind()
        pipe = self._pipe
        if pipe is None:
            return await self._fetch_reference(loc, with_history)
        if with_history:
            record, history = await pipe.call(
                (("HGET", loc.params_key, loc.field), ("HGET", loc.history_key, loc.field))
            )
            return record, history
        (record,) = await pipe.call((("HGET", loc.params_key, loc.field),))
        return record, None

    async def _fetch_reference(
        self, loc: UserLocation, with_history: bool
    ) -> tuple[bytes | None, bytes | None]:
        """The same through ``redis.asyncio``: one round trip on one pooled connection; a broken
        connection is retried once on a fresh one, and any error or cancellation drops it so that
        no unread reply leaks into the next request."""
        import redis

        commands: list[tuple[Any, ...]] = [("HGET", loc.params_key, loc.field)]
        if with_history:
            commands.append(("HGET", loc.history_key, loc.field))
        pool = self._redis().connection_pool
        for attempt in (0, 1):
            conn = await pool.get_connection()
            try:
                await conn.send_packed_command(conn.pack_commands(commands))
                replies = [await conn.read_response() for _ in commands]
                return replies[0], (replies[1] if with_history else None)
            except redis.ConnectionError:
                await conn.disconnect()
                if attempt:
                    raise
            except BaseException:
                await conn.disconnect()
                raise
            finally:
                await pool.release(conn)
        raise AssertionError("unreachable")  # pragma: no cover

    async def recommend(self, user_id: str, n: int, exclude_rated: bool) -> RecommendResult:
        return (await self.recommend_top(user_id, n, exclude_rated)).result()

    async def recommend_top(self, user_id: str, n: int, exclude_rated: bool) -> TopItems:
        """:meth:`recommend` as :class:`TopItems` (what the HTTP route renders)."""
        rec = self.rec
        rec._check_n(n)
        if not (self._direct or await self._use_async()):
            return await self.offload(rec.top, user_id, n, exclude_rated)
        snap = rec.fresh_snapshot()
        if snap is None:
            snap = await self.offload(rec.snapshot)
        self._bind()
        pipe = self._pipe
        cache = self.cache
        row = None
        if cache is not None:
            if pipe is not None and pipe.tracked():
                row = cache.get(snap[0].version, user_id, exclude_rated)
            else:  # no live tracking connection (yet): read Redis
                cache.misses += 1
        if row is None:
            self._reading += 1
            try:
                if pipe is not None:  # the hot path: prepacked HGETs on the shared connection
                    meta, index = snap[0], snap[1].user_index.get(user_id)
                    payload, keys = self._packed(meta, user_id, index, exclude_rated)
                    hook = None
                    if cache is not None:

                        def hook(replies: list[Any]) -> None:
                            if not any(isinstance(r, Exception) for r in replies):
                                history = replies[1] if exclude_rated else None
                                cache.put(
                                    meta.version, user_id, keys, replies[0], history, exclude_rated
                                )

                    replies = await pipe.call_packed(payload, 1 + exclude_rated, hook)
                    row = (replies[0], replies[1] if exclude_rated else None)
                else:
                    loc = rec.store.locate(snap[0], user_id, snap[1].user_index.get(user_id))
                    row = await self._fetch_reference(loc, exclude_rated)
            except _REDIS_ERRORS as e:
                raise rec._unavailable(e) from e
            finally:
                self._reading -= 1
        loop = asyncio.get_running_loop()
        if not self.batch or (
            not self._reading and not self._pending and not getattr(loop, "_ready", None)
        ):
            # alone (no other recommendation reading Redis or queued, nothing else waiting to
            # run in this loop iteration — e.g. other requests' cache hits): no batch to wait for
            return rec.top_from(snap, user_id, n, row)
        future: asyncio.Future[TopItems] = loop.create_future()
        self._pending.append((snap, user_id, n, row, future))
        if len(self._pending) == 1:
            # after every request woken in this loop iteration has queued itself
            future.get_loop().call_soon(self._score_pending)
        return await future

    def forget_user(self, user_id: str) -> None:
        """Drop ``user_id``'s cached rows (after a write through this process)."""
        if self.cache is not None:
            self.cache.drop_user(user_id)

    def _score_pending(self) -> None:
        """Score the queued recommendations: one run per snapshot (almost always one); if that
        fails (a corrupt record), each request alone, so only the bad one gets the error."""
        pending, self._pending = self._pending, []
        groups: dict[int, list[tuple[Any, str, int, Any, asyncio.Future[TopItems]]]] = {}
        for item in pending:
            groups.setdefault(id(item[0]), []).append(item)
        chunks = [
            g[i : i + MAX_BATCH] for g in groups.values() for i in range(0, len(g), MAX_BATCH)
        ]
        for group in chunks:
            snap = group[0][0]
            try:
                results = self.rec.top_rows(snap, [(u, n, row) for _, u, n, row, _ in group])
            except Exception:
                results = None
            if len(group) > 1:
                self.batches += 1
                self.batched += len(group)
            for k, (_, user_id, n, row, future) in enumerate(group):
                if future.done():  # the request was cancelled meanwhile
                    continue
                if results is not None:
                    future.set_result(results[k])
                    continue
                try:
                    future.set_result(self.rec.top_from(snap, user_id, n, row))
                except Exception as e:
                    future.set_exception(e)

    async def score(self, user_id: str, item_ids: Sequence[str]) -> ScoreResult:
        rec = self.rec
        rec.check_items(item_ids)  # unknown items: 422 before touching Redis
        if not await self._use_async():
            return await self.offload(rec.score, user_id, item_ids)
        snap = await self._snapshot()
        loc = rec.store.locate(snap[0], user_id, snap[1].user_index.get(user_id))
        try:
            record, _ = await self._fetch(loc, False)
        except _REDIS_ERRORS as e:
            raise rec._unavailable(e) from e
        return rec.score_from(snap, user_id, item_ids, record)


def _b(key: bytes | str) -> bytes:
    return key if isinstance(key, bytes) else key.encode()


def _unix_path(client: Any) -> str | None:
    """The unix socket path of a synchronous redis-py client, if it uses one."""
    kwargs = getattr(getattr(client, "connection_pool", None), "connection_kwargs", {}) or {}
    path = kwargs.get("path")
    return str(path) if path else None
