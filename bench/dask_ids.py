"""The Dask driver's memory for the user ids: merged on the driver (the previous path) against
numbered on the cluster (training/dask_ids.py), at several numbers of users.

Data: ``--files`` Parquet files (``user,item,rating``, string ids ``u<k>`` as bench/scale.py's
CSV; 1–7 ratings per user, 4 on average, 20k items; rows shuffled, so every file holds most
users' first ids) under ``--work`` (default /tmp/h-ids/ids), written once per size. A cluster
started with the real CLI (`dask scheduler`, 2 × `dask worker --nthreads 1`, ports chosen by the
OS). For each size and each path, a driver child process connects, has the workers read the files,
waits, then runs only the id phase of `train --engine dask`: the number of users and the first id
of each of 2 partitions (``partition_bounds``). It reports its VmRSS before the phase, its peak RSS
(``VmHWM``) after, the phase's seconds and the bytes it received (``Run.bytes_to_driver``).
Both paths must give the same n_users and partition splitters (checked).

    nice -n 5 python bench/dask_ids.py --sizes 100k,1m,3m --json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]
SIZES = {"10k": 10_000, "100k": 100_000, "1m": 1_000_000, "3m": 3_000_000, "10m": 10_000_000}
PATHS = ("driver_merge", "distributed")


def _bench_distributed() -> Any:
    spec = importlib.util.spec_from_file_location("bench_dist", ROOT / "bench" / "distributed.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def write_files(n_users: int, n_files: int, out: Path, seed: int = 0) -> list[Path]:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = [out / f"part-{j:03d}.parquet" for j in range(n_files)]
    if all(f.exists() for f in files):
        return files
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    per_user = rng.integers(1, 8, n_users)
    users = np.repeat(np.arange(n_users), per_user)
    rng.shuffle(users)
    n = users.size
    cuts = np.linspace(0, n, n_files + 1).astype(np.int64)
    for j, f in enumerate(files):
        u = users[cuts[j] : cuts[j + 1]]
        table = pa.table(
            {
                "user": pa.array(np.char.add("u", u.astype(str))),
                "item": pa.array(np.char.add("i", rng.integers(0, 20_000, u.size).astype(str))),
                "rating": pa.array(rng.integers(1, 6, u.size).astype(np.float64)),
            }
        )
        pq.write_table(table, f)
    return files


def _status_mb(field: str) -> float:
    """VmRSS / VmHWM of this process (VmHWM: this process image's peak; ``ru_maxrss`` would
    carry over the parent's peak through fork + exec)."""
    with open("/proc/self/status") as f:
        return next(int(ln.split()[1]) for ln in f if ln.startswith(field + ":")) / 1024


def child(path: str, address: str, files: list[str]) -> dict[str, Any]:
    """The driver: the id phase only (the previous path or the distributed one)."""
    import numpy as np
    from distributed import Client
    from lrs_rec.training.dask_engine import Run, partition_bounds
    from lrs_rec.training.dask_ids import file_user_ids, user_index
    from lrs_rec.training.dask_input import load_file, merge_sorted_ids
    from lrs_rec.training.loaders import LoadOptions

    with Client(address, timeout="30s") as c:
        run = Run(c)
        loads = [run.submit(load_file, f, LoadOptions()) for f in files]
        run.wait(loads)
        base = _status_mb("VmRSS")
        t0 = time.perf_counter()
        ranges = 0
        if path == "driver_merge":  # main before this change: every file's ids, merged here
            users = np.zeros(0, str)
            for f in [run.submit(file_user_ids, t) for t in loads]:
                users = merge_sorted_ids([users, run.gather(f)])
                del f
            n_users = int(users.size)
            splitters = users[partition_bounds(n_users, 2)[1:-1]]
            del users
        else:
            index = user_index(run, loads, seed=0, n_workers=2)
            n_users, ranges = index.n_users, int(index.counts.size)
            splitters = index.ids_at(run, partition_bounds(n_users, 2)[1:-1])
            index.release()
        seconds = time.perf_counter() - t0
    return {
        "path": path,
        "n_users": n_users,
        "splitters": splitters.tolist(),
        "ranges": ranges,
        "seconds": round(seconds, 3),
        "rss_before_mb": round(base, 1),
        "peak_rss_mb": round(_status_mb("VmHWM"), 1),
        "bytes_to_driver": run.bytes_to_driver,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="100k,1m")
    ap.add_argument("--files", type=int, default=8)
    ap.add_argument("--work", type=Path, default=Path("/tmp/h-ids/ids"))
    ap.add_argument("--cluster-cap-gb", type=float, default=5.0)
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "dask_ids.json")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)  # PATH ADDRESS FILE...
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child[0], args.child[1], args.child[2:])))
        return 0
    dist = _bench_distributed()
    rows = []
    for label in args.sizes.split(","):
        files = write_files(SIZES[label], args.files, args.work / label)
        row: dict[str, Any] = {"users": SIZES[label], "files": args.files}
        row["load_before"] = os.getloadavg()[0]
        cluster = dist.DaskCluster(2, args.cluster_cap_gb, args.work)
        try:
            for path in PATHS:
                argv_c = [sys.executable, __file__, "--child", path, cluster.address]
                out = subprocess.run([*argv_c, *map(str, files)], capture_output=True, text=True)
                if out.returncode != 0:
                    raise RuntimeError(f"{path} at {label}: {out.stderr.strip()[-2000:]}")
                row[path] = json.loads(out.stdout.strip().splitlines()[-1])
                print(f"[{label}] {path}: {row[path]}", file=sys.stderr)
            row["worker_peak_rss_mb"] = [round(w["maxrss_mb"], 1) for w in cluster.worker_stats()]
        finally:
            cluster.stop()
        if cluster.killed:
            row["killed"] = cluster.killed
        row["load_after"] = os.getloadavg()[0]
        a, b = row["driver_merge"], row["distributed"]
        row["same_result"] = (a["n_users"], a["splitters"]) == (b["n_users"], b["splitters"])
        if not row["same_result"]:
            raise RuntimeError(f"{label}: the two paths disagree: {a} vs {b}")
        rows.append(row)
    result = {"benchmark": "dask_ids", "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    if args.json:
        print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
