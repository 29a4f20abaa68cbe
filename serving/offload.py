"""Blocking work (Redis round trips, ONNX runs, onboarding fits) off the event loop, bounded.

:class:`Offload` runs a synchronous call in a worker thread of a pool of ``threads`` workers
(anyio's thread pool with a limiter of its own). A request that finds every worker busy waits at most
``queue_timeout`` seconds for one, then fails with :class:`BusyError` (HTTP 503): with Redis paused,
requests fail within their timeout side by side, instead of one after another, and the event loop
keeps answering ``/healthz`` and ``/metrics``, which need no worker.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import anyio
import anyio.to_thread
from lrs_rec.serving.recommender import StoreUnavailableError

T = TypeVar("T")

DEFAULT_THREADS = 32


class BusyError(StoreUnavailableError):
    """Every worker thread stayed busy for the whole queue timeout (HTTP 503, retry later)."""


class Offload:
    """``await offload(fn, *args)``: ``fn(*args)`` in one of ``threads`` worker threads."""

    def __init__(self, threads: int = DEFAULT_THREADS, queue_timeout: float = 1.0) -> None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        self.threads = threads
        self.queue_timeout = queue_timeout
        self._admit: anyio.CapacityLimiter | None = None
        self._pool: anyio.CapacityLimiter | None = None

    def _limiters(self) -> tuple[anyio.CapacityLimiter, anyio.CapacityLimiter]:
        # created on first use, inside the event loop that serves the app
        if self._admit is None or self._pool is None:
            self._admit = anyio.CapacityLimiter(self.threads)
            # the thread pool's own limiter: never the bottleneck (admission holds a token first)
            self._pool = anyio.CapacityLimiter(self.threads)
        return self._admit, self._pool

    @property
    def busy(self) -> int:
        """Worker threads in use now."""
        return 0 if self._admit is None else int(self._admit.borrowed_tokens)

    async def __call__(self, fn: Callable[..., T], *args: Any) -> T:
        admit, pool = self._limiters()
        with anyio.move_on_after(self.queue_timeout) as scope:
            await admit.acquire()
        if scope.cancelled_caught:
            raise BusyError(
                f"server busy: all {self.threads} worker threads stayed in use for "
                f"{self.queue_timeout:g} s (is Redis slow?)"
            )
        try:
            return await anyio.to_thread.run_sync(fn, *args, limiter=pool)
        finally:
            admit.release()
