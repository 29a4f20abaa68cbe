"""Per-phase time of `lrs-rec train`'s engine with the compiled (numba) and the numpy kernels.

Runs the trainer (``lrs_rec.training.pipeline.train``, default settings) in this process on the
seeded synthetic log of bench/scale.py (``make_biased_mf``, its 90/10 training part) and times each
engine call by wrapping it: the ALS initialisation, every user step, item step and loss evaluation,
and the whole train (wall and this process's CPU seconds). Optionally also implicit ALS (f = 32, 15
iterations; CSR build + fit) at the same thread count on the same ratings.

    python bench/kernels.py --users 100000 --kernels numba,numpy --threads 1 --json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import numpy as np

PHASES = {
    "als_init": ("lrs_rec.training.pipeline", "als_factors"),
    "user_step": ("lrs_rec.training.pipeline", "user_step"),
    "item_step": ("lrs_rec.training.pipeline", "item_step"),
    "losses": ("lrs_rec.training.pipeline", "rmse"),
}


def _timed(fn: Callable[..., Any], acc: dict[str, list[float]], name: str) -> Callable[..., Any]:
    def wrapper(*a: Any, **kw: Any) -> Any:
        w, c = time.perf_counter(), time.process_time()
        try:
            return fn(*a, **kw)
        finally:
            acc[name + "_wall_s"].append(time.perf_counter() - w)
            acc[name + "_cpu_s"].append(time.process_time() - c)

    return wrapper


def run_lrs(table: Any, backend: str, threads: int) -> dict[str, Any]:
    import importlib

    from lrs_rec.training.config import TrainConfig
    from lrs_rec.training.kernels_select import select_kernels

    from lrs_rec.engine.parallel import configure

    configure(n_threads=threads)
    used = select_kernels(backend)
    acc: dict[str, list[float]] = defaultdict(list)
    saved = []
    for name, (mod, attr) in PHASES.items():
        m = importlib.import_module(mod)
        saved.append((m, attr, getattr(m, attr)))
        setattr(m, attr, _timed(getattr(m, attr), acc, name))
    from lrs_rec.training.pipeline import train

    try:
        w, c = time.perf_counter(), time.process_time()
        res = train(table, TrainConfig(), progress=False)
        total_w, total_c = time.perf_counter() - w, time.process_time() - c
    finally:
        for m, attr, fn in saved:
            setattr(m, attr, fn)
    out: dict[str, Any] = {"kernels": used, "threads": threads}
    out["train_wall_s"], out["train_cpu_s"] = round(total_w, 2), round(total_c, 2)
    for key, vals in acc.items():
        stem = key[: -len("_s")]
        out[stem + "_total_s"] = round(sum(vals), 2)
        out[stem + "_each_s"] = [round(v, 3) for v in vals]
    met = res.model.manifest["metrics"]
    out["val_rmse"] = met["val_rmse"]
    out["iterations"] = len(met["history"]) - 1
    out["tuning_trials"] = len(res.model.manifest.get("tuning", {}).get("trials", []))
    return out


def run_implicit(
    users: np.ndarray, items: np.ndarray, ratings: np.ndarray, threads: int
) -> dict[str, Any]:
    import scipy.sparse as sp
    from implicit.als import AlternatingLeastSquares

    w, c = time.perf_counter(), time.process_time()
    m = sp.csr_matrix(
        (ratings.astype(np.float32), (users, items)),
        shape=(int(users.max()) + 1, int(items.max()) + 1),
    )
    model = AlternatingLeastSquares(
        factors=32,
        iterations=15,
        num_threads=threads,
        random_state=0,
        calculate_training_loss=False,
    )
    model.fit(m, show_progress=False)
    return {
        "implicit_fit_wall_s": round(time.perf_counter() - w, 2),
        "implicit_fit_cpu_s": round(time.process_time() - c, 2),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--users", type=int, default=100_000)
    ap.add_argument("--kernels", default="numba,numpy")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--implicit", action="store_true")
    ap.add_argument("--work", default="/tmp/lrs-bench-kernels", help="where the CSV is kept")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    from pathlib import Path

    from lrs_rec.serving.cli import blas_threads
    from lrs_rec.training.loaders import load_ratings
    from lrs_rec.training.synthetic_scale import make_biased_mf, write_csv

    path = Path(args.work) / f"train_{args.users}.csv"
    if not path.exists():
        log = make_biased_mf(args.users, random_state=0)
        train_log, _ = log.split(0.1, random_state=0)
        write_csv(train_log, path)
        del log, train_log
    table = load_ratings(str(path))
    result: dict[str, Any] = {"n_users": args.users, "n_train": len(table), "runs": []}
    with blas_threads():
        for backend in [b for b in args.kernels.split(",") if b]:
            result["runs"].append(run_lrs(table, backend, args.threads))
            print(json.dumps(result["runs"][-1]), file=sys.stderr)
        if args.implicit:
            from lrs_rec.training.pipeline import build_vocabularies, encode

            data = encode(table, *build_vocabularies(table))
            result.update(run_implicit(data.users, data.items, data.ratings, args.threads))
    print(json.dumps(result, indent=None if args.json else 2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
