"""Input checks shared by the estimators: bad input raises ``ValueError`` naming the problem."""

from __future__ import annotations

from typing import Any

import numpy as np

from lrs_rec._types import FloatArray, IntArray


def _first(values: np.ndarray[Any, Any], n: int = 5) -> str:
    shown = ", ".join(str(v) for v in values[:n].tolist())
    return shown + (", ..." if values.size > n else "")


def check_X(X: Any, *, name: str = "X", d: int | None = None) -> FloatArray:
    """``X`` as a finite float64 (N, d) array."""
    arr = np.asarray(X)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array (N, d), got shape {arr.shape}")
    if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_):
        raise ValueError(f"{name} must be numeric, got dtype {arr.dtype}")
    arr = np.asarray(arr, dtype=np.float64)
    if d is not None and arr.shape[1] != d:
        raise ValueError(f"{name} must have {d} columns (features), got {arr.shape[1]}")
    bad = ~np.isfinite(arr)
    if bad.any():
        rows = np.flatnonzero(bad.any(axis=1))
        raise ValueError(f"{name} contains NaN or inf (rows {_first(rows)})")
    return arr


def check_y(y: Any, *, n: int, name: str = "y") -> FloatArray:
    """``y`` as a finite float64 (n,) array."""
    arr = np.asarray(y)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array (N,), got shape {arr.shape}")
    if arr.shape[0] != n:
        raise ValueError(
            f"{name} has length {arr.shape[0]} but X has {n} rows (mismatched lengths)"
        )
    if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_):
        raise ValueError(f"{name} must be numeric, got dtype {arr.dtype}")
    arr = np.asarray(arr, dtype=np.float64)
    bad = ~np.isfinite(arr)
    if bad.any():
        raise ValueError(f"{name} contains NaN or inf (positions {_first(np.flatnonzero(bad))})")
    return arr


def check_users(
    users: Any, *, n: int, n_users: int | None = None, require_all: bool = True
) -> tuple[IntArray, int]:
    """User ids as int64 (n,), and the number of users.

    Ids must be integers in ``[0, n_users)``; with ``require_all`` every id in that range must
    have at least one sample (a user without samples cannot be fitted).
    """
    arr = np.asarray(users)
    if arr.ndim != 1:
        raise ValueError(f"users must be a 1-D array (N,), got shape {arr.shape}")
    if arr.shape[0] != n:
        raise ValueError(f"users has length {arr.shape[0]} but X has {n} rows (mismatched lengths)")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        if not np.issubdtype(arr.dtype, np.floating):
            raise ValueError(f"users must hold integer ids, got dtype {arr.dtype}")
        if not np.all(np.isfinite(arr)):
            raise ValueError("users contains NaN or inf")
        if np.any(arr != np.round(arr)):
            raise ValueError("users must hold integer ids, got non-integer values")
    ids = arr.astype(np.int64)
    if ids.size and ids.min() < 0:
        raise ValueError(f"users contains negative ids: {_first(np.unique(ids[ids < 0]))}")
    max_id = int(ids.max()) if ids.size else -1
    if n_users is None:
        n_users = max_id + 1
    else:
        n_users = int(n_users)
        if n_users < 0:
            raise ValueError(f"n_users must be non-negative, got {n_users}")
        if max_id >= n_users:
            raise ValueError(f"users contains ids >= n_users={n_users}: max id {max_id}")
    if require_all:
        counts = np.bincount(ids, minlength=n_users)
        missing = np.flatnonzero(counts == 0)
        if missing.size:
            raise ValueError(
                f"users without samples: ids {_first(missing)} ({missing.size} of {n_users}) "
                f"have no rows; ids must be 0..n_users-1 and each must appear"
            )
    return ids, n_users


def check_fit_inputs(
    X: Any, y: Any, users: Any, n_users: int | None = None
) -> tuple[FloatArray, FloatArray, IntArray, int]:
    """Validate ``fit(X, y, users)`` arguments; returns (X, y, users, n_users)."""
    Xa = check_X(X)
    if Xa.shape[0] == 0:
        raise ValueError("X has no rows: need at least one sample")
    ya = check_y(y, n=Xa.shape[0])
    ua, nu = check_users(users, n=Xa.shape[0], n_users=n_users, require_all=True)
    return Xa, ya, ua, nu


def check_rank_sparsity(rank: int, sparsity: int, d: int) -> None:
    """``1 <= rank < d`` and ``0 <= sparsity <= d``."""
    if int(rank) != rank or rank < 1:
        raise ValueError(f"rank must be a positive integer, got {rank!r}")
    if rank >= d:
        raise ValueError(f"rank={rank} must be < d={d} (the number of features)")
    if int(sparsity) != sparsity or sparsity < 0:
        raise ValueError(f"sparsity must be a non-negative integer, got {sparsity!r}")
    if sparsity > d:
        raise ValueError(f"sparsity={sparsity} must be <= d={d} (the number of features)")


def check_non_negative(**values: float) -> None:
    """Each keyword value must be a finite number >= 0 (ridge strengths, tolerances)."""
    for name, v in values.items():
        if not np.isfinite(v) or v < 0:
            raise ValueError(f"{name} must be a finite non-negative number, got {v!r}")
