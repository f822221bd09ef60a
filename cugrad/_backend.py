"""Backend registry and dispatch: the backend follows the data.

Every op of ``cugrad.functional`` is implemented once per backend with one signature,
declared in ``OPS`` below. ``functional`` validates arguments (``_checks.prepare`` picks
the backend from the arrays' device), then calls ``<backend>.ops.<name>(...)``. A backend
keeps only cheap guards of its own preconditions for direct callers (the CUDA launchers:
C-contiguous written arrays, 32-bit sizes); otherwise a backend op may assume:

* every array argument is an array of this backend (NumPy or CuPy), of dtype float32 or
  float64 (all float arguments of one call share it; class-index targets are int64);
* shapes are those the op's docstring in ``functional`` states (already checked);
* arrays may be non-contiguous views: a backend that needs C order makes it itself.

``cuda_available()`` decides once per process whether a CUDA device really works (not
merely whether ``import cupy`` succeeds); ``CUGRAD_FORCE_CPU=1`` forces the CPU (any value
but empty, ``0``, ``false``, ``off`` or ``no``, in any case; ``CUGRAD_NVTX`` reads its
value the same way, with unset or empty meaning on).
"""

from __future__ import annotations

import inspect
import os
import threading
import weakref
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Callable

import numpy as np

# name -> parameter names, in order. Both backends implement exactly these.
OPS: dict[str, tuple[str, ...]] = {
    # c = act(op(a) @ op(b) + bias); op(x) = x.T when trans_x. bias: None or (N,);
    # activation: None | "sigmoid" | "tanh" | "relu".
    "gemm": ("a", "b", "trans_a", "trans_b", "bias", "activation"),
    # column sum of a 2-D (M, N) array -> (N,), deterministic.
    "bias_grad": ("grad",),
    # element-wise forward of a named activation on a 2-D array.
    "activation": ("name", "x"),
    # grad_in = grad_out * f'(.) with `saved` the forward OUTPUT (for relu, the output and
    # the input give the same mask, so either may be passed).
    "activation_backward": ("name", "grad_out", "saved"),
    # both of the above in one pass: (activation_backward(...), bias_grad of it), 2-D.
    "activation_backward_bias_grad": ("name", "grad_out", "saved"),
    # row-wise over the last axis of a 2-D array.
    "softmax": ("x",),
    "log_softmax": ("x",),
    # reduction: "mean" | "sum" | "half_sum"; loss is a 0-d array of the input dtype.
    "mse_loss": ("pred", "target", "reduction"),
    "mse_loss_backward": ("pred", "target", "reduction"),
    "mse_fwd_bwd": ("pred", "target", "reduction"),        # (loss, grad) from one pass
    # logits (N, C); target int64 class indices (N,) or probabilities (N, C);
    # reduction "mean" | "sum". fwd_bwd returns (loss, grad) from one pass.
    "cross_entropy": ("logits", "target", "reduction"),
    "cross_entropy_backward": ("logits", "target", "reduction"),
    "cross_entropy_fwd_bwd": ("logits", "target", "reduction"),
    # In place, total += grad (gradient accumulation; same shape, total C-contiguous).
    "accumulate": ("total", "grad"),
    # In-place optimiser updates (PyTorch's rules). momentum_buf is None when momentum == 0.
    "sgd_step": ("param", "grad", "momentum_buf", "lr", "momentum", "weight_decay"),
    "adam_step": ("param", "grad", "exp_avg", "exp_avg_sq", "step", "lr", "beta1", "beta2",
                  "eps", "weight_decay"),
}

FORCE_CPU_ENV = "CUGRAD_FORCE_CPU"
# Values of an on/off environment variable that mean off, compared after strip() and lower()
# (every switch reads them: CUGRAD_FORCE_CPU, CUGRAD_NVTX, CUGRAD_POISON_OUTPUTS); unset or
# empty means the switch's default.
ENV_OFF_VALUES = ("0", "false", "off", "no")


def env_flag(name: str, default: bool = False) -> bool:
    """The on/off environment variable ``name``: ``default`` when unset or empty, False for
    ``0``, ``false``, ``off`` or ``no`` (any case, surrounding blanks ignored), else True."""
    value = os.environ.get(name, "").strip().lower()
    return default if not value else value not in ENV_OFF_VALUES


class BackendUnavailableError(RuntimeError):
    """An array lives on a device whose backend cannot run here."""


@dataclass
class Backend:
    """One implementation of the whole op set."""

    name: str                      # "numpy" or "cuda"
    device: str                    # "cpu" or "cuda"
    xp: ModuleType                 # numpy or cupy
    ops: Any = field(default=None)  # namespace with one attribute per op in OPS


class _OpTable:
    """Attribute access to a backend's registered ops, with a clear error if one is missing.
    An op found once becomes an attribute of the table (every op call reads one: 0.03 us
    instead of 0.4 us through ``__getattr__``); registering an op again drops it."""

    def __init__(self, backend_name: str, impls: dict[str, Callable]):
        self._backend_name = backend_name
        self._impls = impls
        _TABLES.add(self)

    def __getattr__(self, op: str) -> Callable:
        try:
            fn = self._impls[op]
        except KeyError:
            raise NotImplementedError(
                f"cugrad: the {self._backend_name} backend does not implement op {op!r}") from None
        self.__dict__[op] = fn
        if self._impls.get(op) is not fn:   # registered again meanwhile: keep no old one
            self.__dict__.pop(op, None)
        return fn


_TABLES: "weakref.WeakSet[_OpTable]" = weakref.WeakSet()


_IMPLS: dict[str, dict[str, Callable]] = {}


def implements(backend_name: str, op: str) -> Callable[[Callable], Callable]:
    """Register ``fn`` as ``backend_name``'s implementation of ``op``.

    The parameter names must be exactly those of ``OPS[op]``: one signature per op.
    """
    if op not in OPS:
        raise KeyError(f"cugrad: unknown op {op!r}; known ops: {sorted(OPS)}")

    def register(fn: Callable) -> Callable:
        params = tuple(inspect.signature(fn).parameters)
        if params != OPS[op]:
            raise TypeError(
                f"cugrad: {backend_name} implementation of {op!r} has parameters {params}, "
                f"expected {OPS[op]}")
        _IMPLS.setdefault(backend_name, {})[op] = fn
        for table in list(_TABLES):
            if table._backend_name == backend_name:
                table.__dict__.pop(op, None)
        return fn

    return register


def missing_ops(backend_name: str) -> list[str]:
    """Ops of OPS that ``backend_name`` has not registered (for tests)."""
    return sorted(set(OPS) - set(_IMPLS.get(backend_name, {})))


# --------------------------------------------------------------------------- backends

_lock = threading.Lock()
_numpy_backend: Backend | None = None
_cuda_backend: Backend | None = None
_cuda_state: tuple[bool, str] | None = None   # (available, reason if not)


def numpy_backend() -> Backend:
    global _numpy_backend
    if _numpy_backend is None:
        from .backends import numpy_backend as _impl  # noqa: F401  (registers the ops)
        _numpy_backend = Backend("numpy", "cpu", np, _OpTable("numpy", _IMPLS["numpy"]))
    return _numpy_backend


def _probe_cuda() -> tuple[bool, str]:
    if env_flag(FORCE_CPU_ENV):
        return False, f"{FORCE_CPU_ENV}={os.environ[FORCE_CPU_ENV]} forces the CPU backend"
    try:
        import cupy
    except Exception as exc:  # ImportError, or a broken CUDA install raising at import
        return False, f"CuPy is not importable ({type(exc).__name__}: {exc})"
    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            return False, "CuPy sees no CUDA device"
        # A real round trip: allocate, run a kernel, copy back.
        probe = cupy.arange(4, dtype=cupy.float32) * 2
        if probe.get().tolist() != [0.0, 2.0, 4.0, 6.0]:
            return False, "a CUDA probe kernel returned a wrong result"
    except Exception as exc:
        return False, f"no working CUDA device ({type(exc).__name__}: {exc})"
    try:
        from .backends import cuda as _impl  # noqa: F401  (registers the ops)
    except ImportError as exc:
        return False, f"the CUDA backend failed to import ({exc})"
    return True, ""


def cuda_available() -> bool:
    """True when a CUDA device really works here and the CUDA backend is enabled."""
    return _cuda_status()[0]


def cuda_unavailable_reason() -> str:
    """Why ``cuda_available()`` is False ("" when it is True)."""
    return _cuda_status()[1]


def _cuda_status() -> tuple[bool, str]:
    global _cuda_state
    if _cuda_state is None:
        with _lock:
            if _cuda_state is None:
                _cuda_state = _probe_cuda()
    return _cuda_state


def cuda_backend() -> Backend:
    global _cuda_backend
    ok, reason = _cuda_status()
    if not ok:
        raise BackendUnavailableError(f"cugrad: the CUDA backend is unavailable: {reason}")
    if _cuda_backend is None:
        import cupy
        _cuda_backend = Backend("cuda", "cuda", cupy, _OpTable("cuda", _IMPLS.get("cuda", {})))
    return _cuda_backend


def is_cupy_array(x) -> bool:
    if type(x) is np.ndarray:      # the common case, first: one type check
        return False
    mod = type(x).__module__
    return mod.startswith("cupy")           # cupy, cupy_backends, cupy._core ...


def is_gpu_array(x) -> bool:
    """A CuPy array, or any other GPU array (PyTorch CUDA tensor, ...) seen through its
    ``__cuda_array_interface__`` or a CUDA ``__dlpack__``."""
    if type(x) is np.ndarray:
        return False
    return is_cupy_array(x) or has_cuda_array_interface(x) or is_cuda_dlpack(x)


DLPACK_CUDA_DEVICES = (2, 13)   # kDLCUDA, kDLCUDAManaged


def dlpack_device_type(x) -> int | None:
    """The DLPack device type ``x`` exports from (1 CPU, 2 CUDA, 13 CUDA managed, ...), or
    None without DLPack, and None where asking raises: an exporter that cannot say where
    its data lives is not one cugrad can take (the callers then treat ``x`` as they treat
    any other object, and their messages describe it)."""
    if hasattr(x, "__dlpack__") and hasattr(x, "__dlpack_device__"):
        try:
            return int(x.__dlpack_device__()[0])
        except Exception:
            return None
    return None


def is_cuda_dlpack(x) -> bool:
    """Whether ``x`` exports DLPack from CUDA memory (device or managed)."""
    return dlpack_device_type(x) in DLPACK_CUDA_DEVICES


def has_cuda_array_interface(x) -> bool:
    """Whether ``x`` exposes ``__cuda_array_interface__``, also when reading it raises
    something other than AttributeError (a PyTorch CUDA tensor that requires grad raises
    RuntimeError, which ``hasattr`` lets through): the object is a GPU array all the same,
    and the import (``_checks._gpu_import``) reports the refusal."""
    try:
        return hasattr(x, "__cuda_array_interface__")
    except Exception:
        return True


def device_of(x) -> str:
    """"cpu" for NumPy arrays (and other host data), "cuda" for GPU arrays."""
    return "cuda" if is_gpu_array(x) else "cpu"


def backend_for_device(device: str) -> Backend:
    """The backend of a normalised device name, "cpu" or "cuda" (see ``normalize_device``)."""
    return cuda_backend() if device == "cuda" else numpy_backend()


def normalize_device(device) -> str:
    """"cpu" or "cuda" for a device name, any case: "cpu" (or "numpy", the backend's name),
    "cuda" (the current CuPy device), or "cuda:0" where device 0 is the current one (another
    current device is refused: cugrad runs on the current device, whatever the name said)."""
    name = str(device).lower()
    if name in ("cpu", "numpy"):
        return "cpu"
    if name == "cuda" or name.startswith("cuda:"):
        if name not in ("cuda", "cuda:0"):
            raise ValueError(f"cugrad: device {device!r} is not supported; expected 'cpu' or "
                             "'cuda' (the current CuPy device)")
        if name == "cuda:0" and _cuda_status()[0]:
            current = cuda_backend().xp.cuda.runtime.getDevice()
            if current != 0:
                raise ValueError(
                    f"cugrad: device {device!r} is not the current CuPy device ({current}); "
                    "cugrad runs on the current device: pass 'cuda', or make device 0 "
                    "current (with cupy.cuda.Device(0): ...)")
        return "cuda"
    raise ValueError(f"cugrad: unknown device {device!r}; expected 'cpu' or 'cuda'")
