"""A lean ASGI path for the hot routes (``POST /v1/recommend``, ``POST /v1/score``) in front of FastAPI.

Profiled in-process (docs/serving.md, "fast lane"), a recommendation spent about as much CPU in the
framework as in its own work: the middleware stack (metrics, guards, body limit — each a closure
wrapping ``receive``/``send``, the body timeout an anyio cancel scope per ``receive``), Starlette's
exception middleware and routing, FastAPI's dependency solving and ``Request.body()``, and the
Response object. :class:`FastLane` serves a request of exactly the right method and path itself,
with the same checks written out flat:

* the guards (:mod:`serving.guards`): the same in-flight counter (:class:`InFlight`, shared with
  :class:`~lrs_rec.serving.guards.RequestGuardMiddleware`) and limit, the body read under one
  ``asyncio.timeout_at`` with the guard's deadline (408, logged and closed the same way);
* the body limit of ``BodyLimitMiddleware`` (by Content-Length and while reading);
* the bearer-token check of :func:`serving.auth.guard` (same header parsing, same scope rule);
* the metrics of ``MetricsMiddleware`` (request count and latency, the same closed labels);
* the route's own work through a handler of ``serving.app`` that answers pre-rendered bytes.

Anything unusual is not answered here: the request goes, with the body bytes already read replayed,
to the whole FastAPI application — the unchanged route, its slow reference twin — which gives the
exact same 4xx/5xx: Transfer-Encoding (400 with Content-Length; chunked bodies), a missing, repeated
or oversized Content-Length (413), missing or insufficient credentials (401/403), the in-flight
limit reached (503), a body over the limit or a disconnect while reading, any body the handler does
not accept as plainly valid (422 and its message), and any exception the handler does not map
itself (the route answers, and logs, it). A fallback is counted once, by the reference path: the
lane has touched neither the counter nor the metrics by then. The tests compare both paths on
valid and invalid requests (tests/test_serving_fast_lane.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from lrs_rec.serving.guards import InFlight, _reject
from lrs_rec.serving.metrics import ASGIApp, Message, Metrics, Receive, Scope, Send, outcome_of

log = logging.getLogger(
    "lrs_rec.serving.guards"
)  # the guard's 408 log line, from the guard's logger

# status, raw headers, body — or None: "not plainly valid, let the reference route answer"
Answer = tuple[int, list[tuple[bytes, bytes]], bytes]
Handler = Callable[[bytes], Awaitable[Answer | None]]


class _BodyTimeout(Exception):
    pass


class FastLane:
    """One route (``method``, ``path``) served by ``handler``; ``full`` is the whole application
    (the reference path every fallback goes to)."""

    def __init__(
        self,
        full: ASGIApp,
        handler: Handler,
        *,
        method: str,
        route: str,
        metrics: Metrics,
        in_flight: InFlight,
        max_concurrency: int,
        body_timeout: float,
        max_body_bytes: int,
        authorize: Callable[[bytes], bool] | None,
    ) -> None:
        self.full = full
        self.handler = handler
        self.method = method
        self.route = route
        self.metrics = metrics
        self.in_flight = in_flight
        self.max_concurrency = max_concurrency
        self.body_timeout = body_timeout
        self.limit = max_body_bytes
        self.authorize = authorize
        self._children: dict[int, tuple[Any, Any]] = {}
        self.answered = 0  # requests the lane answered itself (tests)
        self.fallbacks = 0  # requests it handed to the reference path

    def _plain(self, scope: Scope) -> bool:
        """Headers the lane answers as the reference path would: one Content-Length within the
        limit, no Transfer-Encoding, valid credentials of the route's scope (with API keys), and
        room under the in-flight limit."""
        length: bytes | None = None
        auth: bytes | None = None
        for name, value in scope["headers"]:
            if name == b"content-length":
                if length is not None:
                    return False
                length = value
            elif name == b"transfer-encoding":
                return False
            elif name == b"authorization" and auth is None:
                auth = value
        if length is None or not length.isdigit() or int(length) > self.limit:
            return False
        if self.authorize is not None and (auth is None or not self.authorize(auth)):
            return False
        return self.in_flight.n < self.max_concurrency

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not self._plain(scope):
            self.fallbacks += 1
            await self.full(scope, receive, send)
            return
        read: list[Message] = []
        answer: Answer | None = None
        status = 500
        counted = True
        start = time.perf_counter()
        self.in_flight.n += 1
        try:
            try:
                body = await self._body(receive, read)
                if body is not None:
                    answer = await self.handler(body)
            except _BodyTimeout:
                log.warning("request body not received within %g s: 408", self.body_timeout)
                status = 408
                self.answered += 1
                await _reject_timeout(send, self.body_timeout)
                return
            except Exception:
                answer = None  # the reference path answers (and logs) whatever this was
            if answer is None:
                counted = False
            else:
                status = answer[0]
                await send({"type": "http.response.start", "status": status, "headers": answer[1]})
                await send({"type": "http.response.body", "body": answer[2]})
        finally:
            self.in_flight.n -= 1
            if counted:
                self._observe(status, start)
        if answer is None:
            self.fallbacks += 1
            await self.full(scope, _replay(read, receive), send)
        else:
            self.answered += 1

    async def _body(self, receive: Receive, read: list[Message]) -> bytes | None:
        """The request body (None: not within the limit, or the client went away), read within
        the guard's body timeout; every message read is kept in ``read`` for a fallback."""
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout_at(loop.time() + self.body_timeout):
                message = await receive()
                read.append(message)
                if message["type"] != "http.request":
                    return None
                body: bytes = message.get("body", b"")
                if not message.get("more_body", False):
                    return body if len(body) <= self.limit else None
                chunks = [body]
                seen = len(body)
                while True:
                    message = await receive()
                    read.append(message)
                    if message["type"] != "http.request":
                        return None
                    chunk = message.get("body", b"")
                    seen += len(chunk)
                    if seen > self.limit:
                        return None
                    chunks.append(chunk)
                    if not message.get("more_body", False):
                        return b"".join(chunks)
        except TimeoutError:
            raise _BodyTimeout from None

    def _observe(self, status: int, start: float) -> None:
        children = self._children.get(status)
        if children is None:
            outcome = outcome_of(status)
            children = self._children[status] = (
                self.metrics.requests.labels(self.route, self.method, outcome),
                self.metrics.latency.labels(self.route, outcome),
            )
        children[0].inc()
        children[1].observe(time.perf_counter() - start)


def _replay(read: list[Message], receive: Receive) -> Receive:
    """``receive`` giving the messages the lane already read first."""
    pending = list(read)

    async def replay() -> Message:
        if pending:
            return pending.pop(0)
        return await receive()

    return replay


async def _reject_timeout(send: Send, body_timeout: float) -> None:
    await _reject(send, 408, f"request body not received within {body_timeout:g} s")


def bearer_check(keyring: Any, scope: str) -> Callable[[bytes], bool]:
    """True for an ``Authorization`` header value the route dependency of
    :func:`serving.auth.guard` lets through (FastAPI's ``HTTPBearer`` parsing: scheme, one space,
    the stripped credentials; then :meth:`KeyRing.authenticate` of the stripped secret and the
    scope rule); False for anything it would refuse (the reference path then answers 401/403)."""

    def check(value: bytes) -> bool:
        text = value.decode("latin-1")
        scheme, _, credentials = text.partition(" ")
        credentials = credentials.strip()
        if not (text and scheme and credentials) or scheme.lower() != "bearer":
            return False
        key = keyring.authenticate(credentials)
        return key is not None and bool(key.allows(scope))

    return check
