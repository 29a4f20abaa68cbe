"""LRSModel: validation of its arrays and ids, npz persistence (no pickle)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lrs_rec.model import LRSModel


def _model(**override: object) -> LRSModel:
    U = np.linalg.qr(np.random.default_rng(0).standard_normal((5, 2)))[0]
    arrays: dict[str, object] = {
        "U": U,
        "W": np.ones((3, 2)),
        "B_idx": np.array([[0], [4], [2]]),
        "B_val": np.ones((3, 1)),
    }
    arrays.update(override)
    return LRSModel(**arrays)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ({"B_idx": np.array([[0.0], [4.0], [1.7]])}, "B_idx must hold integers"),  # not truncated
        ({"B_idx": np.array([["a"], ["b"], ["c"]])}, "B_idx must hold integers"),
        ({"B_idx": np.array([[0], [-1], [2]])}, r"B_idx entries must lie in \[0, 5\)"),
        ({"B_val": np.array([[np.nan], [1.0], [1.0]])}, "B_val contains NaN"),
        ({"W": np.ones(3)}, "W must be"),
    ],
)
def test_bad_arrays_are_refused(override, match):
    with pytest.raises(ValueError, match=match):
        _model(**override)


@pytest.mark.parametrize(
    ("users", "match"),
    [
        (np.array([0.5, 1.7]), "user ids must hold integers"),  # not silently truncated to [0, 1]
        (np.array([True, False]), "user ids must hold integers"),
        (np.array([-1, 0]), r"user ids must lie in \[0, 3\)"),  # not the last user
        (np.array([3, 0]), r"user ids must lie in \[0, 3\)"),
    ],
)
def test_bad_user_ids_are_refused(users, match):
    m = _model()
    with pytest.raises(ValueError, match=match):
        m.predict(np.ones((2, 5)), users)
    with pytest.raises(ValueError, match=match):
        m.theta_rows(users)


def test_npz_round_trip_with_and_without_suffix(tmp_path: Path):
    m = _model()
    for name in ("model.npz", "noext"):  # numpy appends .npz to "noext"; load finds it
        written = m.save(tmp_path / name)
        assert Path(written).is_file() and written.endswith(".npz")
        back = LRSModel.load(tmp_path / name)
        for a in ("U", "W", "B_idx", "B_val"):
            np.testing.assert_array_equal(getattr(back, a), getattr(m, a))
    np.savez(tmp_path / "partial.npz", format=np.array("lrs_rec.LRSModel/1"), U=m.U, W=m.W)
    with pytest.raises(ValueError, match=r"partial\.npz: LRSModel arrays are missing"):
        LRSModel.load(tmp_path / "partial.npz")
