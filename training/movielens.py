"""MovieLens 100K / 1M with their demographic and movie files (for the paper's Fig. 1a tasks).

The rating logs go through :func:`lrs_rec.training.loaders.load_ratings` (its cleaning rules); this
module reads the side files the demographic tasks need:

=========  =========================================  ==========================================
dataset    users                                      movies
=========  =========================================  ==========================================
ML-100K    ``u.user``: ``id|age|gender|occupation|zip``   ``u.item``: ``id|title|date|video|url|19 genre flags``
ML-1M      ``users.dat``: ``id::gender::age::occupation::zip``  ``movies.dat``: ``id::title::genre|genre``
=========  =========================================  ==========================================

Titles are Latin-1 in both datasets (e.g. ``Misérables``); every file is decoded as Latin-1 (which
never fails: any byte is a character). ML-100K ages are years; ML-1M ages are already the group
codes 1, 18, 25, 35, 45, 50, 56 and its occupations codes 0..20 (named here as in its README).
A malformed line is a :class:`MovieLensFormatError` naming ``file:line``, the field and the value.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from lrs_rec.training.loaders import LoadOptions, RatingTable, load_ratings

ML1M_OCCUPATIONS = (
    "other",
    "academic/educator",
    "artist",
    "clerical/admin",
    "college/grad student",
    "customer service",
    "doctor/health care",
    "executive/managerial",
    "farmer",
    "homemaker",
    "K-12 student",
    "lawyer",
    "programmer",
    "retired",
    "sales/marketing",
    "scientist",
    "self-employed",
    "technician/engineer",
    "tradesman/craftsman",
    "unemployed",
    "writer",
)
ML1M_AGE_CODES = (1, 18, 25, 35, 45, 50, 56)
ML100K_GENRES = (
    "unknown",
    "Action",
    "Adventure",
    "Animation",
    "Children's",
    "Comedy",
    "Crime",
    "Documentary",
    "Drama",
    "Fantasy",
    "Film-Noir",
    "Horror",
    "Musical",
    "Mystery",
    "Romance",
    "Sci-Fi",
    "Thriller",
    "War",
    "Western",
)


class MovieLensFormatError(ValueError):
    """A MovieLens side file cannot be read; the message names ``file:line``, the field and value."""


@dataclass(frozen=True, eq=False)
class Users:
    """One row per user: external id, gender ``"M"``/``"F"``, age (years, or an ML-1M age code),
    occupation (a name)."""

    ids: np.ndarray  # (n,) str
    gender: np.ndarray  # (n,) str
    age: np.ndarray  # (n,) int64
    occupation: np.ndarray  # (n,) str

    def __len__(self) -> int:
        return int(self.ids.shape[0])


@dataclass(frozen=True, eq=False)
class Movies:
    """One row per movie: external id, title, genres."""

    ids: np.ndarray  # (n,) str
    titles: tuple[str, ...]
    genres: tuple[tuple[str, ...], ...]

    def __len__(self) -> int:
        return int(self.ids.shape[0])


@dataclass(frozen=True, eq=False)
class MovieLens:
    """A MovieLens dataset: ``name`` is ``"ml-100k"`` or ``"ml-1m"``."""

    name: str
    users: Users
    movies: Movies
    ratings: RatingTable


def _lines(path: Path, sep: str, n_fields: int | tuple[int, ...]) -> list[tuple[str, list[str]]]:
    """Non-blank lines split on ``sep`` as ``(where, fields)``; a wrong field count is an error."""
    want = (n_fields,) if isinstance(n_fields, int) else n_fields
    out = []
    with open(path, encoding="latin-1", newline=None) as fh:
        for lineno, line in enumerate(fh, 1):
            text = line.rstrip("\n")
            if not text.strip():
                continue
            fields = text.split(sep)
            where = f"{path}:{lineno}"
            if len(fields) not in want:
                raise MovieLensFormatError(
                    f"{where}: expected {' or '.join(map(str, want))} {sep!r}-separated fields, "
                    f"got {len(fields)} in {text[:80]!r}"
                )
            out.append((where, fields))
    if not out:
        raise MovieLensFormatError(f"{path}: no rows (empty file)")
    return out


def _id(where: str, field: str, value: str) -> str:
    v = value.strip()
    if not v:
        raise MovieLensFormatError(f"{where}: empty {field}")
    return v


def _int(where: str, field: str, value: str) -> int:
    try:
        return int(value.strip())
    except ValueError:
        raise MovieLensFormatError(f"{where}: {field} must be an integer, got {value!r}") from None


def _gender(where: str, value: str) -> str:
    g = value.strip().upper()
    if g not in ("M", "F"):
        raise MovieLensFormatError(f"{where}: gender must be M or F, got {value!r}")
    return g


def _users(rows: list[tuple[str, str, int, str]], wheres: list[str]) -> Users:
    seen: dict[str, str] = {}
    for (uid, *_), where in zip(rows, wheres, strict=True):
        if uid in seen:
            raise MovieLensFormatError(f"{where}: duplicate user id {uid!r} (first at {seen[uid]})")
        seen[uid] = where
    return Users(
        ids=np.array([r[0] for r in rows], dtype=str),
        gender=np.array([r[1] for r in rows], dtype=str),
        age=np.array([r[2] for r in rows], dtype=np.int64),
        occupation=np.array([r[3] for r in rows], dtype=str),
    )


def read_ml100k_users(path: str | os.PathLike[str]) -> Users:
    """``u.user``: ``user id | age | gender | occupation | zip code``."""
    rows, wheres = [], []
    for where, f in _lines(Path(path), "|", 5):
        age = _int(where, "age", f[1])
        if not 0 < age < 150:
            raise MovieLensFormatError(f"{where}: age must be in 1..149, got {f[1]!r}")
        occ = f[3].strip()
        if not occ:
            raise MovieLensFormatError(f"{where}: empty occupation")
        rows.append((_id(where, "user id", f[0]), _gender(where, f[2]), age, occ))
        wheres.append(where)
    return _users(rows, wheres)


def read_ml1m_users(path: str | os.PathLike[str]) -> Users:
    """``users.dat``: ``UserID::Gender::Age::Occupation::Zip-code`` (age and occupation are codes)."""
    rows, wheres = [], []
    for where, f in _lines(Path(path), "::", 5):
        age = _int(where, "age", f[2])
        if age not in ML1M_AGE_CODES:
            raise MovieLensFormatError(
                f"{where}: age must be an ML-1M age code {ML1M_AGE_CODES}, got {f[2]!r}"
            )
        occ = _int(where, "occupation", f[3])
        if not 0 <= occ < len(ML1M_OCCUPATIONS):
            raise MovieLensFormatError(f"{where}: occupation must be a code 0..20, got {f[3]!r}")
        rows.append((_id(where, "user id", f[0]), _gender(where, f[1]), age, ML1M_OCCUPATIONS[occ]))
        wheres.append(where)
    return _users(rows, wheres)


def _movies(rows: list[tuple[str, str, tuple[str, ...]]], wheres: list[str]) -> Movies:
    seen: dict[str, str] = {}
    for (mid, _t, _g), where in zip(rows, wheres, strict=True):
        if mid in seen:
            raise MovieLensFormatError(
                f"{where}: duplicate movie id {mid!r} (first at {seen[mid]})"
            )
        seen[mid] = where
    return Movies(
        ids=np.array([r[0] for r in rows], dtype=str),
        titles=tuple(r[1] for r in rows),
        genres=tuple(r[2] for r in rows),
    )


def read_ml100k_items(path: str | os.PathLike[str]) -> Movies:
    """``u.item``: ``id | title | release date | video date | url | 19 genre flags`` (Latin-1)."""
    p = Path(path)
    rows, wheres = [], []
    for where, f in _lines(p, "|", 5 + len(ML100K_GENRES)):
        flags = f[5:]
        if any(x.strip() not in ("0", "1") for x in flags):
            bad = next(x for x in flags if x.strip() not in ("0", "1"))
            raise MovieLensFormatError(f"{where}: genre flags must be 0 or 1, got {bad!r}")
        genres = tuple(g for g, x in zip(ML100K_GENRES, flags, strict=True) if x.strip() == "1")
        rows.append((_id(where, "movie id", f[0]), f[1], genres))
        wheres.append(where)
    return _movies(rows, wheres)


def read_ml1m_movies(path: str | os.PathLike[str]) -> Movies:
    """``movies.dat``: ``MovieID::Title::Genres`` with genres ``|``-separated (Latin-1)."""
    p = Path(path)
    rows, wheres = [], []
    for where, f in _lines(p, "::", 3):
        genres = tuple(g for g in f[2].strip().split("|") if g)
        rows.append((_id(where, "movie id", f[0]), f[1], genres))
        wheres.append(where)
    return _movies(rows, wheres)


LAYOUTS = {
    "ml-100k": ("u.user", "u.item", "u.data", read_ml100k_users, read_ml100k_items),
    "ml-1m": ("users.dat", "movies.dat", "ratings.dat", read_ml1m_users, read_ml1m_movies),
}


def detect_layout(directory: str | os.PathLike[str]) -> str:
    """``"ml-100k"`` or ``"ml-1m"`` by the files present in ``directory``."""
    d = Path(directory)
    for name, (uf, mf, rf, _u, _m) in LAYOUTS.items():
        if all((d / f).is_file() for f in (uf, mf, rf)):
            return name
    raise FileNotFoundError(
        f"{d}: not a MovieLens directory (need u.user, u.item, u.data for ML-100K, "
        "or users.dat, movies.dat, ratings.dat for ML-1M)"
    )


def load_movielens(directory: str | os.PathLike[str], layout: str | None = None) -> MovieLens:
    """Users, movies and ratings of an ML-100K or ML-1M directory (``layout`` auto-detected).

    Every rating's user and movie must be listed in the side files (else a one-line error)."""
    d = Path(directory)
    name = layout or detect_layout(d)
    if name not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}; got {name!r}")
    uf, mf, rf, read_users, read_movies = LAYOUTS[name]
    users = read_users(d / uf)
    movies = read_movies(d / mf)
    ratings = load_ratings(d / rf, LoadOptions(format=name))
    for what, ids, known, f in (
        ("user", ratings.users, users.ids, uf),
        ("movie", ratings.items, movies.ids, mf),
    ):
        missing = np.setdiff1d(np.unique(ids), known)
        if missing.size:
            raise MovieLensFormatError(
                f"{d / rf}: {missing.size} {what} id(s) not in {d / f}, e.g. {missing[0]!r}"
            )
    return MovieLens(name=name, users=users, movies=movies, ratings=ratings)
