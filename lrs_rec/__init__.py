"""lrs_rec — core maths of low-rank + sparse personalisation (AMHT-LRS). numpy/scipy only."""

from lrs_rec.model import LRSModel
from lrs_rec.thresholding import hard_threshold

__all__ = ["LRSModel", "hard_threshold"]
