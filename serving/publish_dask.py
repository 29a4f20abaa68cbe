"""``lrs-rec publish --engine dask``: the shards of a model directory written to Redis by Dask workers.

The driver does what must happen once (:meth:`RedisStore.begin_publish`: allocate the version,
register it as ``writing``, store the item ids, read the erasure markers; then
:meth:`RedisStore.finish_publish`: scrub users erased meanwhile, carry over onboarded users, mark
ready, switch atomically). In between, every worker reads shards of the model directory
(:func:`lrs_rec.model_shards.read_user_shard`; the directory must be visible to the workers, e.g. a
shared file system) and writes their users with :meth:`RedisStore.write_users` — the same encoder and
HSETs as the single-process publish, so the version holds the same keys and bytes.

Tasks get only JSON and plain values (the plan as JSON, the directory, a shard number, the Redis
URL); Dask retries a task whose worker died (a shard written twice writes the same fields with the
same bytes). A task that still fails fails the publish: the version is marked ``failed``, never
switched to.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lrs_rec.serving.connection import RedisHandle, embedded_server
from lrs_rec.serving.keys import KeyLayout
from lrs_rec.serving.store import (
    DEFAULT_BUCKET_SIZE,
    DEFAULT_HISTORY_CAP,
    PublishPlan,
    RedisStore,
    RefitHook,
    VersionMeta,
    user_block,
)

from lrs_rec.model_dir import load_shared_model_dir
from lrs_rec.model_shards import n_user_shards, read_user_shard

TASK_RETRIES = 2


def worker_url(handle: RedisHandle) -> str:
    """A URL the workers connect with: the handle's own, or the embedded server's unix socket
    (workers on this machine only)."""
    if handle.url is not None:
        return handle.url
    return "unix://" + embedded_server(handle.home)


def publish_shard(
    plan_json: str, model_dir: str, shard: int, url: str, cluster: bool | None
) -> int:
    """The worker task: read shard ``shard`` of ``model_dir`` and write its users into the version
    of ``plan_json`` (:class:`~lrs_rec.serving.store.PublishPlan`); returns the users written."""
    plan = PublishPlan.from_json(plan_json)
    handle = RedisHandle(url, socket_timeout=60.0, connect_timeout=5.0, cluster=cluster)
    try:
        store = RedisStore(handle, KeyLayout(plan.prefix))
        return store.write_users(plan, user_block(read_user_shard(model_dir, shard)))
    finally:
        handle.close()


@contextlib.contextmanager
def dask_client(
    scheduler: str | None, workers: int, cluster_options: dict[str, Any] | None = None
) -> Iterator[Any]:
    """A ``distributed.Client`` of the running cluster at ``scheduler``, or of a ``LocalCluster``
    of ``workers`` worker processes (one thread each, no dashboard) closed on exit."""
    from lrs_rec.extras import require_extra

    distributed = require_extra("distributed", "--engine dask")
    if scheduler:
        with distributed.Client(scheduler, timeout="20s") as client:
            yield client
        return
    options = {
        "n_workers": workers,
        "threads_per_worker": 1,
        "processes": True,
        "dashboard_address": None,
        "scheduler_port": 0,
        # the scheduler's HTTP server runs even without a dashboard: a port the OS chooses
        "scheduler_kwargs": {"dashboard": False, "dashboard_address": "127.0.0.1:0"},
        **(cluster_options or {}),
    }
    with (
        distributed.LocalCluster(**options) as cluster,
        distributed.Client(cluster) as client,
    ):
        yield client


def publish_dask(
    store: RedisStore,
    model_dir: str | os.PathLike[str],
    *,
    scheduler: str | None = None,
    workers: int = 2,
    precision: str = "float16",
    bucket_size: int = DEFAULT_BUCKET_SIZE,
    history_cap: int = DEFAULT_HISTORY_CAP,
    refit: RefitHook | None = None,
    switch: bool = True,
    carry_over_grace: float = 2.0,
    cluster_options: dict[str, Any] | None = None,
) -> VersionMeta:
    """Publish ``model_dir`` like :meth:`RedisStore.publish` with its shards written by Dask
    workers (``scheduler``: a running cluster's address; else a LocalCluster of ``workers``
    processes; ``cluster_options``: more LocalCluster arguments, e.g. ports)."""
    root = Path(model_dir).resolve()
    shared = load_shared_model_dir(root)
    n_shards = n_user_shards(root, shared.manifest)
    plan = store.begin_publish(
        shared,
        model_dir=str(root),
        precision=precision,
        bucket_size=bucket_size,
        history_cap=history_cap,
    )
    url, cluster = worker_url(store.handle), store.handle.is_cluster
    with store.failing(plan), dask_client(scheduler, workers, cluster_options) as client:
        raw = plan.to_json()
        futures = [
            client.submit(
                publish_shard,
                raw,
                str(root),
                i,
                url,
                cluster,
                key=f"lrs-publish-{plan.meta.version}-{i}",
                retries=TASK_RETRIES,
                pure=False,
            )
            for i in range(n_shards)
        ]
        client.gather(futures)
    return store.finish_publish(
        plan, shared, refit=refit, carry_over_grace=carry_over_grace, switch=switch
    )
