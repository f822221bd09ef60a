"""Argument validation: the checks ``cugrad.functional`` (and ``nn``, ``optim``, ``graph``)
build their own from.

Every error names the op, the argument, what it got (type, shape, dtype, device) and what
was expected. After ``prepare`` the arrays are arrays of one backend and one float dtype.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import reprlib
import threading

import numpy as np

from . import _backend
from ._backend import (DLPACK_CUDA_DEVICES, Backend, dlpack_device_type,  # noqa: F401
                       is_cuda_dlpack)

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
_DLPACK_CPU = 1


def describe(x) -> str:
    """'numpy.ndarray of shape (3, 4), dtype float32, on cpu' (or the Python type)."""
    shape = getattr(x, "shape", None)
    dtype = getattr(x, "dtype", None)
    if shape is None or dtype is None:
        return f"{type(x).__module__}.{type(x).__qualname__} object"
    kind = f"{type(x).__module__.split('.')[0]}.{type(x).__name__}"
    device = _backend.device_of(unwrap_parameter(x))     # a Parameter: its data's
    return f"{kind} of shape {tuple(shape)}, dtype {dtype}, on {device}"


def numpy_dtype(x) -> np.dtype | None:
    """``x.dtype`` as a NumPy dtype; None without one, or where NumPy cannot read it
    (another library's dtype: torch.float32)."""
    dtype = getattr(x, "dtype", None)
    try:
        return None if dtype is None else np.dtype(dtype)
    except TypeError:
        return None


def unwrap_parameter(x):
    """A cugrad Parameter's array, anything else as it is: for the conversions
    (``to_numpy``, ``asarray``, a loaded state entry), which take a Parameter as its data
    on either device (``np.asarray`` reads a host one's ``__array__``; a device one has
    none NumPy may read)."""
    if type(x).__name__ != "Parameter":     # the cheap test first: no import on the way
        return x
    from .nn import Parameter
    return x.data if isinstance(x, Parameter) else x


def _to_backend_array(op: str, name: str, x):
    """NumPy and CuPy arrays pass through; other arrays come in without a copy through
    ``__cuda_array_interface__`` / DLPack; anything else is a TypeError."""
    if type(x) is np.ndarray or _backend.is_cupy_array(x):
        return x
    if isinstance(x, np.ndarray):
        return _plain_ndarray(op, name, x)
    if isinstance(x, np.generic):        # a NumPy scalar (x.sum()): the 0-d array it is
        return np.asarray(x)
    _refuse_negative_bit(op, name, x)
    if _backend.has_cuda_array_interface(x):
        return _gpu_import(op, name, x)
    device_type = dlpack_device_type(x)
    if device_type == _DLPACK_CPU:
        return _host_import(op, name, x)
    if device_type in DLPACK_CUDA_DEVICES:
        return _gpu_import(op, name, x)
    inner = getattr(x, "data", None)
    hint = ("pass its .data" if hasattr(inner, "shape") and hasattr(inner, "dtype")
            else "use cugrad.asarray() to convert lists and scalars")   # a Parameter: .data
    raise TypeError(
        f"{op}: argument {name!r} must be a NumPy or CuPy array (or a GPU array exposing "
        f"__cuda_array_interface__/DLPack), got {describe(x)}; {hint}")


def is_foreign_array(x) -> bool:
    """Another library's array that cugrad takes through the CUDA array interface or DLPack
    (a PyTorch tensor): not a NumPy array or scalar, not a CuPy array, and one whose DLPack
    device can be read. Objects with only ``__array__`` (h5py, xarray) are not: NumPy takes
    those as they are."""
    if isinstance(x, (np.ndarray, np.generic)) or _backend.is_cupy_array(x):
        return False
    return _backend.has_cuda_array_interface(x) or dlpack_device_type(x) is not None


def import_foreign(op: str, name: str, x):
    """``x`` as it is, or, where it is another library's array (``is_foreign_array``: a
    PyTorch tensor, whose dtype NumPy may not read), as the NumPy or CuPy array the ops take
    it as (``_to_backend_array``; its errors are the caller's to keep or to pass on)."""
    return _to_backend_array(op, name, x) if is_foreign_array(x) else x


def _plain_ndarray(op: str, name: str, x: np.ndarray) -> np.ndarray:
    """An ndarray subclass as a plain ndarray view (np.matrix, np.memmap, ...): the ops do
    their own arithmetic, so a subclass's operators must not leak into it. A masked array is
    refused: its mask would be ignored."""
    refuse_masked(op, f"argument {name!r}", x)
    return x.view(np.ndarray)


def refuse_masked(where: str, what: str, x) -> None:
    """TypeError if ``x`` is a NumPy masked array: cugrad would use its data and ignore its
    mask. ``what`` names it in the message ("argument 'x'", "data", "key 'weight'")."""
    if isinstance(x, np.ma.MaskedArray):
        raise TypeError(
            f"{where}: {what} is a masked array ({describe(x)}); cugrad would ignore its "
            "mask: pass .filled(value), or np.asarray() of it to drop the mask knowingly")


def _refuse_negative_bit(op: str, name: str, x) -> None:
    """A PyTorch tensor with its negative bit set (``torch.conj(z).imag``, a lazily negated
    view) holds minus the values in its memory, and PyTorch's ``__dlpack__`` exports that
    memory as it is (seen with PyTorch 2.13.0; ``.numpy()`` refuses it): every element would
    come in with the wrong sign. Refused, naming ``resolve_neg()``."""
    is_neg = getattr(x, "is_neg", None)
    if callable(is_neg) and is_neg() is True:
        raise TypeError(f"{op}: argument {name!r} ({describe(x)}) is a lazily negated view "
                        "(its negative bit is set) that DLPack would export without the "
                        f"negation; pass {name}.resolve_neg()")


def _host_import(op: str, name: str, x) -> np.ndarray:
    """A host DLPack array (a PyTorch CPU tensor) as a NumPy array over its memory. What the
    export raises becomes a TypeError naming the argument: the exporter's refusal (a
    tensor that requires grad, a conjugated view: BufferError) or a dtype NumPy has not
    (bfloat16: NumPy's RuntimeError)."""
    try:
        return np.from_dlpack(x)
    except BufferError as exc:
        raise TypeError(f"{op}: argument {name!r} ({describe(x)}) refuses to share its "
                        f"memory: {exc}") from exc
    except (RuntimeError, TypeError, ValueError) as exc:
        raise TypeError(f"{op}: argument {name!r} ({describe(x)}) cannot be read through "
                        f"DLPack ({type(exc).__name__}: {exc}); expected float32 or float64 "
                        "data (integer class indices)") from exc


def _gpu_import(op: str, name: str, x):
    if not _backend.cuda_available():
        raise _backend.BackendUnavailableError(
            f"{op}: argument {name!r} is a GPU array ({describe(x)}) but the CUDA backend is "
            f"unavailable: {_backend.cuda_unavailable_reason()}")
    from .backends.cuda.interop import ExportRefused, InterfaceRefused, to_cupy
    try:
        return to_cupy(x)
    except InterfaceRefused as exc:
        raise TypeError(f"{op}: argument {name!r} is a GPU array ({describe(x)}): "
                        f"{exc}") from None
    except ExportRefused as exc:
        raise TypeError(f"{op}: argument {name!r} is a GPU array ({describe(x)}) that refuses "
                        f"to share its memory: {exc}") from exc.__cause__


def prepare(op: str, arrays: dict, *, ints: tuple[str, ...] = (),
            optional: tuple[str, ...] = ()) -> tuple[Backend, dict]:
    """Convert every entry of ``arrays`` to a backend array, check that they share one
    device and that the float ones share one dtype, float32 or float64. Entries named in
    ``ints`` are exempt from the float dtype rule (class-index targets); entries named in
    ``optional`` may be None (and stay None), any other None is a TypeError."""
    # The common case first, at a fraction of the general path's cost (the NumPy backend's
    # training step is a few dozen ops): plain NumPy arrays of one float dtype.
    dtype = None
    for name, v in arrays.items():
        if v is None:
            if name in optional:
                continue
            break
        if type(v) is not np.ndarray or (name not in ints and (
                v.dtype is not dtype if dtype is not None else v.dtype not in FLOAT_DTYPES)):
            break
        if dtype is None and name not in ints:
            dtype = v.dtype
    else:
        if dtype is not None or any(v is not None for v in arrays.values()):
            return _backend.numpy_backend(), arrays
    for name, v in arrays.items():
        if v is None and name not in optional:
            raise TypeError(
                f"{op}: argument {name!r} is required: expected a NumPy or CuPy array, got "
                "None")
    out = {k: (None if v is None else _to_backend_array(op, k, v)) for k, v in arrays.items()}
    present = [(k, v) for k, v in out.items() if v is not None]
    first_name, first = present[0]
    device = _backend.device_of(first)
    for name, arr in present[1:]:
        if _backend.device_of(arr) != device:
            raise ValueError(
                f"{op}: argument {name!r} is on {_backend.device_of(arr)} ({describe(arr)}) but "
                f"{first_name!r} is on {device} ({describe(first)}); move both to one device "
                "with cugrad.asarray(x, device=...) or Module.to(device)")
    dtype = None
    for name, arr in present:
        if name in ints:
            continue
        if arr.dtype not in FLOAT_DTYPES:
            swapped = arr.dtype.kind == "f" and arr.dtype.newbyteorder("=") in FLOAT_DTYPES
            raise TypeError(
                f"{op}: argument {name!r} has dtype {arr.dtype} ({describe(arr)}); expected "
                "float32 or float64" + (" in the machine's byte order (this one is "
                "byte-swapped, as data read from a big-endian file can be; "
                "cugrad.asarray(x) converts it)" if swapped else ""))
        if dtype is None:
            dtype, dtype_name = arr.dtype, name
        elif arr.dtype != dtype:
            raise TypeError(
                f"{op}: argument {name!r} has dtype {arr.dtype} ({describe(arr)}) but "
                f"{dtype_name!r} has dtype {dtype}; all float arguments of one call must share "
                "a dtype (convert with .astype)")
    return _backend.backend_for_device(device), out


def check_ndim(op: str, name: str, x, ndim: int, meaning: str = "") -> None:
    if x.ndim != ndim:
        what = f" {meaning}" if meaning else ""
        raise ValueError(f"{op}: argument {name!r} must be {ndim}-D{what}, got {describe(x)}")


def check_min_ndim(op: str, name: str, x, ndim: int) -> None:
    if x.ndim < ndim:
        raise ValueError(
            f"{op}: argument {name!r} must have at least {ndim} dimension(s), got {describe(x)}")


def check_shape(op: str, name: str, x, expected: tuple, why: str) -> None:
    if tuple(x.shape) != tuple(expected):
        raise ValueError(
            f"{op}: argument {name!r} has shape {tuple(x.shape)}, expected {tuple(expected)} "
            f"({why})")


def check_flag(op: str, name: str, value) -> bool:
    """A bool (or NumPy bool) argument, as a bool."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{op}: {name} must be a bool, got {type(value).__name__} {value!r}")
    return bool(value)


def check_choice(op: str, name: str, value, choices) -> None:
    """``value`` is one of ``choices`` (strings, and None where allowed): compared only when
    it is a str or None, so an array or another object is refused, not compared
    element-wise."""
    if not (value is None or isinstance(value, str)) or value not in choices:
        raise ValueError(
            f"{op}: {name}={value!r} is not supported; expected one of "
            f"{', '.join(repr(c) for c in choices)}")


# Checks that read array values (NaN targets, class-index ranges) copy a result to the host,
# which waits for the device: impossible while a CUDA graph is being captured. The capture
# (cugrad.graph) runs them eagerly on its example inputs first, then turns them off for its
# thread with ``device_value_checks_skipped()``.
_value_checks = threading.local()


@contextlib.contextmanager
def device_value_checks_skipped():
    """In this thread, within the block, skip the checks that read array values (they
    would synchronise the host); shape, dtype and device checks still run."""
    previous = getattr(_value_checks, "skipped", False)
    _value_checks.skipped = True
    try:
        yield
    finally:
        _value_checks.skipped = previous


def _value_checks_on() -> bool:
    return not getattr(_value_checks, "skipped", False)


def check_no_nan(op: str, name: str, x, xp) -> None:
    if _value_checks_on() and bool(xp.isnan(x).any()):
        raise ValueError(f"{op}: argument {name!r} contains NaN ({describe(x)}); targets must "
                         "be numbers")


def check_class_indices(op: str, name: str, target, classes: int) -> None:
    """Every class index of ``target`` in [0, classes). Skipped under
    ``device_value_checks_skipped()``: the kernels then give an out-of-range row a NaN loss
    and gradient instead of reading out of bounds."""
    if not _value_checks_on():
        return
    dtype = target.dtype
    if dtype.kind == "u" or (dtype.kind == "i" and dtype.isnative
                             and classes <= 2 ** (8 * dtype.itemsize - 1)):
        # One reduction (one device sync on the GPU) in the common case: read as unsigned,
        # a negative index is at least 2**(bits - 1), so above the class count (int8's -1
        # reads 255: for more than 128 classes only min/max can tell).
        unsigned = target if dtype.kind == "u" else target.view(f"u{dtype.itemsize}")
        if int(unsigned.max()) < classes:
            return
    lo, hi = int(target.min()), int(target.max())
    if lo < 0 or hi >= classes:
        bad = lo if lo < 0 else hi
        raise ValueError(f"{op}: {name} holds class index {bad}, out of range for {classes} "
                         f"classes; expected indices in [0, {classes - 1}]")


def _interval(low: float, high: float, low_open: bool, high_open: bool) -> str:
    """'>= 0.0', '> 0.0', 'in [0.0, 1.0)': the finite numbers between the bounds."""
    if math.isinf(high):
        return f"{'>' if low_open else '>='} {low}"
    return f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"


def check_scalar(op: str, name: str, value, *, low: float = 0.0, high: float = math.inf,
                 low_open: bool = False, high_open: bool = False) -> float:
    """A finite real scalar in [low, high] (either bound open when asked), as a float."""
    if (type(value) is float and -math.inf < value < math.inf   # the common case, finite
            and (low < value < high or (value == low and not low_open))):
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Real):   # np.bool_ is not Real
        raise TypeError(f"{op}: {name} must be a real number, got {type(value).__name__} "
                        f"{value!r}")
    try:
        v = float(value)
    except OverflowError:           # an int beyond float's range
        raise ValueError(f"{op}: {name}={value!r} is out of range; expected a finite number "
                         f"{_interval(low, high, low_open, high_open)}") from None
    if v == 0 and value != 0:       # Fraction(1, 10**400), longdouble 1e-400: not 0
        raise ValueError(f"{op}: {name}={reprlib.repr(value)} is too small to tell from 0 "
                         "(it rounds to 0 in float64); pass 0, or a normal number (magnitude "
                         ">= 2.2251e-308)")
    bad = (math.isnan(v) or v < low or v > high or (low_open and v == low)
           or (high_open and v == high) or (math.isinf(v)))
    if bad:
        raise ValueError(f"{op}: {name}={value!r} is out of range; expected a finite number "
                         f"{_interval(low, high, low_open, high_open)}")
    return v


def _extent(a) -> tuple[int, int]:
    """[first, last) byte addresses an array's elements span (a CuPy array's device memory)."""
    start = end = a.data.ptr
    for n, stride in zip(a.shape, a.strides):
        if stride < 0:
            start += (n - 1) * stride
        else:
            end += (n - 1) * stride
    return start, end + a.itemsize


def plain_numpy_update(arrays: dict, optional: tuple[str, ...] = ()) -> bool:
    """Whether the arrays of an in-place update (name -> array; ``grad`` is read, the
    others written) are the common case that passes every check of one at once: plain
    NumPy arrays of one float dtype and one shape, each written one C-contiguous and
    writable, and each owning its memory, so that distinct ones cannot overlap. Only names
    in ``optional`` may be None. False sends the arrays to the general checks, which accept
    or refuse them; none they would refuse passes here."""
    ref = None
    ids = set()
    present = 0
    for name, a in arrays.items():
        if a is None:
            if name in optional:
                continue
            return False
        present += 1
        if type(a) is not np.ndarray:
            return False
        if ref is None:
            if a.dtype not in FLOAT_DTYPES:
                return False
            ref = a
        elif a.dtype is not ref.dtype or a.shape != ref.shape:
            return False
        flags = a.flags
        if not flags.owndata or (name != "grad" and not (flags.c_contiguous and flags.writeable)):
            return False
        ids.add(id(a))
    return ref is not None and len(ids) == present       # no array twice


def shares_memory(a, b) -> bool:
    """Whether two non-empty arrays of one device may share memory: NumPy's bounds test, or
    the byte extents of device arrays."""
    if isinstance(a, np.ndarray):
        return bool(np.may_share_memory(a, b))
    (a0, a1), (b0, b1) = _extent(a), _extent(b)
    return a0 < b1 and b0 < a1


def exported_read_only(x) -> bool:
    """Whether ``x``, another library's GPU array, exports its memory as read-only through
    ``__cuda_array_interface__`` (``data = (ptr, True)``: JAX's arrays, which are immutable).
    CuPy drops the flag when it wraps the pointer, so an in-place update would write memory
    its owner promised nobody writes; NumPy and CuPy arrays say False."""
    if type(x) is np.ndarray or _backend.is_cupy_array(x):
        return False
    try:
        return bool(x.__cuda_array_interface__["data"][1])
    except Exception:            # no interface, or not one that says so: nothing to refuse
        return False


def check_no_overlap(op: str, arrays: dict) -> None:
    """No two of ``arrays`` (name -> array or None, one device) share memory: in-place
    updates of aliased state would read what they have just written."""
    present = [(k, v) for k, v in arrays.items() if v is not None and v.size]
    for i, (name_a, a) in enumerate(present):
        for name_b, b in present[i + 1:]:
            if shares_memory(a, b):
                raise ValueError(
                    f"{op}: arguments {name_a!r} and {name_b!r} share memory ({describe(a)}; "
                    f"{describe(b)}); each state array is updated in place and must be its "
                    "own array")
