"""Block-parallel map for the trainer's independent per-block work (users, items), deterministic.

The user, item and ALS-initialisation steps solve every user's (item's) problem in blocks that do
not depend on each other. :func:`block_map` runs ``fn`` over the blocks on :func:`threads` worker
threads (numpy's batched solves and products release the GIL) and returns the results **in block
order**, so the caller combines them exactly as the one-thread loop does: the model is the same bit
for bit whatever the thread count. BLAS itself stays at one thread (serving.cli.blas_threads).

Compiled kernels: :func:`configure` ``(kernels=...)`` swaps the numpy code of the user / item steps,
the losses and the ALS initialisation for an injected backend (``lrs_rec.training.kernels``,
numba; the numpy code stays the reference), run on the same thread count (docs/scale.md, Kernels).

``lrs-rec train --threads N --memory-budget MB`` set both knobs for the command (:func:`configure`);
the command's default is every core the process may use (:func:`available_cores`); library callers
get one thread and the default block budget unless they call it. Measured at 100k users on 2 cores
the gain is modest (124 s / 110 s wall with 2 threads against 150 s / 144 s with 1, two runs in
either order; an earlier run under heavier shared load had 2 threads slower: docs/scale.md): the
blocks are many short numpy calls and the GIL between them serialises part of the work.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")
R = TypeVar("R")

_threads = 1
_kernels: Any = None  # None: the numpy reference code of lrs_rec.engine.steps
_KEEP: Any = object()
DEFAULT_MEMORY_BUDGET_MB = 256  # per worker thread: about 64 MB of block floats + their copies
BYTES_PER_BLOCK_FLOAT = 32  # a block's float is held ~4 times (gather, padded copy, product)


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity), at least 1."""
    import os

    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # platforms without sched_getaffinity
        return max(1, os.cpu_count() or 1)


def threads() -> int:
    return _threads


def kernels() -> Any:
    """The compiled kernels the engine calls instead of its numpy code (None: the numpy reference).
    Set by the trainer at start-up (``lrs_rec.training.kernels.install``); the core never imports
    them (it stays numpy/scipy only)."""
    return _kernels


def configure(
    *,
    n_threads: int | None = None,
    memory_budget_mb: float | None = None,
    kernels: Any = _KEEP,
) -> None:
    """Set the worker-thread count, the per-thread memory budget of block temporaries and the
    kernel backend (``kernels=None``: the numpy reference; an object with the methods of
    ``lrs_rec.training.kernels.NumbaKernels``: the compiled one, run on the same thread count)."""
    global _threads, _kernels
    from lrs_rec.engine import steps

    if n_threads is not None:
        if n_threads < 1:
            raise ValueError(f"--threads must be >= 1, got {n_threads}")
        _threads = int(n_threads)
        try:
            import pyarrow as pa

            pa.set_cpu_count(_threads)  # the CSV reader's threads
        except ImportError:
            pass
    if memory_budget_mb is not None:
        if not memory_budget_mb >= 16:
            raise ValueError(f"--memory-budget must be at least 16 (MB), got {memory_budget_mb}")
        steps.BLOCK_FLOATS = int(memory_budget_mb * (1 << 20) / BYTES_PER_BLOCK_FLOAT)
        steps.ROW_CHUNK = max(1 << 12, steps.BLOCK_FLOATS // 8)
    if kernels is not _KEEP:
        _kernels = kernels
    if _kernels is not None and (n_threads is not None or kernels is not _KEEP):
        _kernels.set_threads(_threads)


def block_map(fn: Callable[[T], R], blocks: Iterable[T]) -> Iterable[R]:
    """``fn`` over ``blocks``, results in block order (lazily, one block at a time, with one
    thread; with more, at most ``2 · threads`` blocks in flight)."""
    if _threads == 1:
        return map(fn, blocks)
    return _ordered_pool_map(fn, blocks, _threads)


def _ordered_pool_map(fn: Callable[[T], R], blocks: Iterable[T], n: int) -> Iterable[R]:
    from collections import deque

    with ThreadPoolExecutor(max_workers=n) as pool:
        pending: deque[object] = deque()
        for b in blocks:
            pending.append(pool.submit(fn, b))
            if len(pending) >= 2 * n:
                yield pending.popleft().result()  # type: ignore[attr-defined]
        while pending:
            yield pending.popleft().result()  # type: ignore[attr-defined]
