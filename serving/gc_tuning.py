"""The garbage collector of a serving process: a young-generation threshold for requests in flight.

Measured (issue 16, ``bench/serving.py``'s recommend load at 16 clients, 10⁵-user model, under
shared load): with CPython's default threshold of 700 the collector took 60–360 µs of wall time per
``/v1/recommend`` — a young collection every ≈ 10 requests, and a full one every ≈ 1 000–2 000
walking the ≈ 10⁵ objects the process holds after loading (model metadata, ONNX Runtime
bindings, FastAPI's routes and schemas: 0.2–0.4 s each at that load). ``/healthz``, which finishes
within one loop step, triggered none. Recommend creates no reference cycles (checked with
``gc.DEBUG_SAVEALL``): the young collections come from the objects of the requests in flight
(waiting for Redis, queued for a micro-batch), more than 700 between them, which each collection
promotes towards the old generation only for them to die there by reference counting.

With a young threshold of :data:`YOUNG_THRESHOLD` those objects die before a collection looks at
them: one young collection in ≈ 12 000 recommends, none older (measured the same way). Cyclic
garbage is still collected, after at most that many new container objects (a few MB at most).
(``gc.freeze()`` after loading was tried as well: no further gain once the threshold is raised,
and frozen objects are never collected — an old model in a reference cycle would leak on every
reload — so it is not used.)
"""

from __future__ import annotations

import gc

YOUNG_THRESHOLD = 20_000


def tune_for_serving(young_threshold: int = YOUNG_THRESHOLD) -> None:
    """Raise the young generation's collection threshold (the older generations' stay)."""
    if young_threshold < 1:
        raise ValueError(f"young_threshold must be >= 1, got {young_threshold}")
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(young_threshold, older, oldest)
