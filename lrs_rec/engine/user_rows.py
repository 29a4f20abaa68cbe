"""Per-user row layout of the sparse b-step and the matrix-free U-step (paper Eq. 3, Eq. 5).

:class:`UserData` holds one block of samples sorted by user, with per-user segments and count
buckets, so that the small per-user least-squares problems of a block of users are solved in batches
(:func:`batched_ls`). Built per user block by :func:`lrs_rec.engine.sparse_b.sparse_b_step` from the
engine's :class:`~lrs_rec.engine.steps.Samples` (``x_j = F[items[j]]``).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
import scipy.sparse as sp

from lrs_rec._types import FloatArray, IntArray
from lrs_rec.thresholding import top_k_indices

JITTER = 1e-10
"""Relative diagonal jitter (times the mean diagonal of the Gram) that keeps every small
least-squares solve of the paper setting well posed, e.g. for users with fewer samples than unknowns."""


@dataclass(frozen=True)
class _Bucket:
    users: IntArray  # (n_b,) users in this bucket
    rows: IntArray  # (n_b, m_pad) row indices into the user-sorted samples (pads repeat a row)
    mask: FloatArray | None  # (n_b, m_pad) 1 for real rows, 0 for pads; None when unpadded


@dataclass(frozen=True)
class UserData:
    """Samples sorted by user, with the per-user segments used by the vectorised steps.

    ``X: (N, d)``, ``y: (N,)``, ``user_of: (N,)`` non-decreasing; user u owns rows
    ``starts[u] : starts[u] + counts[u]`` (every user has at least one row).
    """

    X: FloatArray
    y: FloatArray
    user_of: IntArray
    starts: IntArray
    counts: IntArray
    buckets: tuple[_Bucket, ...]

    @property
    def n_users(self) -> int:
        return int(self.counts.shape[0])

    @property
    def d(self) -> int:
        return int(self.X.shape[1])

    @classmethod
    def build(
        cls, X: FloatArray, y: FloatArray, users: IntArray, n_users: int
    ) -> tuple[UserData, IntArray]:
        """Sort by user (stable); returns the data and the permutation ``order`` applied."""
        order = np.argsort(users, kind="stable").astype(np.int64)
        user_of = users[order]
        counts = np.bincount(user_of, minlength=n_users).astype(np.int64)
        if np.any(counts == 0):
            raise ValueError("every user needs at least one sample")
        starts = np.concatenate(([0], np.cumsum(counts)[:-1])).astype(np.int64)
        return (
            cls(
                X=np.ascontiguousarray(X[order]),
                y=np.ascontiguousarray(y[order]),
                user_of=user_of,
                starts=starts,
                counts=counts,
                buckets=_make_buckets(starts, counts),
            ),
            order,
        )

    def segment_sum(self, values: FloatArray) -> FloatArray:
        """Per-user sums of ``values: (N, ...)`` → ``(n_users, ...)``."""
        return np.asarray(np.add.reduceat(values, self.starts, axis=0), dtype=np.float64)

    def subset(self, keep: np.ndarray[Any, Any]) -> tuple[UserData, IntArray]:
        """The data of the users with ``keep[u]`` (renumbered 0.., same order) and their row indices."""
        if keep.all():
            return self, np.arange(self.X.shape[0], dtype=np.int64)
        rows = np.flatnonzero(keep[self.user_of]).astype(np.int64)
        new_id = np.cumsum(keep) - 1
        sub, _ = UserData.build(
            self.X[rows], self.y[rows], new_id[self.user_of[rows]], int(keep.sum())
        )
        return sub, rows

    @cached_property
    def col_norms(self) -> FloatArray:
        """Per-user column norms ``‖X_u[:, i]‖`` → ``(n_users, d)`` (zeros replaced by 1)."""
        c = np.sqrt(self.segment_sum(self.X * self.X))
        c[c == 0] = 1.0
        return c

    def gather(self, S: IntArray) -> FloatArray:
        """``X[j, S[user_of[j]]]`` for every sample: each sample's covariates on its user's support
        ``S: (n_users, k)`` → ``(N, k)``."""
        N, d = self.X.shape
        flat = (np.arange(N, dtype=np.int64) * d)[:, None] + S[self.user_of]
        return np.asarray(self.X.reshape(-1)[flat], dtype=np.float64)

    def user_grams(self) -> FloatArray:
        """Per-user Gram matrices ``X_uᵀ X_u`` → ``(n_users, d, d)`` (batched by count bucket)."""
        G = np.empty((self.n_users, self.d, self.d))
        for b in self.buckets:
            Xp = self.X[b.rows]
            if b.mask is not None:
                Xp = Xp * b.mask[:, :, None]
            G[b.users] = np.matmul(Xp.transpose(0, 2, 1), Xp)
        return G

    def segment_xt(self, res: FloatArray) -> FloatArray:
        """Per-user ``X_uᵀ res_u`` → ``(n_users, d)`` without an (N, d) temporary."""
        N = self.X.shape[0]
        indptr = np.concatenate((self.starts, [N]))
        P = sp.csr_array((res, np.arange(N), indptr), shape=(self.n_users, N))
        return np.asarray(P @ self.X, dtype=np.float64)


def _make_buckets(starts: IntArray, counts: IntArray) -> tuple[_Bucket, ...]:
    """Group users whose counts share the same power-of-two ceiling; pad to the bucket's max count."""
    key = np.ceil(np.log2(np.maximum(counts, 1))).astype(np.int64)
    out = []
    for kv in np.unique(key):
        members = np.flatnonzero(key == kv).astype(np.int64)
        c = counts[members]
        m_pad = int(c.max())
        j = np.arange(m_pad)
        rows = starts[members][:, None] + np.minimum(j[None, :], c[:, None] - 1)
        mask = None if int(c.min()) == m_pad else (j[None, :] < c[:, None]).astype(np.float64)
        out.append(_Bucket(users=members, rows=rows.astype(np.int64), mask=mask))
    return tuple(out)


def _solve_spd(G: FloatArray, h: FloatArray, ridge: FloatArray) -> FloatArray:
    """Solve ``(G + diag(ridge) + jitter·I) s = h`` for a batch ``G: (n, p, p)``, ``h: (n, p)``."""
    p = G.shape[-1]
    scale = np.trace(G, axis1=-2, axis2=-1) / max(p, 1)
    jitter = JITTER * np.maximum(scale, 1e-30)
    Greg = G + (ridge[None, :] + jitter[:, None])[:, :, None] * np.eye(p)[None, :, :]
    return np.asarray(np.linalg.solve(Greg, h[..., None])[..., 0], dtype=np.float64)


def batched_ls(data: UserData, F: FloatArray, t: FloatArray, ridge: FloatArray) -> FloatArray:
    """Per-user least squares ``min_s ‖F_u s − t_u‖² + Σ_i ridge_i s_i²`` → ``(n_users, p)``.

    ``F: (N, p)`` are per-sample features (user-sorted), ``t: (N,)`` targets; users are solved in
    batches of similar sample count (one batched ``np.linalg.solve`` per bucket).
    """
    p = F.shape[1]
    out = np.zeros((data.n_users, p))
    for b in data.buckets:
        Fp = F[b.rows]
        tp = t[b.rows]
        if b.mask is not None:
            Fp = Fp * b.mask[:, :, None]
            tp = tp * b.mask
        G = np.matmul(Fp.transpose(0, 2, 1), Fp)
        h = np.einsum("bmp,bm->bp", Fp, tp)
        out[b.users] = _solve_spd(G, h, ridge)
    return out


# ---------------------------------------------------------------------------------------------
# Elementary pieces
# ---------------------------------------------------------------------------------------------
def sparse_predict(
    X: FloatArray, users: IntArray, B_idx: IntArray, B_val: FloatArray
) -> FloatArray:
    """``x_jᵀ b_{u_j}`` for every sample, using the compressed B (O(N·k))."""
    if B_idx.shape[1] == 0:
        return np.zeros(X.shape[0])
    return np.asarray(
        np.einsum("nk,nk->n", gather_rows(X, B_idx[users]), B_val[users]),
        dtype=np.float64,
    )


def gather_rows(M: FloatArray, idx: IntArray) -> FloatArray:
    """``out[n, i] = M[n, idx[n, i]]`` (``np.take_along_axis(M, idx, axis=1)``, via flat indexing)."""
    n, d = M.shape
    flat = np.ascontiguousarray(M).reshape(-1)
    return np.asarray(flat[np.arange(n)[:, None] * d + idx], dtype=np.float64)


def low_rank_predict(Z: FloatArray, W: FloatArray, users: IntArray) -> FloatArray:
    return np.asarray(np.einsum("nr,nr->n", Z, W[users]), dtype=np.float64)


def dense_b(B_idx: IntArray, B_val: FloatArray, d: int) -> FloatArray:
    B = np.zeros((B_idx.shape[0], d))
    np.put_along_axis(B, B_idx, B_val, axis=1)
    return B


def compress_b(C: FloatArray, k: int) -> tuple[IntArray, FloatArray]:
    """Keep the top-k magnitudes of each row of a dense (n_users, d) matrix."""
    idx = top_k_indices(C, k)
    return idx, np.take_along_axis(C, idx, axis=1)
