"""`lrs-rec predict` and `lrs-rec recommend`: CSV/TSV/Parquet, streaming, unknown ids, bad input."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from lrs_rec.serving.cli import main
from lrs_rec.training.testing import random_trained_model, write_model_dir

import lrs_rec

N_USERS, N_ITEMS = 30, 25


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("batch") / "m"
    write_model_dir(random_trained_model(n_users=N_USERS, n_items=N_ITEMS, random_state=8), out)
    return out


@pytest.fixture(scope="module")
def om(model_dir: Path) -> lrs_rec.OfflineModel:
    return lrs_rec.load_model(model_dir)


def _pairs(n: int = 400, seed: int = 0) -> tuple[list[str], list[str]]:
    """Random pairs, some with users / items the model does not know."""
    rng = np.random.default_rng(seed)
    users = [f"u{j}" for j in rng.integers(0, N_USERS + 4, n)]
    items = [f"i{j}" for j in rng.integers(0, N_ITEMS + 4, n)]
    return users, items


def _write_csv(path: Path, header: list[str], rows: list[list[object]], sep: str = ",") -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f, delimiter=sep)
        w.writerow(header)
        w.writerows(rows)
    return path


def _read(path: Path) -> dict[str, list[object]]:
    if path.suffix == ".parquet":
        return pq.read_table(path).to_pydict()
    sep = "\t" if path.suffix == ".tsv" else ","
    with open(path, newline="") as f:
        rows = list(csv.reader(f, delimiter=sep))
    cols: dict[str, list[object]] = {h: [] for h in rows[0]}
    for row in rows[1:]:
        for h, v in zip(rows[0], row, strict=True):
            cols[h].append(v)
    return cols


def _run(*argv: object) -> int:
    return main([str(a) for a in argv])


# -- predict ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("inp", "out"), [(".csv", ".csv"), (".tsv", ".parquet"), (".parquet", ".tsv")]
)
def test_predict_writes_the_offline_predictions(model_dir, om, tmp_path, inp, out):
    users, items = _pairs()
    src = tmp_path / f"pairs{inp}"
    if inp == ".parquet":
        pq.write_table(pa.table({"user": users, "item": items, "rating": [3.0] * len(users)}), src)
    else:
        sep = "\t" if inp == ".tsv" else ","
        _write_csv(src, ["user", "item", "rating"], [[u, i, 3] for u, i in zip(users, items, strict=True)], sep)  # fmt: skip
    dst = tmp_path / f"pred{out}"
    assert _run("predict", "--model", model_dir, "--pairs", src, "--out", dst, "--quiet") == 0
    got = _read(dst)
    assert list(got) == ["user", "item", "prediction"]
    assert got["user"] == users and got["item"] == items
    np.testing.assert_array_equal(
        np.asarray(got["prediction"], dtype=float), om.predict(users, items)
    )
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_the_summary_counts_unknown_ids(model_dir, om, tmp_path, capsys):
    src = _write_csv(tmp_path / "p.csv", ["user", "item"], [["u1", "i1"], ["x", "i2"], ["x", "y"], ["u2", "y"]])  # fmt: skip
    assert _run("predict", "--model", model_dir, "--pairs", src, "--out", tmp_path / "o.csv", "--quiet") == 0  # fmt: skip
    err = capsys.readouterr().err
    assert (
        "wrote 4 predictions" in err and "(2 rows with a user and 2 with an item the model" in err
    )
    users = _write_csv(tmp_path / "u.csv", ["user"], [["u1"], ["x"], ["x"], ["z"]])
    assert _run("recommend", "--model", model_dir, "--users", users, "--n", 2, "--out", tmp_path / "r.csv", "--quiet") == 0  # fmt: skip
    err = capsys.readouterr().err
    assert "wrote 8 rows" in err and "(3 users the model does not know" in err


def test_predict_streams_in_chunks_with_identical_output(model_dir, tmp_path):
    users, items = _pairs(2000, seed=1)
    src = _write_csv(tmp_path / "pairs.csv", ["user", "item"], [[u, i] for u, i in zip(users, items, strict=True)])  # fmt: skip
    whole, small = tmp_path / "whole.csv", tmp_path / "small.csv"
    assert _run("predict", "--model", model_dir, "--pairs", src, "--out", whole, "--quiet") == 0
    # 7-row chunks and, for a 2000-row file, several CSV read blocks
    assert _run("predict", "--model", model_dir, "--pairs", src, "--out", small, "--quiet", "--chunk-size", 7) == 0  # fmt: skip
    assert whole.read_bytes() == small.read_bytes()
    pq.write_table(
        pa.table({"user": users, "item": items}), tmp_path / "pairs.parquet", row_group_size=300
    )
    a, b = tmp_path / "a.parquet", tmp_path / "b.parquet"
    for out, size in ((a, 100_000), (b, 13)):
        assert _run("predict", "--model", model_dir, "--pairs", tmp_path / "pairs.parquet", "--out", out, "--quiet", "--chunk-size", size) == 0  # fmt: skip
    assert pq.read_table(a).equals(pq.read_table(b))
    assert pq.read_table(a).column("prediction").to_pylist() == [
        float(x) for x in _read(whole)["prediction"]
    ]


def test_predict_finds_the_usual_column_names_and_reads_integer_ids(model_dir, tmp_path):
    from dataclasses import replace

    m = random_trained_model(n_users=6, n_items=5, random_state=2)
    m = replace(
        m, user_ids=tuple(str(100 + j) for j in range(6)), item_ids=tuple(str(j) for j in range(5))
    )
    write_model_dir(m, tmp_path / "m")
    o = lrs_rec.load_model(tmp_path / "m")
    src = _write_csv(tmp_path / "p.csv", ["movieId", "userId"], [[1, 100], [4, 105], [9, 999]])
    assert _run("predict", "--model", tmp_path / "m", "--pairs", src, "--out", tmp_path / "o.csv", "--quiet") == 0  # fmt: skip
    got = _read(tmp_path / "o.csv")
    assert got["user"] == ["100", "105", "999"] and got["item"] == ["1", "4", "9"]
    np.testing.assert_array_equal(
        np.asarray(got["prediction"], float), o.predict([100, 105, 999], [1, 4, 9])
    )
    # Parquet integer and float id columns read as the loaders read them ("1.0" is item "1")
    pq.write_table(pa.table({"uid": pa.array([100, 105], pa.int64()), "iid": pa.array([1.0, 4.0])}), tmp_path / "p.parquet")  # fmt: skip
    assert _run("predict", "--model", tmp_path / "m", "--pairs", tmp_path / "p.parquet", "--out", tmp_path / "o.parquet", "--quiet") == 0  # fmt: skip
    assert pq.read_table(tmp_path / "o.parquet").column("item").to_pylist() == ["1", "4"]
    # explicit columns by name or position
    src = _write_csv(tmp_path / "q.csv", ["a", "b"], [["100", "1"]])
    assert _run("predict", "--model", tmp_path / "m", "--pairs", src, "--out", tmp_path / "q_out.csv", "--user-col", "a", "--item-col", "1", "--quiet") == 0  # fmt: skip
    assert _read(tmp_path / "q_out.csv")["user"] == ["100"]


@pytest.mark.parametrize(
    ("name", "content", "match"),
    [
        (
            "nouser.csv",
            "customer,item\nu1,i1\n",
            r"nouser.csv: no user column in header \['customer', 'item'\]; name it 'user' or pass --user-col NAME",
        ),
        (
            "empty_id.csv",
            "user,item\nu1,i1\nu2,i2\nu3,\n",
            r"empty_id.csv:4: item id \(column 'item'\) is empty",
        ),
        (
            "blank.csv",
            "user,item\nu1,i1\n\nu2,i2\n",
            r"blank.csv:3: user id \(column 'user'\) is empty",
        ),
        (
            "fields.csv",
            "user,item\nu1,i1\nu2,i2\nu3,i3,x\n",
            r"fields.csv:4: expected 2 fields like the header, got 3: 'u3,i3,x'",
        ),
        ("empty.csv", "", r"empty.csv: empty file"),
        (
            "pairs.txt",
            "user,item\n",
            r"input .*pairs.txt: cannot tell the format from the extension '.txt'",
        ),
    ],
)
def test_predict_bad_input_is_one_line_naming_file_line_and_column(model_dir, tmp_path, capsys, name, content, match):  # fmt: skip
    src = tmp_path / name
    src.write_text(content)
    dst = tmp_path / "out.csv"
    assert _run("predict", "--model", model_dir, "--pairs", src, "--out", dst, "--quiet") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("lrs-rec predict: error: ")
    import re

    assert re.search(match, err), err
    assert not dst.exists() and not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize("out", ["o.csv", "o.parquet"])
@pytest.mark.parametrize("command", ["predict", "recommend"])
def test_an_unwritable_out_is_one_line_naming_out(model_dir, tmp_path, capsys, command, out):
    # was "[Errno 2] Failed to open local file '.../.o.csv.<pid>.<hex>.tmp'. Detail: ..." (the
    # temporary file, pyarrow's wording) or "[Errno 17] File exists" for a parent that is a file
    src = _write_csv(tmp_path / "in.csv", ["user", "item"], [["u1", "i1"]])
    blocker = tmp_path / "file"
    blocker.write_text("x")
    dst = blocker / "sub" / out
    flag = "--pairs" if command == "predict" else "--users"
    assert _run(command, "--model", model_dir, flag, src, "--out", dst, "--quiet") == 2
    err = capsys.readouterr().err
    assert err == (
        f"lrs-rec {command}: error: --out {dst}: cannot write there ({blocker} is not a directory)\n"
    )
    assert blocker.read_text() == "x"


def test_a_utf16_input_is_one_line_naming_the_encoding(model_dir, tmp_path, capsys):
    # was "no user column in header ['\\ufffd\\ufffdu\\x00s\\x00e\\x00r\\x00', ...]"
    src = tmp_path / "pairs.tsv"
    src.write_bytes("\ufeffuser\titem\nu1\ti1\n".encode("utf-16-le"))
    assert _run("predict", "--model", model_dir, "--pairs", src, "--out", tmp_path / "o.csv", "--quiet") == 2  # fmt: skip
    err = capsys.readouterr().err
    assert (
        err.startswith(f"lrs-rec predict: error: {src}: the file is UTF-16 text")
        and err.count("\n") == 1
    )
    assert not (tmp_path / "o.csv").exists()


def test_predict_bad_input_later_in_a_stream_and_other_formats(model_dir, tmp_path, capsys):
    rows = [[f"u{j % 30}", f"i{j % 25}"] for j in range(3000)]
    rows[2500][0] = ""
    src = _write_csv(tmp_path / "big.csv", ["user", "item"], rows)
    dst = tmp_path / "out.csv"
    assert _run("predict", "--model", model_dir, "--pairs", src, "--out", dst, "--quiet", "--chunk-size", 100) == 2  # fmt: skip
    assert "big.csv:2502: user id (column 'user') is empty" in capsys.readouterr().err
    assert not dst.exists()  # no partial output
    # not UTF-8
    (tmp_path / "bin.csv").write_bytes(b"user,item\nu1,i1\nu\xff2,i2\n")
    assert _run("predict", "--model", model_dir, "--pairs", tmp_path / "bin.csv", "--out", dst, "--quiet") == 2  # fmt: skip
    assert "bin.csv:3: not UTF-8 text" in capsys.readouterr().err
    # Parquet: a null id names the row; a boolean column is refused by type
    pq.write_table(pa.table({"user": ["u1", None], "item": ["i1", "i2"]}), tmp_path / "n.parquet")
    assert _run("predict", "--model", model_dir, "--pairs", tmp_path / "n.parquet", "--out", dst, "--quiet") == 2  # fmt: skip
    assert "n.parquet:row 2: user id (column 'user') is empty" in capsys.readouterr().err
    pq.write_table(pa.table({"user": ["u1"], "item": [True]}), tmp_path / "b.parquet")
    assert _run("predict", "--model", model_dir, "--pairs", tmp_path / "b.parquet", "--out", dst, "--quiet") == 2  # fmt: skip
    assert "item column 'item' has type bool" in capsys.readouterr().err
    # missing input, output = input, same column twice
    assert _run("predict", "--model", model_dir, "--pairs", tmp_path / "nope.csv", "--out", dst, "--quiet") == 2  # fmt: skip
    assert "nope.csv: no such file" in capsys.readouterr().err
    ok = _write_csv(tmp_path / "ok.csv", ["user", "item"], [["u1", "i1"]])
    assert _run("predict", "--model", model_dir, "--pairs", ok, "--out", ok, "--quiet") == 2
    assert "is the input file" in capsys.readouterr().err
    assert _run("predict", "--model", model_dir, "--pairs", ok, "--out", dst, "--item-col", "user", "--quiet") == 2  # fmt: skip
    assert "user and item would both be read from column 'user'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _run("predict", "--model", model_dir, "--pairs", ok, "--out", dst, "--chunk-size", 0)
    assert "--chunk-size: must be at least 1, got 0" in capsys.readouterr().err


# -- recommend ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(("inp", "out"), [(".csv", ".csv"), (".parquet", ".parquet")])
def test_recommend_writes_one_row_per_user_and_rank(model_dir, om, tmp_path, inp, out):
    users = ["u3", "nobody", "u7", "u3", "u29"]
    src = tmp_path / f"users{inp}"
    if inp == ".parquet":
        pq.write_table(pa.table({"user_id": users}), src)
    else:
        _write_csv(src, ["user"], [[u] for u in users])
    dst = tmp_path / f"rec{out}"
    assert _run("recommend", "--model", model_dir, "--users", src, "--n", 4, "--out", dst, "--quiet") == 0  # fmt: skip
    got = _read(dst)
    assert list(got) == ["user", "rank", "item", "score"]
    want = [(u, r, i, s) for u in users for r, (i, s) in enumerate(om.recommend(u, n=4), start=1)]
    rows = list(zip(got["user"], got["rank"], got["item"], got["score"], strict=True))
    assert [(u, int(r), i, float(s)) for u, r, i, s in rows] == want
    # --include-rated: the training history is not excluded
    assert _run("recommend", "--model", model_dir, "--users", src, "--n", 4, "--out", dst, "--quiet", "--include-rated") == 0  # fmt: skip
    got = _read(dst)
    want_all = [i for u in users for i, _ in om.recommend(u, n=4, exclude_rated=False)]
    assert got["item"] == want_all


def test_recommend_streams_in_chunks_with_identical_output(model_dir, tmp_path):
    rng = np.random.default_rng(4)
    users = [f"u{j}" for j in rng.integers(0, N_USERS + 3, 700)]
    src = _write_csv(tmp_path / "users.tsv", ["userId"], [[u] for u in users], sep="\t")
    a, b = tmp_path / "a.csv", tmp_path / "b.csv"
    assert _run("recommend", "--model", model_dir, "--users", src, "--out", a, "--quiet") == 0
    assert _run("recommend", "--model", model_dir, "--users", src, "--out", b, "--quiet", "--chunk-size", 9) == 0  # fmt: skip
    assert a.read_bytes() == b.read_bytes()
    assert len(_read(a)["user"]) == 700 * 10


def test_recommend_bad_input(model_dir, tmp_path, capsys):
    src = tmp_path / "u.csv"
    src.write_text("user\nu1\n\nu2\n")
    assert _run("recommend", "--model", model_dir, "--users", src, "--out", tmp_path / "o.csv", "--quiet") == 2  # fmt: skip
    assert "u.csv:3: user id (column 'user') is empty" in capsys.readouterr().err
    src.write_text("name\nu1\n")
    assert _run("recommend", "--model", model_dir, "--users", src, "--out", tmp_path / "o.csv", "--quiet") == 2  # fmt: skip
    assert "no user column in header ['name']" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _run(
            "recommend", "--model", model_dir, "--users", src, "--out", tmp_path / "o.csv", "--n", 0
        )
    assert "--n: must be at least 1, got 0" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["predict", "recommend"])
def test_help_shows_every_default(command, capsys):
    with pytest.raises(SystemExit):
        _run(command, "--help")
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: 100000)" in text and "(default: show one on stderr;" in text
    if command == "recommend":
        assert "(default: 10)" in text and "(default: exclude them)" in text


@pytest.mark.parametrize("command", ["predict", "recommend"])
def test_a_bad_file_is_one_line_even_with_the_progress_bar(model_dir, tmp_path, capsys, command):
    # regression: without --quiet the tqdm bar was drawn (twice) before the error line
    flag = "--pairs" if command == "predict" else "--users"
    bad = tmp_path / "bad.csv"
    bad.write_text("name\nu1\n")
    for src, match in [(tmp_path / "nope.csv", "nope.csv: no such file"), (bad, "no user column")]:
        assert _run(command, "--model", model_dir, flag, src, "--out", tmp_path / "o.csv") == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith(f"lrs-rec {command}: error: "), err
        assert match in err and "rows" not in err


def test_sigterm_removes_the_partial_output_and_exits_143(model_dir, tmp_path):
    # SIGTERM (timeout, a job scheduler) killed the process on the spot and left
    # .out.csv.<pid>.<hex>.tmp; now it unwinds like Ctrl-C (serving.cli._sigterm_unwinds)
    import os
    import signal
    import subprocess
    import sys
    import time

    users, items = _pairs(200_000, seed=3)
    src = _write_csv(tmp_path / "in.csv", ["user", "item"], [[u, i] for u, i in zip(users, items, strict=True)])  # fmt: skip
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    argv = [sys.executable, "-m", "lrs_rec.serving.cli", "predict", "--model", str(model_dir)]
    argv += ["--pairs", str(src), "--out", str(out_dir / "o.csv"), "--chunk-size", "2", "--quiet"]
    proc = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not os.listdir(out_dir):  # the temporary output exists: mid-run
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 143 and err == "terminated\n", err
    assert os.listdir(out_dir) == []
    # the handler is only there while a command runs
    assert main(["predict", "--model", str(model_dir), "--pairs", str(src), "--out", str(tmp_path / "x.csv"), "--chunk-size", "100000", "--quiet"]) == 0  # fmt: skip
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
