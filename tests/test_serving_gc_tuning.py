"""``serving.gc_tuning.tune_for_serving``: what it changes in the collector (restored after)."""

from __future__ import annotations

import gc

import pytest
from lrs_rec.serving.gc_tuning import YOUNG_THRESHOLD, tune_for_serving


@pytest.fixture
def restore_gc():
    before = gc.get_threshold()
    yield
    gc.set_threshold(*before)


def test_tune_for_serving_raises_only_the_young_threshold(restore_gc):
    older = gc.get_threshold()[1:]
    tune_for_serving()
    assert gc.get_threshold() == (YOUNG_THRESHOLD, *older)
    # cyclic garbage made after tuning is still collected
    cycle: list[object] = []
    cycle.append(cycle)
    del cycle
    assert gc.collect() >= 1


def test_tune_for_serving_refuses_a_bad_threshold(restore_gc):
    with pytest.raises(ValueError, match="young_threshold must be >= 1"):
        tune_for_serving(0)
