"""The user step of :mod:`lrs_rec.engine.steps` for one-hot item features (f_i = e_i, d = n_items).

With the item identity as features — the data-independent public features of private training
(private ALS) — d equals the number of items, so the dense step's per-user d × d Grams and the
(n_users, d) matrix B cannot be held. The algebra is the same as ``steps.user_step`` /
``steps._fit_users`` with XᵀX = diag(rated items):

* (c_u, w_u): ridge on the design [1, U_i] (U_i = row i of U = f_iᵀU) with the prior
  λ_w (w − m_u)ᵀ Σ̃⁻¹ (w − m_u) of :class:`~lrs_rec.engine.steps.UserPrior`, target t − b_u[i];
* b_u: the ridge solution over all d coordinates is e_ui / (1 + λ_b) on the rated items and 0
  elsewhere (e = t − c_u − ⟨U_i, w_u⟩), its top-k support (ties towards the lower item index,
  as ``thresholding.top_k_indices``), and the ridge refit on that support gives the same values.

b_u is kept compressed (``B_idx``, ``B_val``: k sorted coordinates per user, as ``LRSModel``), and
every per-rating array is r-wide, in user blocks of at most ``steps.sample_budget`` ratings.
``tests/test_engine_onehot.py`` checks the step against ``steps.user_step`` with F = I.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lrs_rec.engine import steps
from lrs_rec.engine.grouped import grouped_gram, grouped_sum
from lrs_rec.engine.parallel import block_map
from lrs_rec.engine.steps import Samples, StepParams, UserPrior


@dataclass
class OneHotState:
    """The iterate of the alternating minimisation with one-hot item features (F = I implicit)."""

    global_mean: float
    user_bias: np.ndarray  # (n_users,)
    item_bias: np.ndarray  # (n_items,)
    U: np.ndarray  # (n_items, r): row i is f_iᵀU
    W: np.ndarray  # (n_users, r)
    B_idx: np.ndarray  # (n_users, k) int64, each row strictly increasing
    B_val: np.ndarray  # (n_users, k)

    def to_dense(self) -> steps.LRSState:
        """The same iterate as a dense :class:`~lrs_rec.engine.steps.LRSState` (small data only)."""
        n_items = self.U.shape[0]
        return steps.LRSState(
            self.global_mean, self.user_bias.copy(), self.item_bias.copy(), np.eye(n_items),
            self.U.copy(), self.W.copy(), self.B_idx.copy(), self.B_val.copy(),
        )  # fmt: skip

    def predict(self, users: np.ndarray, items: np.ndarray, lo: float, hi: float) -> np.ndarray:
        """μ + c_u + c_i + ⟨U_i, w_u⟩ + b_u[i], clipped (row chunks of ``steps.ROW_CHUNK``)."""
        out = np.empty(users.shape[0])
        for a in range(0, users.shape[0], steps.ROW_CHUNK):
            u, i = users[a : a + steps.ROW_CHUNK], items[a : a + steps.ROW_CHUNK]
            out[a : a + steps.ROW_CHUNK] = (
                self.global_mean
                + self.user_bias[u]
                + self.item_bias[i]
                + np.einsum("nr,nr->n", self.U[i], self.W[u])
                + sparse_inner(self.B_idx[u], self.B_val[u], i)
            )
        return np.asarray(np.clip(out, lo, hi))


def sparse_inner(B_idx: np.ndarray, B_val: np.ndarray, items: np.ndarray) -> np.ndarray:
    """b_u[i] per sample, from the sample's rows of the compressed B (``B_idx[u]``, ``B_val[u]``)."""
    if B_idx.shape[1] == 0:
        return np.zeros(items.shape[0])
    return np.asarray(np.sum(np.where(B_idx == items[:, None], B_val, 0.0), axis=1))


def top_k_per_user(
    users: np.ndarray, items: np.ndarray, values: np.ndarray, n_users: int, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """The k largest-magnitude ``values`` of each user (ties towards the lower item index) as
    (idx, val), each (n_users, k), idx strictly increasing per row. A user with fewer than k
    samples is padded with the lowest item indices outside its support, holding 0 (what
    ``top_k_indices`` picks among the zero coordinates of a dense row)."""
    idx = np.zeros((n_users, k), dtype=np.int64)
    val = np.zeros((n_users, k))
    if k == 0:
        return idx, val
    order = np.lexsort((items, -np.abs(values), users))
    u_sorted = users[order]
    starts = np.searchsorted(u_sorted, np.arange(n_users))
    rank = np.arange(order.size) - starts[u_sorted]
    sel = order[rank < k]
    slot = rank[rank < k]
    counts = np.minimum(np.bincount(users, minlength=n_users), k)
    idx[:] = -1
    idx[users[sel], slot] = items[sel]
    val[users[sel], slot] = values[sel]
    short = np.flatnonzero(counts < k)
    if short.size:  # pad: the lowest indices not in the support (2k candidates always suffice)
        cand = np.broadcast_to(np.arange(2 * k), (short.size, 2 * k))
        taken = (cand[:, :, None] == idx[short][:, None, :]).any(axis=2)
        free = np.argsort(taken, axis=1, kind="stable")  # untaken candidates first, ascending
        for s in range(k):
            need = np.flatnonzero(counts[short] <= s)
            rows = short[need]
            idx[rows, s] = free[need, s - counts[rows]]  # candidate j is item index j
    srt = np.argsort(idx, axis=1)
    return np.take_along_axis(idx, srt, axis=1), np.take_along_axis(val, srt, axis=1)


def user_step(
    state: OneHotState,
    data: Samples,
    p: StepParams,
    *,
    prior: UserPrior,
    block: int | None = None,
) -> None:
    """Update c_u, w_u, b_u of every user given U (one-hot features): ``steps.user_step`` with
    F = I, blockwise over users (at most ``steps.sample_budget`` ratings per block). The prior is
    given by the caller (``UserPrior``; e.g. a public one for private training)."""
    if not p.per_user_w or p.b_step != "ridge":
        raise ValueError(
            "the one-hot user step is the trainer's (per_user_w=True, b_step='ridge'), got "
            f"per_user_w={p.per_user_w}, b_step={p.b_step!r}"
        )
    n_users, r = state.W.shape
    k = p.k
    width = (r + 1) * (r + 2) + 2 * k + 8  # floats held per rating in a block
    budget = steps.sample_budget(width)

    def fit_block(
        blk: tuple[int, int, np.ndarray],
    ) -> tuple[int, int, tuple[np.ndarray, ...]]:
        lo, hi, sl = blk
        u = data.users[sl] - lo
        i = data.items[sl]
        t = data.ratings[sl] - state.global_mean - state.item_bias[i]
        return lo, hi, _fit_users(state, u, i, t, hi - lo, lo, p, prior)

    blocks = steps.key_blocks(data.users, n_users, block or n_users, budget)
    for lo, hi, (c, W, idx, val) in block_map(fit_block, blocks):
        state.user_bias[lo:hi] = c
        state.W[lo:hi] = W
        state.B_idx[lo:hi] = idx
        state.B_val[lo:hi] = val


def _fit_users(
    state: OneHotState,
    u: np.ndarray,
    i: np.ndarray,
    t: np.ndarray,
    n: int,
    lo: int,
    p: StepParams,
    prior: UserPrior,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``steps._fit_users`` for the users lo..lo+n-1 with XᵀX = diag(rated items)."""
    r = state.U.shape[1]
    Z = state.U[i]  # f_iᵀU per rating
    cnt = np.bincount(u, minlength=n).astype(float)
    UGU = grouped_gram(u, n, Z)
    sU = grouped_sum(u, n, Z)
    means = prior.means(sU, cnt)
    prec = prior.prec
    B_idx = state.B_idx[lo : lo + n]
    B_val = state.B_val[lo : lo + n]
    c = np.zeros(n)
    W = state.W[lo : lo + n]
    for _ in range(p.n_inner):
        tb = t - sparse_inner(B_idx[u], B_val[u], i)
        A = np.zeros((n, r + 1, r + 1))
        A[:, 0, 0] = cnt + (p.reg_bias if p.user_bias else 0.0)
        A[:, 0, 1:] = sU
        A[:, 1:, 0] = sU
        A[:, 1:, 1:] = UGU + p.reg_w * prec[None]
        rhs = np.zeros((n, r + 1))
        rhs[:, 0] = np.bincount(u, tb, minlength=n)
        rhs[:, 1:] = grouped_sum(u, n, Z * tb[:, None]) + p.reg_w * (means @ prec)
        if not p.user_bias:
            A[:, 0, :] = 0.0
            A[:, :, 0] = 0.0
            A[:, 0, 0] = 1.0
            rhs[:, 0] = 0.0
        sol = np.linalg.solve(A, rhs[:, :, None])[:, :, 0]
        c, W = sol[:, 0], sol[:, 1:]
        e = t - c[u] - np.einsum("nr,nr->n", Z, W[u])
        B_idx, B_val = top_k_per_user(u, i, e / (1.0 + p.reg_b), n, p.k)
    return c, W, B_idx, B_val
