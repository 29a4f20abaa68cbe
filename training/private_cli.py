"""The privacy flags of `lrs-rec train` (light: no numpy / dp_accounting import at CLI build time).

Private training runs when ``--epsilon`` is given (``training.cmd_train.run`` dispatches to
``training.private_train.run``)."""

from __future__ import annotations

import argparse

from lrs_rec.cli_types import finite_float, int_in

DEFAULT_DELTA = 1e-6
DEFAULT_ACCOUNTANT = "rdp"
DEFAULT_RANK = 4
DEFAULT_SPARSITY = 2
DEFAULT_ITERS = 2
DEFAULT_MAX_SAMPLES_PER_USER = 50


def add_private_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the differential-privacy option group to `lrs-rec train`."""
    g = parser.add_argument_group(
        "differential privacy (user-level, add/remove one user; see docs/privacy.md)"
    )
    g.add_argument(
        "--epsilon",
        # checked here, before any data is read: PrivateConfig's own message ("... or None")
        # speaks to Python callers, for whom None means no privacy
        type=finite_float(lo=0.0, lo_open=True),
        default=None,
        metavar="E",
        help="train with user-level (E, D)-DP: noise is calibrated to this target epsilon",
    )
    g.add_argument(
        "--delta",
        type=finite_float(lo=0.0, lo_open=True, hi=1.0, hi_open=True),
        default=DEFAULT_DELTA,
        metavar="D",
        help="target delta",
    )
    g.add_argument(
        "--accountant",
        choices=("rdp", "pld"),
        default=None,
        help="dp_accounting accountant for calibration and the ledger (default: pld for one-hot "
        "item features, rdp for plug-in features)",
    )
    g.add_argument(
        "--dp-features",
        choices=("auto", "onehot", "genres", "plugin"),
        default="auto",
        help="public item features: --item-features (plugin), genres of a MovieLens catalogue, or "
        "one-hot item identity; auto picks plugin > genres > onehot",
    )
    g.add_argument(
        "--item-catalog",
        metavar="PATH",
        help="public item catalogue (u.item, movies.dat, movies.csv or an id list); default: a "
        "MovieLens catalogue next to --ratings, else the ids of --item-features",
    )
    g.add_argument(
        "--dp-rank",
        type=int,
        default=None,
        metavar="R",
        help="rank r (default 4; one-hot features: from users per item, PrivateConfig.for_data)",
    )
    g.add_argument(
        "--dp-sparsity",
        type=int,
        default=None,
        metavar="K",
        help="k of b_u (default 2; one-hot features: 0)",
    )
    g.add_argument(
        "--dp-iters",
        type=int,
        default=None,
        metavar="L",
        help="noisy U-steps (default 2; one-hot features: from users per item)",
    )
    g.add_argument(
        "--dp-noise-seed",
        type=int_in(0),
        default=None,
        metavar="S",
        help="seed the privacy noise (reproducible runs/tests only: anyone who knows the seed can "
        "remove the noise); default: fresh OS entropy. --seed does not affect the noise",
    )
    g.add_argument(
        "--dp-max-samples-per-user",
        type=int,
        default=None,
        metavar="M",
        help="ratings of one user entering the U-step statistics (default 50; one-hot: "
        "PrivateConfig.for_data)",
    )
    g.add_argument(
        "--dp-u-step-gram",
        choices=("blocks", "population"),
        default=None,
        help="one-hot features: each item's U-step Gram released as a noisy r×r block (blocks) "
        "or as its capped rating count × one global second moment (population, the one-hot "
        "default: only V_i is released per item)",
    )
