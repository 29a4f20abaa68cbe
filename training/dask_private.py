"""`lrs-rec train --engine dask --epsilon E`: private training (DP-AMHT-LRS) on a Dask cluster.

The input is read and cut into user partitions by the Dask engine (:mod:`training.dask_engine`);
each partition becomes a :class:`PrivatePart` on its worker holding a
:class:`training.private_data.LocalPrivateData` of its users. :class:`DaskPrivateData` is the
:class:`training.private_data.PrivateData` of :func:`training.private_train.release` over those
partitions: every statistic a release needs is a sum over users of one user's clipped contribution,
so each partition computes its users' sum on its worker, the sums are added on the cluster
(``Run.reduce``) and only the total reaches the driver, which adds the calibrated noise — drawn
from the same seeded rng in the same order as the local private trainer, so the ledger is the
local one and the model the same within float tolerance — solves, and broadcasts the released
arrays. The per-user steps (c_u, w_u, b_u: not released) run on the workers; the workers write
their users as model shards, the driver the small shared part, in the local private model's format.

Every feature mode of the local trainer: one-hot item features, plug-in features
(``--item-features``) and the genres of a MovieLens catalogue (``--dp-features auto`` / ``genres``),
broadcast to the workers (public, n_items × d). The random U-step selections (plug-in / genre
features keep ≤ m random samples per user; ``u_select="popular"`` breaks ties at random) are keyed
draws: each rating's key is a hash of (a seed drawn once from the run's rng, its user id, its item
id) and each user keeps its m smallest keys (:func:`lrs_rec.privacy.cap_samples_by_key`), so every
partition picks exactly the local engine's samples given the broadcast seed.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from lrs_rec.training.dask_engine import DaskResult, Inputs, Run
from lrs_rec.training.dask_input import PartitionData
from lrs_rec.training.private_data import LocalPrivateData
from lrs_rec.training.private_train import PrivateConfig

from lrs_rec.privacy import ClipBounds, check_distinct_user_items


# ------------------------------------------------------------------------------------------------
# the worker side: one partition's users
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PrivatePart:
    """A user partition of private training: the users' ids, their kept ratings and per-user
    state (a LocalPrivateData over local user indices), and the ratings dropped (items not in
    the public catalogue)."""

    lo: int
    user_ids: np.ndarray
    data: LocalPrivateData
    dropped: int


def make_private_part(
    pdata: PartitionData,
    item_map: np.ndarray,
    item_ids: np.ndarray,
    F: np.ndarray | None,
) -> PrivatePart:
    """The partition's ratings on the public item vocabulary ``item_ids`` (``item_map``: the
    ratings' item index → catalogue index, -1 for items not in it: dropped, as the local trainer
    does); ``F``: the public plug-in features (rows clipped), None for one-hot."""
    items = item_map[pdata.items.astype(np.int64)]
    keep = items >= 0
    users = pdata.users[keep].astype(np.int64)
    items = items[keep].astype(np.int64)
    check_distinct_user_items(users, items)
    data = LocalPrivateData(
        users, items, np.asarray(pdata.ratings[keep], np.float64),
        n_users=pdata.hi - pdata.lo, n_items=len(item_ids), F=F, user_ids=pdata.user_ids,
        item_ids=item_ids,
    )  # fmt: skip
    return PrivatePart(pdata.lo, pdata.user_ids, data, int(keep.size - keep.sum()))


def part_counts(part: PrivatePart) -> tuple[int, int, int]:
    """(kept ratings, dropped ratings, users with kept ratings)."""
    return int(part.data.users.size), part.dropped, int(part.data.active.sum())


def statistic(part: PrivatePart, name: str, *args: Any) -> Any:
    """A release's statistic over the partition's users (``LocalPrivateData.<name>``)."""
    return getattr(part.data, name)(*args)


def step(part: PrivatePart, name: str, *args: Any) -> PrivatePart:
    """A per-user step on a copy of the partition (the input is never modified: a task Dask
    recomputes gives the same result)."""
    data = copy.copy(part.data)
    data.c_u = part.data.c_u.copy()
    data.it = copy.deepcopy(part.data.it)
    getattr(data, name)(*args)
    return replace(part, data=data)


def write_shards(
    part: PrivatePart, k: int, staging: str, first: int, rows: int
) -> list[dict[str, Any]]:
    """The partition's users as model shards ``first``, ``first + 1``, ... (at most ``rows``
    users each): c_u, w_u, b_u (k largest coordinates), the kept ratings sorted by item."""
    from lrs_rec.model_shards import write_user_shard

    d = part.data
    st = d.user_values(k)
    order = np.lexsort((d.items, d.users))
    n = d.n_users
    indptr = np.zeros(n + 1, np.int64)
    np.cumsum(np.bincount(d.users, minlength=n), out=indptr[1:])
    infos = []
    for j, a in enumerate(range(0, max(n, 1), rows)):
        b = min(a + rows, n)
        ra, rb = int(indptr[a]), int(indptr[b])
        sl = order[ra:rb]
        info = write_user_shard(
            staging, first + j, user_ids=part.user_ids[a:b].tolist(),
            user_bias=st.user_bias[a:b], W=st.W[a:b], B_idx=st.B_idx[a:b], B_val=st.B_val[a:b],
            history_indptr=indptr[a : b + 1] - ra, history_items=d.items[sl],
            history_ratings=d.ratings[sl],
        )  # fmt: skip
        infos.append(info)
    return infos


# ------------------------------------------------------------------------------------------------
# the driver side
# ------------------------------------------------------------------------------------------------
class DaskPrivateData:
    """:class:`training.private_data.PrivateData` over the partitions of a Dask run: statistics
    summed on the cluster, per-user steps on the workers; the driver holds the totals only. Each
    method forwards to the same method of every partition's LocalPrivateData (:meth:`_total` or
    :meth:`_each`), its arguments as the workers get them (:meth:`_send`)."""

    def __init__(self, run: Run, parts: list[Any]) -> None:
        self.run, self.parts = run, parts

    def _send(self, args: tuple[Any, ...]) -> list[Any]:
        """Arrays broadcast once to every worker; the config without the noise seed (it never
        leaves the driver); never an rng (a draw on a partition would differ from the local run:
        the selections take the public seed drawn on the driver)."""
        out: list[Any] = []
        for a in args:
            if isinstance(a, np.ndarray):
                a = self.run.broadcast(a)
            elif isinstance(a, PrivateConfig):
                a = replace(a, random_state=None)
            elif isinstance(a, np.random.Generator):
                raise TypeError("an rng is never sent to a partition: pass a drawn seed")
            out.append(a)
        return out

    def _total(self, name: str, *args: Any) -> Any:
        run = self.run
        return run.gather(run.reduce(run.map(statistic, self.parts, name, *self._send(args))))

    def _each(self, name: str, *args: Any) -> None:
        self.parts = self.run.map(step, self.parts, name, *self._send(args))

    def mean_statistic(self, mu0: float, mean_clip: float) -> np.ndarray:
        return np.asarray(self._total("mean_statistic", mu0, mean_clip))

    def start_user_bias(self, global_mean: float, reg: float) -> None:
        self._each("start_user_bias", global_mean, reg)

    def item_bias_statistics(
        self, global_mean: float, cfg: PrivateConfig
    ) -> tuple[np.ndarray, np.ndarray]:
        S, N = self._total("item_bias_statistics", global_mean, cfg)
        return S, N

    def spectral_statistic(
        self, global_mean: float, item_bias: np.ndarray, top: np.ndarray, cfg: PrivateConfig
    ) -> np.ndarray:
        return np.asarray(self._total("spectral_statistic", global_mean, item_bias, top, cfg))

    def select_u_samples(
        self,
        cfg: PrivateConfig,
        counts: np.ndarray,
        global_mean: float,
        item_bias: np.ndarray,
        seed: int | None,
        item_w: np.ndarray | None = None,
    ) -> None:
        self._each("select_u_samples", cfg, counts, global_mean, item_bias, seed, item_w)

    def u_step_counts(self) -> np.ndarray:
        return np.asarray(self._total("u_step_counts"))

    def start_iterate(
        self,
        F: np.ndarray | None,
        U: np.ndarray,
        item_bias: np.ndarray,
        global_mean: float,
        k: int,
    ) -> None:
        self._each("start_iterate", F, U, item_bias, global_mean, k)

    def user_step(
        self, U: np.ndarray, cfg: PrivateConfig, prior_prec: np.ndarray | None = None
    ) -> None:
        self._each("user_step", U, cfg, prior_prec)

    def final_user_step(
        self,
        U: np.ndarray,
        cfg: PrivateConfig,
        row_cov: np.ndarray | None,
        prior: tuple[np.ndarray, np.ndarray] | None,
    ) -> None:
        self._each("final_user_step", U, cfg, row_cov, prior)

    def population_statistics(self, cfg: PrivateConfig) -> tuple[np.ndarray, np.ndarray]:
        V, M = self._total("population_statistics", cfg)
        return V, M

    def item_block_statistics(self, bounds: ClipBounds) -> tuple[np.ndarray, np.ndarray]:
        A, V = self._total("item_block_statistics", bounds)
        return A, V

    def dense_statistics(self, bounds: ClipBounds) -> tuple[np.ndarray, np.ndarray]:
        A, V = self._total("dense_statistics", bounds)
        return A, V

    def w_prior_statistic(self, A_w: float, r: int) -> np.ndarray:
        return np.asarray(self._total("w_prior_statistic", A_w, r))

    def squared_error(
        self,
        global_mean: float,
        item_bias: np.ndarray,
        U: np.ndarray,
        lo: float,
        hi: float,
    ) -> tuple[float, int]:
        sse, n = self._total("squared_error", global_mean, item_bias, U, lo, hi)
        return float(sse), int(n)


def fit_on_partitions(
    inp: Inputs,
    args: argparse.Namespace,
    public_items: PublicItems,
    rating_scale: tuple[float, float] | None,
) -> DaskResult:
    """The private trainer on the Dask engine's partitions (the hook of
    :func:`training.dask_engine.train_dask`): releases, shards, manifest. ``public_items``: the
    item ids (empty: none public), the public features (None: one-hot), where they come from,
    the ids' provenance and the features' provenance (``_public_items``)."""
    from lrs_rec.training.dask_model import merged_report, shard_starts
    from lrs_rec.training.private_train import (
        cli_config,
        private_manifest,
        public_features,
        public_rating_scale,
        release,
    )
    from lrs_rec.training.vocab import Vocabulary

    from lrs_rec import model_shards as ms

    run = inp.run
    fmt = inp.summaries[0].report["format"] if len(inp.summaries) == 1 else "multiple"
    scale_provenance = public_rating_scale(rating_scale, fmt)
    item_ids, feats, source, provenance, feature_provenance = public_items
    mode = "onehot" if source == "onehot" else "plugin"  # the algorithm: fixed public features
    if not item_ids:  # no public catalogue: the vocabulary comes from the data (not private)
        item_ids = inp.item_ids
        provenance = (
            "NOT covered by the guarantee: taken from the training ratings because no public "
            "catalogue was given (pass --item-catalog)"
        )
        print(f"warning: item vocabulary {provenance}", file=sys.stderr)
    n_items = len(item_ids)
    item_map = np.asarray(Vocabulary(tuple(item_ids)).encode(np.asarray(inp.item_ids, str)))
    F = None  # plug-in features: rows clipped, rank and sparsity checked (a data-free config)
    if mode == "plugin":
        F = public_features(cli_config(args, mode, np.zeros(0), n_items), feats, n_items)
    shared = (
        run.broadcast(item_map.astype(np.int64)),
        run.broadcast(np.asarray(item_ids, dtype=str)),
        None if F is None else run.broadcast(F),
    )
    parts = [run.submit(make_private_part, d, *shared) for d in inp.datas]
    inp.datas = []  # the input partitions are freed once these are built
    counts = run.gather([run.submit(part_counts, p) for p in parts])
    inp.phase["name"] = "fit"  # the partitions are built (a later loss: Dask recomputes them)
    n_kept = sum(c[0] for c in counts)
    dropped = sum(c[1] for c in counts)
    n_active = sum(c[2] for c in counts)
    if dropped:
        print(
            f"warning: {dropped} ratings of items not in the catalogue were dropped",
            file=sys.stderr,
        )
    if n_kept == 0:
        raise ValueError("no ratings to train on")
    # one-hot: the configuration depends on the number of users with ratings (PrivateConfig.for_data)
    cfg = cli_config(args, mode, np.arange(n_active), n_items)
    if F is None:
        public_features(cfg, None, n_items)  # rank and sparsity ≤ d
    data = DaskPrivateData(run, parts)
    lo, hi = inp.rating_min, inp.rating_max
    rel = release(data, cfg, F, n_items=n_items, rating_min=lo, rating_max=hi)
    sse, n = data.squared_error(rel.global_mean, rel.item_bias, rel.U, lo, hi)
    train_rmse = float(np.sqrt(sse / n))
    assert rel.privacy is not None
    seconds = time.perf_counter() - inp.t0

    r, k = cfg.rank, cfg.sparsity
    # as PrivateFit.stored_factors: one-hot without b stored factored (item features U, U = I_r);
    # one-hot with b: U and the identity; plug-in: U and the features
    factored = F is None and k == 0
    if factored:
        U_out, item_features = np.eye(r), rel.U
    else:
        U_out, item_features = rel.U, np.eye(n_items) if F is None else F
    manifest = private_manifest(
        cfg,
        rel.privacy,
        data={
            "source": inp.spec,
            "format": fmt,
            "fingerprint_sha256": inp.summaries[0].fingerprint
            if len(inp.summaries) == 1
            else hashlib.sha256("".join(s.fingerprint for s in inp.summaries).encode()).hexdigest(),
            "n_ratings": n_kept,
            "n_users": inp.n_users,
            "n_items": n_items,
            "dropped_not_in_catalogue": dropped,
        },
        cleaning=merged_report(inp.summaries, inp.spec, 0),
        items=(provenance, scale_provenance, source, feature_provenance),
        d=rel.U.shape[0],
        factored_d=r if factored else None,
        train_rmse=train_rmse,
        seconds=seconds,
    )
    manifest["engine"] = {
        "name": "dask",
        "workers": len(run.client.scheduler_info()["workers"]),
        "partitions": len(parts),
        "bytes_to_driver": run.bytes_to_driver,
        "bytes_broadcast": run.bytes_broadcast,
    }
    sizes = [int(x) for x in run.gather([run.submit(_n_users, p) for p in data.parts])]
    rows = ms.DEFAULT_SHARD_ROWS
    staging = ms.begin_model_dir(args.out)
    try:
        futs = [
            run.submit(write_shards, p, k, str(staging), s, rows)
            for p, s in zip(data.parts, shard_starts(sizes, rows), strict=True)
        ]
        shards = [info for infos in run.gather(futs) for info in infos]
    except BaseException:
        ms.abort_model_dir(staging)
        raise
    written = ms.finish_model_dir(
        staging,
        args.out,
        shards=shards,
        U=U_out,
        item_features=item_features,
        item_bias=rel.item_bias,
        global_mean=rel.global_mean,
        w_prior_mean=rel.w_prior_mean,
        w_prior_cov=rel.w_prior_cov,
        item_ids=tuple(item_ids),
        rating_min=lo,
        rating_max=hi,
        manifest=manifest,
        params_per_user=r + k,
    )
    return DaskResult(Path(args.out), written, [], seconds)


def _n_users(part: PrivatePart) -> int:
    return int(part.data.n_users)


def run(args: argparse.Namespace) -> int:
    """`lrs-rec train --engine dask [--scheduler ADDR] [--workers N] --epsilon E ...`."""
    from lrs_rec.training.dask_engine import dask_client
    from lrs_rec.training.dask_input import expand_inputs
    from lrs_rec.training.private_train import report_run

    expand_inputs(args.ratings)  # a missing input fails before a cluster is started
    items = public_items(args)  # so does a bad feature file or mode
    with dask_client(args.scheduler, args.workers) as client:
        if not args.quiet:
            n = len(client.scheduler_info()["workers"])
            print(f"dask: {n} workers ({client.scheduler.address})", file=sys.stderr)
        result = run_on(args, client, items)
    m = result.manifest
    report_run(
        args, m["model_version"], m, m["privacy"], train_rmse=m["metrics"]["train_rmse"],
        seconds=result.seconds, source=m["privacy"]["features_source"],
    )  # fmt: skip
    return 0


PublicItems = tuple[tuple[str, ...], np.ndarray | None, str, str, str | None]


def public_items(args: argparse.Namespace) -> PublicItems:
    """The local trainer's public items (``_public_items``): item ids — empty: none public —, the
    public features (None: one-hot), their source ("plugin", "genres", "onehot"), the ids'
    provenance, the features' provenance. Read on the driver (public, n_items × d)."""
    from lrs_rec.training.private_train import _public_items

    return _public_items(args)


def run_on(args: argparse.Namespace, client: Any, items: PublicItems | None = None) -> DaskResult:
    """Private training of ``args`` on the cluster of ``client``; the model directory written.
    ``items``: :func:`public_items` of ``args`` if already read."""
    from functools import partial

    from lrs_rec.training.cli_args import load_options
    from lrs_rec.training.config import TrainConfig
    from lrs_rec.training.dask_engine import train_dask

    opts = load_options(args)
    return train_dask(
        args.ratings,
        opts,
        TrainConfig(validation_fraction=0.0),  # all ratings train (no validation split)
        client,
        out_dir=args.out,
        progress=not args.quiet,
        private=partial(
            fit_on_partitions,
            args=args,
            public_items=public_items(args) if items is None else items,
            rating_scale=opts.rating_scale,
        ),
    )
