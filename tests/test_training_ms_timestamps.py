"""Timestamps in milliseconds among seconds (issue 12 §3; MovieLens latest-small has one such row):
detected, converted to seconds and counted by the cleaning report (``timestamps_ms_converted``)."""

from __future__ import annotations

import numpy as np
import pytest
from lrs_rec.training.loaders import LoadOptions, load_ratings


def _write(path, rows):
    path.write_text("userId,movieId,rating,timestamp\n" + "".join(f"{r}\n" for r in rows))
    return path


@pytest.mark.parametrize("fast", [True, False])  # the vectorised reader and its reference twin
def test_a_millisecond_timestamp_among_seconds_is_converted_and_counted(tmp_path, fast):
    rows = [
        "1,10,4.0,964982703",
        "1,20,3.5,964981247",
        "2,10,5.0,1445714835",
        "2,30,2.0,1493850091000",  # milliseconds: 2017-05-03 in seconds
        "3,20,1.0,1147880044",
        # the same (user, item) twice: the ms row is OLDER (2004) than the seconds row (2015),
        # read as seconds it would be the year 35000 and wrongly win the de-duplication
        "3,30,4.5,1100000000000",
        "3,30,1.5,1420000000",
    ]
    path = _write(tmp_path / "ratings.csv", rows)
    table = load_ratings(path, LoadOptions(fast=fast))
    report = table.report
    assert report.counts["timestamps_ms_converted"] == 2
    assert report.examples["timestamps_ms_converted"] == [
        f"{path}:5 (1493850091000)",
        f"{path}:7 (1100000000000)",
    ]
    got = {(u, i): (r, t) for u, i, r, t in zip(
        table.users, table.items, table.ratings, table.timestamps, strict=True)}  # fmt: skip
    assert got[("2", "30")] == (2.0, 1493850091.0)
    assert got[("3", "30")] == (1.5, 1420000000.0)  # the later rating wins once times are seconds
    assert report.counts["duplicates_removed"] == 1
    assert np.all(table.timestamps < 1e11)


def test_columns_in_one_unit_are_left_alone(tmp_path):
    seconds = load_ratings(_write(tmp_path / "s.csv", ["1,1,4,964982703", "1,2,3,964981247"]))
    assert "timestamps_ms_converted" not in seconds.report.counts
    ms = ["1,1,4,964982703000", "1,2,3,964981247000", "2,1,5,1445714835000"]
    table = load_ratings(_write(tmp_path / "ms.csv", ms))
    assert "timestamps_ms_converted" not in table.report.counts  # all milliseconds: order kept
    assert sorted(table.timestamps.tolist()) == [964981247000.0, 964982703000.0, 1445714835000.0]
    none = load_ratings(_write(tmp_path / "n.csv", ["1,1,4,", "1,2,3,"]))
    assert "timestamps_ms_converted" not in none.report.counts
