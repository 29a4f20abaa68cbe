"""Bad input to the model directory and the train/evaluate CLI: clear errors, nothing lost."""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from lrs_rec.serving.cli import main
from lrs_rec.training.sample_data import make_sample_ratings, write_sample_ratings
from lrs_rec.training.testing import random_trained_model

from lrs_rec.model_dir import (
    SHARED_ARRAYS,
    ModelDirError,
    _digest,
    check_out_dir,
    load_model_dir,
    save_model_dir,
)

FAST = ["--dim", "4", "--rank", "2", "--sparsity", "1", "--n-iter", "1", "--quiet", "--no-export"]


@pytest.fixture(scope="module")
def ratings(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("ratings")
    return write_sample_ratings(d / "r.csv", make_sample_ratings(40, 30, random_state=1))


def _small_model():  # type: ignore[no-untyped-def]
    return random_trained_model(n_users=6, n_items=8, d=5, rank=2, sparsity=1)


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    save_model_dir(_small_model(), tmp_path / "m")
    return tmp_path / "m"


@pytest.fixture
def legacy_model_dir(tmp_path: Path) -> Path:
    from legacy_model_dir import save_legacy_model_dir

    save_legacy_model_dir(_small_model(), tmp_path / "old")
    return tmp_path / "old"


def _cli_error(capsys: pytest.CaptureFixture[str], argv: list[str], *needles: str) -> None:
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1, err
    for needle in needles:
        assert needle in err, err


# -- 1. --out never deletes what is not ours --------------------------------------------------------
def test_out_refuses_foreign_dir_file_and_cwd(
    ratings: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "ratings.csv").write_bytes(ratings.read_bytes())
    (data / "notes.txt").write_text("keep me")
    _cli_error(
        capsys,
        ["train", "--ratings", str(data / "ratings.csv"), "--out", str(data), *FAST],
        "not an lrs-rec model directory",
        "notes.txt",
    )
    assert sorted(p.name for p in data.iterdir()) == ["notes.txt", "ratings.csv"]
    afile = tmp_path / "afile"
    afile.write_text("x")
    _cli_error(capsys, ["train", "--ratings", str(ratings), "--out", str(afile), *FAST], "afile")
    assert afile.read_text() == "x"
    monkeypatch.chdir(data)
    for out in (".", ".."):
        with pytest.raises(ModelDirError, match="current directory"):
            check_out_dir(out)
    assert sorted(p.name for p in data.iterdir()) == ["notes.txt", "ratings.csv"]


def test_an_out_that_cannot_be_created_fails_before_training(
    ratings: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # was "[Errno 17] File exists: '...'" (or "[Errno 2] ... '/proc/.m.<random>'", the staging
    # directory) raised when saving, after the whole training run
    import lrs_rec.training.pipeline as pipeline

    def no_training(*a: object, **k: object) -> None:
        raise AssertionError("trained although --out cannot be written")

    monkeypatch.setattr(pipeline, "train", no_training)
    afile = tmp_path / "afile"
    afile.write_text("x")
    for out in (afile / "m", afile / "a" / "b"):
        _cli_error(
            capsys,
            ["train", "--ratings", str(ratings), "--out", str(out), *FAST],
            f"{out}: cannot be created: {afile} is not a directory",
        )
    assert afile.read_text() == "x" and sorted(p.name for p in tmp_path.iterdir()) == ["afile"]
    check_out_dir(tmp_path / "new" / "deeper" / "m")  # parents made on saving: fine
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]  # the probe left nothing


def test_out_replaces_only_model_dirs(ratings: Path, tmp_path: Path) -> None:
    out = tmp_path / "m"
    out.mkdir()  # an empty directory is fine
    assert main(["train", "--ratings", str(ratings), "--out", str(out), *FAST]) == 0
    (out / "model.onnx").write_text("stale export")  # an older model's files are replaced
    assert main(["train", "--ratings", str(ratings), "--out", str(out), *FAST]) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "arrays.npz",
        "items.json",
        "manifest.json",
        "users",
    ]
    (out / "mine.txt").write_text("keep")
    with pytest.raises(ModelDirError, match=re.escape("mine.txt")):
        save_model_dir(load_model_dir(out), out)
    assert (out / "mine.txt").read_text() == "keep"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp dirs


# -- 2. damaged model directories -------------------------------------------------------------------
def _set_arrays(mdir: Path, rehash: bool = False, **changes: np.ndarray) -> None:
    with np.load(mdir / "arrays.npz", allow_pickle=False) as z:
        arrays = {n: z[n] for n in z.files}
    arrays.update(changes)
    np.savez(mdir / "arrays.npz", **arrays)  # type: ignore[arg-type]
    if rehash:  # a consistent digest: the array checks themselves must catch the problem
        manifest = json.loads((mdir / "manifest.json").read_text())
        manifest["arrays_sha256"] = _digest({n: arrays[n] for n in SHARED_ARRAYS})
        (mdir / "manifest.json").write_text(json.dumps(manifest))


def _truncate(m: Path) -> None:
    data = (m / "arrays.npz").read_bytes()
    (m / "arrays.npz").write_bytes(data[: len(data) // 2])


def _flip(m: Path) -> None:
    data = bytearray((m / "arrays.npz").read_bytes())
    data[200] ^= 0xFF
    (m / "arrays.npz").write_bytes(bytes(data))


def _manifest(m: Path, edit: Callable[[dict], object]) -> None:
    manifest = json.loads((m / "manifest.json").read_text())
    (m / "manifest.json").write_text(json.dumps(edit(manifest)))


DAMAGE: dict[str, tuple[Callable[[Path], None], str]] = {
    "truncated": (_truncate, "arrays.npz: damaged"),
    "flipped byte": (_flip, "arrays.npz: damaged"),
    "empty npz": (lambda m: (m / "arrays.npz").write_bytes(b""), "arrays.npz: damaged"),
    "no rating_scale": (
        lambda m: _manifest(m, lambda d: {k: v for k, v in d.items() if k != "rating_scale"}),
        "rating_scale",
    ),
    "manifest list": (lambda m: _manifest(m, lambda d: [d]), "expected a JSON object"),
    "global_mean vector": (
        lambda m: _set_arrays(m, True, global_mean=np.array([3.0, 3.0])),
        "global_mean must be 0-D",
    ),
    "history out of range": (
        lambda m: _set_shard(m, history_items=[[1000] * 5] * 6),
        "history_items must lie in [0, 8)",
    ),
    "NaN item_bias, digest forged": (
        lambda m: _set_arrays(m, True, item_bias=np.full(8, np.nan)),
        "item_bias contains NaN",
    ),
    "NaN user_bias": (
        lambda m: _set_shard(m, user_bias=[math.nan] * 6),
        "user_bias contains NaN",
    ),
    "shard short": (
        lambda m: _set_shard(m, rows=1),
        "1 rows, the manifest says 6",
    ),
    "user ids not strings": (
        lambda m: _set_shard(m, user_id=list(range(6))),
        "user_id must hold strings",
    ),
    "w of the wrong width": (
        lambda m: _set_shard(m, w=[[0.0] * 3] * 6),
        "column w must hold 2 values per user",
    ),
    "shard missing": (
        lambda m: (m / "users" / "part-00000.parquet").unlink(),
        "part-00000.parquet: missing",
    ),
    "shard not parquet": (
        lambda m: (m / "users" / "part-00000.parquet").write_bytes(b"PAR1 not really"),
        "damaged or not a Parquet shard",
    ),
    "per-user array in arrays.npz": (
        lambda m: _set_arrays(m, W=np.zeros((6, 2))),
        "per-user arrays ['W'] in a format-2 directory",
    ),
    "shard index edited": (
        lambda m: _manifest(m, lambda d: {**d, "user_shards": {**d["user_shards"], "rows": [7]}}),
        "dims.n_users 6 != the shards' 7 rows",
    ),
}


def _set_shard(m: Path, rows: int | None = None, **columns: list) -> None:  # type: ignore[type-arg]
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = m / "users" / "part-00000.parquet"
    table = pq.read_table(path)
    for name, values in columns.items():
        i = table.column_names.index(name)
        table = table.set_column(i, name, pa.array(values))
    if rows is not None:
        table = table.slice(0, rows)
    pq.write_table(table, path)


LEGACY_DAMAGE: dict[str, tuple[Callable[[Path], None], str]] = {
    "history out of range": (
        lambda m: _set_arrays(m, history_items=np.full(30, 1000, np.int64)),
        "history_items must lie in [0, 8)",
    ),
    "NaN user_bias": (
        lambda m: _set_arrays(m, user_bias=np.full(6, np.nan)),
        "user_bias contains NaN",
    ),
    "users.json short": (
        lambda m: (m / "users.json").write_text('["u0"]'),
        "user_ids: length 1",
    ),
    "users.json objects": (
        lambda m: (m / "users.json").write_text(json.dumps([{}] * 6)),
        "users.json: expected a JSON list",
    ),
}


@pytest.mark.parametrize("case", LEGACY_DAMAGE)
def test_damaged_format_1_model_dir_is_a_clear_error(legacy_model_dir: Path, case: str) -> None:
    assert load_model_dir(legacy_model_dir).n_users == 6  # loads before the damage
    damage, message = LEGACY_DAMAGE[case]
    damage(legacy_model_dir)
    with pytest.raises(ModelDirError, match=re.escape(message)):
        load_model_dir(legacy_model_dir)


@pytest.mark.parametrize("case", DAMAGE)
def test_damaged_model_dir_is_a_clear_error(model_dir: Path, case: str) -> None:
    damage, message = DAMAGE[case]
    damage(model_dir)
    with pytest.raises(ModelDirError, match=re.escape(message)):
        load_model_dir(model_dir)


# -- 3. tampering ----------------------------------------------------------------------------------
def test_edited_shared_arrays_fail_the_digest(
    model_dir: Path, ratings: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _set_arrays(model_dir, item_features=np.zeros((8, 5)))
    with pytest.raises(ModelDirError, match="does not match manifest arrays_sha256"):
        load_model_dir(model_dir)
    _cli_error(capsys, ["export", "--model", str(model_dir)], "arrays_sha256")
    assert not (model_dir / "model.onnx").exists()


# -- 4. plug-in features matching no training item -------------------------------------------------
@pytest.mark.parametrize("n_rows", [0, 3])
def test_item_features_matching_no_item(
    ratings: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], n_rows: int
) -> None:
    feats = tmp_path / "f.npy"
    np.save(feats, np.ones((n_rows, 3)))
    (tmp_path / "f.npy.ids.txt").write_text("".join(f"x{j}\n" for j in range(n_rows)))
    argv = ["train", "--ratings", str(ratings), "--item-features", str(feats)]
    _cli_error(
        capsys,
        [*argv, "--out", str(tmp_path / "m"), *FAST],
        "f.npy: none of its",
        "training item ids: 'i",
        "'x0'" if n_rows else "feature file ids: none",
    )
    assert not (tmp_path / "m").exists()


# -- 5. CLI flags ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "flags,needle",
    [
        (["--seed", "-1"], "--seed must be >= 0"),
        (["--reg-bias", "inf"], "--reg-bias must be a finite number >= 0"),
        (["--reg-w", "inf"], "--reg-w must be a finite number >= 0"),
        (["--reg-b", "nan"], "--reg-b must be"),
        # was "rating scale must be finite with min < max, got 5.0..1.0", naming no flag
        (["--rating-scale", "5", "1"], "min < max, got 5..1 (--rating-scale MIN MAX)"),
        (["--rating-scale", "4", "4"], "min < max, got 4..4 (--rating-scale MIN MAX)"),
    ],
)
def test_bad_train_flags_name_the_flag(
    ratings: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], flags: list[str], needle: str
) -> None:
    _cli_error(
        capsys,
        ["train", "--ratings", str(ratings), "--out", str(tmp_path / "m"), *FAST, *flags],
        needle,
    )


@pytest.mark.parametrize("k", ["-3", "0"])
def test_evaluate_k_must_be_positive(
    model_dir: Path, ratings: Path, capsys: pytest.CaptureFixture[str], k: str
) -> None:
    argv = ["evaluate", "--model", str(model_dir), "--ratings", str(ratings), "--k", k]
    _cli_error(capsys, argv, f"--k must be >= 1, got {k}")


def test_json_summary_without_validation_is_strict_json_and_rank_is_the_one_used(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tiny = tmp_path / "tiny.csv"
    tiny.write_text("user,item,rating\n1,10,4\n2,11,3\n3,10,5\n")
    out = tmp_path / "m"
    argv = ["train", "--ratings", str(tiny), "--out", str(out), "--rank", "30", "--n-iter", "1"]
    assert main([*argv, "--quiet", "--no-export", "--validation-fraction", "0", "--json"]) == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out, parse_constant=lambda c: pytest.fail(f"non-JSON {c}"))
    assert summary["val_rmse"] is None and summary["dims"]["rank"] == 3
    assert "rank r=30 exceeds the 3 training users; using r=3" in captured.err
    text = (out / "manifest.json").read_text()
    assert "NaN" not in text
    manifest = json.loads(text)
    assert manifest["hyperparameters"]["rank"] == 3 == manifest["dims"]["rank"]
    assert manifest["hyperparameters"]["rank_requested"] == 30
    assert load_model_dir(out).lrs.rank == 3
    assert not math.isnan(summary["train_rmse"]) and os.path.isdir(out)


# -- 6. fuzzer findings: unreadable arrays never pass on numpy's advice to enable pickle -------------
def _npy_bad_header(p: Path) -> None:
    np.save(p, np.ones((2, 3)))
    data = bytearray(p.read_bytes())
    data[6:8] = b"ga"  # format version (103, 97)
    p.write_bytes(bytes(data))


@pytest.mark.parametrize(
    ("make", "needle"),
    [
        (_npy_bad_header, "f.npy: not a readable .npy array: damaged"),
        (
            lambda p: np.save(p, np.array([[1, "a"]], dtype=object), allow_pickle=True),
            "f.npy: not a readable .npy array: it holds Python objects",
        ),
        (lambda p: np.save(p, np.array([["1", "2"]])), "f.npy: item features have dtype <U1"),
    ],
)
def test_unreadable_item_features_name_the_file_and_what_is_expected(
    ratings: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    make: Callable[[Path], object],
    needle: str,
) -> None:
    feats = tmp_path / "f.npy"
    make(feats)
    (tmp_path / "f.npy.ids.txt").write_text("i0\ni1\n")
    argv = ["train", "--ratings", str(ratings), "--item-features", str(feats)]
    _cli_error(
        capsys, [*argv, "--out", str(tmp_path / "m"), *FAST], needle, "expected a numeric 2-D"
    )
    assert "allow_pickle" not in capsys.readouterr().err


@pytest.mark.parametrize("content", ["random", "object array"])
def test_arrays_npz_of_random_bytes_is_damaged_without_pickle_advice(
    model_dir: Path, content: str
) -> None:
    path = model_dir / "arrays.npz"
    if content == "random":
        path.write_bytes(np.random.default_rng(0).bytes(5000))
    else:
        np.savez(path, global_mean=np.array([object()], dtype=object))
    with pytest.raises(ModelDirError, match="damaged or not a model array file") as e:
        load_model_dir(model_dir)
    assert "pickle" not in str(e.value) and "numeric .npz" in str(e.value)


def test_a_bad_onboarding_config_in_the_manifest_fails_at_load(tmp_path):
    """Found by fuzzing: {"onboarding": {"config": {"bogus": 1}}} published fine and then every
    PUT /v1/users/{id}/ratings answered 500; now loading the directory names the field."""
    from lrs_rec.training.testing import random_trained_model

    from lrs_rec.model_dir import ModelDirError, load_model_dir, save_model_dir

    root = tmp_path / "m"
    save_model_dir(random_trained_model(n_users=8, n_items=6, d=4, rank=2, sparsity=1), root)
    manifest = json.loads((root / "manifest.json").read_text())
    for bad in (
        {"config": {"bogus": 1}},
        {"schedule": [[1, {"w_prior_scale": -1}]]},
        [1],
        {"schedule": []},
        {"schedule": [[2, {}]]},
        {"schedule": [[1, {}], [1, {}]]},
        {"schedule": [[1]]},
    ):
        (root / "manifest.json").write_text(json.dumps({**manifest, "onboarding": bad}))
        with pytest.raises(ModelDirError, match=r"manifest.json: onboarding"):
            load_model_dir(root)
    (root / "manifest.json").write_text(json.dumps({**manifest, "onboarding": {"config": {}}}))
    load_model_dir(root)


def test_parquet_item_features_with_a_null_vector_name_the_row(tmp_path: Path) -> None:
    # audit11: a null vector used to be reported as "have lengths {6}", naming no row
    import pyarrow as pa
    import pyarrow.parquet as pq
    from lrs_rec.training.features import read_item_features
    from lrs_rec.training.loaders import RatingFileError

    p = tmp_path / "emb.parquet"
    vecs = [[1.0, 2.0], None, [3.0, 4.0]]
    pq.write_table(pa.table({"item_id": ["a", "b", "c"], "emb": vecs}), p)
    with pytest.raises(RatingFileError, match=r"row 1 \(item 'b'\) has no vector \(null\)"):
        read_item_features(p)


@pytest.mark.parametrize("id_type", ["string", "int64", "float64"])
@pytest.mark.parametrize("layout", ["list", "columns"])
def test_parquet_item_features_with_a_null_id_name_the_row(
    tmp_path: Path, id_type: str, layout: str
) -> None:
    # audit: a null item id became the item "None" (a NaN float id the item "nan")
    import pyarrow as pa
    import pyarrow.parquet as pq
    from lrs_rec.training.features import read_item_features
    from lrs_rec.training.loaders import RatingFileError

    p = tmp_path / "emb.parquet"
    values = {
        "string": ["a", "b", None, "d", None],
        "int64": [1, 2, None, 4, None],
        "float64": [1.0, 2.0, float("nan"), 4.0, None],  # NaN: a value to Arrow, no id either
    }[id_type]
    ids = pa.array(values, type=getattr(pa, id_type)())
    vecs = [[float(j), 1.0] for j in range(5)]
    cols = {"emb": vecs} if layout == "list" else {"f0": [v[0] for v in vecs], "f1": [1.0] * 5}
    pq.write_table(pa.table({"item_id": ids, **cols}), p)
    with pytest.raises(RatingFileError) as e:
        read_item_features(p)
    assert str(e.value).startswith(f"{p}: row 2 has no item id (null in column 'item_id'; 2 such")


def test_item_feature_ids_are_read_like_rating_file_ids(tmp_path):
    """A float id column (10.0) names the item "10", as in a rating file, and a JSON id list
    with an empty or null entry is refused, naming it."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from lrs_rec.training.features import read_item_features
    from lrs_rec.training.loaders import RatingFileError

    p = tmp_path / "emb.parquet"
    pq.write_table(pa.table({"item_id": [10.0, 2.0, 7.0], "emb": [[1.0, 0.0]] * 3}), p)
    assert read_item_features(p)[0] == ["10", "2", "7"]
    npy = tmp_path / "emb.npy"
    np.save(npy, np.ones((3, 2)))
    (tmp_path / "emb.ids.json").write_text(json.dumps([" a ", 5, 6.0]))
    assert read_item_features(npy)[0] == ["a", "5", "6"]
    (tmp_path / "emb.ids.json").write_text(json.dumps(["a", None, ""]))
    with pytest.raises(RatingFileError, match=r"entry 1 has no item id \(null; 2 such entries\)"):
        read_item_features(npy)
