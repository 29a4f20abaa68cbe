"""argparse value types that refuse out-of-range numbers with a message naming the range.

argparse turns the ``ArgumentTypeError`` into ``lrs-rec CMD: error: argument --flag: ...``, exit 2.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable


def int_in(lo: int, hi: int | None = None) -> Callable[[str], int]:
    """An integer in [lo, hi] (no upper bound when ``hi`` is None)."""

    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if v < lo or (hi is not None and v > hi):
            want = f"between {lo} and {hi}" if hi is not None else f"at least {lo}"
            raise argparse.ArgumentTypeError(f"must be {want}, got {v}")
        return v

    parse.__name__ = "int"  # argparse names the type in its own messages
    return parse


def finite_float(
    *, lo: float = -math.inf, lo_open: bool = False, hi: float = math.inf, hi_open: bool = False
) -> Callable[[str], float]:
    """A finite float ≥ ``lo`` (> ``lo`` when ``lo_open``) and ≤ ``hi`` (< ``hi`` when ``hi_open``)."""

    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        low = v < lo or (lo_open and v == lo)
        high = v > hi or (hi_open and v == hi)
        if not math.isfinite(v) or low or high:
            bounds = []
            if lo > -math.inf:
                bounds.append(f"{'>' if lo_open else '≥'} {lo:g}")
            if hi < math.inf:
                bounds.append(f"{'<' if hi_open else '≤'} {hi:g}")
            bound = (" " + " and ".join(bounds)) if bounds else ""
            raise argparse.ArgumentTypeError(f"must be a finite number{bound}, got {text!r}")
        return v

    parse.__name__ = "float"
    return parse
