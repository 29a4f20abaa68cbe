"""Batch commands benchmark: wall time, CPU time and peak memory of `lrs-rec predict` (streaming)
against the obvious in-memory way (read the whole file, predict, write), for growing files.

A random model of ML-100K size and the training defaults' shapes (943 users, 1 682 items, d=32,
r=16, k=4) is written to a temporary directory with CSV files of N random (user, item) pairs (ids
drawn from 1 000 users and 1 700 items, so some are unknown). Every run is a separate process with
one BLAS thread; its peak RSS is that process's ``VmHWM`` (Linux), its CPU time includes imports:

- ``stream_csv``      ``lrs-rec predict --pairs pairs.csv --out out.csv`` (default --chunk-size)
- ``stream_parquet``  the same, writing Parquet
- ``stream_chunk10k`` ``--chunk-size 10000``, writing CSV
- ``in_memory``       pyarrow.csv.read_csv of the whole file, ``lrs_rec.load_model(...).predict``
                      on every pair at once, one write — the yardstick streaming must beat on memory
- ``baseline``        imports + loading the model only

    python bench/batch.py                 # N = 1M and 10M; writes docs/results/batch.json
    python bench/batch.py --quick --json --no-write
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results" / "batch.json"

_MEASURE = """
import resource, sys, time
t = time.perf_counter()
{body}
wall = time.perf_counter() - t
ru = resource.getrusage(resource.RUSAGE_SELF)
# VmHWM (this process's peak RSS since exec); ru_maxrss keeps the forking parent's from before exec
hwm = [line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM:")][0]
print(f"{{wall}} {{ru.ru_utime + ru.ru_stime}} {{hwm}}", file=sys.stderr)
"""

BODIES = {
    "baseline": "import lrs_rec, pyarrow.csv\nlrs_rec.load_model(sys.argv[1])",
    "stream": "from lrs_rec.serving.cli import main\n"
    "assert main(['predict', '--model', sys.argv[1], '--pairs', sys.argv[2], '--out', sys.argv[3],"
    " '--quiet', *sys.argv[4:]]) == 0",
    "in_memory": "import lrs_rec, pyarrow as pa, pyarrow.csv as pc\n"
    "m = lrs_rec.load_model(sys.argv[1])\n"
    "t_ = pc.read_csv(sys.argv[2], convert_options=pc.ConvertOptions("
    "column_types={'user': pa.string(), 'item': pa.string()}))\n"
    "u, i = t_.column('user').to_pylist(), t_.column('item').to_pylist()\n"
    "pc.write_csv(pa.table({'user': u, 'item': i, 'prediction': m.predict(u, i)}), sys.argv[3])",
}


def run(kind: str, *args: str) -> dict[str, float]:
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    code = _MEASURE.format(body=BODIES[kind])
    proc = subprocess.run(
        [sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} {args}: {proc.stderr[-2000:]}")
    wall, cpu, rss_kb = proc.stderr.strip().splitlines()[-1].split()
    return {
        "wall_s": round(float(wall), 2),
        "cpu_s": round(float(cpu), 2),
        "peak_rss_mb": round(int(rss_kb) / 1024, 1),
    }


def write_pairs(path: Path, n: int, seed: int = 0) -> None:
    import numpy as np
    import pyarrow as pa
    import pyarrow.csv as pc

    rng = np.random.default_rng(seed)
    with pc.CSVWriter(path, pa.schema([("user", pa.string()), ("item", pa.string())])) as w:
        for lo in range(0, n, 1_000_000):
            m = min(1_000_000, n - lo)
            users = np.char.add("u", rng.integers(0, 1000, m).astype(str))
            items = np.char.add("i", rng.integers(0, 1700, m).astype(str))
            w.write_table(pa.table({"user": users, "item": items}))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 10_000_000])
    ap.add_argument("--quick", action="store_true", help="N = 100k and 1M")
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    ap.add_argument("--no-write", action="store_true", help=f"do not write {RELATIVE}")
    args = ap.parse_args()
    rows = [100_000, 1_000_000] if args.quick else args.rows

    from lrs_rec.training.testing import random_trained_model, write_model_dir

    out: dict[str, Any] = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "note": "measured under shared load; each run a separate process, one BLAS thread",
        "runs": [],
    }
    with tempfile.TemporaryDirectory(prefix="lrs-bench-batch-") as tmp:
        d = Path(tmp)
        model = random_trained_model(
            n_users=943, n_items=1682, d=32, rank=16, sparsity=4, ratings_per_user=20
        )
        write_model_dir(model, d / "m")
        out["baseline"] = run("baseline", str(d / "m"))
        for n in rows:
            pairs = d / "pairs.csv"
            write_pairs(pairs, n)
            entry: dict[str, Any] = {"rows": n, "input_mb": round(pairs.stat().st_size / 2**20, 1)}
            m = str(d / "m")
            entry["stream_csv"] = run("stream", m, str(pairs), str(d / "o.csv"))
            entry["stream_parquet"] = run("stream", m, str(pairs), str(d / "o.parquet"))
            entry["stream_chunk10k"] = run(
                "stream", m, str(pairs), str(d / "o2.csv"), "--chunk-size", "10000"
            )
            entry["in_memory"] = run("in_memory", m, str(pairs), str(d / "o3.csv"))
            out["runs"].append(entry)
            print(json.dumps(entry), file=sys.stderr)
            for f in d.glob("o*"):
                f.unlink()
    if args.json:
        print(json.dumps(out, indent=2))
    if not args.no_write:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(out, indent=2) + "\n")
        print(f"wrote {RELATIVE}", file=sys.stderr)
    return 0


RELATIVE = RESULTS.relative_to(ROOT)

if __name__ == "__main__":
    t0 = time.time()
    rc = main()
    print(f"done in {time.time() - t0:.0f} s", file=sys.stderr)
    raise SystemExit(rc)
