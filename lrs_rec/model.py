"""The learned LRS model: θ_u = U·w_u + b_u (paper Eq. 1–2), a plain immutable value object."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from lrs_rec._types import FloatArray, IntArray

NPZ_FORMAT = "lrs_rec.LRSModel/1"


def _int_array(name: str, a: Any) -> IntArray:
    """``a`` as int64, refusing floats, booleans and strings (a silent cast would truncate 1.7 to 1)."""
    arr = np.asarray(a)
    if arr.size and arr.dtype.kind not in "iu":
        raise ValueError(f"{name} must hold integers, got dtype {arr.dtype}")
    return arr.astype(np.int64)


def _frozen(a: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    a = np.array(a, copy=True)
    a.setflags(write=False)
    return a


@dataclass(frozen=True, eq=False)
class LRSModel:
    """Shared basis ``U: (d, r)``, per-user ``W: (n_users, r)`` and k-sparse ``B``.

    AMHT-LRS keeps U orthonormal; the model does not require it (the DP trainer's one-hot variant
    stores an unnormalised U), so it is not checked here.

    ``B`` is stored compressed, user by user: ``B_idx: (n_users, k)`` coordinate indices (sorted,
    distinct within a row) and ``B_val: (n_users, k)`` their values. A row with fewer than k non-zeros
    pads with value 0 (its index is still a valid, distinct coordinate). Per-user storage is r + k numbers
    (plus k small integers).
    """

    U: FloatArray
    W: FloatArray
    B_idx: IntArray
    B_val: FloatArray

    def __post_init__(self) -> None:
        U = np.asarray(self.U, dtype=np.float64)
        W = np.asarray(self.W, dtype=np.float64)
        B_idx = _int_array("B_idx", self.B_idx)
        B_val = np.asarray(self.B_val, dtype=np.float64)
        if U.ndim != 2:
            raise ValueError(f"U must be (d, r), got shape {U.shape}")
        d, r = U.shape
        if W.ndim != 2 or W.shape[1] != r:
            raise ValueError(f"W must be (n_users, {r}) to match U {U.shape}, got shape {W.shape}")
        n_users = W.shape[0]
        if B_idx.ndim != 2 or B_idx.shape[0] != n_users:
            raise ValueError(f"B_idx must be (n_users={n_users}, k), got shape {B_idx.shape}")
        if B_val.shape != B_idx.shape:
            raise ValueError(f"B_val shape {B_val.shape} must equal B_idx shape {B_idx.shape}")
        if B_idx.shape[1] > d:
            raise ValueError(f"sparsity k={B_idx.shape[1]} exceeds dimension d={d}")
        if B_idx.size and (B_idx.min() < 0 or B_idx.max() >= d):
            raise ValueError(
                f"B_idx entries must lie in [0, {d}), got range [{B_idx.min()}, {B_idx.max()}]"
            )
        for name, arr in (("U", U), ("W", W), ("B_val", B_val)):
            if not np.all(np.isfinite(arr)):
                raise ValueError(f"{name} contains NaN or inf")
        if B_idx.shape[1] > 1 and np.any(np.diff(B_idx, axis=1) <= 0):
            raise ValueError("each row of B_idx must be strictly increasing (sorted, distinct)")
        object.__setattr__(self, "U", _frozen(U))
        object.__setattr__(self, "W", _frozen(W))
        object.__setattr__(self, "B_idx", _frozen(B_idx))
        object.__setattr__(self, "B_val", _frozen(B_val))

    # -- dimensions -----------------------------------------------------------------------------
    @property
    def d(self) -> int:
        return int(self.U.shape[0])

    @property
    def rank(self) -> int:
        return int(self.U.shape[1])

    @property
    def sparsity(self) -> int:
        return int(self.B_idx.shape[1])

    @property
    def n_users(self) -> int:
        return int(self.W.shape[0])

    # -- maths ------------------------------------------------------------------------------------
    def B_dense(self) -> FloatArray:
        """The dense sparse part, shape (n_users, d): row u is b_u."""
        B = np.zeros((self.n_users, self.d))
        np.put_along_axis(B, self.B_idx, self.B_val, axis=1)
        return B

    def theta(self) -> FloatArray:
        """Dense Θ, shape (n_users, d): row u is θ_u = U·w_u + b_u."""
        return self.W @ self.U.T + self.B_dense()

    def theta_rows(self, users: IntArray) -> FloatArray:
        """θ_u for the given users only, shape (len(users), d)."""
        users = self._user_ids(users)
        out = self.W[users] @ self.U.T
        np.put_along_axis(
            out,
            self.B_idx[users],
            np.take_along_axis(out, self.B_idx[users], axis=1) + self.B_val[users],
            axis=1,
        )
        return out

    def predict(self, X: FloatArray, users: IntArray) -> FloatArray:
        """Predictions ⟨x_j, θ_{u_j}⟩ for samples X: (N, d) of users: (N,)."""
        X = np.asarray(X, dtype=np.float64)
        users = self._user_ids(users)
        if X.ndim != 2 or X.shape[1] != self.d:
            raise ValueError(f"X must be (N, {self.d}), got shape {X.shape}")
        if users.shape != (X.shape[0],):
            raise ValueError(f"users must be ({X.shape[0]},) to match X, got shape {users.shape}")
        low_rank = np.einsum("nd,dr,nr->n", X, self.U, self.W[users])
        sparse = np.einsum(
            "nk,nk->n", np.take_along_axis(X, self.B_idx[users], axis=1), self.B_val[users]
        )
        return np.asarray(low_rank + sparse, dtype=np.float64)

    def _user_ids(self, users: Any) -> IntArray:
        """Integer user indices in [0, n_users) (no float truncation, no negative wrap-around)."""
        out = _int_array("user ids", users)
        if out.size and (out.min() < 0 or out.max() >= self.n_users):
            raise ValueError(
                f"user ids must lie in [0, {self.n_users}), got range [{out.min()}, {out.max()}]"
            )
        return out

    # -- persistence (npz, never pickle) ------------------------------------------------------------
    def to_arrays(self) -> dict[str, np.ndarray[Any, Any]]:
        return {"U": self.U, "W": self.W, "B_idx": self.B_idx, "B_val": self.B_val}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray[Any, Any]]) -> LRSModel:
        missing = {"U", "W", "B_idx", "B_val"} - set(arrays)
        if missing:
            raise ValueError(f"LRSModel arrays are missing {sorted(missing)}")
        return cls(U=arrays["U"], W=arrays["W"], B_idx=arrays["B_idx"], B_val=arrays["B_val"])

    def save(self, path: str | os.PathLike[str]) -> str:
        """Write to ``path`` as an uncompressed ``.npz`` (no pickled objects); returns the path
        written (numpy appends ``.npz`` when ``path`` lacks it, and :meth:`load` finds it)."""
        np.savez(path, format=np.array(NPZ_FORMAT), **self.to_arrays())  # type: ignore[arg-type]
        out = os.fspath(path)
        return out if out.endswith(".npz") else out + ".npz"

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> LRSModel:
        where = os.fspath(path)
        if not os.path.exists(where) and os.path.exists(where + ".npz"):
            where += ".npz"  # saved as save(path) without the suffix
        with np.load(where, allow_pickle=False) as z:
            fmt = str(z["format"]) if "format" in z.files else "<none>"
            if fmt != NPZ_FORMAT:
                raise ValueError(
                    f"{where}: not an LRSModel file of format {NPZ_FORMAT!r} (found {fmt!r})"
                )
            try:
                return cls.from_arrays({name: z[name] for name in z.files if name != "format"})
            except ValueError as e:
                raise ValueError(f"{where}: {e}") from e

    @classmethod
    def from_dense_b(cls, U: FloatArray, W: FloatArray, B: FloatArray, k: int) -> LRSModel:
        """Build from a dense B: (n_users, d) whose rows have at most k non-zeros."""
        from lrs_rec.thresholding import top_k_indices

        B = np.asarray(B, dtype=np.float64)
        if np.any(np.count_nonzero(B, axis=1) > k):
            raise ValueError(f"some row of B has more than k={k} non-zeros")
        idx = top_k_indices(B, k)
        return cls(U=U, W=W, B_idx=idx, B_val=np.take_along_axis(B, idx, axis=1))
