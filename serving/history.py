"""A user's stored rating history: merging new ratings into it, oldest first, newest ``cap`` kept
(and, with :func:`merge_trained`, how many of its leading entries came from training data)."""

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
    items, ratings, _ = merge_trained(old_items, old_ratings, 0, new_items, new_ratings, 0, cap)
    return items, ratings


def merge_trained(
    old_items: np.ndarray,
    old_ratings: np.ndarray,
    old_trained: int,
    new_items: np.ndarray,
    new_ratings: np.ndarray,
    new_trained: int,
    cap: int,
) -> tuple[np.ndarray, np.ndarray, int]:
    """:func:`merge_history` keeping provenance: the first ``old_trained`` / ``new_trained``
    entries of each side came from training data (``serving.encoding``'s provenance count);
    returns the merged history and how many of its leading entries did. A trained entry after a
    service one (only when the new side starts with trained entries and the old kept a service
    entry) is counted as the service's."""
    keep = ~np.isin(old_items, new_items)
    items = np.concatenate([old_items[keep], new_items])
    ratings = np.concatenate([old_ratings[keep], new_ratings])
    trained = np.concatenate(
        [(np.arange(old_items.size) < old_trained)[keep], np.arange(new_items.size) < new_trained]
    )
    if cap > 0:
        items, ratings, trained = items[-cap:], ratings[-cap:], trained[-cap:]
    lead = int(np.argmin(trained)) if not trained.all() else int(trained.size)
    return items.astype(np.int64), ratings.astype(np.float64), lead


def merge_trained_reference(
    old: list[tuple[int, float, bool]], new: list[tuple[int, float, bool]], cap: int
) -> tuple[list[tuple[int, float]], int]:
    """Slow twin of :func:`merge_trained` on ``(item, rating, from training)`` entries."""
    rerated = {i for i, _, _ in new}
    merged = [e for e in old if e[0] not in rerated] + list(new)
    if cap > 0:
        merged = merged[-cap:]
    lead = 0
    while lead < len(merged) and merged[lead][2]:
        lead += 1
    return [(i, r) for i, r, _ in merged], lead


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
