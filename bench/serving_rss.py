"""Serving worker memory vs the number of users (issue 15: "serve loads only the shared weights").

A random model (``--users``, 1 682 items, d = 64, r = 8, k = 8, 20 ratings per user) is saved and
exported once; then, for each mode, a FRESH Python process builds what ``lrs-rec serve`` builds —
the ``Recommender`` for that directory, the FastAPI app, and the onboarder (the onboarding prior,
which a server builds at load or at its first onboarding) — and reports its resident set size:

* ``shared``: the current server (``load_shared_model_dir``: shared arrays, stored onboarding prior,
  compact user index);
* ``full``: what the server loaded before (``load_model_dir``: every user's parameters and rating
  history, a ``dict`` user index, the onboarding prior estimated from the per-user arrays) — the
  same code path re-created in the child process, so both are measured on the same directory.

No Redis is needed (the client connects lazily). ``python bench/serving_rss.py --json`` prints one
JSON object: ``rss_mb`` (after load) and ``peak_rss_mb`` (``ru_maxrss``) per mode, plus the
baseline of a process that only imported the same modules.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def log(*parts: Any) -> None:
    print(*parts, file=sys.stderr, flush=True)


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def build_model_dir(out: Path, args: argparse.Namespace) -> dict[str, Any]:
    """A random model like training.testing.random_trained_model, vectorised for 10^6 users."""
    from lrs_rec.training.export import export_model_dir

    from lrs_rec.model import LRSModel
    from lrs_rec.model_dir import TrainedModel, save_model_dir

    rng = np.random.default_rng(args.seed)
    n, m, d, r, k, per = args.users, args.items, args.d, args.rank, args.sparsity, args.ratings
    U, _ = np.linalg.qr(rng.normal(size=(d, r)))
    W = rng.normal(scale=0.5, size=(n, r))
    B_idx = np.sort(distinct_rows(rng, n, k, d), axis=1)
    B_val = rng.normal(scale=0.3, size=(n, k))
    items = distinct_rows(rng, n, per, m)
    t0 = time.perf_counter()
    model = TrainedModel(
        lrs=LRSModel(U=U, W=W, B_idx=B_idx, B_val=B_val),
        item_features=rng.normal(scale=0.5, size=(m, d)),
        item_bias=rng.normal(scale=0.2, size=m),
        user_bias=rng.normal(scale=0.2, size=n),
        global_mean=3.5,
        user_ids=tuple(f"u{i}" for i in range(n)),
        item_ids=tuple(f"i{j}" for j in range(m)),
        w_prior_mean=W.mean(axis=0),
        w_prior_cov=np.cov(W.T).reshape(r, r),
        history_indptr=np.arange(n + 1, dtype=np.int64) * per,
        history_items=items.reshape(-1),
        history_ratings=rng.integers(1, 6, size=n * per).astype(np.float64),
        rating_min=1.0,
        rating_max=5.0,
    )
    save_model_dir(model, out)
    export_model_dir(out)
    return {
        "save_s": round(time.perf_counter() - t0, 1),
        "arrays_npz_mb": round((out / "arrays.npz").stat().st_size / 2**20, 1),
        # format 2 (issue 15): no users.json; ids, parameters and histories are in users/*.parquet
        "users_json_mb": (
            round((out / "users.json").stat().st_size / 2**20, 1)
            if (out / "users.json").exists()
            else None
        ),
        "user_shards_mb": round(
            sum(p.stat().st_size for p in out.glob("users/*.parquet")) / 2**20, 1
        ),
    }


def distinct_rows(rng: np.random.Generator, n: int, k: int, high: int) -> np.ndarray:
    """(n, k) int64, each row k distinct values in [0, high) (rows with a repeat are redrawn)."""
    out = rng.integers(0, high, size=(n, k))
    while True:
        s = np.sort(out, axis=1)
        bad = np.flatnonzero((s[:, 1:] == s[:, :-1]).any(axis=1))
        if not bad.size:
            return out
        out[bad] = rng.integers(0, high, size=(bad.size, k))


def peak_rss_mb() -> float:
    """VmHWM: this process's peak RSS (ru_maxrss would carry the parent's over exec)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def child(mode: str, model_dir: str) -> dict[str, Any]:
    """Runs in a fresh process: build the server's objects in ``mode``, report memory."""
    import dataclasses

    from lrs_rec.serving.app import create_app
    from lrs_rec.serving.onboarding import onboarder_for
    from lrs_rec.serving.onnx_scorer import OnnxScorer
    from lrs_rec.serving.recommender import Recommender

    from lrs_rec.model_dir import load_model_dir
    from lrs_rec.model_onboarding import build_onboarder

    base = rss_mb()
    t0 = time.perf_counter()
    url = "redis://127.0.0.1:1/0"  # never contacted: the client is lazy
    keep: list[Any] = []
    if mode == "imports":
        pass
    elif mode == "shared":
        rec = Recommender(model_dir, url)
        keep += [rec, create_app(rec)]
        loaded_mb = rss_mb()
        keep.append(onboarder_for(rec.model))
    elif mode == "full":
        # the server's load before issue 15 (serving.recommender._load at b0bb475)
        model = load_model_dir(model_dir)
        model = dataclasses.replace(model, onboarding_prior=None)  # estimated from the arrays
        scorer = OnnxScorer(str(Path(model_dir) / "model.onnx"), intra_op_threads=1)
        rec = Recommender(model_dir, url)  # for the app only (its own load is the shared one)
        keep += [model, scorer, model.user_index(), model.item_index(), create_app(rec)]
        loaded_mb = rss_mb()
        keep.append(build_onboarder(model))
    else:
        raise ValueError(mode)
    out = {
        "mode": mode,
        "import_rss_mb": round(base, 1),
        "rss_mb": round(rss_mb(), 1),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "load_s": round(time.perf_counter() - t0, 2),
    }
    if mode != "imports":
        out["rss_before_onboarder_mb"] = round(loaded_mb, 1)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else "")
    p.add_argument("--users", type=int, default=1_000_000)
    p.add_argument("--items", type=int, default=1682)
    p.add_argument("--d", type=int, default=64)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--sparsity", type=int, default=8)
    p.add_argument("--ratings", type=int, default=20, help="ratings per user")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default=None, help="measure this model directory instead")
    p.add_argument("--modes", default="imports,shared,full")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--child", nargs=2, metavar=("MODE", "DIR"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(*args.child)))
        return 0
    with tempfile.TemporaryDirectory(prefix="lrs-rss-") as tmp:
        info: dict[str, Any] = {}
        if args.model:
            model_dir = Path(args.model)
        else:
            model_dir = Path(tmp) / "model"
            log(f"building a {args.users}-user model in {model_dir} ...")
            info = build_model_dir(model_dir, args)
            log(info)
        results = {}
        env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
        for mode in args.modes.split(","):
            out = subprocess.run(
                [sys.executable, __file__, "--child", mode, str(model_dir)],
                check=True,
                capture_output=True,
                text=True,
                env=env,
            )
            results[mode] = json.loads(out.stdout.strip().splitlines()[-1])
            log(results[mode])
    report = {
        "bench": "serving_rss",
        "users": args.users if not args.model else None,
        "items": args.items,
        "d": args.d,
        "rank": args.rank,
        "sparsity": args.sparsity,
        "ratings_per_user": args.ratings,
        "model": info,
        "modes": results,
        "serve_rss_mb": results.get("shared", {}).get("rss_mb"),
        "serve_rss_target_mb": 300,
    }
    print(json.dumps(report, indent=None if args.json else 2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
