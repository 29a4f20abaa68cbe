"""The data-touching side of private training, behind one small interface (:class:`PrivateData`).

:func:`training.private_train.fit_private` holds only public values: the releases, their noise (one
seeded rng, in a fixed order), the solves. Everything that reads ratings or per-user parameters goes
through a :class:`PrivateData`: the statistics whose noisy sums are released — each a sum over users
of one user's clipped contribution, so user partitions can compute their part and add them up — the
per-user steps (c_u, w_u, b_u: computed from the releases and the user's own ratings, never released)
and the loss. :class:`LocalPrivateData` runs them on arrays in this process; the Dask engine runs
the same functions on each user partition and reduces the sums on the cluster.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np

from lrs_rec.engine import onehot
from lrs_rec.engine.b_rows import b_dot, top_k_b, zero_b
from lrs_rec.engine.onehot import OneHotState
from lrs_rec.engine.steps import LRSState, Samples, StepParams, UserPrior, sample_budget
from lrs_rec.engine.steps import user_step as engine_user_step
from lrs_rec.privacy import (
    ClipBounds,
    cap_samples_by_key,
    clip_rows,
    clip_scalar,
    clipped_item_block_statistics,
    clipped_u_step_statistics,
    id_hash,
    item_sum_statistics,
    selection_keys,
)
from lrs_rec.privacy_items import (
    activity_weights,
    clipped_item_rows,
    final_user_step,
    select_popular_per_user,
    spectral_statistic,
    weighted_item_counts,
    weighted_second_moment,
)

if TYPE_CHECKING:
    from lrs_rec.training.private_train import PrivateConfig


class PrivateData(Protocol):
    """The steps of :func:`training.private_train.fit_private` that touch the ratings or per-user
    values, in the order the fit calls them. Statistics are returned un-noised (the caller adds the
    noise); per-user state stays inside."""

    def mean_statistic(self, mu0: float, mean_clip: float) -> np.ndarray:
        """[Σ_u clip(mean_u − μ0, A_μ), number of users with ratings]."""
        ...

    def start_user_bias(self, global_mean: float, reg: float) -> None:
        """c_u = Σ_j (r_uj − μ) / (n_u + reg) for every user."""
        ...

    def item_bias_statistics(
        self, global_mean: float, cfg: PrivateConfig
    ) -> tuple[np.ndarray, np.ndarray]:
        """(S, N) of :func:`lrs_rec.privacy.item_sum_statistics` on the residuals r − μ − c_u."""
        ...

    def spectral_statistic(
        self, global_mean: float, item_bias: np.ndarray, top: np.ndarray, cfg: PrivateConfig
    ) -> np.ndarray:
        """G of :func:`lrs_rec.privacy_items.spectral_statistic` over the items ``top``."""
        ...

    def select_u_samples(
        self,
        cfg: PrivateConfig,
        counts: np.ndarray,
        global_mean: float,
        item_bias: np.ndarray,
        seed: int | None,
        item_w: np.ndarray | None = None,
    ) -> None:
        """Choose the samples (and per-user base weights) entering the U-step statistics, from the
        released item counts ``counts`` and each user's own ratings. ``seed``: the public seed of
        the random choices ("random", "popular": keyed draws of each (user id, item id),
        :func:`lrs_rec.privacy.selection_keys`; None for the weighted selection, which draws
        nothing). ``item_w``: public per-item weights c_i ∈ [0, 1] of the weighted selection
        (:func:`lrs_rec.privacy_items.item_weights`), None for 1."""
        ...

    def u_step_counts(self) -> np.ndarray:
        """a_i of :func:`lrs_rec.privacy_items.weighted_item_counts` over the chosen samples."""
        ...

    def start_iterate(
        self,
        F: np.ndarray | None,
        U: np.ndarray,
        item_bias: np.ndarray,
        global_mean: float,
        k: int,
    ) -> None:
        """Per-user parameters: c_u from :meth:`start_user_bias`, w_u = 0, b_u = 0."""
        ...

    def user_step(
        self, U: np.ndarray, cfg: PrivateConfig, prior_prec: np.ndarray | None = None
    ) -> None:
        """Every user's (c_u, w_u, b_u) from the released U and the user's own ratings;
        ``prior_prec``: the shape of the prior precision of w_u, from released values (None: I)."""
        ...

    def final_user_step(
        self,
        U: np.ndarray,
        cfg: PrivateConfig,
        row_cov: np.ndarray | None,
        prior: tuple[np.ndarray, np.ndarray] | None,
    ) -> None:
        """One more (c_u, w_u) step (one-hot, no sparse part) by
        :func:`lrs_rec.privacy_items.final_user_step`: GLS weights from the released rows'
        covariances ``row_cov`` (None: 1) and the prior (mean, precision shape) ``prior`` (None:
        the public N(0, I/reg_w))."""
        ...

    def population_statistics(self, cfg: PrivateConfig) -> tuple[np.ndarray, np.ndarray]:
        """(V, M): one-hot U-step with the population Gram (``u_step_gram="population"``)."""
        ...

    def item_block_statistics(self, bounds: ClipBounds) -> tuple[np.ndarray, np.ndarray]:
        """(A blocks, V): one-hot U-step with per-item Gram blocks."""
        ...

    def dense_statistics(self, bounds: ClipBounds) -> tuple[np.ndarray, np.ndarray]:
        """(A, V): the U-step of Eq. 7-8 on plug-in features."""
        ...

    def w_prior_statistic(self, A_w: float, r: int) -> np.ndarray:
        """Σ_u (ŵ_u, upper(ŵ_uŵ_uᵀ), 1) over the users with ratings (ŵ = clip(w, A_w))."""
        ...

    def squared_error(
        self,
        global_mean: float,
        item_bias: np.ndarray,
        U: np.ndarray,
        lo: float,
        hi: float,
    ) -> tuple[float, int]:
        """(Σ (r̂ − r)², number of ratings) of the current model on the training ratings."""
        ...


# -- local (per-user) steps: only public values and the user's own ratings --------------------------------
def step_params(cfg: PrivateConfig) -> StepParams:
    """The engine's user-step options of private training: w_u with a fixed public prior (no
    population / conditional prior: those are cross-user statistics), c_u, and the sparse b_u."""
    return StepParams(
        k=cfg.sparsity, per_user_w=True, user_bias=True, reg_w=cfg.reg_w, reg_b=cfg.reg_b,
        reg_bias=cfg.reg_user_bias, population_prior=False, conditional_prior=False,
        n_inner=cfg.n_inner,
    )  # fmt: skip


def public_prior(r: int) -> UserPrior:
    """The prior of the private user step: N(0, I) shape, data-independent."""
    return UserPrior(np.zeros(r), np.eye(r))


@dataclass
class _Local:
    user_bias: np.ndarray
    W: np.ndarray
    B_idx: np.ndarray
    B_val: np.ndarray


class _Iterate:
    """The engine iterate of private training: :class:`lrs_rec.engine.onehot.OneHotState` (one-hot
    features, compressed b) or :class:`lrs_rec.engine.steps.LRSState` (plug-in features F)."""

    def __init__(
        self, F: np.ndarray | None, U: np.ndarray, c: np.ndarray, item_bias: np.ndarray,
        global_mean: float, k: int, W: np.ndarray | None = None,
    ) -> None:  # fmt: skip
        n_users, r = c.shape[0], U.shape[1]
        W = np.zeros((n_users, r)) if W is None else W
        self.F = F
        if F is None:
            self.state: OneHotState | LRSState = OneHotState(
                global_mean, c.copy(), item_bias, U, W.copy(),
                np.tile(np.arange(k, dtype=np.int64), (n_users, 1)), np.zeros((n_users, k)),
            )  # fmt: skip
        else:
            self.state = LRSState(
                global_mean, c.copy(), item_bias, F, U, W.copy(), *zero_b(n_users, k)
            )

    def user_step(
        self, data: Samples, cfg: PrivateConfig, prior_prec: np.ndarray | None = None
    ) -> None:
        """The engine's user step (w, then the sparse b) with the public prior (its precision
        shape ``prior_prec`` when given: a released value, e.g. the U-step's M̂)."""
        p, prior = step_params(cfg), public_prior(self.state.U.shape[1])
        if prior_prec is not None:
            prior = UserPrior(np.zeros(self.state.U.shape[1]), np.asarray(prior_prec, np.float64))
        if isinstance(self.state, OneHotState):
            onehot.user_step(self.state, data, p, prior=prior)
        else:
            engine_user_step(self.state, data, p, prior=prior)

    def set_U(self, U: np.ndarray) -> None:
        self.state.U = U

    def xb(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        """⟨f_i, b_u⟩ per sample (blocks of samples: no N × d array)."""
        st = self.state
        if isinstance(st, OneHotState):
            return onehot.sparse_inner(st.B_idx[users], st.B_val[users], items)
        out = np.empty(users.shape[0])
        step = sample_budget(2 * st.F.shape[1])
        for a in range(0, users.shape[0], step):
            u, i = users[a : a + step], items[a : a + step]
            out[a : a + step] = b_dot(st.F[i], st.B_idx[u], st.B_val[u])
        return out

    def compressed_b(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        st = self.state
        if isinstance(st, OneHotState):
            return st.B_idx, st.B_val
        return top_k_b(st.B_idx, st.B_val, k, st.F.shape[1])


def local_user_step(
    cfg: PrivateConfig,
    F: np.ndarray | None,
    U: np.ndarray,
    users: np.ndarray,
    items: np.ndarray,
    t: np.ndarray,
    n_users: int,
    st: _Local,
) -> _Local:
    """(c_u, w_u) by ridge on [1, f_iᵀU], then b_u by one hard-thresholding-pursuit step (top-k of the
    ridge solution, Eq. 3) — for every user from that user's residuals t = r − μ − c_i only: the
    engine's user step (:func:`lrs_rec.engine.steps.user_step`; one-hot features:
    :func:`lrs_rec.engine.onehot.user_step`) with the public prior."""
    n_items = U.shape[0] if F is None else F.shape[0]
    it = _Iterate(F, U, st.user_bias, np.zeros(n_items), 0.0, cfg.sparsity, st.W)
    if F is None:
        assert isinstance(it.state, OneHotState)
        it.state.B_idx, it.state.B_val = st.B_idx.copy(), st.B_val.copy()
    else:
        assert isinstance(it.state, LRSState)
        it.state.set_b(st.B_idx.copy(), st.B_val.copy())
    it.user_step(Samples(users, items, t), cfg)
    idx, val = it.compressed_b(cfg.sparsity)
    return _Local(it.state.user_bias, it.state.W, idx.astype(np.int64), val)


def _sphere(W: np.ndarray, radius: float) -> np.ndarray:
    """Each row scaled to norm ``radius`` (zero rows stay zero): a per-user map of w_u alone."""
    norms = np.linalg.norm(W, axis=1, keepdims=True)
    return np.asarray(np.divide(W * radius, norms, out=np.zeros_like(W), where=norms > 0))


def predict_samples(
    global_mean: float,
    user_bias: np.ndarray,
    item_bias: np.ndarray,
    U: np.ndarray,
    W: np.ndarray,
    B_idx: np.ndarray,
    B_val: np.ndarray,
    F: np.ndarray | None,
    users: np.ndarray,
    items: np.ndarray,
    lo: float,
    hi: float,
) -> np.ndarray:
    """μ + c_u + c_i + ⟨f_i, U w_u + b_u⟩, clipped; blocks of samples (no N × d array)."""
    out = np.empty(users.shape[0])
    step = sample_budget(2 * (U.shape[1] + B_idx.shape[1] + (0 if F is None else F.shape[1])))
    for a in range(0, users.shape[0], step):
        u, i = users[a : a + step], items[a : a + step]
        if F is None:  # one-hot: ⟨e_i, U w_u⟩ = U_i·w_u, ⟨e_i, b_u⟩ = b_u[i]
            inner = np.einsum("nr,nr->n", U[i], W[u]) + onehot.sparse_inner(B_idx[u], B_val[u], i)
        else:
            Fi = F[i]
            inner = np.einsum("nd,dr,nr->n", Fi, U, W[u]) + np.einsum(
                "nk,nk->n", np.take_along_axis(Fi, B_idx[u], axis=1), B_val[u]
            )
        out[a : a + step] = global_mean + user_bias[u] + item_bias[i] + inner
    return np.asarray(np.clip(out, lo, hi))


class LocalPrivateData:
    """:class:`PrivateData` on the ratings of this process (dense user/item indices, one rating per
    (user, item)); also used by each user partition of the Dask engine (local user indices).

    ``user_ids`` / ``item_ids``: the id strings by index (None: the decimal index), the only
    inputs of the random U-step selections besides the public seed (keyed draws): the same ids
    give the same choice on every partition of the users."""

    def __init__(
        self,
        users: np.ndarray,
        items: np.ndarray,
        ratings: np.ndarray,
        *,
        n_users: int,
        n_items: int,
        F: np.ndarray | None,
        user_ids: np.ndarray | Sequence[str] | None = None,
        item_ids: np.ndarray | Sequence[str] | None = None,
    ) -> None:
        self.users, self.items, self.ratings = users, items, ratings
        self.n_users, self.n_items, self.F = n_users, n_items, F
        self.user_ids, self.item_ids = user_ids, item_ids
        self.n_u = np.bincount(users, minlength=n_users).astype(np.float64)
        self.active = self.n_u > 0
        self.c_u = np.zeros(n_users)
        self.uk, self.ik, self.tk = users, items, ratings
        self.sigma_u: np.ndarray | None = None  # U-step base weights (None: 1 on ≤ m samples)
        self.c_k: np.ndarray | None = None  # U-step per-sample item weights (None: 1)
        self.it: _Iterate | None = None
        self.k = 0

    def _iterate(self) -> _Iterate:
        assert self.it is not None, "start_iterate first"
        return self.it

    def mean_statistic(self, mu0: float, mean_clip: float) -> np.ndarray:
        active, n_u = self.active, self.n_u
        mean_u = np.bincount(self.users, self.ratings, minlength=self.n_users)[active] / n_u[active]
        return np.array([clip_scalar(mean_u - mu0, mean_clip).sum(), float(active.sum())])

    def start_user_bias(self, global_mean: float, reg: float) -> None:
        self.c_u = np.bincount(self.users, self.ratings - global_mean, minlength=self.n_users) / (
            self.n_u + reg
        )

    def item_bias_statistics(
        self, global_mean: float, cfg: PrivateConfig
    ) -> tuple[np.ndarray, np.ndarray]:
        return item_sum_statistics(
            self.items, self.ratings - global_mean - self.c_u[self.users], self.users,
            self.n_items, A2=cfg.A2, max_samples_per_user=cfg.bias_samples_per_user,
            user_norm_bound=cfg.bias_user_norm,
        )  # fmt: skip

    def spectral_statistic(
        self, global_mean: float, item_bias: np.ndarray, top: np.ndarray, cfg: PrivateConfig
    ) -> np.ndarray:
        users, items = self.users, self.items
        return spectral_statistic(
            users, items, self.ratings - global_mean - item_bias[items] - self.c_u[users], top,
            self.n_users, A2=cfg.A2, user_norm=cfg.spectral_user_norm,
        )  # fmt: skip

    def select_u_samples(
        self,
        cfg: PrivateConfig,
        counts: np.ndarray,
        global_mean: float,
        item_bias: np.ndarray,
        seed: int | None,
        item_w: np.ndarray | None = None,
    ) -> None:
        users, items, ratings, N = self.users, self.items, self.ratings, counts
        self.c_k = None  # set again below with public item weights
        if cfg.u_select == "weighted":
            if cfg.u_min_support > 0:  # by the released noisy counts Ñ_i: post-processing
                keep = N[items] >= cfg.u_min_support
                uk, ik = users[keep], items[keep]
                del keep
            else:
                uk, ik = users, items
            if item_w is not None:
                self.c_k = np.asarray(item_w, np.float64)[ik]
            self.sigma_u = activity_weights(uk, self.n_users, cfg.max_samples_per_user, self.c_k)
            tk = ratings[:] if uk is users else ratings[N[items] >= cfg.u_min_support]
            tk = tk - global_mean - item_bias[ik]
        else:
            if seed is None:
                raise ValueError(f"u_select={cfg.u_select!r} needs the selection seed")
            keys = self.selection_keys(seed)
            m = cfg.max_samples_per_user
            if cfg.u_select == "popular":  # by the released noisy counts Ñ_i: post-processing
                keep = select_popular_per_user(users, items, N, m, None, keys=keys)
            else:
                keep = cap_samples_by_key(users, keys, m)
            del keys
            uk, ik = users[keep], items[keep]
            tk = ratings[keep] - global_mean - item_bias[ik]
            del keep
        self.uk, self.ik, self.tk = uk, ik, tk

    def selection_keys(self, seed: int) -> np.ndarray:
        """Every rating's key of the random selections (:func:`lrs_rec.privacy.selection_keys`
        of its user's and item's id strings)."""
        uids = np.arange(self.n_users).astype(str) if self.user_ids is None else self.user_ids
        iids = np.arange(self.n_items).astype(str) if self.item_ids is None else self.item_ids
        if len(uids) != self.n_users or len(iids) != self.n_items:
            raise ValueError(
                f"{len(uids)} user ids and {len(iids)} item ids for {self.n_users} users and "
                f"{self.n_items} items"
            )
        return selection_keys(seed, id_hash(uids), id_hash(iids), self.users, self.items)

    def u_step_counts(self) -> np.ndarray:
        base = np.ones(self.n_users) if self.sigma_u is None else self.sigma_u
        return weighted_item_counts(self.ik, self.uk, base, self.n_items, self.c_k)

    def start_iterate(
        self,
        F: np.ndarray | None,
        U: np.ndarray,
        item_bias: np.ndarray,
        global_mean: float,
        k: int,
    ) -> None:
        self.it = _Iterate(F, U, self.c_u, item_bias, global_mean, k)
        self.k = k

    def user_step(
        self, U: np.ndarray, cfg: PrivateConfig, prior_prec: np.ndarray | None = None
    ) -> None:
        it = self._iterate()
        it.set_U(U)
        it.user_step(Samples(self.users, self.items, self.ratings), cfg, prior_prec)

    def final_user_step(
        self,
        U: np.ndarray,
        cfg: PrivateConfig,
        row_cov: np.ndarray | None,
        prior: tuple[np.ndarray, np.ndarray] | None,
    ) -> None:
        st = self._iterate().state
        if not isinstance(st, OneHotState) or self.k > 0:
            raise ValueError(
                "final_gls / final_w_prior need one-hot features without a sparse part"
            )
        t = self.ratings - st.global_mean - st.item_bias[self.items]
        c, W = final_user_step(
            self.users, self.items, t, self.n_users, U, st.W, st.user_bias, reg_w=cfg.reg_w,
            reg_bias=cfg.reg_user_bias, row_cov=row_cov,
            prior_mean=None if prior is None else prior[0],
            prior_prec=None if prior is None else prior[1],
        )  # fmt: skip
        st.U, st.user_bias, st.W = U, c, W

    def _residuals(self) -> tuple[np.ndarray, np.ndarray]:
        it = self._iterate()
        return self.tk - it.state.user_bias[self.uk], it.xb(self.uk, self.ik)

    def population_statistics(self, cfg: PrivateConfig) -> tuple[np.ndarray, np.ndarray]:
        y, xb = self._residuals()
        W = self._iterate().state.W
        Wh = _sphere(W, cfg.A_w) if cfg.u_w_sphere else W
        V, s_u = clipped_item_rows(
            self.ik, y, xb, self.uk, Wh, self.n_items, A2=cfg.A2, A3=cfg.A3, A_w=cfg.A_w,
            user_norm=cfg.u_user_norm, base_weights=self.sigma_u, sample_weights=self.c_k,
        )  # fmt: skip
        M = weighted_second_moment(self.uk, Wh, s_u, cfg.A_w, cfg.max_samples_per_user)
        return V, M

    def item_block_statistics(self, bounds: ClipBounds) -> tuple[np.ndarray, np.ndarray]:
        y, xb = self._residuals()
        W = self._iterate().state.W
        return clipped_item_block_statistics(self.ik, y, xb, self.uk, W, self.n_items, bounds)

    def dense_statistics(self, bounds: ClipBounds) -> tuple[np.ndarray, np.ndarray]:
        y, xb = self._residuals()
        W = self._iterate().state.W
        return clipped_u_step_statistics(None, y, xb, self.uk, W, bounds, F=self.F, items=self.ik)

    def w_prior_statistic(self, A_w: float, r: int) -> np.ndarray:
        Wc = clip_rows(self._iterate().state.W[self.active], A_w)
        iu = np.triu_indices(r)
        outer = np.einsum("ua,ub->uab", Wc, Wc)[:, iu[0], iu[1]]
        return np.concatenate([Wc.sum(axis=0), outer.sum(axis=0), [float(self.active.sum())]])

    def user_values(self, k: int) -> _Local:
        """The per-user parameters (c_u, w_u, b_u as its k largest coordinates)."""
        it = self._iterate()
        B_idx, B_val = it.compressed_b(k)
        return _Local(it.state.user_bias, it.state.W, B_idx.astype(np.int64), B_val)

    def squared_error(
        self,
        global_mean: float,
        item_bias: np.ndarray,
        U: np.ndarray,
        lo: float,
        hi: float,
    ) -> tuple[float, int]:
        st = self.user_values(self.k)
        pred = predict_samples(
            global_mean, st.user_bias, item_bias, U, st.W, st.B_idx, st.B_val, self.F,
            self.users, self.items, lo, hi,
        )  # fmt: skip
        return float(np.sum((pred - self.ratings) ** 2)), int(self.users.size)
