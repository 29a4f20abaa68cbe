"""Loaders: every supported format (auto-detected) and every messy case, with small generated files."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from lrs_rec.training.loaders import (
    LoadOptions,
    RatingFileError,
    _dedup_latest,
    dedup_latest_reference,
    detect_format,
    load_ratings,
)
from lrs_rec.training.vocab import Vocabulary


def write(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


ROWS = [("1", "10", 4.0, 100), ("1", "20", 3.0, 101), ("2", "10", 5.0, 102), ("3", "30", 1.0, 103)]


def as_rows(table) -> list[tuple[str, str, float]]:  # type: ignore[no-untyped-def]
    return sorted(
        zip(table.users.tolist(), table.items.tolist(), table.ratings.tolist(), strict=True)
    )


EXPECTED = sorted((u, i, r) for u, i, r, _ in ROWS)


# -- formats ---------------------------------------------------------------------------------------
def test_ml100k_tab_separated_detected(tmp_path: Path) -> None:
    p = write(tmp_path, "u1.base", "".join(f"{u}\t{i}\t{int(r)}\t{t}\n" for u, i, r, t in ROWS))
    assert detect_format(p) == "ml-100k"
    t = load_ratings(p)
    assert as_rows(t) == EXPECTED
    assert (t.rating_min, t.rating_max) == (1.0, 5.0)
    assert t.report.counts == {}
    assert t.timestamps.tolist() == [100.0, 101.0, 102.0, 103.0]


def test_ml1m_double_colon_detected(tmp_path: Path) -> None:
    p = write(tmp_path, "ratings.dat", "".join(f"{u}::{i}::{int(r)}::{t}\n" for u, i, r, t in ROWS))
    assert detect_format(p) == "ml-1m"
    assert as_rows(load_ratings(p)) == EXPECTED


def test_ml_latest_csv_with_header_detected(tmp_path: Path) -> None:
    body = "userId,movieId,rating,timestamp\n" + "".join(
        f"{u},{i},{r},{t}\n" for u, i, r, t in ROWS
    )
    p = write(tmp_path, "ratings.csv", body)
    assert detect_format(p) == "ml-latest"
    t = load_ratings(p)
    assert as_rows(t) == EXPECTED
    assert (t.rating_min, t.rating_max) == (0.5, 5.0)
    assert t.report.counts == {"header_lines": 1}


def test_generic_csv_named_columns_in_any_order(tmp_path: Path) -> None:
    body = "ts;score;product;customer\n" + "".join(f"{t};{r};{i};{u}\n" for u, i, r, t in ROWS)
    p = write(tmp_path, "log.txt", body)
    assert detect_format(p) == "csv"
    opts = LoadOptions(user_col="customer", item_col="product", rating_col="score", time_col="ts")
    t = load_ratings(p, opts)
    assert as_rows(t) == EXPECTED
    assert t.timestamps.tolist() == [100.0, 101.0, 102.0, 103.0]


def test_generic_tsv_positional_columns(tmp_path: Path) -> None:
    p = write(tmp_path, "x.tsv", "".join(f"{r}\t{u}\t{i}\tjunk\n" for u, i, r, _ in ROWS))
    assert detect_format(p) == "tsv"
    t = load_ratings(p, LoadOptions(user_col="1", item_col="2", rating_col="0", time_col=None))
    assert as_rows(t) == EXPECTED


def test_parquet_detected_and_read(tmp_path: Path) -> None:
    p = tmp_path / "r.parquet"
    cols = list(zip(*ROWS, strict=True))
    pq.write_table(
        pa.table({"user_id": list(cols[0]), "item_id": list(cols[1]), "rating": list(cols[2]),
                  "timestamp": list(cols[3])}),
        p,
    )  # fmt: skip
    assert detect_format(p) == "parquet"
    t = load_ratings(p)
    assert as_rows(t) == EXPECTED


def test_parquet_nulls_and_missing_column(tmp_path: Path) -> None:
    p = tmp_path / "r.parquet"
    pq.write_table(pa.table({"user": ["a", "b"], "item": ["x", "y"], "rating": [4.0, None]}), p)
    t = load_ratings(p)
    assert len(t) == 1 and t.report.counts["missing_ratings"] == 1
    q = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"user": ["a"], "thing": ["x"], "rating": [4.0]}), q)
    with pytest.raises(RatingFileError, match="no item column"):
        load_ratings(q)


# -- messy files -----------------------------------------------------------------------------------
def test_comments_blank_lines_header_and_trailing_columns(tmp_path: Path) -> None:
    body = (
        "# exported 2024-01-01\n"
        "user,item,rating,timestamp,\n"
        "\n"
        "1,10,4,100,,\n"
        "% another comment\n"
        "1,20,3,101\n"
        "user,item,rating,timestamp\n"  # a repeated header (concatenated files)
        "2,10,5,102,\n"
        "3,30,1,103\n"
        "   \n"
    )
    t = load_ratings(write(tmp_path, "messy.csv", body))
    assert as_rows(t) == EXPECTED
    c = t.report.counts
    assert c["comment_lines"] == 2
    assert c["blank_lines"] == 2
    assert c["header_lines"] == 2
    assert c["trailing_empty_columns"] == 2
    assert t.report.rows_read == 4 and t.report.rows_kept == 4


def test_duplicates_keep_latest_by_timestamp(tmp_path: Path) -> None:
    body = "1\t10\t2\t200\n1\t10\t5\t100\n2\t10\t3\t50\n2\t10\t4\t50\n"
    t = load_ratings(write(tmp_path, "d.data", body))
    got = dict(
        zip(zip(t.users.tolist(), t.items.tolist(), strict=True), t.ratings.tolist(), strict=True)
    )
    assert got == {("1", "10"): 2.0, ("2", "10"): 4.0}  # latest time wins; tie: the later line
    assert t.report.counts["duplicates_removed"] == 2
    assert len(t.report.examples["duplicates_removed"]) == 2


def test_dedup_matches_reference_twin() -> None:
    rng = np.random.default_rng(0)
    n = 400
    users = rng.integers(0, 15, n).astype(str)
    items = rng.integers(0, 12, n).astype(str)
    times = rng.integers(0, 20, n).astype(float)
    times[rng.random(n) < 0.2] = np.nan
    fast = _dedup_latest(users, items, times).tolist()
    assert fast == dedup_latest_reference(users.tolist(), items.tolist(), times.tolist())


def test_out_of_scale_clip_drop_error(tmp_path: Path) -> None:
    p = write(tmp_path, "s.data", "1\t10\t4\t1\n1\t20\t7\t2\n2\t10\t0\t3\n")
    ml = "ml-100k"  # given: an auto-detected ML-100K file off 1..5 is refused (test below)
    t = load_ratings(p, LoadOptions(format=ml))  # default: clip to the ML-100K scale 1..5
    assert sorted(t.ratings.tolist()) == [1.0, 4.0, 5.0]
    assert t.report.counts["ratings_clipped"] == 2
    assert len(t.report.examples["ratings_clipped"]) == 2
    t = load_ratings(p, LoadOptions(format=ml, on_out_of_scale="drop"))
    assert t.ratings.tolist() == [4.0]
    assert t.report.counts["ratings_out_of_scale_dropped"] == 2
    with pytest.raises(RatingFileError, match=r"s\.data:2: rating 7 is outside the scale \[1, 5\]"):
        load_ratings(p, LoadOptions(format=ml, on_out_of_scale="error"))
    t = load_ratings(p, LoadOptions(rating_scale=(0.0, 10.0)))
    assert sorted(t.ratings.tolist()) == [0.0, 4.0, 7.0]


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "reference"])
@pytest.mark.parametrize("fmt", ["ml-100k", "ml-1m"])
@pytest.mark.parametrize("rule", ["clip", "drop", "error"])
def test_auto_detected_movielens_with_another_scale_is_refused(
    tmp_path: Path, fast: bool, fmt: str, rule: str
) -> None:
    """Audit: a 1-10 log with four integer tab-separated columns was detected as ML-100K and
    trained with 897 of 1,500 ratings clipped to 1..5, exit 0."""
    sep, generic = ("\t", "tsv") if fmt == "ml-100k" else ("::", "csv")
    rows = [(1, 10, 4, 1), (1, 20, 9, 2), (2, 10, 10, 3), (3, 30, 0, 4), (3, 10, 2, 5)]
    p = write(tmp_path, "r.data", "".join(sep.join(map(str, r)) + "\n" for r in rows))
    assert detect_format(p) == fmt
    with pytest.raises(RatingFileError) as e:
        load_ratings(p, LoadOptions(fast=fast, on_out_of_scale=rule))
    msg = str(e.value)
    assert msg.startswith(f"{p}:2: rating 9 is outside the [1, 5] scale of the {fmt} format")
    assert "auto-detected" in msg and "3 of 5 ratings" in msg and "observed range 0..10" in msg
    assert f"--format {generic} --rating-scale MIN MAX" in msg and f"--format {fmt}" in msg
    # the suggested fix reads the file as it is
    t = load_ratings(p, LoadOptions(format=generic, rating_scale=(0.0, 10.0), fast=fast))
    assert as_rows(t) == sorted((str(u), str(i), float(r)) for u, i, r, _ in rows)
    assert "ratings_clipped" not in t.report.counts
    # unchanged: a declared scale, or the format given explicitly
    t = load_ratings(p, LoadOptions(rating_scale=(1.0, 10.0), fast=fast))
    assert t.report.format == fmt and t.report.counts["ratings_clipped"] == 1
    t = load_ratings(p, LoadOptions(format=fmt, fast=fast))
    assert sorted(t.ratings.tolist()) == [1.0, 2.0, 4.0, 5.0, 5.0]
    assert t.report.counts["ratings_clipped"] == 3


@pytest.mark.parametrize("eol", ["\n", "\r\n", "\r"], ids=["lf", "crlf", "cr"])
def test_non_utf8_file_names_the_line_and_the_byte(tmp_path: Path, eol: str) -> None:
    """Audit: the error said only "at byte 36" (and that offset was within the reader's chunk)."""
    head = f"user,item,rating{eol}alice,x,4{eol}"
    p = tmp_path / "latin1.csv"
    p.write_bytes(f"{head}bob,caf\xe9,3{eol}".encode("latin-1"))
    for fast in (True, False):
        with pytest.raises(RatingFileError) as e:
            load_ratings(p, LoadOptions(fast=fast))
        assert str(e.value).startswith(
            f"{p}:3: not UTF-8 text (invalid continuation byte: 0xe9 at byte {len(head) + 7})"
        )
    # far into the file, past a multi-byte character or an end of line split by the 64 KiB reads
    filler = ("user,item,rating" + eol + "".join(f"u{k},i{k},3{eol}" for k in range(3000))).encode()
    for straddle in ("\u00e9", eol):
        line = "u,\u00e9,3" + eol if straddle != eol else "u,i,3" + eol
        at = line.index(straddle)
        n = (1 << 16) - 1 - len(filler) - 1 - len(eol) - at  # a comment pads it to byte 65535
        good = filler + f"#{'.' * n}{eol}{line}".encode()
        assert good[(1 << 16) - 1 :].startswith(straddle.encode()[:1])
        p.write_bytes(good + b"x,\xff,1" + eol.encode())
        with pytest.raises(RatingFileError) as e:
            load_ratings(p, LoadOptions(fast=False))
        lineno = good.decode().count(eol) + 1
        what = f"invalid start byte: 0xff at byte {len(good) + 2})"
        assert str(e.value).startswith(f"{p}:{lineno}: not UTF-8 text ({what}"), str(e.value)


def test_nan_ratings_dropped_and_counted(tmp_path: Path) -> None:
    body = "user,item,rating\na,x,4\nb,x,NaN\nc,x,\nd,y,null\ne,y,3.5\n"
    t = load_ratings(write(tmp_path, "n.csv", body))
    assert len(t) == 2
    assert t.report.counts["missing_ratings"] == 3
    assert t.report.examples["missing_ratings"][0].endswith("n.csv:3")


def test_string_ids_are_kept_and_counted(tmp_path: Path) -> None:
    body = "user,item,rating\nalice,tt0111161,5\nbob,tt0068646,4\n42,7,3\n"
    t = load_ratings(write(tmp_path, "s.csv", body))
    assert sorted(t.users.tolist()) == ["42", "alice", "bob"]
    assert t.report.counts["non_numeric_user_ids"] == 2
    assert t.report.counts["non_numeric_item_ids"] == 2


@pytest.mark.parametrize(
    ("body", "match"),
    [
        ("1\t10\t4\t1\n2\t20\tfive\t2\n", r"bad\.data:2: rating 'five' is not a number"),
        ("1\t10\t4\t1\n2\t20\n", r"bad\.data:2: expected at least 3 tab-separated fields"),
        ("1\t10\t4\t1\n\t20\t3\t2\n", r"bad\.data:2: empty user id"),
        ("1\t10\t4\t1\n2\t20\t3\tyesterday\n", r"bad\.data:2: timestamp 'yesterday'"),
        ("# only a comment\n\n", r"bad\.data: empty file"),
        ("", r"bad\.data: empty file \(0 bytes\)"),
        ("1\t10\tinf\t1\n", r"bad\.data:1: rating 'inf' is infinite"),
    ],
)
def test_bad_rows_raise_with_file_line_and_value(tmp_path: Path, body: str, match: str) -> None:
    p = write(tmp_path, "bad.data", body)
    with pytest.raises(RatingFileError, match=match):
        load_ratings(p, LoadOptions(format="ml-100k"))


def test_all_rows_dropped_is_an_error(tmp_path: Path) -> None:
    p = write(tmp_path, "nan.csv", "user,item,rating\na,b,nan\n")
    with pytest.raises(RatingFileError, match=r"no rating rows .*missing_ratings"):
        load_ratings(p)


def test_unknown_column_name_and_missing_file(tmp_path: Path) -> None:
    p = write(tmp_path, "c.csv", "user,item,rating\na,b,3\n")
    with pytest.raises(RatingFileError, match=r"c\.csv:1: rating column 'stars' not found"):
        load_ratings(p, LoadOptions(rating_col="stars"))
    with pytest.raises(FileNotFoundError, match="no such rating file"):
        load_ratings(tmp_path / "nope.csv")


def test_iso_dates_and_quoted_fields(tmp_path: Path) -> None:
    body = 'user,item,rating,date\n"a","The Matrix, 1999",4,2020-01-02\n"a","The Matrix, 1999",2,2021-01-02\n'
    t = load_ratings(write(tmp_path, "q.csv", body))
    assert t.items.tolist() == ["The Matrix, 1999"]
    assert t.ratings.tolist() == [2.0]
    assert not math.isnan(float(t.timestamps[0]))


def test_vocabulary_natural_order_and_unknown() -> None:
    v = Vocabulary.from_ids(["10", "2", "b", "a", "2"])
    assert v.ids == ("2", "10", "a", "b")
    assert v.encode(np.array(["a", "zzz", "10"])).tolist() == [2, -1, 1]
    with pytest.raises(ValueError, match="distinct"):
        Vocabulary(("x", "x"))


# -- the fast reader and its reference twin ------------------------------------------------------
CLEAN_FILES = {
    "u.data": "".join(f"{u}\t{i}\t{int(r)}\t{t}\n" for u, i, r, t in ROWS * 3),
    "ratings.dat": "".join(f"{u}::{i}::{int(r)}::{t}\n" for u, i, r, t in ROWS),
    "ratings.csv": "userId,movieId,rating,timestamp\n"
    + "".join(f"{u},{i},{r},{t}\n" for u, i, r, t in ROWS),
    "named.csv": "ts;score;product;customer\n"
    + "".join(f"{t};{r};p{i};c {u}\n" for u, i, r, t in ROWS),
    "noterm.tsv": "a\tx\t3.5\nb\ty\t4",
    "scale.data": "1\t10\t9\t5\n1\t10\t2\t4\n",
}


@pytest.mark.parametrize("name", sorted(CLEAN_FILES))
def test_fast_reader_matches_reference_parser(tmp_path: Path, name: str) -> None:
    p = write(tmp_path, name, CLEAN_FILES[name])
    kw: dict[str, str] = {}
    if name == "named.csv":
        kw = {"user_col": "customer", "item_col": "product"}
    elif name == "scale.data":  # out of 1..5: clipped only with the format given
        kw = {"format": "ml-100k"}
    fast = load_ratings(p, LoadOptions(**kw))
    ref = load_ratings(p, LoadOptions(fast=False, **kw))
    assert fast.report.parser == "fast" and ref.report.parser == "reference"
    for a in ("users", "items", "ratings"):
        np.testing.assert_array_equal(getattr(fast, a), getattr(ref, a))
    np.testing.assert_array_equal(fast.timestamps, ref.timestamps)  # NaN == NaN here
    assert {k: v for k, v in fast.report.to_dict().items() if k != "parser"} == {
        k: v for k, v in ref.report.to_dict().items() if k != "parser"
    }


def test_messy_files_take_the_reference_parser(tmp_path: Path) -> None:
    for body in (
        "# c\n1\t2\t3\t4\n",
        "1\t2\t3\t4\n\n1\t3\t3\t4\n",
        "1\t2\tNaN\t4\n2\t2\t3\t4\n",
        "1\t2\t3\t4\t\n",
    ):
        t = load_ratings(write(tmp_path, "m.data", body), LoadOptions(format="ml-100k"))
        assert t.report.parser == "reference" and t.report.counts


def test_rows_are_accounted_for(tmp_path: Path) -> None:
    """rows_read = rows_kept + every dropping rule: nothing disappears silently."""
    body = "1\t10\t4\t1\n1\t10\t5\t2\n2\t10\tnan\t3\n3\t10\t9\t4\n4\t11\t2\t5\n"
    opts = LoadOptions(format="ml-100k", on_out_of_scale="drop")
    t = load_ratings(write(tmp_path, "acc.data", body), opts)
    c = t.report.counts
    dropped = c.get("missing_ratings", 0) + c.get("duplicates_removed", 0)
    dropped += c.get("ratings_out_of_scale_dropped", 0)
    assert t.report.rows_read == t.report.rows_kept + dropped == 5


# -- review fixes: column resolution, BOMs, wrong types, id order ------------------------------
BOTH = pytest.mark.parametrize("fast", [True, False], ids=["fast", "reference"])


@BOTH
@pytest.mark.parametrize(
    ("header", "missing"),
    [("user,item,timestamp", "rating"), ("user,rating,timestamp", "item")],
)
def test_header_without_a_needed_column_is_an_error(
    tmp_path: Path, fast: bool, header: str, missing: str
) -> None:
    # the positional fallback must not read timestamps as ratings or ratings as item ids
    p = write(tmp_path, "h.csv", f"{header}\n1,10,100\n2,11,101\n")
    with pytest.raises(RatingFileError, match=rf"h\.csv:1: no {missing} column in header"):
        load_ratings(p, LoadOptions(fast=fast))


@BOTH
def test_same_column_for_two_roles_is_an_error(tmp_path: Path, fast: bool) -> None:
    p = write(tmp_path, "c.csv", "userId,movieId,rating\n1,10,4\n2,11,3\n")
    with pytest.raises(RatingFileError, match="the user and item columns are both 'userId'"):
        load_ratings(p, LoadOptions(user_col="userId", item_col="userId", fast=fast))
    q = tmp_path / "c.parquet"
    pq.write_table(pa.table({"user": ["a"], "item": ["x"], "rating": [4.0]}), q)
    with pytest.raises(RatingFileError, match="the user and item columns are both 'user'"):
        load_ratings(q, LoadOptions(item_col="user"))


@BOTH
@pytest.mark.parametrize("crlf", [False, True], ids=["lf", "crlf"])
def test_utf8_bom_is_stripped(tmp_path: Path, fast: bool, crlf: bool) -> None:
    nl = "\r\n" if crlf else "\n"
    rows = [("10", "1", 4.0, 100), ("20", "1", 3.0, 101), ("10", "2", 5.0, 102)]
    for name, head in (("hdr.csv", "item,user,rating,timestamp"), ("nohdr.csv", None)):
        lines = ([head] if head else []) + [
            f"{i},{u},{r},{t}" if head else f"{u},{i},{r},{t}" for i, u, r, t in rows
        ]
        p = tmp_path / name
        p.write_bytes(b"\xef\xbb\xbf" + nl.join(lines).encode() + nl.encode())
        t = load_ratings(p, LoadOptions(fast=fast))
        assert as_rows(t) == sorted((u, i, r) for i, u, r, _ in rows)  # no '\ufeff1' user
        assert "duplicates_removed" not in t.report.counts
        assert "non_numeric_user_ids" not in t.report.counts


@BOTH
@pytest.mark.parametrize(
    ("name", "body", "kw", "match"),
    [
        ("two.csv", "1,10\n2,11\n", {}, r"expected at least 3 comma-separated fields"),
        ("c.csv", "1,10,4\n", {"format": "ml-100k"}, r"at least 3 tab-separated fields .*, got 1"),
        ("c.csv", "1,10,4\n", {"format": "tsv"}, r"at least 3 tab-separated fields .*, got 1"),
        ("c.csv", "1,10,4\n", {"format": "ml-1m"}, r"at least 3 '::'-separated fields"),
        ("t.tsv", "1\t10\t4\t5\n", {"format": "ml-latest"}, r"3 comma-separated fields .*, got 1"),
        ("t.tsv", "1\t10\t4\t5\n", {"format": "ml-1m"}, r"3 '::'-separated fields .*, got 1"),
        ("c.csv", "1,10,4\n", {"user_col": "9"}, r"user column 9 is out of range: .* 3 comma"),
        ("c.csv", "1,10,4\n", {"time_col": "9"}, r"time column 9 is out of range"),
        ("c.csv", "1,10,4\n", {"user_col": "-1"}, r"user column '-1': positions are 0 or more"),
    ],
)
def test_short_lines_and_bad_positions_are_errors(
    tmp_path: Path, fast: bool, name: str, body: str, kw: dict[str, str], match: str
) -> None:
    p = write(tmp_path, name, body)
    with pytest.raises(RatingFileError, match=rf"{name.replace('.', '[.]')}:1: .*" + match):
        load_ratings(p, LoadOptions(fast=fast, **kw))


@pytest.mark.parametrize(
    ("column", "values", "typ"),
    [
        ("timestamp", pa.array([1, 2], pa.date32()), "date32"),
        ("timestamp", pa.array([1, 2], pa.duration("s")), "duration"),
        ("rating", pa.array([[4], [3]]), "list"),
        ("rating", pa.array([1, 2], pa.timestamp("s")), "timestamp"),
        ("rating", pa.array([True, False]), "bool"),
    ],
)
def test_parquet_wrong_column_types_are_errors(
    tmp_path: Path, column: str, values: pa.Array, typ: str
) -> None:
    cols = {"user": pa.array(["a", "b"]), "item": pa.array(["x", "y"])}
    cols["rating"] = pa.array([4.0, 3.0])
    cols[column] = values
    p = tmp_path / "t.parquet"
    pq.write_table(pa.table(cols), p)
    with pytest.raises(RatingFileError, match=rf"t\.parquet: \w+ column '{column}' has type {typ}"):
        load_ratings(p)


def test_vocabulary_order_is_the_same_in_every_process() -> None:
    # "7", "07", "007" tie on the number: without a tie-break their order followed str hashing
    code = (
        "from lrs_rec.training.vocab import Vocabulary;"
        "print(Vocabulary.from_ids(['7', '07', '007', '10', '010', 'b', 'a']).ids)"
    )
    outs = {
        subprocess.run(
            [sys.executable, "-c", code],
            env={**os.environ, "PYTHONHASHSEED": str(seed)},
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        for seed in range(1, 5)
    }
    assert outs == {"('007', '07', '7', '010', '10', 'a', 'b')\n"}


@BOTH
def test_unicode_digit_ids_do_not_crash(tmp_path: Path, fast: bool) -> None:
    # '²'.isdigit() is True but int('²') fails: such ids are plain strings
    p = write(tmp_path, "u.csv", "user,item,rating\n²,10,4\n1,10,3\n")
    t = load_ratings(p, LoadOptions(fast=fast))
    assert Vocabulary.from_ids(t.users).ids == ("1", "²")


def test_iso_times_without_a_zone_are_utc_whatever_the_machine(tmp_path, monkeypatch):
    """The same log must give the same times on every machine (order around DST included)."""
    import time as _time

    path = tmp_path / "r.csv"
    path.write_text(
        "user,item,rating,timestamp\n1,10,4,1998-03-01T12:00:00\n1,11,3,1998-03-01T12:00:00+01:00\n"
    )
    got = []
    for tz in ("UTC", "America/New_York", "Asia/Tokyo"):
        monkeypatch.setenv("TZ", tz)
        _time.tzset()
        got.append(load_ratings(path).timestamps.tolist())
    monkeypatch.delenv("TZ")
    _time.tzset()
    assert got[0] == got[1] == got[2]
    assert got[0] == [888753600.0, 888750000.0]  # 12:00 UTC; 12:00+01:00 = 11:00 UTC


# -- fuzzer findings: unreadable files, odd timestamps, extra fields, ids the service refuses --------
@pytest.mark.parametrize(
    ("data", "fmt", "hint"),
    [
        (bytes(range(256)) * 4, "auto", "looks binary"),
        (b"PAR1" + bytes(200), "csv", "use --format parquet"),
        (b"1 10 4\n2 11\n", "auto", "separated by spaces, but line 2 has fewer than three"),
    ],
)
def test_undetectable_delimiter_names_the_file(
    tmp_path: Path, data: bytes, fmt: str, hint: str
) -> None:
    p = tmp_path / "x.bin"
    p.write_bytes(data.replace(b"\t", b"").replace(b",", b"").replace(b";", b"").replace(b"|", b""))
    with pytest.raises(RatingFileError, match=rf"x\.bin: cannot tell the delimiter.*{hint}"):
        load_ratings(p, LoadOptions(format=fmt))


@BOTH
@pytest.mark.parametrize("ts", ["inf", "-inf", "1e400"])
def test_infinite_timestamps_are_errors_like_infinite_ratings(
    tmp_path: Path, fast: bool, ts: str
) -> None:
    p = write(tmp_path, "t.data", f"1\t2\t3\t4\n5\t7\t3\t{ts}\n")
    with pytest.raises(RatingFileError, match=rf"t\.data:2: timestamp '{ts}' is infinite"):
        load_ratings(p, LoadOptions(fast=fast))


@BOTH
def test_missing_timestamps_are_kept_and_counted(tmp_path: Path, fast: bool) -> None:
    p = write(tmp_path, "t.data", "1\t2\t3\t4\n5\t7\t3\tnan\n6\t7\t3\t\n")
    t = load_ratings(p, LoadOptions(fast=fast))
    assert len(t) == 3 and np.isnan(t.timestamps).sum() == 2
    assert t.report.counts == {"missing_timestamps": 2}
    assert t.report.examples["missing_timestamps"][0].endswith("t.data:2")


def test_parquet_infinite_and_null_timestamps(tmp_path: Path) -> None:
    p = tmp_path / "t.parquet"
    cols = {"user": ["1", "2"], "item": ["3", "4"], "rating": [3.0, 4.0]}
    pq.write_table(pa.table({**cols, "timestamp": [1.0, None]}), p)
    assert load_ratings(p).report.counts == {"missing_timestamps": 1}
    pq.write_table(pa.table({**cols, "timestamp": [1.0, math.inf]}), p)
    with pytest.raises(RatingFileError, match=r"t\.parquet:row 2: timestamp inf is infinite"):
        load_ratings(p)


@BOTH
@pytest.mark.parametrize(
    ("fmt", "body", "line"),
    [
        ("ml-100k", "1\t2\t3\t4\n5\t7\t3\t5\t9\n", 2),
        ("ml-100k", "1\t2\t3\t4\t9\n5\t7\t3\t5\n", 1),
        ("ml-1m", "1::2::3::4\n5::7::3::5::9\n", 2),
    ],
)
def test_movielens_line_with_an_extra_field_is_an_error(
    tmp_path: Path, fast: bool, fmt: str, body: str, line: int
) -> None:
    p = write(tmp_path, "m.data", body)
    with pytest.raises(RatingFileError, match=rf"m\.data:{line}: {fmt} lines have 4 .* got 5"):
        load_ratings(p, LoadOptions(format=fmt, fast=fast))
    # an empty extra field is the counted trailing-column repair; generic TSV may have more columns
    e = write(tmp_path, "e.data", "1\t2\t3\t4\t\n")
    t = load_ratings(e, LoadOptions(format="ml-100k", fast=fast))
    assert t.report.counts == {"trailing_empty_columns": 1}
    if fmt == "ml-100k":
        assert len(load_ratings(p, LoadOptions(format="tsv", fast=fast))) == 2


@BOTH
@pytest.mark.parametrize(
    ("row", "what", "problem"),
    [
        ("7\x00\t2\t3\t5", "user", r"control or non-printable character '\\x00' at position 1"),
        ("u0\x01\t2\t3\t5", "user", "control or non-printable character"),
        ("1\ti0\x7f\t3\t5", "item", "control or non-printable character"),
        ("1\ti\u200b\t3\t5", "item", "control or non-printable character"),  # Cf: zero-width space
        ("1\tx\ufffd\t3\t5", "item", r"contains U\+FFFD at position 1"),
        ("1\t" + "9" * 1_000_000 + "\t3\t5", "item", "is 1000000 characters long; at most 256"),
    ],
)
def test_ids_the_service_refuses_are_errors(
    tmp_path: Path, fast: bool, row: str, what: str, problem: str
) -> None:
    p = tmp_path / "c.data"
    p.write_text(f"1\t2\t3\t4\n{row}\n", encoding="utf-8")
    with pytest.raises(RatingFileError, match=rf"c\.data:2: {what} id .* {problem}") as e:
        load_ratings(p, LoadOptions(fast=fast))
    assert len(str(e.value)) < 300


def test_printable_unicode_ids_are_kept(tmp_path: Path) -> None:
    p = tmp_path / "u.csv"
    p.write_text("user,item,rating\nzoë,東京 タワー,4\n" + "u" * 256 + ",x\u00a0y,3\n")
    assert len(load_ratings(p)) == 2


# -- audit11: a header naming neither the user nor the item column is refused -------------------
@BOTH
@pytest.mark.parametrize("header", ["product,customer,rating", "x,y,z", "Customer;Product;Stars"])
def test_header_naming_neither_user_nor_item_is_an_error(
    tmp_path: Path, fast: bool, header: str
) -> None:
    # read by position, "product,customer,rating" silently swapped users and items
    delim = ";" if ";" in header else ","
    body = f"{header}\n" + "".join(f"i{k}{delim}u{k % 3}{delim}{1 + k % 5}\n" for k in range(9))
    p = write(tmp_path, "pc.csv", body)
    with pytest.raises(RatingFileError, match=r"pc\.csv:1: the header .* names neither a user"):
        load_ratings(p, LoadOptions(fast=fast))
    # explicit columns still work, by name or position
    first = header.split(delim)
    t = load_ratings(p, LoadOptions(user_col=first[1], item_col=first[0], fast=fast))
    t2 = load_ratings(p, LoadOptions(user_col="1", item_col="0", fast=fast))
    assert as_rows(t) == as_rows(t2)
    assert {u for u, _, _ in as_rows(t)} == {"u0", "u1", "u2"}


@BOTH
def test_header_naming_only_one_of_user_item_keeps_the_positional_fallback(
    tmp_path: Path, fast: bool
) -> None:
    p = write(tmp_path, "one.csv", "customer,product_id,rating\nu1,i1,4\nu2,i1,3\n")
    t = load_ratings(p, LoadOptions(fast=fast))
    assert t.report.rows_kept == 2


@BOTH
@pytest.mark.parametrize(("delim", "fmt"), [("\t", "tsv"), (";", "csv"), ("|", "csv")])
def test_movielens_latest_header_with_another_delimiter_is_a_generic_file(
    tmp_path: Path, fast: bool, delim: str, fmt: str
) -> None:
    # was detected as ml-latest, whose reader splits on commas: "expected at least 3
    # comma-separated fields (user, item, rating), got 1: 'userId\tmovieId\trating'"
    for head in ("userId,movieId,rating,timestamp", "userId,movieId,rating"):
        n = head.count(",") + 1
        lines = [head.replace(",", delim)] + [
            delim.join([u, i, f"{r:g}", str(t)][:n]) for u, i, r, t in ROWS
        ]
        p = write(tmp_path, "ratings.txt", "\ufeff" + "\n".join(lines) + "\n")
        assert detect_format(p) == fmt
        t = load_ratings(p, LoadOptions(fast=fast))
        assert as_rows(t) == EXPECTED
        assert (t.rating_min, t.rating_max) == (1.0, 5.0)  # the observed scale, not ml-latest's
        assert t.report.counts == {"header_lines": 1}


@pytest.mark.parametrize(
    ("kind", "tool"),
    [("gzip", "gunzip -k"), ("bzip2", "bunzip2 -k"), ("zip", "unzip"), ("xz", "unxz -k")],
)
def test_a_compressed_rating_file_names_the_compression(
    tmp_path: Path, kind: str, tool: str
) -> None:
    # a ratings.csv.gz was "cannot tell the delimiter: this line has no tab, ... ('<binary>')"
    import bz2
    import gzip
    import lzma
    import zipfile

    text = "user,item,rating\n" + "".join(f"{u},{i},{r}\n" for u, i, r, _ in ROWS)
    p = tmp_path / f"ratings.csv.{kind}"
    if kind == "zip":
        with zipfile.ZipFile(p, "w") as z:
            z.writestr("ratings.csv", text)
    else:
        p.write_bytes({"gzip": gzip, "bzip2": bz2, "xz": lzma}[kind].compress(text.encode()))
    for fmt in ("auto", "csv"):
        with pytest.raises(RatingFileError) as e:
            load_ratings(p, LoadOptions(format=fmt))
        assert str(e.value) == (
            f"{p}: the file is {kind}-compressed; decompress it first (e.g. {tool} {p}): ratings "
            "are read from plain text or Parquet"
        )
    # text that merely starts like bzip2's magic is text
    q = write(tmp_path, "bz.csv", "BZh9,10,4\nBZh8,20,3\n")
    assert as_rows(load_ratings(q)) == [("BZh8", "20", 3.0), ("BZh9", "10", 4.0)]


@pytest.mark.parametrize(("encoding", "name"), [("utf-16", "UTF-16"), ("utf-16-be", "UTF-16"), ("utf-32", "UTF-32")])  # fmt: skip
def test_utf16_and_utf32_text_is_named_with_the_way_to_utf8(tmp_path: Path, encoding: str, name: str) -> None:  # fmt: skip
    # Excel's "Unicode Text" (UTF-16, tab-separated): was "cannot tell the delimiter: this line has
    # no tab, ... ('\x00') ... (it looks binary, not a text rating file)"
    text = "user\titem\trating\n" + "".join(f"{u}\t{i}\t{r:g}\n" for u, i, r, _ in ROWS)
    p = tmp_path / "export.txt"
    p.write_bytes(("\ufeff" + text).encode(encoding))
    with pytest.raises(RatingFileError) as e:
        load_ratings(p)
    assert str(e.value) == (
        f"{p}: the file is {name} text (it starts with a {name} byte-order mark); re-encode it as "
        f"UTF-8 (e.g. iconv -f {name} -t UTF-8 {p} > {tmp_path / 'export-utf8.txt'})"
    )
    p.write_text(text)  # the same text in UTF-8 reads
    assert as_rows(load_ratings(p)) == EXPECTED


@pytest.mark.parametrize("header", [True, False])
def test_a_space_separated_file_reads_like_its_tab_separated_twin(tmp_path: Path, header: bool):
    """LibRec-style ``ratings.txt`` (FilmTrust, Epinions, CiaoDVD: "user item rating" with single
    spaces; here also runs of spaces, leading/trailing ones and an optional time column): the same
    table as the tab-separated file with the same fields (it was "cannot tell the delimiter")."""
    rows = [["1", "10", "4"], ["2", "11", "0.5", "881250949"], ["1", "12", "3.5"], ["3", "10", "2"]]
    spaced = ["1 10 4", "  2   11 0.5 881250949 ", "1 12  3.5", "3 10 2"]
    head = ["user item rating"] if header else []
    (tmp_path / "r.txt").write_text("\n".join([*head, *spaced]) + "\n")
    tab_head = ["user\titem\trating"] if header else []
    (tmp_path / "r.tsv").write_text("\n".join([*tab_head, *("\t".join(r) for r in rows)]) + "\n")
    assert detect_format(tmp_path / "r.txt") == "csv"
    a, b = load_ratings(tmp_path / "r.txt"), load_ratings(tmp_path / "r.tsv")
    for name in ("users", "items", "ratings"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    np.testing.assert_array_equal(np.isnan(a.timestamps), np.isnan(b.timestamps))
    assert a.ratings.tolist() == [4.0, 0.5, 3.5, 2.0]
    assert (a.rating_min, a.rating_max) == (b.rating_min, b.rating_max)
