"""`lrs-rec recommend`: the top-n items of every user of a file, streamed in chunks.

Reads the user ids of ``--users`` (CSV/TSV/Parquet by extension, a header naming the user column)
and writes one ``user,rank,item,score`` row per user and rank (rank 1 = best) to ``--out``,
``--chunk-size`` users at a time. Rankings are :meth:`lrs_rec.OfflineModel.recommend`'s (the
service's order: unclipped score, ties to the lower item index; the user's training ratings
excluded unless ``--include-rated``); an unknown user gets the population ranking.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lrs_rec.training.cmd_predict import add_batch_arguments, primed, progress

from lrs_rec.cli_types import int_in


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, metavar="MODEL_DIR", help="model directory")
    parser.add_argument(
        "--users",
        required=True,
        metavar="FILE",
        help="user ids: .csv, .tsv or .parquet with a header",
    )
    parser.add_argument(
        "--out", required=True, metavar="FILE", help="output .csv, .tsv or .parquet (replaced)"
    )
    parser.add_argument(
        "--n", type=int_in(1), default=10, help="items per user (default: %(default)s)"
    )
    parser.add_argument(
        "--include-rated",
        action="store_true",
        help="also recommend items the user rated in training (default: exclude them)",
    )
    add_batch_arguments(parser, item_col=False)


def run(args: argparse.Namespace) -> int:
    import numpy as np
    import pyarrow as pa
    from lrs_rec.training.batch_io import TableWriter, check_paths, read_id_columns

    import lrs_rec

    check_paths(args.users, args.out)
    model = lrs_rec.load_model(args.model)
    schema = pa.schema(
        [
            ("user", pa.string()),
            ("rank", pa.int32()),
            ("item", pa.string()),
            ("score", pa.float64()),
        ]
    )
    chunks = primed(
        read_id_columns(args.users, {"user": args.user_col}, chunk_rows=args.chunk_size)
    )
    with TableWriter(Path(args.out), schema) as out, progress(None, args.quiet, "recommend") as b:
        unknown = 0
        for chunk in chunks:
            users = chunk.ids["user"]
            tops = model.recommend_batch(users, n=args.n, exclude_rated=not args.include_rated)
            cols: dict[str, list[object]] = {"user": [], "rank": [], "item": [], "score": []}
            for user, top in zip(users, tops, strict=True):
                for rank, (item, score) in enumerate(top, start=1):
                    cols["user"].append(user)
                    cols["rank"].append(rank)
                    cols["item"].append(item)
                    cols["score"].append(score)
            out.write(cols)
            unknown += int(np.count_nonzero(model.user_indices(users) < 0))
            b.update(chunk.rows)
    print(
        f"wrote {out.rows} rows to {args.out} ({unknown} users the model does not know: the "
        "population ranking)",
        file=sys.stderr,
    )
    return 0
