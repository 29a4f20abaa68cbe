"""Synthetic LRS data as in the paper's Eq. 1 and Sec. 3 (seeded, with the ground truth)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lrs_rec._types import FloatArray, IntArray
from lrs_rec.model import LRSModel


@dataclass(frozen=True)
class SyntheticData:
    """Samples ``X: (N, d)``, ``y: (N,)``, ``users: (N,)`` and the truth ``U* (d, r)``, ``W* (t, r)``,
    ``B* (t, d)`` (row u is b*_u, dense) and ``theta = W* U*ᵀ + B*`` (t, d)."""

    X: FloatArray
    y: FloatArray
    users: IntArray
    U: FloatArray
    W: FloatArray
    B: FloatArray
    theta: FloatArray
    sparsity: int

    def truth(self) -> LRSModel:
        """The ground truth as an :class:`LRSModel`."""
        return LRSModel.from_dense_b(self.U, self.W, self.B, self.sparsity)

    @property
    def n_sparse_users(self) -> int:
        """Users whose b*_u is non-zero (the row-sparsity budget d·ζ may not cover all users)."""
        return int(np.count_nonzero(np.any(self.B != 0, axis=1)))


def _sparse_supports(
    n_users: int, d: int, k: int, zeta: int | None, rng: np.random.Generator
) -> list[IntArray | None]:
    """k distinct coordinates per user with every coordinate used by at most ζ users (A1).

    Users are visited in random order; each draws k coordinates among those with remaining
    capacity (weighted by capacity, so the budget d·ζ is spread evenly). When fewer than k
    coordinates have capacity left, the remaining users get b* = 0: with t·k > d·ζ (e.g. the
    paper's t=500, k=10, d=150, ζ=5) only ⌊d·ζ/k⌋-ish users can be exactly k-sparse.
    """
    supports: list[IntArray | None] = [None] * n_users
    if k == 0:
        return supports
    if zeta is None:
        for u in range(n_users):
            supports[u] = np.sort(rng.choice(d, size=k, replace=False)).astype(np.int64)
        return supports
    cap = np.full(d, zeta, dtype=np.float64)
    for u in rng.permutation(n_users):
        avail = np.flatnonzero(cap > 0)
        if avail.size < k:
            break
        p = cap[avail] / cap[avail].sum()
        S = np.sort(rng.choice(avail, size=k, replace=False, p=p)).astype(np.int64)
        cap[S] -= 1
        supports[int(u)] = S
    return supports


def make_synthetic(
    n_users: int,
    m: int,
    d: int,
    rank: int,
    sparsity: int,
    zeta: int | None,
    noise: float = 0.0,
    *,
    random_state: int | np.random.Generator | None = None,
) -> SyntheticData:
    """Generate ``m`` samples per user from Eq. 1: x ~ N(0, I_d), y = ⟨x, U* w*_u + b*_u⟩ + z.

    As in Sec. 3: U* uniform (a uniformly random orthonormal d×r basis; the unit sphere for r=1),
    w*_u entries and non-zeros of b*_u i.i.d. N(0, 1), supports random with columns k-sparse and
    rows ζ-sparse (``zeta=None``: no row constraint, every user exactly k-sparse), z ~ N(0, noise²).
    Samples are grouped by user (user 0's m rows first).
    """
    for name, v in (("n_users", n_users), ("m", m), ("d", d), ("rank", rank)):
        if int(v) != v or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    if rank >= d:
        raise ValueError(f"rank={rank} must be < d={d}")
    if int(sparsity) != sparsity or not 0 <= sparsity <= d:
        raise ValueError(f"sparsity must be an integer in [0, d={d}], got {sparsity!r}")
    if zeta is not None and (int(zeta) != zeta or zeta < 1):
        raise ValueError(f"zeta must be a positive integer or None, got {zeta!r}")
    if not np.isfinite(noise) or noise < 0:
        raise ValueError(f"noise must be a finite non-negative number, got {noise!r}")
    rng = np.random.default_rng(random_state)
    Q, R = np.linalg.qr(rng.standard_normal((d, rank)))
    s = np.sign(np.diag(R))
    s[s == 0] = 1.0
    U = np.asarray(Q * s, dtype=np.float64)
    W = rng.standard_normal((n_users, rank))
    B = np.zeros((n_users, d))
    for u, S in enumerate(_sparse_supports(n_users, d, sparsity, zeta, rng)):
        if S is not None:
            B[u, S] = rng.standard_normal(S.size)
    theta = W @ U.T + B
    users = np.repeat(np.arange(n_users, dtype=np.int64), m)
    X = rng.standard_normal((n_users * m, d))
    y = np.einsum("nd,nd->n", X, theta[users])
    if noise > 0:
        y = y + noise * rng.standard_normal(y.shape[0])
    return SyntheticData(X=X, y=y, users=users, U=U, W=W, B=B, theta=theta, sparsity=int(sparsity))


def relative_error(theta_hat: FloatArray, theta_star: FloatArray) -> float:
    """‖Θ̂ − Θ*‖_F / ‖Θ*‖_F."""
    return float(np.linalg.norm(theta_hat - theta_star) / np.linalg.norm(theta_star))
