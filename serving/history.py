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
