"""The trainer's lean layout (issue 14, memory): samples in history order sharing the user CSR,
the table released once encoded, compact history columns, arrays spilled to disk, chunked θ for
the losses, the blockwise-QR start of U — each against its plain twin, exactly or within a stated
tolerance."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from lrs_rec.training import spill as spill_mod
from lrs_rec.training.config import TrainConfig
from lrs_rec.training.loaders import load_ratings
from lrs_rec.training.pipeline import Column, Snapshot, top_right_singular_vectors, train
from lrs_rec.training.sample_data import make_sample_ratings, write_sample_ratings

from lrs_rec.engine import parallel
from lrs_rec.engine import steps as st
from lrs_rec.engine.b_rows import pairs_of_dense
from lrs_rec.engine.steps import LRSState, Samples

FAST: dict[str, Any] = {"n_iter": 3, "init_iter": 3, "dim": 8, "rank": 3, "sparsity": 2}


@pytest.fixture(scope="module")
def ratings_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rows = make_sample_ratings(240, 100, random_state=5)
    return write_sample_ratings(tmp_path_factory.mktemp("lean") / "r.csv", rows)


def _model_arrays(result: Any) -> dict[str, np.ndarray]:
    m = result.model
    out = {
        name: np.asarray(getattr(m, name))
        for name in ("user_bias", "item_bias", "item_features", "history_indptr",
                     "history_items", "history_ratings", "w_prior_mean", "w_prior_cov")
    }  # fmt: skip
    out.update(U=m.lrs.U, W=m.lrs.W, B_idx=m.lrs.B_idx, B_val=m.lrs.B_val)
    if m.history_timestamps is not None:
        out["history_timestamps"] = m.history_timestamps
    return out


def test_released_table_and_spilled_arrays_give_the_same_model(
    ratings_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = TrainConfig(**FAST, seed=3)
    ref = train(load_ratings(ratings_file), cfg, progress=False)
    table = load_ratings(ratings_file)
    n = len(table)
    monkeypatch.setattr(spill_mod, "SPILL_BYTES", 0)  # every snapshot and column goes to disk
    lean = train(table, cfg, progress=False, release_table=True)
    assert len(table) == n and table.ratings.size == 0  # released: only the row count is left
    a, b = _model_arrays(ref), _model_arrays(lean)
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
        assert a[name].dtype == b[name].dtype, name
    assert ref.model.manifest["data"] == lean.model.manifest["data"]
    assert ref.model.manifest["metrics"]["history"] == lean.model.manifest["metrics"]["history"]


def test_history_is_the_table_in_user_item_order(ratings_file: Path) -> None:
    table = load_ratings(ratings_file)
    result = train(table, TrainConfig(**FAST, seed=1), progress=False)
    m = result.model
    uid = {u: j for j, u in enumerate(m.user_ids)}
    iid = {i: j for j, i in enumerate(m.item_ids)}
    users = np.array([uid[u] for u in table.users])
    items = np.array([iid[i] for i in table.items])
    order = np.lexsort((items, users))
    np.testing.assert_array_equal(m.history_items, items[order])
    np.testing.assert_array_equal(m.history_ratings, table.ratings[order])
    assert m.history_timestamps is not None
    np.testing.assert_array_equal(m.history_timestamps, table.timestamps[order])
    np.testing.assert_array_equal(np.diff(m.history_indptr), np.bincount(users))


@pytest.mark.parametrize(
    ("values", "dtype"),
    [
        (np.array([1.0, 5.0, 3.0, 2.0]), np.int32),  # integral: int32 offsets
        (np.array([1.5e9, 1.7e9, 1.6e9 + 1]), np.int32),  # Unix seconds
        (np.array([0.5, 4.5, 3.0]), np.float32),  # half stars
        (np.array([0.1, 1.0 / 3.0]), np.float64),  # not exact in float32
        (np.array([1.0, np.nan, 2.0]), np.float32),  # NaN kept
        (np.array([0.0, 3e9 + 1]), np.float64),  # integral but too wide for int32
        (np.array([-7.0, 2.0**40 + 1]), np.float64),
    ],
)
def test_column_is_compact_and_exact(
    values: np.ndarray, dtype: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import lrs_rec.training.pipeline as pl

    monkeypatch.setattr(pl, "COLUMN_CHUNK", 2)  # several chunks
    col = Column.of(values)
    assert col.data.dtype == dtype  # type: ignore[union-attr]
    np.testing.assert_array_equal(col.values(), values)
    order = np.arange(values.size)[::-1]
    np.testing.assert_array_equal(Column.of(values, order).values(), values[order])
    spill = spill_mod.Spill(threshold=0)
    try:
        np.testing.assert_array_equal(col.spilled(spill).values(), values)
    finally:
        spill.close()


def test_column_of_nan_only_and_empty() -> None:
    col = Column.of(np.full(5, np.nan))
    assert col.data.size == 1 and np.isnan(col.values()).all() and col.values().size == 5  # type: ignore[union-attr]
    assert Column.of(np.zeros(0)).values().size == 0


def test_snapshot_spilled_to_disk_restores_exactly() -> None:
    rng = np.random.default_rng(0)
    n, d, r = 40, 6, 3
    B = np.zeros((n, d))
    B[np.arange(n), rng.integers(0, d, n)] = rng.normal(size=n)
    state = LRSState(0.1, rng.normal(size=n), rng.normal(size=5), rng.normal(size=(5, d)),
                     np.linalg.qr(rng.normal(size=(d, r)))[0], rng.normal(size=(n, r)), *pairs_of_dense(B, 1))  # fmt: skip
    spill = spill_mod.Spill(threshold=0)
    try:
        snap = Snapshot.of(state, spill)
        assert isinstance(snap.w, spill_mod.Spilled)
        W0 = state.W.copy()
        state.W += 1.0
        state.B_val[:] = 0.0
        snap.restore_into(state)
        np.testing.assert_array_equal(state.W, W0)
        np.testing.assert_array_equal(state.dense_b(), B)
        np.testing.assert_array_equal(snap.restore().dense_b(), B)
        path = snap.w.path  # type: ignore[union-attr]
        snap.discard(spill)
        assert not Path(path).exists()
    finally:
        spill.close()


def test_sorted_samples_share_their_arrays_as_the_user_csr() -> None:
    rng = np.random.default_rng(4)
    users = rng.integers(0, 30, 400).astype(np.int32)
    items = rng.permutation(400).astype(np.int32) % 57
    ratings = rng.normal(size=400)
    shuffled = Samples(users, items, ratings)
    order = np.lexsort((items, users))
    ordered = Samples(users[order], items[order], ratings[order])
    assert ordered.in_order("user") and not shuffled.in_order("user")
    a, b = shuffled.csr("user", 30), ordered.csr("user", 30)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
    assert b[1] is ordered.items and b[2] is ordered.ratings  # no copy
    np.testing.assert_array_equal(ordered.csr("item", 57)[1], shuffled.csr("item", 57)[1])


@pytest.mark.parametrize("sort", [True, False])
def test_chunked_rating_dots_equal_the_reference(
    sort: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("numba")
    from lrs_rec.training.kernels import NumbaKernels

    rng = np.random.default_rng(2)
    n, d, r, n_items = 60, 5, 2, 11
    state = LRSState(0.2, rng.normal(size=n), rng.normal(size=n_items),
                     rng.normal(size=(n_items, d)), np.linalg.qr(rng.normal(size=(d, r)))[0],
                     rng.normal(size=(n, r)), *pairs_of_dense(rng.normal(size=(n, d)), d))  # fmt: skip
    users = rng.integers(0, n, 500)
    items = rng.integers(0, n_items, 500)
    if sort:
        users.sort()
    monkeypatch.setattr(st, "ROW_CHUNK", 37)  # many chunks (sorted: each a narrow user range)
    want = np.einsum("nd,nd->n", state.F[items], state.theta()[users])
    got = st.rating_dots(NumbaKernels(), state, users, items)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    data = Samples(users.astype(np.int32), items.astype(np.int32), rng.normal(size=500))
    ref = st.squared_error(state, data, -1.0, 1.0)
    monkeypatch.setattr(parallel, "_kernels", NumbaKernels())
    assert parallel.kernels() is not None
    fast = st.squared_error(state, data, -1.0, 1.0)
    assert fast[1] == ref[1] and fast[0] == pytest.approx(ref[0], rel=1e-12)


def test_blockwise_qr_gives_the_svd_subspace(monkeypatch: pytest.MonkeyPatch) -> None:
    import lrs_rec.training.pipeline as pl

    rng = np.random.default_rng(7)
    P = rng.normal(size=(1000, 6)) * np.array([5.0, 4.0, 3.0, 2.0, 1.0, 0.5])
    monkeypatch.setattr(pl, "SVD_ROWS", 64)  # 16 blocks
    U = top_right_singular_vectors(P, 3)
    Vt = np.linalg.svd(P, full_matrices=False)[2]
    np.testing.assert_allclose(U @ U.T, Vt[:3].T @ Vt[:3], atol=1e-12)
    np.testing.assert_allclose(U.T @ U, np.eye(3), atol=1e-12)
