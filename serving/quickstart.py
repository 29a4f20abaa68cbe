"""``lrs-rec quickstart``: the whole path on built-in sample data, in seconds.

generate sample ratings (training.sample_data) -> train -> export ONNX -> publish to an embedded
Redis of its own under LRS_HOME/quickstart -> start the HTTP service on 127.0.0.1 -> show recommendations and scores over
HTTP -> stop (``--serve`` keeps the service running until Ctrl-C).
"""

from __future__ import annotations

import argparse
import json
import secrets
import signal
import socket
import sys
import threading
import time
from typing import Any

from lrs_rec.cli_types import int_in


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--users", type=int_in(10), default=1000, help="sample users (default %(default)s)"
    )
    p.add_argument(
        "--items", type=int_in(10), default=400, help="sample items (default %(default)s)"
    )
    p.add_argument("--seed", type=int_in(0), default=0, help="random seed of the sample data")
    p.add_argument(
        "--home",
        default=None,
        help="data directory (default $LRS_HOME, else the per-user data directory); everything goes under "
        "HOME/quickstart (sample data, model, and a separate embedded Redis), so the demo "
        "never touches the models you published to HOME",
    )
    p.add_argument("--host", default="127.0.0.1", help="bind address of the service")
    p.add_argument(
        "--port",
        type=int_in(0, 65535),
        default=0,
        help="port of the service (default 0: a free one)",
    )
    p.add_argument(
        "--serve",
        action="store_true",
        help="keep serving after the demo (until Ctrl-C) instead of exiting",
    )
    p.add_argument(
        "--allow-unauthenticated",
        action="store_true",
        help="listen on a non-loopback --host anyway (the demo has no API keys; warns)",
    )


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _say(step: str, t0: float) -> None:
    print(f"[{time.perf_counter() - t0:5.1f}s] {step}", flush=True)


def run(args: argparse.Namespace) -> int:
    import httpx
    import numpy as np
    import uvicorn
    from lrs_rec.serving.app import create_app
    from lrs_rec.serving.auth import check_bind, check_port
    from lrs_rec.serving.connection import connect, lrs_home
    from lrs_rec.serving.recommender import Recommender
    from lrs_rec.serving.store import RedisStore
    from lrs_rec.training.config import TrainConfig
    from lrs_rec.training.export import export_model_dir
    from lrs_rec.training.loaders import load_ratings
    from lrs_rec.training.pipeline import train
    from lrs_rec.training.sample_data import make_sample_ratings, write_sample_ratings

    from lrs_rec.model_dir import save_model_dir

    # the demo service has no API keys: the bind rule of `serve` (serving.auth)
    warning = check_bind(
        args.host,
        authenticated=False,
        allow_unauthenticated=args.allow_unauthenticated,
        command="quickstart",
        remedy="the demo has no API keys: keep it on 127.0.0.1 (or, on a trusted network only, "
        "pass --allow-unauthenticated); `lrs-rec serve --api-keys FILE` serves with keys",
    )
    if warning:
        print(warning, file=sys.stderr, flush=True)
    if args.port:  # before the training and publishing (0: a free port, found later)
        check_port(args.host, args.port)
    t0 = time.perf_counter()
    home = lrs_home(args.home).resolve()
    work = home / "quickstart"
    rows = make_sample_ratings(args.users, args.items, random_state=args.seed)
    csv_path = write_sample_ratings(work / "sample_ratings.csv", rows)
    _say(
        f"generated {len(rows)} sample ratings of {args.users} users x {args.items} items "
        f"-> {csv_path}",
        t0,
    )

    table = load_ratings(csv_path)
    cfg = TrainConfig(seed=args.seed)
    result = train(table, cfg, progress=False)
    model_dir = work / "model"
    model = save_model_dir(result.model, model_dir)
    metrics = model.manifest.get("metrics", {})
    _say(
        f"trained AMHT-LRS (d={model.lrs.d}, r={model.lrs.rank}, k={model.lrs.sparsity}): "
        f"train RMSE {metrics.get('train_rmse')}, val RMSE {metrics.get('val_rmse')} "
        f"-> {model_dir}",
        t0,
    )
    export_model_dir(model_dir)
    _say(f"exported the shared weights -> {model_dir / 'model.onnx'}", t0)

    # the demo's own embedded Redis under HOME/quickstart: publishing, switching and pruning
    # there cannot touch the versions a user published to HOME's store
    handle = connect(None, home=work, socket_timeout=30.0, connect_timeout=5.0)
    store = RedisStore(handle)
    meta = store.publish(model, model_dir=str(model_dir))
    pruned = store.prune(keep=2)
    _say(
        f"published {meta.n_users} users ({meta.record_format.size}-byte "
        f"{meta.record_format.precision} records) as store version {meta.version} to "
        f"{handle.describe()}" + (f"; deleted old versions {pruned}" if pruned else ""),
        t0,
    )

    rec = Recommender(model_dir, home=work)
    app = create_app(rec)
    port = args.port or _free_port(args.host)
    # log_config=None: an in-process server must not reconfigure (and close) the host's logging
    config = uvicorn.Config(
        app, host=args.host, port=port, log_level="warning", access_log=False, log_config=None
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://{args.host}:{port}"
    deadline = time.monotonic() + 20
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            print("lrs-rec quickstart: error: the HTTP service did not start", file=sys.stderr)
            return 1
        time.sleep(0.02)
    _say(f"serving on {base}", t0)

    def show(method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        r = httpx.request(method, base + path, json=body, timeout=10)
        payload: dict[str, Any] = r.json()
        shown = json.dumps(body) if body is not None else ""
        print(
            f"\n$ curl -X {method} {base}{path}"
            + (f" -H 'content-type: application/json' -d '{shown}'" if body else "")
        )
        print(f"{r.status_code} {json.dumps(payload)[:600]}")
        return payload

    try:
        counts = np.diff(model.history_indptr)
        order = np.argsort(counts, kind="stable")
        heavy = model.user_ids[int(order[int(0.9 * (order.size - 1))])]  # 90th percentile
        light = model.user_ids[int(order[0])]  # a user with only a handful of ratings
        show("GET", "/readyz")
        show("GET", "/v1/model")
        top = show("POST", "/v1/recommend", {"user_id": heavy, "n": 5, "exclude_rated": True})
        show("POST", "/v1/recommend", {"user_id": light, "n": 5})
        newcomer = f"new-user-{secrets.token_hex(3)}"  # fresh id: reruns share the store
        show("POST", "/v1/recommend", {"user_id": newcomer, "n": 5})
        # few-shot onboarding: three ratings, fitted with U frozen, stored, served at once
        seen_items, seen_ratings = model.user_history(0)
        body = {
            "ratings": [
                {"item_id": model.item_ids[int(j)], "rating": float(r)}
                for j, r in zip(seen_items[:3], seen_ratings[:3], strict=True)
            ]
        }
        show("PUT", f"/v1/users/{newcomer}/ratings", body)
        show("POST", "/v1/recommend", {"user_id": newcomer, "n": 5})
        items = [it["item_id"] for it in top.get("items", [])[:2]] + [model.item_ids[0]]
        show("POST", "/v1/score", {"user_id": heavy, "item_ids": items})
        show("POST", "/v1/score", {"user_id": heavy, "item_ids": ["no-such-item"]})
        print()
        _say("done" + ("" if args.serve else " (use --serve to keep the service running)"), t0)
        if args.serve:
            print(f"serving on {base} — Ctrl-C to stop", flush=True)
            # uvicorn runs in a thread here and installs no signal handlers: make SIGTERM exit
            # through the clean-up below (and atexit, which stops the embedded Redis) like Ctrl-C
            signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
            while thread.is_alive():
                thread.join(0.5)
    finally:
        server.should_exit = True
        thread.join(10)
        rec.close()
        handle.close()
    return 0


if __name__ == "__main__":  # pragma: no cover
    from lrs_rec.serving.cli import main

    raise SystemExit(main(["quickstart", *sys.argv[1:]]))
