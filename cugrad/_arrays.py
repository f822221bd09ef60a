"""Moving data between host, device and other libraries."""

from __future__ import annotations

import numbers
import reprlib

import numpy as np

from . import _backend
from ._checks import (_DLPACK_CPU, _to_backend_array, describe, dlpack_device_type,
                      unwrap_parameter)

DEFAULT_DTYPE = np.dtype(np.float32)
_OP_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))   # the float dtypes ops take


def asarray(x, *, device=None, dtype=None):
    """An array cugrad's ops accept: a NumPy array on "cpu", a CuPy array on "cuda".

    ``x`` may be a NumPy or CuPy array, a GPU array exposing ``__cuda_array_interface__``
    or DLPack (a PyTorch CUDA tensor: no copy), a DLPack CPU array, or a list/scalar of real
    numbers. ``device`` defaults to where the data already lives. ``dtype`` defaults to a
    dtype the ops take: float32 and float64 data keep theirs, in native byte order ('>f4'
    becomes float32); a wider float (longdouble) becomes float64; anything else (float16,
    integers, bools) becomes float32. An explicit numeric ``dtype`` is used as given (int64
    for class indices), for values it can hold: a ValueError, not a wrapped or truncated
    value, for a whole number outside an integer dtype's range, NaN, inf or a fraction into
    an integer dtype, or a finite value that a narrower float would make infinite. Copies
    only when the device, dtype or byte order changes. An ndarray subclass comes back as a
    plain ndarray (np.matrix: its 2-D data, without a copy).

    TypeError for data that is not real numbers (None, strings, objects that are not
    numbers, complex unless ``dtype`` is complex: pass ``x.real`` or ``abs(x)``) and for a
    masked array, whose mask would be lost (pass ``x.filled(value)``, or ``np.asarray(x)``
    to drop the mask knowingly).
    """
    x = unwrap_parameter(x)
    if dtype is not None:
        try:
            dtype = np.dtype(dtype)
        except TypeError as exc:
            raise TypeError(f"asarray: dtype={dtype!r} is not a NumPy dtype ({exc})") from None
        if dtype.kind not in "biufc":
            raise TypeError(f"asarray: dtype={dtype} is not numeric; expected a float dtype "
                            "(float32 or float64), or an integer dtype for class indices")
    if (isinstance(x, np.ndarray) or _backend.is_gpu_array(x)
            or dlpack_device_type(x) is not None):
        arr = _to_backend_array("asarray", "x", x)     # a subclass: a plain view; masks refused
    else:
        try:
            arr = np.asarray(x)
        except ValueError as exc:   # ragged nesting
            raise ValueError(f"asarray: argument 'x' ({_what(x)}) is not a rectangular "
                             f"array of numbers ({exc})") from None
    arr = _real_numbers(x, arr, dtype)
    if dtype is None:
        dtype = _op_dtype(arr.dtype)
    _check_representable(arr, dtype)
    target = _backend.device_of(arr) if device is None else _backend.normalize_device(device)
    if target == "cpu":
        return to_numpy(arr).astype(dtype, copy=False)
    return _backend.cuda_backend().xp.asarray(arr, dtype=dtype)


def _real_numbers(x, arr, dtype):
    """``arr`` if it holds real numbers (an object array of numbers converted to a numeric
    one); else a TypeError naming what ``x`` is."""
    kind = arr.dtype.kind
    if kind in "biuf" or (kind == "c" and dtype is not None and dtype.kind == "c"):
        return arr
    if kind == "c":
        raise TypeError(f"asarray: argument 'x' is complex ({_what(x)}); cugrad's ops take "
                        "real numbers: pass x.real or abs(x), or an explicit complex dtype")
    if kind == "O":
        try:
            inferred = np.array(arr.tolist())
        except ValueError:          # ragged nesting inside the objects
            inferred = arr
        if inferred.dtype.kind in "biuf":
            return inferred
        if all(isinstance(v, numbers.Real) for v in arr.flat):    # Fraction, huge ints
            try:
                return arr.astype(np.float64)
            except OverflowError:   # an int beyond float64's range
                raise ValueError(f"asarray: argument 'x' holds a number beyond float64's "
                                 f"range ({_what(x)})") from None
    raise TypeError(f"asarray: argument 'x' must hold real numbers, got {_what(x)}")


def _rounds_to_infinity(dtype: np.dtype) -> float:
    """The smallest magnitude that rounding to the float ``dtype`` makes infinite: its
    largest finite value plus half a unit in the last place there (a tie rounds to the even
    neighbour, which is infinity: the largest value's last bit is 1). Below it a value rounds
    to at most the largest finite one (65519 becomes 65504 in float16; 65520 is inf)."""
    info = np.finfo(dtype)
    return float(info.max) + 2.0 ** (info.maxexp - info.nmant - 2)


def _check_representable(arr, dtype: np.dtype) -> None:
    """ValueError unless every value of ``arr`` survives the conversion to ``dtype``: an
    integer dtype takes only whole numbers in its range (no NaN, inf or fraction: a label
    -1 cast to uint8 would be the valid class 255), a float dtype keeps every finite value
    finite. A cast NumPy calls safe (float32 to float64, int32 to int64) is not read."""
    src = arr.dtype
    if (dtype.kind in "bc" or src.kind == "b" or not arr.size
            or np.can_cast(src, dtype, "safe")):
        return
    xp = np if isinstance(arr, np.ndarray) else _backend.cuda_backend().xp
    problem = None
    if dtype.kind in "iu":
        if src.kind == "f":
            if not bool(xp.isfinite(arr).all()):
                problem = "NaN or infinity"
            elif not bool((arr == xp.trunc(arr)).all()):
                problem = "a fraction"
        if problem is None:
            info = np.iinfo(dtype)
            lo, hi = arr.min().item(), arr.max().item()     # Python numbers: exact compares
            if lo < info.min or hi > info.max:
                problem = (f"{lo if lo < info.min else hi}, outside its range [{info.min}, "
                           f"{info.max}]")
    elif dtype.kind == "f" and src.kind == "f":
        finite = arr[xp.isfinite(arr)]
        if finite.size and float(xp.abs(finite).max()) >= _rounds_to_infinity(dtype):
            problem = "a finite value too large for it (it would become infinity)"
    elif dtype.kind == "f" and src.kind in "iu":      # 70000 in float16, say
        lo, hi = arr.min().item(), arr.max().item()     # Python ints: exact compares
        if max(-lo, hi) >= _rounds_to_infinity(dtype):
            problem = (f"{lo if -lo > hi else hi}, too large for it (it would become "
                       "infinity)")
    if problem is not None:
        raise ValueError(f"asarray: argument 'x' ({_what(arr)}) cannot be converted to "
                         f"{dtype}: it holds {problem}")


def _op_dtype(dt: np.dtype) -> np.dtype:
    """The float dtype an op takes for data of dtype ``dt`` (asarray's default)."""
    if dt.kind == "f":
        native = dt.newbyteorder("=")
        if native in _OP_FLOATS:
            return native
        return np.dtype(np.float64) if dt.itemsize >= 8 else DEFAULT_DTYPE
    return DEFAULT_DTYPE


def _what(x) -> str:
    if x is None:
        return "None"
    if hasattr(x, "shape") and hasattr(x, "dtype"):
        return describe(x)
    return f"{type(x).__name__} {reprlib.repr(x)}"


def to_numpy(x) -> np.ndarray:
    """A host NumPy array of ``x`` (a copy from the GPU, or ``x`` itself on the host). Other
    GPU arrays (``__cuda_array_interface__`` or a CUDA ``__dlpack__``) come through CuPy,
    as ``asarray`` takes them; a Parameter is its data."""
    x = unwrap_parameter(x)
    if isinstance(x, np.ndarray):
        return x
    if _backend.is_cupy_array(x):
        return x.get()
    if _backend.is_gpu_array(x):
        return _to_backend_array("to_numpy", "x", x).get()
    if dlpack_device_type(x) == _DLPACK_CPU:   # a PyTorch CPU tensor: its own errors named
        return _to_backend_array("to_numpy", "x", x)
    arr = np.asarray(x)
    if arr.dtype == object and not isinstance(x, (list, tuple)):
        # np.asarray wraps any object in a 0-d object array: not the array it was asked for
        raise TypeError(f"to_numpy: argument 'x' must be array data (a NumPy, CuPy or "
                        f"DLPack array, a list or a number), got {_what(x)}")
    return arr
