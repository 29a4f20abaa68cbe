"""`lrs-rec evaluate`: metrics of a model directory on held-out ratings (one JSON object with --json)."""

from __future__ import annotations

import argparse
import json

from lrs_rec.training.cli_args import add_data_arguments, load_options

from lrs_rec.cli_types import finite_float


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, metavar="MODEL_DIR", help="model directory")
    add_data_arguments(parser)
    parser.add_argument("--k", type=int, default=10, help="cut-off of the ranking metrics")
    parser.add_argument(
        "--relevance-threshold",
        type=finite_float(),
        help="a test rating is relevant when >= this (default: 4 on a 1–5 scale, i.e. "
        "min + 0.75·(max - min))",
    )
    parser.add_argument("--no-ranking", action="store_true", help="skip precision/recall/NDCG")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def run(args: argparse.Namespace) -> int:
    from lrs_rec.training.evaluate import evaluate_table
    from lrs_rec.training.loaders import load_ratings

    from lrs_rec.model_dir import load_model_dir

    if args.k < 1:
        raise ValueError(f"--k must be >= 1, got {args.k}")
    model = load_model_dir(args.model)
    opts = load_options(args)
    if opts.rating_scale is None:  # test ratings live on the model's scale unless told otherwise
        opts = type(opts)(**{**opts.__dict__, "rating_scale": (model.rating_min, model.rating_max)})
    table = load_ratings(args.ratings, opts)
    out = evaluate_table(
        model,
        table,
        k=args.k,
        relevance_threshold=args.relevance_threshold,
        ranking=not args.no_ranking,
    )
    if args.json:
        print(json.dumps(out, sort_keys=True))
    else:
        print(f"model {args.model} (version {out['model_version']}) on {args.ratings}")
        print(f"  RMSE {out['rmse']:.4f}  MAE {out['mae']:.4f}  n={out['n']}")
        print(
            f"  unknown users {out['n_unknown_users']} ({out['rows_unknown_user']} rows), "
            f"unknown items {out['n_unknown_items']} ({out['rows_unknown_item']} rows)"
        )
        for name, v in out["by_activity"].items():
            n = out["by_activity_n"][name]
            print(
                f"  RMSE users {name:>6} training ratings: "
                + (f"{v:.4f}" if v is not None else "-")
                + f" (n={n})"
            )
        if not args.no_ranking:
            k = args.k

            def fmt(v: float | None) -> str:
                return "-" if v is None else f"{v:.4f}"

            print(
                f"  precision@{k} {fmt(out[f'precision@{k}'])}  recall@{k} "
                f"{fmt(out[f'recall@{k}'])}  ndcg@{k} {fmt(out[f'ndcg@{k}'])} "
                f"({out['ranking_users']} users; {out['ranking_protocol']})"
            )
    return 0
