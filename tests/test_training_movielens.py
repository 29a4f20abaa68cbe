"""MovieLens side files (users, movies) for ML-1M and ML-100K, on small generated files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from lrs_rec.training.movielens import (
    ML1M_OCCUPATIONS,
    MovieLensFormatError,
    detect_layout,
    load_movielens,
    read_ml1m_movies,
    read_ml1m_users,
    read_ml100k_items,
    read_ml100k_users,
)


def write_ml1m(d: Path, users: str | None = None, ratings: str | None = None) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "users.dat").write_text(
        users or "1::F::1::10::48067\n2::M::56::16::70072\n3::M::25::15::55117\n",
        encoding="latin-1",
    )
    (d / "movies.dat").write_bytes(
        "1::Toy Story (1995)::Animation|Children's|Comedy\n"
        "2::Misérables, Les (1995)::Drama|War\n"
        "3::Heat (1995)::Action|Crime|Thriller\n".encode("latin-1")
    )
    (d / "ratings.dat").write_text(
        ratings
        or "1::1::5::978300760\n1::2::3::978302109\n2::1::4::978301968\n3::3::2::978300275\n"
    )
    return d


def write_ml100k(d: Path) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "u.user").write_text("1|24|M|technician|85711\n2|53|F|other|94043\n3|17|M|student|1\n")
    flags = "|".join(["0"] * 8 + ["1"] + ["0"] * 10)  # Drama
    (d / "u.item").write_bytes(
        (
            f"1|Toy Story (1995)|01-Jan-1995||http://x|{'|'.join(['0'] * 19)}\n"
            f"2|Misérables, Les (1995)|01-Jan-1995||http://y|{flags}\n"
        ).encode("latin-1")
    )
    (d / "u.data").write_text("1\t1\t5\t881250949\n2\t2\t3\t881250950\n3\t1\t1\t881250951\n")
    return d


def test_ml1m_users_movies_ratings(tmp_path: Path) -> None:
    d = write_ml1m(tmp_path / "ml-1m")
    assert detect_layout(d) == "ml-1m"
    ml = load_movielens(d)
    assert ml.name == "ml-1m"
    assert ml.users.ids.tolist() == ["1", "2", "3"]
    assert ml.users.gender.tolist() == ["F", "M", "M"]
    assert ml.users.age.tolist() == [1, 56, 25]  # ML-1M age codes as they are
    assert ml.users.occupation.tolist() == [ML1M_OCCUPATIONS[i] for i in (10, 16, 15)]
    assert ml.users.occupation[0] == "K-12 student"
    assert ml.movies.titles[1] == "Misérables, Les (1995)"  # Latin-1 decoded
    assert ml.movies.genres[0] == ("Animation", "Children's", "Comedy")
    assert sorted(zip(ml.ratings.users.tolist(), ml.ratings.items.tolist(), strict=True)) == [
        ("1", "1"),
        ("1", "2"),
        ("2", "1"),
        ("3", "3"),
    ]
    assert ml.ratings.ratings.tolist() == [5.0, 3.0, 4.0, 2.0]


def test_ml100k_users_items(tmp_path: Path) -> None:
    d = write_ml100k(tmp_path / "ml-100k")
    assert detect_layout(d) == "ml-100k"
    ml = load_movielens(d)
    assert ml.users.age.tolist() == [24, 53, 17]  # years
    assert ml.users.gender.tolist() == ["M", "F", "M"]
    assert ml.users.occupation.tolist() == ["technician", "other", "student"]
    assert ml.movies.titles == ("Toy Story (1995)", "Misérables, Les (1995)")
    assert ml.movies.genres == ((), ("Drama",))
    assert len(ml.ratings) == 3


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("1::F::1::10::1\n2::M::30::16::2\n", "users.dat:2: age must be an ML-1M age code"),
        ("1::F::1::10::1\n2::X::18::16::2\n", "users.dat:2: gender must be M or F, got 'X'"),
        ("1::F::1::10::1\n2::M::18::21::2\n", "users.dat:2: occupation must be a code 0..20"),
        ("1::F::1::10::1\n2::M::18::ten::2\n", "users.dat:2: occupation must be an integer"),
        ("1::F::1::10\n", "users.dat:1: expected 5 '::'-separated fields, got 4"),
        ("1::F::1::10::1\n1::M::18::2::2\n", "users.dat:2: duplicate user id '1'"),
        ("\n\n", "users.dat: no rows"),
    ],
)
def test_ml1m_users_errors_name_file_line(tmp_path: Path, text: str, message: str) -> None:
    p = tmp_path / "users.dat"
    p.write_text(text)
    with pytest.raises(MovieLensFormatError, match=message.replace(".", r"\.")):
        read_ml1m_users(p)


def test_side_file_errors(tmp_path: Path) -> None:
    p = tmp_path / "movies.dat"
    p.write_text("1::A (1990)::Drama\n1::B (1991)::Comedy\n")
    with pytest.raises(MovieLensFormatError, match=r"movies\.dat:2: duplicate movie id '1'"):
        read_ml1m_movies(p)
    p = tmp_path / "u.user"
    p.write_text("1|abc|M|writer|1\n")
    with pytest.raises(MovieLensFormatError, match=r"u\.user:1: age must be an integer, got 'abc'"):
        read_ml100k_users(p)
    p.write_text("1|0|M|writer|1\n")
    with pytest.raises(MovieLensFormatError, match=r"u\.user:1: age must be in 1\.\.149"):
        read_ml100k_users(p)
    p = tmp_path / "u.item"
    p.write_text(f"1|T|d||u|{'|'.join(['0'] * 18)}|2\n")
    with pytest.raises(MovieLensFormatError, match=r"u\.item:1: genre flags must be 0 or 1"):
        read_ml100k_items(p)


def test_ratings_must_reference_listed_users_and_movies(tmp_path: Path) -> None:
    d = write_ml1m(tmp_path / "a", ratings="1::1::5::1\n9::1::4::2\n")
    with pytest.raises(MovieLensFormatError, match=r"ratings\.dat: 1 user id\(s\) not in .*'9'"):
        load_movielens(d)
    d = write_ml1m(tmp_path / "b", ratings="1::1::5::1\n1::7::4::2\n")
    with pytest.raises(MovieLensFormatError, match=r"1 movie id\(s\) not in .*movies\.dat"):
        load_movielens(d)
    with pytest.raises(FileNotFoundError, match="not a MovieLens directory"):
        detect_layout(tmp_path)


def test_ml1m_ratings_use_the_project_rating_loader(tmp_path: Path) -> None:
    """ratings.dat goes through load_ratings: a bad line is its file:line error."""
    d = write_ml1m(tmp_path / "c", ratings="1::1::5::1\n1::2::five::2\n")
    with pytest.raises(ValueError, match=r"ratings\.dat:2"):
        load_movielens(d)


@pytest.mark.ml100k
def test_real_ml100k_side_files(ml100k_dir: Path) -> None:
    ml = load_movielens(ml100k_dir)
    assert (len(ml.users), len(ml.movies), len(ml.ratings)) == (943, 1682, 100_000)
    assert set(np.unique(ml.users.gender)) == {"M", "F"}
    assert len(np.unique(ml.users.occupation)) == 21
    assert any("é" in t for t in ml.movies.titles)  # Latin-1 titles decoded
