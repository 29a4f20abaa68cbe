"""Rating-log loaders: MovieLens 100K / 1M / latest, generic CSV/TSV (or space-separated) and
Parquet, with cleaning.

Every file is read into a :class:`RatingTable` (external ids as strings, float ratings, optional
timestamps) plus a :class:`CleaningReport`. Real files are messy; each kind of mess has exactly one
documented rule. Rows are either kept, repaired and counted, dropped and counted, or the load fails
with an error naming the file, the line and the offending value. Nothing disappears silently.

Cleaning rules (keys of :attr:`CleaningReport.counts`):

===========================  ====================================================================
``blank_lines``              empty / whitespace-only lines are skipped
``comment_lines``            lines starting with ``#`` or ``%`` are skipped
``header_lines``             a header line (first data-looking line whose rating field is not a
                             number) is used for column names, then skipped; later repeated
                             copies of that header (concatenated files) are skipped too
``trailing_empty_columns``   rows ending with empty fields (``1,2,3,4,,``) are repaired
``missing_ratings``          NaN / empty / ``null`` ratings: the row is dropped
``missing_timestamps``       NaN / empty / ``null`` timestamps: the row is kept without a time
``ratings_clipped``          ratings outside the declared scale are clipped to it
                             (``on_out_of_scale="clip"``, the default); with ``"drop"`` they are
                             counted as ``ratings_out_of_scale_dropped``; ``"error"`` fails.
                             An *auto-detected* ML-100K / ML-1M file (no ``rating_scale`` given)
                             with a rating off 1..5 is an error whatever the rule: the format was
                             a guess (four integer columns), the file probably has another scale
``duplicates_removed``       repeated (user, item) pairs: the latest by timestamp is kept (ties and
                             missing timestamps: the later line wins)
``timestamps_ms_converted``  a timestamp in milliseconds among seconds: in a column whose numeric
                             timestamps are mostly (at least half) at most 1e11 — seconds; 1e11 s
                             is the year 5138, while every millisecond time after March 1973 is
                             above 1e11 — a value in (1e11, 1e14] is read as milliseconds and
                             divided by 1000 (kept, counted, examples named). MovieLens
                             latest-small has one such row. A column mostly above 1e11 (all
                             milliseconds) is left as it is: only the order of times is used
``non_numeric_user_ids``     ids are opaque strings (``"u17"`` is fine); counted for information
``non_numeric_item_ids``
===========================  ====================================================================

Errors (``RatingFileError``, a ``ValueError``) name ``file:line`` and the value: a non-numeric or
infinite rating (``"five"``, ``inf``), an empty user/item id, an id the service would refuse (longer
than 256 characters, or with a control / non-printable character or U+FFFD: such users could never
be onboarded or updated), a row with too few columns, an ML-100K / ML-1M line with more than its 4
fields, an unparsable or infinite timestamp, an unknown column name, an empty file (no rating rows),
a Parquet file without the requested columns, a file whose delimiter cannot be told (no delimiter,
or lines with different ones: each named), bytes that are not UTF-8 (``file:line`` and the byte
offset), a line longer than 1 MiB (memory stays bounded: no line is ever read whole). Without a
declared scale the observed range becomes the rating scale, so a rating beyond ±1e12, or one or two
ratings more than 100 interquartile ranges from the median (a 1e6 among 1..5 stars), are errors
naming ``file:line`` and ``--rating-scale``. Column
choices are checked on the first line: a header lacking a user/item/rating column (no guessing by
position onto a column named as something else), a position that is negative or beyond the line,
one column for two roles, and Parquet columns of a type with no rating/timestamp/id meaning are
errors. A leading UTF-8 byte-order mark is ignored.
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import io
import math
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from lrs_rec.training.fast_text import (
    MAX_LINE_BYTES,
    IdCodes,
    LineTooLongError,
    line_too_long,
    read_text_fast,
    scan_text,
)

from lrs_rec.ids import id_problem

FORMATS = ("auto", "ml-100k", "ml-1m", "ml-latest", "csv", "tsv", "parquet")
OUT_OF_SCALE_RULES = ("clip", "drop", "error")

# Default rating scale per MovieLens format (a generic file declares none: its observed range is used).
ML_SCALES = {"ml-100k": (1.0, 5.0), "ml-1m": (1.0, 5.0), "ml-latest": (0.5, 5.0)}

_USER_NAMES = ("user", "userid", "user_id", "uid", "users", "customer_id", "visitorid")
_ITEM_NAMES = ("item", "itemid", "item_id", "iid", "movieid", "movie_id", "product_id", "movie")
_RATING_NAMES = ("rating", "ratings", "score", "value", "stars")
_TIME_NAMES = ("timestamp", "time", "ts", "date", "datetime", "time_stamp")
_ROLE_NAMES = {
    "user": _USER_NAMES,
    "item": _ITEM_NAMES,
    "rating": _RATING_NAMES,
    "time": _TIME_NAMES,
}
_MISSING = {"", "nan", "na", "n/a", "null", "none"}
_PARQUET_MAGIC = b"PAR1"
# Without a declared scale: |rating| above this is an error (squares and sums would overflow)
MAX_ABS_RATING = 1e12
# ... and so are a few ratings (at most 2, or this fraction) farther than this many interquartile
# ranges from the median: they would silently become the observed rating scale
OUTLIER_SPREADS = 100.0
OUTLIER_MAX_FRACTION = 0.001
# MovieLens formats with a fixed number of fields per line (user, item, rating, timestamp)
_FIXED_FIELDS = {"ml-100k": 4, "ml-1m": 4}


class RatingFileError(ValueError):
    """A rating file cannot be read; the message names the file, line and value."""


@dataclass
class CleaningReport:
    """What cleaning did to one file: counts per rule, plus the first few examples per rule."""

    source: str
    format: str
    counts: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)
    rows_read: int = 0
    rows_kept: int = 0
    parser: str = "reference"  # "fast" when the vectorised reader took the whole (clean) file

    def add(self, rule: str, where: str = "", n: int = 1) -> None:
        self.counts[rule] = self.counts.get(rule, 0) + n
        if where and len(self.examples.setdefault(rule, [])) < 5:
            self.examples[rule].append(where)

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "format": self.format,
            "rows_read": self.rows_read,
            "rows_kept": self.rows_kept,
            "parser": self.parser,
            "counts": dict(sorted(self.counts.items())),
            "examples": {k: list(v) for k, v in sorted(self.examples.items())},
        }


class RatingTable:
    """A cleaned rating log: one row per distinct (user, item), external ids as strings.

    ``users`` / ``items`` are (n,) str arrays. A table from the fast reader holds them
    dictionary-encoded (``user_codes`` / ``item_codes``) and builds the string arrays only when
    they are asked for; :meth:`user_ids` / :meth:`item_ids` hand the encoded form to the
    vocabularies. Immutable by convention (no setters)."""

    __slots__ = (
        "_items",
        "_released_rows",
        "_users",
        "fingerprint",
        "item_codes",
        "rating_max",
        "rating_min",
        "ratings",
        "report",
        "timestamps",
        "user_codes",
    )

    def __init__(
        self,
        users: np.ndarray | None = None,
        items: np.ndarray | None = None,
        *,
        ratings: np.ndarray,
        timestamps: np.ndarray,  # (n,) float64, NaN when the file has none
        rating_min: float,
        rating_max: float,
        report: CleaningReport,
        fingerprint: str,  # sha256 of the file bytes
        user_codes: IdCodes | None = None,
        item_codes: IdCodes | None = None,
    ) -> None:
        if (users is None and user_codes is None) or (items is None and item_codes is None):
            raise ValueError("RatingTable needs users and items (as strings or as codes)")
        self._users, self._items = users, items
        self.ratings, self.timestamps = ratings, timestamps  # (n,) float64
        self.rating_min, self.rating_max = rating_min, rating_max
        self.report, self.fingerprint = report, fingerprint
        self.user_codes, self.item_codes = user_codes, item_codes
        self._released_rows: int | None = None

    def release(self, *columns: str) -> None:
        """Drop columns (``"ids"``, ``"ratings"``, ``"timestamps"``; default all) once a consumer
        holds what it needs of them (``training.pipeline.train(..., release_table=True)``: the
        trainer's samples and the model's histories), so that they do not stay alive through
        training. The report, fingerprint, rating scale and ``len`` remain; a released column is
        empty afterwards."""
        if self._released_rows is None:
            self._released_rows = int(self.ratings.shape[0])
        for name in columns or ("ids", "ratings", "timestamps"):
            if name == "ids":
                self._users, self._items = np.zeros(0, dtype=str), np.zeros(0, dtype=str)
                self.user_codes = self.item_codes = None
            elif name in ("ratings", "timestamps"):
                setattr(self, name, np.zeros(0))
            else:
                raise ValueError(f"no column {name!r} to release")

    @property
    def users(self) -> np.ndarray:
        if self._users is None:
            assert self.user_codes is not None
            self._users = self.user_codes.values()
        return self._users

    @property
    def items(self) -> np.ndarray:
        if self._items is None:
            assert self.item_codes is not None
            self._items = self.item_codes.values()
        return self._items

    def __len__(self) -> int:
        if self._released_rows is not None:
            return self._released_rows
        return int(self.ratings.shape[0])

    def user_ids(self) -> np.ndarray | IdCodes:
        """The user column for :class:`training.vocab.Vocabulary` (``from_ids``, ``encode``): the
        dictionary-encoded form when there is one (fast), else the strings."""
        return self.user_codes if self.user_codes is not None else self.users

    def item_ids(self) -> np.ndarray | IdCodes:
        return self.item_codes if self.item_codes is not None else self.items

    def subset(self, mask_or_index: np.ndarray) -> RatingTable:
        uc, ic = self.user_codes, self.item_codes
        return RatingTable(
            users=None if uc is not None else self.users[mask_or_index],
            items=None if ic is not None else self.items[mask_or_index],
            ratings=self.ratings[mask_or_index],
            timestamps=self.timestamps[mask_or_index],
            rating_min=self.rating_min,
            rating_max=self.rating_max,
            report=self.report,
            fingerprint=self.fingerprint,
            user_codes=None if uc is None else uc.take(mask_or_index),
            item_codes=None if ic is None else ic.take(mask_or_index),
        )


@dataclass(frozen=True)
class LoadOptions:
    """How to read a file. Column options are header names or 0-based positions (as strings)."""

    format: str = "auto"
    user_col: str | None = None
    item_col: str | None = None
    rating_col: str | None = None
    time_col: str | None = None
    rating_scale: tuple[float, float] | None = None
    on_out_of_scale: str = "clip"
    fast: bool = True  # try the vectorised reader first (clean text files); False: reference parser

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"format must be one of {', '.join(FORMATS)}; got {self.format!r}")
        if self.on_out_of_scale not in OUT_OF_SCALE_RULES:
            raise ValueError(
                f"on_out_of_scale must be one of {OUT_OF_SCALE_RULES}; got {self.on_out_of_scale!r}"
            )
        if self.rating_scale is not None:
            lo, hi = self.rating_scale
            if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
                raise ValueError(
                    f"rating scale must be finite with min < max, got {lo:g}..{hi:g} "
                    "(--rating-scale MIN MAX)"
                )
            if max(abs(lo), abs(hi)) > MAX_ABS_RATING:
                raise ValueError(
                    f"rating scale {lo:g}..{hi:g} is beyond ±{MAX_ABS_RATING:g} (--rating-scale)"
                )


# ------------------------------------------------------------------------------------------------
# format detection
# ------------------------------------------------------------------------------------------------
def _head_lines(path: Path, n: int = 20) -> list[str]:
    """The first ``n`` data lines (no blank or comment line), without their line ends."""
    return [text for _, text in _head_numbered(path, n)]


def _head_numbered(path: Path, n: int = 20) -> list[tuple[int, str]]:
    """(line number, text) of the first ``n`` data lines. Memory is bounded: a line longer than
    :data:`MAX_LINE_BYTES` is an error naming ``file:line`` (never read whole)."""
    out: list[tuple[int, str]] = []
    with open(path, encoding="utf-8-sig", errors="replace", newline="") as f:
        number = 0
        while len(out) < n:
            line = f.readline(MAX_LINE_BYTES + 1)
            if not line:
                break
            number += 1
            if len(line) > MAX_LINE_BYTES:
                raise RatingFileError(line_too_long(path, number, len(line.encode())))
            # newline="": readline ends a line at \n, \r\n or a lone \r, as the reference parser
            text = line.rstrip("\r\n")
            s = text.strip()
            if s and s[0] not in "#%":
                out.append((number, text))
    return out[:n]


def _is_number(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return True


def sniff_delimiter(
    lines: list[str],
    source: str | os.PathLike[str] | None = None,
    numbers: list[int] | None = None,
) -> str:
    """The delimiter of a text rating file: ``::``, tab, comma, semicolon or pipe (most consistent);
    with none of them, runs of spaces (:data:`SPACE`) when every line has three or more fields.

    ``source`` (the file) and ``numbers`` (the lines' numbers in it) are named in the error."""
    if lines and all("::" in ln for ln in lines[: min(5, len(lines))]):
        return "::"
    best, best_score = ",", -1.0
    for delim in ("\t", ",", ";", "|"):
        counts = [ln.count(delim) for ln in lines]
        if not counts or min(counts) == 0:
            continue
        # prefer delimiters present on every line with a stable count
        score = min(counts) + (1.0 if len(set(counts)) == 1 else 0.0)
        if score > best_score:
            best, best_score = delim, score
    if best_score < 0:
        if _space_separated(lines):
            return SPACE
        raise RatingFileError(_no_common_delimiter(lines, source, numbers))
    return best


_DELIMS = ("\t", ",", ";", "|", "::")
SPACE = " "  # the delimiter of a space-separated file: fields are split on runs of spaces


def _space_separated(lines: list[str]) -> bool:
    """Lines with none of the other delimiters (nor a quote) and at least three space-separated
    fields each (user, item, rating[, time]: LibRec-style ``ratings.txt``)."""
    if not lines or any('"' in ln or any(d in ln for d in _DELIMS) for ln in lines):
        return False
    return all(len(split_fields(ln, SPACE)) >= 3 for ln in lines)


def _no_common_delimiter(
    lines: list[str], source: str | os.PathLike[str] | None, numbers: list[int] | None
) -> str:
    """Why no delimiter is common to the first lines: none has any, one line has none, or the
    lines use different ones (each line and its delimiters named)."""
    prefix = f"{source}" if source is not None else ""
    nums = numbers if numbers is not None else list(range(1, len(lines) + 1))
    found = [tuple(d for d in _DELIMS if d in ln) for ln in lines]
    if not any(found):
        return (
            f"{prefix}: " if prefix else ""
        ) + "cannot tell the delimiter: no line has a tab, comma, semicolon, pipe or '::'"
    names = {d: _delim_name(d) for d in _DELIMS}
    bare = [j for j, f in enumerate(found) if not f]
    if bare:
        j = bare[0]
        k = next(k for k, f in enumerate(found) if f)
        return (
            f"{prefix}:{nums[j]}: cannot tell the delimiter: this line has no tab, comma, "
            f"semicolon, pipe or '::' ({_shown(lines[j])}), line {nums[k]} has "
            f"{' and '.join(names[d] for d in found[k])}"
        )
    shown: list[str] = []
    seen: set[tuple[str, ...]] = set()
    for j, f in enumerate(found):
        if f not in seen and len(shown) < 4:
            seen.add(f)
            shown.append(f"line {nums[j]} has {' and '.join(names[d] for d in f)}")
    return (
        (f"{prefix}: " if prefix else "")
        + "cannot tell the delimiter: the lines use different delimiters ("
        + "; ".join(shown)
        + "); every line must use the same one: tab, comma, semicolon, pipe or '::'"
    )


def _sniff_file(path: Path, lines: list[str] | None = None) -> str:
    """:func:`sniff_delimiter` on a file's first ``lines`` (read if not given); the error says what
    the file looks like."""
    head = _head_numbered(path)
    numbers = [n for n, _ in head] if lines is None or lines == [t for _, t in head] else None
    try:
        return sniff_delimiter([t for _, t in head] if lines is None else lines, path, numbers)
    except RatingFileError as e:
        with open(path, "rb") as f:
            raw = f.read(4096)
        texts = [t for _, t in head] if lines is None else lines
        if raw[:4] == _PARQUET_MAGIC:
            hint = "it is a Parquet file; use --format parquet or auto"
        elif b"\0" in raw:
            hint = "it looks binary, not a text rating file"
        elif (
            texts
            and any(len(split_fields(t, SPACE)) >= 3 for t in texts)
            and not any(d in t for t in texts for d in _DELIMS)
        ):
            short = next(t for t in texts if len(split_fields(t, SPACE)) < 3)
            at = next((f"line {n} " for n, t in head if t == short), "")
            hint = (
                f"its fields are separated by spaces, but {at or 'a line '}has fewer than three "
                f"(user, item, rating): {_shown(short)}"
            )
        else:
            hint = "expected a text rating file with one (user, item, rating[, time]) row a line"
        raise RatingFileError(f"{e} ({hint})") from None


# magic bytes of compressed files (a ratings.csv.gz read as text was "cannot tell the delimiter"
# with a line of binary shown); bzip2 with its first block's magic, so no text line matches
_COMPRESSED = (
    (re.compile(rb"\x1f\x8b"), "gzip", "gunzip -k"),
    (re.compile(rb"BZh[1-9]1AY&SY"), "bzip2", "bunzip2 -k"),
    (re.compile(rb"PK\x03\x04"), "zip", "unzip"),
    (re.compile(rb"\xfd7zXZ\x00"), "xz", "unxz -k"),
    (re.compile(rb"\x28\xb5\x2f\xfd"), "zstd", "unzstd"),
)


_WIDE_BOMS = (  # UTF-32 first: its little-endian mark starts with UTF-16's
    (b"\xff\xfe\x00\x00", "UTF-32"),
    (b"\x00\x00\xfe\xff", "UTF-32"),
    (b"\xff\xfe", "UTF-16"),
    (b"\xfe\xff", "UTF-16"),
)


def utf16_or_32(path: str | os.PathLike[str]) -> str | None:
    """The error for a text file in UTF-16 or UTF-32 (by its byte-order mark; Excel's "Unicode
    Text" is UTF-16), else None: it was read as UTF-8 and said to "look binary"."""
    p = Path(path)
    with open(p, "rb") as f:
        head = f.read(4)
    for bom, name in _WIDE_BOMS:
        if head.startswith(bom):
            return (
                f"{path}: the file is {name} text (it starts with a {name} byte-order mark); "
                f"re-encode it as UTF-8 (e.g. iconv -f {name} -t UTF-8 {path} > "
                f"{p.with_name(p.stem + '-utf8' + p.suffix)})"
            )
    return None


def _compression(path: Path) -> tuple[str, str] | None:
    """(kind, a command that decompresses it) when ``path`` starts like a compressed file."""
    with open(path, "rb") as f:
        head = f.read(10)
    for magic, kind, tool in _COMPRESSED:
        if magic.match(head):
            return kind, tool
    return None


def _is_parquet(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == _PARQUET_MAGIC


def detect_format(path: str | os.PathLike[str]) -> str:
    """Tell the supported formats apart by content (never by file name alone)."""
    p = Path(path)
    with open(p, "rb") as f:
        magic = f.read(4)
    if magic == _PARQUET_MAGIC:
        return "parquet"
    lines = _head_lines(p)
    if not lines:
        raise RatingFileError(f"{p}: empty file (no rating lines)")
    delim = _sniff_file(p, lines)
    if delim == "::":
        return "ml-1m"
    first = [c.strip().lower() for c in split_fields(lines[0], delim)]
    # MovieLens latest is comma-separated: the same header with tabs or semicolons is a generic
    # file of that delimiter (the ml-latest reader splits on commas only)
    if delim == "," and (
        first[:4] == ["userid", "movieid", "rating", "timestamp"]
        or first[:3] == ["userid", "movieid", "rating"]
    ):
        return "ml-latest"
    if delim == "\t":
        fields = [ln.split("\t") for ln in lines]
        if all(
            len([c for c in r if c.strip()]) == 4 and all(c.strip().isdigit() for c in r[:4])
            for r in fields
        ):
            return "ml-100k"
        return "tsv"
    return "csv"


# ------------------------------------------------------------------------------------------------
# parsing
# ------------------------------------------------------------------------------------------------
def _is_position(s: str) -> bool:
    """A 0-based column position: ASCII digits only ("²".isdigit() is True but int() rejects it)."""
    return s.isascii() and s.isdigit()


def _find_col(
    spec: str | None, header: list[str] | None, default: int | None, what: str, where: str
) -> int | None:
    """The column of ``what`` (user/item/rating/time): ``spec`` as a header name or a 0-based
    position; without a spec a known header name, else the ``default`` position."""
    lowered = [h.strip().lower() for h in header] if header is not None else None
    if spec is not None:
        s = spec.strip()
        if lowered is not None and s.lower() in lowered:
            return lowered.index(s.lower())
        if _is_position(s):
            return int(s)
        if s.startswith("-") and _is_position(s[1:]):
            # Python's "last column" reading of -1 would silently pick a different column
            raise RatingFileError(f"{where}: {what} column {spec!r}: positions are 0 or more")
        raise RatingFileError(
            f"{where}: {what} column {spec!r} not found"
            + (f" in header {header}" if header is not None else " (the file has no header)")
        )
    if lowered is not None:
        for name in _ROLE_NAMES[what]:
            if name in lowered:
                return lowered.index(name)
        # fall back on the position only if the header does not name that column as another
        # role: "user,item,timestamp" has no rating column, its timestamps are not ratings
        others = {n for role, names in _ROLE_NAMES.items() if role != what for n in names}
        if default is not None and default < len(lowered) and lowered[default] not in others:
            return default
        return None
    return default


def _check_distinct(cols: dict[str, int | None], names: list[str] | None, where: str) -> None:
    """Two roles read from one column (``--user-col x --item-col x``) is always a mistake."""
    seen: dict[int, str] = {}
    for what, c in cols.items():
        if c is None:
            continue
        if c in seen:
            name = repr(names[c]) if names is not None else f"position {c}"
            raise RatingFileError(f"{where}: the {seen[c]} and {what} columns are both {name}")
        seen[c] = what


def _epoch_seconds(t: datetime) -> float:
    """Seconds since the epoch; a time without a zone is read as UTC (not the machine's local zone,
    which would make the same log give different times, and around DST a different order)."""
    return (t if t.tzinfo is not None else t.replace(tzinfo=UTC)).timestamp()


def _parse_time(s: str, where: str) -> float:
    s = s.strip()
    if s.lower() in _MISSING:
        return math.nan
    try:
        t = float(s)
    except ValueError:
        pass
    else:
        if math.isinf(t):  # "inf", "1e400": as an infinite rating, an error (not a missing time)
            raise RatingFileError(f"{where}: timestamp {s!r} is infinite")
        return t
    try:
        return _epoch_seconds(datetime.fromisoformat(s))
    except ValueError:
        raise RatingFileError(
            f"{where}: timestamp {s!r} is neither a number nor an ISO-8601 date"
        ) from None


def _iter_rows(path: Path, delim: str) -> Iterator[tuple[int, list[str] | None, str]]:
    """Yield (line_number, fields or None for skipped lines, raw line)."""
    # utf-8-sig: a leading byte-order mark is dropped, not read into the first id or column name
    with open(path, encoding="utf-8-sig", errors="strict", newline="") as f:
        try:
            if delim in ("::", SPACE):
                for n, line in enumerate(f, start=1):
                    raw = line.rstrip("\r\n")
                    yield n, split_fields(raw, delim), raw
            else:
                for n, line in enumerate(f, start=1):
                    raw = line.rstrip("\r\n")
                    if '"' in raw:
                        fields = next(csv.reader(io.StringIO(raw), delimiter=delim))
                    else:
                        fields = raw.split(delim)
                    yield n, fields, raw
        except UnicodeDecodeError as e:
            # the text reader decodes ahead in chunks: e.start is within a chunk, not the file
            found = _first_non_utf8(path)  # None: the file changed under us
            where, what = (
                (f"{path}:{found[0]}", f"{found[2]} at byte {found[1]}")
                if found is not None
                else (str(path), e.reason)
            )
            raise RatingFileError(
                f"{where}: not UTF-8 text ({what}); "
                "re-encode the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)"
            ) from e


def _line_breaks(data: bytes, after_cr: bool) -> int:
    """Line ends in ``data`` as the text reader counts them (\\n, \\r\\n or a lone \\r);
    ``after_cr``: the bytes before ``data`` ended with \\r (a \\r\\n split across reads)."""
    n = data.count(b"\n") + data.count(b"\r") - data.count(b"\r\n")
    return n - 1 if after_cr and data.startswith(b"\n") else n


def _first_non_utf8(path: Path) -> tuple[int, int, str] | None:
    """(line, byte offset in the file, what) of the first bytes of ``path`` that are not UTF-8, or
    None. Only the file up to those bytes is read (an error path: the rows before were parsed)."""
    dec = codecs.getincrementaldecoder("utf-8")()
    line, offset, after_cr = 1, 0, False
    with open(path, "rb") as f:
        while True:
            chunk = f.read(1 << 16)
            pending = len(dec.getstate()[0])  # an incomplete sequence held from the last read
            try:
                dec.decode(chunk, final=not chunk)
            except UnicodeDecodeError as e:
                bad = e.start - pending  # < 0: the sequence began in the previous read
                line += _line_breaks(chunk[: max(bad, 0)], after_cr)
                shown = " ".join(f"0x{b:02x}" for b in e.object[e.start : e.end])
                return line, offset + bad, f"{e.reason}: {shown}"
            if not chunk:
                return None
            line += _line_breaks(chunk, after_cr)
            after_cr = chunk.endswith(b"\r")
            offset += len(chunk)


@dataclass
class _Collector:
    users: list[str] = field(default_factory=list)
    items: list[str] = field(default_factory=list)
    ratings: list[float] = field(default_factory=list)
    times: list[float] = field(default_factory=list)
    where: list[str] = field(default_factory=list)


def _resolve_columns(
    fields: list[str], raw: str, delim: str, opts: LoadOptions, where: str
) -> tuple[list[str] | None, int, int, int, int | None]:
    """From the first data-looking line: (header or None, user, item, rating, time column).

    Shared by both readers so that they accept and refuse the same files with the same message."""
    header: list[str] | None = None
    # header: the rating-like field (3rd by default) is not a number
    guess_r = 2
    if opts.rating_col is not None and _is_position(opts.rating_col.strip()):
        guess_r = int(opts.rating_col)
    cand = fields[guess_r].strip() if len(fields) > guess_r else ""
    if not _is_number(cand) and cand.lower() not in _MISSING:
        header = [c.strip() for c in fields]
        while header and header[-1] == "":
            header.pop()
    # headerless: the 4th column is the timestamp unless other columns were placed explicitly
    explicit = (opts.user_col, opts.item_col, opts.rating_col) != (None, None, None)
    specs = {
        "user": (opts.user_col, 0),
        "item": (opts.item_col, 1),
        "rating": (opts.rating_col, 2),
        "time": (opts.time_col, 3 if header is None and not explicit else None),
    }
    cols = {what: _find_col(spec, header, d, what, where) for what, (spec, d) in specs.items()}
    if header is not None and opts.user_col is None and opts.item_col is None:
        # A header that names neither the user nor the item column ("product,customer,rating")
        # would otherwise be read by position, silently swapping users and items whenever the
        # file lists items first. Parquet already refuses unknown column names; so does this.
        lowered = {h.lower() for h in header}
        if not lowered & set(_USER_NAMES) and not lowered & set(_ITEM_NAMES):
            raise RatingFileError(
                f"{where}: the header {header} names neither a user column "
                f"({', '.join(_USER_NAMES)}) nor an item column ({', '.join(_ITEM_NAMES)}); "
                "pass --user-col NAME|POS and --item-col NAME|POS"
            )
    for what in ("user", "item", "rating"):
        if cols[what] is None:
            raise RatingFileError(
                f"{where}: no {what} column in header {header}; pass --{what}-col NAME|POS"
            )
    ucol, icol, rcol, tcol = cols["user"], cols["item"], cols["rating"], cols["time"]
    assert ucol is not None and icol is not None and rcol is not None
    # a position given explicitly must exist; the default timestamp column is optional
    width = len(header) if header is not None else len(fields)
    for what, c in cols.items():
        if c is not None and c >= width and specs[what][0] is not None:
            raise RatingFileError(
                f"{where}: {what} column {c} is out of range: the line has {width} "
                f"{_delim_name(delim)}-separated fields: {raw!r}"
            )
    need = max(ucol, icol, rcol) + 1
    if need > width:  # e.g. a comma file read with --format ml-100k (tabs): one field per line
        raise RatingFileError(
            f"{where}: expected at least {need} {_delim_name(delim)}-separated fields "
            f"(user, item, rating), got {len(fields)}: {raw!r}"
        )
    _check_distinct(cols, header, where)
    return header, ucol, icol, rcol, tcol


def _read_text(path: Path, fmt: str, opts: LoadOptions, report: CleaningReport) -> _Collector:
    head = _head_lines(path)
    if not head:
        raise RatingFileError(f"{path}: empty file (no rating lines)")
    delim = {"ml-100k": "\t", "ml-1m": "::", "ml-latest": ",", "tsv": "\t"}.get(fmt)
    if delim is None:
        delim = _sniff_file(path, head)
    ucol = icol = rcol = tcol = None
    header: list[str] | None = None
    resolved = False
    out = _Collector()
    for n, fields, raw in _iter_rows(path, delim):
        where = f"{path}:{n}"
        stripped = raw.strip()
        if not stripped:
            report.add("blank_lines", where)
            continue
        if stripped[0] in "#%":
            report.add("comment_lines", where)
            continue
        assert fields is not None
        if not resolved:
            header, ucol, icol, rcol, tcol = _resolve_columns(fields, raw, delim, opts, where)
            resolved = True
            if header is not None:
                report.add("header_lines", where)
                continue
        if header is not None and [c.strip() for c in fields[: len(header)]] == header:
            report.add("header_lines", where)
            continue
        assert ucol is not None and icol is not None and rcol is not None
        need = max(ucol, icol, rcol) + 1
        width = len(header) if header is not None else max(need, (tcol or 0) + 1)
        if len(fields) > width and fields[-1].strip() == "":
            while len(fields) > width and fields[-1].strip() == "":
                fields.pop()
            report.add("trailing_empty_columns", where)
        fixed = max(_FIXED_FIELDS.get(fmt, 0), width)
        if fmt in _FIXED_FIELDS and len(fields) > fixed:
            raise RatingFileError(
                f"{where}: {fmt} lines have {fixed} {_delim_name(delim)}-separated fields "
                f"(user, item, rating, timestamp), got {len(fields)}: {_shown(raw)}"
            )
        if len(fields) < need:
            raise RatingFileError(
                f"{where}: expected at least {need} {_delim_name(delim)}-separated fields "
                f"(user, item, rating), got {len(fields)}: {raw!r}"
            )
        _collect(
            out,
            report,
            where,
            fields[ucol],
            fields[icol],
            fields[rcol],
            fields[tcol] if tcol is not None and tcol < len(fields) else None,
        )
    return out


class _LineLocs:
    """Lazy ``file:line`` locations of the rows of a fast-path read (no per-row strings): row j
    is on line ``first + j`` (``lines`` None, no per-row array at all) or on ``lines[j]`` once
    rows were dropped (:meth:`keep`)."""

    def __init__(self, prefix: str, lines: np.ndarray | None, first: int = 0) -> None:
        self.prefix, self.lines, self.first = prefix, lines, first

    def __getitem__(self, j: int) -> str:
        line = self.first + int(j) if self.lines is None else int(self.lines[j])
        return f"{self.prefix}{line}"

    def keep(self, rows: np.ndarray) -> _LineLocs:
        """The locations of the kept rows (a boolean mask or row indices)."""
        rows = np.asarray(rows)
        if rows.dtype == bool:
            rows = np.flatnonzero(rows)
        if self.lines is None:
            return _LineLocs(self.prefix, self.first + rows.astype(np.int64))
        return _LineLocs(self.prefix, self.lines[rows])


def _delim_name(delim: str) -> str:
    names = {"\t": "tab", ",": "comma", ";": "semicolon", "|": "pipe", "::": "'::'", SPACE: "space"}
    return names[delim]


def split_fields(line: str, delim: str) -> list[str]:
    """A line's fields: split on ``delim``; a space-separated line on runs of spaces (leading and
    trailing spaces ignored)."""
    if delim == SPACE:
        return [c for c in line.split(" ") if c != ""]
    return line.split(delim)


def _collect(
    out: _Collector,
    report: CleaningReport,
    where: str,
    user: Any,
    item: Any,
    rating: Any,
    time: Any,
) -> None:
    report.rows_read += 1
    u = id_text(user)
    it = id_text(item)
    if u == "":
        raise RatingFileError(f"{where}: empty user id (row {user!r}, {item!r}, {rating!r})")
    if it == "":
        raise RatingFileError(f"{where}: empty item id (row {user!r}, {item!r}, {rating!r})")
    for what, s in (("user", u), ("item", it)):
        problem = id_problem(s)
        if problem:
            raise RatingFileError(f"{where}: {what} id {_shown(s)} {problem}")
    if isinstance(rating, str):
        rs = rating.strip()
        if rs.lower() in _MISSING:
            report.add("missing_ratings", where)
            return
        try:
            r = float(rs)
        except ValueError:
            raise RatingFileError(f"{where}: rating {rating!r} is not a number") from None
    elif rating is None:
        report.add("missing_ratings", where)
        return
    else:
        r = float(rating)
    if math.isnan(r):
        report.add("missing_ratings", where)
        return
    if math.isinf(r):
        raise RatingFileError(f"{where}: rating {rating!r} is infinite")
    if time is None:
        t = math.nan
    elif isinstance(time, str):
        t = _parse_time(time, where)
        if math.isnan(t):
            report.add("missing_timestamps", where)
    else:
        t = float(time)
        if math.isnan(t):
            report.add("missing_timestamps", where)
        elif math.isinf(t):
            raise RatingFileError(f"{where}: timestamp {time!r} is infinite")
    out.users.append(u)
    out.items.append(it)
    out.ratings.append(r)
    out.times.append(t)
    out.where.append(where)


def _shown(s: str, n: int = 60) -> str:
    """``repr(s)``, cut short for a message (a fuzzed line can be megabytes long)."""
    return repr(s) if len(s) <= n else f"{s[:n]!r}..."


def id_text(v: Any) -> str:
    """An id cell as text, the one conversion for rating files and item-feature files: integral
    floats lose their ".0" (a Parquet/JSON 10.0 is the item "10"), surrounding whitespace and
    quotes are stripped; None / NaN are "" (an empty id, which callers refuse)."""
    if v is None:
        return ""
    if isinstance(v, float):
        if math.isnan(v):
            return ""
        if v.is_integer():
            return str(int(v))
    return str(v).strip().strip('"').strip()


def _check_parquet_type(path: Path, name: str, typ: Any, what: str) -> None:
    """Refuse column types that have no rating / timestamp / id meaning (booleans, dates,
    durations, lists, ...) up front, naming the column, rather than failing on some row."""
    import pyarrow.types as pt

    if pt.is_dictionary(typ):  # categorical columns: judge the values
        typ = typ.value_type
    text = pt.is_string(typ) or pt.is_large_string(typ)  # parsed like the text formats
    number = pt.is_integer(typ) or pt.is_floating(typ) or pt.is_decimal(typ)  # not bool
    if what == "time":
        ok, want = text or number or pt.is_timestamp(typ), "numbers, a timestamp or ISO-8601 text"
    elif what == "rating":
        ok, want = text or number, "numbers"
    else:
        ok, want = text or number, "text or integers"
    if not (ok or pt.is_null(typ)):  # an all-null column is read as missing values
        raise RatingFileError(f"{path}: {what} column {name!r} has type {typ}; expected {want}")


def _read_parquet(path: Path, opts: LoadOptions, report: CleaningReport) -> _Collector:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several exception types for corrupt files
        raise RatingFileError(f"{path}: cannot read Parquet: {e}") from e
    names = list(table.column_names)
    where = str(path)

    found: dict[str, int | None] = {}
    for what, spec in (
        ("user", opts.user_col),
        ("item", opts.item_col),
        ("rating", opts.rating_col),
        ("time", opts.time_col),
    ):
        idx = _find_col(spec, names, None, what, where)
        if idx is None and what != "time":
            raise RatingFileError(f"{path}: no {what} column among {names}; pass --{what}-col NAME")
        if idx is not None and idx >= len(names):
            raise RatingFileError(f"{path}: {what} column index {idx} out of range for {names}")
        if idx is not None:
            _check_parquet_type(path, names[idx], table.schema.field(idx).type, what)
        found[what] = idx
    _check_distinct(found, names, where)
    uc, ic, rc, tc = (None if i is None else names[i] for i in found.values())
    assert uc is not None and ic is not None and rc is not None
    cols = {c: table.column(c).to_pylist() for c in {uc, ic, rc} | ({tc} if tc else set())}
    out = _Collector()
    for row in range(table.num_rows):
        t = cols[tc][row] if tc else None
        if tc and t is None:
            t = math.nan  # a null timestamp: counted as missing
        if isinstance(t, datetime):
            t = _epoch_seconds(t)
        _collect(
            out,
            report,
            f"{path}:row {row + 1}",
            cols[uc][row],
            cols[ic][row],
            cols[rc][row],
            t,
        )
    return out


def file_fingerprint(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


MS_THRESHOLD = 1e11  # seconds above this are after the year 5138; ms above it after March 1973
MS_MAX = 1e14  # beyond: not milliseconds of a plausible date either (left alone)


def _seconds_from_mixed_units(
    times: np.ndarray, where: list[str] | _LineLocs, report: CleaningReport
) -> np.ndarray:
    """The ``timestamps_ms_converted`` rule (module docstring): in a column of mostly-second
    timestamps, values in (1e11, 1e14] are milliseconds: divided by 1000 and counted."""
    finite = np.isfinite(times)
    n = int(np.count_nonzero(finite))
    if n == 0:
        return times
    seconds = finite & (times <= MS_THRESHOLD)
    if 2 * int(np.count_nonzero(seconds)) < n:
        return times  # a column in milliseconds (or another unit) throughout: left as it is
    ms = finite & (times > MS_THRESHOLD) & (times <= MS_MAX)
    if not ms.any():
        return times
    idx = np.flatnonzero(ms)
    for j in idx[:5]:
        report.add("timestamps_ms_converted", f"{where[int(j)]} ({times[int(j)]:.0f})", n=0)
    report.add("timestamps_ms_converted", n=int(idx.size))
    out = times.copy()
    out[ms] = times[ms] / 1000.0
    return out


def load_ratings(path: str | os.PathLike[str], options: LoadOptions | None = None) -> RatingTable:
    """Read and clean one rating file. See the module docstring for the cleaning rules."""
    opts = options or LoadOptions()
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such rating file")
    if p.is_dir():
        raise RatingFileError(
            f"{p}: is a directory; pass a rating file (e.g. u1.base, ratings.dat)"
        )
    if p.stat().st_size == 0:
        raise RatingFileError(f"{p}: empty file (0 bytes)")
    wide = utf16_or_32(p)
    if wide is not None:
        raise RatingFileError(wide)
    packed = _compression(p)
    if packed is not None:
        kind, tool = packed
        raise RatingFileError(
            f"{p}: the file is {kind}-compressed; decompress it first (e.g. {tool} {p}): ratings "
            "are read from plain text or Parquet"
        )
    scan = None
    if opts.format != "parquet" and not _is_parquet(p):
        try:  # one bounded pass: fingerprint, line-length limit, what the fast reader can take
            scan = scan_text(p)
        except LineTooLongError as e:
            raise RatingFileError(str(e)) from None
    fmt = detect_format(p) if opts.format == "auto" else opts.format
    report = CleaningReport(source=str(p), format=fmt)
    fast = None
    if fmt != "parquet" and opts.fast and scan is not None:
        fast = read_text_fast(p, fmt, opts, report, scan)
    where: list[str] | _LineLocs
    codes: tuple[IdCodes, IdCodes] | None = None
    if fast is not None:
        ucodes, icodes, ratings, times, where = fast
        codes = (ucodes, icodes)
        report.parser = "fast"
    else:
        report.counts.clear()
        report.examples.clear()
        report.rows_read = 0
        if fmt == "parquet":
            got = _read_parquet(p, opts, report)
        else:
            got = _read_text(p, fmt, opts, report)
        if not got.ratings:
            raise RatingFileError(
                f"{p}: no rating rows"
                + (f" (cleaning: {dict(report.counts)})" if report.counts else " (empty file)")
            )
        users = np.array(got.users, dtype=str)
        items = np.array(got.items, dtype=str)
        ratings = np.array(got.ratings, dtype=np.float64)
        times = np.array(got.times, dtype=np.float64)
        where = got.where

    times = _seconds_from_mixed_units(times, where, report)

    # ---- rating scale -----------------------------------------------------------------------
    if opts.rating_scale is not None:
        lo, hi = opts.rating_scale
    elif fmt in ML_SCALES:
        lo, hi = ML_SCALES[fmt]
    else:
        _check_observed_scale(ratings, where)
        lo, hi = float(ratings.min()), float(ratings.max())
        if lo == hi:
            lo, hi = lo - 1.0, hi + 1.0  # a constant file still gets a non-empty scale
    outside = (ratings < lo) | (ratings > hi)
    keep_rows: np.ndarray | None = None  # row indices kept (None: all)
    if outside.any():
        bad = np.flatnonzero(outside)
        if opts.format == "auto" and opts.rating_scale is None and fmt in _FIXED_FIELDS:
            _refuse_guessed_scale(fmt, lo, hi, ratings, bad, where)
        if opts.on_out_of_scale == "error":
            j = int(bad[0])
            raise RatingFileError(
                f"{where[j]}: rating {ratings[j]:g} is outside the scale [{lo:g}, {hi:g}] "
                f"({bad.size} such rows; use --on-out-of-scale clip|drop)"
            )
        rule = (
            "ratings_clipped" if opts.on_out_of_scale == "clip" else "ratings_out_of_scale_dropped"
        )
        for j in bad[:5]:
            report.add(rule, f"{where[int(j)]} ({ratings[int(j)]:g})", n=0)
        report.add(rule, n=int(bad.size))
        if opts.on_out_of_scale == "clip":
            ratings = np.clip(ratings, lo, hi)
        else:
            keep_rows = np.flatnonzero(~outside)

    if codes is not None:
        table = _finish_fast(p, codes, ratings, times, where, keep_rows, report, scan)
    else:
        if keep_rows is not None:
            users, items, ratings, times = (
                users[keep_rows],
                items[keep_rows],
                ratings[keep_rows],
                times[keep_rows],
            )
            where = [where[int(j)] for j in keep_rows]
        table = _finish_reference(p, users, items, ratings, times, where, report, scan)
    release_arrow_memory()
    return RatingTable(
        users=table[0],
        items=table[1],
        ratings=table[2],
        timestamps=table[3],
        rating_min=float(lo),
        rating_max=float(hi),
        report=report,
        fingerprint=table[4],
        user_codes=table[5],
        item_codes=table[6],
    )


def release_arrow_memory() -> None:
    """Give the memory pyarrow's allocator keeps for reuse back to the system: the CSV reader's
    freed buffers (the string columns of 20M rows: about 0.7 GB) would otherwise stay resident
    for the whole training run."""
    import sys

    pa = sys.modules.get("pyarrow")
    if pa is not None:
        pa.default_memory_pool().release_unused()


_Finished = tuple[
    np.ndarray | None,
    np.ndarray | None,
    np.ndarray,
    np.ndarray,
    str,
    IdCodes | None,
    IdCodes | None,
]


def _finish_reference(
    p: Path,
    users: np.ndarray,
    items: np.ndarray,
    ratings: np.ndarray,
    times: np.ndarray,
    where: Any,
    report: CleaningReport,
    scan: Any,
) -> _Finished:
    """Duplicates and id counts on the string columns (the reference parser's rows)."""
    # ---- duplicates: keep the latest by timestamp (ties / NaN: the later line wins) --------------
    keep_idx = _dedup_latest(users, items, times)
    n_dup = users.size - keep_idx.size
    if n_dup:
        dropped = np.setdiff1d(np.arange(users.size), keep_idx)
        for j in dropped[:5]:
            report.add("duplicates_removed", f"{where[int(j)]} ({users[j]}, {items[j]})", n=0)
        report.add("duplicates_removed", n=int(n_dup))
        users, items, ratings, times = (
            users[keep_idx],
            items[keep_idx],
            ratings[keep_idx],
            times[keep_idx],
        )
    if users.size == 0:
        raise RatingFileError(f"{p}: no rating rows left after cleaning {dict(report.counts)}")
    for name, arr in (("non_numeric_user_ids", users), ("non_numeric_item_ids", items)):
        nn = int(np.count_nonzero(~np.char.isdigit(np.unique(arr))))
        if nn:
            report.add(name, n=nn)
    report.rows_kept = int(users.size)
    fingerprint = scan.fingerprint if scan is not None else file_fingerprint(p)
    return users, items, ratings, times, fingerprint, None, None


def _finish_fast(
    p: Path,
    codes: tuple[IdCodes, IdCodes],
    ratings: np.ndarray,
    times: np.ndarray,
    where: Any,
    keep_rows: np.ndarray | None,
    report: CleaningReport,
    scan: Any,
) -> _Finished:
    """:func:`_finish_reference` on dictionary-encoded ids (integers, never sorting strings)."""
    uc, ic = codes
    if keep_rows is not None:
        uc, ic = uc.take(keep_rows), ic.take(keep_rows)
        ratings, times = ratings[keep_rows], times[keep_rows]
        where = where.keep(keep_rows)
    keep_idx = _dedup_latest_codes(uc.codes, ic.codes, ic.uniques.size, times)
    if keep_idx is not None:
        dropped = np.setdiff1d(np.arange(uc.codes.size), keep_idx)
        for j in dropped[:5]:
            u, i = uc.uniques[uc.codes[j]], ic.uniques[ic.codes[j]]
            report.add("duplicates_removed", f"{where[int(j)]} ({u}, {i})", n=0)
        report.add("duplicates_removed", n=int(dropped.size))
        uc, ic = uc.take(keep_idx), ic.take(keep_idx)
        ratings, times = ratings[keep_idx], times[keep_idx]
    if uc.codes.size == 0:
        raise RatingFileError(f"{p}: no rating rows left after cleaning {dict(report.counts)}")
    for name, col in (("non_numeric_user_ids", uc), ("non_numeric_item_ids", ic)):
        present = col.uniques[np.bincount(col.codes, minlength=col.uniques.size) > 0]
        nn = int(np.count_nonzero(~np.char.isdigit(present)))
        if nn:
            report.add(name, n=nn)
    report.rows_kept = int(uc.codes.size)
    return None, None, ratings, times, scan.fingerprint, uc, ic


def _dedup_latest_codes(
    ucodes: np.ndarray, icodes: np.ndarray, n_items: int, times: np.ndarray
) -> np.ndarray | None:
    """:func:`_dedup_latest` on integer ids; None when there is no duplicate (the common case,
    told by building the sparse user × item matrix, which merges repeated pairs, in linear time)."""
    import scipy.sparse as sp

    n_users = int(ucodes.max()) + 1 if ucodes.size else 0
    m = sp.csr_matrix(
        (np.ones(ucodes.size, dtype=np.int8), (ucodes, icodes)), shape=(n_users, max(n_items, 1))
    )
    m.sum_duplicates()
    if m.nnz == ucodes.size:
        return None
    return _dedup_latest(ucodes, icodes, times)


def _check_observed_scale(ratings: np.ndarray, where: Any) -> None:
    """No declared scale: the observed range becomes the rating scale. Refuse ratings that would
    make it absurd — beyond ±:data:`MAX_ABS_RATING` (training's squares and sums overflow), or a few
    extreme outliers far outside the bulk of the ratings (a 1e6 among 1..5 ratings would make
    the scale 1..1e6, and every prediction clipped to it) — naming ``file:line`` and the flag."""
    big = np.flatnonzero(np.abs(ratings) > MAX_ABS_RATING)
    if big.size:
        j = int(big[0])
        raise RatingFileError(
            f"{where[j]}: rating {ratings[j]:g} is beyond the ±{MAX_ABS_RATING:g} a rating may "
            f"have ({big.size} such rows); fix the file, or pass --rating-scale MIN MAX to clip "
            "(or --on-out-of-scale drop) such rows"
        )
    if ratings.size < 4:
        return
    # quantiles of a fixed stride sample (at most ~1M values): deterministic, and linear time
    sample = ratings[:: max(1, ratings.size // 1_000_000)]
    q1, med, q3 = np.quantile(sample, [0.25, 0.5, 0.75], method="inverted_cdf")
    spread = float(q3 - q1)
    if spread == 0.0:
        a, b = np.quantile(sample, [0.01, 0.99], method="inverted_cdf")
        spread = float(b - a) or max(abs(float(med)), 1.0)
    limit = OUTLIER_SPREADS * spread
    if float(ratings.max()) - med <= limit and med - float(ratings.min()) <= limit:
        return
    far = np.abs(ratings - med) > limit
    n_far = int(np.count_nonzero(far))
    if n_far == 0 or n_far > max(2.0, OUTLIER_MAX_FRACTION * ratings.size):
        return
    j = int(np.flatnonzero(far)[0])
    rest = ratings[~far]
    a, b = float(rest.min()), float(rest.max())
    raise RatingFileError(
        f"{where[j]}: rating {ratings[j]:g} is far outside the other ratings ({n_far} of "
        f"{ratings.size} rows; the others lie in [{a:g}, {b:g}]): without a declared scale it "
        f"would become the rating scale; pass --rating-scale MIN MAX (e.g. --rating-scale "
        f"{a:g} {b:g}, rows outside clipped, or --on-out-of-scale drop|error), or fix the file"
    )


def _refuse_guessed_scale(
    fmt: str, lo: float, hi: float, ratings: np.ndarray, bad: np.ndarray, where: Any
) -> None:
    """An auto-detected ML-100K / ML-1M file with ratings off that format's fixed scale.

    The detection only saw four integer columns (or ``::`` separators): a 1..10 rating log looks
    the same, and clipping it to 1..5 would silently train on different ratings. A real MovieLens
    file never gets here; ``--format ml-100k|ml-1m`` keeps the clip / drop / error rule."""
    j = int(bad[0])
    shape = "tab-separated lines of 4 integers" if fmt == "ml-100k" else "'::'-separated lines"
    generic = "tsv" if fmt == "ml-100k" else "csv"  # csv: the delimiter ('::' too) is sniffed
    rmin, rmax = float(ratings.min()), float(ratings.max())
    raise RatingFileError(
        f"{where[j]}: rating {ratings[j]:g} is outside the [{lo:g}, {hi:g}] scale of the {fmt} "
        f"format, which was auto-detected ({shape}); {bad.size} of {ratings.size} ratings are "
        f"outside it (observed range {rmin:g}..{rmax:g}). If this is not a MovieLens file, pass "
        f"--format {generic} --rating-scale MIN MAX (e.g. --rating-scale {rmin:g} {rmax:g}, or "
        f"the file's real scale); to read it as {fmt} anyway (ratings clipped, or "
        f"--on-out-of-scale drop|error), pass --format {fmt}"
    )


def _dedup_latest(users: np.ndarray, items: np.ndarray, times: np.ndarray) -> np.ndarray:
    """Row indices to keep: for each (user, item) the row with the largest timestamp; ties and
    missing timestamps go to the later row. Returned in original row order."""
    n = users.size
    key_u = np.unique(users, return_inverse=True)[1]
    key_i = np.unique(items, return_inverse=True)[1]
    t = np.where(np.isnan(times), -np.inf, times)
    # sort by (user, item, time, row): the last row of each group is the one to keep
    order = np.lexsort((np.arange(n), t, key_i, key_u))
    ku, ki = key_u[order], key_i[order]
    last = np.ones(n, dtype=bool)
    last[:-1] = (ku[1:] != ku[:-1]) | (ki[1:] != ki[:-1])
    return np.sort(order[last])


def dedup_latest_reference(users: list[str], items: list[str], times: list[float]) -> list[int]:
    """Slow, obvious twin of :func:`_dedup_latest` (used by the tests)."""
    best: dict[tuple[str, str], int] = {}
    for j, (u, i, t) in enumerate(zip(users, items, times, strict=True)):
        tj = -math.inf if math.isnan(t) else t
        k = best.get((u, i))
        if k is None:
            best[(u, i)] = j
            continue
        tk = -math.inf if math.isnan(times[k]) else times[k]
        if tj >= tk:
            best[(u, i)] = j
    return sorted(best.values())
