"""The Dask engine's input helpers against their slow, obvious twins (no cluster needed): the
partition of an id by splitters in natural order, the merged vocabulary, the validation draws at
a row offset, the partition bounds, the packed item statistics, a partition built from pieces."""

from __future__ import annotations

import numpy as np
import pytest
from lrs_rec.training.dask_input import (
    Piece,
    bucket_of,
    build_partition,
    expand_inputs,
    merge_sorted_ids,
    validation_draws,
)
from lrs_rec.training.vocab import Vocabulary, _natural_key

IDS = ["10", "2", "007", "7", "u1", "u10", "b", "", "99999999999999999999", "a", "²", "1"]


def bucket_of_reference(ids: list[str], splitters: list[str]) -> list[int]:
    return [sum(1 for s in splitters if _natural_key(s) <= _natural_key(i)) for i in ids]


@pytest.mark.parametrize("n_split", [0, 1, 3, 6])
def test_bucket_of_equals_the_count_of_splitters_at_or_before_each_id(n_split: int) -> None:
    rng = np.random.default_rng(n_split)
    vocab = list(Vocabulary.from_ids_reference([i for i in IDS if i]).ids)
    splitters = sorted(rng.choice(vocab, n_split, replace=False).tolist(), key=_natural_key)
    ids = [i for i in IDS if i]
    got = bucket_of(np.array(ids, dtype=str), np.array(splitters, dtype=str))
    assert got.tolist() == bucket_of_reference(ids, splitters)


def test_merged_vocabulary_is_the_local_vocabulary_of_the_union() -> None:
    parts = [["3", "10", "x"], ["2", "10", "007"], ["7", "b"]]
    sorted_parts = [np.array(Vocabulary.from_ids_reference(p).ids, dtype=str) for p in parts]
    got = merge_sorted_ids(sorted_parts).tolist()
    assert got == list(Vocabulary.from_ids_reference([i for p in parts for i in p]).ids)


def test_validation_draws_at_an_offset_are_the_local_engines_draws() -> None:
    whole = np.random.default_rng(11).random(1000)
    np.testing.assert_array_equal(validation_draws(11, 0, 1000), whole)
    np.testing.assert_array_equal(validation_draws(11, 613, 387), whole[613:])


def test_partition_bounds_cover_every_user_once() -> None:
    from lrs_rec.training.dask_engine import SHARD_ALIGN, partition_bounds

    for n_users, n_parts in [(5, 5), (300, 2), (100_000, 2), (1_000_003, 7)]:
        b = partition_bounds(n_users, n_parts)
        assert b[0] == 0 and b[-1] == n_users and len(b) == n_parts + 1
        assert np.all(np.diff(b) > 0)
        if n_users >= 2 * SHARD_ALIGN * n_parts:
            assert np.all(b[1:-1] % SHARD_ALIGN == 0)


def test_packed_item_statistics_round_trip() -> None:
    from lrs_rec.training.dask_parts import pack, unpack

    rng = np.random.default_rng(0)
    A = rng.normal(size=(4, 5, 5))
    G, h = A @ A.transpose(0, 2, 1), rng.normal(size=(4, 5))
    G2, h2 = unpack(pack((G, h)))
    np.testing.assert_array_equal(G2, G)
    np.testing.assert_array_equal(h2, h)


def _piece(users: list[str], items: list[int], ratings: list[float], times: list[float],
           rows: list[int]) -> Piece:  # fmt: skip
    uniq, codes = np.unique(np.array(users, dtype=str), return_inverse=True)
    return Piece(
        codes.astype(np.int32),
        uniq,
        np.array(items, np.int32),
        np.array(ratings),
        np.array(times),
        np.array(rows, np.int64),
        np.linspace(0, 1, len(rows)),
    )


def test_a_partition_from_two_files_orders_rows_renumbers_users_and_drops_older_duplicates() -> (
    None
):
    a = _piece(["10", "2", "2"], [0, 0, 1], [1.0, 2.0, 3.0], [5.0, 5.0, 9.0], [0, 1, 2])
    b = _piece(["2", "10"], [1, 1], [4.0, 5.0], [1.0, 7.0], [3, 4])  # (2, 1) older: dropped
    part = build_partition(40, 42, 0.0, a, b)
    assert part.user_ids.tolist() == ["2", "10"]
    assert part.duplicates_removed == 1
    assert part.users.tolist() == [1, 0, 0, 1]  # "10" -> 1, "2" -> 0, rows 0, 1, 2, 4
    assert part.ratings.tolist() == [1.0, 2.0, 3.0, 5.0]
    with pytest.raises(RuntimeError, match="3 distinct users, expected 2"):
        build_partition(0, 2, 0.0, a, _piece(["99"], [0], [1.0], [1.0], [5]))


def test_expand_inputs_names_what_is_missing(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from lrs_rec.training.loaders import RatingFileError

    with pytest.raises(FileNotFoundError, match="no such rating file"):
        expand_inputs(str(tmp_path / "nope.csv"))
    with pytest.raises(FileNotFoundError, match="no file matches"):
        expand_inputs(str(tmp_path / "*.csv"))
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / ".hidden").write_text("x")
    with pytest.raises(RatingFileError, match="holds no rating files"):
        expand_inputs(str(tmp_path / "d"))


def test_a_saved_copy_keeps_b_sparse_and_restores_it_exactly() -> None:
    from lrs_rec.training.dask_parts import Saved

    from lrs_rec.engine.b_rows import pairs_of_dense

    rng = np.random.default_rng(2)
    B = np.zeros((300, 8))
    for i in range(0, 300, 3):
        j = rng.choice(8, int(rng.integers(0, 4)), replace=False)
        B[i, j] = rng.normal(size=j.size)
    idx, val = pairs_of_dense(B, 3)
    s = Saved.of(rng.normal(size=300), rng.normal(size=(300, 2)), idx, val)
    assert s.b_idx.shape == (300, 3)  # k, not d
    idx[:] = 0  # the copy owns its arrays
    back = np.zeros_like(B)
    np.put_along_axis(back, s.b_idx.astype(np.int64), s.b_val, axis=1)
    np.testing.assert_array_equal(back, B)
