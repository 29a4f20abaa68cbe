"""Duplicate keys in a JSON request body.

JSON parsers disagree on ``{"user_id": "a", "user_id": "b"}`` (first wins, last wins, error), so a
proxy and the service could read different users from one body. The service refuses it: the routes
parse with pydantic-core (which keeps the last) and then :func:`duplicate_key` names the first
repeated key, for a 422.
"""

from __future__ import annotations

import json
from typing import Any


def duplicate_key(body: bytes | str) -> str | None:
    """The first key that occurs twice in one object of ``body`` (a JSON document), else None —
    also for a body that is not JSON (its parser reports that)."""
    found: list[str] = []

    def hook(pairs: list[tuple[str, Any]]) -> None:
        if not found and len(pairs) > 1:
            seen: set[str] = set()
            for key, _ in pairs:
                if key in seen:
                    found.append(key)
                    break
                seen.add(key)

    try:
        json.loads(body, object_pairs_hook=hook)
    except (ValueError, RecursionError):
        return None
    return found[0] if found else None
