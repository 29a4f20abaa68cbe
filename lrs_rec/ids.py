"""The id rule shared by the rating loaders (training) and the service (serving): an id the service
refuses could be trained on but its user never updated, so both sides call :func:`id_problem`."""

from __future__ import annotations

import unicodedata

MAX_ID_LENGTH = 256
NON_PRINTABLE_CATEGORIES = ("Cc", "Cf", "Cs", "Co", "Cn")  # unicodedata categories refused in ids


def id_problem(s: str) -> str | None:
    """Why the onboarding service would refuse the non-empty id ``s`` (the shared id rule: the
    loaders and ``serving.onboarding`` call it), or None."""
    if len(s) > MAX_ID_LENGTH:
        return f"is {len(s)} characters long; at most {MAX_ID_LENGTH} allowed"
    if "\ufffd" in s:  # what a decoder leaves for bytes that are not UTF-8 (e.g. "%FF" in a URL)
        return (
            f"contains U+FFFD at position {s.index(chr(0xFFFD))} (ids must be valid UTF-8: a "
            "replacement character merges distinct invalid ids)"
        )
    if not s.isprintable():  # the common case is printable: no NON_PRINTABLE_CATEGORIES character
        for pos, ch in enumerate(s):
            if unicodedata.category(ch) in NON_PRINTABLE_CATEGORIES:
                return f"contains a control or non-printable character {ch!r} at position {pos}"
    if s != s.strip():  # rating files' ids are stripped: no trained id has this
        return "has leading or trailing whitespace (ids in rating files are read stripped)"
    return None
