"""The ``lrs-rec`` command line: a thin dispatcher.

Each sub-command lives in its own module exposing ``add_arguments(parser)`` and ``run(args) -> int``.
Heavy dependencies (onnxruntime, uvicorn, redis) are imported inside ``run``, not at module level.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import re
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from typing import Any

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
    "keys": ("lrs_rec.serving.cmd_keys", "create and list the API keys of `serve --api-keys`"),
    "quickstart": (
        "lrs_rec.serving.quickstart",
        "train, export, publish and serve built-in sample data",
    ),
}


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Shows every option's default in ``--help``: `` (default: X)`` is appended to an option's
    help unless it already says ``default X`` / ``default: X`` (or uses ``%(default)s``). Options
    without a value by default (None, False: flags) and required ones are left as they are."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        if (
            not action.option_strings
            or action.required
            or default is None
            or default is False
            or default is argparse.SUPPRESS
            or "%(default)" in text
        ):
            return action.help
        shown = " ".join(map(str, default)) if isinstance(default, list | tuple) else str(default)
        if re.search(r"default:?\s*" + re.escape(shown), text):
            return action.help
        return f"{text} (default: %(default)s)" if text else "default: %(default)s"


class _Parser(argparse.ArgumentParser):
    """The CLI's parsers (sub-commands inherit the class, hence the formatter)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", DefaultsHelpFormatter)
        super().__init__(*args, **kwargs)


def version() -> str:
    """The installed distribution's version."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("lrs-rec")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="lrs-rec",
        description="lrs-rec: low-rank + sparse (AMHT-LRS) personalised recommendations.",
    )
    parser.add_argument(
        "--version", action="version", version=f"lrs-rec {version()}", help="print the version"
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


class _Terminated(BaseException):
    """SIGTERM arrived (``timeout``, a job scheduler, ``docker stop``): unwinds like Ctrl-C, so
    that ``finally`` blocks and context managers remove what the command created."""


def _raise_terminated(signum: int, frame: Any) -> None:
    raise _Terminated


@contextlib.contextmanager
def _sigterm_unwinds() -> Iterator[None]:
    """SIGTERM raises :class:`_Terminated` in the main thread meanwhile (unless the host process
    handles SIGTERM itself). With the default action the process died on the spot and left its
    temporary files: predict's ``.OUT.<pid>.<hex>.tmp``, train's spill directory in $TMPDIR."""
    if (
        threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
    ):
        yield
        return
    signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        mod = importlib.import_module(args._module)
        with _sigterm_unwinds(), blas_threads():
            return int(mod.run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except _Terminated:
        print("terminated", file=sys.stderr)
        return 128 + signal.SIGTERM
    except (ValueError, FileNotFoundError) as e:  # bad input: a clear message, no traceback
        print(f"lrs-rec {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # e.g. LRS_HOME is a file, a full disk: the message names the path
        print(f"lrs-rec {args.command}: error: {e}", file=sys.stderr)
        return 1
    except ImportError as e:  # an optional dependency: name the extra that installs it
        from lrs_rec.extras import missing_extra_message

        message = missing_extra_message(e)
        if message is None:
            raise
        print(f"lrs-rec {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
