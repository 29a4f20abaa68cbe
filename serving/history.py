"""A user's stored rating history: merging new ratings into it, oldest first, newest ``cap`` kept."""

from __future__ import annotations

import numpy as np


def merge_history(
    old_items: np.ndarray,
    old_ratings: np.ndarray,
    new_items: np.ndarray,
    new_ratings: np.ndarray,
    cap: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Old history without the re-rated items, then the new ratings; the newest ``cap`` kept
    (``cap`` 0: no history is kept, only this request's ratings are used)."""
    keep = ~np.isin(old_items, new_items)
    items = np.concatenate([old_items[keep], new_items])
    ratings = np.concatenate([old_ratings[keep], new_ratings])
    if cap > 0:
        items, ratings = items[-cap:], ratings[-cap:]
    return items.astype(np.int64), ratings.astype(np.float64)


def merge_unknown(
    old: list[tuple[str, float]], new: list[tuple[str, float]], cap: int
) -> list[tuple[str, float]]:
    """:func:`merge_history` for the ratings of items outside the served vocabulary, by external
    id (kept in the history record, never used by a fit): old without the re-rated ids, then the
    new ones; the newest ``cap`` kept (``cap`` 0: none)."""
    if cap <= 0:
        return []
    rerated = {i for i, _ in new}
    merged = [(i, r) for i, r in old if i not in rerated] + list(new)
    return merged[-cap:]


def history_ratings(
    items: np.ndarray,
    ratings: np.ndarray,
    unknown: list[tuple[str, float]],
    item_ids: list[str] | np.ndarray,
) -> list[tuple[str, float]]:
    """A stored history as ``(external item id, rating)``: the version's items (``item_ids`` maps
    its indices), then the ratings of items outside its vocabulary — what a rating-history export
    hands to the next training run."""
    known = [(str(item_ids[int(i)]), float(r)) for i, r in zip(items, ratings, strict=True)]
    return known + [(i, float(r)) for i, r in unknown]
