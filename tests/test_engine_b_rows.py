"""The engine's k-sparse b_u (``lrs_rec.engine.b_rows``) against the dense (n_users, d) B it
replaced: the helpers, the numpy user step, the U-step statistics and the predictions, at k = 0,
k = d and rows with fewer than k non-zeros."""

from __future__ import annotations

import numpy as np
import pytest

from lrs_rec.engine import b_rows, parallel
from lrs_rec.engine import steps as st
from lrs_rec.engine.b_rows import pairs_of_dense
from lrs_rec.engine.steps import LRSState, Samples, StepParams
from lrs_rec.thresholding import ridge_top_k_refit, top_k_indices

D = 6


def _dense(n: int, d: int, k: int, rng: np.random.Generator) -> np.ndarray:
    B = np.zeros((n, d))
    for u in range(n):  # rows with 0..k non-zeros
        cols = rng.choice(d, size=int(rng.integers(0, k + 1)), replace=False)
        B[u, cols] = rng.normal(size=cols.size)
    return B


@pytest.mark.parametrize("k", [0, 1, 3, D])
def test_helpers_equal_their_dense_twins(k: int) -> None:
    rng = np.random.default_rng(k)
    B = _dense(40, D, k, rng)
    idx, val = pairs_of_dense(B, k)
    assert idx.shape == val.shape == (40, k) and idx.dtype == np.int32
    M = rng.normal(size=(40, D))
    np.testing.assert_array_equal(b_rows.add_b(M.copy(), idx, val), M + B)
    np.testing.assert_allclose(b_rows.b_dot(M, idx, val), np.einsum("nd,nd->n", M, B), atol=1e-14)
    G = rng.normal(size=(40, D, D))
    np.testing.assert_allclose(
        b_rows.gram_b(G, idx, val), np.einsum("uab,ub->ua", G, B), atol=1e-13
    )
    # any order of the pairs, padding slots anywhere: top_k_b gives from_dense_b's pairs
    perm = rng.permuted(np.tile(np.arange(k), (40, 1)), axis=1)
    j, v = np.take_along_axis(idx, perm, axis=1), np.take_along_axis(val, perm, axis=1)
    want = top_k_indices(B, k)
    got_i, got_v = b_rows.top_k_b(j, v, k, D)
    np.testing.assert_array_equal(got_i, want)
    np.testing.assert_array_equal(got_v, np.take_along_axis(B, want, axis=1))


def test_widths_change_like_the_dense_top_k() -> None:
    rng = np.random.default_rng(3)
    B = _dense(30, D, 2, rng)
    idx, val = pairs_of_dense(B, 2)
    wide_i, wide_v = b_rows.with_width(idx, val, 4, D)  # wider: the same B, zero padding
    back = np.zeros_like(B)
    np.put_along_axis(back, wide_i.astype(np.int64), wide_v, axis=1)
    np.testing.assert_array_equal(back, B)
    z_i, z_v = b_rows.with_width(*b_rows.zero_b(30, 0), 3, D)  # width 0 is B = 0
    np.testing.assert_array_equal(z_i, np.tile(np.arange(3), (30, 1)))
    assert not z_v.any()
    assert b_rows.with_width(idx, val, 2, D)[0] is idx
    with pytest.raises(ValueError, match="more than k=1"):
        pairs_of_dense(B + 1.0, 1)


def _fit_users_dense(U, s, p, W, B, w_prior, prec):  # type: ignore[no-untyped-def]
    """The numpy user step's block solve on a dense B (the code the k-sparse form replaced)."""
    n_users, d = B.shape
    r = U.shape[1]
    B = B.copy()
    c = np.zeros(n_users)
    GU = s.G @ U
    UGU = np.einsum("dr,nds->nrs", U, GU)
    sU = s.s @ U
    for _ in range(p.n_inner):
        Gb = np.einsum("uab,ub->ua", s.G, B)
        A = np.zeros((n_users, r + 1, r + 1))
        A[:, 0, 0] = s.n + (p.reg_bias if p.user_bias else 0.0)
        A[:, 0, 1:] = sU
        A[:, 1:, 0] = sU
        A[:, 1:, 1:] = UGU + p.reg_w * prec[None]
        rhs = np.zeros((n_users, r + 1))
        rhs[:, 0] = s.T - np.einsum("ud,ud->u", s.s, B)
        rhs[:, 1:] = (s.h - Gb) @ U + p.reg_w * (w_prior @ prec)
        if not p.user_bias:
            A[:, 0, :] = 0.0
            A[:, :, 0] = 0.0
            A[:, 0, 0] = 1.0
            rhs[:, 0] = 0.0
        sol = np.linalg.solve(A, rhs[:, :, None])[:, :, 0]
        c, W = sol[:, 0], sol[:, 1:]
        B = np.zeros((n_users, d))
        if p.k > 0:
            xr = s.h - c[:, None] * s.s - np.einsum("uab,ub->ua", GU, W)
            idx, bs = ridge_top_k_refit(s.G, xr, p.k, p.reg_b)
            np.put_along_axis(B, idx, bs, axis=1)
    return c, W, B


def _problem(seed: int, k: int, one_hot: bool = False) -> tuple[LRSState, Samples, np.ndarray]:
    rng = np.random.default_rng(seed)
    n_users, n_items, r = 30, D if one_hot else 25, 3
    users = np.concatenate([np.arange(n_users), rng.integers(0, n_users, 400)])
    items = rng.integers(0, n_items, users.size)
    F = np.eye(D) if one_hot else rng.normal(size=(n_items, D))
    B = _dense(n_users, D, k, rng)
    state = LRSState(
        0.2, rng.normal(size=n_users), rng.normal(size=n_items), F,
        np.linalg.qr(rng.normal(size=(D, r)))[0], rng.normal(size=(n_users, r)),
        *pairs_of_dense(B, k),
    )  # fmt: skip
    return state, Samples(users, items, rng.normal(size=users.size)), B


@pytest.fixture
def numpy_backend():  # type: ignore[no-untyped-def]
    parallel.configure(n_threads=1, kernels=None)
    yield
    parallel.configure(n_threads=1, kernels=None)


@pytest.mark.parametrize("one_hot", [False, True])
@pytest.mark.parametrize("k", [0, 2, D])
def test_user_step_equals_the_dense_b_step(k: int, one_hot: bool, numpy_backend: None) -> None:
    state, data, B = _problem(k, k, one_hot)
    p = StepParams(k=k, per_user_w=True, user_bias=True, reg_w=2.0, reg_b=3.0, reg_bias=1.0)
    prior = st.user_prior(state, data, p)
    s = st._compute_user_stats(state, data, state.W.shape[0])
    means = prior.means(s.s @ state.U, s.n)
    c, W, B_new = _fit_users_dense(state.U, s, p, state.W, B, means, prior.prec)
    st.user_step(state, data, p, prior=prior, block=7)  # several blocks
    np.testing.assert_allclose(state.user_bias, c, rtol=0, atol=1e-10)
    np.testing.assert_allclose(state.W, W, rtol=0, atol=1e-10)
    np.testing.assert_allclose(state.dense_b(), B_new, rtol=0, atol=1e-10)
    assert state.B_idx.shape == (30, k)


@pytest.mark.parametrize("k", [0, 2, D])
def test_u_statistics_and_predictions_equal_the_dense_b_ones(k: int, numpy_backend: None) -> None:
    state, data, B = _problem(10 + k, k)
    A, rhs = st.u_step_statistics(state, data, block=9)
    s = st._compute_user_stats(state, data, state.W.shape[0])
    W = state.W
    A_ref = np.einsum("uab,up,uq->abpq", s.G, W, W)
    resid = s.h - state.user_bias[:, None] * s.s - np.einsum("uab,ub->ua", s.G, B)
    np.testing.assert_allclose(A, A_ref, rtol=1e-12, atol=1e-10)
    np.testing.assert_allclose(rhs, resid.T @ W, rtol=1e-12, atol=1e-10)
    theta = W @ state.U.T + B
    np.testing.assert_array_equal(state.theta(), theta)
    np.testing.assert_array_equal(state.theta_rows(4, 11), theta[4:11])
    want = 0.2 + state.user_bias[data.users] + state.item_bias[data.items]
    want += np.einsum("nd,nd->n", state.F[data.items], theta[data.users])
    np.testing.assert_allclose(state.predict(data.users, data.items, -99, 99), want, atol=1e-12)
    c_i, n_i = st.item_bias_statistics(state, data)  # residuals without the item biases
    np.testing.assert_array_equal(n_i, np.bincount(data.items, minlength=25))
    resid_i = data.ratings - want + state.item_bias[data.items]
    np.testing.assert_allclose(c_i, np.bincount(data.items, resid_i, minlength=25), atol=1e-10)
