"""External id <-> dense index vocabularies (saved with the model as users.json / items.json)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from lrs_rec.training.fast_text import IdCodes


def _natural_key(s: str) -> tuple[int, int, str]:
    """Numeric ids sort numerically ("2" < "10"), other ids lexicographically after them.

    A total order: "7", "07" and "007" tie on the number, so the string breaks the tie (else
    their order would follow the set's per-process hash order and the same seed would give a
    different model). Only ASCII digits count: "²".isdigit() is True but int("²") fails."""
    return (0, int(s), s) if s.isascii() and s.isdigit() else (1, 0, s)


@dataclass(frozen=True)
class Vocabulary:
    """An immutable id list: position = dense index. Unknown ids map to -1."""

    ids: tuple[str, ...]
    # built from a dictionary-encoded column: (its distinct ids, their dense index) — encoding that
    # same column is then one gather, no string lookup (not part of the value)
    _source: tuple[np.ndarray, np.ndarray] | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if len(set(self.ids)) != len(self.ids):
            raise ValueError("vocabulary ids must be distinct")

    @classmethod
    def from_ids(cls, ids: Iterable[str] | IdCodes) -> Vocabulary:
        """Build from observed ids (deduplicated, natural order: deterministic for a given set).

        ``ids`` may be a loader's dictionary-encoded column (:class:`IdCodes`): then only its
        distinct ids are sorted (vectorised), never the millions of rows."""
        from lrs_rec.training.fast_text import IdCodes

        if isinstance(ids, IdCodes):
            where = np.flatnonzero(np.bincount(ids.codes, minlength=ids.uniques.size) > 0)
            order = where[natural_order(ids.uniques[where])]
            index = np.full(ids.uniques.size, -1, dtype=np.int32)
            index[order] = np.arange(order.size, dtype=np.int32)
            return cls(tuple(ids.uniques[order].tolist()), (ids.uniques, index))
        return cls.from_ids_reference(ids)

    @classmethod
    def from_ids_reference(cls, ids: Iterable[str] | IdCodes) -> Vocabulary:
        """Slow, obvious twin of :meth:`from_ids` (a Python set and sort)."""
        from lrs_rec.training.fast_text import IdCodes

        values = ids.values() if isinstance(ids, IdCodes) else ids
        return cls(tuple(sorted({str(i) for i in values}, key=_natural_key)))

    def __len__(self) -> int:
        return len(self.ids)

    def index(self) -> dict[str, int]:
        return {s: j for j, s in enumerate(self.ids)}

    def encode(self, ids: np.ndarray | Iterable[str] | IdCodes) -> np.ndarray:
        """Dense indices for ``ids``; -1 for ids not in the vocabulary. A dictionary-encoded
        column (:class:`IdCodes`) is mapped through its distinct ids only."""
        from lrs_rec.training.fast_text import IdCodes

        if isinstance(ids, IdCodes) and self._source is not None and self._source[0] is ids.uniques:
            encoded: np.ndarray = self._source[1][ids.codes]  # the column it was built from
            return encoded
        if isinstance(ids, IdCodes):
            import pyarrow as pa
            import pyarrow.compute as pc

            found = pc.index_in(pa.array(ids.uniques), value_set=pa.array(self.ids, pa.string()))
            codes = np.asarray(found.fill_null(-1).to_numpy(), dtype=np.int32)
            out: np.ndarray = codes[ids.codes]
            return out
        return self.encode_reference(ids)

    def encode_reference(self, ids: np.ndarray | Iterable[str] | IdCodes) -> np.ndarray:
        """Slow, obvious twin of :meth:`encode` (a dict lookup per distinct id)."""
        from lrs_rec.training.fast_text import IdCodes

        if isinstance(ids, IdCodes):
            ids = ids.values()
        lookup = self.index()
        arr = np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids, dtype=str)
        uniq, inv = np.unique(arr, return_inverse=True)
        codes = np.array([lookup.get(str(s), -1) for s in uniq], dtype=np.int64)
        return codes[inv.reshape(-1)] if uniq.size else np.zeros(0, dtype=np.int64)


def natural_order(ids: np.ndarray) -> np.ndarray:
    """The permutation sorting distinct ids (a str array) by :func:`_natural_key`, vectorised:
    ASCII-digit ids by (number, text), then the others by code point (Python's str order).
    Falls back to Python's sort for numbers beyond 18 digits or ids with NUL characters."""
    n = ids.size
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    width = ids.dtype.itemsize // 4
    if width == 0:
        return np.arange(n)
    chars = np.ascontiguousarray(ids, dtype=f"<U{width}").view(np.uint32).reshape(n, width)
    lengths = np.char.str_len(ids)
    valid = np.arange(width)[None, :] < lengths[:, None]
    if np.any((chars == 0) & valid):
        return natural_order_reference(ids)
    digit = (chars >= 48) & (chars <= 57)
    numeric = np.all(digit | ~valid, axis=1) & (lengths > 0)
    if np.any(lengths[numeric] > 18):
        return natural_order_reference(ids)
    num_idx = np.flatnonzero(numeric)
    value = np.zeros(num_idx.size, dtype=np.int64)
    sub, sub_valid = chars[num_idx], valid[num_idx]
    for j in range(width):  # Horner over the digits actually present
        value = np.where(sub_valid[:, j], value * 10 + (sub[:, j].astype(np.int64) - 48), value)
    num_sorted = num_idx[np.lexsort((ids[num_idx], value))]
    other_idx = np.flatnonzero(~numeric)
    other_sorted = other_idx[np.argsort(ids[other_idx], kind="stable")]
    return np.concatenate([num_sorted, other_sorted])


def natural_order_reference(ids: np.ndarray) -> np.ndarray:
    """Slow, obvious twin of :func:`natural_order`."""
    values = ids.tolist()
    return np.array(sorted(range(len(values)), key=lambda j: _natural_key(values[j])), np.int64)
