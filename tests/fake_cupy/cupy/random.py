"""cupy.random for the stand-in: NumPy's generators, results in device memory."""

import numpy as _np

from . import _adopt, _check_surface


def __getattr__(name):
    _check_surface("cupy.random", name)
    fn = getattr(_np.random, name)
    return lambda *args, **kwargs: _adopt(_np.asarray(fn(*args, **kwargs)))


class RandomState:
    def __init__(self, seed=None):
        self._rs = _np.random.RandomState(seed)

    def __getattr__(self, name):
        _check_surface("cupy.random.RandomState", name)
        fn = getattr(self._rs, name)

        def draw(*args, dtype=None, **kwargs):
            # CuPy's generators take a dtype (float32 or float64) where NumPy's do not
            out = _np.asarray(fn(*args, **kwargs))
            return _adopt(out if dtype is None else out.astype(dtype))
        return draw


def default_rng(seed=None):
    rng = _np.random.default_rng(seed)

    class _Generator:
        def __getattr__(self, name):
            fn = getattr(rng, name)
            return lambda *args, **kwargs: _adopt(_np.asarray(fn(*args, **kwargs)))
    return _Generator()
