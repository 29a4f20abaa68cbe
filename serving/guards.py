"""Bounded resources for ``lrs-rec serve``: connections, request timeouts, in-flight requests, logs.

* :class:`ServeLimits` — the settings (``lrs-rec serve`` flags, defaults below).
* :class:`GuardedH11Protocol` — uvicorn's h11 protocol plus a *header timeout* (a connection that
  has not sent a complete request header ``header_timeout`` seconds after it opened, or after its
  previous response, is closed: 408 if it sent part of one) and a *connection limit* (beyond
  ``max_connections`` open connections a new one is answered 503 and closed at once, so idle or
  slow clients cannot exhaust the process's file descriptors and lock everyone out).
* :class:`RequestGuardMiddleware` — ASGI: a request body not complete ``body_timeout`` seconds after
  its header is answered 408 and the connection closed (a body shorter than its Content-Length no
  longer waits for ever); a request with both Content-Length and Transfer-Encoding is refused with
  400 (request smuggling); beyond ``max_concurrency`` requests in flight a new one gets 503 at once
  (``/healthz`` is exempt).
* :class:`RateLimitFilter` — at most one log line per (logger, message template) every
  ``interval`` seconds, the next one saying how many were suppressed (no 90 MB of identical
  "Too many open files" tracebacks).
"""

from __future__ import annotations

import logging
import resource
import threading
import time
from typing import Any, ClassVar

import anyio
import h11
from lrs_rec.serving.metrics import ASGIApp, Message, Receive, Scope, Send
from lrs_rec.serving.serve_limits import ServeLimits as ServeLimits  # re-exported
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger(__name__)


def raise_fd_limit(needed: int) -> int:
    """Raise the soft RLIMIT_NOFILE towards ``needed`` (within the hard limit); the soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    if soft != resource.RLIM_INFINITY and soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            soft = want
        except (ValueError, OSError):
            pass
    return int(soft)


def fit_to_fd_limit(limits: ServeLimits, reserve: int = 64) -> ServeLimits:
    """``limits`` with ``max_connections`` lowered, with a warning, if the process may not open
    that many files (plus ``reserve`` for Redis, the model, logs)."""
    soft = raise_fd_limit(limits.max_connections + reserve)
    if limits.max_connections + reserve > soft:
        allowed = max(1, soft - reserve)
        log.warning(
            "--max-connections %d exceeds the open-file limit %d (ulimit -n) minus %d: using %d",
            limits.max_connections,
            soft,
            reserve,
            allowed,
        )
        return ServeLimits(**{**limits.__dict__, "max_connections": allowed})
    return limits


def _raw_response(status: int, reason: str, message: str) -> bytes:
    body = b'{"error":"%s"}' % message.encode()
    return (
        b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\nconnection: close\r\n"
        b"content-length: %d\r\n\r\n%s" % (status, reason.encode(), len(body), body)
    )


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a header timeout and a connection limit (:class:`ServeLimits`,
    set once per process through :meth:`configure`)."""

    limits: ClassVar[ServeLimits] = ServeLimits()
    refused: ClassVar[int] = 0  # connections refused over the limit (tests, logs)
    timed_out: ClassVar[int] = 0  # connections closed by the header timeout

    @classmethod
    def configure(cls, limits: ServeLimits) -> None:
        cls.limits = limits

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_timer: Any = None
        self._armed_cycle: Any = None
        self._refused = False

    def connection_made(self, transport: Any) -> None:
        if len(self.connections) >= self.limits.max_connections:
            self._refused = True
            self.transport = transport
            type(self).refused += 1
            log.warning(
                "connection refused: %d connections open (--max-connections %d)",
                len(self.connections),
                self.limits.max_connections,
            )
            transport.write(
                _raw_response(503, "Service Unavailable", "too many open connections; retry later")
            )
            transport.close()
            return
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        super().data_received(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None
        if self._refused:
            return
        super().connection_lost(exc)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm()

    def _arm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
        self._armed_cycle = self.cycle
        self._header_timer = self.loop.call_later(self.limits.header_timeout, self._on_timeout)

    def _on_timeout(self) -> None:
        self._header_timer = None
        if self.transport.is_closing():
            return
        cycle = self.cycle
        if cycle is not self._armed_cycle or (cycle is not None and not cycle.response_complete):
            return  # a request header arrived in time (its body has its own timeout)
        partial = bool(self.conn.trailing_data[0])
        type(self).timed_out += 1
        if partial:
            log.warning(
                "closed a connection that sent no complete request header in %g s",
                self.limits.header_timeout,
            )
            self.transport.write(
                _raw_response(408, "Request Timeout", "request header not received in time")
            )
        try:
            self.conn.send(h11.ConnectionClosed())
        except h11.LocalProtocolError:
            pass
        self.transport.close()


class _BodyTimeout(Exception):
    pass


class InFlight:
    """Requests being served (counted ones: every route but the guard's exempt ones)."""

    __slots__ = ("n",)

    def __init__(self) -> None:
        self.n = 0


class RequestGuardMiddleware:
    """Body timeout (408), Content-Length + Transfer-Encoding (400), in-flight limit (503)."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        body_timeout: float,
        max_concurrency: int,
        exempt: frozenset[str] = frozenset({"/healthz"}),
        counter: InFlight | None = None,
    ) -> None:
        self.app = app
        self.body_timeout = body_timeout
        self.max_concurrency = max_concurrency
        self.exempt = exempt
        # shared with the app's fast lane (serving.fast_lane), which counts its requests in it
        self.counter = counter if counter is not None else InFlight()

    @property
    def in_flight(self) -> int:
        return self.counter.n

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        names = {name for name, _ in scope.get("headers", [])}
        if b"content-length" in names and b"transfer-encoding" in names:
            await _reject(
                send,
                400,
                "a request may not have both Content-Length and Transfer-Encoding",
            )
            return
        counted = scope.get("path") not in self.exempt
        if counted and self.in_flight >= self.max_concurrency:
            log.warning("request refused: %d requests in flight", self.in_flight)
            await _reject(
                send,
                503,
                f"server busy: {self.in_flight} requests in flight (limit {self.max_concurrency})",
                close=False,
            )
            return
        deadline = anyio.current_time() + self.body_timeout
        body_done = False
        started = False

        async def guarded_receive() -> Message:
            nonlocal body_done
            if body_done:  # after the body: e.g. waiting for a disconnect, no deadline
                return await receive()
            try:
                with anyio.fail_after(max(0.0, deadline - anyio.current_time())):
                    message = await receive()
            except TimeoutError:
                raise _BodyTimeout from None
            if message["type"] != "http.request" or not message.get("more_body", False):
                body_done = True
            return message

        async def tracked_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        if counted:
            self.counter.n += 1
        try:
            await self.app(scope, guarded_receive, tracked_send)
        except _BodyTimeout:
            if started:
                raise
            log.warning("request body not received within %g s: 408", self.body_timeout)
            await _reject(send, 408, f"request body not received within {self.body_timeout:g} s")
        finally:
            if counted:
                self.counter.n -= 1


async def _reject(send: Send, status: int, message: str, *, close: bool = True) -> None:
    import json

    body = json.dumps({"error": message}).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
    ]
    if close:
        headers.append((b"connection", b"close"))
    if status == 503:
        headers.append((b"retry-after", b"1"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class RateLimitFilter(logging.Filter):
    """Let through at most one record per (logger, message template, level) every ``interval``
    seconds; the first one after a quiet spell says how many were suppressed. Tracebacks of a
    repeated record are dropped with it."""

    def __init__(self, interval: float = 10.0, max_keys: int = 1024) -> None:
        super().__init__()
        self.interval = interval
        self.max_keys = max_keys
        self._seen: dict[tuple[str, str, int], tuple[float, int]] = {}
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, str(record.msg), record.levelno)
        now = time.monotonic()
        with self._lock:
            last = self._seen.get(key)
            if last is not None and now - last[0] < self.interval:
                self._seen[key] = (last[0], last[1] + 1)
                return False
            if last is None and len(self._seen) >= self.max_keys:
                self._seen.clear()  # bounded memory: forget everything
            self._seen[key] = (now, 0)
        if last is not None and last[1]:
            record.msg = f"{record.msg} [{last[1]} similar messages suppressed]"
        return True


def log_config(level: str) -> dict[str, Any]:
    """uvicorn's logging configuration (``log_config=``) with :class:`RateLimitFilter` on every
    handler and a root handler, so asyncio's and lrs-rec's records are rate-limited too."""
    from uvicorn.config import LOGGING_CONFIG

    cfg: dict[str, Any] = {
        **LOGGING_CONFIG,
        "filters": {"rate_limit": {"()": "lrs_rec.serving.guards.RateLimitFilter"}},
        "handlers": {
            k: {**v, "filters": ["rate_limit"]} for k, v in LOGGING_CONFIG["handlers"].items()
        },
        "loggers": dict(LOGGING_CONFIG["loggers"]),
    }
    # uvicorn's loggers keep their handlers (and do not propagate); everything else (asyncio's
    # accept errors, lrs-rec's own) goes through the same rate-limited handler
    cfg["root"] = {"handlers": ["default"], "level": level.upper()}
    return cfg
