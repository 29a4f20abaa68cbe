"""ONNX scoring benchmark: latency of OnnxScorer (one user and batches) and parity with the reference.

For each catalogue size it builds a random TrainedModel with the training defaults (d=32, r=16, k=4),
exports it with ``training.export`` and times, one call at a time with ``perf_counter_ns``:

- ``topn_all``    OnnxScorer.topn(one user, n=100, exclude=the user's rated items) over all items
- ``score_c10``   OnnxScorer.score(one user, 10 candidate items)
- ``score_all``   OnnxScorer.score_all(one user)
- ``ort_topn``    the bare onnxruntime session of the all-items top-n graph (no Python validation)
- ``numpy_topn``  the same maths in plain numpy (F·U precomputed; argpartition) — a yardstick only
- ``topn_b64``    OnnxScorer.topn for a batch of 64 users (time per call; per user = / 64)

Calls are interleaved round-robin over operations and users (not one tight loop per operation), which is
closer to a serving process than a hot loop. Parity: max relative error of OnnxScorer.score_all against
TrainedModel.predict over every (user, item) pair, and top-100 equality with reference_topn.
``--model MODEL_DIR`` adds a trained model directory (e.g. ML-100K u1) to the runs.

    python bench/export.py --ml100k ../shared/data/ml-100k   # writes docs/results/export.json,
                                                             # docs/img/export_latency.png
    python bench/export.py --quick --json --no-write
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

# one BLAS thread, like the ONNX Runtime sessions: a fair numpy yardstick on a shared machine
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lrs_rec.serving.onnx_scorer import OnnxScorer, reference_topn  # noqa: E402
from lrs_rec.training.export import export_onnx  # noqa: E402

from lrs_rec.model import LRSModel  # noqa: E402
from lrs_rec.model_dir import TrainedModel, load_model_dir  # noqa: E402

OPS = ("topn_all", "score_c10", "score_all", "ort_topn", "numpy_topn", "topn_b64")


def synthetic_model(
    *, n_users: int, n_items: int, d: int = 32, r: int = 16, k: int = 4, random_state: int = 0
) -> TrainedModel:
    """A random model with the training defaults' shapes and ~65 rated items per user."""
    rng = np.random.default_rng(random_state)
    U, _ = np.linalg.qr(rng.normal(size=(d, r)))
    W = rng.normal(size=(n_users, r)) * 0.5
    B_idx = np.sort(np.argsort(rng.random((n_users, d)), axis=1)[:, :k], axis=1)
    counts = np.minimum(rng.geometric(1 / 65, n_users), n_items // 2)
    indptr = np.concatenate([[0], np.cumsum(counts)])
    history = np.concatenate([rng.choice(n_items, c, replace=False) for c in counts])
    return TrainedModel(
        lrs=LRSModel(U=U, W=W, B_idx=B_idx, B_val=rng.normal(size=(n_users, k)) * 0.3),
        item_features=rng.normal(size=(n_items, d)) * 0.3,
        item_bias=rng.normal(size=n_items) * 0.3,
        user_bias=rng.normal(size=n_users) * 0.2,
        global_mean=3.5,
        user_ids=tuple(str(u) for u in range(n_users)),
        item_ids=tuple(str(i) for i in range(n_items)),
        w_prior_mean=W.mean(axis=0),
        w_prior_cov=np.atleast_2d(np.cov(W.T)),
        history_indptr=indptr,
        history_items=history,
        history_ratings=np.full(len(history), 4.0),
        rating_min=1.0,
        rating_max=5.0,
        manifest={"model_version": f"bench-{n_items}"},
    )


def percentiles(ns: list[int]) -> dict[str, float]:
    us = np.asarray(ns, dtype=np.float64) / 1000.0
    return {
        "min_us": round(float(us.min()), 1),
        "p50_us": round(float(np.percentile(us, 50)), 1),
        "p90_us": round(float(np.percentile(us, 90)), 1),
        "p99_us": round(float(np.percentile(us, 99)), 1),
        "calls": len(ns),
    }


def bench_model(model: TrainedModel, name: str, *, rounds: int, work: Path) -> dict[str, Any]:
    path = export_onnx(model, work / f"{name}.onnx")
    t0 = time.perf_counter()
    scorer = OnnxScorer(path)
    load_s = time.perf_counter() - t0
    rng = np.random.default_rng(1)
    W = model.lrs.W.astype(np.float32)
    ub = model.user_bias.astype(np.float32)
    bi = np.ascontiguousarray(model.lrs.B_idx)
    bv = model.lrs.B_val.astype(np.float32)
    hist = [np.asarray(model.user_history(u)[0], dtype=np.int64) for u in range(model.n_users)]

    # plain numpy yardstick of the same maths
    FU = (model.item_features @ model.lrs.U).astype(np.float32)
    FT = np.ascontiguousarray(model.item_features.T.astype(np.float32))
    offset = (model.global_mean + model.item_bias).astype(np.float32)

    def numpy_topn(u: int, n: int = 100) -> tuple[np.ndarray, np.ndarray]:
        s = FU @ W[u] + bv[u] @ FT[bi[u]] + offset + ub[u]
        s[hist[u]] = -np.inf
        top = np.argpartition(-s, n)[:n]
        top = top[np.argsort(-s[top], kind="stable")]
        return top, np.clip(s[top], model.rating_min, model.rating_max)

    sess = scorer._sessions["all_topn"]
    ort_outputs = ["all_top_items", "all_top_scores"]
    n_arr = np.array([100], dtype=np.int64)

    def ort_topn(u: int) -> Any:
        excl = hist[u][None, :] if hist[u].size else np.full((1, 1), -1, dtype=np.int64)
        feeds = {
            "w": W[u : u + 1],
            "user_bias": ub[u : u + 1],
            "b_idx": bi[u : u + 1],
            "b_val": bv[u : u + 1],
            "n": n_arr,
            "exclude": excl,
        }
        return sess.run(ort_outputs, feeds)

    batch = min(64, model.n_users)
    cands = rng.integers(0, model.n_items, size=(model.n_users, 10))
    ops: dict[str, Callable[[int], Any]] = {
        "topn_all": lambda u: scorer.topn(W[u], ub[u], bi[u], bv[u], 100, exclude=hist[u]),
        "score_c10": lambda u: scorer.score(W[u], ub[u], bi[u], bv[u], cands[u]),
        "score_all": lambda u: scorer.score_all(W[u], ub[u], bi[u], bv[u]),
        "ort_topn": ort_topn,
        "numpy_topn": numpy_topn,
    }
    batch_ops: dict[str, Callable[[int], Any]] = {
        "topn_b64": lambda u: scorer.topn(
            W[u : u + batch],
            ub[u : u + batch],
            bi[u : u + batch],
            bv[u : u + batch],
            100,
            exclude=hist[u : u + batch],
        ),
    }
    times: dict[str, list[int]] = {op: [] for op in [*ops, *batch_ops]}
    users = rng.integers(0, model.n_users - batch + 1, size=rounds)
    for f in [*ops.values(), *batch_ops.values()]:  # warm-up
        for u in users[:20]:
            f(int(u))
    names = list(ops)
    for u in users:  # single-user operations, users in random order, operations in a random order
        for j in rng.permutation(len(names)):  # (what runs just before a call changes its cost)
            op = names[j]
            t = time.perf_counter_ns()
            ops[op](int(u))
            times[op].append(time.perf_counter_ns() - t)
    for u in users[: max(50, rounds // 20)]:  # batches apart: they would evict the caches
        for op, f in batch_ops.items():
            t = time.perf_counter_ns()
            f(int(u))
            times[op].append(time.perf_counter_ns() - t)
    latency = {op: percentiles(ns) for op, ns in times.items()}
    latency["topn_b64"]["per_user_p50_us"] = round(latency["topn_b64"]["p50_us"] / batch, 2)

    # parity: every (user, item) pair against TrainedModel.predict; top-100 against the reference
    n_par = max(1, min(model.n_users, 500_000 // model.n_items))  # predict() is O(pairs · d) memory
    every = scorer.score_all(W[:n_par], ub[:n_par], bi[:n_par], bv[:n_par])
    want = model.predict(
        np.repeat(np.arange(n_par), model.n_items), np.tile(np.arange(model.n_items), n_par)
    ).reshape(every.shape)
    rel = float(np.max(np.abs(every - want) / np.abs(want)))
    check = np.arange(min(20, model.n_users))
    got = scorer.topn(
        W[check], ub[check], bi[check], bv[check], 100, exclude=[hist[u] for u in check]
    )
    ref = reference_topn(
        model, W[check], ub[check], bi[check], bv[check], 100, exclude=[hist[u] for u in check]
    )
    same_rows = int(np.sum(np.all(got[0] == ref[0], axis=1)))
    np_top = [numpy_topn(int(u))[0] for u in check]

    def raw64(u: int, items: np.ndarray) -> np.ndarray:  # float64 unclipped score, float32 inputs
        theta = model.lrs.U @ W[u].astype(np.float64)
        theta[bi[u]] += bv[u]
        f = np.asarray(model.item_features, dtype=np.float64)[items]
        return np.asarray(model.global_mean + float(ub[u]) + model.item_bias[items] + f @ theta)

    # rows that differ only where float32 cannot tell two items apart (float64 gap < 1e-6 relative)
    near_tie_rows = 0
    for b, u in enumerate(check):
        a, r = raw64(int(u), got[0][b]), raw64(int(u), ref[0][b])
        if np.allclose(a, r, rtol=1e-6, atol=0):
            near_tie_rows += 1
    return {
        "name": name,
        "n_users": model.n_users,
        "n_items": model.n_items,
        "d": model.lrs.d,
        "rank": model.lrs.rank,
        "sparsity": model.lrs.sparsity,
        "onnx_bytes": path.stat().st_size,
        "session_load_s": round(load_s, 3),
        "latency": latency,
        "parity": {
            "pairs": int(every.size),
            "max_rel_err_vs_predict": rel,
            "top100_rows_equal_reference": f"{same_rows}/{len(check)}",
            "top100_rows_equal_reference_up_to_float32_ties": f"{near_tie_rows}/{len(check)}",
            "top100_rows_equal_numpy": f"{sum(int(np.array_equal(a, b)) for a, b in zip(got[0], np_top, strict=True))}/{len(check)}",
        },
    }


def plot(results: list[dict[str, Any]], out: Path) -> None:
    from lrs_rec.extras import require_extra

    matplotlib = require_extra("matplotlib", "the benchmark's figures")

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4))
    ops = [op for op in OPS if op != "topn_b64"]
    width = 0.8 / len(results)
    x = np.arange(len(ops))
    for j, res in enumerate(results):
        p50 = [res["latency"][op]["p50_us"] for op in ops]
        p99 = [res["latency"][op]["p99_us"] for op in ops]
        bars = ax.bar(x + j * width, p50, width, label=f"{res['name']} p50")
        mins = [res["latency"][op]["min_us"] for op in ops]
        color = bars[0].get_facecolor()
        ax.scatter(x + j * width, p99, marker="_", s=200, color=color, zorder=3)
        ax.scatter(x + j * width, mins, marker="v", s=25, color="black", zorder=3)
    ax.set_xticks(x + width * (len(results) - 1) / 2, ops)
    ax.set_yscale("log")
    ax.set_ylabel("µs per call (bar p50, ▼ min, tick p99)")
    ax.set_title("OnnxScorer latency, one user, 1 intra-op thread")
    ax.legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    ap.add_argument("--quick", action="store_true", help="fewer calls (smoke run)")
    ap.add_argument("--no-write", action="store_true", help="do not write docs/ results")
    ap.add_argument("--n-items", default="1682,50000", help="comma-separated catalogue sizes")
    ap.add_argument("--model", action="append", default=[], metavar="MODEL_DIR")
    ap.add_argument(
        "--ml100k",
        metavar="DIR",
        help="also train `lrs-rec train --ratings DIR/u1.base` (defaults) and bench that model",
    )
    args = ap.parse_args(argv)
    rounds = 300 if args.quick else 3000
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for n_items in (int(x) for x in args.n_items.split(",") if x):
            n_users = 943 if n_items <= 5000 else 1000
            model = synthetic_model(n_users=n_users, n_items=n_items)
            results.append(
                bench_model(model, f"synthetic-{n_items}", rounds=rounds, work=Path(tmp))
            )
        if args.ml100k:
            from lrs_rec.serving.cli import main as lrs_rec

            mdir = str(Path(tmp) / "ml100k-u1")
            ratings = str(Path(args.ml100k) / "u1.base")
            with contextlib.redirect_stdout(sys.stderr):  # keep stdout for the JSON
                code = lrs_rec(["train", "--ratings", ratings, "--out", mdir, "--quiet"])
            if code != 0:
                raise RuntimeError(f"lrs-rec train --ratings {ratings} failed")
            args.model.append(mdir)
        for mdir in args.model:
            model = load_model_dir(mdir)
            name = f"model:{Path(mdir).name}"
            results.append(bench_model(model, name, rounds=rounds, work=Path(tmp)))
    out = {
        "benchmark": "export",
        "machine": {
            "cpus": os.cpu_count(),
            "load_avg_1m": round(os.getloadavg()[0], 2),
            "python": platform.python_version(),
            "onnxruntime": __import__("onnxruntime").__version__,
        },
        "rounds": rounds,
        "results": results,
    }
    if not args.no_write:
        (ROOT / "docs" / "results").mkdir(parents=True, exist_ok=True)
        (ROOT / "docs" / "results" / "export.json").write_text(json.dumps(out, indent=2) + "\n")
        plot(results, ROOT / "docs" / "img" / "export_latency.png")
    if args.json:
        print(json.dumps(out))
    else:
        for res in results:
            print(res["name"], json.dumps(res["latency"]), json.dumps(res["parity"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
