"""Compile the default training path's numba kernels in a background thread while the ratings load.

On a fresh checkout numba compiles the kernels (``training.kernels``, ``cache=True``) at their first
call: ≈ 12–17 CPU s of a first ``lrs-rec train`` on this machine, paid in the middle of the run. The
signatures the default pipeline calls are fixed (int32 item indices, int64 offsets, float64
ratings, float32 ALS factors; C-contiguous arrays), so :func:`start` compiles exactly those — from
the on-disk cache when it is warm (≈ 0.1 s), else from scratch — on a daemon thread started before
the ratings file is read. CSV parsing (pyarrow) and LLVM's code generation (called through ctypes)
both run without the GIL, so the two overlap; a kernel the trainer reaches before its compilation
has finished waits for it on numba's compiler lock, never compiles it twice. A failure here is only
logged: the first call compiles as before. ``tests/test_kernel_warmup.py`` checks that a default
``train`` calls no signature outside :func:`signatures`, so the list cannot silently drift.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

log = logging.getLogger(__name__)


def signatures() -> dict[str, list[tuple[Any, ...]]]:
    """Kernel name in ``training.kernels`` → the argument types the default pipeline calls it with."""
    from numba import types as t

    i64, f64, b = t.int64, t.float64, t.boolean

    def A(dtype: Any, ndim: int) -> Any:
        return t.Array(dtype, ndim, "C")

    offsets, idx32, vec, mat = A(i64, 1), A(t.int32, 1), A(f64, 1), A(f64, 2)
    als = (i64, i64, offsets, idx32, vec, A(t.float32, 2), vec, f64, f64, f64, f64, vec)
    fit_users = (
        i64, i64, offsets, idx32, vec, mat, mat, vec, f64, mat, A(t.int32, 2), mat, mat,
        vec, i64, b, f64, f64, f64, i64, mat, vec, vec, mat, b,
    )  # fmt: skip
    return {
        "_als_half_step_range": [(*als, A(t.float32, 2))],
        "_als_half_step_cg_range": [(*als, A(t.float32, 2), i64)],
        "_fit_users_range": [fit_users],
        "fit_items": [(offsets, idx32, vec, mat, vec, f64, f64, f64, mat)],
        "rating_dots": [(idx32, idx32, mat, mat, vec)],
        "user_projected_means": [(offsets, idx32, mat, mat, mat)],
        # the two counting sorts of lex_order (history order, by-item CSR): minor, then major
        "_stable_counting_pass": [
            (idx32, i64, t.none, idx32),
            (idx32, i64, idx32, A(t.intp, 1)),
        ],
        "_bias_half_step_range": [(i64, i64, offsets, idx32, vec, f64, vec, f64, vec)],
    }


def compile_all() -> float:
    """Compile (or load from numba's cache) every listed signature now; returns the seconds taken."""
    from lrs_rec.training import kernels

    t0 = time.perf_counter()
    for name, sigs in signatures().items():
        dispatcher = getattr(kernels, name)
        for sig in sigs:
            dispatcher.compile(sig)
    return time.perf_counter() - t0


def _run() -> None:
    try:
        seconds = compile_all()
        log.debug("numba kernels ready after %.1f s", seconds)
    except Exception as e:  # best effort: the first call compiles as it always did
        log.debug("kernel warm-up skipped: %s", e)


def start() -> threading.Thread:
    """Start :func:`compile_all` on a daemon thread and return it."""
    thread = threading.Thread(target=_run, name="lrs-kernel-warmup", daemon=True)
    thread.start()
    return thread
