"""Shape-annotated array aliases used across lrs_rec (shapes are documented, not enforced)."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]
"""A float64 array; the shape is given in the docstring or name (e.g. ``U: (d, r)``)."""

Float32Array = npt.NDArray[np.float32]
IntArray = npt.NDArray[np.int64]
AnyFloatArray = npt.NDArray[np.floating]
