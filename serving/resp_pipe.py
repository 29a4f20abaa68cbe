"""A pipelined RESP2 client on one asyncio connection: the Redis reads of score and recommend.

Why not ``redis.asyncio``: a round trip there costs ≈ 90 µs of CPU (a pool checkout and release, a
``StreamReader``, a pure-Python reply parser with several awaits per reply). Here the requests of one
event-loop iteration share one connection and one ``write`` (their commands are joined and flushed
once, through ``loop.call_soon``); Redis answers in order, and ``data_received`` parses every reply
that arrived and resolves the waiting calls first in, first out. Concurrent requests thus cost one
round trip between them, and no task switch beyond waking each caller.

Only what the hot path needs: bulk strings (``$``, nil ``$-1``), simple strings, integers and errors
— no arrays, no RESP3, no TLS (``rediss://`` and Redis Cluster keep ``redis.asyncio`` /
the worker threads, see :mod:`lrs_rec.serving.async_front`).

Failures are redis-py's exception classes, so callers treat them like any Redis error (HTTP 503):

* every call waits at most ``timeout`` seconds (:class:`redis.TimeoutError`); a call that times out
  leaves its slot in the queue, so a late reply is matched to it and dropped, never handed to the
  next call. When calls time out and nothing at all has arrived for ``timeout`` seconds, the
  connection is closed (every waiting call fails at once) and the next call opens a new one — as
  redis-py drops a connection after a socket timeout.
* a connection that breaks fails its waiting calls with :class:`redis.ConnectionError`; the caller
  may retry once on a new connection (:meth:`RespPipe.call` does, for the idempotent reads here).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import redis.exceptions as rex

MAX_WAITING = 100_000  # calls queued on one connection (a bound, far above --max-concurrency)


def pack(commands: Sequence[Sequence[bytes | str | int]]) -> bytes:
    """The RESP encoding of ``commands`` (arrays of bulk strings, as redis-py packs them)."""
    parts: list[bytes] = []
    for cmd in commands:
        parts.append(b"*%d\r\n" % len(cmd))
        for arg in cmd:
            b = arg if isinstance(arg, bytes) else str(arg).encode()
            parts += (b"$%d\r\n" % len(b), b, b"\r\n")
    return b"".join(parts)


Hook = Callable[[list[Any]], None]


class _Incomplete(Exception):
    """The buffer ends inside a reply."""


def _parse(buf: bytes, pos: int) -> tuple[Any, int]:
    """One RESP2/RESP3 value at ``pos``: (value, next position); aggregates as lists (a map as its
    flat key/value list). Raises :class:`_Incomplete` when the buffer ends first."""
    nl = buf.find(b"\r\n", pos)
    if nl < 0:
        raise _Incomplete
    kind, line = buf[pos], buf[pos + 1 : nl]
    if kind in (36, 61, 33):  # $ bulk string, = verbatim string, ! bulk error
        length = int(line)
        if length < 0:
            return None, nl + 2
        nxt = nl + 4 + length
        if nxt > len(buf):
            raise _Incomplete
        value = buf[nl + 2 : nl + 2 + length]
        if kind == 33:
            return rex.ResponseError(value.decode("utf-8", "replace")), nxt
        return (value[4:] if kind == 61 else value), nxt
    if kind in (43, 40):  # + simple string, ( big number
        return line, nl + 2
    if kind == 58:  # : integer
        return int(line), nl + 2
    if kind == 45:  # - error
        return rex.ResponseError(line.decode("utf-8", "replace")), nl + 2
    if kind == 95:  # _ null
        return None, nl + 2
    if kind == 35:  # # boolean
        return line == b"t", nl + 2
    if kind == 44:  # , double
        return float(line), nl + 2
    if kind in (42, 37, 126, 62, 124):  # * array, % map, ~ set, > push, | attribute
        count = int(line)
        if count < 0:
            return None, nl + 2
        count *= 2 if kind in (37, 124) else 1
        items, nxt = [], nl + 2
        for _ in range(count):
            item, nxt = _parse(buf, nxt)
            items.append(item)
        return items, nxt
    raise ValueError(f"unexpected reply type {chr(kind)!r}")


class _Call:
    __slots__ = ("deadline", "future", "hook", "n", "replies")

    def __init__(
        self, future: asyncio.Future[list[Any]], n: int, deadline: float, hook: Hook | None
    ) -> None:
        self.future = future
        self.n = n
        self.deadline = deadline
        self.hook = hook
        self.replies: list[Any] = []


class _Connection(asyncio.Protocol):
    """One connection: the queue of calls waiting for replies, the parse buffer, the write buffer."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.waiting: deque[_Call] = deque()
        self.buf = b""
        self.out: list[bytes] = []
        self.flush_scheduled = False
        self.closed: BaseException | None = None
        self.progress = time.monotonic()  # last time a reply arrived (or the call queue was empty)
        self.timer: asyncio.TimerHandle | None = None  # the next deadline check, if armed
        self.timeout = 1.0
        self.describe = "Redis"
        self.tracking = False  # CLIENT TRACKING on (RESP3): pushes go to ``listener``
        self.listener: Callable[[list[bytes] | None], None] | None = None
        self.last_data = time.monotonic()  # last time anything arrived

    # -- asyncio.Protocol ------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.fail(rex.ConnectionError(f"Connection closed by server ({exc or 'EOF'})"))

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data if self.buf else data
        pos, end = 0, len(buf)
        self.progress = self.last_data = time.monotonic()
        try:
            while pos < end:
                if buf[pos] == 36:  # $ bulk string: the hot path, inline
                    nl = buf.find(b"\r\n", pos)
                    if nl < 0:
                        break
                    length = int(buf[pos + 1 : nl])
                    if length < 0:
                        value: Any = None
                        nxt = nl + 2
                    else:
                        nxt = nl + 4 + length
                        if nxt > end:
                            break
                        value = buf[nl + 2 : nl + 2 + length]
                elif buf[pos] == 62:  # > push (RESP3): client-side-caching invalidation
                    try:
                        push, nxt = _parse(buf, pos)
                    except _Incomplete:
                        break
                    pos = nxt
                    self._push(push)
                    continue
                else:
                    try:
                        value, nxt = _parse(buf, pos)
                    except _Incomplete:
                        break
                pos = nxt
                self._deliver(value)
        except (ValueError, IndexError) as e:
            self.fail(rex.ConnectionError(f"Protocol error from Redis: {e}"))
            return
        self.buf = buf[pos:] if pos < end else b""

    def _push(self, push: Any) -> None:
        if not isinstance(push, list) or len(push) < 2 or push[0] != b"invalidate":
            return  # not ours (no other push is subscribed to)
        keys = push[1]
        if self.listener is not None:
            self.listener(list(keys) if isinstance(keys, list) else None)

    # -- calls -----------------------------------------------------------------------------------
    def _deliver(self, value: Any) -> None:
        if not self.waiting:
            raise ValueError("a reply nobody asked for")
        call = self.waiting[0]
        call.replies.append(value)
        if len(call.replies) == call.n:
            self.waiting.popleft()
            if call.hook is not None and self.tracking:
                # in stream order: before any invalidation that arrives after this reply
                call.hook(call.replies)
            if not call.future.done():
                call.future.set_result(call.replies)

    def send(self, payload: bytes, n: int, hook: Hook | None = None) -> asyncio.Future[list[Any]]:
        """Queue ``payload`` (``n`` commands): a future of their ``n`` replies, failed with
        :class:`redis.TimeoutError` if they are not all in within ``timeout`` seconds. ``hook``
        gets the replies the moment they are parsed (tracking connections only)."""
        if self.closed is not None:
            raise self.closed
        if len(self.waiting) >= MAX_WAITING:
            raise rex.ConnectionError(f"more than {MAX_WAITING} Redis calls waiting")
        future: asyncio.Future[list[Any]] = self.loop.create_future()
        now = time.monotonic()
        if not self.waiting:
            self.progress = now
        self.waiting.append(_Call(future, n, now + self.timeout, hook))
        if self.timer is None:  # one timer per connection, not one per call
            self.timer = self.loop.call_at(self.loop.time() + self.timeout, self._check_deadlines)
        if self.flush_scheduled:
            self.out.append(payload)
        elif self.transport is not None:
            # the first call of a loop iteration goes out at once (a lone request pays no extra
            # loop iteration); the ones after it in the same iteration are joined into one write
            self.transport.write(payload)
            self.flush_scheduled = True
            self.loop.call_soon(self._flush)
        return future

    def _flush(self) -> None:
        self.flush_scheduled = False
        if self.out and self.transport is not None and self.closed is None:
            data = self.out[0] if len(self.out) == 1 else b"".join(self.out)
            self.out.clear()
            self.transport.write(data)

    def _check_deadlines(self) -> None:
        """Fail the calls past their deadline (the oldest first: deadlines follow queue order);
        drop the connection if nothing has arrived for a whole timeout (like redis-py after a
        socket timeout); re-arm for the next deadline."""
        self.timer = None
        if self.closed is not None or not self.waiting:
            return
        now = time.monotonic()
        error = rex.TimeoutError(f"Timeout reading from {self.describe} ({self.timeout:g} s)")
        if now - self.progress >= self.timeout:
            self.fail(error)
            return
        nxt = None
        for call in self.waiting:
            if call.deadline > now:
                nxt = call.deadline
                break
            if not call.future.done():  # its slot stays: a late reply is matched and dropped
                call.future.set_exception(error)
        if nxt is None:
            nxt = now + self.timeout
        self.timer = self.loop.call_at(self.loop.time() + (nxt - now), self._check_deadlines)

    def fail(self, exc: BaseException) -> None:
        """Close the connection and fail every waiting call with ``exc``."""
        if self.closed is None:
            self.closed = exc
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.transport is not None:
            self.transport.abort()
        self.out.clear()
        if self.listener is not None:  # its invalidations may be lost: forget everything
            self.listener(None)
            self.listener = None
        while self.waiting:
            call = self.waiting.popleft()
            if not call.future.done():
                call.future.set_exception(exc)


class RespPipe:
    """``await pipe.call([("HGET", key, field), ...])`` -> the replies, on one shared connection.

    ``path`` (a unix socket) or ``host``/``port``; ``username``/``password`` (AUTH) and ``db``
    (SELECT) are sent when a connection opens. Bound to the event loop it is first used in.
    """

    def __init__(
        self,
        *,
        path: str | None = None,
        host: str = "localhost",
        port: int = 6379,
        username: str | None = None,
        password: str | None = None,
        db: int = 0,
        timeout: float = 1.0,
        connect_timeout: float = 0.5,
        tracking: bool = False,
    ) -> None:
        self.path, self.host, self.port = path, host, port
        # tracking: RESP3 + CLIENT TRACKING ON on every connection, invalidations to ``listener``
        self.tracking = tracking
        self.listener: Callable[[list[bytes] | None], None] | None = None
        self.username, self.password, self.db = username, password, int(db)
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self._conn: _Connection | None = None
        self._opening: asyncio.Future[_Connection] | None = None
        self.connections_opened = 0  # (tests)

    def describe(self) -> str:
        return f"unix socket {self.path}" if self.path else f"{self.host}:{self.port}"

    async def call(self, commands: Sequence[Sequence[bytes | str | int]]) -> list[Any]:
        """The replies of ``commands`` (one round trip, shared with concurrent calls). A Redis
        error reply raises :class:`redis.ResponseError`; a broken connection is retried once on a
        new one; no reply within ``timeout`` raises :class:`redis.TimeoutError`."""
        return await self.call_packed(pack(commands), len(commands))

    def tracked(self) -> bool:
        """True when the open connection tracks its reads and has shown life within one timeout:
        only then may rows read on it be served from a cache (serving.user_cache)."""
        conn = self._conn
        return (
            conn is not None
            and conn.closed is None
            and conn.tracking
            and time.monotonic() - conn.last_data < self.timeout
        )

    async def call_packed(self, payload: bytes, n: int, hook: Hook | None = None) -> list[Any]:
        """:meth:`call` for ``n`` commands already in RESP (``payload``); ``hook(replies)`` runs
        when they are parsed, in stream order, if the connection tracks its reads."""
        for attempt in (0, 1):
            conn = self._conn
            if conn is None or conn.closed is not None:
                conn = await self._connection()
            try:
                replies = await conn.send(payload, n, hook)
            except rex.ConnectionError:
                if attempt:
                    raise
                continue
            for r in replies:
                if isinstance(r, rex.ResponseError):
                    raise r
            return replies
        raise AssertionError("unreachable")  # pragma: no cover

    async def _connection(self) -> _Connection:
        opening = self._opening
        if opening is None or opening.done():
            opening = self._opening = asyncio.ensure_future(self._open())
        # shielded: one caller's cancellation (a client that went away) does not abort the others'
        return await asyncio.shield(opening)

    async def _open(self) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            if self.path is not None:
                coro = loop.create_unix_connection(lambda: _Connection(loop), self.path)
            else:
                coro = loop.create_connection(lambda: _Connection(loop), self.host, self.port)
            _, conn = await asyncio.wait_for(coro, self.connect_timeout)
        except (TimeoutError, OSError) as e:
            raise rex.ConnectionError(f"Error connecting to {self.describe()}: {e!r}") from None
        conn.timeout, conn.describe = self.timeout, self.describe()
        self.connections_opened += 1
        setup: list[tuple[bytes | str | int, ...]] = []
        if self.password is not None:
            auth: tuple[bytes | str | int, ...] = (self.password,)
            setup.append(("AUTH", self.username, *auth) if self.username else ("AUTH", *auth))
        if self.db:
            setup.append(("SELECT", self.db))
        if self.tracking:
            setup += [("HELLO", 3), ("CLIENT", "TRACKING", "ON")]
        if setup:
            try:
                replies = await conn.send(pack(setup), len(setup))
            except BaseException:
                conn.fail(rex.ConnectionError("connection setup failed"))
                raise
            for cmd, r in zip(setup, replies, strict=True):
                if isinstance(r, rex.ResponseError) and cmd[0] in ("HELLO", "CLIENT"):
                    break  # a server without RESP3 / tracking: no cache, the reads still work
                if isinstance(r, rex.ResponseError):
                    conn.fail(rex.ConnectionError(str(r)))
                    raise rex.AuthenticationError(str(r)) if cmd[0] == "AUTH" else r
            else:
                if self.tracking:
                    conn.listener = self.listener
                    conn.tracking = True
        old, self._conn = self._conn, conn
        if old is not None and old is not conn:
            old.fail(rex.ConnectionError("replaced by a new connection"))
        return conn

    async def aclose(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.fail(rex.ConnectionError("client closed"))


def pipe_for(
    client: Any, *, timeout: float, connect_timeout: float, tracking: bool = False
) -> RespPipe | None:
    """A :class:`RespPipe` to the server of the synchronous redis-py ``client`` (same socket or
    host/port, credentials and database), or None when it needs what the pipe does not do (TLS, a
    credential provider, RESP3, Cluster)."""
    import redis

    pool = getattr(client, "connection_pool", None)
    if pool is None or type(client) is not redis.Redis:
        return None
    kw = dict(pool.connection_kwargs)
    cls = pool.connection_class
    if kw.get("credential_provider") is not None or kw.get("protocol") not in (None, 2, "2"):
        return None
    common: dict[str, Any] = {
        "username": kw.get("username"),
        "password": kw.get("password"),
        "db": int(kw.get("db") or 0),
        "timeout": timeout,
        "connect_timeout": connect_timeout,
        "tracking": tracking,
    }
    if cls is redis.UnixDomainSocketConnection and kw.get("path"):
        return RespPipe(path=str(kw["path"]), **common)
    if cls is redis.Connection:
        return RespPipe(
            host=str(kw.get("host", "localhost")), port=int(kw.get("port", 6379)), **common
        )
    return None
