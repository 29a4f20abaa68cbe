"""The versioned model directory: the contract between training, export, serving and onboarding.

Layout of ``MODEL_DIR`` (format 2, docs/model_format.md)::

    manifest.json   format_version, model_version, created_at, dims, hyperparameters, data, cleaning,
                    arrays_sha256 (digest of the shared arrays only, never of per-user data),
                    metrics, rating_scale, user_shards (the shard index) (+ privacy for DP models)
    arrays.npz      the shared arrays only: U, item_features, item_bias, global_mean, w_prior_mean,
                    w_prior_cov [, onboarding_prior_* (the onboarding prior's statistics; non-private
                    models; digest in the manifest's onboarding_prior_sha256)] (np.savez, loaded with
                    allow_pickle=False)
    users/part-NNNNN.parquet   per-user shards: user id, c_u, w_u, b_u (indices, values) and the
                    training history (items, ratings[, timestamps]) (lrs_rec.model_shards)
    items.json      external item ids, position = dense item index
    model.onnx      written by ``lrs-rec export`` (training.export)

Format 1 (still loaded) kept every user in arrays.npz (W, B_idx, B_val, user_bias, history_indptr,
history_items, history_ratings[, history_timestamps]) and the user ids in ``users.json``.

Prediction (the offline reference every fast path is compared with)::

    r̂(u, i) = clip(μ + c_u + c_i + ⟨f_i, θ_u⟩, rating_min, rating_max),   θ_u = U·w_u + b_u

with f_i the item feature row, c_u / c_i the user / item biases. The population (non-personalised)
model for an unknown user uses c_u = 0 and θ = U·w̄ (w̄ = ``w_prior_mean``); an unknown item uses
c_i = 0 and f_i = 0.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lrs_rec.model import LRSModel
from lrs_rec.onboarding import (
    DEFAULT_SCHEDULE,
    OnboardingConfig,
    OnboardingPrior,
    check_min_ns,
    estimate_prior,
)
from lrs_rec.user_index import UserIndex

FORMAT_VERSION = 2
LEGACY_FORMAT_VERSION = 1  # every user in arrays.npz + users.json: still loaded, no longer written
MANIFEST = "manifest.json"
ARRAYS = "arrays.npz"
USERS = "users.json"
ITEMS = "items.json"
ONNX = "model.onnx"
USERS_DIR = "users"  # format 2: the per-user shards (lrs_rec.model_shards)
OWN_FILES = frozenset({MANIFEST, ARRAYS, USERS, ITEMS, ONNX, USERS_DIR})

SHARED_ARRAYS = ("U", "item_features", "item_bias", "global_mean", "w_prior_mean", "w_prior_cov")
"""Arrays shared by all users (released in model.onnx); everything else in arrays.npz is per-user
(except the onboarding prior's statistics, :data:`PRIOR_ARRAYS`)."""

PRIOR_PREFIX = "onboarding_prior_"
PRIOR_FIELDS = (
    "t_mean",
    "t_cov",
    "b_var",
    "noise_var",
    "item_desc",
    "m_mean",
    "C_mm",
    "S_within",
    "C_tm",
)
PRIOR_ARRAYS = tuple(PRIOR_PREFIX + f for f in PRIOR_FIELDS)
"""The onboarding prior (:class:`lrs_rec.onboarding.OnboardingPrior`) estimated at save time from the
per-user arrays: shared statistics (sizes 1 + r and n_items × p), so that a server onboards without
loading any user's parameters. Absent in older directories and in private models (which onboard from
:func:`lrs_rec.onboarding.public_prior`, never from aggregates of per-user arrays)."""

_ARRAY_FIELDS = (
    "item_features",
    "item_bias",
    "user_bias",
    "w_prior_mean",
    "w_prior_cov",
    "history_indptr",
    "history_items",
    "history_ratings",
)


class ModelDirError(ValueError):
    """A model directory is missing, corrupt, or of another format version."""


@dataclass(frozen=True, eq=False)
class TrainedModel:
    """Everything a trained lrs-rec model releases or serves. Index spaces: users and items are dense
    indices into ``user_ids`` / ``item_ids``."""

    lrs: LRSModel
    item_features: np.ndarray  # (n_items, d)
    item_bias: np.ndarray  # (n_items,)
    user_bias: np.ndarray  # (n_users,)
    global_mean: float
    user_ids: tuple[str, ...]
    item_ids: tuple[str, ...]
    w_prior_mean: np.ndarray  # (r,)  population mean of w (onboarding prior, population model)
    w_prior_cov: np.ndarray  # (r, r) population covariance of w
    history_indptr: np.ndarray  # (n_users + 1,) CSR of each user's training ratings
    history_items: np.ndarray  # (nnz,) item indices
    history_ratings: np.ndarray  # (nnz,) raw ratings
    rating_min: float
    rating_max: float
    manifest: dict[str, Any] = field(default_factory=dict)
    history_timestamps: np.ndarray | None = None  # (nnz,) rating times aligned with history_items
    # the onboarding prior estimated from the arrays above (stored by save_model_dir; None: not yet)
    onboarding_prior: OnboardingPrior | None = None

    def __post_init__(self) -> None:
        n_users, n_items = self.lrs.n_users, len(self.item_ids)
        d, r = self.lrs.d, self.lrs.rank
        checks = {
            "user_ids": (len(self.user_ids), n_users),
            "item_features rows": (self.item_features.shape[0], n_items),
            "item_features cols": (self.item_features.shape[1], d),
            "item_bias": (self.item_bias.shape[0], n_items),
            "user_bias": (self.user_bias.shape[0], n_users),
            "w_prior_mean": (self.w_prior_mean.shape[0], r),
            "history_indptr": (self.history_indptr.shape[0], n_users + 1),
        }
        for name, (got, want) in checks.items():
            if got != want:
                raise ModelDirError(f"{name}: length {got} does not match expected {want}")
        if self.history_timestamps is not None and (
            self.history_timestamps.shape != self.history_items.shape
        ):
            raise ModelDirError(
                f"history_timestamps: shape {self.history_timestamps.shape} does not match "
                f"history_items {self.history_items.shape}"
            )
        if self.w_prior_cov.shape != (r, r):
            raise ModelDirError(f"w_prior_cov must be ({r}, {r}), got {self.w_prior_cov.shape}")
        if not self.rating_min < self.rating_max:
            raise ModelDirError(f"rating scale [{self.rating_min}, {self.rating_max}] is empty")

    # -- convenience ------------------------------------------------------------------------------
    @property
    def n_users(self) -> int:
        return self.lrs.n_users

    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    @property
    def model_version(self) -> str:
        return str(self.manifest.get("model_version", ""))

    def user_index(self) -> dict[str, int]:
        return {u: i for i, u in enumerate(self.user_ids)}

    def item_index(self) -> dict[str, int]:
        return {it: i for i, it in enumerate(self.item_ids)}

    def user_history(self, u: int) -> tuple[np.ndarray, np.ndarray]:
        lo, hi = int(self.history_indptr[u]), int(self.history_indptr[u + 1])
        return np.asarray(self.history_items[lo:hi]), np.asarray(self.history_ratings[lo:hi])

    def user_history_by_time(self, u: int) -> tuple[np.ndarray, np.ndarray]:
        """User u's training ratings oldest first (by time, then item) when the model stores rating
        times, else in stored order — what a "keep the most recent" cap must cut."""
        items, ratings = self.user_history(u)
        if self.history_timestamps is None:
            return items, ratings
        lo, hi = int(self.history_indptr[u]), int(self.history_indptr[u + 1])
        order = np.lexsort((items, self.history_timestamps[lo:hi]))
        return items[order], ratings[order]

    def history_by_time(self) -> tuple[np.ndarray, np.ndarray]:
        """(history_items, history_ratings) with every user's slice oldest first (the CSR
        ``history_indptr`` is unchanged); as stored when the model has no rating times."""
        if self.history_timestamps is None:
            return np.asarray(self.history_items), np.asarray(self.history_ratings)
        users = np.repeat(np.arange(self.n_users), np.diff(self.history_indptr))
        order = np.lexsort((self.history_items, self.history_timestamps, users))
        return np.asarray(self.history_items[order]), np.asarray(self.history_ratings[order])

    def population_theta(self) -> np.ndarray:
        """θ of the non-personalised population model: U·w̄."""
        return np.asarray(self.lrs.U @ self.w_prior_mean, dtype=np.float64)

    # -- reference prediction ---------------------------------------------------------------------
    def predict(self, users: np.ndarray, items: np.ndarray, *, clip: bool = True) -> np.ndarray:
        """Reference predictions for (user index, item index) pairs; index -1 means unknown.
        ``clip=False`` gives the raw score, which is what rankings use (as the served top-n does)."""
        users = np.asarray(users, dtype=np.int64)
        items = np.asarray(items, dtype=np.int64)
        if users.shape != items.shape:
            raise ValueError(
                f"users {users.shape} and items {items.shape} must have the same shape"
            )
        known_u, known_i = users >= 0, items >= 0
        theta = np.empty((users.size, self.lrs.d))
        theta[known_u] = self.lrs.theta_rows(users[known_u])
        theta[~known_u] = self.population_theta()
        feats = np.zeros((items.size, self.lrs.d))
        feats[known_i] = self.item_features[items[known_i]]
        pred = self.global_mean + np.einsum("nd,nd->n", feats, theta)
        pred[known_u] += self.user_bias[users[known_u]]
        pred[known_i] += self.item_bias[items[known_i]]
        if clip:
            pred = np.clip(pred, self.rating_min, self.rating_max)
        return np.asarray(pred, dtype=np.float64)


def new_model_version(arrays_digest: str) -> str:
    """A sortable, unique model version id: UTC timestamp + content digest prefix."""
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + arrays_digest[:10]


def _digest(arrays: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(name.encode())
        h.update(str(a.dtype).encode())
        h.update(str(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _is_own_file(name: str) -> bool:
    """A file save_model_dir or export writes (or a leftover temp file of export's atomic write)."""
    return name in OWN_FILES or any(
        name.startswith(f".{own}.") and name.endswith(".tmp") for own in OWN_FILES
    )


def check_out_dir(out_dir: str | os.PathLike[str]) -> None:
    """Raise :class:`ModelDirError` unless ``out_dir`` may be (re)written by :func:`save_model_dir`:
    it is absent, an empty directory, or an lrs-rec model directory (a manifest.json of ours and
    only model files). Nothing else is ever replaced: not a file, the current directory, or a
    directory holding other files. And its staging directory can be created next to it (probed),
    so that `lrs-rec train` finds an unwritable --out before training, not after."""
    out = Path(out_dir)
    _check_replaceable(out)
    _check_creatable(out)


def _check_creatable(out: Path) -> None:
    """A directory can be created where ``out``'s staging directory goes: in its parent, or else
    in the nearest ancestor that exists (the parents are made on saving). Probed with a temporary
    directory, removed at once."""
    import tempfile

    base = out.absolute().parent
    while not base.exists() and base != base.parent:
        base = base.parent
    if not base.is_dir():
        raise ModelDirError(f"{out}: cannot be created: {base} is not a directory")
    try:
        probe = tempfile.mkdtemp(prefix=f".{out.name}.probe.", dir=base)
    except OSError as e:
        why = os.strerror(e.errno) if e.errno else str(e)
        raise ModelDirError(f"{out}: cannot be created in {base} ({why})") from None
    os.rmdir(probe)


def _check_replaceable(out: Path) -> None:
    if not out.exists() and not out.is_symlink():
        return
    if out.is_symlink() or not out.is_dir():
        what = "a symbolic link" if out.is_symlink() else "not a directory"
        raise ModelDirError(f"{out}: exists and is {what}; choose another output path")
    cwd = Path.cwd().resolve()
    if out.resolve() == cwd or out.resolve() in cwd.parents:
        raise ModelDirError(
            f"{out}: is (or contains) the current directory; choose a new directory for the model"
        )
    names = sorted(p.name for p in out.iterdir())
    if not names:
        return
    others = [n for n in names if not _is_own_file(n)]
    if others or not _is_own_manifest(out / MANIFEST):
        shown = ", ".join(others[:5]) + (", ..." if len(others) > 5 else "")
        raise ModelDirError(
            f"{out}: exists and is not an lrs-rec model directory"
            + (f" (it holds {shown})" if others else f" (no lrs-rec {MANIFEST})")
            + "; refusing to replace it: choose a new or empty directory"
        )


def _is_own_manifest(path: Path) -> bool:
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and {"format_version", "arrays_sha256"} <= set(manifest)


def _finite_json(o: Any) -> Any:
    """``o`` with NaN / inf floats replaced by None (strict JSON has no NaN)."""
    if isinstance(o, dict):
        return {k: _finite_json(v) for k, v in o.items()}
    if isinstance(o, list | tuple):
        return [_finite_json(v) for v in o]
    if isinstance(o, float | np.floating) and not np.isfinite(o):
        return None
    return o


def _params_per_user(manifest: dict[str, Any], model: TrainedModel) -> int:
    declared = manifest.get("params_per_user")
    if isinstance(declared, int) and not isinstance(declared, bool):
        return declared
    return model.lrs.rank + model.lrs.sparsity


def save_model_dir(
    model: TrainedModel, out_dir: str | os.PathLike[str], *, shard_rows: int | None = None
) -> TrainedModel:
    """Write ``model`` to ``out_dir`` atomically (a temp dir renamed into place), in format 2: the
    shared arrays in arrays.npz, every user in Parquet shards of ``shard_rows`` users
    (default :data:`lrs_rec.model_shards.DEFAULT_SHARD_ROWS`), written one shard at a time.

    Fills ``format_version``, ``model_version`` (if absent), ``created_at``, ``dims`` and
    ``user_shards`` in the manifest (NaN metrics become null); returns the model with the manifest
    as written. An existing ``out_dir`` is replaced only if it is empty or an lrs-rec model
    directory (:func:`check_out_dir`).
    """
    from lrs_rec import model_shards as ms

    rows = ms.DEFAULT_SHARD_ROWS if shard_rows is None else int(shard_rows)
    if rows < 1:
        raise ValueError(f"shard_rows must be >= 1, got {shard_rows}")
    manifest = dict(model.manifest)
    # always estimated from the arrays being written (a prior carried by ``model`` could be stale
    # after a dataclasses.replace of its arrays)
    prior = None if manifest.get("privacy") else _estimate_prior(model)
    staging = ms.begin_model_dir(out_dir)
    try:
        lrs, indptr = model.lrs, model.history_indptr
        shards = []
        for s, lo in enumerate(range(0, max(model.n_users, 1), rows)):
            hi = min(lo + rows, model.n_users)
            a, b = int(indptr[lo]), int(indptr[hi])
            ts = model.history_timestamps
            shards.append(
                ms.write_user_shard(
                    staging,
                    s,
                    user_ids=model.user_ids[lo:hi],
                    user_bias=model.user_bias[lo:hi],
                    W=lrs.W[lo:hi],
                    B_idx=lrs.B_idx[lo:hi],
                    B_val=lrs.B_val[lo:hi],
                    history_indptr=np.asarray(indptr[lo : hi + 1]) - a,
                    history_items=model.history_items[a:b],
                    history_ratings=model.history_ratings[a:b],
                    history_timestamps=None if ts is None else ts[a:b],
                )
            )
    except BaseException:
        ms.abort_model_dir(staging)
        raise
    written = ms.finish_model_dir(
        staging,
        out_dir,
        shards=shards,
        U=lrs.U,
        item_features=model.item_features,
        item_bias=model.item_bias,
        global_mean=model.global_mean,
        w_prior_mean=model.w_prior_mean,
        w_prior_cov=model.w_prior_cov,
        item_ids=model.item_ids,
        rating_min=model.rating_min,
        rating_max=model.rating_max,
        manifest=manifest,
        onboarding_prior=prior,
        params_per_user=_params_per_user(manifest, model),
    )
    return TrainedModel(**{**_fields(model), "manifest": written, "onboarding_prior": prior})


def _estimate_prior(model: TrainedModel) -> OnboardingPrior | None:
    """The onboarding prior of a non-private model, exactly as the service would estimate it from
    the arrays (:func:`lrs_rec.model_onboarding.build_onboarder`); None if it cannot be estimated
    (the service then tries again when it first onboards, and reports the error there)."""
    try:
        return estimate_prior(
            lrs=model.lrs,
            item_features=model.item_features,
            item_bias=model.item_bias,
            user_bias=model.user_bias,
            global_mean=model.global_mean,
            w_prior_mean=model.w_prior_mean,
            w_prior_cov=model.w_prior_cov,
            history_indptr=model.history_indptr,
            history_items=model.history_items,
            history_ratings=model.history_ratings,
            history_timestamps=model.history_timestamps,
        )
    except (ValueError, np.linalg.LinAlgError):
        return None


def _prior_to_arrays(prior: OnboardingPrior) -> dict[str, np.ndarray]:
    return {PRIOR_PREFIX + f: np.asarray(getattr(prior, f), dtype=np.float64) for f in PRIOR_FIELDS}


def _prior_from_arrays(
    path: Path, arrays: dict[str, np.ndarray], manifest: dict[str, Any]
) -> OnboardingPrior | None:
    """The stored onboarding prior (checked against the manifest's digest), or None if the
    directory has none (older format, private model)."""
    present = [name for name in PRIOR_ARRAYS if name in arrays]
    want = manifest.get("onboarding_prior_sha256")
    if not present and want is None:
        return None
    if len(present) != len(PRIOR_ARRAYS) or want is None:
        raise ModelDirError(f"{path}: incomplete onboarding prior ({sorted(present)})")
    if _digest({name: arrays[name] for name in PRIOR_ARRAYS}) != want:
        raise ModelDirError(
            f"{path} does not match manifest onboarding_prior_sha256 {str(want)[:16]}...: the "
            "arrays were changed or damaged after training; retrain or restore the model directory"
        )
    try:
        return OnboardingPrior(
            **{f: arrays[PRIOR_PREFIX + f] for f in PRIOR_FIELDS}  # type: ignore[arg-type]
        )
    except (TypeError, ValueError) as e:
        raise ModelDirError(f"{path}: invalid onboarding prior: {e}") from None


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _fields(model: TrainedModel) -> dict[str, Any]:
    return {f: getattr(model, f) for f in TrainedModel.__dataclass_fields__}


def read_manifest(model_dir: str | os.PathLike[str]) -> dict[str, Any]:
    path = Path(model_dir) / MANIFEST
    if not path.is_file():
        raise ModelDirError(f"{model_dir}: not a model directory ({MANIFEST} missing)")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ModelDirError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from e
    except (OSError, ValueError) as e:
        raise ModelDirError(f"{path}: cannot read: {e}") from e
    if not isinstance(manifest, dict):
        raise ModelDirError(f"{path}: expected a JSON object, got {type(manifest).__name__}")
    version = manifest.get("format_version")
    if version not in (LEGACY_FORMAT_VERSION, FORMAT_VERSION):
        raise ModelDirError(
            f"{model_dir}: model directory format_version {version!r} is not supported by this "
            f"lrs-rec (reads {LEGACY_FORMAT_VERSION} and {FORMAT_VERSION}); retrain or convert "
            "the model"
        )
    return manifest


# name -> (ndim, integer?) of every array in arrays.npz; float arrays must be finite
_ARRAY_SPECS: dict[str, tuple[int, bool]] = {
    "U": (2, False),
    "W": (2, False),
    "B_idx": (2, True),
    "B_val": (2, False),
    "item_features": (2, False),
    "item_bias": (1, False),
    "user_bias": (1, False),
    "global_mean": (0, False),
    "w_prior_mean": (1, False),
    "w_prior_cov": (2, False),
    "history_indptr": (1, True),
    "history_items": (1, True),
    "history_ratings": (1, False),
    "history_timestamps": (1, False),
}


def _read_arrays(path: Path) -> dict[str, np.ndarray]:
    try:
        npz = np.load(path, allow_pickle=False)
        if not isinstance(npz, np.lib.npyio.NpzFile):
            raise ValueError("not an .npz archive")
        with npz as z:
            return {name: z[name] for name in z.files}
    except FileNotFoundError as e:
        raise ModelDirError(f"{path}: missing") from e
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, zlib.error) as e:
        # numpy's text for pickled / object data advises enabling pickle: never passed on
        why = "not a numeric .npz archive" if "pickle" in str(e) else str(e)
        raise ModelDirError(f"{path}: damaged or not a model array file ({why})") from None


def _check_arrays(path: Path, arrays: dict[str, np.ndarray], manifest: dict[str, Any]) -> None:
    """Every array present with its dtype kind, rank and finite values; shared ones match the
    manifest's arrays_sha256 (a damaged or edited file is never served under the old version)."""
    missing = set(_ARRAY_SPECS) - {"history_timestamps"} - set(arrays)
    if missing:
        raise ModelDirError(f"{path}: missing arrays {sorted(missing)}")
    want = manifest.get("arrays_sha256")
    if _digest({name: arrays[name] for name in SHARED_ARRAYS}) != want:
        raise ModelDirError(
            f"{path} does not match manifest arrays_sha256 {str(want)[:16]}...: the arrays were "
            "changed or damaged after training; retrain or restore the model directory"
        )
    for name, a in arrays.items():
        if name not in _ARRAY_SPECS:
            continue
        ndim, integer = _ARRAY_SPECS[name]
        kinds = "iu" if integer else "fiu"
        if a.dtype.kind not in kinds or a.ndim != ndim:
            raise ModelDirError(
                f"{path}: array {name} must be {ndim}-D {'integer' if integer else 'numeric'}, "
                f"got {a.ndim}-D {a.dtype}"
            )
        if not integer and not np.all(np.isfinite(a)):
            raise ModelDirError(f"{path}: array {name} contains NaN or inf")


def _check_history(path: Path, model: TrainedModel) -> None:
    indptr, items = model.history_indptr, model.history_items
    nnz = items.shape[0]
    if model.history_ratings.shape != items.shape:
        raise ModelDirError(f"{path}: history_ratings and history_items differ in length")
    if indptr[0] != 0 or indptr[-1] != nnz or np.any(np.diff(indptr) < 0):
        raise ModelDirError(f"{path}: history_indptr is not a CSR index of {nnz} ratings")
    if nnz and (items.min() < 0 or items.max() >= model.n_items):
        raise ModelDirError(
            f"{path}: history_items must lie in [0, {model.n_items}), "
            f"got range [{items.min()}, {items.max()}]"
        )


def _read_ids(path: Path) -> tuple[str, ...]:
    try:
        ids = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ModelDirError(f"{path}: cannot read ({e})") from e
    if not isinstance(ids, list) or not all(
        isinstance(i, str | int) and not isinstance(i, bool) for i in ids
    ):
        raise ModelDirError(f"{path}: expected a JSON list of id strings")
    out = tuple(str(i) for i in ids)
    if len(set(out)) != len(out):
        raise ModelDirError(f"{path}: ids are not distinct")
    return out


def load_model_dir(model_dir: str | os.PathLike[str]) -> TrainedModel:
    """Load a model directory written by :func:`save_model_dir`.

    Checks the format version, the arrays against the manifest's ``arrays_sha256``, every array's
    type, shape and finiteness, and the history index ranges; anything wrong is a
    :class:`ModelDirError` naming the file."""
    root = Path(model_dir)
    manifest = read_manifest(root)
    scale = _rating_scale(root, manifest)
    path = root / ARRAYS
    arrays = _read_arrays(path)
    if manifest["format_version"] == LEGACY_FORMAT_VERSION:
        user_ids = _read_ids(root / USERS)
    else:
        user_ids = _read_shards(root, manifest, arrays)
    _check_arrays(path, arrays, manifest)
    item_ids = _read_ids(root / ITEMS)
    try:
        model = TrainedModel(
            lrs=LRSModel.from_arrays(arrays),
            **{name: arrays[name] for name in _ARRAY_FIELDS},
            global_mean=float(arrays["global_mean"]),
            user_ids=user_ids,
            item_ids=item_ids,
            rating_min=float(scale[0]),
            rating_max=float(scale[1]),
            manifest=manifest,
            history_timestamps=arrays.get("history_timestamps"),
            onboarding_prior=_prior_from_arrays(path, arrays, manifest),
        )
    except ValueError as e:
        if isinstance(e, ModelDirError):
            raise
        raise ModelDirError(f"{root}: inconsistent model files: {e}") from e
    _check_history(path, model)
    try:
        onboarding_schedule(manifest)
    except ValueError as e:
        raise ModelDirError(f"{root / MANIFEST}: {e}") from e
    return model


def _read_shards(
    root: Path, manifest: dict[str, Any], arrays: dict[str, np.ndarray]
) -> tuple[str, ...]:
    """Format 2: every shard read (and checked) into the per-user arrays of format 1 (added to
    ``arrays``); returns the user ids."""
    from lrs_rec.model_shards import PER_USER_ARRAYS, iter_user_shards

    stray = sorted(set(arrays) & set(PER_USER_ARRAYS))
    if stray:  # format 2 keeps per-user data out of arrays.npz
        raise ModelDirError(f"{root / ARRAYS}: per-user arrays {stray} in a format-2 directory")
    parts: dict[str, list[np.ndarray]] = {name: [] for name in PER_USER_ARRAYS}
    ids: list[str] = []
    offset = 0
    for shard in iter_user_shards(root, manifest):
        ids.extend(shard.user_ids)
        parts["W"].append(shard.W)
        parts["B_idx"].append(shard.B_idx)
        parts["B_val"].append(shard.B_val)
        parts["user_bias"].append(shard.user_bias)
        parts["history_indptr"].append(shard.history_indptr[:-1] + offset)
        parts["history_items"].append(shard.history_items)
        parts["history_ratings"].append(shard.history_ratings)
        if shard.history_timestamps is not None:
            parts["history_timestamps"].append(shard.history_timestamps)
        offset += int(shard.history_indptr[-1])
    parts["history_indptr"].append(np.array([offset], dtype=np.int64))
    for name, chunks in parts.items():
        if chunks:
            arrays[name] = np.concatenate(chunks) if len(chunks) > 1 else chunks[0]
    if len(set(ids)) != len(ids):
        raise ModelDirError(f"{root}: user ids are not distinct across the shards")
    return tuple(ids)


def _rating_scale(root: Path, manifest: dict[str, Any]) -> list[float]:
    scale = manifest.get("rating_scale")
    if not (
        isinstance(scale, list)
        and len(scale) == 2
        and all(isinstance(v, int | float) and not isinstance(v, bool) for v in scale)
        and all(np.isfinite(scale))
    ):
        raise ModelDirError(f"{root / MANIFEST}: rating_scale must be [min, max], got {scale!r}")
    return [float(scale[0]), float(scale[1])]


_PER_USER_ATTRS = frozenset(
    {
        "lrs",
        "user_bias",
        "user_ids",
        "history_indptr",
        "history_items",
        "history_ratings",
        "history_timestamps",
        "user_history",
        "user_history_by_time",
        "history_by_time",
        "population_theta",
        "predict",
    }
)


@dataclass(frozen=True, eq=False)
class SharedModel:
    """The part of a model directory a server needs (:func:`load_shared_model_dir`): the shared
    arrays (U, item features and biases, μ, the population prior), the item ids, the manifest, the
    stored onboarding prior and a compact user-id index — no user's parameters or rating history.
    Its size does not depend on the number of users except for ``users`` ((longest id + 4) bytes
    per user).

    The per-user attributes of :class:`TrainedModel` (``lrs``, ``user_bias``, ``user_ids``, the
    histories, ``user_history``, ``predict``, ...) are there too for tools and tests: the first one
    read loads the whole directory (:func:`load_model_dir`, checked to be the same model) and keeps
    it. The service never reads them (except the training history of a version published without
    histories)."""

    root: Path
    U: np.ndarray  # (d, r)
    item_features: np.ndarray  # (n_items, d)
    item_bias: np.ndarray  # (n_items,)
    global_mean: float
    w_prior_mean: np.ndarray  # (r,)
    w_prior_cov: np.ndarray  # (r, r)
    item_ids: tuple[str, ...]
    users: UserIndex
    sparsity: int  # k
    rating_min: float
    rating_max: float
    manifest: dict[str, Any] = field(default_factory=dict)
    onboarding_prior: OnboardingPrior | None = None
    _full: list[TrainedModel] = field(default_factory=list, init=False, repr=False)

    def __getattr__(self, name: str) -> Any:
        if name not in _PER_USER_ATTRS:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        return getattr(self.full(), name)

    def full(self) -> TrainedModel:
        """The whole model directory (per-user arrays included), loaded once on first call."""
        if not self._full:
            model = load_model_dir(self.root)
            if model.manifest.get("arrays_sha256") != self.manifest.get("arrays_sha256"):
                raise ModelDirError(f"{self.root}: no longer holds model {self.model_version!r}")
            self._full[:] = [model]
        return self._full[0]

    def user_index(self) -> UserIndex:
        return self.users

    @property
    def d(self) -> int:
        return int(self.U.shape[0])

    @property
    def rank(self) -> int:
        return int(self.U.shape[1])

    @property
    def n_users(self) -> int:
        return len(self.users)

    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    @property
    def model_version(self) -> str:
        return str(self.manifest.get("model_version", ""))

    def item_index(self) -> dict[str, int]:
        return {it: i for i, it in enumerate(self.item_ids)}


def load_shared_model_dir(model_dir: str | os.PathLike[str]) -> SharedModel:
    """The shared part of a model directory, read without any per-user array: only the members
    :data:`SHARED_ARRAYS` and :data:`PRIOR_ARRAYS` of arrays.npz are read (an .npz member is read
    on access), users.json becomes a compact :class:`~lrs_rec.user_index.UserIndex`. The same checks
    as :func:`load_model_dir` on what it reads (format version, arrays_sha256 and
    onboarding_prior_sha256, dtypes, shapes, finiteness)."""
    root = Path(model_dir)
    manifest = read_manifest(root)
    scale = _rating_scale(root, manifest)
    path = root / ARRAYS
    try:
        npz = np.load(path, allow_pickle=False)
        if not isinstance(npz, np.lib.npyio.NpzFile):
            raise ValueError("not an .npz archive")
        with npz as z:
            names = [n for n in (*SHARED_ARRAYS, *PRIOR_ARRAYS, "B_idx") if n in z.files]
            arrays = {n: z[n] for n in names if n != "B_idx"}
            if manifest["format_version"] == LEGACY_FORMAT_VERSION:
                k = _sparsity(z, manifest) if "B_idx" in names else None
            else:  # format 2: no per-user array in arrays.npz, k is in the manifest's dims
                k = _sparsity(None, manifest)
    except FileNotFoundError as e:
        raise ModelDirError(f"{path}: missing") from e
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, zlib.error) as e:
        why = "not a numeric .npz archive" if "pickle" in str(e) else str(e)
        raise ModelDirError(f"{path}: damaged or not a model array file ({why})") from None
    missing = [n for n in SHARED_ARRAYS if n not in arrays]
    if missing or k is None:
        raise ModelDirError(f"{path}: missing arrays {sorted(missing or ['B_idx'])}")
    want = manifest.get("arrays_sha256")
    if _digest({name: arrays[name] for name in SHARED_ARRAYS}) != want:
        raise ModelDirError(
            f"{path} does not match manifest arrays_sha256 {str(want)[:16]}...: the arrays were "
            "changed or damaged after training; retrain or restore the model directory"
        )
    for name in SHARED_ARRAYS:
        a = arrays[name]
        ndim, _ = _ARRAY_SPECS[name]
        if a.dtype.kind not in "fiu" or a.ndim != ndim or not np.all(np.isfinite(a)):
            raise ModelDirError(
                f"{path}: array {name} must be {ndim}-D numeric and finite, got {a.ndim}-D {a.dtype}"
            )
    item_ids = _read_ids(root / ITEMS)
    user_index = load_user_index(root, manifest)
    U, F = arrays["U"], arrays["item_features"]
    r = U.shape[1]
    checks = {
        "item_features rows": (F.shape[0], len(item_ids)),
        "item_features cols": (F.shape[1], U.shape[0]),
        "item_bias": (arrays["item_bias"].shape[0], len(item_ids)),
        "w_prior_mean": (arrays["w_prior_mean"].shape[0], r),
        "w_prior_cov rows": (arrays["w_prior_cov"].shape[0], r),
    }
    for name, (got, want_n) in checks.items():
        if got != want_n:
            raise ModelDirError(f"{root}: {name}: length {got} does not match expected {want_n}")
    shared = SharedModel(
        root=root,
        U=U,
        item_features=F,
        item_bias=arrays["item_bias"],
        global_mean=float(arrays["global_mean"]),
        w_prior_mean=arrays["w_prior_mean"],
        w_prior_cov=arrays["w_prior_cov"],
        item_ids=item_ids,
        users=user_index,
        sparsity=k,
        rating_min=scale[0],
        rating_max=scale[1],
        manifest=manifest,
        onboarding_prior=_prior_from_arrays(path, arrays, manifest),
    )
    try:
        onboarding_schedule(manifest)
    except ValueError as e:
        raise ModelDirError(f"{root / MANIFEST}: {e}") from e
    return shared


def _sparsity(z: Any, manifest: dict[str, Any]) -> int:
    """k without reading B_idx's data: the manifest's dims, else the .npy header of B_idx."""
    dims = manifest.get("dims")
    if isinstance(dims, dict) and isinstance(dims.get("sparsity"), int):
        return int(dims["sparsity"])
    if z is None:
        raise ModelDirError("manifest.json: dims.sparsity is missing")
    return int(z["B_idx"].shape[1])  # a directory without dims (none is written so): read it


def read_user_ids(
    model_dir: str | os.PathLike[str], manifest: dict[str, Any] | None = None
) -> tuple[str, ...]:
    """Every user id of a model directory, position = dense index (format 1: ``users.json``;
    format 2: the shards' ``user_id`` column, nothing else of them read)."""
    root = Path(model_dir)
    manifest = read_manifest(root) if manifest is None else manifest
    if manifest.get("format_version") == LEGACY_FORMAT_VERSION:
        return _read_ids(root / USERS)
    from lrs_rec.model_shards import read_user_ids as shard_ids

    return tuple(shard_ids(root, manifest))


def load_user_index(
    model_dir: str | os.PathLike[str], manifest: dict[str, Any] | None = None
) -> UserIndex:
    """The compact id -> dense index map of a model directory's users (either format)."""
    root = Path(model_dir)
    manifest = read_manifest(root) if manifest is None else manifest
    try:
        if manifest.get("format_version") == LEGACY_FORMAT_VERSION:
            return UserIndex.read(root / USERS)
        from lrs_rec.model_shards import read_user_id_bytes

        return UserIndex.from_utf8(*read_user_id_bytes(root, manifest))
    except ModelDirError:
        raise
    except (OSError, ValueError) as e:
        where = root / USERS if manifest.get("format_version") == LEGACY_FORMAT_VERSION else root
        raise ModelDirError(f"{where}: cannot read the user ids ({e})") from e


def onboarding_schedule(manifest: dict[str, Any]) -> list[tuple[int, OnboardingConfig]]:
    """The model's onboarding hyperparameters: ``manifest["onboarding"]["schedule"]`` (a list of
    ``[min_n, {config}]``) or ``manifest["onboarding"]["config"]`` (one config for every n) if the
    manifest carries one, else :data:`lrs_rec.onboarding.DEFAULT_SCHEDULE`. Checked when a model
    directory is loaded, so that a bad entry fails ``publish`` / ``serve``, not an onboarding."""
    raw = manifest.get("onboarding", {})
    if not isinstance(raw, dict):
        raise ValueError(f"onboarding must be an object, got {raw!r}")
    try:
        if "schedule" in raw:
            schedule = sorted(
                ((int(n), OnboardingConfig(**cfg)) for n, cfg in raw["schedule"]),
                key=lambda step: step[0],
            )
            check_min_ns([n for n, _ in schedule])  # what ScheduledOnboarder will require
            return schedule
        if "config" in raw:
            return [(1, OnboardingConfig(**raw["config"]))]
    except (TypeError, ValueError) as e:
        raise ValueError(f"onboarding.schedule/config is invalid: {e}") from e
    return list(DEFAULT_SCHEDULE)
