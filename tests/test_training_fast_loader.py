"""The fast reader (byte scan + pyarrow, ids dictionary-encoded) against its reference twin, on many
generated file shapes; the loader defects D9 (huge lines), D10 (implausible observed scale) and D11
(mixed delimiters) of the hardening issue; the vectorised vocabulary against its reference."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from lrs_rec.training.fast_text import MAX_LINE_BYTES, IdCodes
from lrs_rec.training.loaders import LoadOptions, RatingFileError, load_ratings
from lrs_rec.training.synthetic_scale import make_biased_mf, write_csv
from lrs_rec.training.vocab import Vocabulary, natural_order, natural_order_reference

DELIMS = ["\t", ",", ";", "|", "::"]


def _shape(seed: int) -> tuple[str, dict[str, object]]:
    """A random rating file: delimiter, header, id style, duplicates, whitespace, BOM, missing
    final newline, extra columns, and (sometimes) something only the reference parser handles."""
    rng = np.random.default_rng(seed)
    delim = DELIMS[seed % len(DELIMS)]
    n = int(rng.integers(5, 60))
    n_users, n_items = int(rng.integers(1, 12)), int(rng.integers(2, 15))
    style = seed % 3  # numeric ids, prefixed ids, zero-padded numeric ids
    header = bool(rng.random() < 0.5) and delim != "::"
    with_time = bool(rng.random() < 0.7)
    extra = bool(rng.random() < 0.2) and delim != "::" and header
    half = bool(rng.random() < 0.3) and delim != "::"

    def ident(prefix: str, k: int) -> str:
        return [str(k + 1), f"{prefix}{k}", f"{k:03d}"][style]

    lines = []
    if header:
        cols = ["user", "item", "rating"] + (["timestamp"] if with_time else [])
        lines.append(delim.join(cols + (["note"] if extra else [])))
    for _ in range(n):
        u = ident("u", int(rng.integers(n_users)))
        i = ident("i", int(rng.integers(n_items)))
        r = float(rng.integers(1, 6 if delim == "::" else 11)) / (2 if half else 1)
        rs = f"{r:g}" if rng.random() < 0.8 else f"{r:.1f}"
        row = [u, i, rs] + ([str(int(rng.integers(10**9, 2 * 10**9)))] if with_time else [])
        if extra:
            row.append("x")
        if rng.random() < 0.1 and delim not in (" ",):
            row[0] = f" {row[0]} "  # whitespace to strip
        lines.append(delim.join(row))
    mess = seed % 7
    if mess == 1:
        lines.insert(1, "# a comment")
    elif mess == 2:
        lines.insert(len(lines) // 2, "")
    elif mess == 3 and not extra:
        lines[-1] = lines[-1] + delim  # a trailing empty column
    elif mess == 4 and header:
        lines.insert(len(lines) // 2, lines[0])  # a repeated header (concatenated files)
    text = "\n".join(lines) + ("\n" if seed % 5 else "")
    if seed % 11 == 0:
        text = "\ufeff" + text
    opts: dict[str, object] = {}
    if seed % 4 == 0:
        opts = {"rating_scale": (1.0, 4.0), "on_out_of_scale": ["clip", "drop"][seed % 8 // 4]}
    return text, opts


def _same(fast, ref) -> None:  # type: ignore[no-untyped-def]
    for a in ("users", "items", "ratings", "timestamps", "rating_min", "rating_max"):
        np.testing.assert_array_equal(getattr(fast, a), getattr(ref, a), err_msg=a)
    assert fast.fingerprint == ref.fingerprint
    strip = ("parser",)
    assert {k: v for k, v in fast.report.to_dict().items() if k not in strip} == {
        k: v for k, v in ref.report.to_dict().items() if k not in strip
    }


@pytest.mark.parametrize("seed", range(60))
def test_fast_reader_equals_reference_on_generated_files(tmp_path: Path, seed: int) -> None:
    text, kw = _shape(seed)
    p = tmp_path / ("r.dat" if seed % len(DELIMS) == 4 else "r.txt")
    p.write_text(text, encoding="utf-8")
    try:
        ref = load_ratings(p, LoadOptions(fast=False, **kw))  # type: ignore[arg-type]
    except RatingFileError as e:
        with pytest.raises(RatingFileError) as got:
            load_ratings(p, LoadOptions(**kw))  # type: ignore[arg-type]
        assert str(got.value) == str(e)
        return
    fast = load_ratings(p, LoadOptions(**kw))  # type: ignore[arg-type]
    _same(fast, ref)
    # the vocabularies and encodings built from the fast table's codes are the reference ones
    for ids_fast, ids_ref in ((fast.user_ids(), ref.users), (fast.item_ids(), ref.items)):
        v = Vocabulary.from_ids(ids_fast)
        assert v == Vocabulary.from_ids_reference(ids_ref)
        np.testing.assert_array_equal(v.encode(ids_fast), v.encode_reference(ids_ref))


@pytest.mark.parametrize("seed", [0, 3, 5, 6, 9, 10, 12, 15, 18, 25])
def test_fast_reader_in_many_small_batches_equals_reference(
    tmp_path: Path, seed: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The streaming reader with a 256-byte block (one dictionary per batch, unified after): the
    same table, report and codes as the reference parser, on the fast path."""
    import lrs_rec.training.fast_text as ft

    monkeypatch.setattr(ft, "BLOCK_BYTES", 256)
    text, kw = _shape(seed)
    head, *rows = text.lstrip("\ufeff").splitlines()
    text = "\n".join([head, *(rows * 4)]) + "\n"  # several batches
    p = tmp_path / ("r.dat" if seed % len(DELIMS) == 4 else "r.txt")
    p.write_text(text, encoding="utf-8")
    ref = load_ratings(p, LoadOptions(fast=False, **kw))  # type: ignore[arg-type]
    fast = load_ratings(p, LoadOptions(**kw))  # type: ignore[arg-type]
    _same(fast, ref)
    if fast.report.parser == "fast":
        for ids_fast, ids_ref in ((fast.user_ids(), ref.users), (fast.item_ids(), ref.items)):
            v = Vocabulary.from_ids(ids_fast)
            assert v == Vocabulary.from_ids_reference(ids_ref)
            np.testing.assert_array_equal(v.encode(ids_fast), v.encode_reference(ids_ref))


def test_a_clean_file_in_small_batches_takes_the_fast_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import lrs_rec.training.fast_text as ft

    monkeypatch.setattr(ft, "BLOCK_BYTES", 512)
    log = make_biased_mf(300, 200, random_state=2)
    p = write_csv(log, tmp_path / "s.csv")
    fast, ref = load_ratings(p), load_ratings(p, LoadOptions(fast=False))
    assert fast.report.parser == "fast" and len(fast) > 3000  # about 200 batches
    _same(fast, ref)
    v = Vocabulary.from_ids(fast.user_ids())
    np.testing.assert_array_equal(v.encode(fast.user_ids()), v.encode_reference(ref.users))


def test_clean_generated_files_take_the_fast_path(tmp_path: Path) -> None:
    log = make_biased_mf(300, 200, random_state=1)
    p = write_csv(log, tmp_path / "s.csv")
    fast, ref = load_ratings(p), load_ratings(p, LoadOptions(fast=False))
    assert fast.report.parser == "fast" and fast.user_codes is not None
    _same(fast, ref)
    sub = np.arange(0, len(fast), 3)
    np.testing.assert_array_equal(fast.subset(sub).users, ref.subset(sub).users)


def test_duplicates_on_the_fast_path_match_the_reference(tmp_path: Path) -> None:
    rows = ["user,item,rating,timestamp"] + [
        f"u{k % 5},i{k % 7},{1 + k % 5},{1000 - k if k % 2 else 1000}" for k in range(200)
    ]
    p = tmp_path / "d.csv"
    p.write_text("\n".join(rows) + "\n")
    fast, ref = load_ratings(p), load_ratings(p, LoadOptions(fast=False))
    assert fast.report.parser == "fast" and fast.report.counts["duplicates_removed"] > 0
    _same(fast, ref)


def test_vocabulary_natural_order_matches_reference() -> None:
    rng = np.random.default_rng(0)
    ids = ["10", "2", "007", "7", "a", "B", "é", "x1", "1" * 18, "0", "u10", "u9", "²", " 3"]
    ids += [str(int(x)) for x in rng.integers(0, 10**6, 50)] + [f"z{x}" for x in range(20)]
    arr = np.array(sorted(set(ids)), dtype=str)
    np.testing.assert_array_equal(natural_order(arr), natural_order_reference(arr))
    long = np.array(["1" * 25, "2", "10"], dtype=str)  # beyond int64: the reference sort
    assert long[natural_order(long)].tolist() == ["2", "10", "1" * 25]
    codes = IdCodes(rng.integers(0, arr.size, 300).astype(np.int32), arr)
    v = Vocabulary.from_ids(codes)
    assert v == Vocabulary.from_ids_reference(codes.values())
    other = Vocabulary(tuple(arr[:10].tolist()))  # ids outside it encode to -1
    np.testing.assert_array_equal(other.encode(codes), other.encode_reference(codes.values()))


# -- D9: one huge line -------------------------------------------------------------------------
def test_a_huge_line_is_a_one_line_error_in_bounded_memory(tmp_path: Path) -> None:
    p = tmp_path / "long.csv"
    with open(p, "w") as f:
        f.write("user,item,rating\n1,2,3\n")
        f.write("x" * (20 << 20) + ",1,2\n3,4,5\n")  # one 20 MB line (7.5 GB + bad_alloc before)
    code = (
        "import resource, sys\n"
        "from lrs_rec.training.loaders import load_ratings, RatingFileError\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "try:\n"
        f"    load_ratings({str(p)!r})\n"
        "except RatingFileError as e:\n"
        "    print(e)\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    ).stdout.splitlines()
    assert out[0].startswith(f"{p}:3: line longer than the 1 MiB limit")
    assert int(out[1]) < 100 * 1024  # KB: the line is never held whole (20 MB on its own)


def test_a_huge_first_line_fails_in_format_detection_too(tmp_path: Path) -> None:
    p = tmp_path / "first.tsv"
    p.write_text("a" * (MAX_LINE_BYTES + 10))  # no line end at all
    for opts in (LoadOptions(), LoadOptions(fast=False), LoadOptions(format="tsv")):
        with pytest.raises(RatingFileError, match=r"first\.tsv:1: line longer than the 1 MiB"):
            load_ratings(p, opts)
    q = tmp_path / "ok.csv"  # a line just under the limit is not refused for its length
    q.write_text("user,item,rating\n" + "u" * 200 + ",i,3\n" + "v,i," + "4" * 300 + "\n")
    with pytest.raises(RatingFileError, match=r"ok\.csv:3: rating .* is beyond"):
        load_ratings(q)


# -- D10: an implausible observed rating scale -------------------------------------------------
def _tsv(tmp_path: Path, outlier: str, n: int = 500) -> Path:
    rng = np.random.default_rng(3)
    rows = [f"u{rng.integers(30)}\ti{rng.integers(40)}\t{rng.integers(1, 6)}" for _ in range(n)]
    rows[123] = f"u1\ti1\t{outlier}"
    p = tmp_path / "g.tsv"
    p.write_text("user\titem\trating\n" + "\n".join(rows) + "\n")
    return p


@pytest.mark.parametrize("fast", [True, False])
def test_one_outlier_rating_is_not_silently_the_scale(tmp_path: Path, fast: bool) -> None:
    p = _tsv(tmp_path, "1000000")
    with pytest.raises(RatingFileError, match=r"g\.tsv:125: rating 1e\+06 is far outside") as e:
        load_ratings(p, LoadOptions(fast=fast))
    assert "--rating-scale" in str(e.value) and "[1, 5]" in str(e.value)
    t = load_ratings(p, LoadOptions(fast=fast, rating_scale=(1.0, 5.0)))  # declared: clipped
    assert (t.rating_min, t.rating_max) == (1.0, 5.0) and t.report.counts["ratings_clipped"] == 1


@pytest.mark.parametrize("value", ["1e308", "-1e300", "1e13"])
def test_absurd_ratings_name_the_line(tmp_path: Path, value: str) -> None:
    with pytest.raises(RatingFileError, match=r"g\.tsv:125: rating .* is beyond the ±1e\+12"):
        load_ratings(_tsv(tmp_path, value))
    with pytest.raises(ValueError, match="--rating-scale"):
        LoadOptions(rating_scale=(0.0, 1e308))


def test_wide_but_plausible_scales_are_kept(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    for name, values in (
        ("cont.tsv", rng.uniform(-10, 10, 400)),
        ("tail.tsv", np.concatenate([np.full(390, 4.0), np.full(10, 1.0)])),
        ("big.tsv", rng.uniform(1e5, 1e6, 400)),
    ):
        p = tmp_path / name
        p.write_text("".join(f"u{k % 20}\ti{k}\t{v!r}\n" for k, v in enumerate(values.tolist())))
        t = load_ratings(p, LoadOptions(format="tsv"))
        assert (t.rating_min, t.rating_max) == (values.min(), values.max())


# -- D11: mixed delimiters ---------------------------------------------------------------------
@pytest.mark.parametrize("fast", [True, False])
def test_mixed_delimiters_name_the_lines(tmp_path: Path, fast: bool) -> None:
    p = tmp_path / "mixed.txt"
    p.write_text("1,2,3\n4\t5\t6\n7,8,9\n# c\n1;2;3\n")
    with pytest.raises(RatingFileError) as e:
        load_ratings(p, LoadOptions(fast=fast))
    msg = str(e.value)
    assert msg.startswith(f"{p}: cannot tell the delimiter: the lines use different delimiters")
    assert "line 1 has comma" in msg and "line 2 has tab" in msg and "line 5 has semicolon" in msg
    assert "no line has" not in msg and "\n" not in msg
    q = tmp_path / "bare.txt"
    q.write_text("1,2,3\n456\n")
    with pytest.raises(RatingFileError, match=r"bare\.txt:2: .*this line has no tab.*line 1 has"):
        load_ratings(q, LoadOptions(fast=fast))


def test_generator_is_seeded_and_shaped() -> None:
    a, b = make_biased_mf(3000, 2000, random_state=5), make_biased_mf(3000, 2000, random_state=5)
    np.testing.assert_array_equal(a.ratings, b.ratings)
    np.testing.assert_array_equal(a.items, b.items)
    per_user = np.bincount(a.users, minlength=a.n_users)
    assert per_user.min() >= 1 and 9 <= np.median(per_user) <= 14 and 15 <= per_user.mean() <= 24
    key = a.users.astype(np.int64) * a.n_items + a.items
    assert np.unique(key).size == len(a)  # distinct (user, item) pairs
    tr, te = a.split(0.1, random_state=0)
    assert len(tr) + len(te) == len(a) and 0.08 < len(te) / len(a) < 0.12


# -- blockwise memory: blocks by ratings give the same model -----------------------------------
def test_key_blocks_cover_every_sample_once_within_the_budgets() -> None:
    from lrs_rec.engine.steps import key_blocks

    rng = np.random.default_rng(2)
    keys = np.concatenate([rng.integers(0, 50, 400), np.full(120, 7)])  # key 7: a heavy one
    seen: list[int] = []
    prev_hi = 0
    for lo, hi, sl in key_blocks(keys, 60, block=9, max_samples=40):
        assert lo == prev_hi and hi - lo <= 9
        assert np.all((keys[sl] >= lo) & (keys[sl] < hi))
        assert sl.size <= 40 or hi - lo == 1  # only a single heavy key exceeds the budget
        seen.extend(sl.tolist())
        prev_hi = hi
    assert prev_hi == 60 and sorted(seen) == list(range(keys.size))


def test_training_is_the_same_whatever_the_block_sizes(monkeypatch: pytest.MonkeyPatch) -> None:
    from lrs_rec.training.config import TrainConfig
    from lrs_rec.training.loaders import CleaningReport, RatingTable
    from lrs_rec.training.pipeline import train

    from lrs_rec.engine import steps as lrs_als

    log = make_biased_mf(400, 150, random_state=3)
    table = RatingTable(
        users=np.char.add("u", log.users.astype(str)),
        items=np.char.add("i", log.items.astype(str)),
        ratings=log.ratings.astype(np.float64),
        timestamps=log.timestamps.astype(np.float64),
        rating_min=1.0,
        rating_max=5.0,
        report=CleaningReport(source="synthetic", format="csv"),
        fingerprint="synthetic",
    )
    models = []
    for block_floats, row_chunk in ((1 << 23, 1 << 20), (3000, 97)):
        monkeypatch.setattr(lrs_als, "BLOCK_FLOATS", block_floats)
        monkeypatch.setattr(lrs_als, "ROW_CHUNK", row_chunk)
        for refine in (True, False):
            cfg = TrainConfig(seed=0, n_iter=2, dim=8, rank=4, sparsity=2, refine_features=refine)
            models.append(train(table, cfg, progress=False).model)
    for a, b in ((models[0], models[2]), (models[1], models[3])):
        for x, y in (
            (a.item_features, b.item_features),
            (a.lrs.W, b.lrs.W),
            (a.lrs.U, b.lrs.U),
            (a.user_bias, b.user_bias),
            (a.item_bias, b.item_bias),
        ):
            np.testing.assert_allclose(x, y, rtol=0, atol=1e-10)


def test_threads_and_memory_budget_take_effect_and_keep_the_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lrs_rec.serving.cli import main

    from lrs_rec.engine import parallel
    from lrs_rec.engine import steps as lrs_als

    for mod, name in ((lrs_als, "BLOCK_FLOATS"), (lrs_als, "ROW_CHUNK"), (parallel, "_threads")):
        monkeypatch.setattr(mod, name, getattr(mod, name))  # restored after the test
    calls: list[int] = []
    real = parallel._ordered_pool_map

    def counting(fn, blocks, n):  # type: ignore[no-untyped-def]
        calls.append(n)
        return real(fn, blocks, n)

    monkeypatch.setattr(parallel, "_ordered_pool_map", counting)
    data = write_csv(make_biased_mf(1500, 300, random_state=4), tmp_path / "r.csv")
    arrays = []
    for n in (1, 2):
        out = tmp_path / f"m{n}"
        argv = ["train", "--ratings", str(data), "--out", str(out), "--quiet", "--no-export"]
        flags = [
            "--n-iter",
            "2",
            "--threads",
            str(n),
            "--memory-budget",
            "16",
            "--kernels",
            "numpy",
        ]
        assert main([*argv, *flags]) == 0
        assert parallel.threads() == n and lrs_als.BLOCK_FLOATS == (16 << 20) // 32
        arrays.append(np.load(out / "arrays.npz"))
    assert calls and set(calls) == {2}  # the pool ran only with --threads 2
    assert lrs_als.user_block_size(32) < 1500  # several user blocks
    a, b = arrays
    assert sorted(a.files) == sorted(b.files)
    for k in a.files:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)  # bit for bit
    with pytest.raises(SystemExit):
        main(["train", "--ratings", str(data), "--out", str(tmp_path / "x"), "--threads", "x"])
    assert main(["train", "--ratings", str(data), "--out", str(tmp_path / "y"), "--threads", "0"])


def test_vocabulary_encodes_its_own_column_and_others_like_the_reference(tmp_path: Path) -> None:
    """A vocabulary built from a dictionary-encoded column encodes that column by one gather; a
    subset's vocabulary encodes the whole column (unknown ids -> -1) as the reference does."""
    log = make_biased_mf(200, 150, random_state=4)
    table = load_ratings(write_csv(log, tmp_path / "v.csv"))
    assert table.user_codes is not None
    part = table.subset(np.arange(0, len(table), 2))
    for src in (table, part):
        v = Vocabulary.from_ids(src.user_ids())
        assert v == Vocabulary.from_ids_reference(src.users)
        for col, strings in ((table.user_ids(), table.users), (part.user_ids(), part.users)):
            np.testing.assert_array_equal(v.encode(col), v.encode_reference(strings))
