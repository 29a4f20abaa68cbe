"""Dense user indices on the cluster, the way Dask / Spark sort by key: the driver never holds the
user ids.

The local engine numbers users by their rank in the natural order of all distinct ids
(:class:`training.vocab.Vocabulary`: numeric ids by number then text, the others by code point
after them). Here:

1. each file's distinct user ids, in natural order, stay on the worker that read it
   (:func:`file_user_ids`); the driver gets their counts;
2. each file sends a seeded sample of them (:func:`sample_ids`, at most
   :data:`SAMPLE_PER_RANGE` ids per range in all); the driver picks range split points at the
   merged sample's quantiles in natural order (:func:`range_splitters`, small);
3. each file's ids are routed to the ranges on its worker (:func:`route`: an id goes to range
   ``r`` = the number of split points at or before it), each range's distinct ids are merged
   on a worker (:func:`range_ids`), and the driver receives one count per range;
4. the prefix sums of the counts are the ranges' offsets: an id's dense index is its range's
   offset plus its rank in the range — its rank in the global natural order, the local engine's
   index. The driver fetches only the ids at the partitions' first indices (:meth:`UserIndex.ids_at`).

The split points only balance the ranges: any split points give the same indices (tested with
every range but one empty). What the driver holds: the per-file and per-range counts, the sample
(≤ :data:`SAMPLE_PER_RANGE` × ranges ids, ranges = the distinct ids per file summed /
:data:`IDS_PER_RANGE`, at least one and at most :data:`RANGES_PER_WORKER` per worker) and the
partitions' first ids — not the users.
"""

from __future__ import annotations

import bisect
import math
import operator
from dataclasses import dataclass
from typing import Any

import numpy as np
from lrs_rec.training.dask_input import bucket_of, merge_sorted_ids
from lrs_rec.training.loaders import RatingTable
from lrs_rec.training.vocab import Vocabulary, _natural_key, natural_order

SAMPLE_PER_RANGE = 100  # sampled ids per range (Spark's RangePartitioner samples ~20–60)
IDS_PER_RANGE = 1 << 20  # aimed distinct ids per range (≈ 40–80 MB of numpy strings on a worker)
RANGES_PER_WORKER = 4  # at most: the routing is files × ranges small tasks


# ---- worker side ------------------------------------------------------------------------------
def file_user_ids(table: RatingTable) -> np.ndarray:
    """A file's distinct user ids, natural order (str array)."""
    return np.asarray(Vocabulary.from_ids(table.user_ids()).ids, dtype=str)


def sample_ids(ids: np.ndarray, n: int, seed: int, file_index: int) -> np.ndarray:
    """``n`` of the distinct ``ids`` drawn without replacement (all of them if fewer), seeded by
    (seed, file index), kept in the input's order."""
    if n >= ids.size:
        return ids
    rng = np.random.default_rng([seed, file_index])
    out: np.ndarray = ids[np.sort(rng.choice(ids.size, n, replace=False))]
    return out


def route(ids: np.ndarray, splitters: np.ndarray) -> tuple[np.ndarray, ...]:
    """The ``ids`` (distinct, natural order) cut into ``splitters.size + 1`` ranges: range r holds
    the ids at or after split point r-1 and before split point r (as :func:`bucket_of`). A binary
    search per split point (the ids are sorted): no sort of the file's ids."""
    cuts = [bisect.bisect_left(ids, _natural_key(str(s)), key=_natural_key) for s in splitters]
    bounds = [0, *cuts, ids.size]
    return tuple(ids[bounds[r] : bounds[r + 1]] for r in range(splitters.size + 1))


def route_reference(ids: np.ndarray, splitters: np.ndarray) -> tuple[np.ndarray, ...]:
    """Slow, obvious twin of :func:`route`: every id's range by :func:`bucket_of`."""
    bucket = bucket_of(ids, splitters)
    return tuple(ids[bucket == r] for r in range(splitters.size + 1))


def range_ids(*pieces: np.ndarray) -> np.ndarray:
    """One range's distinct ids from every file's piece, natural order."""
    return merge_sorted_ids([p for p in pieces if p.size]) if pieces else np.zeros(0, str)


def _size(ids: np.ndarray) -> int:
    return int(ids.size)


def _id_at(ids: np.ndarray, j: int) -> str:
    return str(ids[j])


# ---- driver side ------------------------------------------------------------------------------
def range_splitters(samples: list[np.ndarray], n_ranges: int) -> np.ndarray:
    """At most ``n_ranges - 1`` distinct split points: the merged sample's quantiles in natural
    order (the first sampled id is never one: it would leave range 0 (almost) empty)."""
    ids = merge_sorted_ids([s for s in samples if s.size])
    if n_ranges <= 1 or ids.size <= 1:
        return np.zeros(0, str)
    pos = np.unique(np.round(np.arange(1, n_ranges) * ids.size / n_ranges).astype(np.int64))
    out: np.ndarray = ids[pos[(pos > 0) & (pos < ids.size)]]
    return out


@dataclass
class UserIndex:
    """The distributed user index: per-range counts on the driver, each range's sorted distinct
    ids on the cluster (futures). ``offsets[r]`` is range r's first dense index."""

    splitters: np.ndarray  # the ranges' split points (natural order)
    counts: np.ndarray  # (ranges,) distinct users per range
    ranges: list[Any]  # futures: each range's ids, natural order

    @property
    def n_users(self) -> int:
        return int(self.counts.sum())

    @property
    def offsets(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(self.counts)]).astype(np.int64)

    def ids_at(self, run: Any, indices: np.ndarray) -> np.ndarray:
        """The user ids at the dense ``indices`` (each in 0..n_users-1), fetched one id each."""
        off = self.offsets
        futs = []
        for j in np.asarray(indices, np.int64).tolist():
            if not 0 <= j < self.n_users:
                raise IndexError(f"user index {j} outside 0..{self.n_users - 1}")
            r = int(np.searchsorted(off, j, side="right")) - 1
            futs.append(run.submit(_id_at, self.ranges[r], j - int(off[r])))
        return np.array(run.gather(futs) if futs else [], dtype=str)

    def release(self) -> None:
        for f in self.ranges:
            f.release()
        self.ranges = []


def user_index(
    run: Any,
    tables: list[Any],
    *,
    seed: int,
    n_workers: int,
    splitters: np.ndarray | None = None,
) -> UserIndex:
    """The distributed user index of the rating tables (futures, file order). ``splitters``
    (tests) replaces the sampled range split points."""
    ids = [run.submit(file_user_ids, t) for t in tables]
    if splitters is None:
        counts = np.array(run.gather([run.submit(_size, f) for f in ids]), np.int64)
        total = int(counts.sum())
        n_ranges = max(
            1, n_workers, min(math.ceil(total / IDS_PER_RANGE), RANGES_PER_WORKER * n_workers)
        )
        want = SAMPLE_PER_RANGE * n_ranges
        sizes = [math.ceil(want * int(c) / max(total, 1)) for c in counts]
        samples = run.gather([run.submit(sample_ids, f, n, seed, i) for i, (f, n) in
                              enumerate(zip(ids, sizes, strict=True))])  # fmt: skip
        splitters = range_splitters(samples, n_ranges)
        del samples
    else:
        order = natural_order(np.asarray(splitters, dtype=str))
        splitters = np.asarray(splitters, dtype=str)[order]
    routed = [run.submit(route, f, splitters) for f in ids]
    ranges = [
        run.submit(range_ids, *[run.submit(operator.getitem, p, r) for p in routed])
        for r in range(splitters.size + 1)
    ]
    del ids, routed
    counts = np.array(run.gather([run.submit(_size, f) for f in ranges]), np.int64)
    return UserIndex(splitters, counts, ranges)
