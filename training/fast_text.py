"""The fast text reader: one bounded-memory byte scan, then pyarrow's CSV reader, ids dictionary-encoded.

:func:`scan_text` reads the file once in 4 MiB chunks: its sha256 (the table's fingerprint), the line
length limit (:data:`MAX_LINE_BYTES`; a longer line is an error naming ``file:line``, whatever the
reader), and whether the bytes hold anything the fast reader leaves to the reference parser (quotes,
carriage returns, blank or comment lines) or whitespace that needs trimming.

:func:`read_text_fast` is the vectorised twin of ``loaders._read_text`` for clean files. It returns
None — and the caller falls back to the line-by-line reference parser, which applies the cleaning rules
and names bad lines — as soon as the file has anything to clean or report. User and item ids come back
dictionary-encoded (:class:`IdCodes`: int32 codes into the distinct ids), so deduplication and the
vocabularies work on integers, never by sorting or hashing millions of strings again.
"""

from __future__ import annotations

import codecs
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from lrs_rec.ids import id_problem

if TYPE_CHECKING:
    from lrs_rec.training.loaders import CleaningReport, LoadOptions, _LineLocs

MAX_LINE_BYTES = 1 << 20  # 1 MiB: a rating row is two ids of <= 256 characters and a few numbers
_CHUNK = MAX_LINE_BYTES
BLOCK_BYTES = 1 << 24  # bytes of the file per batch of the streaming CSV reader
# bytes after which a field may need trimming (Python's str.strip: ASCII and Unicode whitespace)
_WS_NO_TAB = (b" ", b"\x0b", b"\x0c", b"\x1c", b"\x1d", b"\x1e", b"\x1f")


@dataclass(frozen=True)
class TextScan:
    fingerprint: str  # sha256 of the file bytes
    clean: bool  # no quote, carriage return, blank or comment line (the fast reader may try)
    space: bool  # whitespace other than tab (or non-ASCII bytes): fields need trimming
    tab: bool  # a tab somewhere (whitespace unless it is the delimiter)


@dataclass(frozen=True)
class IdCodes:
    """A column of ids as ``uniques[codes]``: ``uniques`` distinct (str array), ``codes`` int32."""

    codes: np.ndarray
    uniques: np.ndarray

    def values(self) -> np.ndarray:
        out: np.ndarray = self.uniques[self.codes]
        return out

    def take(self, rows: np.ndarray) -> IdCodes:
        return IdCodes(self.codes[rows], self.uniques)


class LineTooLongError(ValueError):
    """A line beyond :data:`MAX_LINE_BYTES` (``loaders`` turns it into a RatingFileError)."""


def line_too_long(path: Path | str, line: int, nbytes: int) -> str:
    return (
        f"{path}:{line}: line longer than the {MAX_LINE_BYTES >> 20} MiB limit ({nbytes} bytes "
        "read without a line end); a rating file has one short (user, item, rating[, time]) row a "
        "line"
    )


def scan_text(path: Path) -> TextScan:
    """One pass over the bytes in 1 MiB chunks (memory bounded whatever the line lengths).

    Raises :class:`LineTooLongError` naming ``file:line`` for a line longer than
    :data:`MAX_LINE_BYTES` (line ends as the text reader counts them: \n, \r\n or \r)."""
    h = hashlib.sha256()
    clean, space, tab = True, False, False
    offset, start, prev = 0, 0, b"\n"  # start: file offset where the current line began
    first = True
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            body = chunk.removeprefix(codecs.BOM_UTF8) if first else chunk
            first = False
            has_cr = b"\r" in chunk
            # the line-length limit: a line inside one chunk is shorter than the chunk (the limit)
            end = chunk.find(b"\n")
            if has_cr:
                cr = chunk.find(b"\r")
                end = cr if end < 0 else min(end, cr)
            if end < 0 and offset + len(chunk) - start > MAX_LINE_BYTES:
                raise LineTooLongError(_too_long_at(path, start, offset + len(chunk) - start))
            if end >= 0:
                if offset + end - start > MAX_LINE_BYTES:
                    raise LineTooLongError(_too_long_at(path, start, offset + end - start))
                last = max(chunk.rfind(b"\n"), chunk.rfind(b"\r") if has_cr else -1)
                start = offset + last + 1
            offset += len(chunk)
            if clean:
                if b'"' in chunk or has_cr:
                    clean = False
                elif (b"#" in body or b"%" in body) and (
                    b"\n#" in prev + body or b"\n%" in prev + body
                ):
                    clean = False  # a comment line (blank lines: the CSV reader refuses them)
                if not space:
                    space = not body.isascii() or any(w in body for w in _WS_NO_TAB)
                tab = tab or b"\t" in chunk
            prev = chunk[-1:]
    return TextScan(h.hexdigest(), clean, space, tab)


def _too_long_at(path: Path, start: int, nbytes: int) -> str:
    """The error for the line starting at byte ``start`` (an error path: re-reads up to it)."""
    line, after_cr = 1, False
    with open(path, "rb") as f:
        left = start
        while left > 0:
            chunk = f.read(min(_CHUNK, left))
            left -= len(chunk)
            n = chunk.count(b"\n") + chunk.count(b"\r") - chunk.count(b"\r\n")
            line += n - (1 if after_cr and chunk.startswith(b"\n") else 0)
            after_cr = chunk.endswith(b"\r")
    return line_too_long(path, line, nbytes)


def _encode_ids(chunks: list[Any], trim: bool) -> IdCodes | None:
    """One id column from its dictionary-encoded batches (one dictionary per batch, unified here);
    None when an id needs the reference parser (empty, or an id the service refuses: it names the
    line)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if not chunks:
        return None
    col = pa.chunked_array(chunks).unify_dictionaries()
    chunks.clear()  # the caller's batches: only the unified column keeps their indices
    uniq = col.chunks[0].dictionary
    codes = np.empty(len(col), dtype=np.int32)
    at = 0
    for ch in col.chunks:
        codes[at : at + len(ch)] = ch.indices.to_numpy(zero_copy_only=False)
        at += len(ch)
    del col
    if trim:
        trimmed = pc.utf8_trim_whitespace(uniq)
        merged = pc.unique(trimmed)
        if len(merged) != len(uniq):  # "a" and " a" are one id once stripped
            remap = np.asarray(pc.index_in(trimmed, value_set=merged).to_numpy(), dtype=np.int32)
            codes = remap[codes]
        uniq = merged if len(merged) != len(uniq) else trimmed
    if len(uniq) == 0:
        return None
    if pc.any(pc.equal(pc.utf8_length(uniq), 0)).as_py():
        return None
    if not _plain_ascii_ids(uniq):
        if any(id_problem(s) for s in uniq.to_pylist()):
            return None
    return IdCodes(codes, np.asarray(uniq.to_numpy(zero_copy_only=False), dtype=str))


def _plain_ascii_ids(uniq: Any) -> bool:
    """True when no id can have an :func:`id_problem`: printable ASCII only (no control
    character, no U+FFFD), at most MAX_ID_LENGTH characters, and no surrounding whitespace (the
    file has none, or the ids were trimmed). Else the caller asks :func:`id_problem` per id."""
    import pyarrow.compute as pc

    from lrs_rec.ids import MAX_ID_LENGTH

    if not pc.all(pc.string_is_ascii(uniq)).as_py():
        return False
    if pc.max(pc.utf8_length(uniq)).as_py() > MAX_ID_LENGTH:
        return False
    return not pc.any(pc.match_substring_regex(uniq, "[\\x00-\\x1f\\x7f]")).as_py()


def read_text_fast(
    path: Path, fmt: str, opts: LoadOptions, report: CleaningReport, scan: TextScan
) -> tuple[IdCodes, IdCodes, np.ndarray, np.ndarray, _LineLocs] | None:
    """Vectorised twin of ``loaders._read_text`` for clean files (pyarrow's CSV reader); None when
    the file has anything for the reference parser to clean or report: comments, blank lines,
    quotes, repeated headers, ragged or trailing columns, missing or non-numeric ratings, empty ids,
    non-numeric timestamps."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.csv as pcsv
    from lrs_rec.training.loaders import (
        _FIXED_FIELDS,
        SPACE,
        _head_numbered,
        _LineLocs,
        _resolve_columns,
        _sniff_file,
    )

    if not scan.clean:
        return None
    head = _head_numbered(path, 1)
    if not head or head[0][0] != 1:
        return None  # blank or comment lines first: the reference parser counts them
    first = head[0][1]
    delim = {"ml-100k": "\t", "ml-1m": "::", "ml-latest": ",", "tsv": "\t"}.get(fmt)
    if delim is None:
        delim = _sniff_file(path)
    if delim == SPACE:
        return None  # runs of spaces: the reference parser's split
    fields = first.split(delim)
    header, ucol, icol, rcol, tcol = _resolve_columns(fields, first, delim, opts, f"{path}:1")
    n_fields = len(fields)
    if fields[-1].strip() == "" or (header is not None and n_fields != len(header)):
        return None  # trailing empty columns: the reference parser repairs and counts them
    if n_fields > _FIXED_FIELDS.get(fmt, n_fields):
        return None  # an extra field in a fixed-width MovieLens file: the reference parser refuses
    if delim == "::":
        if ":" in first.replace("::", ""):
            return None
        pa_delim, stride = ":", 2  # "a::b" reads as "a", "", "b"
    else:
        pa_delim, stride = delim, 1
    trim = scan.space or (scan.tab and delim != "\t")
    n_cols = (n_fields - 1) * stride + 1
    names = [f"c{j}" for j in range(n_cols)]
    has_time = tcol is not None and tcol < n_fields
    # the roles' columns, the last one (an empty last field is a column to repair) and, in '::'
    # files, the empty columns between the two colons (a lone ':' is not the format)
    logical = {ucol, icol, rcol, n_fields - 1} | (
        {tcol} if has_time and tcol is not None else set()
    )
    include = {j * stride for j in logical} | (set(range(1, n_cols, 2)) if stride == 2 else set())
    # without whitespace to trim, the reader parses the numbers itself (as float(s) does: empty,
    # "nan", "null", ... become nulls and send the file to the reference parser)
    typed = set() if trim else ({rcol} | ({tcol} if has_time and tcol is not None else set()))
    types = {c: pa.string() for c in names} | {names[j * stride]: pa.float64() for j in typed}
    # ids are read straight into dictionary form (no column of millions of strings), batch by
    # batch (pyarrow's streaming reader: one block of the file in memory at a time)
    id_type = pa.dictionary(pa.int32(), pa.string())
    id_cols = {names[ucol * stride], names[icol * stride]}
    types = {c: (id_type if c in id_cols else pa.string()) for c in names} | {
        names[j * stride]: pa.float64() for j in typed
    }
    u_chunks: list[Any] = []
    i_chunks: list[Any] = []
    r_parts: list[np.ndarray] = []
    t_parts: list[np.ndarray] = []

    def col(batch: Any, j: int) -> Any:
        c = batch.column(names[j * stride])
        return pc.utf8_trim_whitespace(c) if trim else c

    def numbers(batch: Any, j: int) -> np.ndarray:
        c = col(batch, j)
        if j not in typed:
            c = pc.cast(c, pa.float64())
        return np.asarray(c.to_numpy(zero_copy_only=False), dtype=np.float64)  # nulls: NaN

    def last_field_empty(batch: Any) -> bool:
        j = n_fields - 1
        c = batch.column(names[j * stride])
        if j in typed:
            return bool(c.null_count)
        if pa.types.is_dictionary(c.type):  # an id column: its dictionary holds the values seen
            c = c.dictionary
        if trim:
            c = pc.utf8_trim_whitespace(c)
        return bool(pc.any(pc.equal(c, "")).as_py())

    pool = pa.default_memory_pool()
    try:
        reader = pcsv.open_csv(
            path,
            read_options=pcsv.ReadOptions(
                column_names=names,
                skip_rows=1 if header is not None else 0,
                block_size=BLOCK_BYTES,
            ),
            parse_options=pcsv.ParseOptions(
                delimiter=pa_delim, quote_char=False, ignore_empty_lines=False
            ),
            convert_options=pcsv.ConvertOptions(
                column_types=types,
                strings_can_be_null=False,
                include_columns=[names[j] for j in sorted(include)],
            ),
        )
        for batch in reader:
            if stride == 2 and any(
                pc.any(pc.not_equal(batch.column(names[j]), "")).as_py()
                for j in range(1, n_cols, 2)
            ):
                return None
            if last_field_empty(batch):
                return None  # an empty last field somewhere (trailing column or a missing value)
            r_parts.append(numbers(batch, rcol))
            if has_time and tcol is not None:
                t_parts.append(numbers(batch, tcol))
            u_chunks.append(batch.column(names[ucol * stride]))
            i_chunks.append(batch.column(names[icol * stride]))
            del batch
            pool.release_unused()  # the block's parsed text: not kept in the pool for reuse
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, UnicodeDecodeError):
        return None  # ragged rows, bytes that are not UTF-8, ...: the reference parser names them
    n = sum(len(x) for x in r_parts)
    if n == 0:
        return None
    ratings = np.concatenate(r_parts)
    del r_parts
    if has_time:
        times = np.concatenate(t_parts)
        del t_parts
    else:
        times = np.full(n, np.nan)
    if not np.all(np.isfinite(ratings)) or np.isinf(times).any():
        return None
    if has_time and np.isnan(times).any():
        return None
    users = _encode_ids(u_chunks, trim)
    if users is None:
        return None
    items = _encode_ids(i_chunks, trim)
    if items is None:
        return None
    if header is not None:
        report.add("header_lines", f"{path}:1")
    report.rows_read = n
    offset = 2 if header is not None else 1  # row j is on line offset + j (no per-row array)
    return users, items, ratings, times, _LineLocs(f"{path}:", None, offset)
