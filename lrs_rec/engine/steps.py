"""Regularised AMHT-LRS steps on rating data (paper Sec. 2.1, Algorithm 1), with biases.

Model of a rating (the reference prediction of :class:`training.model_dir.TrainedModel`)::

    r̂(u, i) = μ + c_u + c_i + ⟨f_i, θ_u⟩,   θ_u = U·w_u + b_u,   ‖b_u‖₀ ≤ k

Real rating data is noisy and very uneven (many users have fewer ratings than d), so every least-squares
problem of Algorithm 1 is solved as a ridge problem:

* user step (Eq. 4 then Eq. 3): ``(c_u, w_u)`` by ridge with ``w_u`` shrunk towards the population
  Gaussian prior N(w̄, Σ_w) (mean and trace-normalised covariance of all users' w; strength λ_w), then ``b_u`` by one hard-thresholding-pursuit step: the ridge solution over
  all d coordinates, keep its top-k support (``lrs_rec.thresholding.top_k_indices``, the HT of
  Algorithm 2), refit on that support (λ_b). Two inner rounds.
* U step (Eq. 5, only when item features are fixed, e.g. plug-in mode): least squares in vec(U), then QR.
* item step (alternating refinement of the features): ``(c_i, f_i)`` by ridge given all users' θ_u —
  still learned from the training ratings only.

All per-user / per-item problems are solved together from their Gram matrices (batched solves).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lrs_rec.engine import parallel
from lrs_rec.engine.b_rows import add_b, b_dot, gram_b, with_width, zero_b
from lrs_rec.engine.grouped import grouped_gram, grouped_sum
from lrs_rec.engine.parallel import block_map
from lrs_rec.engine.sparse_b import SparseB, sparse_b_step
from lrs_rec.engine.u_solve import cg_u_solve, joint_block, orthonormalize, refit_b
from lrs_rec.engine.user_rows import dense_b
from lrs_rec.thresholding import ridge_top_k_refit


@dataclass
class Samples:
    """Dense-index rating samples."""

    users: np.ndarray
    items: np.ndarray
    ratings: np.ndarray
    # fixed features, μ and item biases only (the paper setting): the per-user statistics (Grams
    # Σ f_i f_iᵀ, Σ f_i t, ...) of each user block, kept across steps and iterations, keyed by the
    # block (lo, hi) and the identity of F / the item biases; None: recomputed every time
    gram_cache: dict[tuple[Any, ...], Any] | None = None
    gram_key: tuple[int, int] | None = None
    # the compiled kernels' CSR layouts (Samples.csr), built once
    _csr: dict[tuple[Any, ...], tuple[np.ndarray, np.ndarray, np.ndarray]] = field(
        default_factory=dict, repr=False, compare=False
    )

    def __len__(self) -> int:
        return int(self.ratings.shape[0])

    def csr(self, by: str, n_keys: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The samples sorted once by user (``by="user"``) or by item: (indptr (n_keys + 1,) int64,
        the other side's indices int32, the ratings float64), by the other index within a key; cached for as
        long as the arrays are the same objects (the compiled kernels read this layout).

        Samples already in that order (:meth:`in_order`; the trainer keeps its samples sorted by
        user, then item) give their own arrays: no copy, when they are int32 / float64 already."""
        key_arr, other = (self.users, self.items) if by == "user" else (self.items, self.users)
        tag = (by, n_keys, id(self.users), id(self.items), id(self.ratings))
        hit = self._csr.get(tag)
        if hit is not None:
            return hit
        for old in [t for t in self._csr if t[2:] != tag[2:]]:  # arrays replaced since
            del self._csr[old]
        indptr = np.zeros(n_keys + 1, dtype=np.int64)
        np.cumsum(np.bincount(key_arr, minlength=n_keys), out=indptr[1:])
        if self.in_order(by):
            out = (indptr, _i32(other), _f64(self.ratings))
        else:
            # by key, then by the other side's index (neighbouring rows read neighbouring memory): one
            # stable sort of key·n_other + other, the order of np.lexsort((other, key)) (ties keep
            # their order); much faster on ratings already grouped by user (runs for timsort)
            n_other = int(other.max()) + 1 if other.size else 1
            K = parallel.kernels()
            if K is not None:  # the same order by two counting sorts
                order = K.lex_order(key_arr, n_keys, other, n_other)
            else:
                order = np.argsort(key_arr.astype(np.int64) * n_other + other, kind="stable")
            out = (
                indptr,
                np.ascontiguousarray(other[order], dtype=np.int32),
                np.ascontiguousarray(self.ratings[order], dtype=np.float64),
            )
        self._csr[tag] = out
        return out

    def in_order(self, by: str = "user") -> bool:
        """Whether the samples are sorted by user (``by="user"``) or item, then by the other index
        (checked in chunks of :data:`ROW_CHUNK`, no full-length temporaries)."""
        key_arr, other = (self.users, self.items) if by == "user" else (self.items, self.users)
        n = key_arr.shape[0]
        for a in range(0, max(n - 1, 0), ROW_CHUNK):
            b = min(n, a + ROW_CHUNK + 1)
            k, o = key_arr[a:b], other[a:b]
            same = k[1:] == k[:-1]
            if (k[1:] < k[:-1]).any() or (o[1:][same] < o[:-1][same]).any():
                return False
        return True


@dataclass
class LRSState:
    """The current iterate of the alternating minimisation (mutable, owned by the training loop).

    b_u is stored k-sparse (``lrs_rec.engine.b_rows``): ``B_idx`` (n_users, k) coordinates, distinct
    within a row, and ``B_val`` their values (0.0 pads rows with fewer non-zeros); width 0 is B = 0.
    There is no dense (n_users, d) B: :meth:`dense_b` is the slow twin for tests."""

    global_mean: float
    user_bias: np.ndarray  # (n_users,)
    item_bias: np.ndarray  # (n_items,)
    F: np.ndarray  # (n_items, d) item features
    U: np.ndarray  # (d, r) orthonormal
    W: np.ndarray  # (n_users, r)
    B_idx: np.ndarray  # (n_users, k) int32 (int64 accepted) coordinates of b_u
    B_val: np.ndarray  # (n_users, k) their values
    gamma: np.ndarray | None = None  # (n_users,) Algorithm 2's γ per user (b_step "iht")

    @property
    def support(self) -> np.ndarray:
        """The supports S_u of b_u (the paper b-step's; sorted there): ``B_idx``."""
        return self.B_idx

    @property
    def k(self) -> int:
        return int(self.B_idx.shape[1])

    def dense_b(self) -> np.ndarray:
        """B as a dense (n_users, d) array (tests and small data only)."""
        return dense_b(self.B_idx.astype(np.int64), self.B_val, self.F.shape[1])

    def theta(self) -> np.ndarray:
        """Θ = W Uᵀ + B (n_users × d), one array (B added in place, no second temporary)."""
        out = np.asarray(self.W @ self.U.T)
        if out.dtype != np.result_type(out, self.B_val):
            out = out.astype(np.result_type(out, self.B_val))
        return add_b(out, self.B_idx, self.B_val)

    def theta_of(self, users: np.ndarray) -> np.ndarray:
        """θ_u of the given users (one row per entry of ``users``)."""
        out = np.asarray(self.W[users] @ self.U.T)
        if out.dtype != np.result_type(out, self.B_val):
            out = out.astype(np.result_type(out, self.B_val))
        return add_b(out, self.B_idx[users], self.B_val[users])

    def predict(self, users: np.ndarray, items: np.ndarray, lo: float, hi: float) -> np.ndarray:
        """The same formula as ``TrainedModel.predict`` on known users/items (used for losses).
        Row chunks of :data:`ROW_CHUNK` (no per-rating d-vectors for all ratings at once)."""
        K = parallel.kernels()
        if K is not None:
            return np.asarray(np.clip(self._predict_fast(K, users, items), lo, hi))
        out = np.empty(users.shape[0])
        for a in range(0, users.shape[0], ROW_CHUNK):
            u, i = users[a : a + ROW_CHUNK], items[a : a + ROW_CHUNK]
            theta = self.theta_of(u)
            out[a : a + ROW_CHUNK] = (
                self.global_mean
                + self.user_bias[u]
                + self.item_bias[i]
                + np.einsum("nd,nd->n", self.F[i], theta)
            )
        return np.asarray(np.clip(out, lo, hi))

    def _predict_fast(self, K: Any, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        """Unclipped predictions with the compiled ⟨f_i, θ_u⟩ (:func:`rating_dots`)."""
        dots = rating_dots(K, self, users, items)
        return np.asarray(self.global_mean + self.user_bias[users] + self.item_bias[items] + dots)

    def theta_rows(self, lo: int, hi: int) -> np.ndarray:
        """θ_u of users lo..hi-1 (rows of :meth:`theta`)."""
        out = np.asarray(self.W[lo:hi] @ self.U.T)
        if out.dtype != np.result_type(out, self.B_val):
            out = out.astype(np.result_type(out, self.B_val))
        return add_b(out, self.B_idx[lo:hi], self.B_val[lo:hi])

    def set_b(self, idx: np.ndarray, val: np.ndarray) -> None:
        self.B_idx, self.B_val = idx, val

    def ensure_b_width(self, k: int) -> None:
        """B at width k (see :func:`lrs_rec.engine.b_rows.with_width`)."""
        self.B_idx, self.B_val = with_width(self.B_idx, self.B_val, k, self.F.shape[1])


def rating_dots(K: Any, state: LRSState, users: np.ndarray, items: np.ndarray) -> np.ndarray:
    """⟨f_i, θ_u⟩ per sample with the compiled kernel, in chunks of :data:`ROW_CHUNK` samples. A
    chunk whose users span at most ROW_CHUNK indices (samples sorted by user: the trainer's) gets
    θ of that user range only; otherwise θ of all users is computed once (n_users × d)."""
    n = users.shape[0]
    out = np.empty(n)
    F = _f64(state.F)
    full: np.ndarray | None = None
    for a in range(0, n, ROW_CHUNK):
        u, i = users[a : a + ROW_CHUNK], items[a : a + ROW_CHUNK]
        lo, hi = int(u.min()), int(u.max()) + 1
        if hi - lo <= ROW_CHUNK:
            theta, u = _f64(state.theta_rows(lo, hi)), u - lo
        else:
            if full is None:
                full = _f64(state.theta())
            theta = full
        K.rating_dots(_i32(u), _i32(i), theta, F, out[a : a + ROW_CHUNK])
    return out


def _f64(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float64)


def _i32(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.int32)


@dataclass(frozen=True)
class StepParams:
    """What the user step fits, per method."""

    k: int  # sparsity of b_u (0: no sparse part)
    per_user_w: bool  # False: one shared w for all users (single / prompt)
    user_bias: bool  # False: c_u = 0 (single)
    reg_w: float
    reg_b: float
    reg_bias: float
    population_prior: bool = True  # shape the ridge on w_u by the population covariance Σ_w
    conditional_prior: bool = True  # prior mean of w_u conditioned on which items u rated
    n_inner: int = 2
    # the paper setting (lrs_rec.amht.AMHTLRS): b_step "htp" / "iht" (Eq. 3 by lrs_rec.engine.sparse_b,
    # then the w-step, Eq. 4) or "fixed" (the w-step alone); "ridge" is the trainer's b-step
    b_step: str = "ridge"
    sparse: SparseB = field(default_factory=SparseB)
    w_prior_mean: bool = True  # False: the ridge on w_u shrinks towards 0 (the paper's Eq. 4)
    jitter: float = 0.0  # relative diagonal jitter of the w solve (the paper's exact least squares)


def population_precision(W: np.ndarray) -> np.ndarray:
    """Shape of the Gaussian prior on w_u: Σ̃⁻¹ with Σ̃ = cov(W) / mean(diag cov(W)) (trace-normalised,
    so λ_w keeps its scale). The ridge term λ_w (w - w̄)ᵀ Σ̃⁻¹ (w - w̄) is a MAP estimate under
    w_u ~ N(w̄, Σ_w / λ_w'), the same population prior onboarding uses. Identity when there are too few
    users to estimate Σ_w."""
    return _precision_from_moments(float(W.shape[0]), W.sum(axis=0), W.T @ W)


def _precision_from_moments(n: float, sw: np.ndarray, sww: np.ndarray) -> np.ndarray:
    r = sw.shape[0]
    if n <= r:
        return np.eye(r)
    mean = sw / n
    return precision_shape(sww / n - np.outer(mean, mean))


def precision_shape(cov: np.ndarray) -> np.ndarray:
    """The prior's precision shape from a covariance: (cov / its mean diagonal + 1e-6·I)⁻¹ (the
    overall level is reg_w's); the identity for a covariance without a positive finite diagonal."""
    r = cov.shape[0]
    cov = (cov + cov.T) / 2
    scale = float(np.mean(np.diag(cov)))
    if not np.isfinite(scale) or scale <= 0:
        return np.eye(r)
    cov = cov / scale + 1e-6 * np.eye(r)
    return np.asarray(np.linalg.inv(cov))


@dataclass(frozen=True)
class PriorStatistics:
    """Sums over users behind the population prior on w_u — additive, so user blocks (or the
    partitions of a distributed run) each compute theirs and the sum is reduced: n users, Σw, Σwwᵀ,
    and for the conditional prior Σz, Σzzᵀ, Σzwᵀ with z_u = Uᵀ(mean of u's rated items' f_i)."""

    n: float
    sw: np.ndarray  # (r,)
    sww: np.ndarray  # (r, r)
    sz: np.ndarray  # (r,)
    szz: np.ndarray  # (r, r)
    szw: np.ndarray  # (r, r)

    def __add__(self, other: PriorStatistics) -> PriorStatistics:
        return PriorStatistics(
            self.n + other.n,
            self.sw + other.sw,
            self.sww + other.sww,
            self.sz + other.sz,
            self.szz + other.szz,
            self.szw + other.szw,
        )


def prior_statistics(
    state: LRSState, data: Samples, *, block: int | None = None
) -> PriorStatistics:
    """:class:`PriorStatistics` of the users of ``state`` (their ratings in ``data``), blockwise."""
    n_users, r = state.W.shape
    sz, szz, szw = np.zeros(r), np.zeros((r, r)), np.zeros((r, r))
    K = parallel.kernels()
    if K is not None:  # z_u from the user CSR, compiled; the sums in user-block order
        indptr, items, _ = data.csr("user", n_users)
        F, U = _f64(state.F), _f64(state.U)
        size = block or user_block_size(r)
        for lo in range(0, n_users, size):
            hi = min(n_users, lo + size)
            Z = np.empty((hi - lo, r))
            K.user_projected_means(indptr[lo : hi + 1], items, F, U, Z)
            sz += Z.sum(axis=0)
            szz += Z.T @ Z
            szw += Z.T @ state.W[lo:hi]
        return PriorStatistics(
            float(n_users), state.W.sum(axis=0), state.W.T @ state.W, sz, szz, szw
        )
    for lo, hi, sub in _user_blocks(data, n_users, block or user_block_size(state.F.shape[1])):
        s, n = _feature_sums(state, sub, hi - lo)
        Z = (s @ state.U) / np.maximum(n, 1.0)[:, None]
        sz += Z.sum(axis=0)
        szz += Z.T @ Z
        szw += Z.T @ state.W[lo:hi]
    return PriorStatistics(float(n_users), state.W.sum(axis=0), state.W.T @ state.W, sz, szz, szw)


@dataclass(frozen=True)
class UserPrior:
    """The prior on w_u of the user step: N(m_u, Σ̃ / λ_w) with precision shape ``prec`` (Σ̃⁻¹,
    :func:`population_precision`) and mean m_u = w̄ + (z_u - z̄) A: conditioned on *which* items u
    rated (implicit feedback), A (r × r) the ridge regression of the current W on z (ridge relative to
    its curvature). ``A`` is None without the conditional prior (m_u = w̄). Only the training step
    uses the conditional mean; the stored w_u already contain its effect."""

    w_bar: np.ndarray  # (r,)
    prec: np.ndarray  # (r, r)
    z_bar: np.ndarray | None = None  # (r,)
    A: np.ndarray | None = None  # (r, r)

    @classmethod
    def from_statistics(
        cls,
        st: PriorStatistics,
        *,
        population_prior: bool,
        conditional_prior: bool,
        ridge: float = 1e-3,
    ) -> UserPrior:
        r = st.sw.shape[0]
        n = max(st.n, 1.0)
        w_bar = st.sw / n
        prec = _precision_from_moments(st.n, st.sw, st.sww) if population_prior else np.eye(r)
        if not conditional_prior:
            return cls(w_bar, prec)
        z_bar = st.sz / n
        G = st.szz - n * np.outer(z_bar, z_bar)  # Σ (z - z̄)(z - z̄)ᵀ
        C = st.szw - n * np.outer(z_bar, w_bar)  # Σ (z - z̄)(w - w̄)ᵀ
        lam = ridge * max(float(np.trace(G)) / r, 1e-12)
        return cls(w_bar, prec, z_bar, np.linalg.solve(G + lam * np.eye(r), C))

    def means(self, SU: np.ndarray, n: np.ndarray) -> np.ndarray:
        """Prior means of users whose rated items' features sum to ``SU`` (after projection by U:
        (users, r)) over ``n`` ratings each."""
        if self.A is None or self.z_bar is None:
            return np.broadcast_to(self.w_bar, SU.shape)
        Z = SU / np.maximum(n, 1.0)[:, None]
        return np.asarray(self.w_bar + (Z - self.z_bar) @ self.A)


def user_prior(
    state: LRSState, data: Samples, p: StepParams, *, block: int | None = None
) -> UserPrior:
    """The prior of the user step estimated from ``state``'s own users (one partition)."""
    if not (p.population_prior or p.conditional_prior or p.w_prior_mean):
        r = state.W.shape[1]
        return UserPrior(np.zeros(r), np.eye(r))  # the paper's Eq. 4: a plain ridge towards 0
    return UserPrior.from_statistics(
        prior_statistics(state, data, block=block),
        population_prior=p.population_prior,
        conditional_prior=p.conditional_prior,
    )


def _feature_sums(state: LRSState, sub: Samples, n_users: int) -> tuple[np.ndarray, np.ndarray]:
    """Per user of a block: Σ f_i over the rated items (n_users × d) and the rating counts."""
    s = grouped_sum(sub.users, n_users, state.F[sub.items])
    return s, np.bincount(sub.users, minlength=n_users).astype(float)


@dataclass
class _UserStats:
    """Sufficient statistics of every user's least-squares problem: XᵀX, Xᵀt, Σx, n, Σt."""

    G: np.ndarray  # (n_users, d, d)
    h: np.ndarray  # (n_users, d)
    s: np.ndarray  # (n_users, d)
    n: np.ndarray  # (n_users,)
    T: np.ndarray  # (n_users,)


def _user_stats(state: LRSState, data: Samples, n_users: int) -> _UserStats:
    cache, key = data.gram_cache, data.gram_key
    if cache is not None and key is not None:
        # fixed features, μ and item biases (the paper setting): the statistics never change
        full_key = (*key, id(state.F), id(state.item_bias), float(state.global_mean))
        hit = cache.get(full_key)
        if hit is None:
            hit = cache[full_key] = _compute_user_stats(state, data, n_users)
        return hit
    return _compute_user_stats(state, data, n_users)


def _compute_user_stats(state: LRSState, data: Samples, n_users: int) -> _UserStats:
    X = state.F[data.items]
    t = data.ratings - state.global_mean - state.item_bias[data.items]
    return _UserStats(
        G=grouped_gram(data.users, n_users, X),
        h=grouped_sum(data.users, n_users, X * t[:, None]),
        s=grouped_sum(data.users, n_users, X),
        n=np.bincount(data.users, minlength=n_users).astype(float),
        T=np.bincount(data.users, t, minlength=n_users),
    )


BLOCK_FLOATS = 1 << 23  # Gram storage per block of users (~64 MB), instead of O(n_users · d²)
ROW_CHUNK = 1 << 20  # ratings per chunk where every rating needs a d-vector (losses, residuals)


def user_block_size(d: int) -> int:
    """Users per block of the user / U steps: their d × d Grams take about BLOCK_FLOATS floats."""
    return max(16, BLOCK_FLOATS // max(1, d * d))


def key_blocks(
    keys: np.ndarray, n_keys: int, block: int, max_samples: int | None = None
) -> Iterator[tuple[int, int, np.ndarray]]:
    """(lo, hi, indices of the samples whose key is in lo..hi-1) for consecutive key blocks of at
    most ``block`` keys and (when given) at most ``max_samples`` samples — a key with more samples
    than that is a block of its own. Within a key the samples keep their order."""
    order = np.argsort(keys, kind="stable")
    bounds = np.searchsorted(keys[order], np.arange(n_keys + 1))
    lo = 0
    while lo < n_keys:
        hi = min(n_keys, lo + block)
        if max_samples is not None:  # the last key whose samples still fit, at least one key
            fit = int(np.searchsorted(bounds, bounds[lo] + max_samples, side="right")) - 1
            hi = max(lo + 1, min(hi, fit))
        yield lo, hi, order[bounds[lo] : bounds[hi]]
        lo = hi


def sample_budget(width: int) -> int:
    """Samples per block when each sample carries ``width`` floats: about BLOCK_FLOATS floats."""
    return max(1, BLOCK_FLOATS // max(1, width))


def _user_blocks(data: Samples, n_users: int, block: int) -> Iterator[tuple[int, int, Samples]]:
    """(lo, hi, the samples of users lo..hi-1 with user indices shifted to start at 0)."""
    for lo, hi, sl in key_blocks(data.users, n_users, block):
        sub = Samples(data.users[sl] - lo, data.items[sl], data.ratings[sl])
        if data.gram_cache is not None:
            sub.gram_cache, sub.gram_key = data.gram_cache, (lo, hi)
        yield lo, hi, sub


def user_step(
    state: LRSState,
    data: Samples,
    p: StepParams,
    *,
    prior: UserPrior | None = None,
    block: int | None = None,
) -> None:
    """Update c_u, w_u, b_u of every user of ``state`` given U and the item features (Eq. 4 and Eq. 3).

    ``prior``: the population prior on w_u. Default: estimated from ``state``'s own users
    (:func:`user_prior`); a partitioned run (Dask) passes the one reduced over every partition, so
    that each partition's step is this same function on its own users."""
    if not p.per_user_w:
        _pooled_user_step(state, data, p)
        return
    n_users = state.W.shape[0]
    if prior is None:
        prior = user_prior(state, data, p, block=block)
    state.ensure_b_width(p.k)
    sparse_b_step(state, data, p, block=block)  # the paper's b-step (a no-op for the trainer's)
    K = parallel.kernels()
    # the trainer's user step (the paper's b-steps, a jitter or an unregularised b-ridge: numpy)
    if K is not None and p.b_step == "ridge" and not p.jitter and p.n_inner >= 1 and p.reg_b > 0:
        _user_step_fast(K, state, data, p, prior)
        return
    size = block or user_block_size(state.F.shape[1])

    def fit_block(blk: tuple[int, int, Samples]) -> tuple[int, int, tuple[np.ndarray, ...]]:
        lo, hi, sub = blk
        st = _user_stats(state, sub, hi - lo)
        means = prior.means(st.s @ state.U, st.n)
        return (
            lo,
            hi,
            _fit_users(
                state.U, st, p, state.W[lo:hi], state.B_idx[lo:hi], state.B_val[lo:hi], means,
                prior.prec,
            ),
        )  # fmt: skip

    # blocks are independent: each reads and writes only its own users' rows
    for lo, hi, (c, W, idx, val) in block_map(fit_block, _user_blocks(data, n_users, size)):
        state.user_bias[lo:hi] = c
        state.W[lo:hi] = W
        state.B_idx[lo:hi] = idx
        state.B_val[lo:hi] = val


def _user_step_fast(
    K: Any, state: LRSState, data: Samples, p: StepParams, prior: UserPrior
) -> None:
    """The user step with the compiled fused per-user kernel (same maths as :func:`_fit_users`),
    straight from the user CSR; writes c_u, w_u, b_u of every user."""
    n_users, r = state.W.shape
    indptr, items, ratings = data.csr("user", n_users)
    # written in place when the state's arrays are C-contiguous float64 (the kernel reads a user's
    # b_u before it overwrites it); otherwise into copies that are then assigned
    W, B_val, c = (_out(a) for a in (state.W, state.B_val, state.user_bias))
    B_idx = _out_i32(state.B_idx)
    z_bar, A_cond = prior.z_bar, prior.A
    conditional = A_cond is not None and z_bar is not None
    F = _f64(state.F)
    K.fit_users(
        indptr,
        items,
        ratings,
        F,
        np.ascontiguousarray(F @ _f64(state.U)),
        _f64(state.item_bias),
        float(state.global_mean),
        _f64(state.U),
        B_idx,
        B_val,
        W,
        c,
        int(p.k),
        bool(p.user_bias),
        float(p.reg_w),
        float(p.reg_b),
        float(p.reg_bias),
        int(p.n_inner),
        _f64(prior.prec),
        _f64(prior.w_bar),
        _f64(z_bar) if z_bar is not None and conditional else np.zeros(r),
        _f64(A_cond) if A_cond is not None and conditional else np.zeros((r, r)),
        conditional,
    )
    for name, arr in (("user_bias", c), ("W", W), ("B_val", B_val)):
        if arr is not getattr(state, name):
            getattr(state, name)[...] = arr
    state.B_idx = B_idx


def _out(a: np.ndarray) -> np.ndarray:
    ok = a.dtype == np.float64 and a.flags.c_contiguous and a.flags.writeable
    return a if ok else np.array(a, dtype=np.float64, order="C")


def _out_i32(a: np.ndarray) -> np.ndarray:
    ok = a.dtype == np.int32 and a.flags.c_contiguous and a.flags.writeable
    return a if ok else np.array(a, dtype=np.int32, order="C")


def _fit_users(
    U: np.ndarray,
    st: _UserStats,
    p: StepParams,
    W: np.ndarray,
    B_idx: np.ndarray,
    B_val: np.ndarray,
    w_prior: np.ndarray,
    prec: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The per-user problems of one block of users, all solved together (batched) → (c, W,
    B_idx, B_val). ``w_prior`` (n, r) holds each user's prior mean of w; b_u as k-sparse pairs."""
    n_users = B_idx.shape[0]
    r = U.shape[1]
    idx, val = B_idx.copy(), B_val.copy()
    c = np.zeros(n_users)
    GU = st.G @ U  # (n, d, r)
    UGU = np.einsum("dr,nds->nrs", U, GU)
    sU = st.s @ U
    for _ in range(p.n_inner):
        Gb = gram_b(st.G, idx, val)  # XᵀX b
        # (c_u, w_u): design [1, X U]; ridge λ_bias on c_u, λ_w (w - w̄)ᵀ Σ̃⁻¹ (w - w̄) on w_u
        A = np.zeros((n_users, r + 1, r + 1))
        A[:, 0, 0] = st.n + (p.reg_bias if p.user_bias else 0.0)
        A[:, 0, 1:] = sU
        A[:, 1:, 0] = sU
        A[:, 1:, 1:] = UGU + p.reg_w * prec[None]
        if p.jitter:
            tr = np.maximum(np.trace(UGU, axis1=1, axis2=2) / r, 1e-30)
            A[:, 1:, 1:] += (p.jitter * tr)[:, None, None] * np.eye(r)[None]
        rhs = np.zeros((n_users, r + 1))
        rhs[:, 0] = st.T - b_dot(st.s, idx, val)
        rhs[:, 1:] = (st.h - Gb) @ U + p.reg_w * (w_prior @ prec)  # prec is symmetric
        if not p.user_bias:
            A[:, 0, :] = 0.0
            A[:, :, 0] = 0.0
            A[:, 0, 0] = 1.0
            rhs[:, 0] = 0.0
        sol = np.linalg.solve(A, rhs[:, :, None])[:, :, 0]
        c, W = sol[:, 0], sol[:, 1:]
        if p.b_step != "ridge":
            continue  # b_u fixed here (the paper's b-step ran before, in sparse_b_step)
        if p.k > 0:
            # b_u: ridge on all d coordinates, hard-threshold to the top k, refit on the support
            xr = st.h - c[:, None] * st.s - np.einsum("uab,ub->ua", GU, W)
            top, val = ridge_top_k_refit(st.G, xr, p.k, p.reg_b)
            idx = top.astype(B_idx.dtype)
        else:
            idx, val = zero_b(n_users, 0)
    return c, W, idx, val


def conditional_prior_means(state: LRSState, data: Samples, *, ridge: float = 1e-3) -> np.ndarray:
    """Every user's prior mean of w (the conditional prior of :class:`UserPrior`), for all users at
    once (n_users × r; used by tests and diagnostics; the user step computes them per block)."""
    n_users = state.W.shape[0]
    prior = UserPrior.from_statistics(
        prior_statistics(state, data), population_prior=False, conditional_prior=True, ridge=ridge
    )
    out = np.empty_like(state.W)
    for lo, hi, sub in _user_blocks(data, n_users, user_block_size(state.F.shape[1])):
        s, n = _feature_sums(state, sub, hi - lo)
        out[lo:hi] = prior.means(s @ state.U, n)
    return out


def _pooled_user_step(state: LRSState, data: Samples, p: StepParams) -> None:
    """single / prompt: one shared w for all users (pooled ridge), then per-user biases given it."""
    n_users = state.W.shape[0]
    U = state.U
    r = U.shape[1]
    X = state.F[data.items]
    t = data.ratings - state.global_mean - state.item_bias[data.items]
    n = np.bincount(data.users, minlength=n_users).astype(float)
    c = state.user_bias if p.user_bias else np.zeros(n_users)
    A1 = U.T @ (X.T @ X) @ U + p.reg_w * np.eye(r)
    w = np.zeros(r)
    for _ in range(p.n_inner):
        w = np.linalg.solve(A1, U.T @ (X.T @ (t - c[data.users])))
        if p.user_bias:
            c = np.bincount(data.users, t - X @ (U @ w), minlength=n_users) / (n + p.reg_bias)
    state.W = np.repeat(w[None, :], n_users, axis=0)
    state.user_bias = np.asarray(c, dtype=np.float64).copy()
    state.set_b(*zero_b(n_users, p.k))


_JointTerms = list[tuple[int, int, tuple[np.ndarray, np.ndarray, np.ndarray]]]


def u_step_statistics(
    state: LRSState,
    data: Samples,
    *,
    block: int | None = None,
    joint_ridge_b: float | None = None,
    joint_active: np.ndarray | None = None,
    jitter: float = 0.0,
    joint_terms: _JointTerms | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The normal equations of Eq. 5 in vec(U) (row-major, index a·r + p) over the users of
    ``state``: A = Σ_u G_u ⊗ w_u w_uᵀ as (d, d, r, r) and rhs = Σ_u (Xᵀ(t - c_u - X b_u)) w_uᵀ as
    (d, r). Additive over user blocks / partitions.

    With ``joint_ridge_b`` (the paper estimator) each b_u is eliminated on ``state.support``
    (variable projection, :func:`lrs_rec.engine.u_solve.joint_block`); the per-block terms that refit
    it afterwards are appended to ``joint_terms``."""
    n_users, d = state.W.shape[0], state.F.shape[1]
    r = state.U.shape[1]
    A = np.zeros((d, d, r, r))
    rhs = np.zeros((d, r))
    for lo, hi, sub in _user_blocks(data, n_users, block or user_block_size(d)):
        st = _user_stats(state, sub, hi - lo)
        W, c = state.W[lo:hi], state.user_bias[lo:hi]
        WW = np.einsum("up,uq->upq", W, W).reshape(hi - lo, r * r)
        A += (st.G.reshape(hi - lo, d * d).T @ WW).reshape(d, d, r, r)
        if joint_ridge_b is None:
            resid = st.h - c[:, None] * st.s - gram_b(st.G, state.B_idx[lo:hi], state.B_val[lo:hi])
        else:
            act = None if joint_active is None else joint_active[lo:hi]
            corr, resid, t = joint_block(
                st.G, st.h - c[:, None] * st.s, state.support[lo:hi], W, joint_ridge_b, jitter, act
            )
            A -= corr
            if joint_terms is not None:
                joint_terms.append((lo, hi, t))
        rhs += resid.T @ W
    return A, rhs


def least_squares_u(
    A: np.ndarray,
    rhs: np.ndarray,
    *,
    ridge: float = 10.0,
    ridge_relative: bool = True,
    jitter: float = 0.0,
) -> np.ndarray:
    """Eq. 5's least squares from its normal equations (A as (d, d, r, r), rhs (d, r)): the
    un-orthonormalised U. The trainer's ridge is relative to the mean curvature
    (``ridge_relative``); the paper setting uses an absolute ``ridge`` plus a relative ``jitter``."""
    d, r = rhs.shape
    M = A.transpose(0, 2, 1, 3).reshape(d * r, d * r)
    if ridge_relative:
        # ridge relative to the mean curvature (its strength does not depend on the data size).
        # Features fitted on the same ratings make an unregularised Eq. 5 overfit badly (u1.base
        # validation RMSE 0.955 at ridge 1e-6 vs 0.912 at 10); QR removes the shrinkage of the scale
        # afterwards
        lam = ridge * max(float(np.trace(M)) / (d * r), 1e-12)
    else:
        lam = ridge + jitter * max(float(np.trace(M)) / (d * r), 1e-30)
    return np.linalg.solve(M + lam * np.eye(d * r), rhs.reshape(d * r)).reshape(d, r)


def solve_u(
    A: np.ndarray,
    rhs: np.ndarray,
    *,
    ridge: float = 10.0,
    ridge_relative: bool = True,
    jitter: float = 0.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Eq. 5 from its normal equations (:func:`least_squares_u`), then QR: (Q, R) with U = QR,
    diag(R) ≥ 0 (so U's column signs are deterministic). The caller sets U = Q and W ← W Rᵀ (Θ
    unchanged by the QR)."""
    U = least_squares_u(A, rhs, ridge=ridge, ridge_relative=ridge_relative, jitter=jitter)
    Q, R = orthonormalize(U)
    return Q, R


def u_step(
    state: LRSState,
    data: Samples,
    *,
    ridge: float = 10.0,
    block: int | None = None,
    ridge_relative: bool = True,
    jitter: float = 0.0,
    joint_ridge_b: float | None = None,
    joint_active: np.ndarray | None = None,
    solver: str = "direct",
    cg_maxiter: int | None = None,
) -> None:
    """Eq. 5: U = argmin Σ (t - c_u - ⟨x, b_u⟩ - ⟨x, U w_u⟩)², then orthonormalise by QR
    (W absorbs R so that Θ is unchanged by the QR).

    Paper-setting options (see :func:`solve_u`, :func:`u_step_statistics`): ``ridge_relative=False``
    with ``jitter``; ``joint_ridge_b``: solved jointly with each b_u on its support, b refitted on the
    support afterwards (``joint_active`` (n_users, k) drops zeroed slots); ``solver="cg"``:
    matrix-free conjugate gradients warm-started at U (:func:`lrs_rec.engine.u_solve.cg_u_solve`)."""
    if solver == "cg":
        U_ls, b_new = cg_u_solve(
            state, data, ridge=ridge, maxiter=cg_maxiter, joint_ridge_b=joint_ridge_b,
            active=joint_active, jitter=jitter,
        )  # fmt: skip
        Q, R = orthonormalize(U_ls)
    else:
        terms: _JointTerms = []
        A, rhs = u_step_statistics(
            state, data, block=block, joint_ridge_b=joint_ridge_b, joint_active=joint_active,
            jitter=jitter, joint_terms=terms,
        )  # fmt: skip
        Q, R = solve_u(A, rhs, ridge=ridge, ridge_relative=ridge_relative, jitter=jitter)
        b_new = None
        if terms:  # b re-optimised on the supports with the new U (θ = U_ls w = Q (R w))
            b_new = np.zeros((state.W.shape[0], terms[0][2][1].shape[1]))
            WR = state.W @ R.T
            for lo, hi, t in terms:
                b_new[lo:hi] = refit_b(t, Q, WR[lo:hi])
    if b_new is not None:  # the values on the (unchanged) supports
        state.B_val = np.asarray(b_new, dtype=np.float64)
    state.U = Q
    state.W = state.W @ R.T


def item_bias_statistics(state: LRSState, data: Samples) -> tuple[np.ndarray, np.ndarray]:
    """Fixed features: per item Σ (t - ⟨f_i, θ_u⟩) and the rating counts (additive over users)."""
    n_items = state.F.shape[0]
    t = data.ratings - state.global_mean - state.user_bias[data.users]
    resid = np.empty_like(t)
    K = parallel.kernels()
    if K is not None:
        resid = t - rating_dots(K, state, data.users, data.items)
    for a in range(0, t.size if K is None else 0, ROW_CHUNK):
        i, u = data.items[a : a + ROW_CHUNK], data.users[a : a + ROW_CHUNK]
        theta = state.theta_of(u)
        resid[a : a + ROW_CHUNK] = t[a : a + ROW_CHUNK] - np.einsum("nd,nd->n", state.F[i], theta)
    return (
        np.bincount(data.items, resid, minlength=n_items),
        np.bincount(data.items, minlength=n_items).astype(float),
    )


def item_block_statistics(
    state: LRSState, data: Samples, lo: int, hi: int, sl: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Item refinement: the normal equations of items lo..hi-1 — design z = [1, θ_u] — from the
    samples ``sl`` (all of them rate an item in lo..hi-1): G = Σ z zᵀ (hi-lo, d+1, d+1) and
    h = Σ z t (hi-lo, d+1). Additive over user partitions."""
    K = parallel.kernels()
    if K is not None:
        return _item_block_statistics_fast(K, state, data, lo, hi, sl)
    u = data.users[sl]
    t = data.ratings[sl] - state.global_mean - state.user_bias[u]
    Z = np.hstack([np.ones((sl.size, 1)), state.theta_of(u)])
    return (
        grouped_gram(data.items[sl] - lo, hi - lo, Z),
        grouped_sum(data.items[sl] - lo, hi - lo, Z * t[:, None]),
    )


def _item_block_statistics_fast(
    K: Any, state: LRSState, data: Samples, lo: int, hi: int, sl: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`item_block_statistics` with the compiled accumulation (θ_u rows of the block's
    ratings, in item order)."""
    keys = data.items[sl] - lo
    order = np.argsort(keys, kind="stable")
    sl = sl[order]
    u = data.users[sl]
    indptr = np.zeros(hi - lo + 1, dtype=np.int64)
    np.cumsum(np.bincount(keys, minlength=hi - lo), out=indptr[1:])
    theta = _f64(state.theta_of(u))
    e = state.F.shape[1] + 1
    G, h = np.empty((hi - lo, e, e)), np.empty((hi - lo, e))
    rows = np.arange(sl.size, dtype=np.int32)
    K.item_statistics(
        indptr,
        rows,
        _f64(data.ratings[sl]),
        theta,
        _f64(state.user_bias[u]),
        float(state.global_mean),
        G,
        h,
    )
    return G, h


def solve_items(
    G: np.ndarray, h: np.ndarray, *, reg_features: float, reg_bias: float
) -> np.ndarray:
    """(c_i, f_i) of a block of items from :func:`item_block_statistics` (ridge λ_bias, λ_f)."""
    reg = np.full(G.shape[1], reg_features)
    reg[0] = reg_bias
    return np.asarray(np.linalg.solve(G + np.diag(reg)[None], h[:, :, None])[:, :, 0])


def item_blocks(state: LRSState, data: Samples) -> Iterator[tuple[int, int, np.ndarray]]:
    """The item blocks of the refinement step, sized by items and by ratings (memory budget)."""
    d = state.F.shape[1]
    return key_blocks(data.items, state.F.shape[0], user_block_size(d + 1), sample_budget(d + 1))


def item_step(
    state: LRSState, data: Samples, *, reg_features: float, reg_bias: float, refine_features: bool
) -> None:
    """Update c_i (and f_i when refining) of every item given all users' θ_u."""
    if not refine_features:
        total, n_i = item_bias_statistics(state, data)
        state.item_bias = total / (n_i + reg_bias)
        return
    K = parallel.kernels()
    if K is not None:  # compiled: the item CSR and θ_u of every user, (c_i, f_i) per item
        indptr, users, ratings = data.csr("item", state.F.shape[0])
        sol = np.empty((state.F.shape[0], state.F.shape[1] + 1))
        K.fit_items(
            indptr,
            users,
            ratings,
            _f64(state.theta()),
            _f64(state.user_bias),
            float(state.global_mean),
            float(reg_features),
            float(reg_bias),
            sol,
        )
        state.item_bias = np.ascontiguousarray(sol[:, 0])
        state.F = np.ascontiguousarray(sol[:, 1:])
        return
    F = np.empty_like(state.F)
    c_i = np.empty(state.F.shape[0])

    def solve_block(blk: tuple[int, int, np.ndarray]) -> tuple[int, int, np.ndarray]:
        lo, hi, sl = blk
        G, h = item_block_statistics(state, data, lo, hi, sl)
        return lo, hi, solve_items(G, h, reg_features=reg_features, reg_bias=reg_bias)

    for lo, hi, sol in block_map(solve_block, item_blocks(state, data)):  # results in block order
        c_i[lo:hi] = sol[:, 0]
        F[lo:hi] = sol[:, 1:]
    state.item_bias = c_i
    state.F = F


def squared_error(state: LRSState, data: Samples, lo: float, hi: float) -> tuple[float, int]:
    """Σ (clipped prediction - rating)² and the sample count (additive over partitions)."""
    if len(data) == 0:
        return 0.0, 0
    K = parallel.kernels()
    if K is not None:  # row chunks (fixed size); the sum in chunk order
        total = 0.0
        for a in range(0, len(data), ROW_CHUNK):
            u, i = data.users[a : a + ROW_CHUNK], data.items[a : a + ROW_CHUNK]
            dots = rating_dots(K, state, u, i)
            pred = state.global_mean + state.user_bias[u] + state.item_bias[i] + dots
            err = np.clip(pred, lo, hi) - data.ratings[a : a + ROW_CHUNK]
            total += float(np.dot(err, err))
        return total, len(data)
    err = state.predict(data.users, data.items, lo, hi) - data.ratings
    return float(np.dot(err, err)), len(data)


def rmse(state: LRSState, data: Samples, lo: float, hi: float) -> float:
    if len(data) == 0:
        return float("nan")
    sse, n = squared_error(state, data, lo, hi)
    return float(np.sqrt(sse / n))
