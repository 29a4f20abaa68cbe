"""`lrs-rec train --engine dask --scheduler ADDRESS` on a cluster started as separate processes with
the real `dask scheduler` and `dask worker` commands (ports chosen by the OS, always stopped), compared
with the local engine; and a worker killed mid-run gives the same model or a clear error."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("distributed")

from lrs_rec.training.config import TrainConfig
from lrs_rec.training.loaders import LoadOptions, load_ratings
from lrs_rec.training.pipeline import train
from lrs_rec.training.synthetic_scale import make_biased_mf, write_csv

DASK = str(Path(sys.executable).with_name("dask"))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A scheduler and two workers (each its own `dask worker` process, one thread); every port
    chosen by the OS (the scheduler's address read from its scheduler file)."""
    from distributed import Client

    sched_file = tmp_path_factory.mktemp("dask_cluster") / "scheduler.json"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    quiet: dict[str, Any] = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL, "env": env}
    procs = [
        subprocess.Popen(
            [
                DASK,
                "scheduler",
                "--host",
                "127.0.0.1",
                "--port",
                "0",
                "--no-dashboard",
                "--dashboard-address",
                "127.0.0.1:0",
                "--scheduler-file",
                str(sched_file),
            ],
            **quiet,
        )
    ]
    try:
        deadline = time.monotonic() + 60
        while not sched_file.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        address = json.loads(sched_file.read_text())["address"]
        for _ in range(2):
            procs.append(
                subprocess.Popen(
                    [
                        DASK,
                        "worker",
                        address,
                        "--nthreads",
                        "1",
                        "--no-dashboard",
                        "--host",
                        "127.0.0.1",
                    ],
                    **quiet,
                )
            )
        with Client(address, timeout="30s") as c:
            c.wait_for_workers(2, timeout=60)
        yield address
    finally:
        for p in reversed(procs):
            p.send_signal(signal.SIGTERM)
        for p in reversed(procs):
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


@pytest.fixture(scope="module")
def ratings_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    log = make_biased_mf(300, 150, random_state=5, rank=4, median_per_user=10, mean_per_user=16)
    return write_csv(log, tmp_path_factory.mktemp("dask_cli") / "train.csv")


FLAGS = ["--dim", "8", "--rank", "3", "--sparsity", "2", "--n-iter", "5", "--tune-trials", "1"]


def test_train_through_a_dask_scheduler_and_workers_started_by_their_cli(
    cluster: str,
    ratings_csv: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from lrs_rec.serving.cli import main

    from lrs_rec.model_dir import load_model_dir

    monkeypatch.setenv("LRS_HOME", str(tmp_path / "home"))
    base = ["train", "--ratings", str(ratings_csv), "--quiet", "--no-export", "--json", *FLAGS]
    assert main([*base, "--out", str(tmp_path / "local")]) == 0
    local = json.loads(capsys.readouterr().out)
    assert (
        main([*base, "--out", str(tmp_path / "dask"), "--engine", "dask", "--scheduler", cluster])
        == 0
    )
    dask = json.loads(capsys.readouterr().out)
    assert dask["n_ratings"] == local["n_ratings"]
    assert dask["tuned"] == local["tuned"]
    assert dask["val_rmse"] == pytest.approx(local["val_rmse"], rel=1e-6)
    a, b = load_model_dir(tmp_path / "local"), load_model_dir(tmp_path / "dask")
    assert b.manifest["engine"]["workers"] == 2
    assert b.manifest["metrics"]["best_iteration"] == a.manifest["metrics"]["best_iteration"]
    users = np.arange(a.n_users)
    for i in (0, 7, 42):
        items = np.full(a.n_users, i)
        np.testing.assert_allclose(b.predict(users, items), a.predict(users, items), rtol=1e-6)


def test_user_ids_numbered_by_separate_worker_processes_are_the_local_vocabulary(
    cluster: str, tmp_path: Path
) -> None:
    """training/dask_ids.py on the real `dask worker` processes: 3 files of mixed id shapes
    (numbers, leading zeros, 20 digits, strings, non-ASCII), overlapping; forced to 4 ranges."""
    from distributed import Client
    from lrs_rec.training.dask_engine import Run
    from lrs_rec.training.dask_ids import user_index
    from lrs_rec.training.dask_input import load_file
    from lrs_rec.training.vocab import Vocabulary

    ids = ["10", "2", "007", "7", "u10", "u9", "b", "a", "99999999999999999999", "²", "é", "0"]
    files = [ids[:5], ids[3:9], ids[8:] + ids[:2]]
    for j, users in enumerate(files):
        (tmp_path / f"{j}.csv").write_text(
            "user,item,rating\n" + "".join(f"{u},i{k},{1 + k % 5}\n" for k, u in enumerate(users))
        )
    with Client(cluster, timeout="30s") as c:
        run = Run(c)
        loads = [run.submit(load_file, str(tmp_path / f"{j}.csv"), LoadOptions()) for j in range(3)]
        index = user_index(run, loads, seed=0, n_workers=4)
        want = list(Vocabulary.from_ids_reference(ids).ids)
        assert [i for r in run.gather(index.ranges) for i in r.tolist()] == want
        assert index.ids_at(run, np.arange(len(want))).tolist() == want
        assert index.counts.size == 4


@pytest.mark.parametrize("when", ["input", "fit"])
def test_a_worker_killed_mid_run_gives_the_same_model_or_a_clear_error(
    cluster: str, ratings_csv: Path, tmp_path: Path, when: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGKILL one worker process while the files are read ("input") or half-way through the fit:
    its nanny restarts it; Dask recomputes the lost partitions from their lineage (every task is
    pure; a loss in the input phase reads the files again) — the model must be the one of an
    undisturbed run; if the cluster cannot recover, a ClusterError with a one-line message, and
    never a hang (bounded: the run must end within 120 s of the kill)."""
    from distributed import Client
    from lrs_rec.training import dask_engine
    from lrs_rec.training.dask_engine import ClusterError, train_dask

    from lrs_rec.model_dir import load_model_dir

    monkeypatch.setattr(dask_engine, "STALL_SECONDS", 30.0)
    monkeypatch.setattr(dask_engine, "STALL_POLL", 1.0)
    # no early stop: all 8 iterations run (the run lasts a few seconds); 3 input files
    cfg = replace(
        TrainConfig(dim=8, rank=3, sparsity=2, n_iter=8, init_iter=6, patience=0), tune=False
    )
    local = train(load_ratings(ratings_csv), cfg, progress=False)
    files = tmp_path / "in"
    files.mkdir()
    head, *rows = ratings_csv.read_text().splitlines(keepends=True)
    for j in range(3):
        (files / f"part-{j}.csv").write_text(
            head + "".join(rows[j * len(rows) // 3 : (j + 1) * len(rows) // 3])
        )
    out: dict[str, Any] = {}

    def transitions(dask_scheduler: Any) -> int:
        return int(dask_scheduler.transition_counter)

    def _in_input_phase(dask_scheduler: Any) -> bool:
        """Whether the partitions are still being built (files read and split)."""
        return any(
            str(k).startswith("build_partition") and ts.state in ("waiting", "processing")
            for k, ts in dask_scheduler.tasks.items()
        )

    def run(name: str) -> Any:
        return train_dask(
            str(files), LoadOptions(), cfg, client, out_dir=tmp_path / name, progress=False
        )

    with Client(cluster, timeout="30s") as client:
        # an undisturbed run first: how many scheduler transitions the whole run takes, so that
        # the kill lands half-way through the work (by progress, not by a clock: on an idle
        # machine the run takes under 2 s)
        c0 = client.run_on_scheduler(transitions)
        run("m0")
        total = client.run_on_scheduler(transitions) - c0
        pids = client.run(os.getpid)
        victim = sorted(pids.values())[0]

        def work() -> None:
            try:
                out["result"] = run("m1")
            except Exception as e:  # checked below: only a ClusterError may end the run
                out["error"] = e

        c1 = client.run_on_scheduler(transitions)
        t = threading.Thread(target=work)
        t.start()
        if when == "input":
            while t.is_alive() and not client.run_on_scheduler(_in_input_phase):
                time.sleep(0.002)
        else:
            while t.is_alive() and client.run_on_scheduler(transitions) - c1 < total // 2:
                time.sleep(0.01)
        assert t.is_alive(), "the run ended before the kill"
        os.kill(victim, signal.SIGKILL)
        t.join(timeout=120)
        assert not t.is_alive(), "the run hung after a worker was killed"
        client.wait_for_workers(2, timeout=120)  # the nanny brings the worker back
    print("outcome:", repr(out.get("error", "recomputed")))
    if "error" in out:
        assert isinstance(out["error"], ClusterError), repr(out["error"])
        msg = str(out["error"])
        assert "\n" not in msg and "Dask cluster" in msg
        assert not (tmp_path / "m1").exists()
        return
    got = out["result"]
    m = got.manifest["metrics"]
    assert m["best_iteration"] == local.model.manifest["metrics"]["best_iteration"]
    for a, b in zip(local.history, got.history, strict=True):
        assert b["val_rmse"] == pytest.approx(a["val_rmse"], rel=1e-6)
    model = load_model_dir(tmp_path / "m1")
    np.testing.assert_allclose(model.user_bias, local.model.user_bias, rtol=1e-6, atol=1e-8)


def _one_thread_cluster() -> Any:
    """A LocalCluster of one in-process worker thread (the stall-guard tests scale it to 0)."""
    from distributed import LocalCluster

    return LocalCluster(
        n_workers=1,
        threads_per_worker=1,
        processes=False,
        scheduler_port=0,
        dashboard_address=None,
        silence_logs=50,
    )


def test_a_cluster_left_without_workers_fails_with_one_line_instead_of_hanging(
    ratings_csv: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every worker gone for good (no nanny brings one back): the run stops with ClusterError
    after STALL_SECONDS without progress, and writes nothing."""
    from distributed import Client
    from lrs_rec.training import dask_engine
    from lrs_rec.training.dask_engine import ClusterError, train_dask

    monkeypatch.setattr(dask_engine, "STALL_SECONDS", 3.0)
    monkeypatch.setattr(dask_engine, "STALL_POLL", 0.5)
    cfg = replace(TrainConfig(dim=8, rank=3, sparsity=2, n_iter=50, patience=0), tune=False)
    out: dict[str, Any] = {}
    with (
        _one_thread_cluster() as lc,
        Client(lc) as client,
    ):

        def work() -> None:
            try:
                train_dask(
                    str(ratings_csv), LoadOptions(), cfg, client, out_dir=tmp_path / "m",
                    progress=False,
                )  # fmt: skip
            except Exception as e:
                out["error"] = e

        t = threading.Thread(target=work)
        t.start()
        while (
            t.is_alive()
            and client.run_on_scheduler(lambda dask_scheduler: dask_scheduler.transition_counter)
            < 300
        ):
            time.sleep(0.01)
        lc.scale(0)
        t.join(timeout=60)
        assert not t.is_alive(), "the run hung without workers"
    err = out.get("error")
    assert isinstance(err, ClusterError), repr(err)
    assert "Dask cluster" in str(err) and "\n" not in str(err)
    assert not (tmp_path / "m").exists()


def test_waiting_on_work_no_worker_can_run_stops_with_a_one_line_error() -> None:
    """The stall guard itself: a task that no worker may run (restricted to a worker that does
    not exist) waits forever in Dask; Run.wait gives up after STALL_SECONDS without progress."""
    from distributed import Client
    from lrs_rec.training import dask_engine

    with (
        _one_thread_cluster() as lc,
        Client(lc) as client,
    ):
        old = dask_engine.STALL_SECONDS, dask_engine.STALL_POLL
        dask_engine.STALL_SECONDS, dask_engine.STALL_POLL = 2.0, 0.5
        try:
            run = dask_engine.Run(client)
            fut = client.submit(sum, [1, 2], workers=["tcp://127.0.0.1:1"], pure=False)
            t0 = time.monotonic()
            with pytest.raises(dask_engine.ClusterError, match="stalled: no task ran for 2 s"):
                run.gather(fut)
            assert time.monotonic() - t0 < 30
            assert run.gather(client.submit(sum, [1, 2], pure=False)) == 3  # progress: no error
        finally:
            dask_engine.STALL_SECONDS, dask_engine.STALL_POLL = old


def test_private_training_through_a_dask_scheduler_and_workers_started_by_their_cli(
    cluster: str,
    ratings_csv: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`train --epsilon --engine dask --scheduler`: the local private trainer's ledger and model
    (within float tolerance), written by the workers as a model directory load_model_dir reads."""
    from lrs_rec.serving.cli import main

    from lrs_rec.model_dir import load_model_dir

    monkeypatch.setenv("LRS_HOME", str(tmp_path / "home"))
    base = ["train", "--ratings", str(ratings_csv), "--rating-scale", "1", "5", "--epsilon", "1",
            "--dp-noise-seed", "7", "--quiet", "--no-export", "--json"]  # fmt: skip
    assert main([*base, "--out", str(tmp_path / "local")]) == 0
    local = json.loads(capsys.readouterr().out)
    dask_cmd = [*base, "--out", str(tmp_path / "dask"), "--engine", "dask", "--scheduler", cluster]
    assert main(dask_cmd) == 0
    dask = json.loads(capsys.readouterr().out)
    for key in ("epsilon", "delta", "accountant", "epsilon_theorem2_zcdp", "n_ratings", "dims"):
        assert dask[key] == local[key], key
    assert dask["train_rmse"] == pytest.approx(local["train_rmse"], rel=1e-9)
    a, b = load_model_dir(tmp_path / "local"), load_model_dir(tmp_path / "dask")
    assert b.manifest["privacy"] == a.manifest["privacy"]
    assert b.manifest["engine"]["workers"] == 2
    users = np.arange(a.n_users)
    for i in (0, 7, 42):
        items = np.full(a.n_users, i)
        np.testing.assert_allclose(b.predict(users, items), a.predict(users, items), atol=1e-9)
