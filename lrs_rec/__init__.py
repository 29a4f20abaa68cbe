"""lrs_rec — core maths of low-rank + sparse personalisation (AMHT-LRS). numpy/scipy only."""

from lrs_rec.amht import AMHTLRS
from lrs_rec.baselines import FullFineTuning, PromptLearning, RepresentationLearning, SingleModel
from lrs_rec.model import LRSModel
from lrs_rec.offline import OfflineModel, UserParameters, load_model
from lrs_rec.synthetic import make_synthetic
from lrs_rec.thresholding import hard_threshold

__all__ = [
    "AMHTLRS",
    "FullFineTuning",
    "LRSModel",
    "OfflineModel",
    "PromptLearning",
    "RepresentationLearning",
    "SingleModel",
    "UserParameters",
    "hard_threshold",
    "load_model",
    "make_synthetic",
]
