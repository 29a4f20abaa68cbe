"""The settings of ``lrs-rec serve``'s bounded resources (enforced by :mod:`lrs_rec.serving.guards`).

Kept apart from ``guards`` (which needs uvicorn, h11 and anyio) so that building the CLI's parser
imports no serving dependency: ``lrs-rec train`` works on a host without the ``serve`` extra."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ServeLimits:
    header_timeout: float = 10.0  # s to send a complete request header
    body_timeout: float = 10.0  # s from the header to the end of the body
    keep_alive_timeout: float = 5.0  # s an idle keep-alive connection stays open
    max_connections: int = 1000  # open connections; beyond: 503 and close
    max_concurrency: int = 256  # requests in flight; beyond: 503
    threads: int = 32  # worker threads for Redis / ONNX / onboarding work (serving.offload)
    user_cache: int = 100_000  # users whose Redis rows recommend keeps (serving.user_cache); 0: off
