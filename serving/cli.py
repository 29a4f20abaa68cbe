"""The ``lrs-rec`` command line: a thin dispatcher.

Each sub-command lives in its own module exposing ``add_arguments(parser)`` and ``run(args) -> int``.
Heavy dependencies (onnxruntime, uvicorn, redis) are imported inside ``run``, not at module level.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys
from collections.abc import Sequence

# name -> (module, one-line help). Owners: training/* by the training pipeline, serving/* by serving.
COMMANDS: dict[str, tuple[str, str]] = {
    "train": (
        "lrs_rec.training.cmd_train",
        "train a model from rating logs into a model directory",
    ),
    "evaluate": ("lrs_rec.training.cmd_evaluate", "evaluate a model directory on held-out ratings"),
    "export": ("lrs_rec.training.export", "export the shared weights of a model directory to ONNX"),
    "predict": ("lrs_rec.training.cmd_predict", "predict ratings for (user, item) pairs of a file"),
    "recommend": ("lrs_rec.training.cmd_recommend", "top-n items for every user of a file"),
    "publish": ("lrs_rec.serving.cmd_publish", "publish a model's per-user parameters to Redis"),
    "serve": ("lrs_rec.serving.cmd_serve", "run the HTTP recommendation service"),
    "quickstart": (
        "lrs_rec.serving.quickstart",
        "train, export, publish and serve built-in sample data",
    ),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lrs-rec",
        description="lrs-rec: low-rank + sparse (AMHT-LRS) personalised recommendations.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, help_text) in COMMANDS.items():
        mod = importlib.import_module(module)
        p = sub.add_parser(name, help=help_text, description=help_text)
        mod.add_arguments(p)
        p.set_defaults(_module=module)
    return parser


BLAS_THREAD_VARS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def blas_threads() -> contextlib.AbstractContextManager[object]:
    """One BLAS thread unless the environment sets a count. AMHT-LRS and the trainer run many
    small batched solves (e.g. one 100 × 100 system per user per IRLS step), where OpenBLAS's
    threads cost more than they give, and far more when the cores are busy: ML-100K `train` took
    37 s wall / 19 s CPU with 2 threads vs 17 s / 4.5 s with 1 at load 2 (docs/design.md)."""
    if any(os.environ.get(v) for v in BLAS_THREAD_VARS):
        return contextlib.nullcontext()
    # threadpoolctl limits the BLAS libraries already loaded: numpy's and scipy's own OpenBLAS
    import numpy  # noqa: F401
    import scipy.linalg  # noqa: F401
    from threadpoolctl import threadpool_limits

    limits: contextlib.AbstractContextManager[object] = threadpool_limits(limits=1, user_api="blas")
    return limits


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    mod = importlib.import_module(args._module)
    try:
        with blas_threads():
            return int(mod.run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError) as e:  # bad input: a clear message, no traceback
        print(f"lrs-rec {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # e.g. LRS_HOME is a file, a full disk: the message names the path
        print(f"lrs-rec {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
