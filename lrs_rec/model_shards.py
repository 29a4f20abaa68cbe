"""The per-user part of a model directory as shards (format 2, docs/model_format.md).

Every user's parameters, id and rating history live in Parquet files ``users/part-NNNNN.parquet``
(one row per user, users in dense-index order: shard s holds the users
``sum(rows[:s]) .. sum(rows[:s + 1]) - 1``); the manifest's ``user_shards`` index lists them. The
shared part (``arrays.npz``: U, item features, biases, μ, the population prior, the onboarding
prior; ``items.json``; ``model.onnx``) does not grow with the number of users.

Writing is shard by shard, so that no process needs every user at once: the driver opens a staging
directory (:func:`begin_model_dir`), any process that sees it (a Dask worker on a shared file
system) writes shards (:func:`write_user_shard`), and the driver finishes (:func:`finish_model_dir`:
checks the shards, writes the shared arrays and the manifest, renames the staging directory into
place). :func:`lrs_rec.model_dir.save_model_dir` is these three calls on an in-memory model.

pyarrow is imported when a shard is read or written (it is in the ``serve`` and ``train`` extras);
the core package stays numpy-only otherwise.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lrs_rec.model_dir import (
    ARRAYS,
    FORMAT_VERSION,
    ITEMS,
    MANIFEST,
    SHARED_ARRAYS,
    USERS,
    ModelDirError,
    _digest,
    _finite_json,
    _json_default,
    _prior_to_arrays,
    check_out_dir,
    new_model_version,
    read_manifest,
)
from lrs_rec.onboarding import OnboardingPrior

USERS_DIR = "users"
SHARD_FILE = "users/part-{:05d}.parquet"
DEFAULT_SHARD_ROWS = 131_072
"""Users per shard written by :func:`lrs_rec.model_dir.save_model_dir` (a multiple of the store's
default bucket size 128, so that shards never share a Redis bucket)."""
SHARD_COLUMNS = (
    "user_id",  # string: the external id
    "user_bias",  # float64: c_u
    "w",  # list<float64>, r values: w_u
    "b_idx",  # list<int>, k values: coordinates of b_u (sorted)
    "b_val",  # list<float64>, k values
    "history_items",  # large_list<int>: item indices of the training ratings (stored order)
    "history_ratings",  # large_list<float64>: raw ratings
)
TIMESTAMPS = "history_timestamps"  # large_list<float64>, only when the model stores rating times
_META_KEY = b"lrs_rec.user_shard"
PER_USER_ARRAYS = (
    "W",
    "B_idx",
    "B_val",
    "user_bias",
    "history_indptr",
    "history_items",
    "history_ratings",
    "history_timestamps",
)
"""The format-1 arrays.npz members that format 2 keeps in the shards instead."""


@dataclass(frozen=True, eq=False)
class UserShard:
    """The users ``start .. start + n_users - 1`` of a model: ids, parameters and histories (CSR,
    ``history_indptr`` starting at 0)."""

    start: int
    user_ids: tuple[str, ...]
    user_bias: np.ndarray  # (n,)
    W: np.ndarray  # (n, r)
    B_idx: np.ndarray  # (n, k)
    B_val: np.ndarray  # (n, k)
    history_indptr: np.ndarray  # (n + 1,)
    history_items: np.ndarray  # (nnz,)
    history_ratings: np.ndarray  # (nnz,)
    history_timestamps: np.ndarray | None = None  # (nnz,)

    @property
    def n_users(self) -> int:
        return len(self.user_ids)

    def history_by_time(self) -> tuple[np.ndarray, np.ndarray]:
        """(items, ratings) with every user's slice oldest first (time, then item), as
        :meth:`lrs_rec.model_dir.TrainedModel.history_by_time`."""
        if self.history_timestamps is None:
            return np.asarray(self.history_items), np.asarray(self.history_ratings)
        users = np.repeat(np.arange(self.n_users), np.diff(self.history_indptr))
        order = np.lexsort((self.history_items, self.history_timestamps, users))
        return np.asarray(self.history_items[order]), np.asarray(self.history_ratings[order])


@dataclass(frozen=True)
class ShardRef:
    """Where shard ``index`` is and which users it holds (from the manifest's index)."""

    index: int
    start: int
    rows: int
    file: str


def _pa() -> tuple[Any, Any]:
    from lrs_rec.extras import require_extra

    pa = require_extra("pyarrow", "a sharded model directory (format 2)")
    pq = require_extra("pyarrow.parquet", "a sharded model directory (format 2)")
    return pa, pq


@contextlib.contextmanager
def _system_allocator() -> Iterator[None]:
    """Arrow allocations on the system allocator meanwhile, for reads whose buffers are dropped at
    once (the user ids a server loads): the default mimalloc pool keeps freed memory mapped — about
    90 MB of RSS after reading 10⁶ ids — while malloc returns it. (A process-wide setting of Arrow's;
    buffers allocated meanwhile elsewhere are merely on malloc too.)"""
    pa, _ = _pa()
    before = pa.default_memory_pool()
    pa.set_memory_pool(pa.system_memory_pool())
    try:
        yield
    finally:
        pa.set_memory_pool(before)


# -- writing ---------------------------------------------------------------------------------------
def begin_model_dir(out_dir: str | os.PathLike[str]) -> Path:
    """Check that ``out_dir`` may be (re)written (:func:`lrs_rec.model_dir.check_out_dir`) and
    create the staging directory next to it (with ``users/``), returned. Shards are written into
    it by :func:`write_user_shard`; :func:`finish_model_dir` moves it into place and
    :func:`abort_model_dir` removes it."""
    out = Path(out_dir)
    check_out_dir(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    (tmp / USERS_DIR).mkdir()
    return tmp


def abort_model_dir(staging_dir: str | os.PathLike[str]) -> None:
    """Remove a staging directory of :func:`begin_model_dir` (a failed or cancelled save)."""
    shutil.rmtree(staging_dir, ignore_errors=True)


def _list_column(pa: Any, values: np.ndarray, offsets: np.ndarray, *, large: bool) -> Any:
    offs = pa.array(np.asarray(offsets, dtype=np.int64 if large else np.int32))
    cls = pa.LargeListArray if large else pa.ListArray
    return cls.from_arrays(offs, pa.array(np.ascontiguousarray(values)))


def _floats(a: Any) -> np.ndarray:
    """``a`` as a float array, keeping its float width (a float32 column stays float32)."""
    arr = np.asarray(a)
    return arr if arr.dtype.kind == "f" else arr.astype(np.float64)


def write_user_shard(
    staging_dir: str | os.PathLike[str],
    shard_index: int,
    *,
    user_ids: Sequence[str],
    user_bias: Any,
    W: Any,
    B_idx: Any,
    B_val: Any,
    history_indptr: Any,
    history_items: Any,
    history_ratings: Any,
    history_timestamps: Any | None = None,
) -> dict[str, Any]:
    """Write one shard (``users/part-NNNNN.parquet`` of ``staging_dir``): the users of the
    arguments, in their order, are the shard's rows. Safe to call from any process that sees
    ``staging_dir`` (e.g. Dask workers), one call per shard index; the file appears atomically.
    Returns the shard's entry for :func:`finish_model_dir` (index, rows, rank, sparsity, whether
    it holds rating times)."""
    pa, pq = _pa()
    if isinstance(shard_index, bool) or not isinstance(shard_index, int | np.integer):
        raise ValueError(f"shard_index must be an integer, got {shard_index!r}")
    if shard_index < 0:
        raise ValueError(f"shard_index must be >= 0, got {shard_index}")
    ids = [str(u) for u in user_ids]
    n = len(ids)
    bias = _floats(user_bias).reshape(-1)
    W = np.asarray(W, dtype=np.float64)
    B_idx, B_val = np.asarray(B_idx), np.asarray(B_val, dtype=np.float64)
    indptr = np.asarray(history_indptr, dtype=np.int64)
    items, ratings = np.asarray(history_items), _floats(history_ratings)
    if W.ndim != 2 or B_idx.ndim != 2 or B_idx.shape != B_val.shape:
        raise ValueError(
            f"W must be (n, r) and B_idx / B_val (n, k), got {W.shape}, {B_idx.shape}, "
            f"{B_val.shape}"
        )
    if B_idx.dtype.kind not in "iu" or items.dtype.kind not in "iu":
        raise ValueError("B_idx and history_items must hold integers")
    rows = {
        "user_bias": bias.shape[0],
        "W": W.shape[0],
        "B_idx": B_idx.shape[0],
        "history_indptr - 1": indptr.shape[0] - 1,
    }
    for name, got in rows.items():
        if got != n:
            raise ValueError(f"{name}: {got} rows, but {n} user ids")
    nnz = items.shape[0]
    if ratings.shape != items.shape or indptr[0] != 0 or indptr[-1] != nnz:
        raise ValueError("history_indptr, history_items, history_ratings are not one CSR history")
    if np.any(np.diff(indptr) < 0):
        raise ValueError("history_indptr must be non-decreasing")
    r, k = W.shape[1], B_idx.shape[1]
    columns = {
        "user_id": pa.array(ids, type=pa.string()),
        "user_bias": pa.array(bias),
        "w": _list_column(pa, W.reshape(-1), np.arange(n + 1) * r, large=False),
        "b_idx": _list_column(pa, B_idx.reshape(-1), np.arange(n + 1) * k, large=False),
        "b_val": _list_column(pa, B_val.reshape(-1), np.arange(n + 1) * k, large=False),
        "history_items": _list_column(pa, items, indptr, large=True),
        "history_ratings": _list_column(pa, ratings, indptr, large=True),
    }
    if history_timestamps is not None:
        ts = np.asarray(history_timestamps, dtype=np.float64)
        if ts.shape != items.shape:
            raise ValueError(f"history_timestamps: shape {ts.shape}, history_items {items.shape}")
        columns[TIMESTAMPS] = _list_column(pa, ts, indptr, large=True)
    info = {
        "shard": int(shard_index),
        "rows": n,
        "rank": int(r),
        "sparsity": int(k),
        "history_timestamps": history_timestamps is not None,
    }
    table = pa.table(columns).replace_schema_metadata({_META_KEY: json.dumps(info).encode()})
    path = Path(staging_dir) / SHARD_FILE.format(int(shard_index))
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        pq.write_table(table, tmp, compression="zstd", row_group_size=max(1, min(n, 65_536)))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return info


def finish_model_dir(
    staging_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    shards: Sequence[dict[str, Any]],
    U: Any,
    item_features: Any,
    item_bias: Any,
    global_mean: float,
    w_prior_mean: Any,
    w_prior_cov: Any,
    item_ids: Sequence[str],
    rating_min: float,
    rating_max: float,
    manifest: dict[str, Any],
    onboarding_prior: OnboardingPrior | None = None,
    params_per_user: int | None = None,
) -> dict[str, Any]:
    """Complete a staging directory of :func:`begin_model_dir` whose shards are written (``shards``:
    the entries :func:`write_user_shard` returned, any order) into the model directory ``out_dir``:
    checks that the shards are 0..S-1, on disk and of one rank / sparsity (U's rank), writes the
    shared arrays (``arrays.npz``), ``items.json`` and the manifest (with its ``user_shards``
    index), then renames the staging directory into place (replacing an old model directory only).
    ``onboarding_prior``: the prior stored for servers (None: none stored; a server then estimates
    it from a full load once). Returns the manifest as written. The staging directory is removed
    on failure."""
    staging, out = Path(staging_dir), Path(out_dir)
    try:
        written = _finish(
            staging,
            shards=shards,
            arrays={
                "U": np.asarray(U, dtype=np.float64),
                "item_features": np.asarray(item_features, dtype=np.float64),
                "item_bias": np.asarray(item_bias, dtype=np.float64),
                "global_mean": np.asarray(global_mean, dtype=np.float64),
                "w_prior_mean": np.asarray(w_prior_mean, dtype=np.float64),
                "w_prior_cov": np.asarray(w_prior_cov, dtype=np.float64),
            },
            item_ids=[str(i) for i in item_ids],
            scale=(float(rating_min), float(rating_max)),
            manifest=manifest,
            prior=onboarding_prior,
            params_per_user=params_per_user,
        )
        check_out_dir(out)
        old = staging.with_name(staging.name + ".old")
        try:
            if out.exists():
                os.replace(out, old)  # checked: empty or only our model files
            os.replace(staging, out)
        except BaseException:
            if old.exists() and not out.exists():
                os.replace(old, out)
            raise
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        abort_model_dir(staging)
        raise
    return written


def _finish(
    staging: Path,
    *,
    shards: Sequence[dict[str, Any]],
    arrays: dict[str, np.ndarray],
    item_ids: list[str],
    scale: tuple[float, float],
    manifest: dict[str, Any],
    prior: OnboardingPrior | None,
    params_per_user: int | None,
) -> dict[str, Any]:
    ordered = sorted(shards, key=lambda s: int(s["shard"]))
    if [int(s["shard"]) for s in ordered] != list(range(len(ordered))):
        got = [int(s["shard"]) for s in ordered]
        raise ModelDirError(f"shards must be numbered 0..{len(ordered) - 1} once each, got {got}")
    U = arrays["U"]
    if U.ndim != 2:
        raise ModelDirError(f"U must be 2-D (d, r), got shape {U.shape}")
    d, r = U.shape
    ks = {int(s["sparsity"]) for s in ordered}
    times = {bool(s["history_timestamps"]) for s in ordered}
    if any(int(s["rank"]) != r for s in ordered) or len(ks) > 1 or len(times) > 1:
        raise ModelDirError(
            f"shards disagree on rank (U: {r}), sparsity or rating times: "
            f"{[(s['rank'], s['sparsity'], s['history_timestamps']) for s in ordered]}"
        )
    for s in ordered:
        if not (staging / SHARD_FILE.format(int(s["shard"]))).is_file():
            raise ModelDirError(f"{staging}: shard {s['shard']} was not written")
    k = ks.pop() if ks else 0
    n_users = sum(int(s["rows"]) for s in ordered)
    if not scale[0] < scale[1]:
        raise ModelDirError(f"rating scale [{scale[0]}, {scale[1]}] is empty")
    # the digest identifies the released shared weights, never per-user data (see model_dir)
    digest = _digest({name: arrays[name] for name in SHARED_ARRAYS})
    manifest = dict(manifest)
    manifest.pop("onboarding_prior_sha256", None)
    if prior is not None and not manifest.get("privacy"):
        prior_arrays = _prior_to_arrays(prior)
        arrays = {**arrays, **prior_arrays}
        manifest["onboarding_prior_sha256"] = _digest(prior_arrays)
    manifest["format_version"] = FORMAT_VERSION
    manifest.setdefault("model_version", new_model_version(digest))
    manifest.setdefault("created_at", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    manifest["arrays_sha256"] = digest
    manifest["rating_scale"] = [scale[0], scale[1]]
    declared = manifest.get("params_per_user")
    if params_per_user is None:
        ok = isinstance(declared, int) and not isinstance(declared, bool)
        params_per_user = declared if ok and isinstance(declared, int) else r + k
    manifest["dims"] = {
        "n_users": n_users,
        "n_items": len(item_ids),
        "d": int(d),
        "rank": int(r),
        "sparsity": int(k),
        "params_per_user": int(params_per_user),
    }
    manifest["user_shards"] = {
        "format": "parquet",
        "n_shards": len(ordered),
        "rows": [int(s["rows"]) for s in ordered],
        "files": [SHARD_FILE.format(i) for i in range(len(ordered))],
        "history_timestamps": bool(times.pop()) if times else False,
    }
    manifest = _finite_json(json.loads(json.dumps(manifest, default=_json_default)))
    np.savez(staging / ARRAYS, **arrays)  # type: ignore[arg-type]
    (staging / ITEMS).write_text(json.dumps(item_ids))
    (staging / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True, allow_nan=False))
    return manifest


# -- reading ---------------------------------------------------------------------------------------
def is_sharded(manifest: dict[str, Any]) -> bool:
    """Whether a manifest describes a sharded directory (format 2) rather than format 1."""
    return manifest.get("format_version") == FORMAT_VERSION


def shard_refs(model_dir: str | os.PathLike[str], manifest: dict[str, Any]) -> list[ShardRef]:
    """The shards of a format-2 directory from its manifest's ``user_shards`` index (checked)."""
    where = Path(model_dir) / MANIFEST
    idx = manifest.get("user_shards")
    if not isinstance(idx, dict):
        raise ModelDirError(f"{where}: user_shards must be an object, got {idx!r}")
    rows, files = idx.get("rows"), idx.get("files")
    if (
        idx.get("format") != "parquet"
        or not isinstance(rows, list)
        or not isinstance(files, list)
        or len(rows) != len(files)
        or idx.get("n_shards") != len(rows)
        or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in rows)
        or files != [SHARD_FILE.format(i) for i in range(len(files))]
    ):
        raise ModelDirError(
            f"{where}: user_shards must be {{format: parquet, n_shards: S, rows: [S counts], "
            f"files: [users/part-00000.parquet, ...]}}, got {json.dumps(idx)[:200]}"
        )
    dims = manifest.get("dims")
    if isinstance(dims, dict) and dims.get("n_users") != sum(rows):
        raise ModelDirError(
            f"{where}: dims.n_users {dims.get('n_users')} != the shards' {sum(rows)} rows"
        )
    starts = np.concatenate([[0], np.cumsum(rows)]).astype(int).tolist()
    return [ShardRef(i, starts[i], rows[i], files[i]) for i in range(len(rows))]


def _dims(model_dir: Path, manifest: dict[str, Any]) -> tuple[int, int, int, int]:
    dims = manifest.get("dims")
    names = ("d", "rank", "sparsity", "n_items")
    if not isinstance(dims, dict) or not all(
        isinstance(dims.get(n), int) and not isinstance(dims.get(n), bool) for n in names
    ):
        raise ModelDirError(f"{model_dir / MANIFEST}: dims must give integers {list(names)}")
    return int(dims["d"]), int(dims["rank"]), int(dims["sparsity"]), int(dims["n_items"])


def _fixed(path: Path, table: Any, name: str, width: int, *, integer: bool) -> np.ndarray:
    col = table.column(name).combine_chunks()
    offsets = np.asarray(col.offsets)
    n = len(col)
    if not np.array_equal(offsets - offsets[0], np.arange(n + 1) * width):
        raise ModelDirError(f"{path}: column {name} must hold {width} values per user")
    values = np.asarray(col.flatten().to_numpy(zero_copy_only=False))
    _check_kind(path, name, values, integer=integer)
    return values.reshape(n, width)


def _check_kind(path: Path, name: str, a: np.ndarray, *, integer: bool) -> None:
    kinds = "iu" if integer else "fiu"
    if a.dtype.kind not in kinds:
        what = "integer" if integer else "numeric"
        raise ModelDirError(f"{path}: column {name} must be {what}, got {a.dtype}")
    if not integer and not np.all(np.isfinite(a)):
        raise ModelDirError(f"{path}: column {name} contains NaN or inf")


def _ragged(path: Path, table: Any, name: str, *, integer: bool) -> tuple[np.ndarray, np.ndarray]:
    col = table.column(name).combine_chunks()
    offsets = np.asarray(col.offsets, dtype=np.int64)
    values = np.asarray(col.flatten().to_numpy(zero_copy_only=False))
    _check_kind(path, name, values, integer=integer)
    return offsets - offsets[0], values


def read_user_shard(
    model_dir: str | os.PathLike[str],
    shard: int | ShardRef,
    *,
    manifest: dict[str, Any] | None = None,
) -> UserShard:
    """Read shard ``shard`` of a model directory (any process that sees the directory): every
    column checked (rows as the manifest says, r / k values per user, integer indices in range,
    finite floats); anything wrong is a :class:`~lrs_rec.model_dir.ModelDirError` naming the
    file. A format-1 directory has one shard: all its users (read through ``load_model_dir``)."""
    root = Path(model_dir)
    manifest = read_manifest(root) if manifest is None else manifest
    if not is_sharded(manifest):
        if shard not in (0,) and not (isinstance(shard, ShardRef) and shard.index == 0):
            raise ModelDirError(f"{root}: a format-1 model directory has one shard (0)")
        return _legacy_shard(root)
    refs = shard_refs(root, manifest)
    ref = shard if isinstance(shard, ShardRef) else None
    if ref is None:
        if not 0 <= int(shard) < len(refs):  # type: ignore[arg-type]
            raise ModelDirError(f"{root}: no shard {shard} (it has {len(refs)})")
        ref = refs[int(shard)]  # type: ignore[arg-type]
    d, r, k, n_items = _dims(root, manifest)
    path = root / ref.file
    _, pq = _pa()
    try:
        table = pq.read_table(path)
    except FileNotFoundError as e:
        raise ModelDirError(f"{path}: missing") from e
    except Exception as e:  # pyarrow's ArrowInvalid / OSError for a damaged file
        raise ModelDirError(f"{path}: damaged or not a Parquet shard ({e})") from None
    want = set(SHARD_COLUMNS) | (
        {TIMESTAMPS} if manifest["user_shards"].get("history_timestamps") else set()
    )
    missing = want - set(table.column_names)
    if missing:
        raise ModelDirError(f"{path}: missing columns {sorted(missing)}")
    if table.num_rows != ref.rows:
        raise ModelDirError(f"{path}: {table.num_rows} rows, the manifest says {ref.rows}")
    bias = np.asarray(table.column("user_bias").to_numpy(), dtype=np.float64)
    _check_kind(path, "user_bias", bias, integer=False)
    W = _fixed(path, table, "w", r, integer=False)
    B_idx = _fixed(path, table, "b_idx", k, integer=True)
    B_val = _fixed(path, table, "b_val", k, integer=False)
    if B_idx.size and (B_idx.min() < 0 or B_idx.max() >= d):
        raise ModelDirError(f"{path}: b_idx must lie in [0, {d})")
    indptr, items = _ragged(path, table, "history_items", integer=True)
    indptr_r, ratings = _ragged(path, table, "history_ratings", integer=False)
    if not np.array_equal(indptr, indptr_r):
        raise ModelDirError(f"{path}: history_items and history_ratings differ in length")
    if items.size and (items.min() < 0 or items.max() >= n_items):
        raise ModelDirError(f"{path}: history_items must lie in [0, {n_items})")
    ts = None
    if TIMESTAMPS in want:
        indptr_t, ts = _ragged(path, table, TIMESTAMPS, integer=False)
        if not np.array_equal(indptr, indptr_t):
            raise ModelDirError(f"{path}: history_timestamps and history_items differ in length")
    ids = table.column("user_id").to_pylist()
    if any(not isinstance(u, str) for u in ids):
        raise ModelDirError(f"{path}: column user_id must hold strings (no nulls)")
    return UserShard(
        start=ref.start,
        user_ids=tuple(ids),
        user_bias=bias,
        W=W,
        B_idx=B_idx,
        B_val=B_val,
        history_indptr=indptr,
        history_items=items,
        history_ratings=ratings,
        history_timestamps=ts,
    )


def _legacy_shard(root: Path) -> UserShard:
    from lrs_rec.model_dir import load_model_dir

    m = load_model_dir(root)
    return UserShard(
        start=0,
        user_ids=m.user_ids,
        user_bias=m.user_bias,
        W=m.lrs.W,
        B_idx=m.lrs.B_idx,
        B_val=m.lrs.B_val,
        history_indptr=m.history_indptr,
        history_items=m.history_items,
        history_ratings=m.history_ratings,
        history_timestamps=m.history_timestamps,
    )


def n_user_shards(model_dir: str | os.PathLike[str], manifest: dict[str, Any] | None = None) -> int:
    """How many shards :func:`read_user_shard` reads (1 for a format-1 directory)."""
    manifest = read_manifest(model_dir) if manifest is None else manifest
    return len(shard_refs(model_dir, manifest)) if is_sharded(manifest) else 1


def iter_user_shards(
    model_dir: str | os.PathLike[str], manifest: dict[str, Any] | None = None
) -> Iterator[UserShard]:
    """Every shard in order (one at a time in memory)."""
    manifest = read_manifest(model_dir) if manifest is None else manifest
    for i in range(n_user_shards(model_dir, manifest)):
        yield read_user_shard(model_dir, i, manifest=manifest)


def read_user_id_bytes(
    model_dir: str | os.PathLike[str], manifest: dict[str, Any]
) -> tuple[np.ndarray, np.ndarray]:
    """Format 2: every user id as UTF-8 bytes, concatenated, and their n + 1 offsets (dense-index
    order) — the shards' ``user_id`` columns copied out of Arrow without a Python object per id
    (what :meth:`lrs_rec.user_index.UserIndex.from_utf8` takes)."""
    root = Path(model_dir)
    _, pq = _pa()
    datas: list[np.ndarray] = []
    offsets: list[np.ndarray] = [np.zeros(1, dtype=np.int64)]
    total = 0
    for ref in shard_refs(root, manifest):
        path = root / ref.file
        try:
            with _system_allocator():
                # one file, one thread: the dataset reader's thread pool costs ~30 MB of RSS
                table = pq.ParquetFile(path).read(columns=["user_id"], use_threads=False)
                col = table.column("user_id").combine_chunks()
                del table
        except FileNotFoundError as e:
            raise ModelDirError(f"{path}: missing") from e
        except Exception as e:
            raise ModelDirError(f"{path}: damaged or not a Parquet shard ({e})") from None
        if (
            len(col) != ref.rows
            or col.null_count
            or str(col.type) not in ("string", "large_string")
        ):
            raise ModelDirError(f"{path}: user_id must hold {ref.rows} strings")
        width = np.int32 if str(col.type) == "string" else np.int64
        offs = np.frombuffer(col.buffers()[1], dtype=width)[col.offset : col.offset + len(col) + 1]
        offs = offs.astype(np.int64)
        raw = col.buffers()[2]
        data = np.frombuffer(raw, dtype=np.uint8) if raw is not None else np.zeros(0, np.uint8)
        datas.append(data[offs[0] : offs[-1]].copy())
        offsets.append(offs[1:] - offs[0] + total)
        total += int(offs[-1] - offs[0])
        del col
    return (np.concatenate(datas) if datas else np.zeros(0, np.uint8)), np.concatenate(offsets)


def read_user_ids(
    model_dir: str | os.PathLike[str], manifest: dict[str, Any] | None = None
) -> list[str]:
    """Every user id in dense-index order: the ``user_id`` column of every shard (format 2) or
    ``users.json`` (format 1); no parameter or history is read."""
    root = Path(model_dir)
    manifest = read_manifest(root) if manifest is None else manifest
    if not is_sharded(manifest):
        from lrs_rec.model_dir import _read_ids

        return list(_read_ids(root / USERS))
    _, pq = _pa()
    out: list[str] = []
    for ref in shard_refs(root, manifest):
        path = root / ref.file
        try:
            col = pq.read_table(path, columns=["user_id"]).column("user_id")
        except FileNotFoundError as e:
            raise ModelDirError(f"{path}: missing") from e
        except Exception as e:
            raise ModelDirError(f"{path}: damaged or not a Parquet shard ({e})") from None
        ids = col.to_pylist()
        if len(ids) != ref.rows or any(not isinstance(u, str) for u in ids):
            raise ModelDirError(f"{path}: user_id must hold {ref.rows} strings")
        out.extend(ids)
    if len(set(out)) != len(out):
        raise ModelDirError(f"{root}: user ids are not distinct across the shards")
    return out
