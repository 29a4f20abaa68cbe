"""Score items with the exported ONNX graph (``MODEL_DIR/model.onnx``) in ONNX Runtime.

:class:`OnnxScorer` takes a user's compressed parameters (w_u, c_u, b_u as indices + values) and
scores candidate items or returns the top-n over all items, never materialising θ_u = U·w_u + b_u
(paper Eq. 1–2). Its slow, obvious twins :func:`reference_score` / :func:`reference_topn` compute
the same thing straight from :class:`~training.model_dir.TrainedModel` arrays in float64; the tests
compare the two.

Shapes: every per-user argument takes either one user (``w: (r,)``, ``user_bias`` a scalar,
``b_idx``/``b_val: (k,)``, ``items: (C,)``) or a batch (``w: (B, r)``, ``user_bias: (B,)``,
``b_idx``/``b_val: (B, k)``, ``items: (B, C)`` or ``(C,)`` shared by the batch). Results follow the
input: ``(C,)`` for one user, ``(B, C)`` for a batch. Item index -1 means an unknown item
(c_i = 0, f_i = 0) in :meth:`OnnxScorer.score`; it is never recommended by :meth:`OnnxScorer.topn`.

Top-n ranks by the *unclipped* score (so items tied at the rating-scale clip boundary keep their
order), ties going to the lower candidate position; the returned scores are clipped like
``TrainedModel.predict``. When fewer than n candidates are eligible (not excluded, not unknown) a
batch result is padded with ``-inf`` scores (the padded item indices are ineligible candidates);
a single-user result is simply shorter.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from lrs_rec.model_dir import TrainedModel

_PER_USER = ["w", "user_bias", "b_idx", "b_val"]
_SESSIONS: dict[str, tuple[list[str], list[str]]] = {
    # name: (inputs, outputs) of the sub-graph of model.onnx that the session runs
    "score": ([*_PER_USER, "items"], ["scores"]),
    "topn": ([*_PER_USER, "items", "n", "exclude"], ["top_items", "top_scores"]),
    "all_topn": ([*_PER_USER, "n", "exclude"], ["all_top_items", "all_top_scores"]),
    "all_scores": (_PER_USER, ["all_scores"]),
}

# measured crossover (docs/export.md): C·k element gathers cost about as much as a full all-items
# pass once C reaches ~ n_items / 32
ALL_ITEMS_RATIO = 32

ExcludeArg = np.ndarray | Sequence[Sequence[int] | np.ndarray] | Sequence[int] | None


class OnnxScorer:
    """ONNX Runtime sessions over one exported scoring graph.

    One intra-op thread and sequential execution by default: a serving process scales by running
    more processes, and single-user requests are far too small to split across threads. Safe to
    call from several threads at once (ONNX Runtime sessions are; the scorer keeps no call state).
    """

    def __init__(
        self,
        onnx_path: str | os.PathLike[str],
        *,
        intra_op_threads: int = 1,
        expected_arrays_sha256: str | None = None,
    ) -> None:
        """Load ``onnx_path``. With ``expected_arrays_sha256`` (the model directory manifest's
        ``arrays_sha256``), refuse a graph exported from other arrays (a stale ``model.onnx``)."""
        import onnx
        import onnxruntime as ort

        if intra_op_threads < 1:
            raise ValueError(f"intra_op_threads must be >= 1, got {intra_op_threads}")
        self.onnx_path = Path(onnx_path)
        if not self.onnx_path.is_file():
            raise FileNotFoundError(f"{self.onnx_path}: ONNX model not found (run lrs-rec export)")
        try:
            model = onnx.load(str(self.onnx_path))
        except Exception as e:  # protobuf's DecodeError and friends: a damaged or foreign file
            raise ValueError(
                f"{self.onnx_path}: not a readable ONNX model ({type(e).__name__}: {e}); "
                f"re-export it with `lrs-rec export --model {self.onnx_path.parent}`"
            ) from e
        meta = {p.key: p.value for p in model.metadata_props}
        try:
            self.n_items = int(meta["n_items"])
            self.d = int(meta["d"])
            self.rank = int(meta["rank"])
            self.sparsity = int(meta["sparsity"])
            self.rating_min = float(meta["rating_min"])
            self.rating_max = float(meta["rating_max"])
            self.global_mean = float(meta["global_mean"])
            self.w_prior_mean = np.asarray(json.loads(meta["w_prior_mean"]), dtype=np.float32)
        except (KeyError, ValueError) as e:
            raise ValueError(
                f"{self.onnx_path}: not an lrs-rec scoring graph (metadata {e} missing or bad)"
            ) from e
        self.model_version = meta.get("model_version", "")
        self.arrays_sha256 = meta.get("arrays_sha256", "")
        if expected_arrays_sha256 is not None and self.arrays_sha256 != expected_arrays_sha256:
            raise ValueError(
                f"{self.onnx_path} was exported from arrays {self.arrays_sha256[:12] or '?'}…, "
                f"not {expected_arrays_sha256[:12]}…: stale export, run "
                f"`lrs-rec export --model {self.onnx_path.parent}`"
            )

        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # every session's inputs and outputs are graph inputs/outputs, which carry their value_info:
        # no shape inference (a full copy of the weights) is needed to extract the sub-graphs
        extractor = onnx.utils.Extractor(model)
        self._sessions: dict[str, Any] = {}
        self._runs: dict[str, Callable[[dict[str, np.ndarray]], list[np.ndarray]]] = {}
        for name, (inputs, outputs) in _SESSIONS.items():
            try:
                sub = extractor.extract_model(inputs, outputs)
                session = ort.InferenceSession(
                    sub.SerializeToString(), options, providers=["CPUExecutionProvider"]
                )
            except Exception as e:  # a graph with lrs-rec metadata but not our graph
                raise ValueError(
                    f"{self.onnx_path}: not an lrs-rec scoring graph (sub-graph {name!r}: "
                    f"{type(e).__name__}: {e})"
                ) from e
            self._sessions[name] = session
            self._runs[name] = _runner(session, outputs)
        # score() with at least this many candidates (none unknown) goes through the all-items graph
        self.all_items_from = max(1, self.n_items // ALL_ITEMS_RATIO)
        self._no_exclude = np.full((1, 1), -1, dtype=np.int64)

    # -- the population (non-personalised) model --------------------------------------------------
    def population_params(self) -> tuple[np.ndarray, float, np.ndarray, np.ndarray]:
        """``(w, user_bias, b_idx, b_val)`` of an unknown user: w = w_prior_mean, c_u = 0, b = 0."""
        return (
            self.w_prior_mean.copy(),
            0.0,
            np.arange(self.sparsity, dtype=np.int64),
            np.zeros(self.sparsity, dtype=np.float32),
        )

    # -- scoring ----------------------------------------------------------------------------------
    def score(self, w: Any, user_bias: Any, b_idx: Any, b_val: Any, items: Any) -> np.ndarray:
        """Clipped predictions of ``items`` (== ``TrainedModel.predict``), float32."""
        feeds, single = self._user_feeds(w, user_bias, b_idx, b_val)
        arr, lowest = self._items(items, feeds["w"].shape[0], "items")
        if lowest >= 0 and arr.shape[1] >= self.all_items_from:
            # many candidates: scoring every item (one MatMul + k row gathers) and picking the
            # candidates is cheaper than C·k element gathers
            (every,) = self._runs["all_scores"](feeds)
            if arr.shape[0] == every.shape[0]:
                scores = np.take_along_axis(every, arr, axis=1)
            else:
                scores = every[:, arr[0]]
        else:
            feeds["items"] = arr
            (scores,) = self._runs["score"](feeds)
        return np.asarray(scores[0] if single else scores)

    def score_all(self, w: Any, user_bias: Any, b_idx: Any, b_val: Any) -> np.ndarray:
        """Clipped predictions of every item, ``(n_items,)`` or ``(B, n_items)`` float32."""
        feeds, single = self._user_feeds(w, user_bias, b_idx, b_val)
        (scores,) = self._runs["all_scores"](feeds)
        return np.asarray(scores[0] if single else scores)

    def topn(
        self,
        w: Any,
        user_bias: Any,
        b_idx: Any,
        b_val: Any,
        n: int,
        *,
        candidates: Any = None,
        exclude: ExcludeArg = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """The ``n`` best items (int64 indices) and their clipped scores (float32), best first.

        ``candidates=None`` ranks every item (the fast all-items graph); otherwise only the given
        item indices. ``exclude`` lists item indices never returned (e.g. the user's rated items):
        one sequence for a single user, or per user a sequence / a ``(B, E)`` array padded with -1.
        """
        if isinstance(n, bool) or not isinstance(n, int | np.integer):
            raise ValueError(f"n must be an integer, got {n!r}")
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        feeds, single = self._user_feeds(w, user_bias, b_idx, b_val)
        batch = feeds["w"].shape[0]
        feeds["n"] = np.array([n], dtype=np.int64)
        feeds["exclude"] = self._exclude(exclude, batch, single)
        if candidates is None:
            top_items, top_scores = self._runs["all_topn"](feeds)
        else:
            feeds["items"] = self._items(candidates, batch, "candidates")[0]
            top_items, top_scores = self._runs["topn"](feeds)
        if single:
            items_1, scores_1 = top_items[0], top_scores[0]
            if scores_1.size and scores_1[-1] == -np.inf:  # drop the filler (sorted: it is last)
                keep = scores_1 > -np.inf
                return items_1[keep], scores_1[keep]
            return items_1, scores_1
        return np.asarray(top_items), np.asarray(top_scores)

    # -- input validation -------------------------------------------------------------------------
    def _user_feeds(
        self, w: Any, user_bias: Any, b_idx: Any, b_val: Any
    ) -> tuple[dict[str, np.ndarray], bool]:
        r, k = self.rank, self.sparsity
        w_arr = _float_array(w, "w")
        ub = _float_array(user_bias, "user_bias")
        bv = _float_array(b_val, "b_val")
        bi = _int_array(b_idx, "b_idx")
        single = w_arr.ndim == 1
        lead: tuple[int, ...] = () if single else w_arr.shape[:1]
        if w_arr.shape != (*lead, r) or (not single and lead[0] == 0):
            raise ValueError(f"w must have shape ({r},) or (B, {r}) with B >= 1, got {w_arr.shape}")
        if ub.shape != lead or bi.shape != (*lead, k) or bv.shape != (*lead, k):
            wanted = {"user_bias": lead, "b_idx": (*lead, k), "b_val": (*lead, k)}
            for name, arr in (("user_bias", ub), ("b_idx", bi), ("b_val", bv)):
                if arr.shape != wanted[name]:
                    raise ValueError(
                        f"{name} must have shape {wanted[name]} to match w {w_arr.shape}, "
                        f"got {arr.shape}"
                    )
        if not _all_finite(w_arr, ub, bv):
            for name, arr in (("w", w_arr), ("user_bias", ub), ("b_val", bv)):
                if not np.isfinite(arr).all():
                    raise ValueError(f"{name} contains NaN or inf")
        if k:
            lo, hi = _min_max(bi)
            if lo < 0 or hi >= self.d:
                raise ValueError(f"b_idx entries must lie in [0, {self.d}), got range [{lo}, {hi}]")
        if single:
            return {
                "w": w_arr.reshape(1, r),
                "user_bias": ub.reshape(1),
                "b_idx": bi.reshape(1, k),
                "b_val": bv.reshape(1, k),
            }, True
        return {"w": w_arr, "user_bias": ub, "b_idx": bi, "b_val": bv}, False

    def _items(self, items: Any, batch: int, name: str) -> tuple[np.ndarray, int]:
        arr = _int_array(items, name)
        if arr.ndim == 1:
            arr = arr[None, :]
        elif arr.ndim != 2 or arr.shape[0] not in (1, batch):
            raise ValueError(
                f"{name} must have shape (C,), (1, C) or (B={batch}, C), got {arr.shape}"
            )
        if arr.shape[1] == 0:
            raise ValueError(f"{name} must hold at least one item index")
        lo, hi = _min_max(arr)
        if lo < -1 or hi >= self.n_items:
            raise ValueError(
                f"{name} entries must lie in [-1, {self.n_items}) (-1 = unknown item), "
                f"got range [{lo}, {hi}]"
            )
        return arr, lo

    def _exclude(self, exclude: ExcludeArg, batch: int, single: bool) -> np.ndarray:
        if exclude is None:
            return self._no_exclude if batch == 1 else np.full((batch, 1), -1, dtype=np.int64)
        if single:
            arr = _int_array(exclude, "exclude")
            if arr.ndim != 1:
                raise ValueError(f"exclude must be 1-D for a single user, got shape {arr.shape}")
            arr = arr[None, :]
        elif isinstance(exclude, np.ndarray) and exclude.ndim == 2:
            arr = _int_array(exclude, "exclude")
            if arr.shape[0] != batch:
                raise ValueError(f"exclude must have {batch} rows (one per user), got {arr.shape}")
        else:
            rows = [_int_array(row, f"exclude[{i}]") for i, row in enumerate(exclude)]
            if len(rows) != batch:
                raise ValueError(f"exclude must have {batch} rows (one per user), got {len(rows)}")
            for i, row in enumerate(rows):
                if row.ndim != 1:
                    raise ValueError(f"exclude[{i}] must be 1-D, got shape {row.shape}")
            width = max(len(row) for row in rows)
            arr = np.full((batch, max(width, 1)), -1, dtype=np.int64)
            for i, row in enumerate(rows):
                arr[i, : len(row)] = row
        if arr.shape[1] == 0:
            return self._no_exclude if batch == 1 else np.full((batch, 1), -1, dtype=np.int64)
        lo, hi = _min_max(arr)
        if lo < -1 or hi >= self.n_items:
            raise ValueError(
                f"exclude entries must lie in [0, {self.n_items}) (or -1 as padding), "
                f"got range [{lo}, {hi}]"
            )
        return arr


# Validation is on the hot path of every request: for the few numbers of one user, plain Python on
# ``tolist()`` is several times cheaper than numpy reductions (about 1 µs each); big inputs use numpy.
_SMALL = 64


def _all_finite(w: np.ndarray, user_bias: np.ndarray, b_val: np.ndarray) -> bool:
    if w.size + b_val.size <= _SMALL:  # NaN and inf propagate through the sum
        return math.isfinite(
            sum(w.ravel().tolist()) + sum(b_val.ravel().tolist()) + sum(user_bias.ravel().tolist())
        )
    return bool(np.isfinite(w).all() and np.isfinite(user_bias).all() and np.isfinite(b_val).all())


def _min_max(arr: np.ndarray) -> tuple[int, int]:
    if arr.size <= _SMALL:
        values = arr.ravel().tolist()
        return min(values), max(values)
    return int(arr.min()), int(arr.max())


def _runner(
    session: Any, outputs: list[str]
) -> Callable[[dict[str, np.ndarray]], list[np.ndarray]]:
    """``feeds -> outputs`` for one session. The feeds are validated here already, so when the
    binding exposes it the C++ ``run`` is called directly, skipping the Python wrapper's second
    validation (about 5 µs a call, measured); otherwise the public ``InferenceSession.run``."""
    inner = getattr(session, "_sess", None)
    if inner is not None and callable(getattr(inner, "run", None)):
        run = inner.run
        return lambda feeds: run(outputs, feeds, None)
    return lambda feeds: session.run(outputs, feeds)


def _float_array(x: Any, name: str) -> np.ndarray:
    if type(x) is np.ndarray and x.dtype == np.float32:
        return x
    try:
        return np.asarray(x, dtype=np.float32)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name} must be numeric, got {type(x).__name__}: {e}") from e


def _int_array(x: Any, name: str) -> np.ndarray:
    arr = x if type(x) is np.ndarray else np.asarray(x)
    if arr.dtype == np.int64:
        return arr
    if arr.size == 0:
        return arr.astype(np.int64)
    if arr.dtype.kind not in "iu":
        raise ValueError(f"{name} must hold integer indices, got dtype {arr.dtype}")
    return arr.astype(np.int64)


# -- the slow, obvious reference twin (float64, straight from TrainedModel arrays) -------------------
_UserParams = tuple[np.ndarray, float, np.ndarray, np.ndarray]


def _reference_raw(model: TrainedModel, user: _UserParams, items: np.ndarray) -> np.ndarray:
    """Unclipped μ + c_u + c_i + ⟨f_i, θ_u⟩ with θ_u = U·w_u + b_u built densely (paper Eq. 2)."""
    w, user_bias, b_idx, b_val = user
    theta = np.asarray(model.lrs.U, dtype=np.float64) @ np.asarray(w, dtype=np.float64)
    for j, v in zip(b_idx, b_val, strict=True):
        theta[int(j)] += float(v)
    raw = np.empty(len(items))
    for c, i in enumerate(items):
        i = int(i)
        if i < 0:  # unknown item: c_i = 0, f_i = 0
            raw[c] = model.global_mean + user_bias
        else:
            f_i = np.asarray(model.item_features[i], dtype=np.float64)
            raw[c] = model.global_mean + user_bias + float(model.item_bias[i]) + f_i @ theta
    return raw


def _as_batch(w: Any, user_bias: Any, b_idx: Any, b_val: Any) -> tuple[list[_UserParams], bool]:
    w = np.asarray(w, dtype=np.float64)
    if w.ndim == 1:
        return [(w, float(user_bias), np.asarray(b_idx), np.asarray(b_val))], True
    ub, bi, bv = np.asarray(user_bias), np.asarray(b_idx), np.asarray(b_val)
    return [(w[u], float(ub[u]), bi[u], bv[u]) for u in range(w.shape[0])], False


def _rows(x: Any, batch: int) -> list[np.ndarray]:
    arr = np.asarray(x, dtype=np.int64)
    if arr.ndim == 1:
        return [arr] * batch
    return [arr[0]] * batch if arr.shape[0] == 1 else list(arr)


def reference_score(
    model: TrainedModel, w: Any, user_bias: Any, b_idx: Any, b_val: Any, items: Any
) -> np.ndarray:
    """Reference twin of :meth:`OnnxScorer.score` (float64, one user and one item at a time)."""
    users, single = _as_batch(w, user_bias, b_idx, b_val)
    out = np.array(
        [
            np.clip(_reference_raw(model, u, row), model.rating_min, model.rating_max)
            for u, row in zip(users, _rows(items, len(users)), strict=True)
        ]
    )
    return out[0] if single else out


def reference_topn(
    model: TrainedModel,
    w: Any,
    user_bias: Any,
    b_idx: Any,
    b_val: Any,
    n: int,
    *,
    candidates: Any = None,
    exclude: ExcludeArg = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Reference twin of :meth:`OnnxScorer.topn`: a full stable sort of the unclipped scores."""
    users, single = _as_batch(w, user_bias, b_idx, b_val)
    if candidates is None:
        candidates = np.arange(model.n_items)
    cand_rows = _rows(candidates, len(users))
    if exclude is None:
        excl_rows: list[Any] = [[] for _ in users]
    elif single:
        excl_rows = [exclude]
    else:
        excl_rows = list(exclude)
    items_out, scores_out = [], []
    for u, cand, excl in zip(users, cand_rows, excl_rows, strict=True):
        raw = _reference_raw(model, u, cand)
        banned = {int(e) for e in np.asarray(excl).ravel() if int(e) >= 0}
        eligible = np.array([int(i) >= 0 and int(i) not in banned for i in cand], dtype=bool)
        ranked = np.where(eligible, raw, -np.inf)
        order = np.argsort(-ranked, kind="stable")[: min(n, len(cand))]  # ties: lower position
        top_raw = ranked[order]
        clipped = np.where(
            np.isinf(top_raw), top_raw, np.clip(top_raw, model.rating_min, model.rating_max)
        )
        items_out.append(np.asarray(cand)[order])
        scores_out.append(clipped)
    if single:
        keep = scores_out[0] > -np.inf
        return items_out[0][keep], scores_out[0][keep]
    return np.array(items_out), np.array(scores_out)
