"""Streaming table I/O of the batch commands (``lrs-rec predict`` / ``lrs-rec recommend``).

The format follows the file name: ``.csv`` (comma), ``.tsv`` / ``.tab`` (tab) or ``.parquet`` /
``.pq``. Input is read ``chunk_rows`` rows at a time (pyarrow's streaming CSV reader, Parquet
batch iteration) and output written incrementally, so memory stays bounded whatever the file size.
Text files need a header; id columns are found by name (``--user-col`` / ``--item-col``, else
``user`` / ``item`` or the rating loaders' usual names, e.g. ``userId``, ``movieId``) and read as
text with the loaders' id rule (:func:`training.loaders.id_text`). An empty id or a row with the
wrong number of fields is an error naming ``file:line`` (Parquet: ``file:row N``) and the column.
Output goes to a temporary file renamed into place at the end: a failed run leaves no partial file.
"""

from __future__ import annotations

import csv
import os
import secrets
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from lrs_rec.training.loaders import (
    RatingFileError,
    _check_parquet_type,
    _find_col,
    _first_non_utf8,
    id_text,
    utf16_or_32,
)

TEXT_SEPARATORS = {".csv": ",", ".tsv": "\t", ".tab": "\t"}
PARQUET_SUFFIXES = (".parquet", ".pq")
DEFAULT_CHUNK_ROWS = 100_000


class BatchInputError(RatingFileError):
    """A batch input file cannot be read; the message names the file, line (or row) and column."""


def table_format(path: str | os.PathLike[str], what: str) -> str:
    """``","`` / ``"\\t"`` for a text file, ``"parquet"`` for Parquet, by the file name."""
    suffix = Path(path).suffix.lower()
    if suffix in PARQUET_SUFFIXES:
        return "parquet"
    if suffix in TEXT_SEPARATORS:
        return TEXT_SEPARATORS[suffix]
    known = ", ".join([*TEXT_SEPARATORS, *PARQUET_SUFFIXES])
    raise BatchInputError(
        f"{what} {path}: cannot tell the format from the extension {suffix or '(none)'!r}; "
        f"use one of {known}"
    )


@dataclass
class IdChunk:
    """``rows`` consecutive input rows: one list of id strings per requested column."""

    ids: dict[str, list[str]]
    rows: int


def read_id_columns(
    path: str | os.PathLike[str],
    columns: dict[str, str | None],
    *,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
) -> Iterator[IdChunk]:
    """Stream the id columns ``{role: --<role>-col spec or None}`` (roles ``user`` / ``item``)
    of ``path`` in chunks of at most ``chunk_rows`` rows."""
    p = Path(path)
    fmt = table_format(p, "input")
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no such file")
    if chunk_rows < 1:
        raise ValueError(f"chunk size must be >= 1, got {chunk_rows}")
    if fmt == "parquet":
        yield from _read_parquet(p, columns, chunk_rows)
    else:
        yield from _read_text(p, fmt, columns, chunk_rows)


def _resolve(p: Path, header: list[str], columns: dict[str, str | None]) -> dict[str, int]:
    found: dict[str, int] = {}
    for role, spec in columns.items():
        idx = _find_col(spec, header, None, role, str(p))
        if idx is None:
            raise BatchInputError(
                f"{p}: no {role} column in header {header}; name it {role!r} or pass "
                f"--{role}-col NAME"
            )
        if idx >= len(header):
            raise BatchInputError(f"{p}: {role} column {idx} is out of range for header {header}")
        found[role] = idx
    roles = list(found)
    for a in range(len(roles)):
        for b in range(a + 1, len(roles)):
            if found[roles[a]] == found[roles[b]]:
                raise BatchInputError(
                    f"{p}: {roles[a]} and {roles[b]} would both be read from column "
                    f"{header[found[roles[a]]]!r}"
                )
    return found


def _ids(values: list[Any], where: Any, role: str, name: str) -> list[str]:
    out = [id_text(v) for v in values]
    for j, v in enumerate(out):
        if not v:
            raise BatchInputError(f"{where(j)}: {role} id (column {name!r}) is empty")
    return out


def _read_text(
    p: Path, sep: str, columns: dict[str, str | None], chunk_rows: int
) -> Iterator[IdChunk]:
    import pyarrow as pa
    import pyarrow.csv as pcsv

    wide = utf16_or_32(p)
    if wide is not None:
        raise BatchInputError(wide)
    with open(p, newline="", encoding="utf-8-sig", errors="replace") as f:
        header = next(csv.reader(f, delimiter=sep), None)
    if not header:
        raise BatchInputError(f"{p}: empty file (a header line naming the columns is needed)")
    found = _resolve(p, header, columns)
    names = {role: header[i] for role, i in found.items()}
    invalid: list[tuple[int, int, str]] = []

    def on_invalid(row: Any) -> str:
        invalid.append((row.expected_columns, row.actual_columns, row.text))
        return "skip"

    done = 0
    try:
        # every physical line after the header is a row (empty lines too), so row j is line j + 2
        reader = pcsv.open_csv(
            p,
            read_options=pcsv.ReadOptions(
                block_size=max(1 << 10, min(chunk_rows * 64, 1 << 26)), use_threads=False
            ),
            parse_options=pcsv.ParseOptions(
                delimiter=sep,
                newlines_in_values=False,
                ignore_empty_lines=False,
                invalid_row_handler=on_invalid,
            ),
            convert_options=pcsv.ConvertOptions(
                column_types={n: pa.string() for n in names.values()},
                include_columns=list(dict.fromkeys(names.values())),
                strings_can_be_null=False,
                quoted_strings_can_be_null=False,
            ),
        )
        for batch in reader:
            if invalid:
                raise _bad_row(p, sep, *invalid[0])
            for lo in range(0, batch.num_rows, chunk_rows):
                part = batch.slice(lo, chunk_rows)
                first = done

                def where(j: int, first: int = first) -> str:
                    return f"{p}:{first + j + 2}"

                ids = {
                    role: _ids(part.column(name).to_pylist(), where, role, name)
                    for role, name in names.items()
                }
                done += part.num_rows
                yield IdChunk(ids, part.num_rows)
    except pa.ArrowInvalid as e:
        if "UTF8" in str(e) or "UTF-8" in str(e):
            bad = _first_non_utf8(p)
            if bad is not None:
                raise BatchInputError(f"{p}:{bad[0]}: not UTF-8 text ({bad[2]})") from None
        raise BatchInputError(f"{p}: cannot read: {e}") from None
    if invalid:
        raise _bad_row(p, sep, *invalid[0])


def _bad_row(p: Path, sep: str, expected: int, actual: int, text: str) -> BatchInputError:
    """The first line of ``p`` whose field count is not ``expected`` (a slow scan: error path)."""
    shown = repr(text) if len(text) <= 60 else f"{text[:60]!r}..."
    with open(p, newline="", encoding="utf-8", errors="replace") as f:
        for line, fields in enumerate(csv.reader(f, delimiter=sep), start=1):
            if line > 1 and fields and len(fields) != expected:
                return BatchInputError(
                    f"{p}:{line}: expected {expected} fields like the header, got {len(fields)}: "
                    f"{shown}"
                )
    return BatchInputError(f"{p}: a line has {actual} fields, the header {expected}: {shown}")


def _read_parquet(p: Path, columns: dict[str, str | None], chunk_rows: int) -> Iterator[IdChunk]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(p)
    except Exception as e:  # pyarrow raises several exception types for corrupt files
        raise BatchInputError(f"{p}: cannot read Parquet: {e}") from None
    header = list(pf.schema_arrow.names)
    found = _resolve(p, header, columns)
    names = {role: header[i] for role, i in found.items()}
    for role, i in found.items():
        _check_parquet_type(p, header[i], pf.schema_arrow.field(i).type, role)
    done = 0
    try:
        batches = pf.iter_batches(
            batch_size=chunk_rows, columns=list(dict.fromkeys(names.values()))
        )
        for batch in batches:
            first = done

            def where(j: int, first: int = first) -> str:
                return f"{p}:row {first + j + 1}"

            ids = {
                role: _ids(batch.column(name).to_pylist(), where, role, name)
                for role, name in names.items()
            }
            done += batch.num_rows
            yield IdChunk(ids, batch.num_rows)
    except OSError as e:
        raise BatchInputError(f"{p}: cannot read Parquet: {e}") from None


@dataclass
class TableWriter:
    """Incremental CSV/TSV/Parquet writer of a fixed schema into a temporary file that replaces
    ``path`` only when the block exits without an exception."""

    path: Path
    schema: Any  # pyarrow.Schema
    _tmp: Path = field(init=False)
    _writer: Any = field(init=False, default=None)
    rows: int = field(init=False, default=0)

    def __enter__(self) -> TableWriter:
        import pyarrow.csv as pcsv
        import pyarrow.parquet as pq

        fmt = table_format(self.path, "output")
        # a fresh name next to the output (created by the writer with the usual permissions)
        self._tmp = self.path.with_name(
            f".{self.path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        )
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if fmt == "parquet":
                self._writer = pq.ParquetWriter(self._tmp, self.schema)
            else:
                self._writer = pcsv.CSVWriter(
                    self._tmp,
                    self.schema,
                    write_options=pcsv.WriteOptions(delimiter=fmt, quoting_style="needed"),
                )
        except OSError as e:  # named by --out, not by the temporary file (pyarrow's message)
            base = next((q for q in self.path.parents if q.exists()), None)
            why = (
                f"{base} is not a directory"
                if base is not None and not base.is_dir()
                else os.strerror(e.errno)
                if e.errno
                else str(e)
            )
            raise BatchInputError(f"--out {self.path}: cannot write there ({why})") from None
        return self

    def write(self, columns: dict[str, Any]) -> None:
        import pyarrow as pa

        batch = pa.record_batch(
            [pa.array(columns[f.name], f.type) for f in self.schema], schema=self.schema
        )
        self._writer.write_batch(batch)
        self.rows += batch.num_rows

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            self._writer.close()
        finally:
            if exc_type is None:
                os.replace(self._tmp, self.path)
            else:
                self._tmp.unlink(missing_ok=True)


def check_paths(inp: str | os.PathLike[str], out: str | os.PathLike[str]) -> None:
    """Both formats known, and the output is not the input."""
    table_format(inp, "input")
    table_format(out, "output")
    if Path(out).exists() and Path(inp).exists() and Path(out).resolve() == Path(inp).resolve():
        raise BatchInputError(f"--out {out} is the input file; choose another output path")
    if Path(out).is_dir():
        raise BatchInputError(f"--out {out} is a directory; give a file name")
