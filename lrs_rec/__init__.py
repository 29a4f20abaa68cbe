"""lrs_rec — core maths of low-rank + sparse personalisation (AMHT-LRS). numpy/scipy only."""

from lrs_rec.amht import AMHTLRS
from lrs_rec.model import LRSModel
from lrs_rec.synthetic import make_synthetic
from lrs_rec.thresholding import hard_threshold

__all__ = ["AMHTLRS", "LRSModel", "hard_threshold", "make_synthetic"]
