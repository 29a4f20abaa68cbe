"""`lrs-rec train`: rating log -> trained, evaluated, versioned model directory (+ model.onnx)."""

from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Any

from lrs_rec.training.cli_args import add_data_arguments, load_options
from lrs_rec.training.config import METHOD_HELP, METHODS, TrainConfig

_DEFAULTS = TrainConfig()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_data_arguments(parser)
    m = parser.add_argument_group("model")
    m.add_argument(
        "--method",
        default=_DEFAULTS.method,
        choices=METHODS,
        help="; ".join(f"{k}: {v}" for k, v in METHOD_HELP.items()),
    )
    m.add_argument("--rank", type=int, default=_DEFAULTS.rank, metavar="R", help="rank r of U")
    m.add_argument(
        "--sparsity", type=int, default=_DEFAULTS.sparsity, metavar="K", help="non-zeros k of b_u"
    )
    m.add_argument(
        "--dim", type=int, default=_DEFAULTS.dim, metavar="D", help="item-feature dimension d"
    )
    m.add_argument(
        "--item-features",
        metavar="PATH",
        help="plug-in item features: .npy (+ PATH.ids.txt, one item id per row) or Parquet "
        "(id column + list column or numeric feature columns); --dim is then ignored",
    )
    m.add_argument("--seed", type=int, default=_DEFAULTS.seed, metavar="S", help="random seed")
    m.add_argument("--n-iter", type=int, default=_DEFAULTS.n_iter, help="outer iterations")
    m.add_argument("--reg-w", type=float, default=_DEFAULTS.reg_w, help="ridge on w_u (to w̄)")
    m.add_argument("--reg-b", type=float, default=_DEFAULTS.reg_b, help="ridge on b_u")
    m.add_argument(
        "--reg-features", type=float, default=_DEFAULTS.reg_features, help="ridge on f_i"
    )
    m.add_argument("--reg-bias", type=float, default=_DEFAULTS.reg_bias, help="ridge on biases")
    m.add_argument(
        "--validation-fraction",
        type=float,
        default=_DEFAULTS.validation_fraction,
        help="internal hold-out of the training ratings for the per-iteration validation loss",
    )
    m.add_argument(
        "--fixed-features",
        action="store_true",
        help="keep the ALS item features fixed after initialisation and learn U by Eq. 5 "
        "(the paper's setting; default: alternate item features with the users' θ)",
    )
    m.add_argument(
        "--prior",
        default="population" if _DEFAULTS.population_prior else "isotropic",
        choices=("population", "isotropic"),
        help="ridge on w_u: towards the population prior N(w̄, Σ_w) or isotropic λ_w·I",
    )
    m.add_argument(
        "--tune",
        action=argparse.BooleanOptionalAction,
        default=_DEFAULTS.tune,
        help="choose the ridge strengths (--reg-features, --reg-w, --reg-b) on the internal "
        "validation split within a time budget, starting from the given values; the chosen values "
        "go to manifest.json; --no-tune trains once with the given values",
    )
    m.add_argument(
        "--tune-trials",
        type=int,
        default=_DEFAULTS.tune_trials,
        metavar="N",
        help=f"extra fits the tuning may run (default {_DEFAULTS.tune_trials}; each costs about "
        "one training loop, the start is fitted once)",
    )
    m.add_argument(
        "--tune-seconds",
        type=float,
        default=_DEFAULTS.tune_seconds,
        metavar="S",
        help="also stop tuning when the next fit would pass S seconds of tuning (the choice then "
        "depends on the machine's speed; default: no time cap)",
    )
    m.add_argument(
        "--tune-sample-users",
        type=int,
        default=_DEFAULTS.tune_sample_users,
        metavar="N",
        help="with more training users than N, tune on a seeded sample of N users and apply the "
        "chosen strengths to one fit on all users (default %(default)s; 0: tune on every user)",
    )
    from lrs_rec.engine.parallel import DEFAULT_MEMORY_BUDGET_MB, available_cores

    e = parser.add_argument_group("resources")
    e.add_argument(
        "--threads",
        type=int,
        default=available_cores(),
        metavar="N",
        help="worker threads for the per-block user/item solves and the CSV reader; the model is "
        "the same for any N (default %(default)s: the cores this process may use)",
    )
    e.add_argument(
        "--memory-budget",
        type=float,
        default=DEFAULT_MEMORY_BUDGET_MB,
        metavar="MB",
        help="memory for each thread's block temporaries: blocks of users/items are sized by "
        "ratings to fit it (the rating arrays themselves come on top)",
    )
    e.add_argument(
        "--kernels",
        choices=("auto", "numba", "numpy"),
        default="auto",
        help="the engine's per-user / per-item kernels: numba (compiled, the default when "
        "importable: auto) or numpy (the reference); the model agrees to ~1e-10",
    )
    dk = parser.add_argument_group("engine")
    dk.add_argument(
        "--engine",
        default="local",
        choices=("local", "dask"),
        help="local: this process; dask: a Dask cluster (the `dask` extra) — the workers read "
        "--ratings (a file, a directory or a glob of CSV/Parquet files) and hold the users' "
        "partitions; the same model as local for the same seed and data",
    )
    dk.add_argument(
        "--scheduler",
        metavar="ADDRESS",
        help="with --engine dask: the running cluster's scheduler (e.g. tcp://host:8786); "
        "default: a LocalCluster of --workers processes",
    )
    dk.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="with --engine dask and no --scheduler: worker processes of the LocalCluster "
        "(default: the cores this process may use)",
    )
    o = parser.add_argument_group("output")
    o.add_argument("--out", required=True, metavar="MODEL_DIR", help="model directory to write")
    o.add_argument("--no-export", action="store_true", help="skip writing model.onnx")
    o.add_argument("--quiet", action="store_true", help="no progress bar or per-iteration losses")
    o.add_argument("--json", action="store_true", help="print a JSON summary on stdout")
    # privacy flags (--epsilon/--delta/...; owned by the privacy area, training/private_cli.py)
    from lrs_rec.training.private_cli import add_private_arguments

    add_private_arguments(parser)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(
        method=args.method,
        rank=args.rank,
        sparsity=args.sparsity,
        dim=args.dim,
        n_iter=args.n_iter,
        reg_w=args.reg_w,
        reg_b=args.reg_b,
        reg_features=args.reg_features,
        reg_bias=args.reg_bias,
        refine_features=args.item_features is None and not getattr(args, "fixed_features", False),
        validation_fraction=args.validation_fraction,
        population_prior=getattr(args, "prior", "population") == "population",
        seed=args.seed,
        tune=getattr(args, "tune", _DEFAULTS.tune),
        tune_trials=getattr(args, "tune_trials", _DEFAULTS.tune_trials),
        tune_seconds=getattr(args, "tune_seconds", _DEFAULTS.tune_seconds),
        tune_sample_users=getattr(args, "tune_sample_users", _DEFAULTS.tune_sample_users) or None,
    )


def check_arguments(args: argparse.Namespace) -> None:
    """Flag values TrainConfig cannot name (ValueError naming the flag), and an --out that
    save_model_dir would refuse — both before any data is read or trained on."""
    from lrs_rec.model_dir import check_out_dir

    if args.seed < 0:
        raise ValueError(f"--seed must be >= 0, got {args.seed}")
    for flag in ("reg_w", "reg_b", "reg_features", "reg_bias"):
        value = getattr(args, flag)
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(
                f"--{flag.replace('_', '-')} must be a finite number >= 0, got {value}"
            )
    tt = getattr(args, "tune_trials", 0)
    if tt < 0:
        raise ValueError(f"--tune-trials must be >= 0, got {tt}")
    tsu = getattr(args, "tune_sample_users", None)
    if tsu is not None and tsu < 0:
        raise ValueError(f"--tune-sample-users must be >= 0, got {tsu}")
    ts = getattr(args, "tune_seconds", None)
    if ts is not None and not (math.isfinite(ts) and ts >= 0):
        raise ValueError(f"--tune-seconds must be a finite number >= 0, got {ts}")
    engine = getattr(args, "engine", "local")
    if engine != "dask":
        for flag in ("scheduler", "workers"):
            if getattr(args, flag, None) is not None:
                raise ValueError(f"--{flag} needs --engine dask")
    else:
        workers = getattr(args, "workers", None)
        if workers is not None and workers < 1:
            raise ValueError(f"--workers must be >= 1, got {workers}")
    check_out_dir(args.out)


def run(args: argparse.Namespace) -> int:
    check_arguments(args)
    from lrs_rec.engine.parallel import configure

    configure(
        n_threads=getattr(args, "threads", None),
        memory_budget_mb=getattr(args, "memory_budget", None),
    )
    from lrs_rec.training.kernels_select import select_kernels

    backend = select_kernels(getattr(args, "kernels", "auto"))
    local = getattr(args, "engine", "local") != "dask"
    if backend == "numba" and local and getattr(args, "epsilon", None) is None:
        from lrs_rec.training import kernel_warmup

        kernel_warmup.start()  # compiles while the ratings load (a no-op cost when cached)
    # privacy hook: `--epsilon/--delta` (added by the private trainer) dispatch to training.private_train
    if getattr(args, "epsilon", None) is not None:
        import importlib

        module = "dask_private" if getattr(args, "engine", "local") == "dask" else "private_train"
        return int(importlib.import_module(f"lrs_rec.training.{module}").run(args))

    from lrs_rec.training.loaders import load_ratings
    from lrs_rec.training.pipeline import peak_rss_mb, train

    from lrs_rec.model_dir import save_model_dir

    cfg = config_from_args(args)
    if getattr(args, "engine", "local") == "dask":
        from lrs_rec.training.dask_engine import train_from_args

        dask_result = train_from_args(args, cfg)  # the workers wrote the model directory
        n_ratings = dask_result.manifest["data"]["n_ratings"]
        cleaning = dask_result.manifest["cleaning"]["counts"]
        manifest = dask_result.manifest
        model_version = manifest["model_version"]
        dm = manifest["dims"]
        dims = (dm["n_users"], dm["n_items"], dm["d"], dm["rank"], dm["sparsity"])
    else:
        table = load_ratings(args.ratings, load_options(args))
        rep = table.report
        if not args.quiet:
            print(
                f"read {rep.rows_kept} ratings from {rep.source} ({rep.format}); "
                f"cleaning: {dict(sorted(rep.counts.items())) or 'nothing to clean'}",
                file=sys.stderr,
            )
        # the trainer releases the table's columns once encoded (not alive during training)
        result = train(
            table,
            cfg,
            item_features_path=args.item_features,
            progress=not args.quiet,
            release_table=True,
        )
        n_ratings, cleaning = len(table), rep.counts
        del table, rep
        model = save_model_dir(result.model, args.out)
        del result
        # what the summary needs of the model; its arrays are released before the export
        manifest, model_version = model.manifest, model.model_version
        dims = (model.n_users, model.n_items, model.lrs.d, model.lrs.rank, model.lrs.sparsity)
        del model
    from lrs_rec.training.heap import trim

    trim()
    onnx_path: str | None = None
    if not args.no_export:
        try:
            from lrs_rec.training.export import export_model_dir
        except ModuleNotFoundError as e:  # the ONNX exporter is another component's; say so
            if e.name != "lrs_rec.training.export":
                raise
            print("warning: training.export not available; model.onnx not written", file=sys.stderr)
        else:
            onnx_path = str(export_model_dir(args.out))
    summary: dict[str, Any] = {
        "model_dir": str(args.out),
        "model_version": model_version,
        "method": cfg.method,
        "dims": manifest["dims"],
        "n_ratings": n_ratings,
        "train_rmse": manifest["metrics"]["train_rmse"],
        "val_rmse": manifest["metrics"]["val_rmse"],
        "train_seconds": manifest["metrics"]["train_seconds"],
        "onnx": onnx_path,
        "cleaning": cleaning,
        "selected": manifest["metrics"].get("selected"),
        "start_val_rmse": manifest["metrics"].get("start_val_rmse"),
        "tuned": (manifest.get("tuning") or {}).get("chosen"),
        "peak_rss_mb": peak_rss_mb(),  # the whole command's, model directory and ONNX included
    }
    if args.json:  # NaN metrics are null in the saved manifest, so this is strict JSON
        print(json.dumps(summary, sort_keys=True, allow_nan=False))
    else:
        val = summary["val_rmse"]
        # manifest value "lrs" = the trained iterate of whichever --method ran
        kept = {"lrs": f"the {cfg.method} fit", "start": "its start", "biases": "biases alone"}
        n_users, n_items, d, r, k = dims
        print(
            f"wrote {args.out} (version {model_version}): {n_users} users, "
            f"{n_items} items, d={d}, r={r}, k={k}; "
            f"val RMSE {'-' if val is None else f'{val:.4f}'} (best iteration "
            f"{manifest['metrics']['best_iteration']}, kept: {kept.get(summary['selected'], summary['selected'])})"
            + (f"; tuned {summary['tuned']}" if summary["tuned"] else "")
            + (f"; ONNX {onnx_path}" if onnx_path else "")
        )
    return 0
