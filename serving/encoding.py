"""Compact, versioned binary encoding of one user's served parameters (and, apart, their history).

Per-user parameter record (little-endian, no padding)::

    offset  size        field
    0       1           header: bits 7-4 format version (1), bit 3 precision (0 float16, 1 float32),
                        bits 2-1 index width (0 uint8, 1 uint16, 2 uint32), bit 0 reserved (0)
    1       f           c_u      user bias                       (f = 2 for float16, 4 for float32)
    1+f     r·f         w_u      low-rank coordinates (θ_u = U·w_u + b_u, paper Eq. 1)
    ..      k·iw        b_idx    k-sparse correction: sorted coordinate indices in [0, d)
    ..      k·f         b_val    its values
    ..      4           CRC-32 (zlib polynomial) of every byte before it

At r = 8, k = 8, d ≤ 256 and float16 that is 1 + 2 + 16 + 8 + 16 + 4 = 47 bytes.

Two implementations live side by side: :func:`encode_records` / :func:`decode_records` work on many
users at once with numpy structured arrays and a vectorised table-driven CRC-32; the reference twins
:func:`encode_record_reference` / :func:`decode_record_reference` use ``struct`` and ``zlib.crc32``
one user at a time. Tests check that both produce the same bytes.

Rating history record (kept apart so the parameter budget is about parameters)::

    0       1           header: bits 7-4 format version (1), bits 2-1 item index width (1 uint16, 2 uint32)
    1       4           n       number of ratings (uint32)
    5       n·iw        item indices (dense indices of the model version's item vocabulary)
    ..      4·n         ratings  float32
    ..      4           CRC-32 of every byte before it

Format version 2 (written only when the user rated items outside the version's vocabulary — the
unknown items onboarding accepts but cannot fit, kept so the next training run sees them) inserts,
before the CRC, the list of those ratings by external item id, oldest first::

    ..      4           m        number of unknown-item ratings (uint32)
    ..      per entry   uint16 length + UTF-8 bytes of the external item id
    ..      4·m         their ratings  float32

``decode_history`` returns the known part of either version (what scoring and fits use);
``decode_history_unknown`` the ``(item_id, rating)`` list (empty for version 1).

Provenance (header bit 3, either version): a uint32 ``n_trained`` just before the CRC — the first
``n_trained`` entries of the known part came from a model's training data (a published training
history), the rest through the service. Publish, onboarding and carry-over keep it (the trained
entries always form a prefix: merges keep the old entries in order and append the new ones), so a
publish can carry over what a user rated through the service without their old training ratings
overriding the new model's (``decode_history_trained``; a record without the bit: 0, every entry
counted as the service's — what records written before the bit existed mean).
"""

from __future__ import annotations

import functools
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

FORMAT_VERSION = 1
HISTORY_FORMAT_VERSION = 1
HISTORY_FORMAT_UNKNOWN = 2  # the same plus the ratings of unknown items by external id
HISTORY_TRAINED_BIT = 0x08  # header bit 3: a uint32 count of training-data entries before the CRC
Precision = Literal["float16", "float32"]
PRECISIONS: tuple[str, ...] = ("float16", "float32")
_INDEX_WIDTHS = {0: 1, 1: 2, 2: 4}
_INDEX_CODE = {1: 0, 2: 1, 4: 2}
_UINT = {1: "u1", 2: "<u2", 4: "<u4"}
_STRUCT_UINT = {1: "B", 2: "H", 4: "I"}


class RecordError(ValueError):
    """A stored record is corrupt, truncated or of another format."""


def index_width_for(n: int) -> int:
    """Bytes needed for an index into ``range(n)``."""
    if n <= 1 << 8:
        return 1
    if n <= 1 << 16:
        return 2
    if n <= 1 << 32:
        return 4
    raise ValueError(f"dimension {n} too large for a uint32 index")


@dataclass(frozen=True)
class RecordFormat:
    """Layout of a parameter record: rank r, sparsity k, float precision, index width in bytes."""

    rank: int
    sparsity: int
    precision: Precision = "float16"
    index_width: int = 1

    def __post_init__(self) -> None:
        if self.rank < 0 or self.sparsity < 0:
            raise ValueError(f"rank and sparsity must be >= 0, got {self.rank}, {self.sparsity}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.index_width not in _INDEX_CODE:
            raise ValueError(f"index_width must be 1, 2 or 4 bytes, got {self.index_width}")

    @classmethod
    def for_model(cls, *, rank: int, sparsity: int, d: int, precision: str) -> RecordFormat:
        return cls(rank, sparsity, precision, index_width_for(d))  # type: ignore[arg-type]

    @property
    def float_width(self) -> int:
        return 2 if self.precision == "float16" else 4

    @property
    def header(self) -> int:
        prec = 0 if self.precision == "float16" else 1
        return (FORMAT_VERSION << 4) | (prec << 3) | (_INDEX_CODE[self.index_width] << 1)

    @property
    def size(self) -> int:
        f = self.float_width
        return 1 + f + self.rank * f + self.sparsity * (self.index_width + f) + 4

    @property
    def dtype(self) -> np.dtype[Any]:
        return _record_dtype(self.rank, self.sparsity, self.precision, self.index_width)

    def to_json(self) -> dict[str, Any]:
        return {
            "rank": self.rank,
            "sparsity": self.sparsity,
            "precision": self.precision,
            "index_width": self.index_width,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> RecordFormat:
        return cls(int(d["rank"]), int(d["sparsity"]), d["precision"], int(d["index_width"]))


@functools.lru_cache(maxsize=64)
def _record_dtype(rank: int, sparsity: int, precision: str, index_width: int) -> np.dtype[Any]:
    fl = "<f2" if precision == "float16" else "<f4"
    return np.dtype(
        [
            ("header", "u1"),
            ("bias", fl),
            ("w", fl, (rank,)),
            ("b_idx", _UINT[index_width], (sparsity,)),
            ("b_val", fl, (sparsity,)),
            ("crc", "<u4"),
        ]
    )


@dataclass(frozen=True, eq=False)
class UserParams:
    """Decoded parameters of a batch of users: ``bias (B,)``, ``w (B, r)``, ``b_idx (B, k)``,
    ``b_val (B, k)`` — float32 / int64, ready for the ONNX scorer."""

    bias: np.ndarray
    w: np.ndarray
    b_idx: np.ndarray
    b_val: np.ndarray

    def __len__(self) -> int:
        return int(self.bias.shape[0])


# -- CRC-32 ------------------------------------------------------------------------------------------
def _crc_table() -> np.ndarray:
    table = np.zeros(256, dtype=np.uint32)
    for n in range(256):
        c = n
        for _ in range(8):
            c = (0xEDB88320 ^ (c >> 1)) if c & 1 else (c >> 1)
        table[n] = c
    return table


_CRC_TABLE = _crc_table()


_ZLIB_MAX_ROWS = 16


def crc32_rows(rows: np.ndarray) -> np.ndarray:
    """CRC-32 (zlib's) of every row of a ``(n, L)`` uint8 matrix: one table step per byte column,
    vectorised over rows. Equals ``zlib.crc32(row.tobytes())`` row by row."""
    rows = np.asarray(rows, dtype=np.uint8)
    if (
        rows.shape[0] <= _ZLIB_MAX_ROWS
    ):  # a few rows (onboarding): zlib is cheaper than L table steps
        return np.array([zlib.crc32(row.tobytes()) for row in rows], dtype=np.uint32)
    crc = np.full(rows.shape[0], 0xFFFFFFFF, dtype=np.uint32)
    for j in range(rows.shape[1]):
        crc = _CRC_TABLE[(crc ^ rows[:, j]) & 0xFF] ^ (crc >> np.uint32(8))
    return crc ^ np.uint32(0xFFFFFFFF)


# -- fast (batched) encoder / decoder --------------------------------------------------------------
def _check_params(
    fmt: RecordFormat, bias: np.ndarray, W: np.ndarray, B_idx: np.ndarray, B_val: np.ndarray
) -> None:
    n = bias.shape[0]
    if W.shape != (n, fmt.rank):
        raise ValueError(f"W must be ({n}, {fmt.rank}), got {W.shape}")
    if B_idx.shape != (n, fmt.sparsity) or B_val.shape != (n, fmt.sparsity):
        raise ValueError(
            f"B_idx/B_val must be ({n}, {fmt.sparsity}), got {B_idx.shape}/{B_val.shape}"
        )
    if B_idx.size and (B_idx.min() < 0 or B_idx.max() >= 1 << (8 * fmt.index_width)):
        raise ValueError(f"B_idx out of range for a {fmt.index_width}-byte index")


def pack_params(fmt: RecordFormat, bias: Any, W: Any, B_idx: Any, B_val: Any) -> np.ndarray:
    """Encode many users into one structured array of dtype ``fmt.dtype`` (checksums filled)."""
    bias = np.asarray(bias, dtype=np.float64).reshape(-1)
    W = np.asarray(W, dtype=np.float64).reshape(bias.shape[0], -1)
    B_idx = np.asarray(B_idx, dtype=np.int64).reshape(bias.shape[0], -1)
    B_val = np.asarray(B_val, dtype=np.float64).reshape(bias.shape[0], -1)
    _check_params(fmt, bias, W, B_idx, B_val)
    rec = np.zeros(bias.shape[0], dtype=fmt.dtype)
    rec["header"] = fmt.header
    with np.errstate(over="ignore"):  # overflow is reported below, as a ValueError
        rec["bias"] = bias
        rec["w"] = W
        rec["b_val"] = B_val
    rec["b_idx"] = B_idx
    for name, src in (("bias", bias), ("w", W), ("b_val", B_val)):
        if not np.all(np.isfinite(rec[name])):
            if not np.all(np.isfinite(src)):
                raise ValueError(f"{name} is not finite")
            # a model of large ratings (e.g. a 0..1e6 scale): name the way out
            hint = " (`lrs-rec publish --precision float32` stores it)" * (
                fmt.precision == "float16"
            )
            raise ValueError(
                f"{name} overflows {fmt.precision} (|value| too large: up to "
                f"{float(np.abs(src).max()):.4g}, {fmt.precision} holds ±"
                f"{float(np.finfo(rec[name].dtype).max):.5g}){hint}"
            )
    raw = rec.view(np.uint8).reshape(bias.shape[0], fmt.size)
    rec["crc"] = crc32_rows(raw[:, :-4])
    return rec


def encode_records(fmt: RecordFormat, bias: Any, W: Any, B_idx: Any, B_val: Any) -> list[bytes]:
    """Fast encoder: one ``bytes`` record per user (vectorised over users)."""
    rec = pack_params(fmt, bias, W, B_idx, B_val)
    buf = rec.tobytes()
    L = fmt.size
    return [buf[i : i + L] for i in range(0, len(buf), L)]


def decode_records(fmt: RecordFormat, blobs: Sequence[bytes]) -> UserParams:
    """Fast decoder: validates length, header and checksum of every record, then unpacks them."""
    L = fmt.size
    for i, b in enumerate(blobs):
        if len(b) != L:
            raise RecordError(f"record {i}: length {len(b)} != {L} expected for {fmt}")
    rec = np.frombuffer(b"".join(blobs), dtype=fmt.dtype)
    if rec.size and np.any(rec["header"] != fmt.header):
        bad = int(np.flatnonzero(rec["header"] != fmt.header)[0])
        raise RecordError(
            f"record {bad}: header 0x{int(rec['header'][bad]):02x} != 0x{fmt.header:02x} for {fmt}"
        )
    raw = rec.view(np.uint8).reshape(rec.size, L)
    ok = crc32_rows(raw[:, :-4]) == rec["crc"]
    if not np.all(ok):
        raise RecordError(f"record {int(np.flatnonzero(~ok)[0])}: checksum mismatch (corrupt)")
    return UserParams(
        bias=rec["bias"].astype(np.float32),
        w=rec["w"].astype(np.float32).reshape(rec.size, fmt.rank),
        b_idx=rec["b_idx"].astype(np.int64).reshape(rec.size, fmt.sparsity),
        b_val=rec["b_val"].astype(np.float32).reshape(rec.size, fmt.sparsity),
    )


def decode_record(fmt: RecordFormat, blob: bytes) -> UserParams:
    """Fast decoder for the serving hot path (one user): ``zlib.crc32`` and three ``frombuffer``
    views (bias+w, b_idx, b_val) — no structured dtype, no copies beyond the float32 casts."""
    if len(blob) != fmt.size:
        raise RecordError(f"record length {len(blob)} != {fmt.size} expected for {fmt}")
    if blob[0] != fmt.header:
        raise RecordError(f"header 0x{blob[0]:02x} != 0x{fmt.header:02x} for {fmt}")
    if zlib.crc32(memoryview(blob)[:-4]) != int.from_bytes(blob[-4:], "little"):
        raise RecordError("checksum mismatch (corrupt record)")
    fl, ix, r, k, off_idx, off_val = _layout(fmt)
    head = np.frombuffer(blob, dtype=fl, count=1 + r, offset=1).astype(np.float32)
    return UserParams(
        bias=head[:1],
        w=head[1:].reshape(1, r),
        b_idx=np.frombuffer(blob, dtype=ix, count=k, offset=off_idx).astype(np.int64).reshape(1, k),
        b_val=np.frombuffer(blob, dtype=fl, count=k, offset=off_val)
        .astype(np.float32)
        .reshape(1, k),
    )


def decode_record_batch(fmt: RecordFormat, blobs: Sequence[bytes]) -> UserParams:
    """The records of a few users at once (the serving micro-batch): each checked like
    :func:`decode_record` (length, header, ``zlib.crc32`` — cheaper than the vectorised CRC of
    :func:`decode_records` for a handful of records), then unpacked by one structured ``frombuffer``.
    Equals stacking :func:`decode_record` of each (tested); raises the same errors."""
    size, header = fmt.size, fmt.header
    crc = zlib.crc32
    for blob in blobs:
        if len(blob) != size:
            raise RecordError(f"record length {len(blob)} != {size} expected for {fmt}")
        if blob[0] != header:
            raise RecordError(f"header 0x{blob[0]:02x} != 0x{header:02x} for {fmt}")
        if crc(memoryview(blob)[:-4]) != int.from_bytes(blob[-4:], "little"):
            raise RecordError("checksum mismatch (corrupt record)")
    rec = np.frombuffer(b"".join(blobs), dtype=fmt.dtype)
    n = rec.size
    return UserParams(
        bias=rec["bias"].astype(np.float32),
        w=rec["w"].astype(np.float32).reshape(n, fmt.rank),
        b_idx=rec["b_idx"].astype(np.int64).reshape(n, fmt.sparsity),
        b_val=rec["b_val"].astype(np.float32).reshape(n, fmt.sparsity),
    )


@functools.lru_cache(maxsize=64)
def _layout(fmt: RecordFormat) -> tuple[str, str, int, int, int, int]:
    f = fmt.float_width
    off_idx = 1 + f * (1 + fmt.rank)
    off_val = off_idx + fmt.index_width * fmt.sparsity
    fl = "<f2" if fmt.precision == "float16" else "<f4"
    return fl, _UINT[fmt.index_width], fmt.rank, fmt.sparsity, off_idx, off_val


# -- slow, obvious reference twins -----------------------------------------------------------------
def encode_record_reference(
    fmt: RecordFormat, bias: float, w: Sequence[float], b_idx: Sequence[int], b_val: Sequence[float]
) -> bytes:
    """Reference encoder for one user: ``struct.pack`` field by field, ``zlib.crc32``."""
    fl = "e" if fmt.precision == "float16" else "f"
    ix = _STRUCT_UINT[fmt.index_width]
    body = struct.pack(
        f"<B{fl}{fmt.rank}{fl}{fmt.sparsity}{ix}{fmt.sparsity}{fl}",
        fmt.header,
        float(bias),
        *(float(x) for x in w),
        *(int(i) for i in b_idx),
        *(float(x) for x in b_val),
    )
    return body + struct.pack("<I", zlib.crc32(body))


def decode_record_reference(
    fmt: RecordFormat, blob: bytes
) -> tuple[float, list[float], list[int], list[float]]:
    """Reference decoder for one user: returns ``(bias, w, b_idx, b_val)``."""
    if len(blob) != fmt.size:
        raise RecordError(f"record length {len(blob)} != {fmt.size} expected for {fmt}")
    (crc,) = struct.unpack("<I", blob[-4:])
    if zlib.crc32(blob[:-4]) != crc:
        raise RecordError("checksum mismatch (corrupt record)")
    fl = "e" if fmt.precision == "float16" else "f"
    ix = _STRUCT_UINT[fmt.index_width]
    vals = struct.unpack(f"<B{fl}{fmt.rank}{fl}{fmt.sparsity}{ix}{fmt.sparsity}{fl}", blob[:-4])
    if vals[0] != fmt.header:
        raise RecordError(f"header 0x{vals[0]:02x} != 0x{fmt.header:02x} for {fmt}")
    r, k = fmt.rank, fmt.sparsity
    return (
        float(vals[1]),
        [float(x) for x in vals[2 : 2 + r]],
        [int(x) for x in vals[2 + r : 2 + r + k]],
        [float(x) for x in vals[2 + r + k :]],
    )


# -- rating history --------------------------------------------------------------------------------
def encode_history(
    items: Any,
    ratings: Any,
    *,
    n_items: int,
    unknown: Sequence[tuple[str, float]] = (),
    n_trained: int = 0,
) -> bytes:
    """Encode one user's rating history (item indices into the version's vocabulary + ratings;
    ``unknown``: ``(external item id, rating)`` of items outside it, format version 2;
    ``n_trained``: how many leading entries came from training data, header bit 3 when > 0)."""
    items = np.asarray(items, dtype=np.int64).reshape(-1)
    ratings = np.asarray(ratings, dtype=np.float64).reshape(-1)
    if items.shape != ratings.shape:
        raise ValueError(f"items {items.shape} and ratings {ratings.shape} differ in length")
    if items.size and (items.min() < 0 or items.max() >= n_items):
        raise ValueError(f"history item indices must lie in [0, {n_items})")
    if not np.all(np.isfinite(ratings)):
        raise ValueError("history ratings must be finite")
    if not 0 <= n_trained <= items.size:
        raise ValueError(f"n_trained must lie in [0, {items.size}], got {n_trained}")
    iw = max(2, index_width_for(n_items))
    version = HISTORY_FORMAT_UNKNOWN if unknown else HISTORY_FORMAT_VERSION
    header = (version << 4) | (_INDEX_CODE[iw] << 1) | (HISTORY_TRAINED_BIT if n_trained else 0)
    body = (
        struct.pack("<BI", header, items.size)
        + items.astype(_UINT[iw]).tobytes()
        + ratings.astype("<f4").tobytes()
    )
    if unknown:
        ids = [str(i).encode("utf-8") for i, _ in unknown]
        values = np.asarray([r for _, r in unknown], dtype=np.float64)
        if any(len(b) > 0xFFFF for b in ids) or not np.all(np.isfinite(values)):
            raise ValueError("unknown-item ids must be < 64 KiB and their ratings finite")
        body += struct.pack("<I", len(ids))
        body += b"".join(struct.pack("<H", len(b)) + b for b in ids)
        body += values.astype("<f4").tobytes()
    if n_trained:
        body += struct.pack("<I", n_trained)
    return bytes(body + struct.pack("<I", zlib.crc32(body)))


def _parse_history(blob: bytes) -> tuple[int, int, int, int]:
    """Check a history record; ``(format version, index width, n, end of the known part)``."""
    version, iw, n, end, _ = _parse_history_full(blob)
    return version, iw, n, end


def _parse_history_full(blob: bytes) -> tuple[int, int, int, int, int]:
    """:func:`_parse_history` and the record's length without its provenance count and CRC."""
    if len(blob) < 9:
        raise RecordError(f"history record of {len(blob)} bytes is truncated")
    header, n = struct.unpack("<BI", blob[:5])
    version = header >> 4
    if (
        version not in (HISTORY_FORMAT_VERSION, HISTORY_FORMAT_UNKNOWN)
        or (header >> 1) & 3 not in (1, 2)
        or header & 1
    ):
        raise RecordError(f"history header 0x{header:02x} is not a supported format")
    iw = _INDEX_WIDTHS[(header >> 1) & 3]
    end = 5 + n * (iw + 4)
    stop = len(blob) - 4 - (4 if header & HISTORY_TRAINED_BIT else 0)  # before count and CRC
    if version == HISTORY_FORMAT_VERSION and stop != end:
        raise RecordError(f"history record length {len(blob)} does not match n={n}")
    if version == HISTORY_FORMAT_UNKNOWN and stop < end + 4:
        raise RecordError(f"history record length {len(blob)} does not match n={n}")
    (crc,) = struct.unpack("<I", blob[-4:])
    if zlib.crc32(blob[:-4]) != crc:
        raise RecordError("history checksum mismatch (corrupt record)")
    return version, iw, n, end, stop


def decode_history_trained(blob: bytes) -> int:
    """How many leading entries of a history record's known part came from training data (0 for a
    record without the provenance bit)."""
    _, _, n, _, stop = _parse_history_full(blob)
    if not blob[0] & HISTORY_TRAINED_BIT:
        return 0
    (n_trained,) = struct.unpack_from("<I", blob, stop)
    if n_trained > n:
        raise RecordError(f"history record's training count {n_trained} exceeds its {n} entries")
    return int(n_trained)


def decode_history(blob: bytes) -> tuple[np.ndarray, np.ndarray]:
    """Decode a history record into ``(items int64, ratings float64)`` (the items of the version's
    vocabulary; see :func:`decode_history_unknown` for the others)."""
    _, iw, n, _ = _parse_history(blob)
    items = np.frombuffer(blob, dtype=_UINT[iw], count=n, offset=5).astype(np.int64)
    ratings = np.frombuffer(blob, dtype="<f4", count=n, offset=5 + n * iw).astype(np.float64)
    return items, ratings


def decode_history_unknown(blob: bytes) -> list[tuple[str, float]]:
    """The ``(external item id, rating)`` ratings of items outside the version's vocabulary
    stored in a history record, oldest first (none in a format-version-1 record)."""
    version, _, _, pos, stop = _parse_history_full(blob)
    if version == HISTORY_FORMAT_VERSION:
        return []
    try:
        (m,) = struct.unpack_from("<I", blob, pos)
        pos += 4
        ids = []
        for _ in range(m):
            (length,) = struct.unpack_from("<H", blob, pos)
            ids.append(blob[pos + 2 : pos + 2 + length].decode("utf-8"))
            pos += 2 + length
    except (struct.error, UnicodeDecodeError) as e:
        raise RecordError(f"history record's unknown-item list is corrupt: {e}") from None
    if pos + 4 * m != stop:
        raise RecordError(f"history record length {len(blob)} does not match its {m} unknown ids")
    values = np.frombuffer(blob, dtype="<f4", count=m, offset=pos).astype(np.float64)
    return list(zip(ids, values.tolist(), strict=True))


class HistoryEncoder:
    """Fast history records for many users stored as CSR (``indptr``, ``items``, ``ratings``): the
    arrays are cast and serialised once, each record is then a few byte slices and one CRC. Every
    entry is training data (a published training history). Equals ``encode_history(items[lo:hi]
    [-cap:], ratings[lo:hi][-cap:], n_items=n_items, n_trained=<their number>)`` (tested)."""

    def __init__(
        self, indptr: Any, items: Any, ratings: Any, *, n_items: int, cap: int | None = None
    ) -> None:
        self.indptr = np.asarray(indptr, dtype=np.int64)
        items = np.asarray(items, dtype=np.int64)
        ratings = np.asarray(ratings, dtype=np.float64)
        if items.shape != ratings.shape or self.indptr[-1] != items.size:
            raise ValueError("indptr, items and ratings do not describe one CSR history")
        if items.size and (items.min() < 0 or items.max() >= n_items):
            raise ValueError(f"history item indices must lie in [0, {n_items})")
        if not np.all(np.isfinite(ratings)):
            raise ValueError("history ratings must be finite")
        self.iw = max(2, index_width_for(n_items))
        self.header = (HISTORY_FORMAT_VERSION << 4) | (_INDEX_CODE[self.iw] << 1)
        self.cap = cap
        self._items = items.astype(_UINT[self.iw]).tobytes()
        self._ratings = ratings.astype("<f4").tobytes()

    def max_size(self) -> int:
        """Bytes of the longest record."""
        counts = np.diff(self.indptr)
        longest = int(counts.max()) if counts.size else 0
        if self.cap is not None:
            longest = min(longest, self.cap)
        return 9 + longest * (self.iw + 4) + (4 if longest else 0)

    def record(self, u: int) -> bytes:
        lo, hi = int(self.indptr[u]), int(self.indptr[u + 1])
        if self.cap is not None:
            lo = max(lo, hi - self.cap)
        iw, n = self.iw, hi - lo
        body = (
            struct.pack("<BI", self.header | (HISTORY_TRAINED_BIT if n else 0), n)
            + self._items[lo * iw : hi * iw]
            + self._ratings[lo * 4 : hi * 4]
        )
        if n:
            body += struct.pack("<I", n)
        return bytes(body + struct.pack("<I", zlib.crc32(body)))
