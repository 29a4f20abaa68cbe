"""`lrs-rec train --engine dask`: a LocalCluster of 2 worker processes gives the local engine's model
(same iterations, RMSE within float tolerance); a directory of CSV + Parquet files is read by the
workers (same model as the concatenated file); a bad line names file:line."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

pytest.importorskip("distributed")

from lrs_rec.training.config import TrainConfig
from lrs_rec.training.loaders import LoadOptions, load_ratings
from lrs_rec.training.pipeline import train

CFG = TrainConfig(dim=8, rank=3, sparsity=2, n_iter=6, tune_trials=2, init_iter=4)


@pytest.fixture(scope="module")
def client() -> Any:
    from lrs_rec.training.dask_engine import dask_client

    with dask_client(None, 2) as c:
        yield c


def ml100k_subset(src: Path, out: Path, n_users: int = 150) -> Path:
    """The ratings of ML-100K users 1..n_users as a CSV with a header (comma-separated)."""
    rows = [ln.split("\t") for ln in src.read_text().splitlines()]
    out.write_text(
        "user,item,rating,timestamp\n"
        + "".join(",".join(r) + "\n" for r in rows if int(r[0]) <= n_users)
    )
    return out


@pytest.fixture(scope="module")
def split(ml100k_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(train.csv, test.csv): u1.base / u1.test of the first 150 users of MovieLens 100K."""
    d = tmp_path_factory.mktemp("dask")
    return (
        ml100k_subset(ml100k_dir / "u1.base", d / "train.csv"),
        ml100k_subset(ml100k_dir / "u1.test", d / "test.csv"),
    )


@pytest.fixture(scope="module")
def ratings_csv(split: tuple[Path, Path]) -> Path:
    return split[0]


def _test_rmse(model: Any, test: Path) -> float:
    """RMSE on the held-out ratings of known users and items."""
    table = load_ratings(test)
    users, items = model.user_index(), model.item_index()
    known = [(users[u], items[i], r) for u, i, r in zip(table.users, table.items, table.ratings, strict=True)
             if u in users and i in items]  # fmt: skip
    u, i, r = (np.array(x) for x in zip(*known, strict=True))
    pred = model.predict(u.astype(np.int64), i.astype(np.int64))
    return float(np.sqrt(np.mean((pred - r) ** 2)))


def dask_train(spec: Path, cfg: TrainConfig, client: Any, out: Path, **kw: Any) -> Any:
    """train_dask into ``out``, and the directory as written (loaded back whole)."""
    from lrs_rec.training.dask_engine import train_dask

    from lrs_rec.model_dir import load_model_dir

    res = train_dask(str(spec), LoadOptions(), cfg, client, out_dir=out, progress=False, **kw)
    return SimpleNamespace(model=load_model_dir(out), history=res.history, result=res)


def assert_same_model(local: Any, dask: Any, test: Path) -> None:
    """Same iterations chosen, same losses and parameters within float tolerance."""
    ml, md = local.model.manifest["metrics"], dask.model.manifest["metrics"]
    assert md["best_iteration"] == ml["best_iteration"]
    assert md["selected"] == ml["selected"]
    assert md["final_pass"] == ml["final_pass"]
    assert len(dask.history) == len(local.history)
    for a, b in zip(local.history, dask.history, strict=True):
        assert b["train_rmse"] == pytest.approx(a["train_rmse"], rel=1e-6)
        assert b["val_rmse"] == pytest.approx(a["val_rmse"], rel=1e-6)
    a, b = local.model, dask.model
    assert a.user_ids == b.user_ids and a.item_ids == b.item_ids
    # U is defined up to column signs (SVD there, eigh here); θ_u = U w_u is not
    np.testing.assert_allclose(b.lrs.W @ b.lrs.U.T, a.lrs.W @ a.lrs.U.T, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(b.user_bias, a.user_bias, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(b.item_features, a.item_features, rtol=1e-6, atol=1e-8)
    np.testing.assert_array_equal(b.history_indptr, a.history_indptr)
    np.testing.assert_array_equal(b.history_items, a.history_items)
    np.testing.assert_array_equal(b.history_ratings, a.history_ratings)
    # the population prior in θ coordinates (U's column signs may differ)
    Ua, Ub = a.lrs.U, b.lrs.U
    np.testing.assert_allclose(Ub @ b.w_prior_mean, Ua @ a.w_prior_mean, rtol=1e-6, atol=1e-8)
    # the target: test RMSE within 0.2 %
    assert _test_rmse(b, test) == pytest.approx(_test_rmse(a, test), rel=2e-3)


@pytest.mark.parametrize("dim, selected", [(8, "lrs"), (16, "biases")])
def test_local_cluster_of_two_workers_gives_the_local_model(
    client: Any,
    ratings_csv: Path,
    split: tuple[Path, Path],
    dim: int,
    selected: str,
    tmp_path: Path,
) -> None:
    """Tuned, early-stopped, kept-best and final-passed as the local engine; with d = 16 the
    local engine keeps biases alone (this subset is small), and so must Dask."""
    from dataclasses import replace

    cfg = replace(CFG, dim=dim)
    table = load_ratings(ratings_csv)
    local = train(table, cfg, progress=False)
    assert local.model.manifest["metrics"]["selected"] == selected
    stats: dict[str, Any] = {}
    dask = dask_train(ratings_csv, cfg, client, tmp_path / "m", stats=stats)
    assert stats["workers"] == 2 and stats["partitions"] == 2
    assert dask.model.manifest["tuning"]["chosen"] == local.model.manifest["tuning"]["chosen"]
    assert_same_model(local, dask, split[1])


def test_fixed_features_and_three_partitions_give_the_local_model(
    client: Any, ratings_csv: Path, split: tuple[Path, Path], tmp_path: Path
) -> None:
    """The U step (Eq. 5, reduced normal equations) and item biases only, over 3 partitions."""
    from dataclasses import replace

    cfg = replace(CFG, refine_features=False, tune=False, method="rep")
    table = load_ratings(ratings_csv)
    local = train(table, cfg, progress=False)
    dask = dask_train(ratings_csv, cfg, client, tmp_path / "m", partitions=3)
    assert_same_model(local, dask, split[1])


def _split_files(src: Path, out: Path) -> Path:
    """The rating file as a directory: two CSV files and one Parquet file (rows in order)."""
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    t = pacsv.read_csv(
        src,
        convert_options=pacsv.ConvertOptions(
            column_types={"user": pa.string(), "item": pa.string()}
        ),
    )
    out.mkdir()
    n = t.num_rows
    cuts = [0, n // 3, 2 * n // 3, n]
    pacsv.write_csv(t.slice(cuts[0], cuts[1] - cuts[0]), out / "part-0.csv")
    pacsv.write_csv(t.slice(cuts[1], cuts[2] - cuts[1]), out / "part-1.csv")
    pq.write_table(t.slice(cuts[2], cuts[3] - cuts[2]), out / "part-2.parquet")
    (out / "_SUCCESS").write_text("")  # skipped, as Spark writes it
    return out


def test_a_directory_of_csv_and_parquet_files_gives_the_model_of_their_concatenation(
    client: Any, ratings_csv: Path, split: tuple[Path, Path], tmp_path: Path
) -> None:
    from dataclasses import replace

    from lrs_rec.training.dask_input import expand_inputs

    cfg = replace(CFG, tune=False)
    d = _split_files(ratings_csv, tmp_path / "ratings")
    table = load_ratings(ratings_csv)
    local = train(table, cfg, progress=False)
    dask = dask_train(d, cfg, client, tmp_path / "m")
    assert dask.model.manifest["data"]["files"] == 3
    assert dask.model.manifest["data"]["n_ratings"] == len(table)
    assert_same_model(local, dask, split[1])
    # a glob names the same files (hidden and _-prefixed names are skipped in a directory)
    assert expand_inputs(str(d / "part-*")) == expand_inputs(str(d))
    assert [Path(f).name for f in expand_inputs(str(d))] == [
        "part-0.csv",
        "part-1.csv",
        "part-2.parquet",
    ]


def test_duplicates_across_files_keep_the_latest(client: Any, tmp_path: Path) -> None:
    from dataclasses import replace

    d = tmp_path / "dups"
    d.mkdir()
    rng = np.random.default_rng(0)
    rows = [
        (f"u{u}", f"i{i}", int(rng.integers(1, 6)), 1000 + j)
        for j, (u, i) in enumerate((u, i) for u in range(40) for i in range(12))
    ]
    head = "user,item,rating,timestamp\n"
    (d / "a.csv").write_text(head + "".join(f"{u},{i},{r},{t}\n" for u, i, r, t in rows))
    # the second file re-rates u0/i0 later (kept) and u1/i1 earlier (dropped)
    (d / "b.csv").write_text(head + "u0,i0,5,999999\nu1,i1,1,5\n")
    cfg = replace(CFG, tune=False, n_iter=2, dim=4, rank=2)
    m = dask_train(d, cfg, client, tmp_path / "m").model
    assert m.manifest["cleaning"]["counts"]["duplicates_removed"] == 2
    assert m.manifest["data"]["n_ratings"] == len(rows)
    u0, i0 = m.user_index()["u0"], m.item_index()["i0"]
    a, b = m.history_indptr[u0], m.history_indptr[u0 + 1]
    assert m.history_ratings[a:b][m.history_items[a:b] == i0].tolist() == [5.0]
    u1, i1 = m.user_index()["u1"], m.item_index()["i1"]
    a, b = m.history_indptr[u1], m.history_indptr[u1 + 1]
    want = [r for u, i, r, _ in rows if (u, i) == ("u1", "i1")]
    assert m.history_ratings[a:b][m.history_items[a:b] == i1].tolist() == [float(want[0])]


def test_a_bad_line_in_one_file_names_file_and_line(
    client: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from lrs_rec.serving.cli import main

    d = tmp_path / "bad"
    d.mkdir()
    (d / "a.csv").write_text("user,item,rating\n1,1,4\n2,1,3\n")
    (d / "b.csv").write_text("user,item,rating\n1,2,4\n2,2,five\n")
    monkeypatch.setenv("LRS_HOME", str(tmp_path / "home"))
    rc = main(
        ["train", "--ratings", str(d), "--out", str(tmp_path / "m"), "--engine", "dask",
         "--workers", "1", "--quiet", "--no-export"]
    )  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2
    assert f"{d / 'b.csv'}:3" in err and "five" in err
    assert not (tmp_path / "m").exists()


def test_engine_flags_are_checked(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from lrs_rec.serving.cli import main

    out = str(tmp_path / "m")
    rc = main(["train", "--ratings", "x.csv", "--out", out, "--scheduler", "tcp://h:1"])
    assert rc == 2 and "--scheduler needs --engine dask" in capsys.readouterr().err
    rc = main(["train", "--ratings", "x.csv", "--out", out, "--engine", "dask", "--workers", "0"])
    assert rc == 2 and "--workers must be >= 1" in capsys.readouterr().err
    # --epsilon runs on Dask (tests/test_training_dask_private.py): a missing input is one line,
    # before any cluster is started
    rc = main(["train", "--ratings", "x.csv", "--out", out, "--engine", "dask", "--epsilon", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "x.csv" in err[0]
    rc = main(["train", "--ratings", "x.csv", "--out", out, "--engine", "dask", "--method", "single",
               "--workers", "1"])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and "--method single is not supported with --engine dask" in err


def _backend_here() -> str:
    from lrs_rec.engine.parallel import kernels

    return "numpy" if kernels() is None else "numba"


def test_workers_run_the_drivers_kernel_backend(client: Any) -> None:
    from lrs_rec.training.dask_engine import _on_worker

    for backend in ("numba", "numpy", "numba"):
        assert client.submit(_on_worker, backend, _backend_here, pure=False).result() == backend


def test_the_workers_write_the_model_directory_that_readers_load_as_the_local_one(
    client: Any, ratings_csv: Path, split: tuple[Path, Path], tmp_path: Path
) -> None:
    """Format 2 written by the workers (several shards per partition here) loads with every
    reader like the local engine's saved directory: same users in the same dense order, the same
    parameters, histories (with times), shared arrays and population prior."""
    from dataclasses import replace

    from lrs_rec import model_shards as ms
    from lrs_rec.model_dir import load_model_dir, load_shared_model_dir, save_model_dir

    cfg = replace(CFG, tune=False)
    local = train(load_ratings(ratings_csv), cfg, progress=False)
    save_model_dir(local.model, tmp_path / "local")
    stats: dict[str, Any] = {}
    dask = dask_train(ratings_csv, cfg, client, tmp_path / "dask", shard_rows=64, stats=stats)
    a, b = load_model_dir(tmp_path / "local"), load_model_dir(tmp_path / "dask")
    man = b.manifest
    assert man["format_version"] == 2 and man["engine"]["partitions"] == 2
    # 150 users in 2 partitions of 75, at most 64 users per shard: 2 shards each
    assert man["user_shards"]["rows"] == [64, 11, 64, 11]
    assert man["user_shards"]["history_timestamps"] is True
    assert man["dims"] == a.manifest["dims"]
    assert ms.n_user_shards(tmp_path / "dask") == 4
    first = ms.read_user_shard(tmp_path / "dask", 2)
    assert first.start == 75 and list(first.user_ids) == list(a.user_ids[75:139])
    Ua, Ub = a.lrs.U, b.lrs.U
    np.testing.assert_allclose(
        Ub @ b.w_prior_cov @ Ub.T, Ua @ a.w_prior_cov @ Ua.T, rtol=1e-6, atol=1e-8
    )
    np.testing.assert_allclose(b.item_bias, a.item_bias, rtol=1e-6, atol=1e-8)
    assert b.global_mean == pytest.approx(a.global_mean, rel=1e-9)
    assert b.history_timestamps is not None and a.history_timestamps is not None
    np.testing.assert_array_equal(b.history_timestamps, a.history_timestamps)
    assert_same_model(SimpleNamespace(model=a, history=local.history), dask, split[1])
    shared = load_shared_model_dir(tmp_path / "dask")  # what `serve` reads
    assert shared.n_users == a.n_users and shared.user_index()["1"] == a.user_index()["1"]
    # the onboarding prior from the partitions' sums = estimate_prior on the whole local model
    # (its w coordinates up to U's column signs)
    assert "onboarding_prior_sha256" in man
    pa, pb = a.onboarding_prior, b.onboarding_prior
    assert pa is not None and pb is not None
    E = np.diag(np.concatenate([[1.0], np.sign(np.diag(Ua.T @ Ub))]))
    close = {"rtol": 1e-6, "atol": 1e-9}
    np.testing.assert_allclose(pb.t_mean, E @ pa.t_mean, **close)
    np.testing.assert_allclose(pb.t_cov, E @ pa.t_cov @ E, **close)
    np.testing.assert_allclose(pb.C_tm, E @ pa.C_tm, **close)
    assert pb.b_var == pytest.approx(pa.b_var, rel=1e-6)
    assert pb.noise_var == pytest.approx(pa.noise_var, rel=1e-6)
    assert pa.item_desc.shape[1] > 0  # the item-set conditioning is on here
    for name in ("item_desc", "m_mean", "C_mm", "S_within"):
        np.testing.assert_allclose(getattr(pb, name), getattr(pa, name), **close)
    # the driver received statistics and sums only: less than the per-user arrays' size
    per_user = b.n_users * (8 * (1 + b.lrs.rank + 2 * b.lrs.sparsity)) + 24 * b.history_items.size
    assert stats["bytes_to_driver"] < 10 * per_user  # (item statistics dominate at this size)
