"""cupy.random for the stand-in: NumPy's generators, results in device memory."""

import numpy as _np

from . import _adopt, _check_surface


def _draw(fn):
    """NumPy's generator function ``fn`` returning device arrays; like CuPy's it takes a
    dtype (float32 or float64), which NumPy's RandomState methods do not."""
    def draw(*args, dtype=None, **kwargs):
        out = _np.asarray(fn(*args, **kwargs))
        return _adopt(out if dtype is None else out.astype(dtype))
    return draw


def __getattr__(name):
    _check_surface("cupy.random", name)
    return _draw(getattr(_np.random, name))


class RandomState:
    def __init__(self, seed=None):
        self._rs = _np.random.RandomState(seed)

    def __getattr__(self, name):
        _check_surface("cupy.random.RandomState", name)
        return _draw(getattr(self._rs, name))


def default_rng(seed=None):
    rng = _np.random.default_rng(seed)

    class _Generator:
        def __getattr__(self, name):
            return _draw(getattr(rng, name))
    return _Generator()
