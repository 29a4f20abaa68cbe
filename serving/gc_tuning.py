"""The garbage collector of a serving process, tuned once the model is loaded.

Measured (issue 16, ``bench/serving.py``'s recommend load at 16 clients, 10⁵-user model): with
CPython's defaults the collector took 60–360 µs of wall time per ``/v1/recommend`` under shared
load — a full collection every ~1 000–2 000 requests walked the ≈ 10⁵ objects the process holds
after loading (model metadata, ONNX Runtime bindings, FastAPI's routes and schemas: ≈ 0.2–0.4 s
each), and a young collection ran every ~10 requests because the requests in flight (waiting for
Redis, queued for a micro-batch) hold more than 700 container objects between them, which the
collections promoted towards the old generation only for them to die there. ``/healthz``, which
finishes within one loop step, triggered none. Recommend creates no reference cycles (checked with
``gc.DEBUG_SAVEALL``), so this is pure overhead:

* :func:`gc.freeze` moves everything alive after loading into the permanent generation, which
  collections no longer walk (what a model reload later allocates is collected as usual);
* a young-generation threshold of :data:`YOUNG_THRESHOLD` instead of 700 lets the objects of the
  requests in flight die by reference counting before a collection looks at them. Cyclic garbage
  still gets collected, after at most that many new container objects (a few MB at most).
"""

from __future__ import annotations

import gc

YOUNG_THRESHOLD = 20_000


def tune_for_serving(young_threshold: int = YOUNG_THRESHOLD) -> None:
    """Collect once, freeze what survives, raise the young generation's threshold."""
    if young_threshold < 1:
        raise ValueError(f"young_threshold must be >= 1, got {young_threshold}")
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(young_threshold, older, oldest)
