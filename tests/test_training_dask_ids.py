"""Dense user indices numbered on the cluster (training/dask_ids.py) against the slow, obvious
twin: every id of every file sorted in one process (``Vocabulary.from_ids_reference``, the local
engine's natural order). Mixed id shapes (numbers, leading zeros that tie on the number, ids that
sort differently as strings and numbers, 20-digit numbers, non-ASCII), duplicates across files,
skewed ranges (forced split points), a single user, more workers than users; and a training run
on such ids giving the local engine's model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("distributed")

from lrs_rec.training.config import TrainConfig
from lrs_rec.training.dask_ids import (
    SAMPLE_PER_RANGE,
    range_ids,
    range_splitters,
    route,
    route_reference,
    sample_ids,
    user_index,
)
from lrs_rec.training.dask_input import load_file
from lrs_rec.training.loaders import LoadOptions, load_ratings
from lrs_rec.training.vocab import Vocabulary, _natural_key

MIXED = ["10", "2", "007", "07", "7", "u1", "u10", "u9", "b", "a", "99999999999999999999",
         "100000000000000000000", "1", "²", "é1", "-5", "5x", "0", "00"]  # fmt: skip


def natural(ids: list[str]) -> list[str]:
    return list(Vocabulary.from_ids_reference(ids).ids)


def test_route_cuts_sorted_ids_into_natural_order_ranges() -> None:
    ids = np.array(natural(MIXED), dtype=str)
    for splitters in ([], ["7"], ["0", "u1"], ["3", "99999999999999999999", "zz"]):
        sp = np.array(natural(splitters), dtype=str)
        parts = route(ids, sp)
        assert len(parts) == sp.size + 1
        assert [p.tolist() for p in parts] == [p.tolist() for p in route_reference(ids, sp)]
        assert [i for p in parts for i in p.tolist()] == ids.tolist()  # in order, each once
        for r, p in enumerate(parts):  # range r: at least split point r-1, below split point r
            for i in p.tolist():
                assert r == 0 or _natural_key(i) >= _natural_key(sp[r - 1])
                assert r == sp.size or _natural_key(i) < _natural_key(sp[r])


def test_a_ranges_ids_are_the_distinct_union_of_its_pieces_in_natural_order() -> None:
    a = np.array(natural(["2", "10", "u1"]), dtype=str)
    b = np.array(natural(["07", "10", "7", "u1"]), dtype=str)
    assert range_ids(a, b, np.zeros(0, str)).tolist() == natural(["2", "10", "u1", "07", "7"])
    assert range_ids().tolist() == []


def test_sample_and_split_points() -> None:
    ids = np.array(natural([str(j) for j in range(1000)]), dtype=str)
    s = sample_ids(ids, 50, 3, 0)
    assert s.size == 50 and len(set(s.tolist())) == 50
    assert s.tolist() == natural(s.tolist())  # kept in order
    np.testing.assert_array_equal(s, sample_ids(ids, 50, 3, 0))  # seeded
    assert sample_ids(ids, 5000, 3, 0) is ids
    sp = range_splitters([s, sample_ids(ids, 50, 3, 1)], 4)
    assert sp.size == 3 and sp.tolist() == natural(sp.tolist())
    assert range_splitters([np.array(["x"])], 4).size == 0  # one sampled id: one range


@pytest.fixture(scope="module")
def client() -> Any:
    from lrs_rec.training.dask_engine import dask_client

    with dask_client(None, 2) as c:
        yield c


def _write(d: Path, files: list[list[str]]) -> list[str]:
    """One CSV per list of user ids (one rating each, item i<row>); the paths."""
    d.mkdir(parents=True, exist_ok=True)
    paths = []
    for j, users in enumerate(files):
        p = d / f"part-{j}.csv"
        p.write_text(
            "user,item,rating,timestamp\n"
            + "".join(f"{u},i{k % 3},{1 + k % 5},{k}\n" for k, u in enumerate(users))
        )
        paths.append(str(p))
    return paths


def _index(client: Any, paths: list[str], **kw: Any) -> tuple[Any, Any, list[str], int]:
    """The index of the files, every range's ids gathered in range order, and the bytes the
    driver received while the index was built."""
    from lrs_rec.training.dask_engine import Run

    run = Run(client)
    loads = [run.submit(load_file, p, LoadOptions()) for p in paths]
    index = user_index(run, loads, seed=kw.pop("seed", 0), n_workers=kw.pop("n_workers", 2), **kw)
    received = run.bytes_to_driver
    got = [i for r in run.gather(index.ranges) for i in r.tolist()]
    return run, index, got, received


def _check(client: Any, paths: list[str], **kw: Any) -> Any:
    want = natural([str(u) for p in paths for u in load_ratings(p).users])
    run, index, got, _ = _index(client, paths, **kw)
    assert got == want  # every range in order: the global natural order
    assert index.n_users == len(want)
    assert index.counts.sum() == len(want) and index.counts.size == index.splitters.size + 1
    assert index.ids_at(run, np.arange(len(want))).tolist() == want  # dense index = rank
    with pytest.raises(IndexError):
        index.ids_at(run, np.array([len(want)]))
    index.release()
    return index


def test_mixed_id_shapes_with_duplicates_across_files(client: Any, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    files = [rng.choice(MIXED, 12).tolist() for _ in range(3)] + [MIXED]
    _check(client, _write(tmp_path, files))


@pytest.mark.parametrize(
    "splitters",
    [
        ["100000000000000000000"],  # all but one id in range 0 (20 digits: the slow sort path)
        ["0"],  # range 0 holds only ids below "0": empty
        ["zzz"],  # beyond every id: the last range empty
        ["00", "07", "8", "a", "u10", "u9"],  # several, some equal to ids, some not
    ],
)
def test_any_split_points_give_the_same_indices(
    client: Any, tmp_path: Path, splitters: list[str]
) -> None:
    index = _check(client, _write(tmp_path, [MIXED[:9], MIXED[5:]]), splitters=np.array(splitters))
    assert index.splitters.size == len(splitters)


def test_a_skewed_log_sampled_ranges(client: Any, tmp_path: Path) -> None:
    """900 numeric ids in one file, 3 string ids in another, 5 ranges asked for (n_workers):
    the sample's quantiles put every string id in the last range."""
    files = [[str(j) for j in range(900)], ["b", "a", "c"] * 4]
    index = _check(client, _write(tmp_path, files), n_workers=5)
    assert index.counts.size == 5 and index.counts[-1] >= 3


def test_a_single_user_and_more_workers_than_users(client: Any, tmp_path: Path) -> None:
    _check(client, _write(tmp_path / "one", [["u1"], ["u1", "u1"]]), n_workers=4)
    index = _check(client, _write(tmp_path / "three", [["3", "1"], ["2"]]), n_workers=16)
    assert index.counts.size <= 3  # at most one range per distinct sampled id


def test_the_driver_receives_counts_and_a_bounded_sample(client: Any, tmp_path: Path) -> None:
    """Bytes gathered to the driver for 20k users: the counts, ≤ SAMPLE_PER_RANGE × ranges
    sampled ids (2 ranges here) — not the 20k ids."""
    users = [f"user{j:06d}" for j in range(20_000)]
    _, index, got, received = _index(client, _write(tmp_path, [users[::2], users[1::2]]))
    assert got == users and index.counts.size == 2
    itemsize = np.array(users[:1]).itemsize  # 40 B: 10 characters
    # 2 file counts + the sample (≤ SAMPLE_PER_RANGE per range, rounded up per file) + 2 counts
    assert received <= 2 * 8 + (2 * SAMPLE_PER_RANGE + 2) * itemsize + 2 * 8
    assert received < len(users) * itemsize / 50


def test_a_run_on_mixed_ids_split_over_files_gives_the_local_model(
    client: Any, tmp_path: Path
) -> None:
    """Users with every id shape, their rows shuffled over 3 Parquet files (each user in
    several files): the local engine's model on the concatenated file, over 3 partitions."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from lrs_rec.training.dask_engine import train_dask
    from lrs_rec.training.pipeline import train
    from lrs_rec.training.synthetic_scale import make_biased_mf

    from lrs_rec.model_dir import load_model_dir

    log = make_biased_mf(400, 60, random_state=3, rank=3, median_per_user=10, mean_per_user=14)
    shapes = [str, lambda j: f"0{j}", lambda j: f"u{j}", lambda j: str(10**19 + j),
              lambda j: f"{j}x", lambda j: f"é{j}"]  # fmt: skip
    ids = np.array([shapes[j % 6](j) for j in range(400)], dtype=object)
    ids[[7, 8]] = ["7", "007"]  # tie with "07" (user 1) on the number
    rng = np.random.default_rng(1)
    order = rng.permutation(len(log))
    cols = {
        "user": ids[log.users[order]].astype(str),
        "item": np.char.add("i", log.items[order].astype(str)),
        "rating": log.ratings[order].astype(np.float64),
        "timestamp": log.timestamps[order].astype(np.int64),
    }
    t = pa.table(cols)  # (a rating repeated across files changes the row numbering, and so
    # the validation draws, against one file: a different, valid model — not compared here)
    d = tmp_path / "ratings"
    d.mkdir()
    cuts = [0, t.num_rows // 3, 2 * t.num_rows // 3, t.num_rows]
    for j in range(3):
        pq.write_table(t.slice(cuts[j], cuts[j + 1] - cuts[j]), d / f"part-{j}.parquet")
    whole = tmp_path / "whole.parquet"
    pq.write_table(t, whole)
    cfg = TrainConfig(dim=6, rank=2, sparsity=2, n_iter=3, init_iter=3, tune=False)
    local = train(load_ratings(whole), cfg, progress=False).model
    train_dask(str(d), LoadOptions(), cfg, client, out_dir=tmp_path / "m", progress=False,
               partitions=3)  # fmt: skip
    got = load_model_dir(tmp_path / "m")
    assert got.user_ids == local.user_ids == tuple(natural(ids.astype(str).tolist()))
    assert got.manifest["data"]["n_ratings"] == local.manifest["data"]["n_ratings"]
    np.testing.assert_array_equal(got.history_indptr, local.history_indptr)
    np.testing.assert_array_equal(got.history_items, local.history_items)
    np.testing.assert_array_equal(got.history_ratings, local.history_ratings)
    np.testing.assert_allclose(got.user_bias, local.user_bias, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(
        got.lrs.W @ got.lrs.U.T, local.lrs.W @ local.lrs.U.T, rtol=1e-6, atol=1e-8
    )
    ml, md = local.manifest["metrics"], got.manifest["metrics"]
    assert md["best_iteration"] == ml["best_iteration"] and md["selected"] == ml["selected"]
    assert md["val_rmse"] == pytest.approx(ml["val_rmse"], rel=1e-6)


def test_the_mapping_is_the_same_for_any_seed(client: Any, tmp_path: Path) -> None:
    paths = _write(tmp_path, [[f"{j}" for j in range(0, 300, 2)], [f"{j}" for j in range(300)]])
    got = [_index(client, paths, seed=s, n_workers=3)[2] for s in (0, 1, 2)]
    assert got[0] == got[1] == got[2] == natural([str(j) for j in range(300)])
