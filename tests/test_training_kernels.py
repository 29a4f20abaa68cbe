"""The compiled (numba) kernels against the engine's numpy reference: the same user step, prior
statistics, item step and statistics, losses and ALS initialisation on small random problems (users
with 0 and 1 ratings, k = 0, without user biases, priors on and off), the same whole trained model,
and the same result bit for bit with 1 and 2 threads."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("numba")

from lrs_rec.training.kernels import NumbaKernels

from lrs_rec.engine import parallel
from lrs_rec.engine.b_rows import pairs_of_dense
from lrs_rec.engine.steps import (
    LRSState,
    Samples,
    StepParams,
    item_bias_statistics,
    item_block_statistics,
    item_step,
    prior_statistics,
    squared_error,
    user_step,
)

N_USERS, N_ITEMS, D, R, K = 70, 45, 8, 3, 2
TOL = dict(rtol=1e-10, atol=1e-10)


@pytest.fixture
def backend() -> Iterator[None]:
    """Restore the reference backend and one thread after each test."""
    yield
    parallel.configure(n_threads=1, kernels=None)


def _use(kernels: bool, threads: int = 1) -> None:
    parallel.configure(n_threads=threads, kernels=NumbaKernels() if kernels else None)


def _problem(seed: int = 0) -> tuple[LRSState, Samples]:
    rng = np.random.default_rng(seed)
    n = 1200
    # users 0..19 rate 2..9 items (fewer than d: the dual forms), 20..59 about 28 each;
    # 60..64 one each; 65..69 none
    few = np.repeat(np.arange(20), rng.integers(2, 10, 20))
    users = np.concatenate([few, rng.integers(20, 60, n), np.arange(60, 65)])
    items = rng.integers(0, N_ITEMS, users.size)
    ratings = rng.normal(size=users.size)
    U, _ = np.linalg.qr(rng.normal(size=(D, R)))
    B = np.zeros((N_USERS, D))
    B[np.arange(N_USERS), rng.integers(0, D, N_USERS)] = rng.normal(size=N_USERS)
    state = LRSState(
        0.1,
        rng.normal(size=N_USERS),
        rng.normal(size=N_ITEMS),
        rng.normal(size=(N_ITEMS, D)),
        U,
        rng.normal(size=(N_USERS, R)),
        *pairs_of_dense(B, K),
    )
    return state, Samples(users, items, ratings)


def _copy(s: LRSState) -> LRSState:
    return LRSState(
        s.global_mean,
        s.user_bias.copy(),
        s.item_bias.copy(),
        s.F.copy(),
        s.U.copy(),
        s.W.copy(),
        s.B_idx.copy(),
        s.B_val.copy(),
    )


BASE = StepParams(k=K, per_user_w=True, user_bias=True, reg_w=2.0, reg_b=3.0, reg_bias=1.0)
VARIANTS = [
    BASE,
    replace(BASE, k=0),
    replace(BASE, user_bias=False),
    replace(BASE, population_prior=False, conditional_prior=False),
    replace(BASE, conditional_prior=False, n_inner=3),
    replace(BASE, k=D, reg_w=0.5),
]


@pytest.mark.parametrize(
    "p",
    VARIANTS,
    ids=lambda p: (
        f"k{p.k}-b{p.user_bias}-pp{p.population_prior}-cp{p.conditional_prior}-n{p.n_inner}"
    ),
)
def test_user_step_kernel_equals_the_numpy_reference(p: StepParams, backend: None) -> None:
    state, data = _problem(1)
    state.ensure_b_width(p.k)  # a state holds at most k non-zeros per row
    ref = _copy(state)
    _use(False)
    user_step(ref, data, p)
    _use(True)
    user_step(state, data, p)
    np.testing.assert_allclose(state.W, ref.W, **TOL)
    np.testing.assert_allclose(state.dense_b(), ref.dense_b(), **TOL)
    np.testing.assert_allclose(state.user_bias, ref.user_bias, **TOL)
    assert np.array_equal(state.dense_b() != 0, ref.dense_b() != 0)  # the same supports
    assert state.B_idx.shape == ref.B_idx.shape == (N_USERS, p.k)


def test_prior_statistics_kernel_equals_the_numpy_reference(backend: None) -> None:
    state, data = _problem(2)
    _use(False)
    ref = prior_statistics(state, data)
    _use(True)
    fast = prior_statistics(state, data, block=16)  # several user blocks
    for name in ("sw", "sww", "sz", "szz", "szw"):
        np.testing.assert_allclose(getattr(fast, name), getattr(ref, name), **TOL)
    assert fast.n == ref.n


def test_item_step_and_statistics_kernels_equal_the_numpy_reference(backend: None) -> None:
    state, data = _problem(3)
    ref = _copy(state)
    _use(False)
    item_step(ref, data, reg_features=2.0, reg_bias=0.5, refine_features=True)
    lo, hi = 5, 23
    sl = np.flatnonzero((data.items >= lo) & (data.items < hi))
    G0, h0 = item_block_statistics(state, data, lo, hi, sl)
    tot0, n0 = item_bias_statistics(state, data)
    sse0 = squared_error(state, data, -2.0, 2.0)
    pred0 = state.predict(data.users, data.items, -2.0, 2.0)
    _use(True)
    G1, h1 = item_block_statistics(state, data, lo, hi, sl[::-1].copy())  # any sample order
    tot1, n1 = item_bias_statistics(state, data)
    sse1 = squared_error(state, data, -2.0, 2.0)
    pred1 = state.predict(data.users, data.items, -2.0, 2.0)
    item_step(state, data, reg_features=2.0, reg_bias=0.5, refine_features=True)
    np.testing.assert_allclose(state.F, ref.F, **TOL)
    np.testing.assert_allclose(state.item_bias, ref.item_bias, **TOL)
    np.testing.assert_allclose(G1, G0, **TOL)
    np.testing.assert_allclose(h1, h0, **TOL)
    np.testing.assert_allclose(tot1, tot0, **TOL)
    np.testing.assert_array_equal(n1, n0)
    np.testing.assert_allclose(pred1, pred0, **TOL)
    assert sse1[1] == sse0[1] and sse1[0] == pytest.approx(sse0[0], rel=1e-12)


def test_two_threads_give_the_same_steps_bit_for_bit(backend: None) -> None:
    state, data = _problem(4)
    out = []
    for threads in (1, 2):
        _use(True, threads)
        s = _copy(state)
        user_step(s, data, BASE)
        item_step(s, data, reg_features=2.0, reg_bias=0.5, refine_features=True)
        user_step(s, data, BASE)
        out.append((s, squared_error(s, data, -2.0, 2.0), prior_statistics(s, data)))
    (a, ea, pa), (b, eb, pb) = out
    for name in ("W", "B_idx", "B_val", "F", "user_bias", "item_bias"):
        assert np.array_equal(getattr(a, name), getattr(b, name)), name
    assert ea == eb
    assert np.array_equal(pa.szz, pb.szz) and np.array_equal(pa.szw, pb.szw)


@pytest.mark.parametrize(
    ("min_count", "cg_steps", "one_side"),
    [(1.0, 0, False), (5.0, 0, False), (1.0, 2, False), (5.0, 3, True)],
)
def test_als_initialisation_kernel_equals_the_numpy_reference(
    min_count: float, cg_steps: int, one_side: bool, backend: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lrs_rec.training import features
    from lrs_rec.training.features import als_factors

    if one_side:  # CG on the users' half only (the items' factors are the small other side)
        monkeypatch.setattr(features, "CG_OTHER_BYTES", (N_ITEMS + 3) * (D + 1) * 8)
        assert features.cg_steps_for(N_USERS, D, 3) == 0 < features.cg_steps_for(N_ITEMS + 3, D, 3)

    _, data = _problem(5)
    out = []
    for kernels in (False, True):
        _use(kernels)
        out.append(
            als_factors(
                data.users,
                data.items,
                data.ratings,
                n_users=N_USERS,
                n_items=N_ITEMS + 3,
                dim=D,
                reg=0.1,
                reg_bias=1.0,
                n_iter=3,
                random_state=np.random.default_rng(0),
                min_count=min_count,
                cg_steps=cg_steps,
            )
        )
    ref, fast = out
    for name in ("user_bias", "item_bias", "P", "Q"):
        np.testing.assert_allclose(getattr(fast, name), getattr(ref, name), **TOL)
    assert fast.global_mean == ref.global_mean


def test_trainer_with_numba_kernels_equals_the_numpy_trainer_and_threads_agree(
    tmp_path: Path,
) -> None:
    """`lrs-rec train` (tuning, early stopping, final pass included) with the compiled kernels
    gives the numpy reference's model, and the same model bit for bit with 1 and 2 threads."""
    from lrs_rec.serving.cli import main
    from lrs_rec.training.synthetic_scale import make_biased_mf, write_csv

    data = write_csv(make_biased_mf(1200, 300, random_state=3), tmp_path / "r.csv")
    arrays = {}
    for kernels, threads in (("numpy", 1), ("numba", 1), ("numba", 2)):
        out = tmp_path / f"m-{kernels}-{threads}"
        argv = ["train", "--ratings", str(data), "--out", str(out), "--quiet", "--no-export"]
        argv += ["--n-iter", "3", "--threads", str(threads), "--kernels", kernels]
        assert main(argv) == 0
        assert (parallel.kernels() is None) == (kernels == "numpy")
        arrays[kernels, threads] = dict(np.load(out / "arrays.npz"))
    ref, one, two = arrays["numpy", 1], arrays["numba", 1], arrays["numba", 2]
    assert sorted(ref) == sorted(one) == sorted(two)
    for name in ref:
        np.testing.assert_array_equal(one[name], two[name], err_msg=name)  # bit for bit
        if ref[name].dtype.kind == "f":
            np.testing.assert_allclose(one[name], ref[name], rtol=1e-8, atol=1e-9, err_msg=name)
        else:
            np.testing.assert_array_equal(one[name], ref[name], err_msg=name)


@pytest.mark.parametrize("reg_bias", [1.0, 0.0])
def test_als_cg_half_step_kernel_equals_the_numpy_steps(reg_bias: float) -> None:
    """One CG half-step from a given start (users with 0, 1, few and many ratings; items never
    rated): the kernel's matrix-free passes give als_solve's steps on the formed normal equations."""
    from lrs_rec.training.features import als_half_step
    from lrs_rec.training.kernels import als_half_step_cg

    _, data = _problem(7)
    rng = np.random.default_rng(1)
    F = rng.normal(size=(N_ITEMS, D))
    c_i = rng.normal(size=N_ITEMS)
    x0 = rng.normal(size=(N_USERS, D + 1))
    n_u = np.bincount(data.users, minlength=N_USERS).astype(float)
    kw = {"reg": 0.1, "reg_bias": reg_bias, "min_count": 3.0}
    for steps in (1, 2, 4):
        t = data.ratings - 0.2 - c_i[data.items]
        start = (x0[:, 0].copy(), x0[:, 1:].copy())
        c_ref, P_ref = als_half_step(
            data.users, N_USERS, n_u, data.items, F, t, **kw, x0=start, cg_steps=steps
        )
        c, P = x0[:, 0].copy(), x0[:, 1:].copy()
        als_half_step_cg(*data.csr("user", N_USERS), F, c_i, 0.2, 0.1, reg_bias, 3.0, c, P, steps)
        np.testing.assert_allclose(c, c_ref, **TOL)
        np.testing.assert_allclose(P, P_ref, **TOL)
    assert not np.allclose(P, x0[:, 1:])


def test_als_cg_converges_to_the_exact_ridge() -> None:
    """Enough CG steps (more than the dimension) from any start reach the exact solve."""
    from lrs_rec.training.features import als_solve

    rng = np.random.default_rng(2)
    Z = rng.normal(size=(6, 30, D + 1))
    Z[:, :, 0] = 1.0
    G = np.einsum("nji,njk->nik", Z, Z)
    h = rng.normal(size=(6, D + 1))
    counts = np.full(6, 30.0)
    kw = {"reg": 0.05, "reg_bias": 1.0, "min_count": 1.0}
    exact = als_solve(G, h, counts, **kw)
    cg = als_solve(G, h, counts, **kw, x0=rng.normal(size=(6, D + 1)), cg_steps=4 * (D + 1))
    np.testing.assert_allclose(cg, exact, rtol=1e-8, atol=1e-10)
    few = als_solve(G, h, counts, **kw, x0=np.zeros((6, D + 1)), cg_steps=2)
    assert not np.allclose(few, exact)


@pytest.mark.parametrize("kernels", [False, True])
def test_csr_layout_is_the_lexsort_order(kernels: bool, backend: None) -> None:
    """Samples.csr's one-key stable sort (numpy) and its two counting sorts (kernels) give
    np.lexsort((other, key))'s order, duplicates and keys without samples included (the slow
    twin)."""
    _use(kernels)
    rng = np.random.default_rng(4)
    users = rng.integers(0, 30, 500).astype(np.int32)
    items = rng.integers(0, 12, 500).astype(np.int32)  # many duplicate (user, item) pairs
    ratings = rng.normal(size=500)
    data = Samples(users, items, ratings)
    for by, key, other, n in (("user", users, items, 33), ("item", items, users, 15)):
        indptr, idx, vals = data.csr(by, n)
        order = np.lexsort((other, key))
        np.testing.assert_array_equal(idx, other[order])
        np.testing.assert_array_equal(vals, ratings[order])
        np.testing.assert_array_equal(np.diff(indptr), np.bincount(key, minlength=n))


@pytest.mark.parametrize("dtype", [np.int32, np.int64])
def test_lex_order_kernel_is_np_lexsort(dtype: type) -> None:
    """The counting-sort twin of np.lexsort((minor, major)): the same permutation (ties in both
    keys keep their positions), keys absent from the data, one row, no rows."""
    from lrs_rec.training.kernels import lex_order

    rng = np.random.default_rng(8)
    for n, n_major, n_minor in ((3000, 40, 17), (1, 5, 5), (0, 3, 2), (900, 1, 300)):
        major = rng.integers(0, max(n_major - 2, 1), n).astype(dtype)  # the top keys unused
        minor = rng.integers(0, n_minor, n).astype(dtype)
        got = lex_order(major, n_major, minor, n_minor)
        np.testing.assert_array_equal(got, np.lexsort((minor, major)))
        assert got.dtype == np.intp


def test_history_order_is_the_lexsort_order() -> None:
    from lrs_rec.training.pipeline import history_order

    rng = np.random.default_rng(5)
    users, items = rng.integers(0, 25, 400), rng.integers(0, 9, 400)
    order = history_order(Samples(users, items, rng.normal(size=400)))
    np.testing.assert_array_equal(order, np.lexsort((items, users)))


@pytest.mark.parametrize("threads", [1, 2])
def test_bias_kernel_equals_the_bincount_reference_bit_for_bit(threads: int, backend: None) -> None:
    """fit_biases from the samples' CSR layouts (kernels, row-parallel) gives the np.bincount
    reference's μ, c_u, c_i bit for bit on samples in the trainer's order (users and items
    without ratings included); samples in another order take the reference path."""
    from lrs_rec.training.features import fit_biases

    _, data = _problem(9)
    order = np.lexsort((data.items, data.users))
    data = Samples(data.users[order], data.items[order], data.ratings[order])
    assert data.in_order("user")
    kw = {"n_users": N_USERS, "n_items": N_ITEMS + 3, "reg_user": 2.0, "reg_item": 3.0}
    out = []
    for kernels in (False, True):
        _use(kernels, threads)
        out.append(fit_biases(data.users, data.items, data.ratings, **kw, n_iter=4, samples=data))
    (mu_r, cu_r, ci_r), (mu, cu, ci) = out
    assert mu == mu_r
    np.testing.assert_array_equal(cu, cu_r)
    np.testing.assert_array_equal(ci, ci_r)
    assert ci[-1] == 0.0 and np.any(cu != 0.0)
