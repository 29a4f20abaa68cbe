"""Export the shared weights of a trained model to one ONNX scoring graph (``MODEL_DIR/model.onnx``).

The graph scores candidate items for a batch of users from their compressed per-user parameters
(paper Eq. 1–2: θ_u = U·w_u + b_u, b_u k-sparse) without ever materialising θ_u::

    raw(u, i)    = (μ + c_i) + c_u + ⟨FU_i, w_u⟩ + Σ_j F[i, b_idx_uj] · b_val_uj      (FU = F·U)
    scores(u, i) = clip(raw(u, i), rating_min, rating_max)       == TrainedModel.predict(u, i)

Inputs (B users, C candidates, k sparse coordinates, E exclusions; B, C, E dynamic):

    w          float32 [B, r]     low-rank coefficients w_u (unknown user: w_prior_mean)
    user_bias  float32 [B]        c_u (unknown user: 0)
    b_idx      int64   [B, k]     coordinates of b_u in [0, d)
    b_val      float32 [B, k]     values of b_u (unknown user: 0)
    items      int64   [B|1, C]   candidate item indices in [-1, n_items); -1 = unknown item
                                  (c_i = 0, f_i = 0). A leading dim of 1 shares the candidates.
    n          int64   [1]        how many top items to return (clamped to C)
    exclude    int64   [B, E]     item indices never returned by the top-n, padded with -1

Outputs:

    scores      float32 [B, C]    clipped predictions (the reference ``TrainedModel.predict``)
    top_items   int64   [B, N]    item indices ranked by the *unclipped* score, N = min(n, C);
                                  ties go to the lower candidate position (ONNX TopK)
    top_scores  float32 [B, N]    clipped predictions of ``top_items``; ``-inf`` marks filler when
                                  fewer than N candidates are eligible (excluded or unknown items)

Design: every item table has one extra all-zero row at index n_items, so ``Gather`` with index -1
(which ONNX wraps to the last row) gives the unknown item with no extra nodes. ``item_offset`` folds
μ into the item bias (μ + c_i). Exclusion scatters ``-inf`` into a per-user [B, n_items + 1] mask whose
last slot (unknown item / -1 padding) is always ``-inf``; the candidates' mask entries are added to the
raw score before ``TopK``, so unknown candidates never rank above a real item.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import onnx

    from lrs_rec.model_dir import SharedModel, TrainedModel

DEFAULT_OPSET = 17
SUPPORTED_OPSETS = (17, 18)
IR_VERSION = 8  # opset 17/18 need IR >= 8; 8 keeps the file loadable by older onnxruntime
GRAPH_NAME = "lrs_rec_scoring"
MAX_WEIGHT_BYTES = 2**31 - 2**26  # protobuf's 2 GiB message limit, minus headroom for the graph
PRODUCER = "lrs-rec"

INPUT_NAMES = ("w", "user_bias", "b_idx", "b_val", "items", "n", "exclude")
OUTPUT_NAMES = (
    "scores",
    "top_items",
    "top_scores",
    "all_scores",
    "all_top_items",
    "all_top_scores",
)


def _f32(a: Any) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(a, dtype=np.float64).astype(np.float32))


def _basis(model: TrainedModel | SharedModel) -> tuple[np.ndarray, int]:
    """(U, k) of a trained model or of a directory's shared part (read without its users)."""
    from lrs_rec.model_dir import SharedModel

    if isinstance(model, SharedModel):
        return model.U, int(model.sparsity)
    return model.lrs.U, int(model.lrs.sparsity)


def scoring_tables(model: TrainedModel | SharedModel) -> dict[str, np.ndarray]:
    """The initializers of the scoring graph, computed in float64 and cast once to float32.

    Each item table has one extra row at index n_items (reached by index -1): zeros (the unknown
    item) in the candidate tables, ``-inf`` in ``all_item_offset`` so it never ranks.
    """
    F = np.asarray(model.item_features, dtype=np.float64)
    U = np.asarray(_basis(model)[0], dtype=np.float64)
    n_items, d = F.shape
    FU = F @ U  # item-side product: ⟨f_i, U·w⟩ = ⟨(F·U)_i, w⟩
    offset = float(model.global_mean) + np.asarray(model.item_bias, dtype=np.float64)
    mask = np.zeros((1, n_items + 1))
    mask[0, n_items] = -np.inf
    F_pad = np.vstack([F, np.zeros((1, d))])
    FU_pad = np.vstack([FU, np.zeros((1, U.shape[1]))])
    return {
        # the two big tables, shared by both paths: FU row-major (rows gathered for candidates,
        # Gemm with transB for all items) and Fᵀ (k rows gathered for all items, flat scalar
        # gathers at b_idx·(n_items + 1) + item for candidates)
        "item_lowrank": _f32(FU_pad),  # (n_items + 1, r)
        "item_features_t": _f32(F_pad.T),  # (d, n_items + 1)
        "item_offset": _f32(np.append(offset, float(model.global_mean))),  # (n_items + 1,)
        "all_item_offset": _f32(np.append(offset, -np.inf)),  # (n_items + 1,)
        "exclude_mask_base": _f32(mask),  # (1, n_items + 1)
    }


def build_scoring_graph(
    model: TrainedModel | SharedModel, *, opset: int = DEFAULT_OPSET
) -> onnx.ModelProto:
    """The ONNX scoring graph of ``model`` (see the module docstring for inputs and outputs)."""
    from onnx import TensorProto, helper, numpy_helper

    if opset not in SUPPORTED_OPSETS:
        raise ValueError(f"opset must be one of {SUPPORTED_OPSETS}, got {opset}")
    tables = scoring_tables(model)
    U, k = _basis(model)
    n_items, (d, r) = model.n_items, U.shape
    size = sum(t.nbytes for t in tables.values())
    if size > MAX_WEIGHT_BYTES:
        raise ValueError(
            f"the scoring tables of {n_items} items (d={d}, r={r}) take {size / 2**30:.2f} GiB, "
            f"over the {MAX_WEIGHT_BYTES / 2**30:.2f} GiB a single-file ONNX model can hold"
        )

    def const(name: str, value: Any, dtype: Any) -> TensorProto:
        return numpy_helper.from_array(np.asarray(value, dtype=dtype), name)

    inits = [numpy_helper.from_array(v, k_) for k_, v in tables.items()]
    inits += [
        const("flat_shape", [-1], np.int64),
        const("row_stride", n_items + 1, np.int64),
        const("mask_cols", [n_items + 1], np.int64),
        const("n_items_1d", [n_items], np.int64),
        const("slice_start", [0], np.int64),
        const("rating_min", model.rating_min, np.float32),
        const("rating_max", model.rating_max, np.float32),
        const("neg_inf", -np.inf, np.float32),
        const("axes_1", [1], np.int64),
        const("axes_2", [2], np.int64),
    ]

    N = helper.make_node
    candidate_nodes = [
        # low rank: ⟨FU_i, w_u⟩ as a batched MatMul [B|1, C, r] @ [B, r, 1]
        N("Gather", ["item_lowrank", "items"], ["cand_lowrank"], axis=0),
        N("Unsqueeze", ["w", "axes_2"], ["w_col"]),
        N("MatMul", ["cand_lowrank", "w_col"], ["lowrank_col"]),
        # sparse: Σ_j F[i, b_idx_j]·b_val_j, scalars gathered from flat Fᵀ at b_idx_j·(n+1) + i
        # (i = -1 lands on the zero column n of row b_idx_j - 1, or wraps to the last element)
        N("Reshape", ["item_features_t", "flat_shape"], ["features_flat"]),
        N("Mul", ["b_idx", "row_stride"], ["b_row_start"]),
        N("Unsqueeze", ["b_row_start", "axes_1"], ["b_row_start_3d"]),
        N("Unsqueeze", ["items", "axes_2"], ["items_3d"]),
        N("Add", ["items_3d", "b_row_start_3d"], ["flat_idx"]),
        N("Gather", ["features_flat", "flat_idx"], ["cand_sparse"]),
        N("Unsqueeze", ["b_val", "axes_2"], ["b_val_col"]),
        N("MatMul", ["cand_sparse", "b_val_col"], ["sparse_col"]),
        N("Add", ["lowrank_col", "sparse_col"], ["dot_col"]),
        N("Squeeze", ["dot_col", "axes_2"], ["dot"]),
        # biases: (μ + c_i) + c_u
        N("Gather", ["item_offset", "items"], ["cand_offset"]),
        N("Unsqueeze", ["user_bias", "axes_1"], ["user_bias_col"]),
        N("Add", ["dot", "cand_offset"], ["dot_item"]),
        N("Add", ["dot_item", "user_bias_col"], ["raw"]),
        N("Clip", ["raw", "rating_min", "rating_max"], ["scores"]),
        # top-n: -inf for excluded/unknown candidates, rank by the unclipped score
        N("Shape", ["w"], ["batch_dim"], end=1),
        N("Concat", ["batch_dim", "mask_cols"], ["mask_shape"], axis=0),
        N("Expand", ["exclude_mask_base", "mask_shape"], ["mask_zero"]),
        N("Shape", ["exclude"], ["exclude_shape"]),
        N("Expand", ["neg_inf", "exclude_shape"], ["exclude_fill"]),
        N("ScatterElements", ["mask_zero", "exclude", "exclude_fill"], ["mask"], axis=1),
        N("Shape", ["raw"], ["raw_shape"]),
        N("Expand", ["items", "raw_shape"], ["cand_items"]),
        N("GatherElements", ["mask", "cand_items"], ["cand_mask"], axis=1),
        N("Add", ["raw", "cand_mask"], ["ranked"]),
        N("Shape", ["raw"], ["n_cand"], start=1),
        N("Min", ["n", "n_cand"], ["top_k"]),
        N("TopK", ["ranked", "top_k"], ["top_ranked", "top_pos"], axis=1, largest=1, sorted=1),
        N("GatherElements", ["cand_items", "top_pos"], ["top_items"], axis=1),
        N("Clip", ["top_ranked", "rating_min", "rating_max"], ["top_clipped"]),
        N("IsInf", ["top_ranked"], ["top_is_filler"], detect_positive=0),
        N("Where", ["top_is_filler", "top_ranked", "top_clipped"], ["top_scores"]),
    ]
    all_items_nodes = [
        # every item at once: w·FUᵀ + (μ + c) (one Gemm) + b_val·Fᵀ[b_idx] (k row gathers + MatMul)
        N("Gemm", ["w", "item_lowrank", "all_item_offset"], ["all_dot_item"], transB=1),
        N("Gather", ["item_features_t", "b_idx"], ["all_sparse_rows"], axis=0),
        N("Unsqueeze", ["b_val", "axes_1"], ["b_val_row"]),
        N("MatMul", ["b_val_row", "all_sparse_rows"], ["all_sparse_row"]),
        N("Squeeze", ["all_sparse_row", "axes_1"], ["all_sparse"]),
        N("Add", ["all_dot_item", "all_sparse"], ["all_dot"]),
        N("Unsqueeze", ["user_bias", "axes_1"], ["all_user_bias_col"]),
        N("Add", ["all_dot", "all_user_bias_col"], ["all_raw"]),  # [B, n_items + 1]
        N("Slice", ["all_raw", "slice_start", "n_items_1d", "axes_1"], ["all_raw_items"]),
        N("Clip", ["all_raw_items", "rating_min", "rating_max"], ["all_scores"]),
        # exclusions: -inf written straight into the raw scores (-1 padding hits the sink slot)
        N("Shape", ["exclude"], ["all_exclude_shape"]),
        N("Expand", ["neg_inf", "all_exclude_shape"], ["all_exclude_fill"]),
        N("ScatterElements", ["all_raw", "exclude", "all_exclude_fill"], ["all_ranked"], axis=1),
        N("Min", ["n", "n_items_1d"], ["all_top_k"]),
        N("TopK", ["all_ranked", "all_top_k"], ["all_top_ranked", "all_top_items"], axis=1),
        N("Clip", ["all_top_ranked", "rating_min", "rating_max"], ["all_top_clipped"]),
        N("IsInf", ["all_top_ranked"], ["all_top_is_filler"], detect_positive=0),
        N(
            "Where",
            ["all_top_is_filler", "all_top_ranked", "all_top_clipped"],
            ["all_top_scores"],
        ),
    ]
    F32, I64 = TensorProto.FLOAT, TensorProto.INT64
    inputs = [
        helper.make_tensor_value_info("w", F32, ["batch", r]),
        helper.make_tensor_value_info("user_bias", F32, ["batch"]),
        helper.make_tensor_value_info("b_idx", I64, ["batch", k]),
        helper.make_tensor_value_info("b_val", F32, ["batch", k]),
        helper.make_tensor_value_info("items", I64, ["items_batch", "candidates"]),
        helper.make_tensor_value_info("n", I64, [1]),
        helper.make_tensor_value_info("exclude", I64, ["batch", "n_exclude"]),
    ]
    outputs = [
        helper.make_tensor_value_info("scores", F32, ["batch", "candidates"]),
        helper.make_tensor_value_info("top_items", I64, ["batch", "top_n"]),
        helper.make_tensor_value_info("top_scores", F32, ["batch", "top_n"]),
        helper.make_tensor_value_info("all_scores", F32, ["batch", n_items]),
        helper.make_tensor_value_info("all_top_items", I64, ["batch", "all_top_n"]),
        helper.make_tensor_value_info("all_top_scores", F32, ["batch", "all_top_n"]),
    ]
    graph = helper.make_graph(
        candidate_nodes + all_items_nodes,
        GRAPH_NAME,
        inputs,
        outputs,
        initializer=inits,
        doc_string="lrs-rec scoring: clip(μ + c_u + c_i + ⟨f_i, U·w_u + b_u⟩) and top-n",
    )
    onnx_model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", opset)],
        producer_name=PRODUCER,
        ir_version=IR_VERSION,
        doc_string=__doc__.splitlines()[0] if __doc__ else "",
    )
    meta = {
        "model_version": model.model_version,
        "arrays_sha256": str(model.manifest.get("arrays_sha256", "")),
        "n_items": str(n_items),
        "d": str(d),
        "rank": str(r),
        "sparsity": str(k),
        "global_mean": repr(float(model.global_mean)),
        "rating_min": repr(float(model.rating_min)),
        "rating_max": repr(float(model.rating_max)),
        "w_prior_mean": json.dumps([float(x) for x in model.w_prior_mean]),
    }
    helper.set_model_props(onnx_model, meta)
    return onnx_model


def check_scoring_model(onnx_model: onnx.ModelProto) -> None:
    """ONNX checker (full check) and strict shape inference; raises on any problem."""
    import onnx

    onnx.checker.check_model(onnx_model, full_check=True)
    onnx.shape_inference.infer_shapes(onnx_model, check_type=True, strict_mode=True)


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp creates 0600: keep the replaced file's mode, else the usual rw-r--r--
        os.chmod(tmp, path.stat().st_mode & 0o777 if path.exists() else 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def export_onnx(
    model: TrainedModel | SharedModel, path: str | os.PathLike[str], *, opset: int = DEFAULT_OPSET
) -> Path:
    """Build, check and atomically write the scoring graph of ``model`` to ``path``."""
    onnx_model = build_scoring_graph(model, opset=opset)
    check_scoring_model(onnx_model)
    out = Path(path)
    _atomic_write_bytes(out, onnx_model.SerializeToString())
    return out


def export_model_dir(model_dir: str | os.PathLike[str], *, opset: int = DEFAULT_OPSET) -> Path:
    """Write ``MODEL_DIR/model.onnx`` and record ``{"onnx": {path, opset, sha256}}`` in the manifest.

    Both files are replaced atomically (write to a temp file, then rename), so a reader sees either
    the old or the new version, never a partial file.
    """
    from lrs_rec.model_dir import MANIFEST, ONNX, load_shared_model_dir

    root = Path(model_dir)
    model = load_shared_model_dir(root)  # the graph holds shared weights only: users not read
    out = export_onnx(model, root / ONNX, opset=opset)
    sha256 = hashlib.sha256(out.read_bytes()).hexdigest()
    manifest_path = root / MANIFEST
    manifest = json.loads(manifest_path.read_text())
    manifest["onnx"] = {
        "path": ONNX,
        "opset": opset,
        "sha256": sha256,
        "arrays_sha256": manifest.get("arrays_sha256", ""),
    }
    _atomic_write_bytes(
        manifest_path, (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()
    )
    return out


# -- CLI: lrs-rec export --model MODEL_DIR ---------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", required=True, metavar="MODEL_DIR", help="model directory to export"
    )
    parser.add_argument(
        "--opset",
        type=int,
        default=DEFAULT_OPSET,
        choices=SUPPORTED_OPSETS,
        help=f"ONNX opset (default {DEFAULT_OPSET})",
    )


def run(args: argparse.Namespace) -> int:
    try:
        out = export_model_dir(args.model, opset=args.opset)
    except (FileNotFoundError, ValueError):
        raise  # bad input: the dispatcher prints the message
    except OSError as e:  # e.g. a read-only model directory
        print(f"lrs-rec export: error: cannot write into {args.model}: {e}", file=sys.stderr)
        return 1
    manifest = json.loads((out.parent / "manifest.json").read_text())
    info = manifest["onnx"]
    print(
        f"wrote {out} (opset {info['opset']}, {out.stat().st_size} bytes, sha256 {info['sha256']})"
    )
    return 0
