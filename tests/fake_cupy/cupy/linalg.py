"""cupy.linalg for the stand-in: NumPy's, on device operands."""

import numpy as _np

from . import _check_surface, _compute


def __getattr__(name):
    _check_surface("cupy.linalg", name)
    fn = getattr(_np.linalg, name)
    return lambda *args, **kwargs: _compute(f"cupy.linalg.{name}", fn, args, kwargs)
