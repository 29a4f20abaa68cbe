"""serving — Redis-backed per-user parameters, ONNX Runtime scoring, HTTP service."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lrs_rec.serving.recommender import Recommender

__all__ = ["Recommender"]


def __getattr__(name: str) -> Any:  # lazy: ``import serving`` stays light for the CLI
    if name == "Recommender":
        from lrs_rec.serving.recommender import Recommender

        return Recommender
    raise AttributeError(f"module 'serving' has no attribute {name!r}")
