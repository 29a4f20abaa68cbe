"""`lrs-rec train --engine dask --epsilon E`: private training on a LocalCluster of 2 worker processes
gives the local private trainer's ledger (the same events, noise multipliers and ε) and its model
within float tolerance (held-out RMSE within 0.2 %), written as shards that `load_model_dir` reads —
with one-hot, plug-in and genre item features. (Through a real `dask scheduler` / `dask worker`
cluster: tests/test_training_dask_cluster.py.)"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("distributed")

from lrs_rec.serving.cli import build_parser
from lrs_rec.serving.cli import main as cli_main
from lrs_rec.training.loaders import load_ratings

from lrs_rec.model_dir import load_model_dir


@pytest.fixture(scope="module")
def client() -> Any:
    from lrs_rec.training.dask_engine import dask_client

    with dask_client(None, 2) as c:
        yield c


def _subset(src: Path, out: Path, n_users: int) -> Path:
    rows = [ln.split("\t") for ln in src.read_text().splitlines()]
    out.write_text(
        "user,item,rating,timestamp\n"
        + "".join(",".join(r) + "\n" for r in rows if int(r[0]) <= n_users)
    )
    return out


@pytest.fixture(scope="module")
def split(ml100k_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """u1.base / u1.test of the first 150 users of MovieLens 100K (CSV, no catalogue next to it)."""
    d = tmp_path_factory.mktemp("dask_private")
    return _subset(ml100k_dir / "u1.base", d / "train.csv", 150), _subset(
        ml100k_dir / "u1.test", d / "test.csv", 150
    )


def _test_rmse(model: Any, test: Path) -> float:
    table = load_ratings(test)
    users, items = model.user_index(), model.item_index()
    known = [(users[u], items[i], r) for u, i, r in zip(table.users, table.items, table.ratings, strict=True)
             if u in users and i in items]  # fmt: skip
    u, i, r = (np.array(x) for x in zip(*known, strict=True))
    pred = model.predict(u.astype(np.int64), i.astype(np.int64))
    return float(np.sqrt(np.mean((pred - r) ** 2)))


def _local_and_dask(train: Path, out: Path, client: Any, flags: list[str]) -> tuple[Any, Any]:
    from lrs_rec.training.dask_private import run_on

    base = ["train", "--ratings", str(train), "--rating-scale", "1", "5", "--epsilon", "2",
            "--dp-noise-seed", "3", "--quiet", "--no-export", *flags]  # fmt: skip
    assert cli_main([*base, "--out", str(out / "local")]) == 0
    args = build_parser().parse_args([*base, "--engine", "dask", "--out", str(out / "dask")])
    run_on(args, client)
    return load_model_dir(out / "local"), load_model_dir(out / "dask")


def _assert_same(a: Any, b: Any, test: Path) -> None:
    assert b.manifest["privacy"] == a.manifest["privacy"]  # events, z, ε (recomputed), config
    assert b.manifest["hyperparameters"] == a.manifest["hyperparameters"]
    assert b.manifest["data"]["n_ratings"] == a.manifest["data"]["n_ratings"]
    assert b.manifest["engine"]["partitions"] == 2 and b.manifest["user_shards"]["n_shards"] == 2
    assert b.user_ids == a.user_ids and b.item_ids == a.item_ids
    assert b.global_mean == pytest.approx(a.global_mean, abs=1e-12)
    for name in ("item_features", "item_bias", "user_bias", "w_prior_mean", "w_prior_cov"):
        np.testing.assert_allclose(getattr(b, name), getattr(a, name), atol=1e-9, err_msg=name)
    np.testing.assert_allclose(b.lrs.U, a.lrs.U, atol=1e-9)
    np.testing.assert_allclose(b.lrs.W, a.lrs.W, atol=1e-9)
    np.testing.assert_array_equal(b.lrs.B_idx, a.lrs.B_idx)
    np.testing.assert_allclose(b.lrs.B_val, a.lrs.B_val, atol=1e-9)
    np.testing.assert_array_equal(b.history_indptr, a.history_indptr)
    np.testing.assert_array_equal(b.history_items, a.history_items)
    np.testing.assert_array_equal(b.history_ratings, a.history_ratings)
    assert b.manifest["metrics"]["train_rmse"] == pytest.approx(
        a.manifest["metrics"]["train_rmse"], rel=1e-9
    )
    assert _test_rmse(b, test) == pytest.approx(_test_rmse(a, test), rel=0.002)


@pytest.mark.ml100k
def test_dask_private_training_gives_the_local_ledger_and_model(
    client: Any, split: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LRS_HOME", str(tmp_path / "home"))
    a, b = _local_and_dask(split[0], tmp_path, client, [])
    assert a.manifest["item_features"]["source"] == "onehot-factored"
    assert b.manifest["item_features"] == a.manifest["item_features"]
    _assert_same(a, b, split[1])


@pytest.mark.ml100k
def test_dask_private_with_a_catalogue_missing_items_and_a_sparse_part(
    client: Any, split: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A public catalogue (a JSON id list without items 1..30: their ratings are dropped on the
    workers, as the local trainer drops them) and b_u over item coordinates (--dp-sparsity 1:
    stored with the identity item features); the blocks U-step would need ≤ m ratings per user."""
    monkeypatch.setenv("LRS_HOME", str(tmp_path / "home"))
    cat = tmp_path / "items.json"
    cat.write_text(json.dumps([str(i) for i in range(31, 1700)]))
    flags = ["--item-catalog", str(cat), "--dp-sparsity", "1", "--dp-features", "onehot"]
    a, b = _local_and_dask(split[0], tmp_path, client, flags)
    dropped = a.manifest["data"]["dropped_not_in_catalogue"]
    assert dropped > 0 and b.manifest["data"]["dropped_not_in_catalogue"] == dropped
    assert a.lrs.sparsity == 1 and a.manifest["item_features"]["source"] == "onehot"
    assert b.manifest["item_features"] == a.manifest["item_features"]
    _assert_same(a, b, split[1])


@pytest.mark.ml100k
def test_dask_private_with_plug_in_features(
    client: Any, split: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Plug-in item features (--item-features, no catalogue: their ids are the vocabulary, the
    ratings of items 1201.. dropped): the U-step keeps ≤ m random samples per user — keyed draws
    of (seed, user id, item id), the same on the workers as in the local run."""
    monkeypatch.setenv("LRS_HOME", str(tmp_path / "home"))
    feats = tmp_path / "f.npy"
    np.save(feats, np.random.default_rng(0).normal(size=(1200, 8)))
    (tmp_path / "f.ids.txt").write_text("".join(f"{i}\n" for i in range(1, 1201)))
    flags = ["--item-features", str(feats), "--dp-max-samples-per-user", "20"]
    a, b = _local_and_dask(split[0], tmp_path, client, flags)
    assert a.manifest["privacy"]["features_source"] == "plugin"
    assert a.manifest["hyperparameters"]["u_select"] == "random"
    assert a.manifest["item_features"] == {"source": f"ids of the plug-in features {feats}", "d": 8}
    assert b.manifest["item_features"] == a.manifest["item_features"]
    assert a.manifest["data"]["dropped_not_in_catalogue"] > 0
    assert a.lrs.sparsity > 0 and a.item_features.shape == (1200, 8)
    _assert_same(a, b, split[1])


@pytest.mark.ml100k
def test_dask_private_with_the_genres_of_a_catalogue_next_to_the_ratings(
    client: Any,
    ml100k_dir: Path,
    split: tuple[Path, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """--dp-features auto with MovieLens's u.item next to --ratings: genre + period features."""
    monkeypatch.setenv("LRS_HOME", str(tmp_path / "home"))
    d = tmp_path / "ml"
    d.mkdir()
    train = d / "train.csv"
    train.write_bytes(split[0].read_bytes())
    (d / "u.item").write_bytes((ml100k_dir / "u.item").read_bytes())
    a, b = _local_and_dask(train, tmp_path, client, ["--dp-max-samples-per-user", "20"])
    assert a.manifest["privacy"]["features_source"] == "genres"
    assert a.item_features.shape == (1682, 24)
    assert b.manifest["item_features"] == a.manifest["item_features"]
    _assert_same(a, b, split[1])


def test_private_feature_errors_on_dask_are_one_line_before_a_cluster(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bad feature flag fails on the driver before any cluster is started (the scheduler address
    is unreachable)."""
    monkeypatch.setenv("LRS_HOME", str(tmp_path / "home"))
    ratings = tmp_path / "r.csv"
    ratings.write_text("user,item,rating\n1,a,4\n2,b,3\n")
    cmd = ["train", "--ratings", str(ratings), "--epsilon", "1", "--engine", "dask",
           "--scheduler", "tcp://127.0.0.1:1", "--out", str(tmp_path / "m")]  # fmt: skip
    for flags, message in (
        (["--dp-features", "plugin"], "--dp-features plugin needs --item-features"),
        (["--item-features", str(tmp_path / "none.npy")], "no such item-feature file"),
    ):
        assert cli_main([*cmd, *flags]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err


@pytest.mark.ml100k
def test_dask_private_with_the_post_processing_options_gives_the_local_model(
    client: Any, split: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The opt-in post-processing steps (posterior item biases, the rows' EB prior, the released
    M̂ / w prior as priors of the user steps, GLS weights) run on the partitions as locally."""
    import dataclasses

    from lrs_rec.training import private_train

    monkeypatch.setenv("LRS_HOME", str(tmp_path / "home"))
    plain = private_train.cli_config

    def with_options(*a: Any, **k: Any) -> Any:
        return dataclasses.replace(
            plain(*a, **k), item_bias_solve="posterior", item_bias_prior_var=None,
            u_prior_eb=True, u_step_w_prior=True, final_gls=True, final_w_prior=True,
        )  # fmt: skip

    monkeypatch.setattr(private_train, "cli_config", with_options)
    a, b = _local_and_dask(split[0], tmp_path, client, [])
    assert a.manifest["hyperparameters"]["final_gls"] is True
    _assert_same(a, b, split[1])
