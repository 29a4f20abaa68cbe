"""`lrs-rec train --engine dask`: the training loop of :mod:`training.pipeline` on a Dask cluster.

The rating files are read by the workers (:mod:`training.dask_input`), the users are cut into
partitions of consecutive dense indices (the local engine's vocabulary order), and each partition's
ratings and its users' parameters live on a worker as a :class:`training.dask_parts.Part`. Each step
of the local pipeline becomes: broadcast the shared arrays (μ, item biases, item features F, U),
run the engine's per-user function on every partition (a task returning the new Part), reduce the
engine's additive statistics on the cluster (a tree of additions) and solve the small shared
problems (prior, U-step, item blocks) — the same functions as the local engine
(``lrs_rec.engine.steps``), so the same seed and data give the same model within float tolerance.

The driver holds the shared arrays, the item ids, the partitions' first user ids and the loss
history; never the ratings or the per-user arrays: each worker writes its partitions' users as
model shards (:mod:`training.dask_model`), the driver the small shared part.

A worker lost mid-run: every task is a pure function of its inputs, so Dask recomputes what was lost
(the same values); if it cannot, the run stops with :class:`ClusterError`, never with a different
model.
"""

from __future__ import annotations

import hashlib
import math
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from lrs_rec.training import dask_parts as dp
from lrs_rec.training.config import TrainConfig
from lrs_rec.training.dask_ids import user_index
from lrs_rec.training.dask_input import (
    build_partition,
    expand_inputs,
    file_summary,
    load_file,
    merge_sorted_ids,
    split_by_user,
)
from lrs_rec.training.dask_model import merged_report, write_model_dir
from lrs_rec.training.features import FACTORS_DTYPE, als_solve, cg_steps_for, load_item_features
from lrs_rec.training.loaders import LoadOptions
from lrs_rec.training.pipeline import (
    OVERFIT_RISE,
    REFERENCE_STD,
    method_params,
    run_settings,
)
from lrs_rec.training.vocab import Vocabulary

from lrs_rec.engine.parallel import kernels
from lrs_rec.engine.steps import (
    PriorStatistics,
    StepParams,
    UserPrior,
    solve_items,
    solve_u,
    user_block_size,
)
from lrs_rec.extras import require_extra

METHODS = ("lrs", "rep", "full")  # single / prompt pool one w over all users: not partitioned yet


class ClusterError(OSError):
    """The Dask cluster failed in a way Dask could not recover from (e.g. workers lost)."""


@contextmanager
def dask_client(scheduler: str | None, workers: int | None) -> Iterator[Any]:
    """A client of the cluster at ``scheduler``, or of a LocalCluster of ``workers`` processes
    (one thread each; no dashboard; every port chosen by the OS)."""
    distributed = require_extra("distributed", "--engine dask")
    if scheduler:
        with distributed.Client(scheduler, timeout="20s") as client:
            yield client
        return
    from lrs_rec.engine.parallel import available_cores

    n = workers or available_cores()
    with (
        distributed.LocalCluster(
            n_workers=n,
            threads_per_worker=1,
            processes=True,
            scheduler_port=0,
            dashboard_address=None,
            # the scheduler's HTTP server (health, metrics) runs even without a dashboard; on a
            # port the OS chooses, not the default 8787
            scheduler_kwargs={"dashboard": False, "dashboard_address": "127.0.0.1:0"},
            silence_logs=50,
        ) as cluster,
        distributed.Client(cluster) as client,
    ):
        yield client


# ------------------------------------------------------------------------------------------------
# cluster helpers
# ------------------------------------------------------------------------------------------------
class Run:
    """The driver's handle on the cluster: submit/gather with byte accounting, and the futures
    that must stay alive so that a lost partition can be recomputed (its lineage)."""

    def __init__(self, client: Any) -> None:
        self.client = client
        # the workers run the driver's kernel backend (numba or the numpy reference), one thread
        # each: every task goes through _on_worker, which selects it once per worker process
        self.kernels = "numpy" if kernels() is None else "numba"
        # every broadcast stays alive: it is part of the lineage of the partitions computed from
        # it (a lost partition is recomputed from its first task); keyed by the object itself
        self.keep: dict[int, tuple[Any, Any]] = {}
        self.bytes_to_driver = 0
        self.bytes_broadcast = 0

    def wait(self, futs: Any) -> None:
        """Wait until ``futs`` are done (finished, failed or cancelled), or raise ClusterError
        when the cluster stalls: no task running and no task changing state for
        :data:`STALL_SECONDS` (e.g. every worker gone and none coming back) — never hang."""
        from distributed import wait

        flat = list(futs) if isinstance(futs, (list, tuple)) else [futs]
        seen, since = None, time.monotonic()
        while True:
            try:
                wait(flat, timeout=STALL_POLL)  # type: ignore[no-untyped-call]
                return
            except TimeoutError:
                pass
            now = self.client.run_on_scheduler(_activity)
            if now[1] or now != seen:  # a task running, or progress since the last look
                seen, since = now, time.monotonic()
            elif time.monotonic() - since > STALL_SECONDS:
                raise ClusterError(
                    f"the Dask cluster stalled: no task ran for {STALL_SECONDS:g} s "
                    f"({now[2]} workers); no model was written — check the workers and rerun"
                )

    def submit(self, fn: Callable[..., Any], *args: Any) -> Any:
        # keys named after the step (dashboards, logs, memory profiles), unique per call
        key = f"{getattr(fn, '__name__', 'task')}-{uuid.uuid4().hex}"
        return self.client.submit(_on_worker, self.kernels, fn, *args, key=key, pure=False)

    def map(self, fn: Callable[..., Any], parts: list[Any], *args: Any) -> list[Any]:
        return [self.submit(fn, p, *args) for p in parts]

    def gather(self, futs: Any) -> Any:
        self.wait(futs)
        out = self.client.gather(futs)
        self.bytes_to_driver += _nbytes(out)
        return out

    def broadcast(self, obj: Any) -> Any:
        if id(obj) in self.keep:  # the same object: its broadcast already
            return self.keep[id(obj)][1]
        try:
            fut = self.client.scatter(obj, broadcast=True, hash=False)
        except (ValueError, TimeoutError) as e:  # no worker left: "Can not use replicate to
            # delete data" (ValueError) or "No valid workers found" (TimeoutError), by timing
            raise ClusterError(
                f"the Dask cluster has no worker to send the shared arrays to ({e}); no model "
                "was written — check the workers and rerun"
            ) from None
        self.keep[id(obj)] = (obj, fut)
        self.bytes_broadcast += _nbytes(obj) * max(1, len(self.client.scheduler_info()["workers"]))
        return fut

    def reduce(self, futs: list[Any]) -> Any:
        """Sum of additive statistics as a tree of additions on the cluster (a future)."""
        while len(futs) > 1:
            nxt = [self.submit(dp.add, futs[i], futs[i + 1]) for i in range(0, len(futs) - 1, 2)]
            if len(futs) % 2:
                nxt.append(futs[-1])
            futs = nxt
        return futs[0]


STALL_POLL = 5.0  # seconds between looks at the scheduler while waiting for results
STALL_SECONDS = 300.0  # no task running or changing state for this long: the run fails


def _activity(dask_scheduler: Any) -> tuple[int, int, int]:
    """(transitions so far, tasks running on a worker, workers) — on the scheduler."""
    running = sum(len(ws.processing) for ws in dask_scheduler.workers.values())
    return int(dask_scheduler.transition_counter), running, len(dask_scheduler.workers)


def _on_worker(backend: str, fn: Callable[..., Any], *args: Any) -> Any:
    """Run a task with the driver's kernel backend selected in this worker process."""
    if ("numpy" if kernels() is None else "numba") != backend:
        from lrs_rec.training.kernels_select import select_kernels

        select_kernels(backend)
    return fn(*args)


def _nbytes(obj: Any) -> int:
    if isinstance(obj, np.ndarray):
        return int(obj.nbytes)
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(x) for x in obj)
    if isinstance(obj, dict):
        return sum(_nbytes(x) for x in obj.values())
    if hasattr(obj, "__dataclass_fields__"):
        return sum(_nbytes(getattr(obj, f)) for f in obj.__dataclass_fields__)
    return 8


def _solve_item_block(
    stats: tuple[np.ndarray, np.ndarray], reg_features: float, reg_bias: float
) -> np.ndarray:
    G, h = dp.unpack(stats)
    return solve_items(G, h, reg_features=reg_features, reg_bias=reg_bias)


def _solve_als_block(
    stats: tuple[np.ndarray, np.ndarray],
    reg: float,
    reg_bias: float,
    min_count: float,
    x0: np.ndarray | None = None,
    cg_steps: int = 0,
) -> np.ndarray:
    G, h = dp.unpack(stats)
    return als_solve(
        G, h, G[:, 0, 0], reg=reg, reg_bias=reg_bias, min_count=min_count, x0=x0, cg_steps=cg_steps
    )


# ------------------------------------------------------------------------------------------------
# the distributed loop
# ------------------------------------------------------------------------------------------------
@dataclass
class Cluster:
    """The run's partitions (futures of Parts) and the current shared arrays (on the driver)."""

    run: Run
    parts: list[Any]
    n_items: int
    lo: float
    hi: float
    unit: float

    def each(self, fn: Callable[..., Any], *args: Any) -> None:
        self.parts = self.run.map(fn, self.parts, *args)

    def total(self, fn: Callable[..., Any], *args: Any) -> Any:
        return self.run.gather(self.run.reduce(self.run.map(fn, self.parts, *args)))

    def item_blocks(self, d: int) -> list[tuple[int, int]]:
        size = user_block_size(d + 1)
        return [(a, min(self.n_items, a + size)) for a in range(0, self.n_items, size)]

    # -- biases ---------------------------------------------------------------------------------
    def fit_biases(self, which: str, reg: float, n_iter: int) -> tuple[float, np.ndarray]:
        """training.features.fit_biases over the partitions: μ, c_i (c_u on the partitions)."""
        s, n = self.total(dp.mean_sums, which)
        mu = s / n
        self.each(dp.with_bias_zero)
        c_i = np.zeros(self.n_items)
        for _ in range(n_iter):
            tot, n_i = self.total(dp.bias_item_sums, mu, which, self.n_items)
            c_i = tot / (n_i + reg)
            self.each(dp.bias_users, mu, self.run.broadcast(c_i), reg, which)
        return mu, c_i

    # -- the LRS steps --------------------------------------------------------------------------
    def prior(self, sh: Any, p: StepParams, which: str) -> Any:
        st: PriorStatistics = self.total(dp.prior_stats, sh, which)
        prior = UserPrior.from_statistics(
            st, population_prior=p.population_prior, conditional_prior=p.conditional_prior
        )
        return self.run.broadcast(prior)

    def user_step(self, shared: dp.Shared, p: StepParams, which: str) -> None:
        sh = self.run.broadcast(shared)
        self.each(dp.user_update, sh, self.prior(sh, p, which), p, which)

    def iterate(
        self,
        shared: dp.Shared,
        cfg: TrainConfig,
        p: StepParams,
        which: str,
        *,
        learn_u: bool,
        refine: bool,
        reg_u: float,
    ) -> dp.Shared:
        """One outer iteration (pipeline.iterate): users, U (fixed features), items."""
        self.user_step(shared, p, which)
        if learn_u:
            sh = self.run.broadcast(shared)
            A, rhs = self.total(dp.u_stats, sh, which)
            Q, R = solve_u(A, rhs, ridge=reg_u)
            self.each(dp.apply_r, R)
            shared = replace(shared, U=Q)
        sh = self.run.broadcast(shared)
        if not refine:
            total, n_i = self.total(dp.item_bias_stats, sh, which)
            return replace(shared, item_bias=total / (n_i + cfg.reg_bias))
        F = np.empty_like(shared.F)
        c_i = np.empty(self.n_items)
        sols = []
        for a, b in self.item_blocks(shared.F.shape[1]):
            stats = self.run.reduce(self.run.map(dp.item_stats, self.parts, sh, which, a, b))
            sols.append(
                (a, b, self.run.submit(_solve_item_block, stats, cfg.reg_features, cfg.reg_bias))
            )
        for a, b, fut in sols:
            sol = self.run.gather(fut)
            c_i[a:b], F[a:b] = sol[:, 0], sol[:, 1:]
        return replace(shared, item_bias=c_i, F=F)

    def rmse(self, shared: dp.Shared | Any, which: str) -> float:
        sh = shared if not isinstance(shared, dp.Shared) else self.run.broadcast(shared)
        sse, n = self.total(dp.sq_error, sh, which, self.lo, self.hi)
        return float(np.sqrt(sse / n)) if n else float("nan")


@dataclass
class Inputs:
    """The input phase's partitions, for a trainer other than the LRS loop (``--epsilon``:
    :mod:`training.dask_private`); ``phase["name"]`` is "input" until that trainer sets it."""

    run: Run
    spec: str
    summaries: list[Any]  # the files' summaries (without their ids)
    datas: list[Any]  # futures of the partitions' PartitionData, in user order
    item_ids: tuple[str, ...]  # the ratings' items (dense index order)
    n_users: int
    rating_min: float
    rating_max: float
    phase: dict[str, str]
    t0: float


@dataclass
class DaskResult:
    """A finished run: the model directory it wrote (and its manifest), the loss history."""

    out_dir: Path
    manifest: dict[str, Any]
    history: list[dict[str, float]]
    seconds: float


@dataclass
class DaskFit:
    shared: dp.Shared
    history: list[dict[str, float]]
    best_iteration: int


def fit_lrs(
    cl: Cluster,
    shared: dp.Shared,
    cfg: TrainConfig,
    *,
    learn_u: bool,
    refine: bool,
    reg_u: float,
    has_val: bool,
    progress: bool,
) -> DaskFit:
    """pipeline.fit_lrs on the cluster: the partitions end at the best validation iterate."""
    params = method_params(cfg)

    def losses(it: int, sh: dp.Shared) -> dict[str, float]:
        f = cl.run.broadcast(sh)
        return {
            "iteration": float(it),
            "train_rmse": cl.unit * cl.rmse(f, "train"),
            "val_rmse": cl.unit * cl.rmse(f, "val"),
        }

    history = [losses(0, shared)]
    early = has_val and cfg.patience > 0
    best_val, best_it, best_shared = float("inf"), 0, shared
    for it in range(1, cfg.n_iter + 1):
        shared = cl.iterate(
            shared, cfg, params, "train", learn_u=learn_u, refine=refine, reg_u=reg_u
        )
        row = losses(it, shared)
        history.append(row)
        if progress:
            print(
                f"iter {it:3d}  train RMSE {row['train_rmse']:.4f}  val RMSE {row['val_rmse']:.4f}",
                file=sys.stderr,
            )
        if early:
            if row["val_rmse"] < best_val:
                best_val, best_it, best_shared = row["val_rmse"], it, shared
                cl.each(dp.save, "best")
            elif it - best_it >= cfg.patience or row["val_rmse"] > best_val * (1 + OVERFIT_RISE):
                break  # as pipeline.fit_lrs: patience used up, or a clear rise
    if not early:
        return DaskFit(shared, history, len(history) - 1)
    if best_it != len(history) - 1:
        cl.each(dp.restore, "best")
    cl.each(dp.drop, "best")
    return DaskFit(best_shared, history, best_it)


def _init_shared(
    cl: Cluster,
    cfg: TrainConfig,
    plugin: np.ndarray | None,
    rng: np.random.Generator,
    n_users: int,
) -> dp.Shared:
    """pipeline.init_state on the cluster: ALS (or plug-in features + per-user ridge), then U."""
    run = cl.run
    if plugin is None:
        d = cfg.dim
        s, n = cl.total(dp.mean_sums, "train")
        mu = s / n
        # the local engine draws P (never used: the first half-step overwrites it), then Q
        left = n_users * d
        while left:
            step = min(left, 1 << 22)
            rng.normal(0.0, 0.1, step)
            left -= step
        Q = rng.normal(0.0, 0.1, (cl.n_items, d)).astype(FACTORS_DTYPE)  # as features.als_factors
        c_i = np.zeros(cl.n_items)
        cg_u = cg_steps_for(cl.n_items, d, cfg.init_cg_steps)  # as features.als_factors
        cg_i = cg_steps_for(n_users, d, cfg.init_cg_steps)
        for it in range(cfg.init_iter):
            cg = cg_u if it else 0  # the first iteration solves exactly
            cl.each(
                dp.als_users,
                mu,
                run.broadcast(c_i),
                run.broadcast(Q),
                cfg.init_reg,
                cfg.reg_bias,
                cfg.init_reg_count,
                cg,
            )
            sols = []
            for a, b in cl.item_blocks(d):
                stats = run.reduce(run.map(dp.als_item_stats, cl.parts, mu, a, b))
                sols.append(
                    (
                        a,
                        b,
                        run.submit(
                            _solve_als_block,
                            stats,
                            cfg.init_reg,
                            cfg.reg_bias,
                            cfg.init_reg_count,
                            np.column_stack([c_i[a:b], Q[a:b]]) if it and cg_i else None,
                            cg_i if it else 0,
                        ),
                    )
                )
            c_i, Q = np.empty(cl.n_items), np.empty((cl.n_items, d), dtype=FACTORS_DTYPE)
            for a, b, fut in sols:
                sol = run.gather(fut)
                c_i[a:b], Q[a:b] = sol[:, 0], sol[:, 1:]
        F = Q.astype(np.float64)
    else:
        F = plugin
        d = F.shape[1]
        mu, c_i = cl.fit_biases("train", cfg.reg_bias, 5)
        cl.each(dp.zero_w, d)
        ridge = StepParams(
            k=0,
            per_user_w=True,
            user_bias=True,
            reg_w=cfg.reg_w,
            reg_b=cfg.reg_b,
            reg_bias=cfg.reg_bias,
            population_prior=False,
            conditional_prior=False,
            n_inner=1,
        )
        cl.user_step(dp.Shared(mu, c_i, F, np.eye(d)), ridge, "train")
        cl.each(dp.w_as_p)
    cfg.check_dims(d)
    if cfg.method == "full":
        U = np.eye(d)
    else:
        gram = cl.total(dp.gram_p)
        vals, vecs = np.linalg.eigh(gram)  # PᵀP = V S² Vᵀ: the right singular vectors of P
        r = min(cfg.rank, n_users, d)
        U = vecs[:, np.argsort(vals)[::-1][:r]].copy()
    cl.each(dp.start_from_p, U)
    return dp.Shared(float(mu), c_i, np.array(F, dtype=np.float64), U)


# ------------------------------------------------------------------------------------------------
# the run
# ------------------------------------------------------------------------------------------------
def train_dask(
    spec: str,
    opts: LoadOptions,
    cfg: TrainConfig,
    client: Any,
    *,
    out_dir: str | Path,
    item_features_path: str | None = None,
    progress: bool = True,
    partitions: int | None = None,
    stats: dict[str, Any] | None = None,
    shard_rows: int | None = None,
    private: Callable[[Inputs], DaskResult] | None = None,
) -> DaskResult:
    """Train on the rating file(s) ``spec`` (file, directory or glob) on the cluster of
    ``client`` and write the model directory ``out_dir`` (the workers write the user shards: a
    file system shared with the driver; at most ``shard_rows`` users per shard, default
    :data:`lrs_rec.model_shards.DEFAULT_SHARD_ROWS`). ``stats`` (when given) receives the run's
    byte counts and partition count. ``private`` (``--epsilon``: :mod:`training.dask_private`)
    trains on the partitions instead of the LRS loop."""
    from lrs_rec.model_shards import DEFAULT_SHARD_ROWS

    rows = DEFAULT_SHARD_ROWS if shard_rows is None else int(shard_rows)
    if rows < 1:
        raise ValueError(f"shard_rows must be >= 1, got {shard_rows}")
    for attempt in (1, 2):
        phase: dict[str, str] = {}
        try:
            return _train(
                spec,
                opts,
                cfg,
                client,
                out_dir,
                item_features_path,
                progress,
                partitions,
                stats,
                rows,
                phase,
                private,
            )
        except Exception as e:
            if not _is_cluster_failure(e):
                raise
            if attempt == 1 and phase.get("name") == "input":
                # a worker lost while the files were read and split: Dask does not always keep
                # the lineage of those first tasks; they are pure, so read the files again
                print(
                    f"note: a Dask worker was lost while reading the input ({type(e).__name__}); "
                    "reading it again",
                    file=sys.stderr,
                )
                continue
            raise ClusterError(
                f"the Dask cluster could not finish the run ({type(e).__name__}: "
                f"{str(e).splitlines()[0] if str(e) else ''}); no model was written — check the "
                "workers and rerun"
            ) from e
    raise AssertionError("unreachable")


def check_config(cfg: TrainConfig) -> None:
    if cfg.method not in METHODS:
        raise ValueError(
            f"--method {cfg.method} is not supported with --engine dask yet (one shared w over "
            f"all users); use {', '.join(METHODS)} or --engine local"
        )


def _is_cluster_failure(e: BaseException) -> bool:
    from distributed import KilledWorker
    from distributed.client import FutureCancelledError

    names = {
        "CommClosedError",
        "FutureCancelledError",
        "FuturesCancelledError",
        "KilledWorker",
        "CancelledError",
    }
    return isinstance(e, (KilledWorker, FutureCancelledError)) or type(e).__name__ in names


def _train(
    spec: str,
    opts: LoadOptions,
    cfg: TrainConfig,
    client: Any,
    out_dir: str | Path,
    item_features_path: str | None,
    progress: bool,
    partitions: int | None,
    stats: dict[str, Any] | None,
    shard_rows: int,
    phase: dict[str, str],
    private: Callable[[Inputs], DaskResult] | None = None,
) -> DaskResult:
    check_config(cfg)
    t0 = time.perf_counter()
    phase["name"] = "input"
    run = Run(client)
    files = expand_inputs(spec)
    loads = [run.submit(load_file, f, opts) for f in files]
    # the files' distinct item ids merged one file at a time (items are few: the driver holds one
    # file's item ids and the union); the user ids stay on the workers (training.dask_ids)
    items = np.zeros(0, str)
    summaries = []
    for f in [run.submit(file_summary, f, t) for f, t in zip(files, loads, strict=True)]:
        s = run.gather(f)
        items = merge_sorted_ids([items, s.item_ids])
        summaries.append(replace(s, item_ids=np.zeros(0, str)))
        del f, s
    addresses = sorted(client.scheduler_info()["workers"])
    n_workers = max(1, len(addresses))
    index = user_index(run, loads, seed=cfg.seed, n_workers=n_workers)
    n_users, n_items = index.n_users, int(items.size)
    n_rows = [s.n_rows for s in summaries]
    offsets = np.concatenate([[0], np.cumsum(n_rows)[:-1]]).astype(int)
    if progress:
        c = merged_report(summaries, spec, 0)
        print(
            f"read {c['rows_kept']} ratings from {c['source']} ({c['format']}, {len(files)} "
            f"file{'s' if len(files) > 1 else ''}, on the workers); cleaning: "
            f"{c['counts'] or 'nothing to clean'}",
            file=sys.stderr,
        )
    rating_min = min(s.rating_min for s in summaries)
    rating_max = max(s.rating_max for s in summaries)

    # one partition per worker by default: the item statistics reduced every iteration are one
    # (n_items, d+1, d+1) array per partition, whatever its size (the user step runs in blocks)
    n_parts = max(1, min(partitions or n_workers, n_users))
    bounds = partition_bounds(n_users, n_parts)
    splitters = index.ids_at(run, bounds[1:-1])  # all the driver keeps of the user ids
    index.release()
    item_ids = tuple(items.tolist())
    fraction = cfg.validation_fraction
    item_fut = run.broadcast(item_ids)
    splits = [
        run.submit(split_by_user, t, splitters, item_fut, int(o), cfg.seed, fraction)
        for t, o in zip(loads, offsets, strict=True)
    ]
    import operator

    # partition p starts on worker p mod K (its later tasks follow its data); elsewhere if lost
    datas = [
        client.submit(
            build_partition,
            int(bounds[p]),
            int(bounds[p + 1]),
            fraction,
            *[run.submit(operator.getitem, s, p) for s in splits],
            pure=False,
            workers=[addresses[p % len(addresses)]] if addresses else None,
            allow_other_workers=True,
        )
        for p in range(n_parts)
    ]
    del loads, splits
    if private is not None:  # `--epsilon`: the private trainer on these partitions
        inputs = Inputs(
            run, spec, summaries, datas, item_ids, n_users, rating_min, rating_max, phase, t0
        )
        del datas  # the trainer drops them once its own partitions are built
        return private(inputs)
    # standardise by the training ratings' spread (pipeline.rating_unit, two passes)
    s, n_train = run.gather(run.reduce(run.map(dp.raw_train_sums, datas)))
    unit = 1.0
    if cfg.standardize and n_train > 1:
        mean = s / n_train
        sq = run.gather(run.reduce(run.map(dp.raw_train_sq_dev, datas, mean)))
        std = math.sqrt(sq / n_train)
        unit = std / REFERENCE_STD if math.isfinite(std) and std > 0 else 1.0

    plugin = None
    plugin_info: dict[str, Any] = {}
    item_vocab = Vocabulary(item_ids)
    if item_features_path is not None:
        pf = load_item_features(item_features_path, item_vocab)
        plugin = pf.features
        plugin_info = {
            "source": pf.source,
            "d": int(plugin.shape[1]),
            "items_without_features": pf.n_missing,
            "unused_feature_rows": pf.n_unused,
        }
    d0 = cfg.dim if plugin is None else plugin.shape[1]
    parts = [run.submit(dp.make_part, dt, unit, n_items, d0) for dt in datas]
    del datas
    lo, hi = rating_min / unit, rating_max / unit
    cl = Cluster(run, parts, n_items, lo, hi, unit)
    n_total = int(sum(n_rows))
    counts = run.gather([run.submit(_part_counts, p) for p in cl.parts])
    phase["name"] = "fit"  # the partitions are built (a later loss: Dask recomputes them)
    n_train_part = sum(c[0] for c in counts)
    n_val_part = sum(c[1] for c in counts)
    dups = sum(c[2] for c in counts)

    rng = np.random.default_rng(cfg.seed)
    if fraction > 0:
        rng.bit_generator.advance(n_total)  # type: ignore[attr-defined]  # the validation draws (pipeline.split_validation)
    shared = _init_shared(cl, cfg, plugin, rng, n_users)
    hyperparameters, refine, learn_u, reg_u = run_settings(
        cfg, rank=shared.U.shape[1], n_users=n_users, plugin=plugin is not None
    )
    has_val = n_val_part > 0
    start = shared
    cl.each(dp.save, "start")

    tuning: dict[str, Any] | None = None
    if cfg.tune and has_val:
        from lrs_rec.training.dask_tuning import tune_on_sample

        chosen: dict[str, Any]
        chosen, tuning = tune_on_sample(
            cl,
            start,
            cfg,
            n_users=n_users,
            learn_u=learn_u,
            refine=refine,
            reg_u=reg_u,
            progress=progress,
        )
        cfg = replace(cfg, **chosen)
        cl.each(dp.restore, "start")
    fit = fit_lrs(
        cl,
        start,
        cfg,
        learn_u=learn_u,
        refine=refine,
        reg_u=reg_u,
        has_val=has_val,
        progress=progress,
    )
    shared, history, best_it = fit.shared, fit.history, fit.best_iteration
    params = method_params(cfg)
    candidates = {"lrs": history[best_it]["val_rmse"], "start": history[0]["val_rmse"]}
    # biases alone (pipeline.biases_only): μ + c_u + c_i, zero item features, the start's U, W
    cl.each(dp.save, "fit")
    cl.each(dp.restore, "start")
    cl.each(dp.zero_b)
    mu_b, c_b = cl.fit_biases("train", cfg.reg_bias, 10)
    biases = dp.Shared(mu_b, c_b, np.zeros_like(start.F), start.U)
    cl.each(dp.save, "biases")
    if has_val:
        candidates["biases"] = unit * cl.rmse(biases, "val")
    biases_train = unit * cl.rmse(biases, "train")
    selected = "lrs"
    if has_val and cfg.keep_best:
        selected = min(candidates, key=lambda k: (candidates[k], k != "lrs"))
    if selected != "lrs":
        print(
            f"note: no {cfg.method} iteration beat the "
            + ("start (biases and item features)" if selected == "start" else "biases alone")
            + " on validation (val RMSE "
            + ", ".join(f"{k} {v:.4f}" for k, v in candidates.items())
            + f"); keeping the {selected} model",
            file=sys.stderr,
        )
    cl.each(dp.restore, {"lrs": "fit", "start": "start", "biases": "biases"}[selected])
    if selected != "lrs":
        shared, best_it = (start if selected == "start" else biases), 0
    cl.each(dp.drop, "fit", "start", "biases")
    train_rmse = biases_train if selected == "biases" else history[best_it]["train_rmse"]
    val_rmse = candidates[selected] if has_val else history[best_it]["val_rmse"]
    final_pass = "none"
    if has_val and selected == "lrs" and cfg.final_passes:
        if _overfits(history, best_it):
            final_pass = "skipped: the iteration after the best overfitted on validation"
        else:
            final_pass = "all ratings"
            for _ in range(cfg.final_passes):
                shared = cl.iterate(
                    shared, cfg, params, "all", learn_u=learn_u, refine=refine, reg_u=reg_u
                )
            cl.user_step(shared, params, "all")
    elif has_val and selected == "biases":
        mu_b, c_b = cl.fit_biases("all", cfg.reg_bias, 10)
        shared = replace(biases, global_mean=mu_b, item_bias=c_b)

    # the model: the workers write their users' shards, the driver the shared part
    seconds = time.perf_counter() - t0
    manifest = write_model_dir(
        run,
        cl.parts,
        shared,
        unit,
        cfg,
        item_ids,
        rating_min,
        rating_max,
        out_dir,
        shard_rows=shard_rows,
        manifest_parts={
            "hyperparameters": {
                **hyperparameters,
                **(tuning["chosen"] if tuning else {}),
                "effective_reg_u": reg_u if learn_u else None,
                "rating_unit": unit,
            },
            "data": {
                "source": spec,
                "format": summaries[0].report["format"] if len(files) == 1 else "multiple",
                "fingerprint_sha256": summaries[0].fingerprint
                if len(files) == 1
                else hashlib.sha256("".join(s.fingerprint for s in summaries).encode()).hexdigest(),
                "n_ratings": n_total - dups,
                "n_users": n_users,
                "n_items": n_items,
                "n_train_part": n_train_part,
                "n_validation_part": n_val_part,
                "files": len(files),
            },
            "cleaning": merged_report(summaries, spec, dups),
            "item_features": plugin_info or {"source": "als", "d": int(shared.F.shape[1])},
            "metrics": {
                "train_rmse": train_rmse,
                "val_rmse": val_rmse,
                "history": history,
                "best_iteration": best_it,
                "selected": selected,
                "final_pass": final_pass,
                "candidates_val_rmse": candidates if has_val else None,
                "start_val_rmse": history[0]["val_rmse"],
                "train_seconds": round(seconds, 3),
            },
            "engine": {
                "name": "dask",
                "workers": n_workers,
                "partitions": n_parts,
                # everything the driver received from the workers (statistics, sums, counts):
                # the run's whole traffic to the driver, the model included (written on workers)
                "bytes_to_driver": run.bytes_to_driver,
                "bytes_broadcast": run.bytes_broadcast,
            },
            **({"tuning": tuning} if tuning is not None else {}),
        },
    )
    del cl
    if stats is not None:
        stats.update(
            partitions=n_parts,
            workers=n_workers,
            bytes_to_driver=run.bytes_to_driver,
            bytes_broadcast=run.bytes_broadcast,
        )
    return DaskResult(Path(out_dir), manifest, history, seconds)


SHARD_ALIGN = 128  # users: partitions start at multiples of the store's bucket size (model shards)


def partition_bounds(n_users: int, n_parts: int) -> np.ndarray:
    """``n_parts + 1`` increasing user indices from 0 to ``n_users``, about equal ranges, inner
    bounds at multiples of :data:`SHARD_ALIGN` when every partition can still get users."""
    bounds = np.round(np.linspace(0, n_users, n_parts + 1)).astype(int)
    if n_users >= 2 * SHARD_ALIGN * n_parts:
        bounds[1:-1] = np.round(bounds[1:-1] / SHARD_ALIGN).astype(int) * SHARD_ALIGN
    return bounds


def _part_counts(part: dp.Part) -> tuple[int, int, int]:
    return len(part.train), len(part.val), part.data.duplicates_removed


def _overfits(history: list[dict[str, float]], best_it: int) -> bool:
    from lrs_rec.training.pipeline import item_step_overfits

    assert OVERFIT_RISE > 0
    return item_step_overfits(history, best_it)


def train_from_args(args: Any, cfg: TrainConfig) -> DaskResult:
    """`lrs-rec train --engine dask`: the cluster of ``--scheduler`` or a LocalCluster; writes
    the model directory ``--out``."""
    from lrs_rec.training.cli_args import load_options

    check_config(cfg)
    expand_inputs(args.ratings)  # a missing input fails before a cluster is started
    with dask_client(args.scheduler, args.workers) as client:
        if not args.quiet:
            n = len(client.scheduler_info()["workers"])
            print(f"dask: {n} workers ({client.scheduler.address})", file=sys.stderr)
        result = train_dask(
            args.ratings,
            load_options(args),
            cfg,
            client,
            out_dir=args.out,
            item_features_path=args.item_features,
            progress=not args.quiet,
        )
    return result
