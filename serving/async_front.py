"""score and recommend without blocking the event loop and without a thread hop per request.

The record (and history) reads go through ``redis.asyncio`` on the event loop — every command
bounded by the same socket timeout as the synchronous client — and the rest (decode, the ONNX
Runtime run, ≈ 50–150 µs) runs on the loop too. Only the version check, once per refresh interval,
and everything on Redis Cluster (no cross-slot pipelining in the asyncio client's single-connection
path) go to the worker threads (``serving.offload``). With Redis paused, every request waits for its
own socket timeout side by side and gets 503; ``/healthz`` is not held up.

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
)
from lrs_rec.serving.store import UserLocation

MAX_CONNECTIONS = (
    512  # asyncio Redis connections per process (beyond: a 503 "too many connections")
)


class AsyncFront:
    """``await front.score(user_id, item_ids)`` / ``await front.recommend(user_id, n, excl)``."""

    def __init__(self, rec: Recommender, offload: Offload) -> None:
        self.rec = rec
        self.offload = offload
        self._client: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._direct: bool | None = None  # None: not decided yet (needs the sync client)

    async def aclose(self) -> None:
        """Close the asyncio Redis client (at the app's shutdown): a connection left open would
        keep the embedded server from being stopped by the last process leaving it."""
        client, self._client, self._loop = self._client, None, None
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

    def _redis(self) -> Any:
        loop = asyncio.get_running_loop()
        if self._client is None or self._loop is not loop:
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
            self._loop = loop
        return self._client

    async def _fetch(
        self, loc: UserLocation, with_history: bool
    ) -> tuple[bytes | None, bytes | None]:
        """One user's record (and history): one round trip on one pooled connection; a broken
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
        rec = self.rec
        rec._check_n(n)
        if not await self._use_async():
            return await self.offload(rec.recommend, user_id, n, exclude_rated)
        snap = await self._snapshot()
        loc = rec.store.locate(snap[0], user_id, snap[1].user_index.get(user_id))
        try:
            row = await self._fetch(loc, exclude_rated)
        except _REDIS_ERRORS as e:
            raise rec._unavailable(e) from e
        return rec.recommend_from(snap, user_id, n, row)

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


def _unix_path(client: Any) -> str | None:
    """The unix socket path of a synchronous redis-py client, if it uses one."""
    kwargs = getattr(getattr(client, "connection_pool", None), "connection_kwargs", {}) or {}
    path = kwargs.get("path")
    return str(path) if path else None
