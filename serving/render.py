"""The JSON of a ``/v1/recommend`` answer, written straight from item indices and float32 scores.

``recommend_json(top)`` gives the same bytes as orjson's encoding of the answer's dict
(``reference_recommend_json``, its slow twin in the tests) at about half the cost: each item's
``{"item_id": ..., "score":`` prefix is encoded once per loaded model (:func:`item_fragments`), the
scores are encoded in one orjson call over the float64 array (orjson writes a numpy float64 as it
writes the Python float of the same value), and the answer is one ``bytes.join`` — no dict, tuple
or float object per item.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import numpy as np
import orjson

if TYPE_CHECKING:
    from lrs_rec.serving.recommender import RecommendResult, TopItems

_NUMPY = orjson.OPT_SERIALIZE_NUMPY
_SEP = b"},"  # every fragment starts with the previous item's closing brace and a comma


def item_fragments(item_ids: Iterable[Any]) -> list[bytes]:
    """Per item: ``},{"item_id":<id>,"score":`` (the first item of an answer drops the ``},``)."""
    return [b'},{"item_id":' + orjson.dumps(str(i)) + b',"score":' for i in item_ids]


def recommend_json(top: TopItems) -> bytes:
    """The answer of ``/v1/recommend`` for ``top`` (keys in the order of the reference)."""
    head = b'{"user_id":' + orjson.dumps(top.user_id) + b',"items":['
    tail = (
        b'],"personalized":'
        + (b"true" if top.personalized else b"false")
        + b',"model_version":'
        + orjson.dumps(top.model_version)
        + b"}"
    )
    n = int(top.items.size)
    if n == 0:
        return head + tail
    numbers = orjson.dumps(top.scores.astype(np.float64), option=_NUMPY)[1:-1].split(b",")
    fragments = top.loaded.json_items
    parts: list[bytes] = [b""] * (2 * n)
    if n == 1:
        parts[0] = fragments[int(top.items[0])]
    else:
        parts[0::2] = operator.itemgetter(*top.items.tolist())(fragments)
    parts[1::2] = numbers
    parts[0] = parts[0][len(_SEP) :]
    return head + b"".join(parts) + b"}" + tail


def reference_recommend_json(result: RecommendResult) -> bytes:
    """The slow, obvious twin: the answer's dict encoded by orjson."""
    return orjson.dumps(
        {
            "user_id": result.user_id,
            "items": [{"item_id": i, "score": s} for i, s in result.items],
            "personalized": result.personalized,
            "model_version": result.model_version,
        }
    )
