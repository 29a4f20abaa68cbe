"""Scale benchmark: `lrs-rec train` against implicit ALS, Surprise SVD and LensKit biased MF at 10k–1M users.

Data: a seeded planted biased-MF log (``lrs_rec.training.synthetic_scale.make_biased_mf``: rank 8,
20k Pareto-popular items, log-normal activity with mean ~20 and median 12 ratings per user), split
90/10 by a seeded draw per row, written as CSV (``user,item,rating,timestamp``, string ids) under
``--work``. Every measured run is its own child process; its wall time is taken around the child and
its peak RSS from ``os.wait4`` (the child's own ``ru_maxrss``). Children run with the same thread
count (``--threads`` for lrs-rec, ``num_threads`` for implicit, OpenMP threads; BLAS at one
thread in every child, :func:`thread_env`). A
watchdog kills a child above ``--mem-cap-gb`` or ``--time-limit`` and records null with the reason.

* ``lrs_*``: ``lrs-rec train --ratings train.csv --out M --quiet --json`` (defaults, model.onnx
  included); test RMSE through the library (``load_model_dir`` + ``evaluate_table``).
* ``load_*``: loading, cleaning and encoding the training file alone (``load_ratings``, the two
  vocabularies, ``encode``), in a child.
* ``implicit_*``: implicit's ``AlternatingLeastSquares(factors=32, iterations=15)`` on the
  ratings as confidences: reading the CSV with pyarrow + the user × item CSR + fit (no RMSE: it
  models implicit feedback).
* ``svd_rmse``: Surprise ``SVD()`` (defaults: 100 factors, 20 epochs); ``lenskit_rmse``: LensKit
  ``BiasedMFScorer(features=32, epochs=15)``. Unknown test users/items get what each library does
  by default (Surprise: its fallback; LensKit: biases only).

Writes docs/results/scale.json, docs/img/scale_time.png, docs/img/scale_memory.png and the table in
docs/scale.md; ``--json`` prints the result object.

    python bench/scale.py --sizes 10k,100k --json
    python bench/scale.py                        # 10k, 100k and 1M users (hours on 2 shared cores)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SIZES = {"10k": 10_000, "100k": 100_000, "1m": 1_000_000}
SEED = 0

LOAD_CHILD = """
import sys, time, json
t0 = time.perf_counter()
from lrs_rec.training.loaders import load_ratings
from lrs_rec.training.pipeline import build_vocabularies, encode
table = load_ratings(sys.argv[1])
uv, iv = build_vocabularies(table)
data = encode(table, uv, iv)
print(json.dumps({"seconds": time.perf_counter() - t0, "n": len(data), "parser": table.report.parser}))
"""

IMPLICIT_CHILD = """
import sys, time, json
t0 = time.perf_counter()
import numpy as np, scipy.sparse as sp, pyarrow as pa, pyarrow.csv as pcsv, pyarrow.compute as pc
from implicit.als import AlternatingLeastSquares
t = pcsv.read_csv(sys.argv[1], convert_options=pcsv.ConvertOptions(
    column_types={"user": pa.string(), "item": pa.string(), "rating": pa.float32()}))
u = pc.dictionary_encode(t.column("user")).combine_chunks()
i = pc.dictionary_encode(t.column("item")).combine_chunks()
r = t.column("rating").to_numpy()
m = sp.csr_matrix((r, (u.indices.to_numpy(), i.indices.to_numpy())),
                  shape=(len(u.dictionary), len(i.dictionary)), dtype=np.float32)
del t
t1 = time.perf_counter()
model = AlternatingLeastSquares(factors=32, iterations=15, num_threads=int(sys.argv[2]),
                                random_state=0, calculate_training_loss=False)
model.fit(m, show_progress=False)
t2 = time.perf_counter()
print(json.dumps({"seconds": t2 - t0, "load_s": t1 - t0, "fit_s": t2 - t1}))
"""

SVD_CHILD = """
import sys, time, json
t0 = time.perf_counter()
import numpy as np, pyarrow.csv as pcsv
from surprise import SVD, Dataset, Reader
tr = pcsv.read_csv(sys.argv[1]).to_pandas()
te = pcsv.read_csv(sys.argv[2]).to_pandas()
data = Dataset.load_from_df(tr[["user", "item", "rating"]], Reader(rating_scale=(1, 5)))
algo = SVD(random_state=0)
algo.fit(data.build_full_trainset())
pred = np.array([algo.predict(u, i).est for u, i in zip(te["user"], te["item"])])
rmse = float(np.sqrt(np.mean((pred - te["rating"].to_numpy()) ** 2)))
print(json.dumps({"seconds": time.perf_counter() - t0, "rmse": rmse}))
"""

LENSKIT_CHILD = """
import sys, time, json
t0 = time.perf_counter()
import numpy as np, pyarrow.csv as pcsv
from lenskit.als import BiasedMFScorer
from lenskit.data import from_interactions_df
tr = pcsv.read_csv(sys.argv[1]).to_pandas()
te = pcsv.read_csv(sys.argv[2]).to_pandas()
ds = from_interactions_df(tr.rename(columns={"user": "user_id", "item": "item_id"})[
    ["user_id", "item_id", "rating"]])
model = BiasedMFScorer(features=32, epochs=15)
model.train(ds)
P, Q = model.user_embeddings, model.item_embeddings
b = model.bias
u = model.users.numbers(te["user"].to_numpy(), missing="negative")
i = model.items.numbers(te["item"].to_numpy(), missing="negative")
pred = np.full(len(te), b.global_bias, dtype=np.float64)
ku, ki = u >= 0, i >= 0
if b.user_biases is not None:
    pred[ku] += b.user_biases[u[ku]]
if b.item_biases is not None:
    pred[ki] += b.item_biases[i[ki]]
both = ku & ki
pred[both] += np.einsum("nf,nf->n", P[u[both]], Q[i[both]])
pred = np.clip(pred, 1, 5)
rmse = float(np.sqrt(np.mean((pred - te["rating"].to_numpy()) ** 2)))
print(json.dumps({"seconds": time.perf_counter() - t0, "rmse": rmse}))
"""


EVAL_CHILD = """
import sys, json
from lrs_rec.model_dir import load_model_dir
from lrs_rec.training.evaluate import evaluate_table
from lrs_rec.training.loaders import load_ratings
ev = evaluate_table(load_model_dir(sys.argv[1]), load_ratings(sys.argv[2]), ranking=False)
print(json.dumps({"rmse": ev["rmse"]}))
"""

# Runs the command as its grandchild and reports that process's own peak RSS: a child forked
# from a big parent inherits the parent's high-water mark (Linux keeps it across exec), this
# small launcher's is ~10 MB.
LAUNCHER = """
import json, os, sys
pid = os.fork()
if pid == 0:
    os.execvp(sys.argv[2], sys.argv[2:])
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as f:
    json.dump({"maxrss_kb": usage.ru_maxrss, "cpu_s": usage.ru_utime + usage.ru_stime}, f)
sys.exit(os.waitstatus_to_exitcode(status))
"""


def thread_env(threads: int) -> dict[str, str]:
    """Every child: BLAS at one thread, OpenMP at ``threads``. The thread count is each library's
    own knob (``--threads`` for lrs-rec, ``num_threads`` for implicit, OpenMP for LensKit's
    backend); BLAS inside their worker threads stays at one, as both implicit (which warns
    otherwise: "can lead to severe performance issues") and lrs-rec (``serving.cli.blas_threads``)
    recommend. Until 2026-12-07 BLAS had ``threads`` too: lrs-rec's 1M train then spent ~14 CPU s
    more (103.5 vs 117 CPU s, same model)."""
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = str(threads)
    env["OPENBLAS_NUM_THREADS"] = env["MKL_NUM_THREADS"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def measure(
    argv: list[str], *, threads: int, mem_cap_gb: float, time_limit: float, cwd: Path
) -> dict[str, Any]:
    """Run one child: wall seconds, its own peak RSS (os.wait4), stdout; killed above the caps."""
    with (
        tempfile.TemporaryFile() as out,
        tempfile.TemporaryFile() as err,
        tempfile.TemporaryDirectory() as tmp,
    ):
        usage_file = Path(tmp) / "usage.json"
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            [sys.executable, "-c", LAUNCHER, str(usage_file), *argv],
            stdout=out,
            stderr=err,
            env=thread_env(threads),
            cwd=cwd,
            start_new_session=True,
        )
        killed: list[str] = []
        done = threading.Event()

        def watchdog() -> None:
            while not done.wait(0.5):
                try:
                    rss_kb = group_rss_kb(proc.pid)
                except (OSError, StopIteration):
                    continue
                why = None
                if rss_kb > mem_cap_gb * 1024 * 1024:
                    why = f"killed above the {mem_cap_gb:g} GB memory cap"
                elif time.perf_counter() - t0 > time_limit:
                    why = f"killed after the {time_limit:g} s time limit"
                if why:
                    killed.append(why)
                    os.killpg(proc.pid, 9)  # the launcher's group: the measured child too
                    return

        th = threading.Thread(target=watchdog, daemon=True)
        th.start()
        proc.wait()
        wall = time.perf_counter() - t0
        done.set()
        th.join()
        usage = json.loads(usage_file.read_text()) if usage_file.exists() else {}
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(), err.read().decode()
    res: dict[str, Any] = {
        "wall_s": round(wall, 2),
        "peak_rss_mb": round(usage.get("maxrss_kb", 0) / 1024, 1),
        "cpu_s": round(usage.get("cpu_s", 0.0), 2),
        "ok": proc.returncode == 0 and not killed,
        "stdout": stdout,
    }
    if not res["ok"]:
        tail = stderr.strip().splitlines()[-1:] or [f"exit {proc.returncode}"]
        res["reason"] = killed[0] if killed else tail[0][:300]
    return res


def group_rss_kb(pgid: int) -> int:
    """Resident memory of every process in the group (the launcher and the measured child)."""
    total = 0
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            if int(fields[2]) != pgid:  # field 5 of stat: the process group
                continue
            with open(f"/proc/{d}/status") as f:
                total += next(int(ln.split()[1]) for ln in f if ln.startswith("VmRSS"))
        except (OSError, StopIteration, IndexError, ValueError):
            continue
    return total


def child_json(res: dict[str, Any]) -> dict[str, Any]:
    if not res["ok"]:
        return {}
    line = [ln for ln in res["stdout"].splitlines() if ln.startswith("{")][-1]
    out: dict[str, Any] = json.loads(line)
    return out


def run_size(label: str, args: argparse.Namespace) -> dict[str, Any]:
    import numpy as np
    from lrs_rec.training.synthetic_scale import make_biased_mf, write_csv

    n_users = SIZES[label]
    work = args.work / label
    work.mkdir(parents=True, exist_ok=True)
    train_csv, test_csv = work / "train.csv", work / "test.csv"
    log = make_biased_mf(n_users, random_state=SEED)
    train, test = log.split(0.1, random_state=SEED)
    per_user = np.bincount(log.users, minlength=n_users)
    if not (train_csv.exists() and test_csv.exists()) or args.regenerate:
        write_csv(train, train_csv)
        write_csv(test, test_csv)
    row: dict[str, Any] = {
        "n_users": n_users,
        "n_items": log.n_items,
        "n_ratings": len(log),
        "n_train": len(train),
        "n_test": len(test),
        "ratings_per_user_mean": round(float(per_user.mean()), 2),
        "ratings_per_user_median": float(np.median(per_user)),
        "threads": args.threads,
    }
    del log
    caps = {"threads": args.threads, "mem_cap_gb": args.mem_cap_gb, "cwd": work}
    py = sys.executable
    lrs_cli = [py, "-m", "lrs_rec.serving.cli"]
    peers = set(args.peers.split(","))

    # loading + cleaning + encoding alone
    r = measure([py, "-c", LOAD_CHILD, str(train_csv)], time_limit=args.time_limit, **caps)
    row["load_s"] = r["wall_s"] if r["ok"] else None
    row["load_cpu_s"] = r["cpu_s"] if r["ok"] else None
    row["load_peak_rss_mb"] = r["peak_rss_mb"] if r["ok"] else None
    row["load_parser"] = child_json(r).get("parser")
    print(f"[{label}] load: {r['wall_s']} s, {r['peak_rss_mb']} MB", file=sys.stderr)

    # lrs-rec train (defaults) + test RMSE through the library
    model_dir = work / "model"
    argv = [*lrs_cli, "train", "--ratings", str(train_csv), "--out", str(model_dir)]
    argv += ["--threads", str(args.threads)]
    r = measure([*argv, "--quiet", "--json"], time_limit=args.time_limit, **caps)
    row["lrs_train_s"] = r["wall_s"] if r["ok"] else None
    row["lrs_cpu_s"] = r["cpu_s"] if r["ok"] else None
    row["lrs_peak_rss_mb"] = r["peak_rss_mb"] if r["ok"] else None
    row["lrs_rmse"] = None
    if r["ok"]:
        row["lrs_val_rmse"] = child_json(r).get("val_rmse")
        # the trainer's own phase log (seconds, peak RSS so far) and what the tuning ran on
        manifest = json.loads((model_dir / "manifest.json").read_text())
        row["lrs_phases"] = manifest["metrics"].get("phases")
        tuning = manifest.get("tuning") or {}
        row["lrs_tune_sample_users"] = tuning.get("sample_users")
        row["lrs_fit_iterations"] = len(manifest["metrics"]["history"]) - 1
        ev = measure(
            [py, "-c", EVAL_CHILD, str(model_dir), str(test_csv)],
            time_limit=args.time_limit,
            **caps,
        )
        row["lrs_rmse"] = round(float(child_json(ev)["rmse"]), 4) if ev["ok"] else None
    else:
        row["lrs_reason"] = r["reason"]
    print(f"[{label}] lrs-rec: {row['lrs_train_s']} s, {r['peak_rss_mb']} MB", file=sys.stderr)

    if "implicit" in peers:
        r = measure(
            [py, "-c", IMPLICIT_CHILD, str(train_csv), str(args.threads)],
            time_limit=args.time_limit,
            **caps,
        )
        got = child_json(r)
        row["implicit_s"] = r["wall_s"] if r["ok"] else None
        row["implicit_load_s"] = round(got["load_s"], 2) if got else None
        row["implicit_fit_s"] = round(got["fit_s"], 2) if got else None
        row["implicit_peak_rss_mb"] = r["peak_rss_mb"] if r["ok"] else None
        if not r["ok"]:
            row["implicit_reason"] = r["reason"]
        print(f"[{label}] implicit: {row['implicit_s']} s", file=sys.stderr)
    for name, code in (("svd", SVD_CHILD), ("lenskit", LENSKIT_CHILD)):
        if name not in peers:
            continue
        r = measure(
            [py, "-c", code, str(train_csv), str(test_csv)],
            time_limit=args.peer_time_limit,
            **caps,
        )
        got = child_json(r)
        row[f"{name}_rmse"] = round(got["rmse"], 4) if got else None
        row[f"{name}_s"] = r["wall_s"] if r["ok"] else None
        row[f"{name}_peak_rss_mb"] = r["peak_rss_mb"] if r["ok"] else None
        if not r["ok"]:
            row[f"{name}_reason"] = r["reason"]
        print(f"[{label}] {name}: {row[f'{name}_rmse']} ({r['wall_s']} s)", file=sys.stderr)
    if row.get("implicit_s") and row.get("lrs_train_s"):
        row["time_ratio_lrs_over_implicit"] = round(row["lrs_train_s"] / row["implicit_s"], 2)
    if row.get("implicit_peak_rss_mb") and row.get("lrs_peak_rss_mb"):
        row["rss_ratio_lrs_over_implicit"] = round(
            row["lrs_peak_rss_mb"] / row["implicit_peak_rss_mb"], 2
        )
    return row


def plot(rows: list[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for key, ylabel, fname in (
        ("s", "wall time (s)", "scale_time.png"),
        ("peak_rss_mb", "peak RSS (MB)", "scale_memory.png"),
    ):
        fig, ax = plt.subplots(figsize=(5.5, 4))
        series = {
            "lrs-rec train": "lrs_train_s" if key == "s" else "lrs_peak_rss_mb",
            "implicit ALS (load + fit)": "implicit_s" if key == "s" else "implicit_peak_rss_mb",
            "lrs-rec load + encode": "load_s" if key == "s" else "load_peak_rss_mb",
        }
        for label, col in series.items():
            pts = [(r["n_train"], r[col]) for r in rows if r.get(col)]
            if pts:
                x, y = zip(*pts, strict=True)
                ax.loglog(x, y, "o-", label=label)
        ax.set_xlabel("training ratings")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(ROOT / "docs" / "img" / fname, dpi=110)
        plt.close(fig)


def table_md(rows: list[dict[str, Any]]) -> str:
    def f(v: Any, nd: int = 1) -> str:
        return "–" if v is None else (f"{v:.{nd}f}" if isinstance(v, float) else str(v))

    head = (
        "| users (train ratings) | load + encode s / MB | lrs-rec train s / MB | "
        "implicit s / MB | lrs-rec RMSE | Surprise SVD RMSE | LensKit RMSE |\n"
        "|---|---|---|---|---|---|---|\n"
    )
    lines = [
        f"| {r['n_users']:,} ({r['n_train']:,}) | {f(r.get('load_s'))} / "
        f"{f(r.get('load_peak_rss_mb'), 0)} | {f(r.get('lrs_train_s'))} / "
        f"{f(r.get('lrs_peak_rss_mb'), 0)} | {f(r.get('implicit_s'))} / "
        f"{f(r.get('implicit_peak_rss_mb'), 0)} | {f(r.get('lrs_rmse'), 4)} | "
        f"{f(r.get('svd_rmse'), 4)} | {f(r.get('lenskit_rmse'), 4)} |"
        for r in rows
    ]
    return head + "\n".join(lines) + "\n"


def write_docs(result: dict[str, Any]) -> None:
    (ROOT / "docs" / "results").mkdir(parents=True, exist_ok=True)
    (ROOT / "docs" / "results" / "scale.json").write_text(
        json.dumps(result, indent=2, sort_keys=True) + "\n"
    )
    plot(result["sizes"])
    md = ROOT / "docs" / "scale.md"
    begin, end = "<!-- scale-table:begin -->", "<!-- scale-table:end -->"
    text = md.read_text() if md.exists() else f"# Scale\n\n{begin}\n{end}\n"
    if begin in text and end in text:
        a, b = text.index(begin) + len(begin), text.index(end)
        text = text[:a] + "\n" + table_md(result["sizes"]) + text[b:]
        md.write_text(text)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="10k,100k,1m", help="comma list of 10k, 100k, 1m")
    ap.add_argument("--threads", type=int, default=1, help="threads for every child (same for all)")
    ap.add_argument("--peers", default="implicit,svd,lenskit", help="comma list of peers to run")
    ap.add_argument("--work", type=Path, default=ROOT / "bench" / "out" / "scale")
    ap.add_argument("--mem-cap-gb", type=float, default=6.0, help="kill a child above this RSS")
    ap.add_argument("--time-limit", type=float, default=3600.0, help="per lrs/implicit run (s)")
    ap.add_argument("--peer-time-limit", type=float, default=1200.0, help="per RMSE peer (s)")
    ap.add_argument("--regenerate", action="store_true", help="rewrite the CSV files")
    ap.add_argument("--json", action="store_true", help="print the result as one JSON object")
    ap.add_argument("--no-write", action="store_true", help="do not write docs/")
    ap.add_argument("--merge", action="store_true", help="keep sizes of docs/results/scale.json")
    args = ap.parse_args(argv)
    labels = [s.strip().lower() for s in args.sizes.split(",") if s.strip()]
    bad = [s for s in labels if s not in SIZES]
    if bad:
        ap.error(f"--sizes: unknown {bad}; choose from {', '.join(SIZES)}")
    if args.threads < 1:
        ap.error(f"--threads must be >= 1, got {args.threads}")
    rows = [run_size(label, args) for label in labels]
    if args.merge and (ROOT / "docs" / "results" / "scale.json").exists():
        old = json.loads((ROOT / "docs" / "results" / "scale.json").read_text())["sizes"]
        mine = {r["n_users"] for r in rows}
        rows = sorted(
            [r for r in old if r["n_users"] not in mine] + rows, key=lambda r: r["n_users"]
        )
    result = {
        "bench": "scale",
        "seed": SEED,
        "threads": args.threads,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores (shared with other jobs)",
        "python": platform.python_version(),
        "sizes": rows,
    }
    if not args.no_write:
        write_docs(result)
    if args.json:
        print(json.dumps(result, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
