"""The sparse parts b_u of the engine's iterate, stored k-sparse: ``B_idx`` (n_users, k) coordinate
indices (distinct within a row) and ``B_val`` (n_users, k) their values — the layout of
``lrs_rec.model.LRSModel`` and the model directory — instead of a dense (n_users, d) B whose rows
have at most k non-zeros (256 MB at a million users and d = 32; the pairs at k = 4: 48 MB).

A slot holding 0.0 is no non-zero: rows with fewer than k non-zeros are padded with zero values.
Width 0 is "B = 0" (the start of a fit); the user step widens it to its k (:func:`with_width`).
The dense form (``lrs_rec.engine.user_rows.dense_b``) is the slow twin the tests compare with.
"""

from __future__ import annotations

import numpy as np

from lrs_rec.thresholding import top_k_indices

ROWS = 1 << 16  # users per chunk where a dense (rows, d) block is needed (bounded temporaries)


def zero_b(n_users: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """B = 0 as width-k pairs: indices 0..k-1 (the ones ``top_k_indices`` picks on a zero row),
    zero values."""
    return np.tile(np.arange(k, dtype=np.int32), (n_users, 1)), np.zeros((n_users, k))


def add_b(out: np.ndarray, idx: np.ndarray, val: np.ndarray) -> np.ndarray:
    """``out`` (n, d) += the dense rows of (idx, val), in place (indices distinct within a row:
    the same sums as adding the dense rows, whose other entries are zeros)."""
    if idx.shape[1]:
        out[np.arange(out.shape[0])[:, None], idx] += val
    return out


def b_dot(M: np.ndarray, idx: np.ndarray, val: np.ndarray) -> np.ndarray:
    """⟨M_u, b_u⟩ per row u of ``M`` (n, d)."""
    if idx.shape[1] == 0:
        return np.zeros(M.shape[0])
    return np.asarray(np.einsum("nk,nk->n", np.take_along_axis(M, idx, axis=1), val))


def gram_b(G: np.ndarray, idx: np.ndarray, val: np.ndarray) -> np.ndarray:
    """G_u b_u per user for Grams ``G`` (n, d, d): (n, d)."""
    if idx.shape[1] == 0:
        return np.zeros(G.shape[:2])
    cols = np.take_along_axis(G, idx[:, None, :].astype(np.intp), axis=2)  # (n, d, k)
    return np.asarray(np.einsum("nak,nk->na", cols, val))


def top_k_b(idx: np.ndarray, val: np.ndarray, k: int, d: int) -> tuple[np.ndarray, np.ndarray]:
    """The pairs of width k that ``top_k_indices(dense B, k)`` gives (sorted indices: the k
    largest magnitudes, ties and zero padding towards the lower index), chunk by chunk of
    :data:`ROWS` users. Exact when each row has at most k non-zeros."""
    n = idx.shape[0]
    out_idx = np.empty((n, k), np.int32)
    out_val = np.zeros((n, k))
    for a in range(0, n, ROWS):
        blk = np.zeros((min(n, a + ROWS) - a, d))
        if idx.shape[1]:
            np.put_along_axis(blk, idx[a : a + ROWS].astype(np.intp), val[a : a + ROWS], axis=1)
        j = top_k_indices(blk, k)
        out_idx[a : a + ROWS] = j
        out_val[a : a + ROWS] = np.take_along_axis(blk, j, axis=1)
    return out_idx, out_val


def with_width(idx: np.ndarray, val: np.ndarray, k: int, d: int) -> tuple[np.ndarray, np.ndarray]:
    """The pairs at width k (unchanged when they have it; zeros of width k from width 0 or all-zero
    values; else :func:`top_k_b`)."""
    if idx.shape[1] == k:
        return idx, val
    if not val.any():
        return zero_b(idx.shape[0], k)
    return top_k_b(idx, val, k, d)


def pairs_of_dense(B: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The width-k pairs of a dense B whose rows have at most k non-zeros (tests, small data)."""
    if np.any(np.count_nonzero(B, axis=1) > k):
        raise ValueError(f"some row of B has more than k={k} non-zeros")
    idx = top_k_indices(np.asarray(B, dtype=np.float64), k)
    return idx.astype(np.int32), np.take_along_axis(B, idx, axis=1)
