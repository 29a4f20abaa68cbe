"""Scale-out benchmark: `lrs-rec train` on the local engine vs `--engine dask` with 2 workers.

Data: the planted biased-MF log of bench/scale.py (``make_biased_mf``, seed 0, 20k items, ~20
ratings per user), split 90/10, written as CSV under ``--work``. Runs, each a child process:

* ``local``: ``lrs-rec train --ratings train.csv --threads 1`` — wall seconds, peak RSS (wait4).
* ``dask``: a cluster started with the real CLI (``dask scheduler``, two ``dask worker --nthreads
  1`` processes; every port chosen by the OS, no dashboard), then ``lrs-rec train --engine dask --scheduler``
  as the driver — its wall seconds and its own peak RSS (``driver_peak_rss_mb``: the workers are not
  its children); each worker's peak RSS (``ru_maxrss`` asked from the workers after the run) and the
  cluster's total RSS sampled every 0.5 s (a watchdog kills everything above ``--mem-cap-gb``).
* bytes moved: from the driver's manifest (shared arrays broadcast to the workers, results
  gathered to the driver) and the workers' own count of bytes sent to peers and to the driver
  (``transfer_outgoing_bytes_total``), divided by the run's iterations (ALS initialisation +
  LRS iterations + final pass) for ``bytes_moved_per_iteration``.
* ``rmse_local`` / ``rmse_dask``: test RMSE of each model (``evaluate_table``).

``--epsilon E``: private training on both engines (``train --epsilon E --dp-noise-seed 0
--rating-scale 1 5``; one-hot features, ``PrivateConfig.for_data``); the rows add ``epsilon`` and
``same_ledger`` (the two manifests' privacy ledgers equal), iterations are the noisy U-steps, and the
result goes to ``docs/results/distributed_private.json`` (docs table ``distributed-private-table``).

Both engines get the same flags (``--no-tune`` by default: the local engine on main tunes on every
user, 4 fits; pass ``--tune`` to include tuning). Timing on a shared machine is noisy: the JSON
records the load average before and after.

    python bench/distributed.py --sizes 100k --json
    nice -n 5 python bench/distributed.py --sizes 1m --json
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
# this file is named like the `distributed` package: keep its directory off the import path
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]


def _bench_scale() -> Any:
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_scale", ROOT / "bench" / "scale.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


_scale = _bench_scale()
EVAL_CHILD, SEED = _scale.EVAL_CHILD, _scale.SEED
SIZES = {**_scale.SIZES, "300k": 300_000}
child_json, group_rss_kb, measure = _scale.child_json, _scale.group_rss_kb, _scale.measure

WORKER_STATS = """
import json, sys
from distributed import Client
def stats(dask_worker):
    import resource
    return {"maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "outgoing_bytes": dask_worker.transfer_outgoing_bytes_total}
with Client(sys.argv[1], timeout="30s") as c:
    print(json.dumps(list(c.run(stats).values())))
"""


class DaskCluster:
    """`dask scheduler` + N `dask worker` processes, each its own process group (stopped on exit)."""

    def __init__(self, n_workers: int, mem_cap_gb: float, work: Path) -> None:
        self.sched_file = work / "scheduler.json"
        self.sched_file.unlink(missing_ok=True)
        self.address = ""
        dask = str(Path(sys.executable).with_name("dask"))
        env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
        env["OPENBLAS_NUM_THREADS"] = "1"
        sched = [dask, "scheduler", "--host", "127.0.0.1", "--port", "0"]
        sched += ["--scheduler-file", str(self.sched_file)]
        sched += ["--no-dashboard", "--dashboard-address", "127.0.0.1:0"]
        self.procs: list[subprocess.Popen[bytes]] = []
        self.peak_kb = 0
        # [seconds, scheduler MB, worker MB, ..., steps running] every 10 s
        self.series: list[list[Any]] = []
        self._client: Any = None
        self.killed: str | None = None
        self._done = threading.Event()
        self._cap_kb = mem_cap_gb * 1024 * 1024
        try:
            self._start(sched, dask, env, n_workers)
        except BaseException:
            self.stop()  # never leave a scheduler or a worker behind
            raise

    def _start(self, sched: list[str], dask: str, env: dict[str, str], n_workers: int) -> None:
        quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL, "env": env}
        self.procs.append(subprocess.Popen(sched, start_new_session=True, **quiet))  # type: ignore[call-overload]
        deadline = time.monotonic() + 60
        while not self.sched_file.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        self.address = json.loads(self.sched_file.read_text())["address"]
        worker = [dask, "worker", self.address, "--nthreads", "1", "--no-dashboard"]
        for _ in range(n_workers):
            # each its own group: the nanny and its worker process
            self.procs.append(
                subprocess.Popen(  # type: ignore[call-overload]
                    [*worker, "--host", "127.0.0.1", "--memory-limit", "0"],
                    start_new_session=True,
                    **quiet,
                )
            )
        threading.Thread(target=self._watch, daemon=True).start()
        from distributed import Client

        with Client(self.address, timeout="30s") as c:
            c.wait_for_workers(n_workers, timeout=120)

    def _watch(self) -> None:
        t0, last = time.monotonic(), -10.0
        while not self._done.wait(0.5):
            each = [group_rss_kb(p.pid) for p in self.procs]
            kb = sum(each)
            self.peak_kb = max(self.peak_kb, kb)
            if time.monotonic() - last >= 10:  # RSS of the scheduler and each worker, MB
                last = time.monotonic()
                row: list[Any] = [round(last - t0), *[round(x / 1024) for x in each]]
                self.series.append(row + self._running())
            if kb > self._cap_kb:
                self.killed = f"cluster killed above the {self._cap_kb / 1024**2:g} GB cap"
                for p in self.procs:
                    os.killpg(p.pid, signal.SIGKILL)
                return

    def _running(self) -> list[str]:
        """The steps (task names) the scheduler has on the workers now."""
        try:
            if self._client is None:
                from distributed import Client

                self._client = Client(self.address, timeout="10s")

            def names(dask_scheduler: Any) -> list[str]:
                return sorted(
                    {str(k).rsplit("-", 1)[0] for ws in dask_scheduler.workers.values()
                     for k in (t.key for t in ws.processing)}
                )  # fmt: skip

            return list(self._client.run_on_scheduler(names))
        except Exception as e:  # the record is best effort; the run must not depend on it
            return [f"? {type(e).__name__}"]

    def worker_stats(self) -> list[dict[str, Any]]:
        out = subprocess.run(
            [sys.executable, "-c", WORKER_STATS, self.address],
            capture_output=True,
            text=True,
            timeout=60,
        )
        return list(json.loads(out.stdout.strip().splitlines()[-1])) if out.returncode == 0 else []

    def stop(self) -> None:
        self._done.set()
        if self._client is not None:
            try:
                self._client.close()
            except Exception:
                pass
        for p in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in reversed(self.procs):
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)  # its own group: the nanny's worker too
                p.wait()


def prepare(label: str, work: Path, data: Path | None) -> tuple[Path, Path, dict[str, Any]]:
    import numpy as np
    from lrs_rec.training.synthetic_scale import make_biased_mf, write_csv

    n_users = SIZES[label]
    d = work / label
    d.mkdir(parents=True, exist_ok=True)
    train_csv, test_csv = d / "train.csv", d / "test.csv"
    if data is not None and (data / label / "train.csv").exists():
        # the same seeded files, already written (read-only, e.g. /work/data/scale)
        train_csv, test_csv = data / label / "train.csv", data / label / "test.csv"
        n_train = sum(1 for _ in open(train_csv, "rb")) - 1
        n_test = sum(1 for _ in open(test_csv, "rb")) - 1
        return train_csv, test_csv, {"n_users": n_users, "n_train": n_train, "n_test": n_test,
                                     "data": str(data / label)}  # fmt: skip
    log = make_biased_mf(n_users, random_state=SEED)
    train, test = log.split(0.1, random_state=SEED)
    if not (train_csv.exists() and test_csv.exists()):
        write_csv(train, train_csv)
        write_csv(test, test_csv)
    info = {
        "n_users": n_users,
        "n_items": log.n_items,
        "n_train": len(train),
        "n_test": len(test),
        "ratings_per_user_mean": round(float(np.bincount(log.users).mean()), 2),
    }
    return train_csv, test_csv, info


def split_csv(src: Path, out: Path, n_files: int) -> Path:
    """``src`` (a CSV with a header) as ``n_files`` CSV files of consecutive rows, in order."""
    if out.is_dir() and len(list(out.glob("part-*.csv"))) == n_files:
        return out
    out.mkdir(parents=True, exist_ok=True)
    n_rows = sum(1 for _ in open(src, "rb")) - 1
    per = -(-n_rows // n_files)
    with open(src, "rb") as f:
        header = f.readline()
        for j in range(n_files):
            with open(out / f"part-{j:03d}.csv", "wb") as g:
                g.write(header)
                for _ in range(per):
                    line = f.readline()
                    if not line:
                        break
                    g.write(line)
    return out


def test_rmse(model_dir: Path, test_csv: Path, caps: dict[str, Any]) -> float | None:
    ev = measure([sys.executable, "-c", EVAL_CHILD, str(model_dir), str(test_csv)], **caps)
    return round(float(child_json(ev)["rmse"]), 5) if ev["ok"] else None


def iterations(manifest: dict[str, Any]) -> int:
    hp, m = manifest["hyperparameters"], manifest["metrics"]
    if manifest.get("privacy"):  # private training: the noisy U-steps (+ the final user step)
        return int(hp["n_iters"]) + 1
    final = 1 if m.get("final_pass") == "all ratings" else 0
    return int(hp["init_iter"]) + len(m["history"]) - 1 + final


def run_size(label: str, args: argparse.Namespace) -> dict[str, Any]:
    train_csv, test_csv, row = prepare(label, args.work, args.data)
    work = args.work / label
    caps = {"threads": 1, "mem_cap_gb": args.mem_cap_gb, "cwd": work, "time_limit": args.time_limit}
    cli = [sys.executable, "-m", "lrs_rec.serving.cli", "train", "--ratings", str(train_csv)]
    common = ["--quiet", "--json", "--no-export", "--threads", "1"]
    common += [] if args.tune else ["--no-tune"]
    if args.epsilon is not None:  # private training on both engines, the same noise seed
        common += ["--epsilon", str(args.epsilon), "--dp-noise-seed", "0"]
        common += ["--rating-scale", "1", "5"]
        row["epsilon"] = args.epsilon
    row["tune"] = bool(args.tune)
    row["caps_gb"] = {"driver": args.mem_cap_gb, "cluster": args.cluster_cap_gb}
    row["load_before"] = os.getloadavg()[0]

    r = (
        measure([*cli, "--out", str(work / "model_local"), *common], **caps)
        if not args.skip_local
        else {"ok": False, "reason": "skipped (--skip-local)", "wall_s": None, "peak_rss_mb": None}
    )
    row["local_s"] = r["wall_s"] if r["ok"] else None
    row["local_peak_rss_mb"] = r["peak_rss_mb"] if r["ok"] else None
    row["rmse_local"] = test_rmse(work / "model_local", test_csv, caps) if r["ok"] else None
    if not r["ok"]:
        row["local_reason"] = r.get("reason")
    print(f"[{label}] local: {row['local_s']} s, {row['local_peak_rss_mb']} MB", file=sys.stderr)

    # the workers read the training ratings as --dask-files files of consecutive rows (the same
    # rows in the same order as train.csv: the same model), in parallel
    parts = split_csv(train_csv, work / f"train_{args.dask_files}_files", args.dask_files)
    row["dask_input_files"] = args.dask_files
    cluster = DaskCluster(2, args.cluster_cap_gb, work)
    try:
        out = work / "model_dask"
        dcli = [sys.executable, "-m", "lrs_rec.serving.cli", "train", "--ratings", str(parts)]
        argv = [*dcli, "--out", str(out), *common, "--engine", "dask"]
        r = measure([*argv, "--scheduler", cluster.address], **caps)
        workers = cluster.worker_stats()
    finally:
        cluster.stop()
    row["dask_s"] = r["wall_s"] if r["ok"] else None
    row["driver_peak_rss_mb"] = r["peak_rss_mb"] if r["ok"] else None
    row["worker_peak_rss_mb"] = [round(w["maxrss_mb"], 1) for w in workers]
    row["cluster_peak_rss_mb"] = round(cluster.peak_kb / 1024, 1)
    row["cluster_rss_series_mb"] = cluster.series
    if not r["ok"] or cluster.killed:
        row["dask_reason"] = cluster.killed or r.get("reason")
    row["rmse_dask"] = test_rmse(out, test_csv, caps) if r["ok"] else None
    if r["ok"]:
        from lrs_rec.model_dir import read_manifest

        man = read_manifest(out)
        eng = man["engine"]
        n_it = iterations(man)
        moved = eng["bytes_broadcast"] + sum(w["outgoing_bytes"] for w in workers)
        row.update(
            partitions=eng["partitions"],
            iterations=n_it,
            bytes_broadcast=eng["bytes_broadcast"],
            bytes_to_driver=eng["bytes_to_driver"],
            worker_outgoing_bytes=sum(w["outgoing_bytes"] for w in workers),
            bytes_moved_per_iteration=int(moved / max(1, n_it)),
        )
        local_man = work / "model_local"
        if local_man.exists():
            lm = read_manifest(local_man)
            row["best_iteration_local"] = lm["metrics"].get("best_iteration")
            if args.epsilon is not None:
                row["same_ledger"] = lm["privacy"] == man["privacy"]
        row["best_iteration_dask"] = man["metrics"].get("best_iteration")
    row["load_after"] = os.getloadavg()[0]
    print(
        f"[{label}] dask: {row['dask_s']} s, driver {row['driver_peak_rss_mb']} MB", file=sys.stderr
    )
    return row


def _f(v: Any, nd: int = 1) -> str:
    if v is None:
        return "–"
    if isinstance(v, list):
        return " / ".join(_f(x, nd) for x in v) or "–"
    return f"{v:,.{nd}f}" if isinstance(v, float) else f"{v:,}"


def table_md(rows: list[dict[str, Any]]) -> str:
    head = (
        "| users (train ratings) | local s / MB | Dask s | driver MB | workers MB | MB moved / "
        "iteration | RMSE local / Dask | best iteration local / Dask | load avg |\n"
        "|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for r in rows:
        moved = r.get("bytes_moved_per_iteration")
        lines.append(
            f"| {r['n_users']:,} ({r['n_train']:,}) | {_f(r.get('local_s'))} / "
            f"{_f(r.get('local_peak_rss_mb'))} | {_f(r.get('dask_s'))} | "
            f"{_f(r.get('driver_peak_rss_mb'))} | {_f(r.get('worker_peak_rss_mb'))} | "
            f"{_f(None if moved is None else moved / 1e6)} | {_f(r.get('rmse_local'), 5)} / "
            f"{_f(r.get('rmse_dask'), 5)} | {_f(r.get('best_iteration_local'))} / "
            f"{_f(r.get('best_iteration_dask'))} | {_f(r.get('load_before'))}–"
            f"{_f(r.get('load_after'))} |"
            + (f" {r['dask_reason']}" if r.get("dask_reason") else "")
        )
    return head + "\n".join(lines) + "\n"


def write_docs(result: dict[str, Any], private: bool = False) -> None:
    doc = ROOT / "docs" / "scale.md"
    text = doc.read_text()
    name = "distributed-private-table" if private else "distributed-table"
    a, b = f"<!-- {name}:start -->\n", f"<!-- {name}:end -->"
    if a in text and b in text:
        pre, rest = text.split(a, 1)
        doc.write_text(pre + a + table_md(result["rows"]) + b + rest.split(b, 1)[1])


def compose(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The result object: every size's row, and at top level the largest size measured on both
    engines (the issue's keys: local_s, dask_s, driver_peak_rss_mb, rmse_local, rmse_dask)."""
    rows = sorted(rows, key=lambda r: r["n_users"])
    both = [r for r in rows if r.get("local_s") is not None and r.get("dask_s") is not None]
    top = both[-1] if both else (rows[-1] if rows else {})
    return {"machine_cores": os.cpu_count(), **top, "rows": rows}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="100k", help="comma-separated: 10k, 100k, 300k, 1m")
    ap.add_argument("--work", type=Path, default=ROOT / "bench" / "out" / "distributed")
    ap.add_argument("--mem-cap-gb", type=float, default=6.0, help="cap of each measured child")
    ap.add_argument(
        "--cluster-cap-gb",
        type=float,
        default=8.0,
        help="cap of the scheduler + workers together (a guard; 1M users peaked at 5.5 GB)",
    )
    ap.add_argument(
        "--data",
        type=Path,
        default=Path("/work/data/scale"),
        help="directory of LABEL/{train,test}.csv already written (used when present)",
    )
    ap.add_argument("--skip-local", action="store_true", help="only the Dask run")
    ap.add_argument("--dask-files", type=int, default=8, help="input files of the Dask run")
    ap.add_argument("--time-limit", type=float, default=3600.0)
    ap.add_argument("--tune", action="store_true", help="tune on both engines (default: --no-tune)")
    ap.add_argument(
        "--epsilon", type=float, default=None, help="private training (train --epsilon) on both"
    )
    ap.add_argument("--json", action="store_true", help="print the result object")
    ap.add_argument("--docs-only", action="store_true", help="rewrite the docs table from --out")
    ap.add_argument("--no-write", action="store_true", help="do not rewrite docs/scale.md")
    ap.add_argument("--out", type=Path, default=None, help="default docs/results/distributed.json")
    args = ap.parse_args(argv)
    if args.out is None:
        name = "distributed.json" if args.epsilon is None else "distributed_private.json"
        args.out = ROOT / "docs" / "results" / name
    rows = []
    if not args.docs_only:
        rows = [run_size(s.strip().lower(), args) for s in args.sizes.split(",") if s.strip()]
    prev = json.loads(args.out.read_text()) if args.out.exists() else {"rows": []}
    keep = [r for r in prev.get("rows", []) if r["n_users"] not in {x["n_users"] for x in rows}]
    result = compose(keep + rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    if not args.no_write:
        write_docs(result, private=args.epsilon is not None)
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
