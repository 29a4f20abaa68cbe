"""``lrs-rec publish --engine dask`` (issue 15): Dask workers write the shards of a model directory;
Redis then holds exactly what the single-process publish writes (every key, every value)."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from lrs_rec.serving.cli import main
from lrs_rec.serving.connection import connect, stop_embedded
from lrs_rec.serving.store import RedisStore
from lrs_rec.training.testing import random_trained_model

from lrs_rec.model_dir import save_model_dir

pytest.importorskip("distributed")
pytestmark = pytest.mark.redis

N_USERS, BUCKET, SHARD_ROWS = 700, 64, 100  # shards straddle buckets: two workers share a hash
# the LocalCluster: every port chosen by the OS (the scheduler's HTTP server too, else 8787);
# the CLI-started cluster: fixed ports in 18500-18549 (its scheduler port is checked freed)
LOCAL_PORTS = {
    "scheduler_port": 0,
    "dashboard_address": "127.0.0.1:0",
    "worker_port": 0,
    "port": 0,
}
SCHED_PORT, WORKER_PORTS, NANNY_PORTS = 18502, "18510:18529", "18530:18549"
ERASED = "u5"


def _model():  # type: ignore[no-untyped-def]
    m = random_trained_model(
        n_users=N_USERS, n_items=50, d=8, rank=3, sparsity=2, ratings_per_user=7, random_state=4
    )
    rng = np.random.default_rng(1)  # rating times out of stored order: the publish sorts them
    ts = rng.integers(0, 10**6, size=m.history_items.size).astype(np.float64)
    return dataclasses.replace(m, history_timestamps=ts, manifest={"model_version": "m-dask"})


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from lrs_rec.training.export import export_model_dir

    out = tmp_path_factory.mktemp("dask") / "m"
    save_model_dir(_model(), out, shard_rows=SHARD_ROWS)
    export_model_dir(out)
    assert len(list((out / "users").iterdir())) == 7
    return out


def _dump(store: RedisStore) -> dict[bytes, object]:
    """Every key of the store and its value (hashes as dicts); version metadata without times."""
    r = store.r
    out: dict[bytes, object] = {}
    for key in r.scan_iter(count=1000):
        kind = r.type(key)
        if kind == b"hash":
            out[key] = r.hgetall(key)
        elif kind == b"string":
            out[key] = r.get(key)
        else:  # pragma: no cover - the layout has no other type
            raise AssertionError(f"unexpected key type {kind!r} of {key!r}")
    versions = out.get(store.keys.versions, {})
    assert isinstance(versions, dict)
    for v, raw in versions.items():
        meta = json.loads(raw)
        for k in ("created_at", "published_at", "model_dir"):
            meta.pop(k)
        versions[v] = meta
    return out


def _store(home: Path) -> RedisStore:
    store = RedisStore(connect(home=home, socket_timeout=60.0))
    store.r.hset(store.keys.erased, ERASED, b"123")  # an erased user: never written
    return store


def test_localcluster_publish_equals_single_process_publish(model_dir, tmp_path):
    from lrs_rec.serving.publish_dask import publish_dask
    from lrs_rec.serving.store import user_block

    from lrs_rec.model_dir import load_model_dir, load_shared_model_dir
    from lrs_rec.model_shards import iter_user_shards

    homes = {name: tmp_path / name for name in ("library", "blocks", "dask")}
    dumps = {}
    try:
        one = _store(homes["library"])  # the whole model in memory, one block
        one.publish(load_model_dir(model_dir), model_dir=str(model_dir), bucket_size=BUCKET)
        dumps["library"] = _dump(one)
        blocks = _store(homes["blocks"])  # the CLI's local engine: shard after shard
        shared = load_shared_model_dir(model_dir)
        blocks.publish_blocks(
            shared,
            (user_block(s) for s in iter_user_shards(model_dir)),
            model_dir=str(model_dir),
            bucket_size=BUCKET,
        )
        dumps["blocks"] = _dump(blocks)
        dask = _store(homes["dask"])
        meta = publish_dask(
            dask, model_dir, workers=2, bucket_size=BUCKET, cluster_options=LOCAL_PORTS
        )
        assert meta.status == "ready" and dask.current_version() == meta.version
        dumps["dask"] = _dump(dask)
    finally:
        for home in homes.values():
            stop_embedded(home, save=False)
    assert dumps["dask"] == dumps["library"]
    assert dumps["blocks"] == dumps["library"]
    # the comparison is not vacuous: every trained user but the erased one has a record
    records = [v for k, v in dumps["dask"].items() if k.endswith(b":p")]
    assert sum(len(h) for h in records) == N_USERS - 1  # type: ignore[arg-type]
    assert b"5" not in dumps["dask"][b"lrs:v1:{b0}:p"]  # type: ignore[operator]


def _free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def _wait_workers(address: str, n: int, timeout: float = 30.0) -> None:
    from distributed import Client

    with Client(address, timeout="20s") as client:
        client.wait_for_workers(n, timeout=timeout)


def test_publish_through_a_running_dask_cluster_equals_local_publish(
    model_dir, tmp_path, monkeypatch
):
    """``dask scheduler`` and ``dask worker`` started as separate processes; ``lrs-rec publish
    --engine dask --scheduler`` against them writes what ``--engine local`` writes."""
    dask_cli = shutil.which("dask", path=os.path.dirname(sys.executable))
    assert dask_cli is not None, "the dask command is installed with the dask extra"
    assert _free(SCHED_PORT), f"port {SCHED_PORT} is taken"
    address = f"tcp://127.0.0.1:{SCHED_PORT}"
    env = {**os.environ, "DASK_DISTRIBUTED__WORKER__DAEMON": "False"}
    logs = tmp_path / "logs"
    logs.mkdir()
    procs = []
    homes = {"local": tmp_path / "local", "dask": tmp_path / "dask"}
    dumps = {}
    try:
        procs.append(
            subprocess.Popen(
                [
                    *(dask_cli, "scheduler", "--host", "127.0.0.1", "--port", str(SCHED_PORT)),
                    *("--dashboard-address", "127.0.0.1:0", "--no-dashboard", "--no-show"),
                ],
                stdout=subprocess.DEVNULL,
                stderr=(logs / "scheduler.log").open("w"),
                env=env,
            )
        )
        procs.append(
            subprocess.Popen(
                [
                    *(dask_cli, "worker", address, "--nworkers", "2", "--nthreads", "1"),
                    *("--host", "127.0.0.1", "--worker-port", WORKER_PORTS),
                    *("--nanny-port", NANNY_PORTS, "--no-dashboard"),
                ],
                stdout=subprocess.DEVNULL,
                stderr=(logs / "worker.log").open("w"),
                env=env,
            )
        )
        _wait_workers(address, 2)
        for name, engine in (("local", []), ("dask", ["--engine", "dask", "--scheduler", address])):
            monkeypatch.setenv("LRS_HOME", str(homes[name]))
            store = _store(homes[name])
            argv = ["publish", "--model", str(model_dir), "--bucket-size", str(BUCKET), "--json"]
            assert main([*argv, *engine]) == 0
            dumps[name] = _dump(store)
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in reversed(procs):
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for home in homes.values():
            stop_embedded(home, save=False)
    assert dumps["dask"] == dumps["local"]
    assert sum(len(v) for k, v in dumps["dask"].items() if k.endswith(b":h")) == N_USERS - 1
    deadline = time.monotonic() + 5
    while not _free(SCHED_PORT) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _free(SCHED_PORT), "the scheduler process is gone"


def test_scheduler_without_dask_engine_is_refused(model_dir, capsys):
    assert main(["publish", "--model", str(model_dir), "--scheduler", "tcp://x:1"]) == 2
    assert "--scheduler needs --engine dask" in capsys.readouterr().err


def test_a_failing_shard_fails_the_publish_and_nothing_switches(model_dir, tmp_path):
    """A damaged shard: its task fails (after Dask's retries), the version is marked failed, the
    served version stays; threads-only cluster (inproc transport, no worker processes) for speed."""
    from lrs_rec.serving.publish_dask import publish_dask

    from lrs_rec.model_dir import ModelDirError

    broken = tmp_path / "broken"
    shutil.copytree(model_dir, broken)
    import pyarrow as pa
    import pyarrow.parquet as pq

    # ids intact (the driver reads only those), a NaN bias that the worker's read refuses
    shard = broken / "users" / "part-00003.parquet"
    table = pq.read_table(shard)
    nan = pa.array(np.full(table.num_rows, np.nan))
    pq.write_table(table.set_column(table.column_names.index("user_bias"), "user_bias", nan), shard)
    threads = {"processes": False, "dashboard_address": "127.0.0.1:0"}
    home = tmp_path / "h"
    try:
        store = _store(home)
        first = publish_dask(
            store, model_dir, workers=2, bucket_size=BUCKET, cluster_options=threads
        )
        with pytest.raises(
            ModelDirError, match=r"part-00003\.parquet: column user_bias contains NaN"
        ):
            publish_dask(store, broken, workers=2, bucket_size=BUCKET, cluster_options=threads)
        assert store.current_version() == first.version == "v1"
        assert store.meta("v2").status == "failed"
    finally:
        stop_embedded(home, save=False)
