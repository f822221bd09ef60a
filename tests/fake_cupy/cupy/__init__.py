"""A stand-in for CuPy that runs on the CPU: NumPy memory, kernels on the CPU harness.

Test code only (see tests/fake_cupy/README.md). Put ``tests/fake_cupy`` first on
``sys.path`` (``CUGRAD_FAKE_CUPY=1`` does it in tests/conftest.py) and ``import cupy``
finds this package: cugrad's CUDA backend, layers, optimisers and graph capture then run
their host code against it, and every ``RawModule`` kernel runs, unchanged, on the CPU
harness of tests/cuda_harness.

It is strict where CuPy is strict, because its purpose is to find host code that would
fail on a real GPU before a GPU session spends its time on it:

* Only names the real CuPy has exist here: every attribute, function and method is checked
  against ``surface.json``, a record of CuPy 14.2's names (``tests/test_fake_cupy.py``
  re-reads the real CuPy where it imports). ``flags.writeable`` is an AttributeError, as on
  CuPy.
* A device array never turns into a NumPy array by accident: ``np.asarray(x)`` is a
  TypeError, NumPy arrays are refused as operands and by the array functions; ``.get()``
  copies to the host.
* Reductions give 0-d device arrays, not NumPy scalars.
* Kernel launches, fills and copies go to the current stream; while that stream captures a
  graph they are recorded, not run, and replayed by ``Graph.launch``. Anything that waits
  for the device during a capture (``.get()``, ``float(x)``, ``synchronize``) raises
  ``CUDARuntimeError`` as CUDA does. A computation that makes a new array (``x * 2``, a
  copy) is recorded too: its output is allocated at capture and written at each replay.
* Allocations come from memory pools (256-byte aligned, counted in ``used_bytes``);
  ``cupy.cuda.using_allocator`` and ``ndarray(shape, dtype, memptr)`` work on raw addresses.

What it cannot show: timing, concurrency between streams (all work runs in order on one
host thread), device memory limits, and anything inside NVRTC or the CUDA driver.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import json
import operator
import threading
import weakref
from pathlib import Path

import numpy as _np

__version__ = "14.2.0"   # the CuPy version whose surface this package follows
FAKE = True              # the one name the real CuPy lacks: tells tests where they run

_HERE = Path(__file__).resolve().parent
SURFACE: dict = json.loads((_HERE.parent / "surface.json").read_text())


class FakeCupyError(RuntimeError):
    """Something the stand-in cannot imitate (not an error a real GPU would raise)."""


def _check_surface(where: str, name: str) -> None:
    if name not in SURFACE[where]:
        raise AttributeError(f"fake cupy: {where} has no attribute {name!r} (neither has CuPy "
                             f"{SURFACE['cupy_version']})")


def _strict(key: str):
    """A ``__getattr__`` for a stand-in class: a name the real class lacks is an
    AttributeError, a name it has but the stand-in does not imitate is a FakeCupyError."""
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        _check_surface(key, name)
        raise FakeCupyError(f"fake cupy: {key}.{name} is not imitated")
    return __getattr__


# --------------------------------------------------------------------------- the stream

class _State(threading.local):
    def __init__(self):
        self.streams: list = []          # `with stream:` stack
        self.allocators: list = []       # `using_allocator` stack


_state = _State()


def _current_stream():
    from . import cuda
    return _state.streams[-1] if _state.streams else cuda.Stream.null


def _capturing() -> bool:
    return _current_stream()._capture is not None


def _submit(work) -> None:
    """Device work in stream order: run now, or record into the graph being captured."""
    stream = _current_stream()
    if stream._capture is not None:
        stream._capture.append(work)
    else:
        work()


_sync_count = [0]   # host/device synchronisations so far (events completed by them)


def _host_sync(what: str, streams=None) -> None:
    """A host/device synchronisation with ``streams`` (default: the current one): illegal
    while one of them captures, and that capture is invalidated, as in CUDA."""
    from .cuda import runtime
    for stream in list([_current_stream()] if streams is None else streams):
        if stream._capture is not None:
            stream._invalidated = True
            raise runtime.CUDARuntimeError(
                f"cudaErrorStreamCaptureUnsupported: operation not permitted when stream is "
                f"capturing ({what})")
    _sync_count[0] += 1


def _host_to_device(what: str) -> None:
    """A copy from host memory: in a capture, CuPy stages it in pinned memory that is
    recycled, so replays would read whatever is there then. The stand-in refuses it."""
    if _capturing():
        raise FakeCupyError(f"fake cupy: {what}: a host-to-device copy during a stream capture "
                            "(each replay would re-read a recycled pinned staging buffer)")


def _eager(what: str) -> None:
    """A computation the stand-in does at once: it cannot be recorded into a graph."""
    if _capturing():
        raise FakeCupyError(f"fake cupy: {what} during a stream capture (a real GPU would "
                            "record it as a kernel; the stand-in computes eagerly and cannot)")


# --------------------------------------------------------------------------- memory

_ALIGN = 256   # cudaMalloc's alignment
_UNIT = 512    # CuPy's memory pool rounds every allocation up to this


class _Memory:
    """Device memory: a host buffer at a 256-byte-aligned address."""

    def __init__(self, size: int, pool=None):
        self.size = int(size)
        raw = _np.empty(self.size + _ALIGN, dtype=_np.uint8)
        start = (-raw.__array_interface__["data"][0]) % _ALIGN
        self._buf = raw[start:start + self.size]
        self.ptr = self._buf.__array_interface__["data"][0] if self.size else 0
        self.device_id = 0
        if pool is not None:
            counted = -(-self.size // _UNIT) * _UNIT
            pool._used += counted
            # Released with the host buffer, which every view's NumPy base chain keeps alive:
            # a view (.T, a slice) outliving its array holds the memory, as in CuPy.
            weakref.finalize(raw, pool._release, counted)

    def _view(self, offset: int, nbytes: int) -> _np.ndarray:
        return self._buf[offset:offset + nbytes]


class _Pool:
    __getattr__ = _strict("cupy.cuda.MemoryPool")

    def __init__(self):
        self._used = 0

    def _release(self, size: int) -> None:
        self._used -= size

    def malloc(self, size):
        return MemoryPointer(_Memory(size, self), 0)

    def used_bytes(self) -> int:
        return self._used

    def total_bytes(self) -> int:
        return self._used

    def free_bytes(self) -> int:
        return 0

    def n_free_blocks(self) -> int:
        return 0

    def free_all_blocks(self, stream=None) -> None:
        pass

    def free_all_free(self) -> None:
        pass

    def set_limit(self, size=None, fraction=None) -> None:
        pass

    def get_limit(self) -> int:
        return 0


class MemoryPointer:
    """cupy.cuda.MemoryPointer(mem, offset)."""

    __getattr__ = _strict("cupy.cuda.MemoryPointer")

    def __init__(self, mem, offset):
        self.mem = mem
        self._offset = int(offset)
        self.ptr = mem.ptr + self._offset
        self.device_id = 0

    def __int__(self):
        return self.ptr

    def _view(self, nbytes: int) -> _np.ndarray:
        if self._offset + nbytes > self.mem.size:
            raise ValueError(f"fake cupy: {nbytes} bytes at offset {self._offset} exceed the "
                             f"allocation of {self.mem.size} bytes")
        return self.mem._view(self._offset, nbytes)


class UnownedMemory:
    """cupy.cuda.UnownedMemory(ptr, size, owner, device_id=None): memory at an address."""

    __getattr__ = _strict("cupy.cuda.UnownedMemory")

    def __init__(self, ptr, size, owner, device_id=None):
        self.ptr = int(ptr)
        self.size = int(size)
        self._owner = owner
        self.device_id = 0 if device_id is None else device_id
        if self.size:
            self._buf = _np.frombuffer((ctypes.c_uint8 * self.size).from_address(self.ptr),
                                       dtype=_np.uint8)
        else:
            self._buf = _np.empty(0, dtype=_np.uint8)

    def _view(self, offset: int, nbytes: int) -> _np.ndarray:
        return self._buf[offset:offset + nbytes]


_default_pool = _Pool()


def get_default_memory_pool():
    return _default_pool


class _PinnedPool:
    def free_all_blocks(self) -> None:
        pass

    def n_free_blocks(self) -> int:
        return 0


_pinned_pool = _PinnedPool()


def get_default_pinned_memory_pool():
    return _pinned_pool


def _malloc(nbytes: int) -> MemoryPointer:
    if _state.allocators:
        allocator = _state.allocators[-1]
        # using_allocator(None): CuPy allocates without a pool
        return MemoryPointer(_Memory(nbytes), 0) if allocator is None else allocator(nbytes)
    return _default_pool.malloc(nbytes)


# --------------------------------------------------------------------------- ndarray

def _shape_tuple(shape) -> tuple:
    if isinstance(shape, (int, _np.integer)):
        return (int(shape),)
    return tuple(int(s) for s in shape)


class _Flags:
    __slots__ = ("_a", "_own")

    def __init__(self, a, own):
        self._a = a
        self._own = own

    @property
    def c_contiguous(self):
        return bool(self._a.flags.c_contiguous)

    @property
    def f_contiguous(self):
        return bool(self._a.flags.f_contiguous)

    @property
    def owndata(self):
        return self._own

    def __getitem__(self, name):
        return {"C_CONTIGUOUS": self.c_contiguous, "F_CONTIGUOUS": self.f_contiguous,
                "OWNDATA": self.owndata}[name]

    __getattr__ = _strict("flags")


def _span_bytes(shape, strides, itemsize: int) -> int:
    """Bytes from an array's first element to the end of its last (C order without strides)."""
    count = int(_np.prod(shape, dtype=_np.int64))
    if strides is None or not count:
        return count * itemsize
    return sum((n - 1) * s for n, s in zip(shape, strides)) + itemsize


def _layout(flags, order="K") -> str:
    """The order of a new array like one with ``flags``: "F" when asked, or when ``order``
    is "K"/"A" and the original is Fortran- but not C-contiguous; else "C"."""
    keep_f = order in ("K", "A") and flags.f_contiguous and not flags.c_contiguous
    return "F" if order == "F" or keep_f else "C"


def _device_array(shape, dtype, order="C") -> "ndarray":
    dtype = _np.dtype(dtype)
    shape = _shape_tuple(shape)
    nbytes = int(_np.prod(shape, dtype=_np.int64)) * dtype.itemsize
    return ndarray(shape, dtype, _malloc(nbytes), order=order)


def _adopt(result, inputs=()) -> "ndarray":
    """A NumPy result as a device array: a view of an input stays a view; anything new is
    copied into pool memory, as a CuPy kernel would have written it there."""
    if isinstance(result, _np.generic):
        result = _np.asarray(result)
    for a in inputs:
        if isinstance(a, _np.ndarray) and result.size and _np.may_share_memory(result, a):
            return _wrap(result)
    out = _device_array(result.shape, result.dtype, _layout(result.flags))
    out._a[...] = result
    return out


def _wrap(a: _np.ndarray) -> "ndarray":
    """A view (of device memory another array owns)."""
    obj = object.__new__(ndarray)
    obj._a = a
    obj._own = False
    return obj


def _unwrap(x, what: str):
    """Operand of a device computation: device arrays to their host buffer; NumPy arrays are
    refused, as by CuPy; sequences are unwrapped element by element."""
    if isinstance(x, ndarray):
        return x._a
    if isinstance(x, _np.ndarray):
        raise TypeError(f"Unsupported type <class 'numpy.ndarray'> (fake cupy: {what} takes "
                        "device arrays; move host data with cupy.asarray)")
    if isinstance(x, (list, tuple)):
        return type(x)(_unwrap(v, what) for v in x)
    return x


def _result(r, inputs):
    if isinstance(r, (_np.ndarray, _np.generic)) and not isinstance(r, _np.dtype):
        return _adopt(r, inputs)
    if isinstance(r, tuple):
        return tuple(_result(v, inputs) for v in r)
    if isinstance(r, list) and r and all(isinstance(v, _np.ndarray) for v in r):
        return [_result(v, inputs) for v in r]
    return r


def _compute(what: str, fn, args, kwargs, owner=None):
    """fn(*args, **kwargs) on host buffers; ``owner``: the array whose method fn is."""
    args = tuple(_unwrap(a, what) for a in args)
    kwargs = {k: _unwrap(v, what) for k, v in kwargs.items()}
    out = kwargs.get("out")
    inputs = [] if owner is None else [owner]
    inputs += [a for a in args if isinstance(a, _np.ndarray)]
    inputs += [v for v in kwargs.values() if isinstance(v, _np.ndarray)]
    if out is not None:
        def work():
            fn(*args, **kwargs)
        _submit(work)
        return _wrap(out) if isinstance(out, _np.ndarray) else out
    result = fn(*args, **kwargs)
    view = isinstance(result, _np.ndarray) and any(
        _np.may_share_memory(result, a) for a in inputs)
    if view or not _capturing():
        return _result(result, inputs)
    # In a capture CuPy records a kernel that computes the result at each replay: the
    # stand-in allocates it now and records the computation (its value now is discarded).
    if not isinstance(result, (_np.ndarray, _np.generic)):
        _eager(what)
    out = _adopt(result)

    def work():
        out._a[...] = fn(*args, **kwargs)
    _current_stream()._capture.append(work)
    return out


def _index_key(key):
    """An index: CuPy converts lists and NumPy arrays in it to device arrays (advanced
    indexing), so host index arrays are accepted here, unlike host operands."""
    if isinstance(key, ndarray):
        return key._a
    if isinstance(key, tuple):
        return tuple(_index_key(k) for k in key)
    return key


class ndarray:
    """cupy.ndarray over host memory; the public constructor takes (shape, dtype, memptr)."""

    __array_priority__ = 100
    __slots__ = ("_a", "_memptr", "_own", "__weakref__")

    def __init__(self, shape, dtype=float, memptr=None, strides=None, order="C"):
        dtype = _np.dtype(dtype)
        shape = _shape_tuple(shape)
        nbytes = _span_bytes(shape, strides, dtype.itemsize)
        if memptr is None:
            memptr = _malloc(nbytes)
        buf = memptr._view(nbytes)
        self._a = _np.ndarray(shape, dtype, buffer=buf, strides=strides, order=order)
        self._memptr = memptr
        self._own = True

    # --- attributes
    shape = property(lambda self: self._a.shape)
    dtype = property(lambda self: self._a.dtype)
    ndim = property(lambda self: self._a.ndim)
    size = property(lambda self: self._a.size)
    nbytes = property(lambda self: self._a.nbytes)
    itemsize = property(lambda self: self._a.itemsize)
    strides = property(lambda self: self._a.strides)
    flags = property(lambda self: _Flags(self._a, self._own))
    T = property(lambda self: _wrap(self._a.T))
    mT = property(lambda self: _wrap(_np.swapaxes(self._a, -1, -2)))

    @property
    def data(self):
        return MemoryPointer(UnownedMemory(self._a.__array_interface__["data"][0], 0, self), 0)

    @property
    def device(self):
        from .cuda import Device
        return Device(0)

    @property
    def base(self):
        if self._own:
            return None
        raise FakeCupyError("fake cupy: ndarray.base of a view is not imitated")

    @property
    def __cuda_array_interface__(self):
        iface = dict(self._a.__array_interface__)
        return {"shape": iface["shape"], "typestr": iface["typestr"], "descr": iface["descr"],
                "data": (iface["data"][0], False),
                "strides": None if self._a.flags.c_contiguous else self._a.strides,
                "version": 3}

    # --- leaving the device
    def get(self, stream=None, order="C", out=None, blocking=True):
        _host_sync("ndarray.get")
        host = _np.array(self._a, order=order if order in "CFA" else "C")
        if out is not None:
            out[...] = host
            return out
        return host

    def set(self, arr, stream=None):
        if not isinstance(arr, _np.ndarray):
            raise TypeError("Only numpy.ndarray can be set to cupy.ndarray")
        if arr.shape != self.shape:
            raise ValueError(f"Shape mismatch. Old shape: {self.shape}, new shape: {arr.shape}")
        if arr.dtype != self.dtype:
            raise TypeError(f"{arr.dtype} array cannot be set to {self.dtype} array")
        _host_to_device("ndarray.set")
        src = arr.copy()
        _submit(lambda: self._a.__setitem__(Ellipsis, src))

    def item(self, *args):
        _host_sync("ndarray.item")
        return self._a.item(*args)

    def tolist(self):
        _host_sync("ndarray.tolist")
        return self._a.tolist()

    def __array__(self, dtype=None, copy=None):
        raise TypeError("Implicit conversion to a NumPy array is not allowed. Please use "
                        "`.get()` to construct a NumPy array explicitly.")

    def __float__(self):
        _host_sync("float()")
        return float(self._a)

    def __int__(self):
        _host_sync("int()")
        return int(self._a)

    def __complex__(self):
        _host_sync("complex()")
        return complex(self._a)

    def __bool__(self):
        _host_sync("bool()")
        return bool(self._a)

    def __len__(self):
        return len(self._a)

    def __iter__(self):
        if self.ndim == 0:
            raise TypeError("iteration over a 0-d array")
        return (self[i] for i in range(len(self)))

    def __repr__(self):
        _host_sync("repr()")
        return repr(self._a).replace("array", "array", 1)

    def __str__(self):
        _host_sync("str()")
        return str(self._a)

    def __format__(self, spec):
        _host_sync("format()")
        return format(self._a if self.ndim else self._a[()], spec)

    def __dlpack_device__(self):
        return (2, 0)   # kDLCUDA, device 0

    def __dlpack__(self, *args, **kwargs):
        raise FakeCupyError("fake cupy: DLPack export of device arrays is not imitated")

    def toDlpack(self):
        raise FakeCupyError("fake cupy: DLPack export of device arrays is not imitated")

    # --- in place, on the stream
    def fill(self, value):
        a = self._a
        _submit(lambda: a.fill(value))

    def __setitem__(self, key, value):
        a = self._a
        key = _index_key(key)
        if isinstance(value, ndarray):
            src = value._a
            _submit(lambda: a.__setitem__(key, src))
        else:
            value = _unwrap(value, "assignment")
            _submit(lambda: a.__setitem__(key, value))

    def __getitem__(self, key):
        key = _index_key(key)
        keys = key if isinstance(key, tuple) else (key,)
        if any(isinstance(k, _np.ndarray) and k.dtype == bool for k in keys):
            _host_sync("boolean-mask indexing (the result's size is read from the device)")
        return _compute("indexing", lambda a: a[key], (self,), {})

    # --- NumPy protocol: dispatch to this module's functions, as CuPy does
    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        if method != "__call__":
            return NotImplemented
        _check_surface("cupy", ufunc.__name__)
        return _compute(ufunc.__name__, ufunc, inputs, kwargs)

    def __array_function__(self, func, types, args, kwargs):
        name = func.__name__
        if name not in SURFACE["cupy"]:
            return NotImplemented
        return globals()[name](*args, **kwargs) if name in _EXPLICIT else \
            _compute(name, func, args, kwargs)

    def __getattr__(self, name):
        # methods CuPy has and NumPy computes: astype, reshape, sum, max, copy, ...
        if name.startswith("__"):
            raise AttributeError(name)
        _check_surface("cupy.ndarray", name)
        method = getattr(self._a, name)
        if not callable(method):
            return _result(method, [self._a])

        @functools.wraps(method)
        def call(*args, **kwargs):
            return _compute(f"ndarray.{name}", method, args, kwargs, owner=self._a)
        return call

    def __copy__(self):
        return self.copy()

    def __deepcopy__(self, memo):
        return self.copy()

    def __reduce__(self):
        raise FakeCupyError("fake cupy: pickling device arrays is not imitated")


_EXPLICIT: set[str] = set()


def _binary(name):
    def method(self, other):
        return _compute(name, getattr(operator, name), (self, other), {})
    method.__name__ = f"__{name}__"
    return method


def _reflected(name):
    def method(self, other):
        return _compute(name, getattr(operator, name), (other, self), {})
    method.__name__ = f"__r{name}__"
    return method


def _inplace(name):
    def method(self, other):
        a, b = self._a, _unwrap(other, name)
        _submit(lambda: getattr(operator, f"i{name}")(a, b))
        return self
    method.__name__ = f"__i{name}__"
    return method


for _name in ("add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "matmul", "and", "or",
              "xor", "lshift", "rshift"):
    setattr(ndarray, f"__{_name}__", _binary(_name))
    setattr(ndarray, f"__r{_name}__", _reflected(_name))
    if _name != "matmul":
        setattr(ndarray, f"__i{_name}__", _inplace(_name))
for _name in ("lt", "le", "gt", "ge", "eq", "ne"):
    setattr(ndarray, f"__{_name}__", _binary(_name))
for _name in ("neg", "pos", "abs", "invert"):
    setattr(ndarray, f"__{_name}__",
            (lambda n: lambda self: _compute(n, getattr(operator, n), (self,), {}))(_name))
ndarray.__hash__ = None


# --------------------------------------------------------------------------- functions

def _explicit(fn):
    _EXPLICIT.add(fn.__name__)
    return fn


def _host_operand(obj):
    """Host data for asarray/array: NumPy arrays, scalars, lists (of device arrays too)."""
    if isinstance(obj, ndarray):
        return obj._a
    if isinstance(obj, (list, tuple)):
        return [_host_operand(v) for v in obj]
    return obj


def _from_interface(obj) -> ndarray:
    """A device array over another library's device memory (``__cuda_array_interface__``)."""
    iface = obj.__cuda_array_interface__
    if iface.get("mask") is not None:            # CuPy 14's messages (_core/core.pyx)
        raise ValueError("CuPy currently does not support masked arrays.")
    if iface["typestr"][0] == ">":
        raise ValueError("CuPy does not support the big-endian byte-order")
    dtype = _np.dtype(iface["typestr"])
    shape = tuple(iface["shape"])
    strides = iface.get("strides")
    mem = UnownedMemory(iface["data"][0], _span_bytes(shape, strides, dtype.itemsize), obj)
    return ndarray(shape, dtype, MemoryPointer(mem, 0), strides=strides)


@_explicit
def asarray(a, dtype=None, order=None, *, blocking=False):
    if isinstance(a, ndarray):
        if dtype is None or _np.dtype(dtype) == a.dtype:
            if order in (None, "K", "A") or (order == "C" and a.flags.c_contiguous) or \
                    (order == "F" and a.flags.f_contiguous):
                return a
        return array(a, dtype=dtype, order=order or "K")
    if hasattr(a, "__cuda_array_interface__"):
        out = _from_interface(a)
        return out if dtype is None else out.astype(dtype, copy=False)
    return array(a, dtype=dtype, order=order or "K")


@_explicit
def array(obj, dtype=None, copy=True, order="K", subok=False, ndmin=0, *, blocking=False):
    if isinstance(obj, ndarray):
        src = obj._a
        out = _device_array(src.shape, src.dtype if dtype is None else dtype,
                            _layout(src.flags, order))
        dst = out._a
        _submit(lambda: dst.__setitem__(Ellipsis, src))
        return out if not ndmin or out.ndim >= ndmin else out.reshape((1,) * (ndmin - out.ndim) + out.shape)
    _host_to_device("cupy.array / cupy.asarray of host data")
    host = _np.array(_host_operand(obj), dtype=dtype, order=order, ndmin=ndmin)
    out = _device_array(host.shape, host.dtype, _layout(host.flags))
    out._a[...] = host   # a host-to-device copy: allowed in a capture as cudaMemcpyAsync
    return out


def _contiguous(a, dtype, order: str):
    """``a`` itself if already contiguous in ``order`` and of ``dtype``, else a copy (on the
    stream). A 0-d array becomes shape (1,), as in CuPy and NumPy."""
    if not isinstance(a, ndarray):
        raise TypeError(f"Unsupported type {type(a)}")
    if a.ndim == 0:
        a = a.reshape(1)
    contiguous = a.flags.f_contiguous if order == "F" else a.flags.c_contiguous
    if contiguous and (dtype is None or _np.dtype(dtype) == a.dtype):
        return a
    out = _device_array(a.shape, dtype or a.dtype, order=order)
    src, dst = a._a, out._a
    _submit(lambda: dst.__setitem__(Ellipsis, src))
    return out


@_explicit
def ascontiguousarray(a, dtype=None):
    return _contiguous(a, dtype, "C")


@_explicit
def asfortranarray(a, dtype=None):
    return _contiguous(a, dtype, "F")


@_explicit
def empty(shape, dtype=float, order="C"):
    return _device_array(shape, dtype, order)


def _filled(shape, dtype, order, value):
    out = _device_array(shape, dtype, order)
    out.fill(value)
    return out


@_explicit
def zeros(shape, dtype=float, order="C"):
    return _filled(shape, dtype, order, 0)


@_explicit
def ones(shape, dtype=float, order="C"):
    return _filled(shape, dtype, order, 1)


@_explicit
def full(shape, fill_value, dtype=None, order="C"):
    if dtype is None:
        dtype = _np.array(fill_value).dtype
    return _filled(shape, dtype, order, fill_value)


def _like(a, dtype, order, shape):
    if not isinstance(a, ndarray):
        raise TypeError(f"Unsupported type {type(a)}")
    return _device_array(a.shape if shape is None else shape, a.dtype if dtype is None else dtype,
                         _layout(a.flags, order))


@_explicit
def empty_like(a, dtype=None, order="K", subok=None, shape=None):
    return _like(a, dtype, order, shape)


@_explicit
def zeros_like(a, dtype=None, order="K", subok=None, shape=None):
    out = _like(a, dtype, order, shape)
    out.fill(0)
    return out


@_explicit
def ones_like(a, dtype=None, order="K", subok=None, shape=None):
    out = _like(a, dtype, order, shape)
    out.fill(1)
    return out


@_explicit
def full_like(a, fill_value, dtype=None, order="K", subok=None, shape=None):
    out = _like(a, dtype, order, shape)
    out.fill(fill_value)
    return out


@_explicit
def copyto(dst, src, casting="same_kind", where=None):
    if not isinstance(dst, ndarray):
        raise TypeError(f"fake cupy: copyto's dst must be a cupy.ndarray, got {type(dst)}")
    if isinstance(src, _np.ndarray):
        if src.size != 1:
            raise ValueError("non-scalar numpy.ndarray cannot be used for copyto")
        if not _np.can_cast(src, dst.dtype, casting):
            raise TypeError(f"Cannot cast {src.dtype} to {dst.dtype} in {casting} casting mode")
        src = src.squeeze()[()]
    elif type(src) in (bool, int, float, complex):
        _np.copyto(_np.empty((), dtype=dst.dtype), src, casting=casting)   # as CuPy checks
    elif _np.isscalar(src) and not _np.can_cast(src, dst.dtype, casting):
        raise TypeError(f"Cannot cast {src!r} to {dst.dtype} in {casting} casting mode")
    if isinstance(src, ndarray):
        if not _np.can_cast(src.dtype, dst.dtype, casting):
            raise TypeError(f"Cannot cast {src.dtype} to {dst.dtype} in {casting} casting mode")
        s = src._a
    else:
        s = src
    d = _unwrap(dst, "copyto")
    w = _unwrap(where, "copyto") if where is not None else None
    _np.broadcast_shapes(_np.shape(s), d.shape)
    _submit(lambda: _np.copyto(d, s, casting="unsafe", where=True if w is None else w))


@_explicit
def from_dlpack(x, *, device=None, copy=None):
    """CuPy's handshake: the producer's ``__dlpack__`` gets CuPy's current stream (1 for
    the legacy default stream), with ``max_version`` and ``copy`` first and the stream
    alone if that is a TypeError. The stand-in's device memory is host memory, so the
    capsule it can take is a CPU capsule of the producer's memory (what a test's imitation
    of a PyTorch CUDA tensor hands out); the result shares that memory."""
    if isinstance(x, ndarray):
        return x
    if not hasattr(x, "__dlpack_device__"):
        raise FakeCupyError("fake cupy: from_dlpack of a bare capsule is not imitated")
    device_type = int(x.__dlpack_device__()[0])
    if device_type == 1:
        raise TypeError("CPU arrays cannot be directly imported to CuPy. "
                        "Use `cupy.array(numpy.from_dlpack(input))` instead.")
    if device_type not in (2, 13):
        raise TypeError(f"Unsupported array type: {device_type}")
    from .cuda import get_current_stream
    stream = get_current_stream().ptr or 1
    try:
        capsule = x.__dlpack__(stream=stream, max_version=(1, 0), copy=copy)
    except TypeError:
        if copy is not None:
            raise
        capsule = x.__dlpack__(stream=stream)

    class _HostCapsule:
        def __dlpack_device__(self):
            return (1, 0)

        def __dlpack__(self, *args, **kwargs):
            return capsule

    try:
        host = _np.from_dlpack(_HostCapsule())
    except (BufferError, RuntimeError, TypeError) as exc:
        raise FakeCupyError(f"fake cupy: from_dlpack takes only CPU capsules of the producer's "
                            f"memory (the stand-in's device memory is host memory): {exc}")
    mem = UnownedMemory(host.__array_interface__["data"][0],
                        _span_bytes(host.shape, host.strides, host.itemsize), (x, host))
    return ndarray(host.shape, host.dtype, MemoryPointer(mem, 0), strides=host.strides)


def fromDlpack(x):
    return from_dlpack(x)


@_explicit
def get_array_module(*args):
    return __import__(__name__) if any(isinstance(a, ndarray) for a in args) else _np


@_explicit
def asnumpy(a, stream=None, order="C", out=None, blocking=True):
    if isinstance(a, ndarray):
        return a.get(stream=stream, order=order, out=out)
    return _np.asarray(a, order=order)


def __getattr__(name):
    # Everything else CuPy has and NumPy computes alike: dtypes and constants as they are,
    # functions through _compute (device operands only; results in pool memory).
    _check_surface("cupy", name)
    if name in ("random", "linalg", "cuda", "testing"):
        import importlib
        return importlib.import_module(f"{__name__}.{name}")
    if name in ("RawModule", "RawKernel", "ElementwiseKernel"):
        from . import _kernels
        return getattr(_kernels, name)
    try:
        value = getattr(_np, name)
    except AttributeError:
        raise FakeCupyError(f"fake cupy: cupy.{name} is not imitated") from None
    if isinstance(value, type) or not callable(value):
        return value
    if name in _SIZE_FROM_DEVICE:
        inner = value

        def value(*args, **kwargs):
            _host_sync(f"cupy.{name} (the result's size is read from the device)")
            return inner(*args, **kwargs)
    elif name in _DEVICE_SCALAR:
        inner_scalar = value

        def value(*args, **kwargs):
            return _np.asarray(inner_scalar(*args, **kwargs))   # CuPy: a 0-d device array
    wrapped = _wrapped.get(name)
    if wrapped is None:
        # cached here, not in globals(): cupy.sum must not shadow the builtin sum in this module
        wrapped = _wrapped[name] = functools.wraps(value)(
            lambda *args, **kwargs: _compute(f"cupy.{name}", value, args, kwargs))
    return wrapped


_wrapped: dict = {}
# functions whose output size depends on the data: CuPy reads it back (a synchronisation)
_SIZE_FROM_DEVICE = {"unique", "nonzero", "flatnonzero", "argwhere", "compress", "extract"}
# functions NumPy answers with a Python bool where CuPy returns a 0-d device array
_DEVICE_SCALAR = {"array_equal", "array_equiv", "allclose"}


def _source_digest(code: str) -> str:
    return hashlib.sha256(code.encode()).hexdigest()[:20]
