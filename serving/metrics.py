"""Prometheus metrics of the HTTP service: request counts and latency histograms by route and
outcome, on a registry of its own per app (so several apps in one process don't collide)."""

from __future__ import annotations

import functools
import re
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

LATENCY_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
)


def outcome_of(status: int) -> str:
    if status < 400:
        return "ok"
    if status < 500:
        return "client_error"
    if status == 503:
        return "unavailable"
    return "server_error"


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "lrs_http_requests_total",
            "HTTP requests by route, method and outcome",
            ["route", "method", "outcome"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "lrs_http_request_duration_seconds",
            "HTTP request latency by route and outcome",
            ["route", "outcome"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.personalized = Counter(
            "lrs_personalized_responses_total",
            "score/recommend responses by whether the user had a stored record",
            ["route", "personalized"],
            registry=self.registry,
        )
        self.ready = Gauge(
            "lrs_ready", "1 when the last /readyz check passed", registry=self.registry
        )

    def watch_user_cache(self, cache: Any) -> None:
        """Expose ``cache``'s counters (serving.user_cache), read at scrape time: no per-request
        cost. ``lrs_user_cache_lookups_total{result="hit|miss"}``, ``lrs_user_cache_entries``,
        ``lrs_user_cache_invalidated_total``."""
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        class _Collector:
            def collect(self) -> Any:
                lookups = CounterMetricFamily(
                    "lrs_user_cache_lookups",
                    "recommend's lookups of users' Redis rows in the process cache",
                    labels=["result"],
                )
                lookups.add_metric(["hit"], cache.hits)
                lookups.add_metric(["miss"], cache.misses)
                yield lookups
                yield CounterMetricFamily(
                    "lrs_user_cache_invalidated",
                    "cached users dropped on Redis's invalidation messages",
                    value=cache.invalidations,
                )
                yield GaugeMetricFamily(
                    "lrs_user_cache_entries", "users in the process cache", value=len(cache)
                )

        self.registry.register(_Collector())

    def render(self) -> bytes:
        return generate_latest(self.registry)


class MetricsMiddleware:
    """Pure ASGI middleware: times every HTTP request; unknown paths are labelled ``other``."""

    def __init__(self, app: ASGIApp, metrics: Metrics, routes: set[str]) -> None:
        self.app = app
        self.metrics = metrics
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            path = scope.get("path", "")
            route = path if path in self.routes else _templated(path, self.routes)
            outcome = outcome_of(status)
            self.metrics.requests.labels(
                route, method_label(scope.get("method", "")), outcome
            ).inc()
            self.metrics.latency.labels(route, outcome).observe(time.perf_counter() - start)


METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})


def method_label(method: str) -> str:
    """The ``method`` label: a standard method, else ``other`` (a client chooses the method: any
    other text would grow the label set, and /metrics with it, without bound)."""
    return method if method in METHODS else "other"


def _templated(path: str, routes: set[str]) -> str:
    """The route template (``/v1/users/{user_id}/ratings``) a concrete path matches, else
    ``other`` — so per-user paths do not become per-user metric labels. A placeholder matches any
    non-empty text, "/" and newlines included (user ids may contain "/", sent as ``%2F``)."""
    for route in sorted(routes, key=len, reverse=True):  # the longest first: "/{id}/ratings"
        if "{" in route and _template_regex(route).fullmatch(path):
            return route
    return "other"


@functools.lru_cache(maxsize=16)
def _template_regex(route: str) -> re.Pattern[str]:
    return re.compile(
        "".join(
            r"[\s\S]+" if part.startswith("{") else re.escape(part)
            for part in re.split(r"(\{[^}]*\})", route)
        )
    )
