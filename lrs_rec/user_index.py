"""A compact external user id -> dense index map for serving.

A ``dict`` of a million short ids costs ~100 MB of Python objects; :class:`UserIndex` keeps the ids as
one sorted fixed-width byte array (UTF-8) plus their positions: (longest id + 4) bytes per user, looked
up by binary search. It is a read-only :class:`~collections.abc.Mapping` (``get``, ``in``, ``[]``), so
it stands in for ``{id: i for i, id in enumerate(ids)}`` (its reference twin in the tests).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import numpy as np


class UserIndex(Mapping[str, int]):
    """Sorted UTF-8 ids (``numpy.bytes_``, fixed width) and the dense index of each."""

    def __init__(self, ids: Iterable[str]) -> None:
        encoded = [str(u).encode("utf-8", "surrogatepass") for u in ids]
        # numpy's bytes_ strips trailing NULs: an id ending in NUL would not round-trip (no id the
        # loaders accept contains one, see lrs_rec.ids) — such a vocabulary uses a plain dict
        self._dict: dict[str, int] | None = None
        if any(e.endswith(b"\x00") for e in encoded):
            self._dict = {e.decode("utf-8", "surrogatepass"): i for i, e in enumerate(encoded)}
        keys = np.array(encoded, dtype=np.bytes_) if encoded else np.zeros(0, dtype="S1")
        del encoded
        order = np.argsort(keys, kind="stable")
        self._keys = keys[order]
        del keys
        n = self._keys.shape[0]
        self._pos = order.astype(np.int32 if n < 2**31 else np.int64)
        self._width = int(self._keys.dtype.itemsize)
        if n and self._dict is None and np.any(self._keys[1:] == self._keys[:-1]):
            raise ValueError("user ids are not distinct")

    @classmethod
    def from_utf8(cls, data: np.ndarray, offsets: np.ndarray) -> UserIndex:
        """The index of the ids ``data[offsets[j]:offsets[j + 1]]`` (UTF-8 bytes, e.g. the buffers of
        an Arrow string column), built without a Python ``str`` per id; equal to
        ``UserIndex(ids)`` (tested)."""
        data = np.asarray(data, dtype=np.uint8)
        offsets = np.asarray(offsets, dtype=np.int64)
        n = offsets.shape[0] - 1
        lengths = np.diff(offsets)
        ends = offsets[1:][lengths > 0] - 1
        if n <= 0 or np.any(data[ends] == 0):  # none, or an id ending in NUL: the general path
            return cls(
                bytes(data[offsets[j] : offsets[j + 1]]).decode("utf-8", "surrogatepass")
                for j in range(max(n, 0))
            )
        width = max(1, int(lengths.max()))
        flat = np.zeros(n * width, dtype=np.uint8)
        step = 1 << 16  # ids per chunk: the scatter index stays O(chunk), not O(all bytes)
        for a in range(0, n, step):
            b = min(a + step, n)
            lens = lengths[a:b]
            lo, hi = int(offsets[a]), int(offsets[b])
            starts = np.arange(a, b, dtype=np.int64) * width
            dest = np.repeat(starts - (offsets[a:b] - lo), lens) + np.arange(hi - lo)
            flat[dest] = data[lo:hi]
        out = cls.__new__(cls)
        out._init_keys(flat.view(f"S{width}"))
        return out

    def _init_keys(self, keys: np.ndarray) -> None:
        self._dict = None
        order = np.argsort(keys, kind="stable")
        self._keys = keys[order]
        n = self._keys.shape[0]
        self._pos = order.astype(np.int32 if n < 2**31 else np.int64)
        self._width = int(self._keys.dtype.itemsize)
        if n and np.any(self._keys[1:] == self._keys[:-1]):
            raise ValueError("user ids are not distinct")

    @classmethod
    def read(cls, path: str | Path) -> UserIndex:
        """The index of a ``users.json`` (a JSON list of ids; position = dense index)."""
        ids = json.loads(Path(path).read_bytes())
        if not isinstance(ids, list):
            raise ValueError(f"{path}: expected a JSON list of ids")
        return cls(ids)

    def get(self, key: object, default: int | None = None) -> int | None:  # type: ignore[override]
        if not isinstance(key, str):
            return default
        if self._dict is not None:
            return self._dict.get(key, default)
        b = key.encode("utf-8", "surrogatepass")
        if len(b) > self._width or b.endswith(b"\x00") or self._keys.shape[0] == 0:
            return default
        probe = np.bytes_(b)
        i = int(np.searchsorted(self._keys, probe))
        if i < self._keys.shape[0] and self._keys[i] == probe:
            return int(self._pos[i])
        return default

    def __getitem__(self, key: str) -> int:
        got = self.get(key)
        if got is None:
            raise KeyError(key)
        return got

    def __contains__(self, key: object) -> bool:
        return self.get(key) is not None

    def __len__(self) -> int:
        return int(self._keys.shape[0])

    def __iter__(self) -> Iterator[str]:
        """Ids in dense-index order."""
        if self._dict is not None:
            yield from self._dict
            return
        inverse = np.empty_like(self._pos)
        inverse[self._pos] = np.arange(self._pos.shape[0], dtype=self._pos.dtype)
        for j in inverse:
            yield bytes(self._keys[j]).decode("utf-8", "surrogatepass")

    @property
    def nbytes(self) -> int:
        """Bytes held by the arrays (what the index costs per user: width + 4)."""
        return int(self._keys.nbytes + self._pos.nbytes)
