"""Command-line options shared by `lrs-rec train` and `lrs-rec evaluate` (data format and columns)."""

from __future__ import annotations

import argparse

from lrs_rec.training.loaders import FORMATS, OUT_OF_SCALE_RULES, LoadOptions


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("rating file")
    g.add_argument("--ratings", required=True, metavar="PATH", help="rating file to read")
    g.add_argument(
        "--format",
        default="auto",
        choices=FORMATS,
        help="file format; auto tells MovieLens 100K/1M/latest, CSV/TSV and Parquet apart by content",
    )
    g.add_argument("--user-col", metavar="NAME|POS", help="user id column (header name or 0-based)")
    g.add_argument("--item-col", metavar="NAME|POS", help="item id column (header name or 0-based)")
    g.add_argument(
        "--rating-col", metavar="NAME|POS", help="rating column (header name or 0-based)"
    )
    g.add_argument(
        "--time-col", metavar="NAME|POS", help="timestamp column (header name or 0-based)"
    )
    g.add_argument(
        "--rating-scale",
        nargs=2,
        type=float,
        metavar=("MIN", "MAX"),
        help="declared rating scale (default: 1 5 for ML-100K/1M, 0.5 5 for ML latest, "
        "the observed range otherwise)",
    )
    g.add_argument(
        "--on-out-of-scale",
        default="clip",
        choices=OUT_OF_SCALE_RULES,
        help="ratings outside the scale: clip (counted), drop (counted) or error",
    )


def load_options(args: argparse.Namespace) -> LoadOptions:
    scale = (
        (float(args.rating_scale[0]), float(args.rating_scale[1])) if args.rating_scale else None
    )
    return LoadOptions(
        format=args.format,
        user_col=args.user_col,
        item_col=args.item_col,
        rating_col=args.rating_col,
        time_col=args.time_col,
        rating_scale=scale,
        on_out_of_scale=args.on_out_of_scale,
    )
