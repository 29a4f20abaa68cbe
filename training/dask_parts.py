"""The worker side of `lrs-rec train --engine dask`: one user partition's state and its steps.

A :class:`Part` holds a partition's ratings (local user indices) and its users' parameters
(c_u, W, B; the ALS factors P during initialisation; named copies such as the start and the best
iterate). Every function here is a Dask task: it takes a Part and the broadcast shared arrays
(:class:`Shared`: μ, item biases, item features F, U) and returns either a new Part (the inputs are
never modified, so a task Dask recomputes after a lost worker gives the same result) or additive
statistics that the driver reduces. The maths is the engine's (``lrs_rec.engine.steps``) and the
ALS half-step's (``training.features``), applied to the partition's users.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from lrs_rec.training.dask_input import PartitionData
from lrs_rec.training.features import FACTORS_DTYPE, als_half_step

from lrs_rec.engine import b_rows
from lrs_rec.engine.parallel import kernels
from lrs_rec.engine.steps import (
    LRSState,
    PriorStatistics,
    Samples,
    StepParams,
    UserPrior,
    item_bias_statistics,
    item_block_statistics,
    prior_statistics,
    sample_budget,
    squared_error,
    u_step_statistics,
    user_step,
)
from lrs_rec.model import LRSModel


@dataclass(frozen=True)
class Shared:
    """The arrays every partition needs (broadcast once per change)."""

    global_mean: float
    item_bias: np.ndarray  # (n_items,)
    F: np.ndarray  # (n_items, d)
    U: np.ndarray  # (d, r)


@dataclass(frozen=True)
class Saved:
    """A copy of a partition's user parameters (b_u as the engine's k-sparse pairs)."""

    c_u: np.ndarray
    W: np.ndarray
    b_idx: np.ndarray  # (n, k)
    b_val: np.ndarray  # (n, k)

    @classmethod
    def of(cls, c_u: np.ndarray, W: np.ndarray, B_idx: np.ndarray, B_val: np.ndarray) -> Saved:
        return cls(c_u.copy(), W.copy(), B_idx.copy(), B_val.copy())


@dataclass(frozen=True)
class Part:
    data: PartitionData
    unit: float
    train: Samples  # standardised units
    val: Samples
    train_order: np.ndarray  # train samples sorted by item (stable)
    train_bounds: np.ndarray  # (n_items + 1,) item boundaries in train_order
    c_u: np.ndarray
    W: np.ndarray
    B_idx: np.ndarray  # (n, k) b_u as the engine's k-sparse pairs (width 0: B = 0)
    B_val: np.ndarray
    P: np.ndarray | None = None  # ALS user factors (initialisation only)
    saved: dict[str, Saved] = field(default_factory=dict)

    @property
    def n_users(self) -> int:
        return self.data.hi - self.data.lo


def _item_index(items: np.ndarray, n_items: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.argsort(items, kind="stable")
    return order, np.searchsorted(items[order], np.arange(n_items + 1))


def make_part(data: PartitionData, unit: float, n_items: int, d: int) -> Part:
    train = data.samples(~data.val, unit)
    order, bounds = _item_index(train.items, n_items)
    n = data.hi - data.lo
    return Part(
        data,
        unit,
        train,
        data.samples(data.val, unit),
        order,
        bounds,
        np.zeros(n),
        np.zeros((n, 0)),
        *b_rows.zero_b(n, 0),
    )


def samples(part: Part, which: str) -> Samples:
    if which == "train":
        return part.train
    if which == "val":
        return part.val
    return part.data.samples(None, part.unit)  # "all" (the final pass), in global row order


def state(part: Part, sh: Shared, *, copy: bool = False) -> LRSState:
    arrays = (part.c_u, part.W, part.B_idx, part.B_val)
    c_u, W, B_idx, B_val = (a.copy() for a in arrays) if copy else arrays
    return LRSState(sh.global_mean, c_u, sh.item_bias, sh.F, sh.U, W, B_idx, B_val)


# ---- standardisation ---------------------------------------------------------------------------
def raw_train_sums(data: PartitionData) -> tuple[float, int]:
    r = data.ratings[~data.val]
    return float(r.sum()), int(r.size)


def raw_train_sq_dev(data: PartitionData, mean: float) -> float:
    r = data.ratings[~data.val] - mean
    return float(np.dot(r, r))


def mean_sums(part: Part, which: str) -> tuple[float, int]:
    s = samples(part, which)
    return float(s.ratings.sum()), len(s)


# ---- biases (training.features.fit_biases, split) --------------------------------------------
def bias_item_sums(
    part: Part, mu: float, which: str, n_items: int
) -> tuple[np.ndarray, np.ndarray]:
    s = samples(part, which)
    return (
        np.bincount(s.items, s.ratings - mu - part.c_u[s.users], minlength=n_items),
        np.bincount(s.items, minlength=n_items).astype(float),
    )


def bias_users(part: Part, mu: float, c_i: np.ndarray, reg: float, which: str) -> Part:
    s = samples(part, which)
    n_u = np.bincount(s.users, minlength=part.n_users).astype(float)
    c_u = np.bincount(s.users, s.ratings - mu - c_i[s.items], minlength=part.n_users) / (n_u + reg)
    return replace(part, c_u=c_u)


# ---- ALS initialisation (training.features.als_factors, split) --------------------------------
def als_users(
    part: Part,
    mu: float,
    c_i: np.ndarray,
    Q: np.ndarray,
    reg: float,
    reg_bias: float,
    min_count: float,
    cg_steps: int = 0,
) -> Part:
    """cg_steps > 0: conjugate-gradient steps from the partition's previous (c_u, P)."""
    s = part.train
    K = kernels()
    if K is not None:  # the local engine's compiled half-step (features.als_factors), same CSR
        # a fresh (c_u, P) each time (a task never modifies its input Part)
        c_u = np.zeros(part.n_users)
        P = np.zeros((part.n_users, Q.shape[1]), dtype=FACTORS_DTYPE)
        args = (
            *s.csr("user", part.n_users),
            np.ascontiguousarray(Q, dtype=FACTORS_DTYPE),
            np.ascontiguousarray(c_i, dtype=np.float64),
            float(mu),
            float(reg),
            float(reg_bias),
            max(min_count, 1.0),
            c_u,
            P,
        )
        if cg_steps and part.P is not None:  # CG from the previous iterate, as als_factors
            c_u[:], P[:] = part.c_u, part.P
            K.als_half_step_cg(*args, int(cg_steps))
        else:
            K.als_half_step(*args)
        return replace(part, c_u=c_u, P=P)
    n_u = np.bincount(s.users, minlength=part.n_users).astype(float)
    t = s.ratings - mu - c_i[s.items]
    x0 = (part.c_u, part.P) if cg_steps and part.P is not None else None
    c_u, P = als_half_step(
        s.users,
        part.n_users,
        n_u,
        s.items,
        Q,
        t,
        reg=reg,
        reg_bias=reg_bias,
        min_count=min_count,
        x0=x0,
        cg_steps=cg_steps if x0 is not None else 0,
    )
    return replace(part, c_u=c_u, P=P.astype(FACTORS_DTYPE, copy=False))


def pack(stats: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(G, h) with each symmetric G as its upper triangle (what travels between workers)."""
    G, h = stats
    iu = np.triu_indices(G.shape[1])
    return np.ascontiguousarray(G[:, iu[0], iu[1]]), h


def unpack(stats: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    T, h = stats
    p = h.shape[1]
    iu = np.triu_indices(p)
    G = np.empty((T.shape[0], p, p))
    G[:, iu[0], iu[1]] = T
    G[:, iu[1], iu[0]] = T
    return G, h


def _item_statistics(
    st: LRSState, s: Samples, order: np.ndarray, bounds: np.ndarray, lo: int, hi: int
) -> tuple[np.ndarray, np.ndarray]:
    """The engine's item statistics of items lo..hi-1 (the block reduced across partitions),
    computed in runs of consecutive items of at most ``sample_budget(d + 1)`` ratings: the engine
    builds a θ_u row per rating of its block, which for a block of a big partition would be
    gigabytes (3M ratings × d floats, and its W[u] / B[u] temporaries). Each item's sums are
    the same (its ratings in the same order)."""
    e = st.F.shape[1] + 1
    G, h = np.empty((hi - lo, e, e)), np.empty((hi - lo, e))
    budget = sample_budget(e)
    a = lo
    while a < hi:
        b = int(np.searchsorted(bounds, bounds[a] + budget, side="right")) - 1
        b = min(max(b, a + 1), hi)
        sl = order[bounds[a] : bounds[b]]
        G[a - lo : b - lo], h[a - lo : b - lo] = item_block_statistics(st, s, a, b, sl)
        a = b
    return G, h


def als_item_stats(part: Part, mu: float, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
    """The ALS item half-step's normal equations of items lo..hi-1: the engine's item statistics
    with U = I, W = P, B = 0 (design [1, p_u], target y - μ - c_u)."""
    assert part.P is not None
    d = part.P.shape[1]
    n = part.P.shape[0]
    st = LRSState(
        mu, part.c_u, np.zeros(0), np.zeros((0, d)), np.eye(d), part.P, *b_rows.zero_b(n, 0)
    )
    return pack(_item_statistics(st, part.train, part.train_order, part.train_bounds, lo, hi))


def gram_p(part: Part) -> np.ndarray:
    assert part.P is not None
    P = np.asarray(part.P, dtype=np.float64)  # (float32 storage: the Gram in float64)
    return np.asarray(P.T @ P)


def start_from_p(part: Part, U: np.ndarray) -> Part:
    """W = P U, B = 0 (the start of the LRS fit); P is dropped."""
    assert part.P is not None
    idx, val = b_rows.zero_b(part.n_users, 0)
    return replace(part, W=np.asarray(part.P, dtype=np.float64) @ U, B_idx=idx, B_val=val, P=None)


def w_as_p(part: Part) -> Part:
    """Plug-in start: the per-user ridge solutions θ̂_u (W with U = I) become P."""
    return replace(part, P=part.W, W=np.zeros((part.n_users, 0)))


def zero_w(part: Part, d: int) -> Part:
    idx, val = b_rows.zero_b(part.n_users, 0)
    return replace(part, W=np.zeros((part.n_users, d)), B_idx=idx, B_val=val)


# ---- the LRS steps --------------------------------------------------------------------------
def prior_stats(part: Part, sh: Shared, which: str) -> PriorStatistics:
    return prior_statistics(state(part, sh), samples(part, which))


def user_update(part: Part, sh: Shared, prior: UserPrior, p: StepParams, which: str) -> Part:
    st = state(part, sh, copy=True)
    user_step(st, samples(part, which), p, prior=prior)
    return replace(part, c_u=st.user_bias, W=st.W, B_idx=st.B_idx, B_val=st.B_val)


def u_stats(part: Part, sh: Shared, which: str) -> tuple[np.ndarray, np.ndarray]:
    return u_step_statistics(state(part, sh), samples(part, which))


def apply_r(part: Part, R: np.ndarray) -> Part:
    return replace(part, W=part.W @ R.T)


def item_stats(
    part: Part, sh: Shared, which: str, lo: int, hi: int
) -> tuple[np.ndarray, np.ndarray]:
    s = samples(part, which)
    if which == "train":
        order, bounds = part.train_order, part.train_bounds
    else:
        order, bounds = _item_index(s.items, sh.F.shape[0])
    return pack(_item_statistics(state(part, sh), s, order, bounds, lo, hi))


def item_bias_stats(part: Part, sh: Shared, which: str) -> tuple[np.ndarray, np.ndarray]:
    return item_bias_statistics(state(part, sh), samples(part, which))


def sq_error(part: Part, sh: Shared, which: str, lo: float, hi: float) -> tuple[float, int]:
    return squared_error(state(part, sh), samples(part, which), lo, hi)


def sq_errors_val(part: Part, sh: Shared, lo: float, hi: float) -> np.ndarray:
    s = part.val
    err = state(part, sh).predict(s.users, s.items, lo, hi) - s.ratings
    return np.asarray(err * err)


# ---- copies ---------------------------------------------------------------------------------
def save(part: Part, name: str) -> Part:
    return replace(
        part, saved={**part.saved, name: Saved.of(part.c_u, part.W, part.B_idx, part.B_val)}
    )


def restore(part: Part, name: str) -> Part:
    sv = part.saved[name]
    return replace(
        part, c_u=sv.c_u.copy(), W=sv.W.copy(), B_idx=sv.b_idx.copy(), B_val=sv.b_val.copy()
    )


def drop(part: Part, *names: str) -> Part:
    return replace(part, saved={k: v for k, v in part.saved.items() if k not in names})


def with_bias(part: Part, c_u: np.ndarray) -> Part:
    return replace(part, c_u=c_u)


def zero_b(part: Part) -> Part:
    idx, val = b_rows.zero_b(part.n_users, 0)
    return replace(part, B_idx=idx, B_val=val)


# ---- the stored model -------------------------------------------------------------------------
def part_size(part: Part) -> tuple[int, bool, bool]:
    """The partition's number of users, whether all its ratings have a time, whether every user
    has a rating."""
    d = part.data
    rated = bool(np.all(np.bincount(d.users, minlength=part.n_users) > 0))
    return part.n_users, bool(np.isfinite(d.times).all()), rated


def item_counts(part: Part, n_items: int) -> np.ndarray:
    """Every stored rating's item (train and validation: the model's histories), counted."""
    from lrs_rec.training.dask_prior import item_counts as count

    return count(part.data.items, n_items)


def write_shards(
    part: Part,
    U: np.ndarray,
    k: int,
    staging: str,
    first: int,
    rows: int,
    with_times: bool,
    prior_inputs: tuple[float, np.ndarray, np.ndarray, np.ndarray] | None,
) -> tuple[list[dict[str, Any]], tuple[float, np.ndarray, np.ndarray], Any]:
    """Write the partition's users (in the ratings' own units, W in the stored rank-r form, b_u
    as its k largest coordinates, the rating history sorted by item) as model shards ``first``,
    ``first + 1``, ... of at most ``rows`` users into the staging directory. Returns the shards'
    entries, the population prior's sums (n, Σw, Σwwᵀ) and (with ``prior_inputs``: μ, item
    biases, item features as stored, the item descriptors) the onboarding prior's sums
    (:mod:`training.dask_prior`), shard by shard."""
    from lrs_rec.training.dask_prior import add_sums, prior_sums

    from lrs_rec.model_shards import write_user_shard

    unit = part.unit
    idx, val = b_rows.top_k_b(part.B_idx, part.B_val * unit, k, U.shape[0])  # as from_dense_b
    lrs = LRSModel(U=U, W=part.W * unit, B_idx=idx, B_val=val)
    W, B_idx, B_val = np.asarray(lrs.W), np.asarray(lrs.B_idx), np.asarray(lrs.B_val)
    c_u = part.c_u * unit
    d = part.data
    order = np.lexsort((d.items, d.users))
    n = part.n_users
    indptr = np.zeros(n + 1, np.int64)
    np.cumsum(np.bincount(d.users, minlength=n), out=indptr[1:])
    infos = []
    sums = None
    for j, a in enumerate(range(0, max(n, 1), rows)):
        b = min(a + rows, n)
        ra, rb = int(indptr[a]), int(indptr[b])
        sl = order[ra:rb]
        items, ratings = d.items[sl].astype(np.int64), d.ratings[sl].astype(np.float64)
        times = d.times[sl].astype(np.float64) if with_times else None
        infos.append(
            write_user_shard(
                staging,
                first + j,
                user_ids=d.user_ids[a:b].tolist(),
                user_bias=c_u[a:b],
                W=W[a:b],
                B_idx=B_idx[a:b],
                B_val=B_val[a:b],
                history_indptr=indptr[a : b + 1] - ra,
                history_items=items,
                history_ratings=ratings,
                history_timestamps=times,
            )
        )
        if prior_inputs is not None:
            mu, c_i, F, desc = prior_inputs
            shard = LRSModel(U=U, W=W[a:b], B_idx=B_idx[a:b], B_val=B_val[a:b])
            users = (d.users[sl] - a).astype(np.int64)
            sums = add_sums(
                sums, prior_sums(shard, c_u[a:b], mu, c_i, F, users, items, ratings, times, desc)
            )
    return infos, (float(n), W.sum(axis=0), W.T @ W), sums


def add(a: Any, b: Any) -> Any:
    """The reduction of additive statistics: tuples elementwise, everything else by ``+``."""
    if isinstance(a, tuple):
        return tuple(add(x, y) for x, y in zip(a, b, strict=True))
    return a + b


def with_bias_zero(part: Part) -> Part:
    return replace(part, c_u=np.zeros(part.n_users))


@dataclass(frozen=True)
class UserSample:
    """A partition's share of the tuning sample, renumbered to positions in the whole sample."""

    c_u: np.ndarray
    W: np.ndarray
    B_idx: np.ndarray
    B_val: np.ndarray
    train: Samples
    val: Samples


def sample_users(part: Part, sample: np.ndarray) -> UserSample:
    """The rows of the (sorted, global-index) ``sample`` users of this partition."""
    lo, hi = part.data.lo, part.data.hi
    a, b = np.searchsorted(sample, [lo, hi])
    local = sample[a:b] - lo
    remap = np.full(part.n_users, -1, np.int64)
    remap[local] = a + np.arange(local.size)

    def sub(s: Samples) -> Samples:
        new = remap[s.users]
        keep = new >= 0
        return Samples(new[keep].astype(s.users.dtype), s.items[keep], s.ratings[keep])

    return UserSample(
        part.c_u[local], part.W[local], part.B_idx[local], part.B_val[local], sub(part.train),
        sub(part.val),
    )  # fmt: skip
