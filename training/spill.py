"""Arrays parked on disk while training does not need them (bounded memory, exact).

The trainer keeps a few large per-user or per-rating arrays that it reads only once more, much
later: the start of the LRS fit and its best iterate (W, n_users × r; read when a fit restarts
or is rolled back) and the model histories' ratings and times (read when the model is
assembled). Above :data:`SPILL_BYTES` they go to ``.npy`` files in a private temporary directory
(``tempfile``, i.e. ``$TMPDIR``) and are read back whole (never memory-mapped, so that a read-back
array is an ordinary one and the file's pages do not count towards the process's memory); the
directory is removed when the run ends. Small arrays (tests, MovieLens 100K) stay in memory.
"""

from __future__ import annotations

import itertools
import os
import tempfile
from dataclasses import dataclass
from typing import Any

import numpy as np

SPILL_BYTES = 32 << 20  # arrays at least this large are written to disk


@dataclass(frozen=True)
class Spilled:
    """An array written to ``path`` (``np.save``); :meth:`load` reads it back."""

    path: str
    shape: tuple[int, ...]
    dtype: Any

    def load(self) -> np.ndarray:
        return np.asarray(np.load(self.path, allow_pickle=False))


class Spill:
    """A private temporary directory for :class:`Spilled` arrays (:meth:`close` removes it)."""

    def __init__(self, threshold: int | None = None) -> None:
        self.threshold = SPILL_BYTES if threshold is None else int(threshold)
        self._dir: tempfile.TemporaryDirectory[str] | None = None
        self._names = itertools.count()

    def put(self, a: np.ndarray) -> np.ndarray | Spilled:
        """A copy of ``a``: in memory when small, else a :class:`Spilled` one on disk."""
        if a.nbytes < self.threshold:
            return np.array(a)
        if self._dir is None:
            self._dir = tempfile.TemporaryDirectory(prefix="lrs-rec-spill-")
        path = os.path.join(self._dir.name, f"{next(self._names)}.npy")
        np.save(path, np.ascontiguousarray(a), allow_pickle=False)
        return Spilled(path, tuple(a.shape), a.dtype)

    def discard(self, a: np.ndarray | Spilled | None) -> None:
        """Remove ``a``'s file now (a superseded copy), if it was spilled."""
        if isinstance(a, Spilled) and os.path.exists(a.path):
            os.remove(a.path)

    def close(self) -> None:
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None


def load(a: np.ndarray | Spilled) -> np.ndarray:
    """The array, read back from disk if it was spilled."""
    return a.load() if isinstance(a, Spilled) else a
