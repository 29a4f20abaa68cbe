"""Hard thresholding operators used by AMHT-LRS (paper Sec. 2.1, Algorithm 2).

Two forms appear in the paper:

* ``HT(v, Δ)`` keeps entries with ``|v_i| > Δ`` (Algorithm 2, step 3);
* keep-top-k, the projection onto ``{b : ||b||_0 <= k}`` used by the constraint of Eq. 2 / Eq. 3.

Both have a vectorised row-wise form (one row per user) next to the plain single-vector form.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from lrs_rec._types import FloatArray, IntArray


def hard_threshold(
    v: FloatArray, *, k: int | None = None, delta: float | None = None
) -> FloatArray:
    """Hard-threshold a vector (or each row of a matrix).

    Exactly one of ``k`` (keep the k largest-magnitude entries of each row) and ``delta``
    (keep entries with ``|v_i| > delta``, the paper's ``HT(v, Δ)``) must be given.
    Ties at the k-th magnitude are broken towards the lower index, deterministically.
    """
    if (k is None) == (delta is None):
        raise ValueError("hard_threshold needs exactly one of k= or delta=")
    arr = np.asarray(v, dtype=np.float64)
    if arr.ndim not in (1, 2):
        raise ValueError(f"hard_threshold expects a vector or a matrix, got shape {arr.shape}")
    if np.isnan(arr).any():
        raise ValueError("hard_threshold: v contains NaN (its magnitude has no rank)")
    if delta is not None:
        if not np.isfinite(delta) or delta < 0:
            raise ValueError(f"delta must be a finite non-negative number, got {delta!r}")
        return np.where(np.abs(arr) > delta, arr, 0.0)
    assert k is not None
    _check_k(k, arr.shape[-1])
    rows = arr.reshape(1, -1) if arr.ndim == 1 else arr
    idx = top_k_indices(rows, k)
    out = np.zeros_like(rows)
    np.put_along_axis(out, idx, np.take_along_axis(rows, idx, axis=1), axis=1)
    return out.reshape(arr.shape)


def top_k_indices(rows: FloatArray, k: int) -> IntArray:
    """Indices of the k largest-magnitude entries of each row, shape (n_rows, k), sorted ascending.

    Deterministic: a stable sort on ``-|v|`` breaks ties towards the lower index.
    """
    rows = np.asarray(rows, dtype=np.float64)
    if rows.ndim != 2:
        raise ValueError(f"top_k_indices expects a matrix, got shape {rows.shape}")
    d = rows.shape[1]
    if not 0 <= k <= d:
        raise ValueError(f"k must be in [0, {d}], got {k}")
    if k == 0:
        return np.zeros((rows.shape[0], 0), dtype=np.int64)
    order = np.argsort(-np.abs(rows), axis=1, kind="stable")[:, :k]
    return np.sort(order, axis=1).astype(np.int64)


def ridge_top_k_refit(
    G: FloatArray, h: FloatArray, k: int, reg: float
) -> tuple[IntArray, FloatArray]:
    """Batched sparse b-step of the trainers: per row u, the ridge solution of ``(G_u + reg·I) b = h_u``
    over all d coordinates, hard-thresholded to its top-k support (Eq. 3), then the ridge refit on
    that support. ``G: (n, d, d)`` Grams XᵀX, ``h: (n, d)`` XᵀeU; returns ``(idx (n, k), val (n, k))``.
    Slow twin: :func:`ridge_top_k_refit_reference`."""
    d = G.shape[1]
    full = np.linalg.solve(G + reg * np.eye(d)[None], h[:, :, None])[:, :, 0]
    idx = top_k_indices(np.asarray(full, dtype=np.float64), k)
    Gs = np.take_along_axis(np.take_along_axis(G, idx[:, :, None], axis=1), idx[:, None, :], axis=2)
    val = np.linalg.solve(
        Gs + reg * np.eye(k)[None], np.take_along_axis(h, idx, axis=1)[:, :, None]
    )
    return idx, np.asarray(val[:, :, 0], dtype=np.float64)


def ridge_top_k_refit_reference(
    G: FloatArray, h: FloatArray, k: int, reg: float
) -> tuple[IntArray, FloatArray]:
    """:func:`ridge_top_k_refit` one row at a time with explicit inverses."""
    n, d = h.shape
    idx = np.zeros((n, k), dtype=np.int64)
    val = np.zeros((n, k))
    for u in range(n):
        full = np.linalg.inv(G[u] + reg * np.eye(d)) @ h[u]
        support = sorted(sorted(range(d), key=lambda j: (-abs(full[j]), j))[:k])
        sub = G[u][np.ix_(support, support)] + reg * np.eye(k)
        idx[u] = support
        val[u] = np.linalg.inv(sub) @ h[u][support]
    return idx, val


def _check_k(k: Any, n: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or not 0 <= k <= n:
        raise ValueError(f"k must be an integer in [0, {n}], got {k!r}")


def hard_threshold_reference(
    v: FloatArray, *, k: int | None = None, delta: float | None = None
) -> FloatArray:
    """Slow, obvious twin of :func:`hard_threshold` for a single vector (used by the tests)."""
    if (k is None) == (delta is None):
        raise ValueError("hard_threshold needs exactly one of k= or delta=")
    vec = [float(x) for x in np.asarray(v, dtype=np.float64).ravel()]
    if any(x != x for x in vec):  # NaN is the only value unequal to itself
        raise ValueError("hard_threshold: v contains NaN (its magnitude has no rank)")
    out = [0.0] * len(vec)
    if delta is not None:
        if not (delta == delta and abs(delta) != float("inf") and delta >= 0):
            raise ValueError(f"delta must be a finite non-negative number, got {delta!r}")
        for i, x in enumerate(vec):
            if abs(x) > delta:
                out[i] = x
        return np.array(out)
    assert k is not None
    _check_k(k, len(vec))
    ranked = sorted(range(len(vec)), key=lambda i: (-abs(vec[i]), i))
    for i in ranked[:k]:
        out[i] = vec[i]
    return np.array(out)


def enforce_row_sparsity(B_idx: IntArray, B_val: FloatArray, *, zeta: int, d: int) -> FloatArray:
    """Enforce Assumption A1's row sparsity: each coordinate j in [d] is used by at most ``zeta`` users.

    For every coordinate, the ``zeta`` users with the largest ``|b_u[j]|`` keep their value; the others'
    values are set to zero (their index slot stays, holding 0). Returns the new values array.
    """
    if zeta < 0:
        raise ValueError(f"zeta must be non-negative, got {zeta}")
    vals = np.array(B_val, dtype=np.float64, copy=True)
    flat_idx = B_idx.ravel()
    flat_val = vals.ravel()
    nz = np.flatnonzero(flat_val != 0.0)
    if nz.size == 0:
        return vals
    # Sort non-zeros by (coordinate, -|value|); rank within each coordinate group.
    order = np.lexsort((-np.abs(flat_val[nz]), flat_idx[nz]))
    sorted_pos = nz[order]
    coords = flat_idx[sorted_pos]
    group_start = np.searchsorted(coords, np.arange(d), side="left")
    rank = np.arange(coords.size) - group_start[coords]
    flat_val[sorted_pos[rank >= zeta]] = 0.0
    return flat_val.reshape(vals.shape)
