"""`lrs-rec predict`: predicted ratings for (user, item) pairs of a file, streamed in chunks.

Reads ``--pairs`` (CSV/TSV/Parquet by extension, a header naming the user and item columns) and
writes ``user,item,prediction`` rows to ``--out`` (format by extension), ``--chunk-size`` rows at a
time: 10M pairs never hold 10M rows in memory. Predictions are :meth:`lrs_rec.OfflineModel.predict`
(equal to ``lrs-rec evaluate``'s); unknown users and items get the documented fallbacks.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeVar

from lrs_rec.training.batch_io import DEFAULT_CHUNK_ROWS

from lrs_rec.cli_types import int_in


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, metavar="MODEL_DIR", help="model directory")
    parser.add_argument(
        "--pairs",
        required=True,
        metavar="FILE",
        help="(user, item) pairs: .csv, .tsv or .parquet with a header",
    )
    parser.add_argument(
        "--out", required=True, metavar="FILE", help="output .csv, .tsv or .parquet (replaced)"
    )
    add_batch_arguments(parser, item_col=True)


def add_batch_arguments(parser: argparse.ArgumentParser, *, item_col: bool) -> None:
    """Options shared with `lrs-rec recommend`."""
    parser.add_argument(
        "--user-col",
        metavar="NAME|POS",
        help="user id column (header name or 0-based position; default: a column named user, "
        "or one of the rating loaders' names such as userId)",
    )
    if item_col:
        parser.add_argument(
            "--item-col",
            metavar="NAME|POS",
            help="item id column (default: a column named item, or one of the rating loaders' "
            "names such as movieId)",
        )
    parser.add_argument(
        "--chunk-size",
        type=int_in(1),
        default=DEFAULT_CHUNK_ROWS,
        metavar="ROWS",
        help="rows read, scored and written at a time (default: %(default)s)",
    )
    parser.add_argument(
        "--quiet",
        action="store_true",
        help="no progress bar (default: show one on stderr; the closing one-line summary is "
        "always printed)",
    )


def progress(total: int | None, quiet: bool, what: str) -> Any:
    """A tqdm bar of rows on stderr (disabled by --quiet)."""
    from tqdm import tqdm

    return tqdm(total=total, unit=" rows", desc=what, disable=quiet, file=sys.stderr)


_T = TypeVar("_T")


def primed(chunks: Iterator[_T]) -> Iterator[_T]:
    """``chunks`` with its first element read now: a missing file or a bad header is reported
    before the progress bar is drawn, so such an error stays one line on stderr."""
    first = list(itertools.islice(chunks, 1))
    return itertools.chain(first, chunks)


def run(args: argparse.Namespace) -> int:
    import numpy as np
    import pyarrow as pa
    from lrs_rec.training.batch_io import TableWriter, check_paths, read_id_columns

    import lrs_rec

    check_paths(args.pairs, args.out)
    model = lrs_rec.load_model(args.model)
    schema = pa.schema([("user", pa.string()), ("item", pa.string()), ("prediction", pa.float64())])
    chunks = primed(
        read_id_columns(
            args.pairs, {"user": args.user_col, "item": args.item_col}, chunk_rows=args.chunk_size
        )
    )
    bar = progress(None, args.quiet, "predict")
    with TableWriter(Path(args.out), schema) as out, bar as b:
        unknown_users = unknown_items = 0
        for chunk in chunks:
            users, items = chunk.ids["user"], chunk.ids["item"]
            out.write({"user": users, "item": items, "prediction": model.predict(users, items)})
            unknown_users += int(np.count_nonzero(model.user_indices(users) < 0))
            unknown_items += int(np.count_nonzero(model.item_indices(items) < 0))
            b.update(chunk.rows)
    print(
        f"wrote {out.rows} predictions to {args.out} ({unknown_users} rows with a user and "
        f"{unknown_items} with an item the model does not know: population fallbacks)",
        file=sys.stderr,
    )
    return 0
