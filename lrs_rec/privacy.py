"""User-level DP for the U-step of AMHT-LRS (paper Sec. 2.2, Eq. 7–8): clipping, sensitivities, noisy
sufficient statistics. Pure numpy; the accounting (dp_accounting) lives in ``training.private_accounting``.

Neighbouring relation (``NEIGHBOURING``): two datasets are neighbours when one is the other plus or minus
ALL the data of one user (add/remove one user). A mechanism's L2 sensitivity below is therefore the largest
L2 (Frobenius) norm of ONE user's whole contribution to the released statistic.

Clipping (paper Sec. 2.2): covariates x̂ = clip(x, A1), responses ŷ = clip(y, A2),
⟨x, b_u⟩ clipped to A3, ŵ_u = clip(w_u, A_w), and at most ``m = max_samples_per_user`` samples of each user
enter the statistics (``cap_samples_by_key`` / ``cap_samples_per_user``; a user's other samples are still used for that user's own
w_u, b_u, which are never released). One user's contribution to Eq. 7–8 is then

    A_u = Σ_j (x̂_j x̂_jᵀ) ⊗ (ŵ ŵᵀ)        ‖A_u‖_F ≤ ‖ŵ‖² Σ_j ‖x̂_j‖²          ≤ m·A1²·A_w²
    V_u = Σ_j x̂_j (ŷ_j − ĉ_j) ŵᵀ          ‖V_u‖_F ≤ Σ_j ‖x̂_j‖ |ŷ_j − ĉ_j| ‖ŵ‖ ≤ m·A1·(A2 + A3)·A_w

(general covariates, ``u_step_sensitivities(one_hot=False)``). With one-hot item covariates x_j = e_{i_j}
and DISTINCT items per user, X̂_uᵀX̂_u is a 0/1 diagonal with ≤ m ones, so the bounds tighten to
‖A_u‖_F ≤ √m·A_w² and ‖V_u‖_F ≤ √m·(A2 + A3)·A_w (``one_hot=True``), and A is block-diagonal with one
r×r block per item: only those blocks are data-dependent and noised (as in private ALS, Chien et al. 2021).

Vectorisation convention: vec(U) is row-major (index i·r + a), so ⟨x, U w⟩ = ⟨vec U, x ⊗ w⟩ and
A = Σ_j (x̂_j ⊗ ŵ_j)(x̂_j ⊗ ŵ_j)ᵀ — the paper's ŵŵᵀ ⊗ Σx̂x̂ᵀ in column-major order. A is symmetric; its
noise N1 is drawn i.i.d. on the upper triangle (incl. diagonal) and mirrored, so the released object is
the noised upper triangle, whose sensitivity is ≤ ‖A_u‖_F.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from lrs_rec._types import FloatArray, IntArray
from lrs_rec.amht import orthonormalize as orthonormalize_qr

NEIGHBOURING = "add_remove_user"
"""Neighbouring relation of every guarantee in this module: add or remove all data of one user."""


# -- clipping (paper Sec. 2.2: clip(v, ρ) = v·min{1, ρ/‖v‖}) ---------------------------------------------
def clip_scalar(x: FloatArray, bound: float) -> FloatArray:
    """Elementwise clip(x, ρ) = x·min{1, ρ/|x|}, i.e. clip to [−ρ, ρ]."""
    _check_positive(bound=bound)
    return np.asarray(np.clip(np.asarray(x, dtype=np.float64), -bound, bound), dtype=np.float64)


def clip_rows(X: FloatArray, bound: float) -> FloatArray:
    """Scale each row of X (N, d) to L2 norm ≤ ``bound``: clip(x, ρ) = x·min{1, ρ/‖x‖₂}."""
    _check_positive(bound=bound)
    X = np.asarray(X, dtype=np.float64)
    norms = np.linalg.norm(X, axis=-1, keepdims=True)
    scale = np.minimum(1.0, bound / np.maximum(norms, np.finfo(np.float64).tiny))
    return np.asarray(X * scale, dtype=np.float64)


def clip_rows_reference(X: FloatArray, bound: float) -> FloatArray:
    """Slow, obvious twin of :func:`clip_rows` (one row at a time)."""
    out = np.array(X, dtype=np.float64, copy=True)
    for j in range(out.shape[0]):
        n = float(np.sqrt(np.sum(out[j] ** 2)))
        if n > bound:
            out[j] = out[j] * (bound / n)
    return out


# -- bounds and sensitivities --------------------------------------------------------------------------
@dataclass(frozen=True)
class ClipBounds:
    """Clipping parameters of DP-AMHT-LRS (paper Sec. 2.2) and the per-user sample cap m."""

    A1: float = 1.0  # covariate L2 norm
    A2: float = 1.0  # |response|
    A3: float = 1.0  # |⟨x, b_u⟩|
    A_w: float = 1.0  # ‖w_u‖₂
    max_samples_per_user: int = 50  # m: samples of one user entering A and V

    def __post_init__(self) -> None:
        _check_positive(A1=self.A1, A2=self.A2, A3=self.A3, A_w=self.A_w)
        if (
            int(self.max_samples_per_user) != self.max_samples_per_user
            or self.max_samples_per_user < 1
        ):
            raise ValueError(
                f"max_samples_per_user must be a positive integer, got {self.max_samples_per_user!r}"
            )


def u_step_sensitivities(
    bounds: ClipBounds, *, one_hot: bool, sparse: bool = True
) -> tuple[float, float]:
    """L2 sensitivities (Δ_A, Δ_V) of the U-step statistics A, V under add/remove-one-user.
    ``sparse=False``: the model has no sparse part (b ≡ 0, so ĉ = 0 and |ŷ − ĉ| ≤ A2): A3 drops
    out of Δ_V.

    General covariates: Δ_A = m·A1²·A_w², Δ_V = m·A1·(A2 + A3)·A_w (Eq. 7–8, the paper's noise scales).
    One-hot item covariates with distinct items per user (A1 = 1): Δ_A = √m·A_w², Δ_V = √m·(A2 + A3)·A_w.
    """
    m, b = float(bounds.max_samples_per_user), bounds
    a3 = b.A3 if sparse else 0.0
    if one_hot:
        if b.A1 != 1.0:
            raise ValueError(f"one-hot covariates have norm 1: A1 must be 1.0, got {b.A1}")
        return math.sqrt(m) * b.A_w**2, math.sqrt(m) * (b.A2 + a3) * b.A_w
    return m * b.A1**2 * b.A_w**2, m * b.A1 * (b.A2 + a3) * b.A_w


def item_sum_sensitivities(
    *, A2: float, max_samples_per_user: int, user_norm_bound: float | None = None
) -> tuple[float, float]:
    """(Δ_S, Δ_N) of the per-item weighted residual sums S and weighted counts N of
    :func:`item_sum_statistics` (distinct items per user). With s_u ≤ √(m/n_u) one user's count vector
    has L2 norm s_u·√n_u ≤ √m, and the sum vector s_u·‖clip(res_u, A2)‖ ≤ min(√m·A2, C) where
    C = ``user_norm_bound`` (s_u ≤ C/‖clip(res_u, A2)‖ too)."""
    _check_positive(A2=A2)
    m = float(max_samples_per_user)
    dS = math.sqrt(m) * A2
    if user_norm_bound is not None:
        _check_positive(user_norm_bound=user_norm_bound)
        dS = min(dS, user_norm_bound)
    return dS, math.sqrt(m)


# -- per-user caps -------------------------------------------------------------------------------------
def first_per_user(users: np.ndarray, order: np.ndarray, m: int) -> np.ndarray:
    """Boolean mask over the samples: the first ``m`` of each user in ``order``, an ordering of the
    sample indices that groups each user's samples together (e.g. sorted by user, then by a key)."""
    u_sorted = users[order]
    starts = np.r_[0, np.flatnonzero(np.diff(u_sorted)) + 1] if users.size else np.zeros(0, int)
    rank = np.arange(users.size) - np.repeat(starts, np.diff(np.r_[starts, users.size]))
    keep = np.zeros(users.size, dtype=bool)
    keep[order[rank < m]] = True
    return keep


def cap_samples_per_user(users: IntArray, m: int, rng: np.random.Generator) -> np.ndarray:
    """Boolean mask keeping at most ``m`` samples of each user, chosen uniformly at random.

    The choice for one user depends only on that user's own samples and ``rng`` — through one
    permutation of ALL samples, so it cannot be reproduced partition by partition: private
    training selects by :func:`cap_samples_by_key` (keyed, order-independent draws) instead."""
    users = np.asarray(users, dtype=np.int64)
    order = rng.permutation(users.size)
    # stable sort by user of a random permutation = random order within each user
    return first_per_user(users, order[np.argsort(users[order], kind="stable")], m)


# -- keyed per-user caps: the same choice on any partition of the users --------------------------------
_M64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_MIX1, _MIX2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB
ID_HASH_SALT = 0x6C72732D72656331  # "lrs-rec1": the start of every id hash
_HASH_ROWS = 1 << 16  # ids hashed per block (bounded memory: rows × longest id code points)


def splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser, elementwise on uint64 (wrapping arithmetic): a bijection of the
    64-bit integers whose outputs look uniform (Steele, Lea & Flood 2014)."""
    z = np.asarray(x, dtype=np.uint64).reshape(-1) + np.uint64(_GOLDEN)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(_MIX1)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(_MIX2)
    return np.asarray(z ^ (z >> np.uint64(31)), dtype=np.uint64).reshape(np.shape(x))


def splitmix64_reference(x: int) -> int:
    """Slow, obvious twin of :func:`splitmix64` on one Python int."""
    z = (x + _GOLDEN) & _M64
    z = ((z ^ (z >> 30)) * _MIX1) & _M64
    z = ((z ^ (z >> 27)) * _MIX2) & _M64
    return z ^ (z >> 31)


def id_hash(ids: np.ndarray | Sequence[str]) -> np.ndarray:
    """A 64-bit hash (uint64) of each id string — of its text only (length, then each code
    point folded in by :func:`splitmix64`), so the same id hashes the same in every process and
    every array, whatever the array's string width. Ids are numpy strings: trailing NULs dropped."""
    a = np.asarray(ids, dtype=str).reshape(-1)
    out = np.empty(a.size, dtype=np.uint64)
    for lo in range(0, a.size, _HASH_ROWS):
        blk = np.ascontiguousarray(a[lo : lo + _HASH_ROWS])
        width = blk.dtype.itemsize // 4
        codes = blk.view(np.uint32).reshape(blk.size, width)
        n = np.char.str_len(blk).astype(np.int64)
        h = splitmix64(n.astype(np.uint64) ^ np.uint64(ID_HASH_SALT))
        for j in range(int(n.max()) if n.size else 0):
            h = np.where(j < n, splitmix64(h ^ codes[:, j].astype(np.uint64)), h)
        out[lo : lo + blk.size] = h
    return out


def id_hash_reference(ids: Sequence[str]) -> list[int]:
    """Slow, obvious twin of :func:`id_hash` (one id, one code point at a time)."""
    out = []
    for s in ids:
        s = str(s).rstrip("\x00")
        h = splitmix64_reference(len(s) ^ ID_HASH_SALT)
        for ch in s:
            h = splitmix64_reference(h ^ ord(ch))
        out.append(h)
    return out


def draw_selection_seed(rng: np.random.Generator) -> int:
    """The public seed of the keyed selections (:func:`selection_keys`): one draw of the run's rng."""
    return int(rng.integers(0, 1 << 63))


def selection_keys(
    seed: int, user_hash: np.ndarray, item_hash: np.ndarray, users: IntArray, items: IntArray
) -> np.ndarray:
    """A uniform 64-bit key per sample, a function of (``seed``, the hash of the sample's user id,
    the hash of its item id) only: key = splitmix64(splitmix64(seed ⊕ h(user)) ⊕ h(item)).
    ``user_hash`` / ``item_hash``: :func:`id_hash` of the user / item ids by index. Keys of one
    user's distinct items differ unless two item ids' 64-bit hashes collide (splitmix64 is a
    bijection)."""
    per_user = splitmix64(np.asarray(user_hash, np.uint64) ^ np.uint64(seed & _M64))
    users = np.asarray(users, dtype=np.int64)
    items = np.asarray(items, dtype=np.int64)
    return splitmix64(per_user[users] ^ np.asarray(item_hash, np.uint64)[items])


def selection_keys_reference(
    seed: int, user_ids: Sequence[str], item_ids: Sequence[str], users: IntArray, items: IntArray
) -> list[int]:
    """Slow, obvious twin of :func:`selection_keys` from the id strings."""
    hu, hi = id_hash_reference(user_ids), id_hash_reference(item_ids)
    return [
        splitmix64_reference(splitmix64_reference(hu[int(u)] ^ seed) ^ hi[int(i)])
        for u, i in zip(users, items, strict=True)
    ]


def cap_samples_by_key(users: IntArray, keys: np.ndarray, m: int) -> np.ndarray:
    """Boolean mask keeping, for each user, its (at most) ``m`` samples with the smallest ``keys``
    (:func:`selection_keys`): a uniformly random m-subset of the user's samples when the keys are
    uniform. With keyed draws the choice for one user is a function of that user's own samples
    and the public seed only — not of the row order, the other users, or how the users are cut
    into partitions — so each Dask partition picks exactly what the local engine picks, and it
    still keeps ≤ m samples per user (the sensitivities are unchanged). The seed need not be
    secret: the bounds hold for every seed."""
    users = np.asarray(users, dtype=np.int64)
    return first_per_user(users, np.lexsort((np.asarray(keys, np.uint64), users)), m)


def cap_samples_by_key_reference(users: IntArray, keys: Sequence[int], m: int) -> np.ndarray:
    """Slow, obvious twin of :func:`cap_samples_by_key`: per user, sort its samples by key and keep
    the first m."""
    by_user: dict[int, list[tuple[int, int]]] = {}
    for j, (u, k) in enumerate(zip(np.asarray(users).tolist(), keys, strict=True)):
        by_user.setdefault(int(u), []).append((int(k), j))
    keep = np.zeros(len(keys), dtype=bool)
    for samples in by_user.values():
        for _, j in sorted(samples)[:m]:
            keep[j] = True
    return keep


def user_weights(n_per_user: IntArray, m: int) -> FloatArray:
    """s_u = min(1, √(m / n_u)): down-weights a user with n_u > m samples so that
    s_u·√n_u ≤ √m (used instead of dropping samples by :func:`item_sum_statistics`)."""
    n = np.asarray(n_per_user, dtype=np.float64)
    return np.asarray(np.minimum(1.0, np.sqrt(m / np.maximum(n, 1.0))), dtype=np.float64)


def check_samples_per_user(users: IntArray, m: int) -> None:
    """The sensitivities assume at most m samples per user (apply :func:`cap_samples_per_user`)."""
    counts = np.bincount(np.asarray(users, dtype=np.int64))
    if counts.size and counts.max() > m:
        worst = int(np.argmax(counts))
        raise ValueError(
            f"user index {worst} has {int(counts.max())} samples but max_samples_per_user is {m}: "
            "cap them with cap_samples_per_user first"
        )


def check_distinct_user_items(users: IntArray, items: IntArray) -> None:
    """One-hot sensitivities assume each (user, item) pair occurs at most once."""
    users = np.asarray(users, np.int64)
    items = np.asarray(items, np.int64)
    if users.size == 0:
        return
    key = np.sort(users * (int(items.max()) + 1) + items)  # O(N) int64, no (N, 2) unique
    n_dup = int(np.count_nonzero(key[1:] == key[:-1]))
    if n_dup:
        raise ValueError(
            f"{n_dup} duplicate (user, item) pairs: keep one rating per "
            "user and item before private training"
        )


# -- clipped U-step statistics (Eq. 7–8 without noise) ------------------------------------------------
def clipped_u_step_statistics(
    X: FloatArray | None,
    y: FloatArray,
    xb: FloatArray,
    users: IntArray,
    W: FloatArray,
    bounds: ClipBounds,
    *,
    F: FloatArray | None = None,
    items: IntArray | None = None,
) -> tuple[FloatArray, FloatArray]:
    """A (d·r × d·r) and V (d × r) of Eq. 7–8 over the given samples (already capped to m per user),
    before noise and before the 1/(mt) scaling (a constant that does not change the solution).

    ``xb[j]`` is ⟨x_j, b_{u_j}⟩ (clipped here to A3); ``W`` is (n_users, r) (rows clipped to A_w).
    The covariates are the rows of ``X`` (N, d), or ``F[items]`` (public item features, gathered
    a block of samples at a time: never all N × d·r at once). Blocks of samples of at most
    ``engine.steps.sample_budget(d·r)`` rows; the sums are additive over blocks."""
    from lrs_rec.engine.steps import sample_budget

    check_samples_per_user(users, bounds.max_samples_per_user)
    if (X is None) == (F is None or items is None):
        raise ValueError("give the covariates X, or the item features F and the items")
    users = np.asarray(users, dtype=np.int64)
    t = clip_scalar(y, bounds.A2) - clip_scalar(xb, bounds.A3)
    Wall = clip_rows(W, bounds.A_w)
    d = (X if X is not None else F).shape[1]  # type: ignore[union-attr]
    r = Wall.shape[1]
    A = np.zeros((d * r, d * r))
    V = np.zeros(d * r)
    step = sample_budget(2 * d * r)
    for lo in range(0, users.size, step):
        sl = slice(lo, lo + step)
        rows = X[sl] if X is not None else F[np.asarray(items)[sl]]  # type: ignore[index]
        Xc = clip_rows(rows, bounds.A1)
        Wc = Wall[users[sl]]
        Z = (Xc[:, :, None] * Wc[:, None, :]).reshape(-1, d * r)  # rows x̂_j ⊗ ŵ_{u_j}
        A += Z.T @ Z
        V += Z.T @ t[sl]
    return np.asarray(A, dtype=np.float64), np.asarray(V.reshape(d, r), dtype=np.float64)


def user_contribution_reference(
    X: FloatArray, y: FloatArray, xb: FloatArray, w: FloatArray, bounds: ClipBounds
) -> tuple[FloatArray, FloatArray]:
    """Slow, obvious twin: one user's (A_u, V_u) exactly as Eq. 7–8 write them (row-major vec)."""
    Xc = clip_rows_reference(np.atleast_2d(X), bounds.A1)
    wc = clip_rows_reference(np.asarray(w, dtype=np.float64)[None, :], bounds.A_w)[0]
    d, r = Xc.shape[1], wc.shape[0]
    S = np.zeros((d, d))
    V = np.zeros((d, r))
    for j in range(Xc.shape[0]):
        S += np.outer(Xc[j], Xc[j])
        yj = min(max(float(y[j]), -bounds.A2), bounds.A2)
        cj = min(max(float(xb[j]), -bounds.A3), bounds.A3)
        V += np.outer(Xc[j], wc) * (yj - cj)
    return np.asarray(np.kron(S, np.outer(wc, wc)), dtype=np.float64), V


def clipped_item_block_statistics(
    items: IntArray,
    y: FloatArray,
    xb: FloatArray,
    users: IntArray,
    W: FloatArray,
    n_items: int,
    bounds: ClipBounds,
    *,
    with_gram: bool = True,
) -> tuple[FloatArray, FloatArray]:
    """Eq. 7–8 for one-hot item covariates: the r×r diagonal blocks A_i = Σ_{u rated i} ŵ_u ŵ_uᵀ,
    shape (n_items, r, r), and the rows V_i = Σ_{u rated i} (ŷ_ui − ĉ_ui) ŵ_u, shape (n_items, r).
    All off-diagonal blocks of A are structurally zero whatever the data. ``with_gram=False``
    computes V only (A is returned as zeros)."""
    from lrs_rec.engine.grouped import grouped_sum
    from lrs_rec.engine.steps import sample_budget

    items = np.asarray(items, dtype=np.int64)
    users = np.asarray(users, dtype=np.int64)
    check_samples_per_user(users, bounds.max_samples_per_user)
    check_distinct_user_items(users, items)
    Wall = clip_rows(W, bounds.A_w)
    t = clip_scalar(y, bounds.A2) - clip_scalar(xb, bounds.A3)
    r = Wall.shape[1]
    A = np.zeros((n_items, r * r))
    V = np.zeros((n_items, r))
    step = sample_budget(2 * (r * r + r))  # blocks of samples: never all N × r² at once
    for lo in range(0, users.size, step):
        sl = slice(lo, lo + step)
        Wc = Wall[users[sl]]
        if with_gram:
            outer = (Wc[:, :, None] * Wc[:, None, :]).reshape(-1, r * r)
            A += grouped_sum(items[sl], n_items, outer)
        V += grouped_sum(items[sl], n_items, Wc * t[sl, None])
    return A.reshape(n_items, r, r), V


def item_sum_statistics(
    items: IntArray,
    residual: FloatArray,
    users: IntArray,
    n_items: int,
    *,
    A2: float,
    max_samples_per_user: int,
    user_norm_bound: float | None = None,
) -> tuple[FloatArray, FloatArray]:
    """Per-item sums S_i = Σ_u s_u·clip(res_ui, A2) and weighted counts N_i = Σ_u s_u over the users who
    rated i, with s_u = min(1, √(m/n_u), C/‖clip(res_u, A2)‖₂) (C = ``user_norm_bound``, optional); see
    :func:`item_sum_sensitivities`. Items must be distinct per user."""
    users = np.asarray(users, dtype=np.int64)
    items = np.asarray(items, dtype=np.int64)
    check_distinct_user_items(users, items)
    res = clip_scalar(residual, A2)
    n_u = np.bincount(users)
    s = user_weights(n_u, max_samples_per_user)
    if user_norm_bound is not None:
        norms = np.sqrt(np.bincount(users, weights=res * res, minlength=n_u.size))
        ratio = np.full(norms.shape, np.inf)
        np.divide(user_norm_bound, norms, out=ratio, where=norms > user_norm_bound)
        s = np.minimum(s, np.minimum(ratio, 1.0))
    su = s[users]
    S = np.bincount(items, weights=su * res, minlength=n_items)
    N = np.bincount(items, weights=su, minlength=n_items)
    return np.asarray(S, dtype=np.float64), np.asarray(N, dtype=np.float64)


# -- Gaussian noise ------------------------------------------------------------------------------------
def gaussian_noise(
    shape: tuple[int, ...], *, sensitivity: float, noise_multiplier: float, rng: np.random.Generator
) -> FloatArray:
    """i.i.d. N(0, (z·Δ)²) noise; z = ``noise_multiplier`` = noise std / L2 sensitivity."""
    _check_nonnegative(sensitivity=sensitivity, noise_multiplier=noise_multiplier)
    return np.asarray(rng.normal(0.0, noise_multiplier * sensitivity, size=shape), dtype=np.float64)


def symmetric_gaussian_noise(
    n: int, *, sensitivity: float, noise_multiplier: float, rng: np.random.Generator, batch: int = 0
) -> FloatArray:
    """Symmetric (n × n) noise (or (batch, n, n) when batch > 0): i.i.d. N(0, (z·Δ)²) on the upper
    triangle incl. the diagonal, mirrored below (N1 of Eq. 7)."""
    shape = (batch, n, n) if batch else (n, n)
    G = gaussian_noise(shape, sensitivity=sensitivity, noise_multiplier=noise_multiplier, rng=rng)
    upper = np.triu(G)
    return np.asarray(upper + np.swapaxes(np.triu(G, 1), -1, -2), dtype=np.float64)


# -- solving the (noisy) U-step ------------------------------------------------------------------------
def psd_project(A: FloatArray) -> FloatArray:
    """Nearest PSD matrix (eigenvalues clipped at 0) of a symmetric matrix or a batch of them."""
    A = 0.5 * (A + np.swapaxes(A, -1, -2))
    vals, vecs = np.linalg.eigh(A)
    return np.asarray((vecs * np.maximum(vals, 0.0)[..., None, :]) @ np.swapaxes(vecs, -1, -2))


def solve_kron_u_step(
    A: FloatArray, V: FloatArray, *, ridge: float, orthonormalize: bool = True
) -> FloatArray:
    """U (d, r) from vec(U) = (PSD(A) + ridge·I)⁻¹ vec(V) (row-major vec), then QR (Alg. 1)."""
    _check_positive(ridge=ridge)
    d, r = V.shape
    M = psd_project(A) + ridge * np.eye(d * r)
    U = np.asarray(np.linalg.solve(M, V.reshape(d * r)).reshape(d, r), dtype=np.float64)
    return orthonormalize_qr(U)[0] if orthonormalize else np.asarray(U, dtype=np.float64)


def solve_item_blocks(
    A_blocks: FloatArray, V: FloatArray, *, ridge: float, orthonormalize: bool = False
) -> FloatArray:
    """Row i of U from the r×r block system (PSD(A_i) + ridge·I) U_i = V_i (block-diagonal Eq. 5)."""
    _check_positive(ridge=ridge)
    r = V.shape[1]
    M = psd_project(A_blocks) + ridge * np.eye(r)[None]
    U = np.asarray(np.linalg.solve(M, V[:, :, None])[:, :, 0], dtype=np.float64)
    return orthonormalize_qr(U)[0] if orthonormalize else np.asarray(U, dtype=np.float64)


def dp_u_step(
    A: FloatArray,
    V: FloatArray,
    *,
    sensitivity_A: float,
    sensitivity_V: float,
    noise_multiplier_A: float,
    noise_multiplier_V: float,
    ridge: float,
    rng: np.random.Generator,
) -> FloatArray:
    """Private U-step (Eq. 7–8): Ã = A + N1, Ṽ = V + N2, then U from the ridge solve and QR.
    Releases (Ã, Ṽ) once: two Gaussian mechanisms for the ledger."""
    D = A.shape[0]
    A_noisy = A + symmetric_gaussian_noise(
        D, sensitivity=sensitivity_A, noise_multiplier=noise_multiplier_A, rng=rng
    )
    V_noisy = V + gaussian_noise(
        V.shape, sensitivity=sensitivity_V, noise_multiplier=noise_multiplier_V, rng=rng
    )
    return solve_kron_u_step(A_noisy, V_noisy, ridge=ridge)


def dp_item_block_u_step(
    A_blocks: FloatArray,
    V: FloatArray,
    *,
    sensitivity_A: float,
    sensitivity_V: float,
    noise_multiplier_A: float,
    noise_multiplier_V: float,
    ridge: float,
    rng: np.random.Generator,
) -> FloatArray:
    """Private U-step for one-hot item covariates: noise only the data-dependent r×r diagonal blocks
    of A and the rows of V, then per-item ridge solves (private ALS)."""
    n_items, r, _ = A_blocks.shape
    A_noisy = A_blocks + symmetric_gaussian_noise(
        r, sensitivity=sensitivity_A, noise_multiplier=noise_multiplier_A, rng=rng, batch=n_items
    )
    V_noisy = V + gaussian_noise(
        V.shape, sensitivity=sensitivity_V, noise_multiplier=noise_multiplier_V, rng=rng
    )
    return solve_item_blocks(A_noisy, V_noisy, ridge=ridge)


def _check_positive(**values: float) -> None:
    for name, v in values.items():
        if not (math.isfinite(v) and v > 0):
            raise ValueError(f"{name} must be a positive finite number, got {v!r}")


def _check_nonnegative(**values: float) -> None:
    for name, v in values.items():
        if not (math.isfinite(v) and v >= 0):
            raise ValueError(f"{name} must be a non-negative finite number, got {v!r}")


# -- one-hot U-step with the population Gram (per-item counts × one global second moment) ------------
def capped_item_counts(items: IntArray, n_items: int) -> FloatArray:
    """a_i: how many of the capped samples rate item i. One user (≤ m distinct items) changes
    this vector by at most √m in L2 (:func:`population_gram_sensitivities`)."""
    return np.asarray(np.bincount(np.asarray(items, np.int64), minlength=n_items), np.float64)


def clipped_second_moment(users: IntArray, W: FloatArray, bounds: ClipBounds) -> FloatArray:
    """Σ_j ŵ_{u_j} ŵ_{u_j}ᵀ over the capped samples (r × r): one user's term n_u·ŵ_uŵ_uᵀ has
    Frobenius norm ≤ m·A_w²."""
    users = np.asarray(users, dtype=np.int64)
    check_samples_per_user(users, bounds.max_samples_per_user)
    Wc = clip_rows(W, bounds.A_w)
    n_u = np.bincount(users, minlength=Wc.shape[0]).astype(np.float64)
    return np.asarray((Wc * n_u[:, None]).T @ Wc, dtype=np.float64)


def population_gram_sensitivities(bounds: ClipBounds) -> tuple[float, float]:
    """(Δ_count, Δ_M) of :func:`capped_item_counts` (distinct items) and
    :func:`clipped_second_moment`: √m and m·A_w²."""
    m = float(bounds.max_samples_per_user)
    return math.sqrt(m), m * bounds.A_w**2


def solve_item_population(
    V: FloatArray, counts: FloatArray, M: FloatArray, *, ridge: float
) -> FloatArray:
    """Row i of U from (max(a_i, 0)·M̂ + ridge·I) U_i = V_i, with M̂ = PSD(M) the per-sample second
    moment of ŵ: the block-diagonal Eq. 5 with each item's Gram Σ_{u rated i} ŵ_uŵ_uᵀ replaced by
    its population value a_i·M̂ (post-processing of released a and M; exact when the raters of an
    item are a random sample of the users). One eigendecomposition of M̂, no per-item solve."""
    _check_positive(ridge=ridge)
    lam, Q = np.linalg.eigh(0.5 * (M + M.T))
    lam = np.maximum(lam, 0.0)
    a = np.maximum(np.asarray(counts, np.float64), 0.0)
    coef = (V @ Q) / (a[:, None] * lam[None, :] + ridge)
    return np.asarray(coef @ Q.T, dtype=np.float64)
