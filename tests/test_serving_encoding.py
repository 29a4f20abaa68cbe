"""Unit tests of the record codec and the key layout (no Redis)."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
from lrs_rec.serving.encoding import (
    HistoryEncoder,
    RecordError,
    RecordFormat,
    crc32_rows,
    decode_history,
    decode_history_trained,
    decode_history_unknown,
    decode_record,
    decode_record_reference,
    decode_records,
    encode_history,
    encode_record_reference,
    encode_records,
    index_width_for,
)
from lrs_rec.serving.keys import KeyLayout, onboarded_slot, trained_slot


def _params(rng: np.random.Generator, n: int, r: int, k: int, d: int):
    bias = rng.normal(size=n)
    W = rng.normal(size=(n, r))
    B_idx = np.sort(np.stack([rng.choice(d, size=k, replace=False) for _ in range(n)]), axis=1)
    B_val = rng.normal(size=(n, k))
    return bias, W, B_idx.reshape(n, k), B_val


@pytest.mark.parametrize("precision", ["float16", "float32"])
@pytest.mark.parametrize(("r", "k", "d"), [(8, 8, 64), (4, 2, 300), (16, 8, 70000), (3, 0, 5)])
def test_fast_encoder_matches_reference_byte_for_byte(precision, r, k, d):
    rng = np.random.default_rng(r * 100 + k)
    fmt = RecordFormat.for_model(rank=r, sparsity=k, d=d, precision=precision)
    bias, W, B_idx, B_val = _params(rng, 37, r, k, d)
    fast = encode_records(fmt, bias, W, B_idx, B_val)
    for u in range(37):
        ref = encode_record_reference(fmt, bias[u], W[u], B_idx[u], B_val[u])
        assert fast[u] == ref
        assert len(ref) == fmt.size
    # both decoders agree with each other and with the precision-rounded inputs
    dec = decode_records(fmt, fast)
    cast = np.float16 if precision == "float16" else np.float32
    np.testing.assert_array_equal(dec.w, W.astype(cast).astype(np.float32))
    np.testing.assert_array_equal(dec.b_idx, B_idx)
    np.testing.assert_array_equal(dec.b_val, B_val.astype(cast).astype(np.float32))
    np.testing.assert_array_equal(dec.bias, bias.astype(cast).astype(np.float32))
    for u in (0, 36):
        b, w, bi, bv = decode_record_reference(fmt, fast[u])
        one = decode_record(fmt, fast[u])
        assert b == float(dec.bias[u]) == float(one.bias[0])
        np.testing.assert_array_equal(np.array(w, dtype=np.float32), dec.w[u])
        np.testing.assert_array_equal(one.w[0], dec.w[u])
        assert bi == dec.b_idx[u].tolist() == one.b_idx[0].tolist()
        np.testing.assert_array_equal(np.array(bv, dtype=np.float32), dec.b_val[u])


def test_record_size_at_r8_k8_is_47_bytes():
    fmt = RecordFormat.for_model(rank=8, sparsity=8, d=64, precision="float16")
    assert fmt.size == 47 == fmt.dtype.itemsize
    assert fmt.header == 0x10  # format 1, float16, uint8 indices
    f32 = RecordFormat.for_model(rank=8, sparsity=8, d=1000, precision="float32")
    assert f32.size == 1 + 4 + 32 + 16 + 32 + 4 and f32.header == 0x1A


def test_index_width():
    assert [index_width_for(n) for n in (1, 256, 257, 65536, 65537)] == [1, 1, 2, 2, 4]


@pytest.mark.parametrize("n_rows", [0, 1, 16, 17, 50])  # both the zlib and the vectorised branch
def test_crc32_rows_equals_zlib(n_rows):
    rng = np.random.default_rng(1)
    rows = rng.integers(0, 256, size=(n_rows, 33), dtype=np.uint8)
    expect = [zlib.crc32(row.tobytes()) for row in rows]
    assert crc32_rows(rows).tolist() == expect


def test_corrupt_records_are_rejected():
    fmt = RecordFormat(8, 8, "float16", 1)
    rec = encode_record_reference(fmt, 0.5, [0.1] * 8, list(range(8)), [0.2] * 8)
    flipped = bytes([rec[0]]) + bytes([rec[1] ^ 0x01]) + rec[2:]
    for bad in (flipped, rec[:-1], rec + b"\x00"):
        with pytest.raises(RecordError):
            decode_record(fmt, bad)
        with pytest.raises(RecordError):
            decode_records(fmt, [rec, bad])
        with pytest.raises(RecordError):
            decode_record_reference(fmt, bad)
    other = RecordFormat(8, 8, "float32", 1)
    with pytest.raises(RecordError, match="length"):
        decode_record(other, rec)


def test_float16_overflow_is_an_error_not_inf():
    fmt = RecordFormat(2, 1, "float16", 1)
    with pytest.raises(ValueError, match="overflows float16"):
        encode_records(fmt, [0.0], [[1e6, 0.0]], [[0]], [[0.0]])


def test_float16_overflow_names_the_value_and_the_float32_way_out():
    # a model of ratings in the millions: `lrs-rec publish` said only "bias overflows float16
    # (|value| too large) or is not finite", not how to publish it
    fmt = RecordFormat(2, 1, "float16", 1)
    with pytest.raises(
        ValueError, match=r"^bias overflows float16 .*up to 3e\+06.*±65504.*--precision float32"
    ):
        encode_records(fmt, [3e6], [[1.0, 0.0]], [[0]], [[0.0]])
    with pytest.raises(ValueError, match=r"^b_val is not finite$"):
        encode_records(fmt, [0.0], [[1.0, 0.0]], [[0]], [[float("nan")]])
    f32 = RecordFormat(2, 1, "float32", 1)
    assert (
        decode_record(f32, encode_records(f32, [3e6], [[1.0, 0.0]], [[0]], [[0.0]])[0]).bias == 3e6
    )


def test_history_round_trip_and_corruption():
    items = np.array([5, 0, 70000, 3])
    ratings = np.array([4.0, 3.5, 1.0, 5.0])
    blob = encode_history(items, ratings, n_items=70001)
    got_items, got_ratings = decode_history(blob)
    np.testing.assert_array_equal(got_items, items)
    np.testing.assert_array_equal(got_ratings, ratings)
    small = encode_history(items[:2], ratings[:2], n_items=100)  # uint16 indices
    assert len(small) == 1 + 4 + 2 * 2 + 2 * 4 + 4
    body = struct.pack("<BI", 0x12, 2) + struct.pack("<2H", 5, 0) + struct.pack("<2f", 4, 3.5)
    assert small == body + struct.pack("<I", zlib.crc32(body))
    assert decode_history(encode_history([], [], n_items=10))[0].size == 0
    with pytest.raises(RecordError):
        decode_history(small[:-1] + bytes([small[-1] ^ 1]))
    with pytest.raises(ValueError, match="item indices"):
        encode_history([10], [1.0], n_items=10)


def test_key_layout_byte_for_byte():
    keys = KeyLayout()
    assert keys.current == b"lrs:current"
    assert keys.versions == b"lrs:versions"
    assert keys.version_seq == b"lrs:version_seq"
    assert keys.items("v3") == b"lrs:v3:items"
    assert keys.onboarded("v3") == b"lrs:v3:onboarded"
    assert keys.params("v3", 17) == b"lrs:v3:{b17}:p"
    assert keys.history("v3", 17) == b"lrs:v3:{b17}:h"
    assert keys.onb_params("v12", 5) == b"lrs:v12:{o5}:p"
    assert keys.onb_history("v12", 5) == b"lrs:v12:{o5}:h"
    assert KeyLayout("shop1").params("v1", 0) == b"shop1:v1:{b0}:p"
    assert trained_slot(300, 128) == (2, b"44")
    assert onboarded_slot("alice", 1024) == (zlib.crc32(b"alice") % 1024, b"alice")
    assert onboarded_slot("zoë", 8)[1] == "zoë".encode()
    for bad in ("", "v1:x", "v{1}", "v 1"):
        with pytest.raises(ValueError):
            keys.params(bad, 0)
    with pytest.raises(ValueError):
        KeyLayout("a{b}")


def test_cluster_hash_tag_puts_a_users_keys_in_one_slot():
    from redis.crc import key_slot

    keys = KeyLayout()
    for b in (0, 1, 999):
        slots = {
            key_slot(k)
            for k in (
                keys.params("v1", b),
                keys.history("v1", b),
                keys.params("v2", b),
                keys.history("v2", b),
            )
        }
        assert len(slots) == 1
    assert key_slot(keys.params("v1", 0)) != key_slot(keys.params("v1", 1))


@pytest.mark.parametrize("cap", [None, 0, 3, 100])
def test_fast_history_encoder_matches_reference(cap):
    rng = np.random.default_rng(7)
    counts = rng.integers(0, 9, size=30)
    indptr = np.concatenate([[0], np.cumsum(counts)])
    items = rng.integers(0, 300, size=indptr[-1])
    ratings = rng.integers(1, 11, size=indptr[-1]) / 2.0
    enc = HistoryEncoder(indptr, items, ratings, n_items=300, cap=cap)
    for u in range(30):
        its, rs = items[indptr[u] : indptr[u + 1]], ratings[indptr[u] : indptr[u + 1]]
        if cap is not None:
            its, rs = its[len(its) - min(cap, len(its)) :], rs[len(rs) - min(cap, len(rs)) :]
        assert enc.record(u) == encode_history(its, rs, n_items=300, n_trained=len(its))
        assert decode_history_trained(enc.record(u)) == len(its)  # a training history
    with pytest.raises(ValueError, match="item indices"):
        HistoryEncoder([0, 1], [300], [1.0], n_items=300)


def test_history_provenance_round_trip_to_the_byte():
    """Header bit 3 and a uint32 training count before the CRC, in both formats; a record without
    the bit (written before it existed) counts 0; a count over n, a set bit 0 or a missing count
    is refused."""
    items, ratings = np.array([3, 1, 2]), np.array([4.0, 5.0, 2.5])
    plain = encode_history(items, ratings, n_items=10)
    marked = encode_history(items, ratings, n_items=10, n_trained=2)
    body = plain[:-4] + struct.pack("<I", 2)
    body = bytes([plain[0] | 0x08]) + body[1:]
    assert marked == body + struct.pack("<I", zlib.crc32(body))
    assert decode_history_trained(plain) == 0 and decode_history_trained(marked) == 2
    for blob in (plain, marked):
        got = decode_history(blob)
        np.testing.assert_array_equal(got[0], items)
        np.testing.assert_array_equal(got[1], ratings)
    unknown = [("x", 3.0), ("ü", 1.0)]
    both = encode_history(items, ratings, n_items=10, unknown=unknown, n_trained=3)
    assert decode_history_unknown(both) == unknown and decode_history_trained(both) == 3
    assert decode_history(both)[0].tolist() == [3, 1, 2]
    with pytest.raises(ValueError, match="n_trained"):
        encode_history(items, ratings, n_items=10, n_trained=4)

    def resealed(body: bytes) -> bytes:
        return body + struct.pack("<I", zlib.crc32(body))

    over = resealed(marked[:-8] + struct.pack("<I", 9))
    with pytest.raises(RecordError, match="training count"):
        decode_history_trained(over)
    with pytest.raises(RecordError):
        decode_history(resealed(bytes([marked[0] | 1]) + marked[1:-4]))
    with pytest.raises(RecordError):  # the bit without its count
        decode_history(resealed(bytes([plain[0] | 0x08]) + plain[1:-4]))
