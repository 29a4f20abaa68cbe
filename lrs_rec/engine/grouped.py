"""Per-group sums of sample outer products: the Gram matrices of every user's (or item's) ridge problem.

``grouped_gram(groups, n_groups, A)[g] = Σ_{j: groups[j] = g} A_j A_jᵀ`` — with A the design rows of the
samples (e.g. item features f_i of one user's ratings) this is the ``XᵀX`` of Eq. 3–4 for every user at
once. The fast path bins the groups by size and reduces each bin with one batched product; :func:`grouped_gram_reference` is the plain loop it is tested against.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp


def _indicator(groups: np.ndarray, n_groups: int, lo: int, hi: int) -> sp.csr_matrix:
    g = groups[lo:hi]
    return sp.csr_matrix((np.ones(hi - lo), (g, np.arange(hi - lo))), shape=(n_groups, hi - lo))


def grouped_sum(groups: np.ndarray, n_groups: int, V: np.ndarray) -> np.ndarray:
    """``out[g] = Σ_{j: groups[j] = g} V_j`` for V of shape (N,) or (N, p)."""
    V = np.asarray(V, dtype=np.float64)
    flat = V.reshape(V.shape[0], -1)
    out = np.asarray(_indicator(np.asarray(groups, dtype=np.int64), n_groups, 0, V.shape[0]) @ flat)
    return out.reshape((n_groups, *V.shape[1:]))


_CHUNK_FLOATS = 1 << 22  # ~32 MB of padded rows per batched product


def grouped_gram(groups: np.ndarray, n_groups: int, A: np.ndarray) -> np.ndarray:
    """``out[g] = Σ_{j in g} A_j A_jᵀ``, shape (n_groups, p, p), for A of shape (N, p).

    Groups are binned by size (powers of two); each bin is gathered into a zero-padded
    (groups, length, p) block — at most twice the rows — and reduced with one batched matrix product,
    in chunks of about 32 MB."""
    A = np.asarray(A, dtype=np.float64)
    groups = np.asarray(groups, dtype=np.int64)
    p = A.shape[1]
    out = np.zeros((n_groups, p, p))
    if groups.size == 0:
        return out
    order = np.argsort(groups, kind="stable")
    As = A[order]
    counts = np.bincount(groups, minlength=n_groups)
    starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
    nonempty = np.flatnonzero(counts)
    bins = np.ceil(np.log2(counts[nonempty])).astype(np.int64)
    for b in np.unique(bins):
        sel = nonempty[bins == b]
        L = int(counts[sel].max())
        step = max(1, _CHUNK_FLOATS // (L * p))
        for lo in range(0, sel.size, step):
            g = sel[lo : lo + step]
            pos = np.arange(L)[None, :]
            mask = pos < counts[g][:, None]
            blk = As[np.where(mask, starts[g][:, None] + pos, 0)]
            blk *= mask[:, :, None]
            out[g] = np.matmul(blk.transpose(0, 2, 1), blk)
    return out


def grouped_gram_reference(groups: np.ndarray, n_groups: int, A: np.ndarray) -> np.ndarray:
    """Slow, obvious twin of :func:`grouped_gram`."""
    A = np.asarray(A, dtype=np.float64)
    out = np.zeros((n_groups, A.shape[1], A.shape[1]))
    for j, g in enumerate(groups):
        out[int(g)] += np.outer(A[j], A[j])
    return out
