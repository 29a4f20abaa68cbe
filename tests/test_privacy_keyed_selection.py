"""The keyed per-user choice of the U-step samples (lrs_rec.privacy.cap_samples_by_key): each rating's
key is a hash of (public seed, user id, item id) and each user keeps its m smallest keys — equal to a
plain-Python reference, ≤ m per user, a uniform m-subset, and the same whatever the row order and
however the users are cut into partitions (what lets the Dask engine pick the local engine's samples).
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lrs_rec.privacy import (
    cap_samples_by_key,
    cap_samples_by_key_reference,
    draw_selection_seed,
    id_hash,
    id_hash_reference,
    selection_keys,
    selection_keys_reference,
    splitmix64,
    splitmix64_reference,
)
from lrs_rec.privacy_items import select_popular_per_user


def _ratings(seed: int, n_users: int = 60, n_items: int = 40):
    rng = np.random.default_rng(seed)
    users, items = [], []
    for u in range(n_users):
        its = rng.choice(n_items, size=int(rng.integers(1, 25)), replace=False)
        users += [u] * its.size
        items += its.tolist()
    user_ids = np.array([f"u{7 * u + 3}" for u in range(n_users)])  # not the index
    item_ids = np.array([str(1000 - i) for i in range(n_items)])
    return np.array(users), np.array(items), user_ids, item_ids


def test_hashes_equal_their_reference_twins():
    x = np.array([0, 1, 12345, 2**63, 2**64 - 1], dtype=np.uint64)
    assert splitmix64(x).tolist() == [splitmix64_reference(int(v)) for v in x]
    ids = ["1", "10", "007", "", "abc", "é", "漢字", "a b", "x" * 70, "\x00a"]
    assert id_hash(np.array(ids)).tolist() == id_hash_reference(ids)
    # the hash is of the text only: the array's string width and block cut do not matter
    wide = np.array(ids, dtype="<U100")
    assert id_hash(wide).tolist() == id_hash(np.array(ids)).tolist()
    assert id_hash(ids[:3]).tolist() == id_hash(np.array(ids))[:3].tolist()
    assert len(set(id_hash(np.arange(5000).astype(str)).tolist())) == 5000
    assert id_hash(np.zeros(0, str)).shape == (0,)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**63 - 1), data_seed=st.integers(0, 10_000), m=st.integers(1, 12))
def test_keyed_selection_equals_the_reference_and_keeps_at_most_m(seed, data_seed, m):
    users, items, uids, iids = _ratings(data_seed, 25, 30)
    keys = selection_keys(seed, id_hash(uids), id_hash(iids), users, items)
    assert keys.tolist() == selection_keys_reference(seed, uids, iids, users, items)
    keep = cap_samples_by_key(users, keys, m)
    np.testing.assert_array_equal(keep, cap_samples_by_key_reference(users, keys.tolist(), m))
    n_u = np.bincount(users, minlength=25)
    np.testing.assert_array_equal(np.bincount(users[keep], minlength=25), np.minimum(n_u, m))


def _chosen(users, items, uids, iids, seed, m):
    """The kept (user id, item id) pairs."""
    keys = selection_keys(seed, id_hash(uids), id_hash(iids), users, items)
    keep = cap_samples_by_key(users, keys, m)
    return {(str(uids[u]), str(iids[i])) for u, i in zip(users[keep], items[keep], strict=True)}


def test_keyed_selection_ignores_row_order_and_the_partitioning_of_users():
    users, items, uids, iids = _ratings(1)
    seed, m = 987654321, 6
    whole = _chosen(users, items, uids, iids, seed, m)
    assert 0 < len(whole) < users.size
    perm = np.random.default_rng(2).permutation(users.size)
    assert _chosen(users[perm], items[perm], uids, iids, seed, m) == whole
    # partitions of consecutive users with local indices and their own ids (the Dask engine's)
    for bounds in ([0, 60], [0, 1, 60], [0, 17, 18, 41, 60], list(range(61))):
        got: set[tuple[str, str]] = set()
        for lo, hi in itertools.pairwise(bounds):
            sel = (users >= lo) & (users < hi)
            got |= _chosen(users[sel] - lo, items[sel], uids[lo:hi], iids, seed, m)
        assert got == whole, bounds
    # a user's choice depends on its own ratings and the seed only: remove another user
    u0 = users == 0
    rest = _chosen(users[~u0], items[~u0], uids, iids, seed, m)
    assert rest == {p for p in whole if p[0] != uids[0]}
    # another seed: another choice
    assert _chosen(users, items, uids, iids, seed + 1, m) != whole


def test_keyed_selection_is_a_uniform_m_subset():
    """One user with 10 items, m = 3: over 3000 seeds each item is kept with frequency 3/10."""
    users = np.zeros(10, np.int64)
    items = np.arange(10)
    hu, hi = id_hash(np.array(["42"])), id_hash(np.arange(10).astype(str))
    rng = np.random.default_rng(0)
    kept = np.zeros(10)
    for _ in range(3000):
        kept += cap_samples_by_key(users, selection_keys(draw_selection_seed(rng), hu, hi, users,
                                                         items), 3)  # fmt: skip
    freq = kept / 3000
    # binomial sd √(0.3·0.7/3000) ≈ 0.0084: 4.5 sd
    np.testing.assert_allclose(freq, 0.3, atol=0.038)


def test_popular_selection_with_keys_breaks_ties_by_key_only():
    users, items, uids, iids = _ratings(3)
    pop = np.zeros(40)  # every item tied: the keys decide
    pop[:5] = 10.0  # ... after the 5 most popular items
    keys = selection_keys(5, id_hash(uids), id_hash(iids), users, items)
    keep = select_popular_per_user(users, items, pop, 4, None, keys=keys)
    perm = np.random.default_rng(0).permutation(users.size)
    keep_p = select_popular_per_user(users[perm], items[perm], pop, 4, None, keys=keys[perm])
    np.testing.assert_array_equal(keep[perm], keep_p)
    for u in range(60):
        own = items[users == u]
        chosen = set(items[(users == u) & keep].tolist())
        top = set(own[own < 5].tolist())
        assert len(chosen) == min(4, own.size)
        assert top <= chosen or chosen <= top  # the popular ones first
        ties = keys[(users == u) & (items >= 5)]
        if len(top) < 4:  # the rest: the smallest keys among the tied items
            want = set(
                items[(users == u) & (items >= 5)][np.argsort(ties)][: 4 - len(top)].tolist()
            )
            assert chosen - top == want
    with pytest.raises(ValueError, match="keys or an rng"):
        select_popular_per_user(users, items, pop, 4, None)
