"""External id <-> dense index vocabularies (saved with the model as users.json / items.json)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np


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

    def __post_init__(self) -> None:
        if len(set(self.ids)) != len(self.ids):
            raise ValueError("vocabulary ids must be distinct")

    @classmethod
    def from_ids(cls, ids: Iterable[str]) -> Vocabulary:
        """Build from observed ids (deduplicated, natural order: deterministic for a given set)."""
        return cls(tuple(sorted({str(i) for i in ids}, key=_natural_key)))

    def __len__(self) -> int:
        return len(self.ids)

    def index(self) -> dict[str, int]:
        return {s: j for j, s in enumerate(self.ids)}

    def encode(self, ids: np.ndarray | Iterable[str]) -> np.ndarray:
        """Dense indices for ``ids``; -1 for ids not in the vocabulary."""
        lookup = self.index()
        arr = np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids, dtype=str)
        uniq, inv = np.unique(arr, return_inverse=True)
        codes = np.array([lookup.get(str(s), -1) for s in uniq], dtype=np.int64)
        return codes[inv.reshape(-1)] if uniq.size else np.zeros(0, dtype=np.int64)
