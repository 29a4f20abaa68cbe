"""Publish throughput and Redis bytes per user (issue 15: "single-process publish reaches at least
half the throughput of a bare pipelined bucketed HSET of the same bytes on the same server; rating
histories are stored compactly").

One fresh embedded Redis (the server ``lrs-rec publish`` starts: appendonly, appendfsync always),
one random model (``--users``, 1 682 items, d = 64, r = 8, k = 8, 20 ratings per user, the builder of
bench/serving_rss.py), then, interleaved ``--repeats`` times:

* ``publish``: ``RedisStore.publish`` of the loaded model (records + histories; no carry-over since
  nobody onboarded), timed end to end (encoding included) -> ``publish_users_per_s``;
* ``publish_dir``: what ``lrs-rec publish`` (``--engine local``) runs since the sharded model format:
  ``RedisStore.publish_blocks`` reading the model directory's Parquet shards one at a time (reading
  and decoding included) -> ``publish_dir_users_per_s``, ``publish_dir_vs_bare``;
* ``bare``: the same bytes (taken from the version just published, outside the timing) written with a
  plain redis-py pipeline of ``HSET key mapping`` per bucket, the same number of buckets per round
  trip, into other keys -> ``bare_hset_users_per_s``.

``--dask-workers N``: also once ``lrs-rec publish --engine dask`` through the library
(``publish_dask``, a LocalCluster of N processes, cluster start-up included) -> ``dask_publish_s``.

Memory: INFO ``used_memory`` before/after a publish without histories (parameters) and one with
(parameters + histories): ``params_bytes_per_user`` and ``history_bytes_per_user``, with the OBJECT
ENCODING of a history bucket. ``python bench/publish.py --json`` prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from serving_rss import build_model_dir


def log(*parts: Any) -> None:
    print(*parts, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else "")
    p.add_argument("--users", type=int, default=100_000)
    p.add_argument("--items", type=int, default=1682)
    p.add_argument("--d", type=int, default=64)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--sparsity", type=int, default=8)
    p.add_argument("--ratings", type=int, default=20, help="ratings per user")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument(
        "--legacy-history-encoding",
        action="store_true",
        help="the settings before issue 15: history hashes left in the hashtable encoding "
        "(hash-max-listpack-value 128, no raise for histories)",
    )
    p.add_argument(
        "--redis",
        default=None,
        metavar="URL",
        help="an external Redis instead of the embedded one (e.g. one without persistence)",
    )
    p.add_argument("--cli", action="store_true", help="also time `lrs-rec publish` end to end")
    p.add_argument(
        "--dask-workers",
        type=int,
        default=0,
        metavar="N",
        help="also time publish --engine dask with a LocalCluster of N worker processes",
    )
    p.add_argument(
        "--dask-scheduler-port", type=int, default=0, help="the LocalCluster's scheduler port"
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)

    from lrs_rec.serving.connection import connect
    from lrs_rec.serving.store import _PIPELINE_KEYS, RedisStore, user_block

    from lrs_rec.model_dir import load_model_dir, load_shared_model_dir
    from lrs_rec.model_shards import iter_user_shards

    with tempfile.TemporaryDirectory(prefix="lrs-pub-") as tmp:
        model_dir = Path(tmp) / "model"
        log(f"building a {args.users}-user model ...")
        build_model_dir(model_dir, args)
        model = load_model_dir(model_dir)
        home = Path(tmp) / "home"
        store = RedisStore(connect(args.redis, home=home))
        r = store.r
        if args.legacy_history_encoding:
            import lrs_rec.serving.store as store_mod

            store_mod.HISTORY_LISTPACK_VALUE = 0
            r.config_set("hash-max-ziplist-value", "128")
        elif args.redis:  # what docs/serving.md asks of an external server
            import lrs_rec.serving.store as store_mod

            r.config_set("hash-max-ziplist-value", str(store_mod.HISTORY_LISTPACK_VALUE))
        n = model.n_users

        # memory: parameters only, then parameters + histories
        base = store.used_memory()
        meta = store.publish(model, model_dir=str(model_dir), with_history=False, switch=False)
        params_mem = store.used_memory() - base
        store.delete_version(meta.version, force=True)
        base = store.used_memory()
        meta = store.publish(model, model_dir=str(model_dir), switch=False)
        both_mem = store.used_memory() - base
        enc_p = r.object("encoding", store.keys.params(meta.version, 0))
        enc_h = r.object("encoding", store.keys.history(meta.version, 0))
        buckets = [
            (
                r.hgetall(store.keys.params(meta.version, b)),
                r.hgetall(store.keys.history(meta.version, b)),
            )
            for b in range(meta.n_buckets)
        ]
        payload = sum(len(v) for p_, h in buckets for v in (*p_.values(), *h.values()))
        store.delete_version(meta.version, force=True)

        publish_s: list[float] = []
        publish_dir_s: list[float] = []
        bare_s: list[float] = []
        for rep in range(args.repeats):
            t0 = time.perf_counter()
            meta = store.publish(model, model_dir=str(model_dir), switch=False)
            publish_s.append(time.perf_counter() - t0)
            store.delete_version(meta.version, force=True)
            t0 = time.perf_counter()
            shared = load_shared_model_dir(model_dir)
            meta = store.publish_blocks(
                shared,
                (user_block(s) for s in iter_user_shards(model_dir, shared.manifest)),
                model_dir=str(model_dir),
                switch=False,
            )
            publish_dir_s.append(time.perf_counter() - t0)
            store.delete_version(meta.version, force=True)
            t0 = time.perf_counter()
            for start in range(0, len(buckets), _PIPELINE_KEYS):
                pipe = r.pipeline(transaction=False)
                for b in range(start, min(start + _PIPELINE_KEYS, len(buckets))):
                    p_, h = buckets[b]
                    pipe.hset(f"bare:{rep}:{{b{b}}}:p", mapping=p_)
                    pipe.hset(f"bare:{rep}:{{b{b}}}:h", mapping=h)
                pipe.execute()
            bare_s.append(time.perf_counter() - t0)
            r.delete(*[f"bare:{rep}:{{b{b}}}:{s}" for b in range(len(buckets)) for s in "ph"])
            log(
                f"repeat {rep}: publish {publish_s[-1]:.2f} s, from the shards "
                f"{publish_dir_s[-1]:.2f} s, bare HSET {bare_s[-1]:.2f} s"
            )
        dask_s = None
        if args.dask_workers:
            from lrs_rec.serving.publish_dask import publish_dask

            t0 = time.perf_counter()
            meta = publish_dask(
                store,
                model_dir,
                workers=args.dask_workers,
                switch=False,
                cluster_options={
                    "scheduler_port": args.dask_scheduler_port,
                    # the scheduler's HTTP server next to it (else it tries 8787)
                    "dashboard_address": f"127.0.0.1:{args.dask_scheduler_port + 1}"
                    if args.dask_scheduler_port
                    else ":0",
                },
            )
            dask_s = time.perf_counter() - t0
            store.delete_version(meta.version, force=True)
            log(f"publish --engine dask ({args.dask_workers} workers): {dask_s:.2f} s")
        cli_s = None
        if (
            args.cli
        ):  # `lrs-rec publish` end to end: interpreter start, imports, model load, publish
            env = {**os.environ, "LRS_HOME": str(home)}
            cmd = [
                sys.executable,
                "-m",
                "lrs_rec.serving.cli",
                "publish",
                "--model",
                str(model_dir),
            ]
            cmd += ["--no-switch", "--json"] + (["--redis", args.redis] if args.redis else [])
            t0 = time.perf_counter()
            subprocess.run(cmd, check=True, env=env, capture_output=True)
            cli_s = time.perf_counter() - t0
            log(f"lrs-rec publish (CLI): {cli_s:.2f} s")
        pub = n / statistics.median(publish_s)
        pub_dir = n / statistics.median(publish_dir_s)
        bare = n / statistics.median(bare_s)
        report = {
            "bench": "publish",
            "users": n,
            "items": args.items,
            "d": args.d,
            "rank": args.rank,
            "sparsity": args.sparsity,
            "ratings_per_user": args.ratings,
            "bucket_size": meta.bucket_size,
            "buckets_per_round_trip": _PIPELINE_KEYS,
            "payload_bytes_per_user": round(payload / n, 1),
            "publish_s": [round(x, 3) for x in publish_s],
            "bare_hset_s": [round(x, 3) for x in bare_s],
            "publish_users_per_s": round(pub),
            "bare_hset_users_per_s": round(bare),
            "publish_vs_bare": round(pub / bare, 3),
            "publish_vs_bare_target": 0.5,
            "publish_dir_s": [round(x, 3) for x in publish_dir_s],
            "publish_dir_users_per_s": round(pub_dir),
            "publish_dir_vs_bare": round(pub_dir / bare, 3),
            "user_shards": len(list((model_dir / "users").glob("part-*.parquet"))),
            "dask_workers": args.dask_workers or None,
            "dask_publish_s": None if dask_s is None else round(dask_s, 2),
            "dask_publish_users_per_s": None if dask_s is None else round(n / dask_s),
            "cli_publish_s": None if cli_s is None else round(cli_s, 2),
            "cli_publish_users_per_s": None if cli_s is None else round(n / cli_s),
            "params_bytes_per_user": round(params_mem / n, 1),
            "history_bytes_per_user": round((both_mem - params_mem) / n, 1),
            "params_encoding": enc_p.decode() if isinstance(enc_p, bytes) else enc_p,
            "history_encoding": enc_h.decode() if isinstance(enc_h, bytes) else enc_h,
            "legacy_history_encoding": args.legacy_history_encoding,
            "redis": "embedded (appendonly yes, appendfsync always)"
            if not args.redis
            else args.redis,
            "redis_version": r.info("server").get("redis_version"),
            "cpu_count": os.cpu_count(),
            "note": "measured under shared load (other jobs on the same 2 cores)",
        }
        store.handle.close()
        if not args.redis:  # stop the embedded server before its directory goes away
            from lrs_rec.serving.connection import release_embedded

            release_embedded(home, grace=0.0)
    print(json.dumps(report, indent=None if args.json else 2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
