"""Is ``MODEL_DIR/model.onnx`` the servable graph of this model directory?

:func:`load_checked_scorer` is the one way serving loads a model's ONNX graph (``lrs-rec publish``
checks before it writes anything, ``serve`` at start and on every reload): the file must exist, its
sha256 must be the one ``lrs-rec export`` recorded in ``manifest.json`` (a truncated or replaced
file is refused), ONNX Runtime must load it, its metadata must name the manifest's
``arrays_sha256`` (a graph exported from another model is refused) and its dimensions must be the
manifest's. Every refusal is a :class:`ModelCheckError`: one line naming the file and the fix.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from lrs_rec.model_dir import MANIFEST, ONNX, read_manifest


class ModelCheckError(ValueError):
    """``model.onnx`` is missing, damaged, or not the graph of its model directory."""


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_checked_scorer(
    model_dir: str | os.PathLike[str],
    *,
    manifest: dict[str, Any] | None = None,
    intra_op_threads: int = 1,
) -> Any:
    """The :class:`~serving.onnx_scorer.OnnxScorer` of ``model_dir``, after every check above."""
    from lrs_rec.serving.onnx_scorer import OnnxScorer

    root = Path(model_dir)
    path = root / ONNX
    fix = f"run `lrs-rec export --model {root}`"
    if manifest is None:
        manifest = read_manifest(root)
    if not path.is_file():
        raise ModelCheckError(f"{path}: not found: {fix}")
    recorded = (manifest.get("onnx") or {}).get("sha256")
    if recorded:
        actual = file_sha256(path)
        if actual != recorded:
            raise ModelCheckError(
                f"{path}: sha256 {actual[:16]}… is not the {recorded[:16]}… that "
                f"{root / MANIFEST} records ({path.stat().st_size} bytes: truncated, replaced or "
                f"from another model): {fix}"
            )
    expected = str(manifest.get("arrays_sha256", "")) or None
    try:
        scorer = OnnxScorer(
            path, intra_op_threads=intra_op_threads, expected_arrays_sha256=expected
        )
    except ModelCheckError:
        raise
    except Exception as e:  # ONNX Runtime / protobuf errors of a damaged file: one line
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        if not msg.startswith(str(path)):
            msg = f"{path}: cannot be loaded ({type(e).__name__}: {msg})"
        raise ModelCheckError(f"{msg}; {fix}" if fix not in msg else msg) from e
    dims = manifest.get("dims") or {}
    for key, got in (
        ("n_items", scorer.n_items),
        ("d", scorer.d),
        ("rank", scorer.rank),
        ("sparsity", scorer.sparsity),
    ):
        want = dims.get(key)
        if want is not None and int(want) != int(got):
            raise ModelCheckError(
                f"{path}: graph has {key} = {got} but {root / MANIFEST} says {want}: {fix}"
            )
    return scorer
