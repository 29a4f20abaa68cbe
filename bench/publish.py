"""Publish throughput and Redis bytes per user (issue 15: "single-process publish reaches at least
half the throughput of a bare pipelined bucketed HSET of the same bytes on the same server; rating
histories are stored compactly").

One fresh embedded Redis (the server ``lrs-rec publish`` starts: appendonly, appendfsync always),
one random model (``--users``, 1 682 items, d = 64, r = 8, k = 8, 20 ratings per user, the builder of
bench/serving_rss.py), then, interleaved ``--repeats`` times:

* ``publish``: ``RedisStore.publish`` (records + histories, what ``lrs-rec publish`` runs; no
  carry-over since nobody onboarded), timed end to end (encoding included) -> ``publish_users_per_s``;
* ``bare``: the same bytes (taken from the version just published, outside the timing) written with a
  plain redis-py pipeline of ``HSET key mapping`` per bucket, the same number of buckets per round
  trip, into other keys -> ``bare_hset_users_per_s``.

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
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)

    from lrs_rec.serving.connection import connect
    from lrs_rec.serving.store import _PIPELINE_KEYS, RedisStore

    from lrs_rec.model_dir import load_model_dir

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
        bare_s: list[float] = []
        for rep in range(args.repeats):
            t0 = time.perf_counter()
            meta = store.publish(model, model_dir=str(model_dir), switch=False)
            publish_s.append(time.perf_counter() - t0)
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
            log(f"repeat {rep}: publish {publish_s[-1]:.2f} s, bare HSET {bare_s[-1]:.2f} s")
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
