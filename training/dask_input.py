"""Input of `lrs-rec train --engine dask`: rating files read on the workers, users split by id.

* :func:`expand_inputs` — a file, a directory (its files, recursively, sorted; names starting with
  ``.`` or ``_`` skipped, as Spark/Hive write them) or a glob → the list of files, in that order.
* :func:`load_file` (worker) — one file through :func:`training.loaders.load_ratings`: the same
  cleaning rules and ``file:line`` errors as the local engine, per file.
* :func:`file_summary` (worker) — what the driver needs: row count, rating range, cleaning
  report, fingerprint, the file's distinct item ids (natural order; the item vocabulary is merged
  on the driver — items are few). User ids never reach the driver: :mod:`training.dask_ids`
  numbers them on the cluster.
* :func:`split_by_user` (worker) — a file's rows cut into user partitions by splitter ids (the
  first id of each partition in the global natural order, from :mod:`training.dask_ids`), items
  encoded, with each row's global row number and its validation draw (the local engine's
  ``rng.random(n)`` at that row).
* :func:`build_partition` (worker) — a partition's pieces from every file: local user indices,
  duplicates across files removed (latest by time, then the later row), the validation split.

Rows are numbered in the order of the concatenated cleaned files, so one file gives the same rows,
the same validation draws and (with :mod:`training.dask_engine`) the same model as the local engine.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from lrs_rec.training.loaders import LoadOptions, RatingFileError, RatingTable, load_ratings
from lrs_rec.training.vocab import Vocabulary, natural_order

from lrs_rec.engine.steps import Samples


def expand_inputs(spec: str) -> list[str]:
    """The rating files named by ``spec`` (file, directory or glob), sorted."""
    p = Path(spec)
    if p.is_file():
        return [str(p)]
    if p.is_dir():
        files = sorted(
            str(f)
            for f in p.rglob("*")
            if f.is_file() and not any(part[:1] in "._" for part in f.relative_to(p).parts)
        )
        if not files:
            raise RatingFileError(f"{p}: directory holds no rating files")
        return files
    if glob.has_magic(spec):
        files = sorted(f for f in glob.glob(spec, recursive=True) if os.path.isfile(f))
        if not files:
            raise FileNotFoundError(f"{spec}: no file matches this pattern")
        return files
    raise FileNotFoundError(f"{p}: no such rating file, directory or pattern")


def load_file(path: str, opts: LoadOptions) -> RatingTable:
    return load_ratings(path, opts)


@dataclass(frozen=True)
class FileSummary:
    path: str
    n_rows: int
    rating_min: float
    rating_max: float
    report: dict[str, Any]
    fingerprint: str
    item_ids: np.ndarray  # distinct, natural order (str array)


def _distinct_sorted(ids: Any) -> np.ndarray:
    return np.asarray(Vocabulary.from_ids(ids).ids, dtype=str)


def file_summary(path: str, table: RatingTable) -> FileSummary:
    return FileSummary(
        path,
        len(table),
        table.rating_min,
        table.rating_max,
        table.report.to_dict(),
        table.fingerprint,
        _distinct_sorted(table.item_ids()),
    )


def merge_sorted_ids(parts: list[np.ndarray]) -> np.ndarray:
    """The distinct ids of several natural-ordered arrays, in natural order (the local
    :class:`Vocabulary` order of their union)."""
    ids = np.unique(np.concatenate(parts)) if parts else np.zeros(0, str)
    out: np.ndarray = ids[natural_order(ids)]
    return out


def bucket_of(ids: np.ndarray, splitters: np.ndarray) -> np.ndarray:
    """For each id, the number of splitters at or before it in natural order: its partition."""
    if splitters.size == 0:
        return np.zeros(ids.size, np.int64)
    both = np.concatenate([splitters.astype(str), ids.astype(str)])
    order = natural_order(both)  # stable: a splitter sorts before an equal id
    is_split = np.zeros(both.size, np.int64)
    is_split[: splitters.size] = 1
    before = np.cumsum(is_split[order])
    pos = np.empty(both.size, np.int64)
    pos[order] = np.arange(both.size)
    out: np.ndarray = before[pos[splitters.size :]]
    return out


@dataclass(frozen=True)
class Piece:
    """One file's rows of one user partition."""

    user_codes: np.ndarray  # int32: row -> index into user_ids
    user_ids: np.ndarray  # str: the piece's distinct user ids
    items: np.ndarray  # int32 dense item indices
    ratings: np.ndarray  # float64, the file's own units
    times: np.ndarray  # float64 (NaN: none)
    rows: np.ndarray  # int64 global row numbers
    draws: np.ndarray | None  # the validation draw of each row (None: no validation split)


def validation_draws(seed: int, offset: int, n: int) -> np.ndarray:
    """``np.random.default_rng(seed).random(offset + n)[offset:]`` without drawing the first
    ``offset`` (PCG64 jumps ahead; one 64-bit output per double)."""
    bg = np.random.PCG64(seed)
    bg.advance(offset)
    return np.random.Generator(bg).random(n)


def split_by_user(
    table: RatingTable,
    splitters: np.ndarray,
    item_ids: tuple[str, ...],
    offset: int,
    seed: int,
    fraction: float,
) -> tuple[Piece, ...]:
    from lrs_rec.training.fast_text import IdCodes

    uid = table.user_ids()
    if isinstance(uid, IdCodes):
        uniq, inv = uid.uniques.astype(str), uid.codes
    else:
        uniq, inv = np.unique(np.asarray(uid, dtype=str), return_inverse=True)
    bucket = bucket_of(uniq, splitters)[inv]
    items = np.asarray(Vocabulary(item_ids).encode(table.item_ids()), dtype=np.int32)
    n = len(table)
    draws = validation_draws(seed, offset, n) if fraction > 0 else None
    rows = np.arange(offset, offset + n, dtype=np.int64)
    out = []
    for p in range(splitters.size + 1):
        sel = np.flatnonzero(bucket == p)
        present, codes = np.unique(inv[sel], return_inverse=True)
        out.append(
            Piece(
                codes.reshape(-1).astype(np.int32),
                uniq[present],
                items[sel],
                np.asarray(table.ratings[sel], np.float64),
                np.asarray(table.timestamps[sel], np.float64),
                rows[sel],
                None if draws is None else draws[sel],
            )
        )
    return tuple(out)


@dataclass(frozen=True)
class PartitionData:
    """A user partition's ratings (users lo..hi-1 of the global natural order, local indices)."""

    lo: int
    hi: int
    user_ids: np.ndarray  # (hi - lo,) str: the partition's users, natural order
    users: np.ndarray  # int32 local user index, rows in global row order
    items: np.ndarray  # int32
    ratings: np.ndarray  # float64, raw units
    times: np.ndarray  # float64
    val: np.ndarray  # bool: validation rows
    duplicates_removed: int

    def samples(self, mask: np.ndarray | None = None, unit: float = 1.0) -> Samples:
        if mask is None:
            return Samples(self.users, self.items, self.ratings / unit)
        return Samples(self.users[mask], self.items[mask], self.ratings[mask] / unit)


def build_partition(lo: int, hi: int, fraction: float, *pieces: Piece) -> PartitionData:
    from lrs_rec.training.loaders import _dedup_latest_codes

    ids = np.concatenate([p.user_ids for p in pieces]).astype(str)
    uniq, inv_ids = np.unique(ids, return_inverse=True)
    starts = np.cumsum([0] + [p.user_ids.size for p in pieces])
    inv = np.concatenate(
        [inv_ids.reshape(-1)[a + p.user_codes] for a, p in zip(starts, pieces, strict=False)]
    )
    if uniq.size != hi - lo:
        raise RuntimeError(
            f"user partition {lo}..{hi}: {uniq.size} distinct users, expected {hi - lo}"
        )
    rank = np.empty(uniq.size, np.int64)
    rank[natural_order(uniq)] = np.arange(uniq.size)
    users = rank[inv.reshape(-1)].astype(np.int32)
    items = np.concatenate([p.items for p in pieces]).astype(np.int32)
    ratings = np.concatenate([p.ratings for p in pieces])
    times = np.concatenate([p.times for p in pieces])
    rows = np.concatenate([p.rows for p in pieces])
    draws = (
        None
        if pieces[0].draws is None
        else np.concatenate([p.draws for p in pieces if p.draws is not None])
    )
    # global row order: the pieces come in file order and each keeps its file's row order, so
    # the concatenation is already sorted (checked; sorted only if not — no copies otherwise)
    if rows.size > 1 and not bool(np.all(rows[1:] > rows[:-1])):
        order = np.argsort(rows, kind="stable")
        users, items, ratings, times = users[order], items[order], ratings[order], times[order]
        if draws is not None:
            draws = draws[order]
        del order
    del rows
    # duplicates across files (a file's own were removed by its loader); the linear-time check
    # first (no duplicate: nothing sorted)
    several = sum(1 for p in pieces if p.rows.size) > 1
    n_items = int(items.max()) + 1 if items.size else 0
    keep = _dedup_latest_codes(users, items, n_items, times) if several else None
    dups = 0 if keep is None else users.size - keep.size
    if keep is not None and dups:
        users, items, ratings, times = users[keep], items[keep], ratings[keep], times[keep]
        if draws is not None:
            draws = draws[keep]
    if draws is None:
        val = np.zeros(users.size, bool)
    else:
        counts = np.bincount(users, minlength=hi - lo)
        val = (draws < fraction) & (counts[users] > 1)
    return PartitionData(
        lo, hi, uniq[natural_order(uniq)], users, items, ratings, times, val, int(dups)
    )
