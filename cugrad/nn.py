"""cugrad.nn: layers with explicit forward and backward.

A ``Module`` computes ``forward(x)`` (through ``__call__``) and, afterwards,
``backward(grad_out) -> grad_in``, which also accumulates the gradients of its
parameters into ``Parameter.grad`` until ``zero_grad()``. ``backward(grad_out,
input_grad=False)`` accumulates the same parameter gradients but returns None without
computing ``grad_in`` (a training loop has no use for the gradient of its input batch;
for a ``Linear`` it is a whole product); ``Sequential`` passes it to its first layer.

Each forward saves what its backward needs; a second ``backward`` without a new forward is
an error (as PyTorch's without ``retain_graph``), a backward that raised may be retried. What
is saved are references, not copies (a ``Linear`` keeps its input ``x``): changing ``x`` in
place between forward and backward changes the weight gradient (PyTorch detects that with
version counters; cugrad does not). A module instance appears once in a model (``Sequential``
refuses a repeat): calling it twice in one forward would overwrite what the first call
saved. A ``Parameter`` may be shared (tied weights): ``parameters()`` lists it once.

Every forward and backward runs inside an NVTX range named ``"{name}.forward"`` /
``"{name}.backward"``, where name is the class name or, for a child module, its path and
class: ``"{index}:{ClassName}"`` inside a ``Sequential``, ``"fc:Linear"`` for an
attribute, ``"body.0:Linear"`` deeper down.
"""

from __future__ import annotations

import functools
import inspect
import math
import os
import secrets
import zipfile
import zlib
from collections.abc import Callable, Mapping
from typing import Iterator

import numpy as np

from . import _backend, _trace
from . import functional as F
from ._arrays import asarray, to_numpy
from ._checks import (FLOAT_DTYPES, check_choice, check_flag, check_shape, describe,
                      exported_read_only, import_foreign, numpy_dtype, prepare, refuse_masked,
                      shares_memory, unwrap_parameter)
from ._trace import op_range

__all__ = ["Parameter", "Module", "Linear", "Sigmoid", "Tanh", "ReLU", "Sequential",
           "MSELoss", "CrossEntropyLoss"]


def _parameter_data(where: str, data):
    """``data`` for a Parameter: an array (another library's taken through DLPack / the
    CUDA array interface, except one exported read-only, kept as it is: an optimiser step
    refuses to write it); TypeError for anything else, a Parameter or masked array
    included."""
    if isinstance(data, Parameter):
        raise TypeError(f"{where}: data is a Parameter ({data!r}), not an array: pass "
                        "p.data.copy() to copy its values, or assign the Parameter itself "
                        "(b.weight = a.weight) to share it")
    refuse_masked(where, "data", data)
    if not hasattr(data, "shape") or not hasattr(data, "dtype"):
        raise TypeError(f"{where}: data must be an array, got {describe(data)}; convert "
                        "it with cugrad.asarray()")
    if exported_read_only(data):
        return data
    return import_foreign(where, "data", data)


class Parameter:
    """A trainable array (``.data``) and its accumulated gradient (``.grad``, None until a
    backward writes it). Another library's array (a PyTorch tensor) is taken without a copy
    through DLPack or the CUDA array interface, as a NumPy or CuPy array over its memory
    (one exported read-only is kept as it is: an optimiser step refuses to write it)."""

    def __init__(self, data):
        self._data = _parameter_data("Parameter", data)
        self.grad = None

    @property
    def data(self):
        return self._data

    @data.setter
    def data(self, value):
        # ``p.data = tensor`` too (weights copied from PyTorch): taken as the constructor
        # takes it; anything that is not an array is refused here, not in a later op
        self._data = _parameter_data("Parameter.data", value)

    shape = property(lambda self: tuple(self.data.shape))
    dtype = property(lambda self: self.data.dtype)
    device = property(lambda self: _backend.device_of(self.data))

    def __array__(self, dtype=None, copy=None):
        """``np.asarray(param)`` is its data (not a 0-d object array); GPU data raises
        CuPy's TypeError, as ``np.asarray`` of a CuPy array does: use ``cugrad.to_numpy``.
        ``copy`` as NumPy's: True always copies, False never does (ValueError if it must)."""
        if copy is None:
            return np.asarray(self.data, dtype=dtype)
        return np.array(self.data, dtype=dtype, copy=copy)

    def accumulate(self, grad) -> None:
        """Add ``grad`` to ``.grad``: the first gradient after ``zero_grad`` is stored as a
        copy (the caller's array stays the caller's: one array handed to two parameters, or
        changed later, must not become or change their gradients), later ones are added in
        place by ``F.accumulate``, the backend's own kernel, in the NVTX range
        ``accumulate``. ``grad`` must have the parameter's shape, dtype and device
        (ValueError or TypeError otherwise; nothing broadcasts)."""
        op = "Parameter.accumulate"
        _, arr = prepare(op, {"param": self.data, "grad": grad})
        check_shape(op, "grad", arr["grad"], self.shape, "the parameter's shape")
        if self.grad is None:
            grad = arr["grad"].copy()     # C-contiguous, writable, the parameter's own
        else:                             # errors in this call's terms, not F.accumulate's
            grad = arr["grad"]
            self._check_accumulable(op, "the parameter's .grad", grad)
        self._accumulate_own(grad)

    def _check_accumulable(self, op: str, name: str, grad) -> None:
        """Raise, changing nothing, where ``_accumulate_own(grad)`` would fail: a ``.grad``
        already held (``name``, e.g. "bias.grad") that ``grad`` cannot be added into."""
        if self.grad is None:
            return
        total = self.grad
        try:            # another library's array (F.accumulate takes it): compare as ours
            total = import_foreign(op, name, total)
        except Exception:
            pass        # no CUDA backend, a refused export: the message below says what it holds
        same = (getattr(total, "dtype", None) == grad.dtype
                and _backend.device_of(total) == _backend.device_of(grad))
        if not same or tuple(getattr(total, "shape", ())) != tuple(grad.shape):
            raise (ValueError if same else TypeError)(
                f"{op}: {name} holds {describe(total)} but the gradient to add to it is "
                f"{describe(grad)}; set {name} to None (zero_grad) or to an array like the "
                "gradient")
        if not (total.flags.c_contiguous and getattr(total.flags, "writeable", True)):
            raise ValueError(f"{op}: {name} is added to in place and must be a writable "
                             f"C-contiguous array, got {describe(total)}")
        if total.size and shares_memory(total, grad):
            raise ValueError(f"{op}: {name} shares memory with the new gradient "
                             f"({describe(total)}); set it to None (zero_grad) first")

    def _accumulate_own(self, grad) -> None:
        """``accumulate`` for a gradient a cugrad op has just returned (a new C-contiguous
        array of the parameter's shape): stored without the checks."""
        if self.grad is None:
            self.grad = grad
        else:
            F.accumulate(self.grad, grad)

    def __repr__(self):
        return f"Parameter(shape={self.shape}, dtype={self.dtype}, device={self.device!r})"


def _ranged_backward(backward):
    """The backward inside its NVTX range; what the forward saved is released only when the
    backward returns, so a backward that raises (a wrong grad_out, say) can be retried.

    A subclass's backward that calls ``super().backward`` reaches a base class's wrapper
    from inside its own: only the outer one, the wrapper the instance's class resolves,
    opens a range and releases the saved state (the subclass may still read it after the
    call)."""
    @functools.wraps(backward)
    def wrapper(self, *args, **kwargs):
        outer = type(self).backward is wrapper
        if outer:
            self._name_children()
        if _trace._quiet or not outer:
            result = backward(self, *args, **kwargs)
        else:
            with op_range(f"{self._range_name}.backward", self._call_device(args, kwargs, True)):
                result = backward(self, *args, **kwargs)
        if outer:
            self.__dict__["_saved"] = None     # Module.__setattr__'s slot checks: not needed
        return result
    return wrapper


@functools.lru_cache(maxsize=None)
def _takes_input_grad(cls) -> bool:
    try:
        return "input_grad" in inspect.signature(cls.backward).parameters
    except (TypeError, ValueError):
        return False


def run_backward(module, grad_out, input_grad: bool):
    """``module.backward(grad_out, input_grad=input_grad)``, also for a user's module whose
    ``backward`` has no ``input_grad`` (it then computes its input gradient, and the result
    is dropped when not asked for)."""
    if input_grad:
        return module.backward(grad_out)
    if _takes_input_grad(type(module)):
        return module.backward(grad_out, input_grad=False)
    module.backward(grad_out)
    return None


class Module:
    """Base class: subclasses define ``forward`` and ``backward`` and hold ``Parameter``
    and ``Module`` attributes, found by ``parameters()``: a module's own Parameters first
    (in attribute order), then each child module's, child by child in attribute order (as
    PyTorch lists them). A subclass's ``__init__`` must call ``super().__init__()``.

    ``device`` is the device of the module's parameters; a module without parameters
    reports the device it was last moved to with ``to()`` ("cpu" at first), and a loss the
    device of its last forward's data."""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "backward" in cls.__dict__:
            cls.backward = _ranged_backward(cls.__dict__["backward"])

    def __init__(self):
        self._range_name = type(self).__name__
        self._device = "cpu"
        self._saved = None
        self.training = True
        self._child_prefix = ""
        self._child_names: dict[str, str] = {}

    _parameter_slots: tuple[str, ...] = ()   # attributes that hold a Parameter or None
    _has_children = False       # set on an instance when a Module is assigned to it

    def __setattr__(self, name, value):
        # A Parameter's slot (one holding a Parameter now, or declared) takes a Parameter or
        # None: an array put there would drop out of parameters() and state_dict() without a
        # word and fail later in another op.
        if (value is not None and not isinstance(value, Parameter)
                and (isinstance(self.__dict__.get(name), Parameter)
                     or name in self._parameter_slots)):
            raise TypeError(
                f"{type(self).__name__}: cannot assign {describe(value)} to {name!r}, a "
                f"Parameter's slot; expected a cugrad.nn.Parameter (or None). To change its "
                f"values, assign to {name}.data (same shape and dtype) or copy into it")
        if isinstance(value, Module):
            object.__setattr__(self, "_has_children", True)
        object.__setattr__(self, name, value)

    def __getattr__(self, name):
        # Reached only where the usual lookup failed (the normal path never comes here): a
        # subclass whose __init__ did not call Module.__init__ lacks the attributes it sets.
        if name in _INIT_ATTRIBUTES and "_range_name" not in vars(self):
            raise AttributeError(
                f"{type(self).__name__} has no attribute {name!r}: its __init__ must call "
                "super().__init__() (cugrad.nn.Module.__init__) before the module is used",
                name=name, obj=self)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}",
                             name=name, obj=self)

    # -- forward / backward plumbing ------------------------------------------------------
    def __call__(self, *args, **kwargs):
        self._name_children()
        if _trace._quiet:          # nothing listens: no range to open
            return self.forward(*args, **kwargs)
        with op_range(f"{self._range_name}.forward", self._call_device(args, kwargs)):
            return self.forward(*args, **kwargs)

    def forward(self, *args, **kwargs):
        raise NotImplementedError(f"{type(self).__name__} does not define forward")

    def backward(self, grad_out, *, input_grad=True):
        raise NotImplementedError(f"{type(self).__name__} does not define backward")

    def _save(self, *tensors) -> None:
        self.__dict__["_saved"] = tensors       # every forward: past Module.__setattr__

    def _take_saved(self) -> tuple:
        """What the last forward saved; released when this backward returns (not if it
        raises)."""
        saved = self._saved
        if saved is None:
            raise RuntimeError(
                f"{self._range_name}.backward: nothing saved to differentiate; backward needs "
                "a forward call first, and may run only once per forward (call the module "
                "again before a second backward); moving the module with .to() also drops "
                "what its forward saved")
        return saved

    def _name_children(self) -> None:
        """Name each child module by its place in this one, for its ranges and messages:
        ``"{name}:{Class}"`` (``"fc:Linear"``; in a Sequential the name is the index,
        ``"0:Linear"``), and below a child that has such a name, by its dotted path
        (``"body.0:Linear"``, ``"2.0:Linear"``), the path ``named_modules()`` gives from the
        outermost module called. Run at each call and backward, so a module shared by two
        parents carries the name it has in the one running it (an identity check per child
        when nothing changed); a module's own name stays its class until a parent runs it."""
        if not self._has_children:      # a layer: nothing to name (the common case)
            return
        head, colon, _ = self._range_name.partition(":")
        prefix = f"{head}." if colon else ""
        if prefix != self._child_prefix:        # this module was renamed (moved, nested)
            self._child_prefix, self._child_names = prefix, {}
        names = self._child_names
        for key, m in self.named_children():     # a module held twice: by its first name
            if m._range_name is not names.get(key):
                names[key] = m._range_name = f"{prefix}{key}:{type(m).__name__}"

    # -- parameters and children ------------------------------------------------------------
    def _child_items(self) -> Iterator[tuple[str, "Module"]]:
        """(name, module) for every module held directly, in attribute order; a module held
        under two names comes twice. A subclass that lists its children by overriding
        ``named_children`` (modules kept in a list, say) is taken at its word."""
        if type(self).named_children is not Module.named_children:
            yield from self.named_children()
            return
        for name, value in vars(self).items():
            if isinstance(value, Module):
                yield name, value

    def named_children(self) -> Iterator[tuple[str, "Module"]]:
        """(name, module) for each module held directly, each once: one held under two
        names comes under its first (PyTorch's rule)."""
        return _once_each(self._child_items())

    def children(self) -> Iterator["Module"]:
        """The modules held directly, each once (PyTorch's name)."""
        for _, m in self.named_children():
            yield m

    def named_modules(self, *, prefix: str = "", remove_duplicate: bool = True
                      ) -> Iterator[tuple[str, "Module"]]:
        """(dotted path, module) for this module (``prefix``, "" by default) and every
        module below it, parents first (PyTorch's order); a module held twice comes once,
        under its first path, unless ``remove_duplicate=False``."""
        _check_prefix("named_modules", prefix)
        remove_duplicate = check_flag("named_modules", "remove_duplicate", remove_duplicate)
        pairs = _module_tree(self, "")
        for path, m in _once_each(pairs) if remove_duplicate else pairs:
            yield _joined(prefix, path[1:]), m

    def modules(self) -> Iterator["Module"]:
        """Every module from this one down, each once."""
        for _, m in self.named_modules():
            yield m

    def named_parameters(self, prefix: str = "", recurse: bool = True,
                         remove_duplicate: bool = True) -> Iterator[tuple[str, Parameter]]:
        """(dotted name, Parameter) pairs: the module's own Parameters first (in attribute
        order), then each child's in turn, recursively (PyTorch's order and arguments;
        ``recurse=False``: the module's own only). A Parameter held twice (tied weights) is
        listed once, under its first name, unless ``remove_duplicate=False``. ``prefix``
        goes before each name, with a dot (``prefix="net"``: ``"net.weight"``)."""
        _check_prefix("named_parameters", prefix)
        recurse = check_flag("named_parameters", "recurse", recurse)
        remove_duplicate = check_flag("named_parameters", "remove_duplicate", remove_duplicate)
        pairs = self._all_parameters("", recurse)
        for name, p in _once_each(pairs) if remove_duplicate else pairs:
            yield _joined(prefix, name), p

    def _all_parameters(self, prefix: str, recurse: bool = True
                        ) -> Iterator[tuple[str, Parameter]]:
        for name, value in vars(self).items():
            if isinstance(value, Parameter):
                yield prefix + name, value
        if recurse:
            for name, child in self._child_items():
                yield from child._all_parameters(f"{prefix}{name}.")

    def parameters(self) -> list[Parameter]:
        """Every Parameter of this module and its children, each once."""
        return [p for _, p in self.named_parameters()]

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear every parameter's gradient, PyTorch's way: ``.grad = None`` (the default;
        the next backward stores its gradient afresh), or with ``set_to_none=False`` fill
        each gradient held with zeros in place (one that is None stays None; every one is
        checked writable first, so a refusal changes none)."""
        _zero_grads(f"{type(self).__name__}.zero_grad", self.named_parameters(), set_to_none)

    def train(self, mode: bool = True) -> "Module":
        """Set ``training`` to ``mode`` on this module and every module below it; returns
        self (PyTorch's method). No cugrad layer computes differently in evaluation mode
        (there is no dropout or batch norm); the flag is there for a user's own modules and
        for code written for PyTorch."""
        mode = check_flag(f"{type(self).__name__}.train", "mode", mode)
        for m in self.modules():
            m.training = mode
        return self

    def eval(self) -> "Module":
        """``train(False)``."""
        return self.train(False)

    @property
    def device(self) -> str:
        """Where the parameters live ("cpu" or "cuda"); without parameters, the device the
        module was last moved to. ValueError if its parameters live on both."""
        devices = self._devices()
        if len(devices) > 1:
            raise ValueError(f"{type(self).__name__}: its parameters live on different "
                             f"devices {sorted(devices)}; move them to one with .to(device)")
        return devices.pop()

    def _devices(self) -> set:
        """The devices of the parameters; without parameters, {the device last moved to}."""
        return {p.device for p in self.parameters()} or {self._device}

    def _range_device(self):
        """``device`` for a call's NVTX range; None (the enclosing range's) if mixed."""
        devices = self._devices()
        return devices.pop() if len(devices) == 1 else None

    def _call_device(self, args, kwargs, backward=False):
        """The clock of a forward's or backward's range: the first positional argument's
        device; else "cuda" if a keyword argument, or for a backward what the forward saved
        (a loss's ``backward()`` takes no argument), is a GPU array; else the parameters'."""
        if args:
            return _backend.device_of(args[0])
        arrays = list(kwargs.values())
        if backward and isinstance(self._saved, tuple):
            arrays += self._saved
        if any(_backend.is_gpu_array(a) for a in arrays):
            return "cuda"
        return self._range_device()

    def to(self, device) -> "Module":
        """Move every parameter (and gradient) to ``device`` ("cpu" or "cuda"), each keeping
        its dtype; in place, returns self. Everything is converted before anything is
        replaced: a conversion that raises (out of device memory, say) changes nothing."""
        device = _backend.normalize_device(device)
        moved = [(p, _moved(p.data, device),
                  None if p.grad is None else _moved(p.grad, device))
                 for p in self.parameters()]
        for p, data, grad in moved:          # only now: all or nothing
            p.data, p.grad = data, grad
        self._set_device(device)
        return self

    def _set_device(self, device: str) -> None:
        self._device = device
        self._saved = None          # saved activations live on the old device
        for _, child in self.named_children():
            child._set_device(device)

    # -- weights -----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """{name: array} of every parameter (the arrays themselves, not copies); a Parameter
        held twice (tied weights) under each of its names, as in PyTorch."""
        return {name: p.data for name, p in self.named_parameters(remove_duplicate=False)}

    def load_state_dict(self, state: dict) -> "Module":
        """Replace each parameter's array with an own C-contiguous copy of ``state[name]``
        in the parameter's dtype and device (arrays taken earlier from ``state_dict()``
        keep the old values). Every key must be present with the right shape; on any error
        nothing is changed and the message names the key. A Parameter held twice (tied
        weights) is loaded from any of its names (``state_dict()`` and PyTorch's give all of
        them; a dict with just the first also loads); where several are given they must
        hold the same values."""
        if not isinstance(state, Mapping):
            raise TypeError(f"load_state_dict: state must be a mapping of parameter name to "
                            f"array (as state_dict() returns), got {type(state).__name__}")
        named = list(self.named_parameters(remove_duplicate=False))
        _check_keys(named, state)
        new: dict[int, tuple[str, object]] = {}      # id(p): (its first key given, array)
        for name, p in named:
            if name not in state:
                continue                              # a tied Parameter's other name
            array = _loaded_array("load_state_dict", name, state[name], p)
            if id(p) not in new:
                new[id(p)] = name, array
            elif not np.array_equal(to_numpy(new[id(p)][1]), to_numpy(array), equal_nan=True):
                raise ValueError(f"load_state_dict: keys {new[id(p)][0]!r} and {name!r} name "
                                 "one Parameter (tied weights) but hold different values")
        for _, p in named:                            # only now: all or nothing
            p.data = new[id(p)][1]
        return self

    def save(self, path) -> None:
        """Write the weights to ``path`` (exactly that name) as an uncompressed .npz archive,
        one ``<name>.npy`` member per parameter, no pickles. The file is written beside
        ``path`` and renamed over it at the end: a failed save leaves an existing file as
        it was. ``path``: a str, bytes or os.PathLike; an OSError names it."""
        where = f"{type(self).__name__}.save"
        path = _path(where, path)
        arrays = {name: to_numpy(a) for name, a in self.state_dict().items()}
        # A fresh name beside path, created like open() would (permissions from the umask;
        # mkstemp's would be owner-only).
        tmp = os.path.join(os.path.dirname(os.path.abspath(path)),
                           f".{os.path.basename(path)}.{secrets.token_hex(8)}.tmp")
        try:
            f = open(tmp, "xb")
        except OSError as exc:      # named after path, not the temporary name
            raise _write_error(where, path, exc) from exc
        try:
            with f, zipfile.ZipFile(f, "w", zipfile.ZIP_STORED) as zf:
                for name, array in arrays.items():
                    with zf.open(f"{name}.npy", "w", force_zip64=True) as member:
                        np.lib.format.write_array(member, np.ascontiguousarray(array),
                                                  allow_pickle=False)
            os.replace(tmp, path)
        except BaseException as exc:
            os.unlink(tmp)
            if isinstance(exc, OSError):
                raise _write_error(where, path, exc) from exc
            raise

    def load(self, path) -> "Module":
        """Read weights written by ``save`` (never unpickles); on a missing key, a shape
        mismatch or an unreadable file, raises and leaves the weights as they were. Each
        member's header is checked against its parameter (shape, a plain numeric dtype, a
        member long enough for its data) before its data is read, so a corrupted or hostile
        header cannot make the load allocate what it claims. ``path``: a str, bytes or
        os.PathLike; every error names it."""
        where = f"{type(self).__name__}.load"
        path = _path(where, path)
        named = list(self.named_parameters(remove_duplicate=False))
        params = dict(named)
        name = None
        try:
            with open(path, "rb") as f:
                if f.read(6) == b"\x93NUMPY":
                    raise ValueError("not an .npz archive (a single .npy array); Module.save "
                                     "writes .npz archives")
            state = {}
            with zipfile.ZipFile(path) as archive:
                infos = {}
                for info in archive.infolist():
                    if not info.filename.endswith(".npy"):
                        raise ValueError(f"member {info.filename!r} is not a .npy array")
                    infos[info.filename[:-4]] = info
                _check_keys(named, infos, f"{where}: the weights in {path!r}")
                for name, info in infos.items():
                    with archive.open(info) as member:
                        _check_npy_header(member, info, params[name].shape)
                    with archive.open(info) as member:
                        state[name] = np.lib.format.read_array(member, allow_pickle=False)
                name = None
        # zipfile's RuntimeError: an encrypted member; NotImplementedError: a compression
        # method it lacks; zlib.error: a damaged deflate stream.
        except (OSError, ValueError, EOFError, zipfile.BadZipFile, RuntimeError,
                NotImplementedError, zlib.error) as exc:
            key = f" (key {name!r})" if name is not None else ""
            raise ValueError(f"{where}: cannot read weights from {path!r}{key}: "
                             f"{type(exc).__name__}: {exc}") from exc
        return self.load_state_dict(state)

    def __repr__(self):
        inner = "".join(f"\n  ({name}): " + repr(m).replace("\n", "\n  ")
                        for name, m in self._child_items())
        return f"{type(self).__name__}({inner}\n)" if inner else f"{type(self).__name__}()"


class Linear(Module):
    """``y = x @ weight.T + bias`` with PyTorch's layout, weight (out_features,
    in_features), and PyTorch's default initialisation: weight and bias uniform in
    ±1/sqrt(in_features), drawn from ``rng`` (a numpy Generator or an int seed).
    ``activation`` ("sigmoid", "tanh", "relu"), a cugrad extension, fuses the activation
    into the same kernel (forward and backward)."""

    _parameter_slots = ("weight", "bias")

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 device="cpu", dtype="float32", rng=None, activation=None):
        super().__init__()
        bias = check_flag("Linear", "bias", bias)
        for name, v in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"Linear: {name} must be a positive integer, got {v!r}")
        try:         # None: the default, as in PyTorch (np.dtype(None) would be float64)
            dtype = np.dtype("float32" if dtype is None else dtype)
        except TypeError:
            raise TypeError(f"Linear: dtype must be float32 or float64, got {dtype!r}") from None
        if dtype not in (np.float32, np.float64):
            raise TypeError(f"Linear: dtype must be float32 or float64, got {dtype}")
        if not (rng is None or isinstance(rng, np.random.Generator)
                or (isinstance(rng, (int, np.integer)) and not isinstance(rng, bool)
                    and rng >= 0)):
            raise TypeError(f"Linear: rng must be None, a non-negative int seed or a "
                            f"numpy.random.Generator, got {type(rng).__name__} {rng!r}")
        if activation is not None:
            check_choice("Linear", "activation", activation, F.ACTIVATIONS)
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.activation = None if activation is None else str(activation)
        rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
        bound = 1.0 / np.sqrt(in_features)
        weight = rng.uniform(-bound, bound, size=(out_features, in_features))
        self.weight = Parameter(weight.astype(dtype))
        self.bias = Parameter(rng.uniform(-bound, bound, size=out_features).astype(dtype)) \
            if bias else None
        self.to("cpu" if device is None else device)      # None: the default, as in PyTorch

    def _dtype_error(self, name: str, x, where: str):
        """A float array of another dtype than the layer's, said in the layer's terms
        (F.linear would name the weight as the odd one out), or None. Built only once F
        has refused x: F's checks come first, and each of these failures is also one of
        theirs."""
        dtype = numpy_dtype(x)           # None for another library's (torch.float64): F's words
        if dtype is None or dtype == self.weight.data.dtype or dtype not in FLOAT_DTYPES:
            return None
        return TypeError(
            f"{self._range_name}.{where}: argument {name!r} has dtype {dtype} "
            f"({describe(x)}) but the layer's parameters are {self.weight.data.dtype}; "
            f"convert it (.astype({str(self.weight.data.dtype)!r})) or create the layer "
            f"with dtype={str(dtype)!r}")

    def forward(self, x):
        b = self.bias.data if self.bias is not None else None
        try:
            y = F.linear(x, self.weight.data, b, activation=self.activation)
        except (TypeError, ValueError):
            error = (self._parameters_error("forward") or self._dtype_error("x", x, "forward")
                     or self._width_error(x))
            if error is None:
                raise
            raise error from None
        self._save(x, y if self.activation else None)
        return y

    def _parameters_error(self, where: str):
        """The layer's own parameters not fitting together (``.data`` replaced by an array
        of another shape, dtype or device), said before anything about the argument, or
        None. Built only once F has refused the call, as ``_dtype_error``."""
        w = self.weight.data
        b = None if self.bias is None else self.bias.data
        want = (self.out_features, self.in_features)
        kinds_fit = w.dtype in FLOAT_DTYPES and (b is None or (
            b.dtype == w.dtype and _backend.device_of(b) == _backend.device_of(w)))
        if kinds_fit and tuple(w.shape) == want and (b is None or tuple(b.shape) == want[:1]):
            return None
        bias = "" if b is None else f" and bias {describe(b)}"
        return (ValueError if kinds_fit else TypeError)(
            f"{self._range_name}.{where}: the layer's parameters do not fit together: weight "
            f"{describe(w)}{bias}; expected weight of shape {want}"
            f"{'' if b is None else f' and bias of shape {want[:1]}'}, of one float dtype "
            f"(float32 or float64) on one device (was a .data replaced? Module.to(device) "
            f"moves a layer; a new Linear has other shapes)")

    def _width_error(self, x):
        shape = getattr(x, "shape", None)
        if shape is not None and len(shape) == 2 and shape[1] != self.weight.shape[1]:
            return ValueError(
                f"{self._range_name}.forward: argument 'x' has {shape[1]} features "
                f"({describe(x)}) but the layer takes {self.weight.shape[1]} "
                f"(weight {self.weight.shape}); expected x of shape (batch, "
                f"{self.weight.shape[1]})")
        return None

    def backward(self, grad_out, *, input_grad=True):
        x, y = self._take_saved()
        try:
            gx, gw, gb = F.linear_backward(grad_out, x, self.weight.data,
                                           bias=self.bias is not None,
                                           activation=self.activation, out=y,
                                           input_grad=input_grad)
        except (TypeError, ValueError):
            error = (self._parameters_error("backward")
                     or self._dtype_error("grad_out", grad_out, "backward")
                     or self._grad_shape_error(grad_out, x))
            if error is None:
                raise
            raise error from None
        if self.bias is not None and (gb.dtype != self.bias.data.dtype
                                      or gb.shape != self.bias.data.shape):
            # F never reads the bias: one replaced by another dtype or shape shows here
            raise self._parameters_error("backward")
        # Both checked before either is added: a backward that raises changes no gradient,
        # so its retry counts each once.
        op = f"{self._range_name}.backward"
        self.weight._check_accumulable(op, "weight.grad", gw)
        if self.bias is None:
            self.weight._accumulate_own(gw)
            return gx
        self.bias._check_accumulable(op, "bias.grad", gb)
        # NumPy set to raise on floating-point errors (F._numpy_may_raise) may stop the
        # bias's sum after the weight's was added: the weight's is then put back (through
        # the NumPy view of another library's array, which F.accumulate writes through).
        before, held, kept = self.weight.grad, None, None
        if before is not None and F._numpy_may_raise():
            held = import_foreign(op, "weight.grad", before)
            kept = held.copy() if isinstance(held, np.ndarray) else None
        self.weight._accumulate_own(gw)
        try:
            self.bias._accumulate_own(gb)
        except Exception:
            if before is None:
                self.weight.grad = None
            elif kept is not None:
                np.copyto(held, kept)
            raise
        return gx

    def _grad_shape_error(self, grad_out, x):
        shape, want = getattr(grad_out, "shape", None), (x.shape[0], self.weight.shape[0])
        if shape is not None and len(shape) == 2 and tuple(shape) != want:
            return ValueError(      # in the layer's terms (F.linear_backward names grad_y)
                f"{self._range_name}.backward: argument 'grad_out' is {describe(grad_out)}, "
                f"expected shape {want} (the forward's batch of {want[0]} rows, "
                f"out_features {want[1]})")
        return None

    def __repr__(self):
        act = f", activation={self.activation!r}" if self.activation else ""
        return (f"Linear(in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}{act})")


class _Activation(Module):
    """Element-wise activation; saves its output for the backward (MATH.md §3). A subclass
    names its pair of ops, ``_forward`` and ``_backward`` (the backward takes the saved
    output)."""

    _forward: Callable
    _backward: Callable

    def forward(self, x):
        y = self._forward(x)
        self._save(y)
        return y

    def backward(self, grad_out, *, input_grad=True):
        input_grad = check_flag(f"{self._range_name}.backward", "input_grad", input_grad)
        (y,) = self._take_saved()
        if not input_grad:
            return None
        try:
            return self._backward(grad_out, y)
        except (TypeError, ValueError):
            error = self._grad_error(grad_out, y)
            if error is None:
                raise
            raise error from None

    def _grad_error(self, grad_out, y):
        """``grad_out`` unlike the forward's output, said in the layer's terms (F names
        the saved output ``out``, which the caller never passed), or None."""
        where = f"{self._range_name}.backward: argument 'grad_out' ({describe(grad_out)})"
        shape = getattr(grad_out, "shape", None)
        if shape is not None and tuple(shape) != tuple(y.shape):
            return ValueError(f"{where} must have the shape of the forward's output, "
                              f"{tuple(y.shape)}")
        dtype = numpy_dtype(grad_out)    # None for another library's (torch.float64): F's words
        if dtype is not None and dtype in FLOAT_DTYPES and dtype != y.dtype:  # None == float64
            return TypeError(f"{where} must have the dtype of the forward's output, "
                             f"{y.dtype}; convert it (.astype({str(y.dtype)!r}))")
        return None


class Sigmoid(_Activation):
    """``1 / (1 + exp(-x))``."""
    _forward = staticmethod(F.sigmoid)
    _backward = staticmethod(F.sigmoid_backward)


class Tanh(_Activation):
    """``tanh(x)``."""
    _forward = staticmethod(F.tanh)
    _backward = staticmethod(F.tanh_backward)


class ReLU(_Activation):
    """``max(x, 0)``."""
    _forward = staticmethod(F.relu)
    _backward = staticmethod(F.relu_backward)


# The attributes Module.__init__ sets (see Module.__getattr__).
_INIT_ATTRIBUTES = frozenset({"_range_name", "_device", "_saved", "training",
                              "_child_prefix", "_child_names"})


def _moved(a, device: str):
    """``a`` on ``device`` in its own dtype (native byte order), a copy only if needed."""
    dtype = getattr(a, "dtype", None)
    if dtype is not None:
        dtype = np.dtype(dtype)
        dtype = dtype.newbyteorder("=") if dtype.kind in "biufc" else None
    return asarray(a, device=device, dtype=dtype)


def _path(where: str, path) -> str:
    """A file name as str (bytes decoded as os.fsdecode does); TypeError for anything else."""
    try:
        return os.fsdecode(path)
    except TypeError:
        raise TypeError(f"{where}: path must be a str, bytes or os.PathLike, got "
                        f"{describe(path)}") from None


def _write_error(where: str, path: str, exc: OSError) -> OSError:
    """``exc`` told in terms of the file the caller named (the same OSError subclass)."""
    message = f"{where}: cannot write weights to {path!r}: {exc.strerror or exc}"
    return OSError(exc.errno, message) if exc.errno is not None else OSError(message)


def _loaded_array(where: str, key, value, p: Parameter, kinds: str = "fiu"):
    """``value``, a state entry for ``p``, as an own C-contiguous array of p's shape, dtype
    and device, never a view of the caller's array (it is updated in place); ``kinds``: the
    dtype kinds it may come in. TypeError or ValueError naming ``key`` otherwise."""
    value = unwrap_parameter(value)     # dict(model.named_parameters()), on either device
    if not (hasattr(value, "shape") and hasattr(value, "dtype")):
        raise TypeError(f"{where}: key {key!r} holds {describe(value)}, not an array "
                        "(state_dict() gives arrays); convert it with cugrad.asarray() or "
                        "numpy.asarray()")
    shape = tuple(value.shape)
    if shape != p.shape:
        raise ValueError(f"{where}: key {key!r} has shape {shape}, expected {p.shape} "
                         f"({describe(value)})")
    # another library's array (a PyTorch state dict's tensors), whose dtype NumPy may not
    # read (torch.float32): through DLPack / the CUDA array interface first
    value = import_foreign(where, key, value)
    if np.dtype(value.dtype).kind not in kinds:
        raise TypeError(f"{where}: key {key!r} is not a {'float' if kinds == 'f' else 'numeric'} "
                        f"array ({describe(value)})")
    refuse_masked(where, f"key {key!r}", value)
    if isinstance(value, np.ndarray):
        value = value.view(np.ndarray)          # np.matrix, memmap: plain arrays
    try:           # asarray refuses a value the dtype cannot hold (1e300 in float32, 1.5
        converted = asarray(value, device=p.device, dtype=p.dtype)          # in int64)
    except ValueError as exc:
        if p.dtype.kind == "f":     # the one thing a float dtype refuses
            raise ValueError(f"{where}: key {key!r} holds values beyond {p.dtype}'s range "
                             f"(they would become inf): {describe(value)}") from None
        reason = str(exc).removeprefix("asarray: argument 'x' ")
        raise ValueError(f"{where}: key {key!r} {reason}") from None
    return _backend.backend_for_device(p.device).xp.array(converted, order="C", copy=True)


def _check_keys(named: list, state, where: str = "load_state_dict") -> None:
    """KeyError unless ``state``'s keys are among the (name, Parameter) pairs ``named`` (every
    name of each, tied Parameters under each of theirs) and name each Parameter at least
    once; a missing one is named by its first name."""
    names = {name for name, _ in named}
    given = {id(p) for name, p in named if name in state}
    missing, seen = [], set()
    for name, p in named:
        if id(p) not in given and id(p) not in seen:
            missing.append(name)
        seen.add(id(p))
    unexpected = [k for k in state if k not in names]
    if missing or unexpected:
        expected = ("exactly" if len(seen) == len(named) else
                    "each Parameter under one or more of its names, among")
        raise KeyError(f"{where}: missing keys {missing}, unexpected keys "
                       f"{unexpected} (expected {expected} {[name for name, _ in named]})")


def _check_npy_header(member, info: zipfile.ZipInfo, shape: tuple) -> None:
    """A .npy member's header, read before its data: format 1.0 or 2.0 (what NumPy writes),
    a real numeric dtype (never objects), the parameter's shape, and a member long enough to
    hold the data it declares."""
    version = np.lib.format.read_magic(member)
    if version == (1, 0):
        got, _, dtype = np.lib.format.read_array_header_1_0(member)
    elif version == (2, 0):
        got, _, dtype = np.lib.format.read_array_header_2_0(member)
    else:
        raise ValueError(f".npy format {version} is not one Module.save writes")
    if dtype.kind not in "fiu":
        raise ValueError(f"dtype {dtype} is not a real numeric dtype (object arrays are "
                         "never unpickled)")
    if tuple(got) != tuple(shape):
        raise ValueError(f"shape {tuple(got)} in the file, expected {tuple(shape)}")
    need = math.prod(got) * dtype.itemsize
    have = info.file_size - member.tell()
    if have < need:
        raise ValueError(f"the member holds {have} bytes of data, its header declares {need}")


def _add_note(exc: BaseException, note: str) -> None:
    if hasattr(exc, "add_note"):        # Python >= 3.11
        exc.add_note(note)


def _zero_grads(where: str, named, set_to_none) -> None:
    """``zero_grad`` of the (name, Parameter) pairs ``named``: each .grad set to None, or its
    values to 0 in place. Every gradient is taken as an array (another library's through
    DLPack / the CUDA array interface) and checked writable first, so a refusal changes
    none."""
    if check_flag(where, "set_to_none", set_to_none):
        for _, p in named:
            p.grad = None
        return
    arrays = []
    for name, p in named:
        if p.grad is None:
            continue
        what = f"{name}.grad"
        grad = import_foreign(where, what, p.grad)
        if not (isinstance(grad, np.ndarray) or _backend.is_gpu_array(grad)):
            raise TypeError(f"{where}: {what} is {describe(p.grad)}, not an array; "
                            "set_to_none=False writes zeros into it: use zero_grad()")
        if exported_read_only(p.grad) or (isinstance(grad, np.ndarray)
                                          and not grad.flags.writeable):
            raise ValueError(f"{where}: {what} is read-only ({describe(p.grad)}); "
                             "set_to_none=False writes zeros into it: use zero_grad(), which "
                             "sets it to None")
        arrays.append(grad)
    for grad in arrays:
        grad[...] = 0


def _module_tree(module: Module, path: str) -> Iterator[tuple[str, Module]]:
    """``module`` and every module below it, with their positions (``".1.0"``, ``".2.fc"``
    below ``path`` ""): a module held twice, with what is below it, comes at each."""
    yield path, module
    for name, child in module._child_items():
        yield from _module_tree(child, f"{path}.{name}")


def _once_each(pairs):
    """The (name, object) pairs whose object has not come before (by identity): each object
    under its first name."""
    seen: set[int] = set()
    for name, obj in pairs:
        if id(obj) not in seen:
            seen.add(id(obj))
            yield name, obj


def _check_prefix(op: str, prefix) -> None:
    if not isinstance(prefix, str):
        raise TypeError(f"{op}: prefix must be a str, got {type(prefix).__name__} {prefix!r}")


def _joined(prefix: str, name: str) -> str:
    """``prefix.name``, PyTorch's rule for a name prefix (just one of them if the other is
    empty)."""
    return f"{prefix}.{name}" if prefix and name else prefix or name


class Sequential(Module):
    """Modules applied in order; backward runs them in reverse."""

    _has_children = True        # in self.layers, a list

    def __init__(self, *modules: Module):
        super().__init__()
        for i, m in enumerate(modules):
            if not isinstance(m, Module):
                raise TypeError(f"Sequential: argument {i} is {type(m).__name__}, expected "
                                "a cugrad.nn.Module")
        self.layers = list(modules)
        seen: dict[int, str] = {}
        for i, m in enumerate(modules):
            for path, sub in _module_tree(m, str(i)):
                if id(sub) in seen:
                    raise ValueError(
                        f"Sequential: the module at {path} ({type(sub).__name__}) is the same "
                        f"instance as the one at {seen[id(sub)]}; a module may appear once in "
                        "a model (its forward saves what its backward needs); create two "
                        "modules, and tie their parameters if they must share weights")
                seen[id(sub)] = path
        devices = {p.device for p in self.parameters()}     # of the layers' parameters
        if len(devices) > 1:
            raise ValueError(f"Sequential: layers live on different devices {sorted(devices)}; "
                             "move them to one with .to(device)")
        self._set_device(devices.pop() if devices else "cpu")
        self._name_children()           # "0:Linear", ... from the start

    def _child_items(self):
        for i, m in enumerate(self.layers):
            yield str(i), m

    def __len__(self):
        return len(self.layers)

    def __getitem__(self, i):
        """``model[i]`` is a layer; ``model[a:b]`` a new Sequential of those layers (the same
        module instances, as PyTorch's slicing gives, but numbered from 0 in its parameter
        names). A layer's range name follows the Sequential that ran it last: after the
        slice runs, its layers' ranges carry the slice's numbering until this one runs
        again."""
        if isinstance(i, slice):
            return Sequential(*self.layers[i])
        return self.layers[i]

    def forward(self, x):
        self._name_children()           # also when called as .forward(x)
        for i, m in enumerate(self.layers):
            try:
                x = m(x)
            except Exception as exc:
                # The layers before it saved this batch, those after it the last one: a
                # backward now would mix two batches. Nothing is saved instead, so backward
                # raises until the next forward.
                for _, sub in _module_tree(self, ""):
                    sub._saved = None
                _add_note(exc, f"(in Sequential layer {i}: {m!r}; nothing is saved for a "
                               "backward until the next forward)")
                raise
        return x

    def backward(self, grad_out, *, input_grad=True):
        input_grad = check_flag(f"{self._range_name}.backward", "input_grad", input_grad)
        if not self.layers:     # the identity: its gradient passes, once checked
            _, arr = prepare(f"{self._range_name}.backward", {"grad_out": grad_out})
            return arr["grad_out"] if input_grad else None
        last = len(self.layers) - 1
        for i in range(last, -1, -1):
            try:
                grad_out = (self.layers[i].backward(grad_out) if i
                            else run_backward(self.layers[0], grad_out, input_grad))
            except Exception as exc:
                _add_note(exc, f"(in Sequential layer {i}: {self.layers[i]!r}; " + (
                    f"layers {i + 1}..{last} of this Sequential have already run their "
                    "backward and accumulated their parameter gradients)" if i < last else
                    "its last layer: none of this Sequential's layers had run their "
                    "backward)"))
                raise
        return grad_out


class _FusedLoss(Module):
    """A loss whose value and gradient come from one F op: ``forward`` saves the gradient,
    ``backward()`` returns it."""

    def _loss(self, with_grad, pred, target):
        try:
            loss, grad = with_grad(pred, target, reduction=self.reduction)
        except (TypeError, ValueError) as exc:
            _add_note(exc, f"(in {self._range_name}.forward, which computes the loss and "
                           f"its gradient with F.{with_grad.__name__})")
            raise
        self._save(grad)
        self._device = _backend.device_of(pred)
        return loss

    def backward(self):
        (grad,) = self._take_saved()
        return grad


class MSELoss(_FusedLoss):
    """``loss = criterion(pred, target)``; ``criterion.backward()`` returns d loss/d pred
    (both from one pass, ``F.mse_loss_with_grad``). reduction: "mean" (default), "sum",
    "half_sum" (Σ(pred−target)²/2)."""

    def __init__(self, reduction: str = "mean"):
        super().__init__()
        check_choice("MSELoss", "reduction", reduction, F.MSE_REDUCTIONS)
        self.reduction = reduction

    def forward(self, pred, target):
        return self._loss(F.mse_loss_with_grad, pred, target)


class CrossEntropyLoss(_FusedLoss):
    """Softmax cross-entropy of logits (N, C) against class indices (N,) or probabilities
    (N, C); forward and gradient come from one pass. reduction: "mean" or "sum"."""

    def __init__(self, reduction: str = "mean"):
        super().__init__()
        check_choice("CrossEntropyLoss", "reduction", reduction, F.XENT_REDUCTIONS)
        self.reduction = reduction

    def forward(self, logits, target):
        return self._loss(F.cross_entropy_with_grad, logits, target)
